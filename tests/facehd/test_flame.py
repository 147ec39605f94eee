import pickle
import sys
import types

import numpy as np
import pytest
import scipy.sparse
import torch
from helpers import assert_close
from scipy.spatial.transform import Rotation

from facehd import flame
from facehd.errors import FileFormatError

V, F = 40, 60


class Ch:
    """A stand-in for chumpy's `Ch`: pickled, like the real one, as its class path plus a state
    dict whose `x` holds the array (and bookkeeping entries the reader must ignore)."""

    def __init__(self, x):
        self.x = x
        self._dirty_vars = set()
        self._itr = None

    def __getstate__(self):
        return dict(self.__dict__)


def _dump_with_fake_chumpy(obj, path, protocol=2):
    """Pickle ``obj`` with `Ch` filed under `chumpy.ch.Ch`, as the real FLAME file names it; the
    fake modules exist only while pickling, so the reader sees a file that needs chumpy."""
    chumpy, chumpy_ch = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")
    chumpy_ch.Ch = Ch
    chumpy.ch = chumpy_ch
    old = Ch.__module__, Ch.__qualname__
    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = chumpy, chumpy_ch
    try:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=protocol)
    finally:
        Ch.__module__, Ch.__qualname__ = old
        del sys.modules["chumpy"], sys.modules["chumpy.ch"]


def _random_model(seed=0):
    rng = np.random.default_rng(seed)
    weights = rng.random((V, flame.N_JOINTS)) ** 3
    weights /= weights.sum(1, keepdims=True)
    regressor = np.zeros((flame.N_JOINTS, V))
    for j in range(flame.N_JOINTS):
        idx = rng.choice(V, 4, replace=False)
        regressor[j, idx] = 0.25
    return {
        "v_template": rng.normal(size=(V, 3)) * 0.1,
        "shapedirs": rng.normal(size=(V, 3, 400)) * 1e-3,
        "posedirs": rng.normal(size=(V, 3, 36)) * 1e-2,
        "J_regressor": regressor,
        "weights": weights,
        "kintree_table": np.array([[2**32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.uint32),
        "f": rng.integers(0, V, size=(F, 3)).astype(np.uint32),
    }


def _write_real_layout(arrays, path):
    """The real file's quirks: chumpy arrays for v_template / shapedirs / weights, a scipy sparse
    (csc) J_regressor, uint32 indices, strings beside the arrays."""
    data = dict(arrays)
    for key in ("v_template", "shapedirs", "weights"):
        data[key] = Ch(arrays[key])
    data["J_regressor"] = scipy.sparse.csc_matrix(arrays["J_regressor"])
    data["bs_style"], data["bs_type"] = "lbs", "lrotmin"
    _dump_with_fake_chumpy(data, path)


@pytest.fixture(scope="module")
def arrays():
    return _random_model()


@pytest.fixture(scope="module")
def model(arrays, tmp_path_factory):
    path = tmp_path_factory.mktemp("flame") / "generic_model.pkl"
    _write_real_layout(arrays, path)
    return flame.load_flame(path)


def test_reads_chumpy_and_sparse_without_chumpy(model, arrays):
    assert "chumpy" not in sys.modules
    assert_close(model.v_template, arrays["v_template"], atol=0)
    assert_close(model.shapedirs, arrays["shapedirs"], atol=0)
    assert_close(model.J_regressor, arrays["J_regressor"], atol=0)
    assert_close(model.weights, arrays["weights"], atol=0)
    assert model.parents.tolist() == [-1, 0, 1, 1, 1]
    assert model.faces.dtype == np.int64 and np.array_equal(model.faces, arrays["f"])


class Evil:
    def __reduce__(self):
        return (print, ("executed",))


def test_refuses_other_classes(tmp_path, capsys):
    path = tmp_path / "generic_model.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"v_template": Evil()}, fh, protocol=2)
    with pytest.raises(FileFormatError, match="generic_model.pkl: holds a pickled .*print"):
        flame.load_flame(path)
    assert "executed" not in capsys.readouterr().out


@pytest.mark.parametrize("key, value, message", [
    ("shapedirs", np.zeros((V, 3, 300)), "shapedirs.*expected"),
    ("J_regressor", np.zeros((4, V)), "J_regressor.*expected"),
    ("f", np.full((F, 3), V), "'f'.*outside"),
    ("weights", None, "missing key 'weights'"),
])
def test_wrong_shapes_name_the_file(arrays, tmp_path, key, value, message):
    data = dict(arrays)
    if value is None:
        del data[key]
    else:
        data[key] = value
    path = tmp_path / "generic_model.pkl"
    _write_real_layout(data, path) if key != "weights" else _dump_with_fake_chumpy(data, path)
    with pytest.raises(FileFormatError, match=f"generic_model.pkl: .*{message}"):
        flame.load_flame(path)


def test_truncated_pickle(tmp_path, arrays):
    path = tmp_path / "generic_model.pkl"
    _write_real_layout(arrays, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(FileFormatError, match="generic_model.pkl: not a readable pickle"):
        flame.load_flame(path)


def test_head_template_keeps_separate_uv_indices(tmp_path):
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    faces_uv = np.array([[0, 1, 2], [4, 2, 3]])  # vertex 0 has two UVs (a seam)
    uvs = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.5, 0.5]])
    template = flame.HeadTemplate(np.eye(4, 3), uvs, faces, faces_uv)
    flame.write_head_template(tmp_path / "head_template.obj", template)
    back = flame.read_head_template(tmp_path / "head_template.obj")
    assert np.array_equal(back.faces, faces) and np.array_equal(back.faces_uv, faces_uv)
    assert_close(back.uvs, uvs, atol=0)
    assert back.vertex_uvs().shape == (4, 2)


def test_static_embedding_round_trip_and_checks(tmp_path):
    rng = np.random.default_rng(1)
    bary = rng.random((51, 3))
    bary /= bary.sum(1, keepdims=True)
    emb = flame.LandmarkEmbedding(rng.integers(0, F, 51), bary)
    flame.write_static_embedding(tmp_path / "e.pkl", emb)
    back = flame.load_static_embedding(tmp_path / "e.pkl", F)
    assert np.array_equal(back.face_index, emb.face_index)
    with pytest.raises(FileFormatError, match="e.pkl: lmk_face_idx"):
        flame.load_static_embedding(tmp_path / "e.pkl", 10)
    verts = rng.normal(size=(V, 3))
    faces = rng.integers(0, V, (F, 3))
    expect = np.stack([bary[i] @ verts[faces[emb.face_index[i]]] for i in range(51)])
    assert_close(flame.embedded_points(verts, faces, back), expect)
    assert_close(flame.embedded_points(torch.tensor(verts)[None], faces, back)[0], expect)


def naive_flame(m: flame.FlameModel, shape, expression, pose):
    """FLAME written out vertex by vertex and joint by joint (numpy, float64)."""
    shaped = m.v_template.copy()
    for v in range(m.n_vertices):
        for k, c in enumerate(shape):
            shaped[v] += m.shapedirs[v, :, k] * c
        for k, c in enumerate(expression):
            shaped[v] += m.shapedirs[v, :, flame.N_SHAPE + k] * c
    joints = m.J_regressor @ shaped
    rots = [Rotation.from_rotvec(pose[3 * j:3 * j + 3]).as_matrix() for j in range(flame.N_JOINTS)]
    feature = np.concatenate([(rots[j] - np.eye(3)).ravel() for j in range(1, flame.N_JOINTS)])
    world = []
    for j in range(flame.N_JOINTS):
        p = m.parents[j]
        local = np.eye(4)
        local[:3, :3] = rots[j]
        local[:3, 3] = joints[j] - (joints[p] if p >= 0 else 0)
        world.append(local if p < 0 else world[p] @ local)
    out = np.zeros_like(shaped)
    for v in range(m.n_vertices):
        rest = shaped[v] + m.posedirs[v] @ feature
        for j in range(flame.N_JOINTS):
            g = world[j].copy()
            g[:3, 3] -= g[:3, :3] @ joints[j]
            out[v] += m.weights[v, j] * (g[:3, :3] @ rest + g[:3, 3])
    return out, np.stack([w[:3, 3] for w in world])


def test_forward_matches_naive_loop(model):
    rng = np.random.default_rng(2)
    tensors = flame.FlameTensors.of(model, torch.float64)
    shape, expr, pose = rng.normal(size=(3, 20)), rng.normal(size=(3, 10)), rng.normal(size=(3, 15)) * 0.4
    pose[1] = 0.0  # the zero pose takes Rodrigues' small-angle branch
    out = flame.flame_forward(tensors, torch.tensor(shape), torch.tensor(expr), torch.tensor(pose))
    for b in range(3):
        verts, joints = naive_flame(model, shape[b], expr[b], pose[b])
        assert_close(out.vertices[b], verts, atol=1e-10, msg=f"batch {b}")
        assert_close(out.joints[b], joints, atol=1e-10)


def test_pose_helper_and_translation(model):
    tensors = flame.FlameTensors.of(model, torch.float64)
    g, n, j, e = (torch.full((1, k), float(i + 1), dtype=torch.float64) for i, k in enumerate((3, 3, 3, 6)))
    pose = flame.flame_pose(g, n, j, e)
    assert pose[0].tolist() == [1.0] * 3 + [2.0] * 3 + [3.0] * 3 + [4.0] * 6
    zero = torch.zeros(1, 5, dtype=torch.float64)
    t = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    a = flame.flame_forward(tensors, zero, zero, pose).vertices
    b = flame.flame_forward(tensors, zero, zero, pose, translation=t).vertices
    assert_close(b - a, t.expand_as(a), atol=1e-12)


def test_gradients(model):
    tensors = flame.FlameTensors.of(model, torch.float64)
    shape = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    expr = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    pose = (0.3 * torch.randn(2, 15, dtype=torch.float64)).requires_grad_()
    with torch.no_grad():
        pose[0, 3:6] = 0.0  # gradient through the zero rotation

    def f(s, e, p):
        return flame.flame_forward(tensors, s, e, p).vertices[:, ::7]

    assert torch.autograd.gradcheck(f, (shape, expr, pose))


def test_rodrigues_matches_scipy():
    vecs = np.concatenate([np.random.default_rng(3).normal(size=(20, 3)), np.full((1, 3), 1e-6), np.zeros((1, 3))])
    assert_close(flame.rodrigues(torch.tensor(vecs)), Rotation.from_rotvec(vecs).as_matrix(), atol=1e-12)
