import math

import numpy as np
import pytest
import scipy.io
import torch
from factories import GRID, tiny_fields
from helpers import assert_close
from scipy.spatial.transform import Rotation

from facehd import conventions as cv
from facehd.errors import InputError, ModelFileError
from facehd.morphable import (
    compute_albedo,
    compute_shape,
    load_morphable_model,
    project,
    reconstruct,
    rotation_matrix,
    sh_shading,
    split_coeffs,
    to_camera,
    vertex_normals,
    y_up_to_rows,
)


@pytest.fixture
def tiny_path(tmp_path):
    path = tmp_path / "BFM_model_front.mat"
    scipy.io.savemat(path, tiny_fields())
    return path


@pytest.fixture
def tiny(tiny_path):
    return load_morphable_model(tiny_path, dtype=torch.float64)


def test_loader_applies_the_conventions(tiny_path, tiny):
    raw = tiny_fields()
    n = GRID * GRID
    mean = raw["meanshape"].reshape(n, 3)
    assert_close(tiny.mean_shape, mean - mean.mean(0), atol=1e-12)
    assert_close(tiny.mean_shape.mean(0), np.zeros(3), atol=1e-12)
    assert_close(tiny.faces, raw["tri"] - 1)
    assert tiny.point_buf.max() == tiny.n_faces  # padding F+1 -> F, the appended zero normal
    assert tiny.keypoints.shape == (68,) and tiny.keypoints.min() == 0
    # tri_mask2 is local to frontmask2_idx and must be remapped to the full vertex array
    front = raw["frontmask2_idx"].ravel() - 1
    assert_close(tiny.front_faces, front[raw["tri_mask2"] - 1])
    assert set(tiny.front_faces.unique().tolist()) <= set(front.tolist())
    assert tiny.skin_mask.dtype == torch.bool and int(tiny.skin_mask.sum()) == n // 2
    assert tiny.uv is None and tiny.region is None
    assert tiny.landmarks7.tolist() == [tiny.keypoints[i].item() for i in cv.LANDMARKS7_IBUG]


def test_loader_reads_optional_uv_and_regions(tmp_path):
    fields = tiny_fields()
    n = GRID * GRID
    fields["uv"] = np.random.default_rng(1).uniform(0, 1, (n, 2))
    fields["region"] = (np.arange(n) % len(cv.REGION_NAMES)).reshape(1, -1)
    fields["region_names"] = ",".join(cv.REGION_NAMES)
    scipy.io.savemat(tmp_path / "m.mat", fields)
    model = load_morphable_model(tmp_path / "m.mat")
    assert model.uv.shape == (n, 2)
    assert model.region_mask("nose").sum() == sum(1 for i in range(n) if i % 7 == cv.REGION_CODES["nose"])
    with pytest.raises(InputError, match="unknown region"):
        model.region_mask("ears")


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda f: f.pop("idBase"), "missing field 'idBase'"),
        (lambda f: f.update(exBase=f["exBase"][:, :10]), "'exBase' has shape"),
        (lambda f: f.update(tri=f["tri"] - 1), "'tri' holds indices"),  # 0-based in the file
        (lambda f: f.update(keypoints=f["keypoints"][:, :67]), "'keypoints' has 67 entries"),
        (lambda f: f["meantex"].__setitem__((0, 3), np.nan), "'meantex' holds 1 NaN"),
        (lambda f: f.update(point_buf=f["point_buf"] + 5), "'point_buf' holds indices"),
        (lambda f: f.update(tri_mask2=f["tri"]), "'tri_mask2' holds indices"),
        (lambda f: f.update(skinmask=f["skinmask"][:, :3]), "'skinmask' has 3 entries"),
    ],
)
def test_loader_names_the_bad_field(tmp_path, edit, words):
    fields = tiny_fields()
    edit(fields)
    path = tmp_path / "broken.mat"
    scipy.io.savemat(path, fields)
    with pytest.raises(ModelFileError, match=words) as info:
        load_morphable_model(path)
    assert "broken.mat" in str(info.value)


def test_loader_rejects_a_non_mat_file(tmp_path):
    path = tmp_path / "model.mat"
    path.write_bytes(b"this is not MATLAB\x00" * 10)
    with pytest.raises(ModelFileError, match="model.mat"):
        load_morphable_model(path)
    with pytest.raises(ModelFileError, match="no such model file"):
        load_morphable_model(tmp_path / "absent.mat")


def test_split_coeffs_groups_and_errors():
    coeffs = torch.arange(257.0)[None]
    c = split_coeffs(coeffs)
    assert [t.shape[1] for t in c] == [80, 64, 80, 3, 27, 3]
    assert c.tex[0, 0] == 144 and c.angle[0, 0] == 224 and c.gamma[0, 0] == 227 and c.trans[0, 0] == 254
    with pytest.raises(InputError, match="257"):
        split_coeffs(torch.zeros(2, 256))


def test_shape_and_albedo_against_a_loop(tiny):
    torch.manual_seed(0)
    idc, expc, texc = torch.randn(2, 80, dtype=torch.float64), torch.randn(2, 64, dtype=torch.float64), \
        torch.randn(2, 80, dtype=torch.float64)
    shape = compute_shape(tiny, idc, expc)
    albedo = compute_albedo(tiny, texc)
    for b in range(2):
        for v in range(tiny.n_vertices):
            for k in range(3):
                row = 3 * v + k
                want = tiny.mean_shape[v, k] + tiny.id_base[row] @ idc[b] + tiny.exp_base[row] @ expc[b]
                assert abs(shape[b, v, k] - want) < 1e-12
                want_tex = (tiny.mean_tex[row] + tiny.tex_base[row] @ texc[b]) / 255
                assert abs(albedo[b, v, k] - want_tex) < 1e-12


def test_rotation_is_rz_ry_rx():
    angles = torch.tensor([[0.3, -0.5, 1.1], [0.0, 0.0, 0.0], [-1.2, 0.7, -0.2]], dtype=torch.float64)
    got = rotation_matrix(angles)
    for a, r in zip(angles.numpy(), got):
        x, y, z = a
        want = Rotation.from_euler("ZYX", [z, y, x]).as_matrix()  # intrinsic Z Y X = Rz Ry Rx
        assert_close(r, want, atol=1e-12)
        assert_close(r @ r.T, np.eye(3), atol=1e-12)
    torch.autograd.gradcheck(rotation_matrix, (angles.clone().requires_grad_(),))


def test_camera_and_projection():
    pts = torch.tensor([[[0.0, 0.0, 0.0], [0.5, -0.25, 1.0]]], dtype=torch.float64)
    cam = to_camera(pts)
    assert_close(cam[0, 1], [0.5, -0.25, 9.0])
    uv = project(cam)
    assert_close(uv[0, 0], [112.0, 112.0])
    assert_close(uv[0, 1], [1015 * 0.5 / 9 + 112, 1015 * -0.25 / 9 + 112])
    rows = y_up_to_rows(uv)
    assert_close(rows[0, 1], [1015 * 0.5 / 9 + 112, 223 - (1015 * -0.25 / 9 + 112)])
    # the camera frustum: fov 12.594 deg covers exactly the 224-pixel image
    edge = math.tan(math.radians(cv.FOV_DEG / 2)) * 10.0
    assert_close(project(to_camera(torch.tensor([[[edge, 0.0, 0.0]]])))[0, 0, 0], 224.0, atol=1e-3)


def naive_vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    out = np.zeros_like(verts)
    for f in faces:
        v1, v2, v3 = verts[f]
        n = np.cross(v1 - v2, v2 - v3)
        out[f] += n / np.linalg.norm(n)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_vertex_normals_against_naive(tiny):
    verts = tiny.mean_shape[None].clone()
    got = vertex_normals(verts, tiny.faces, tiny.point_buf)
    assert_close(got[0], naive_vertex_normals(verts[0].numpy(), tiny.faces.numpy()), atol=1e-10)
    # a flat sheet in z=const with counter-clockwise faces has normals +z
    flat = verts.clone()
    flat[..., 2] = 0
    assert_close(vertex_normals(flat, tiny.faces, tiny.point_buf)[0, :, 2], np.ones(tiny.n_vertices))
    torch.autograd.gradcheck(lambda v: vertex_normals(v, tiny.faces, tiny.point_buf),
                             (verts.requires_grad_(),))


def naive_sh(albedo: np.ndarray, normal: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """DESIGN.md section 3, written out per vertex."""
    a = [math.pi, 2 * math.pi / math.sqrt(3), 2 * math.pi / math.sqrt(8)]
    c = [1 / math.sqrt(4 * math.pi), math.sqrt(3) / math.sqrt(4 * math.pi), 3 * math.sqrt(5) / math.sqrt(12 * math.pi)]
    x, y, z = normal
    basis = np.array([
        a[0] * c[0], -a[1] * c[1] * y, a[1] * c[1] * z, -a[1] * c[1] * x, a[2] * c[2] * x * y,
        -a[2] * c[2] * y * z, 0.5 * a[2] * c[2] / math.sqrt(3) * (3 * z * z - 1), -a[2] * c[2] * x * z,
        0.5 * a[2] * c[2] * (x * x - y * y),
    ])
    g = gamma.reshape(3, 9).copy()
    g[:, 0] += 0.8
    return np.array([basis @ g[ch] * albedo[ch] for ch in range(3)])


def test_sh_shading_against_naive():
    rng = np.random.default_rng(3)
    normals = rng.standard_normal((2, 5, 3))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    albedo = rng.uniform(0, 1, (2, 5, 3))
    gamma = 0.3 * rng.standard_normal((2, 27))
    got = sh_shading(*(torch.tensor(a) for a in (albedo, normals, gamma)))
    for b in range(2):
        for v in range(5):
            assert_close(got[b, v], naive_sh(albedo[b, v], normals[b, v], gamma[b]), atol=1e-12)
    args = tuple(torch.tensor(a, requires_grad=True) for a in (albedo, normals, gamma))
    torch.autograd.gradcheck(sh_shading, args)


def test_reconstruct_at_zero_coefficients(tiny):
    coeffs = torch.zeros(1, 257, dtype=torch.float64)
    rec = reconstruct(tiny, coeffs)
    assert_close(rec.shape[0], tiny.mean_shape)
    assert_close(rec.vertices, rec.shape)
    assert_close(rec.rotation[0], np.eye(3))
    assert_close(rec.albedo[0].reshape(-1), tiny.mean_tex / 255)
    # ambient light only: colour = 0.8 * a0 c0 * albedo
    assert_close(rec.color, 0.8 * cv.SH_A[0] * cv.SH_C[0] * rec.albedo, atol=1e-12)
    assert_close(rec.landmarks[0], rec.proj[0, tiny.keypoints])


def test_reconstruct_pose_and_gradients(tiny):
    torch.manual_seed(1)
    coeffs = 0.1 * torch.randn(2, 257, dtype=torch.float64)
    rec = reconstruct(tiny, coeffs)
    c = split_coeffs(coeffs)
    r = rotation_matrix(c.angle)
    for b in range(2):
        assert_close(rec.vertices[b], rec.shape[b] @ r[b].T + c.trans[b], atol=1e-12)
        # normals are rotated with the shape
        unposed = vertex_normals(rec.shape[b:b + 1], tiny.faces, tiny.point_buf)[0]
        assert_close(rec.normals[b], unposed @ r[b].T, atol=1e-12)
    small = coeffs[:1].clone().requires_grad_()
    torch.autograd.gradcheck(lambda x: reconstruct(tiny, x).landmarks, (small,))
    torch.autograd.gradcheck(lambda x: reconstruct(tiny, x).color, (small,))


def test_dtype_and_device_generic(tiny_path):
    m32 = load_morphable_model(tiny_path)
    assert m32.mean_shape.dtype == torch.float32
    m64 = m32.to(dtype=torch.float64)
    assert m64.id_base.dtype == torch.float64 and m64.faces.dtype == torch.int64
    coeffs = 0.1 * torch.randn(3, 257)
    r32 = reconstruct(m32, coeffs)
    r64 = reconstruct(m64, coeffs.double())
    assert r32.color.dtype == torch.float32 and r64.color.dtype == torch.float64
    assert_close(r32.proj, r64.proj, atol=1e-3)
