import numpy as np
import pytest
import scipy.io
import torch
from helpers import assert_close

from facehd import conventions as cv
from facehd.errors import InputError
from facehd.morphable import load_morphable_model, reconstruct, vertex_normals
from facehd.synth import EXPRESSION_NAMES, make_synth_bfm, write_synth_bfm

RES = 40  # small grid: ~1.6k vertices, generated in well under a second


@pytest.fixture(scope="module")
def fields():
    return make_synth_bfm(RES, seed=0)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_synth_bfm(tmp_path_factory.mktemp("synth") / "BFM_model_front.mat", RES, seed=0)


@pytest.fixture(scope="module")
def model(model_path):
    return load_morphable_model(model_path, dtype=torch.float64)


def _columns(base: torch.Tensor) -> np.ndarray:
    """(3N, K) interleaved basis -> (K, N, 3) per-vertex displacements."""
    b = base.numpy()
    return b.T.reshape(b.shape[1], -1, 3)


def _edges(faces: np.ndarray) -> np.ndarray:
    pairs = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    return np.unique(np.sort(pairs, axis=1), axis=0)


def _roughness(field: np.ndarray, edges: np.ndarray) -> float:
    """Neighbour-difference energy relative to the field's energy (0 for a constant field)."""
    field = field.reshape(len(field), -1)
    return float(((field[edges[:, 0]] - field[edges[:, 1]]) ** 2).sum() / (field**2).sum())


def _support(displacement: np.ndarray, fraction: float) -> float:
    """Share of vertices that move more than ``fraction`` of the largest motion."""
    norm = np.linalg.norm(displacement, axis=-1)
    return float((norm > fraction * norm.max()).mean())


# --- file layout -----------------------------------------------------------------------------


def test_raw_fields_follow_the_bfm_layout(fields):
    n = fields["meanshape"].size // 3
    n_faces = len(fields["tri"])
    n_front = len(fields["frontmask2_idx"])
    assert fields["meanshape"].shape == (1, 3 * n) and fields["meantex"].shape == (1, 3 * n)
    assert fields["idBase"].shape == (3 * n, cv.N_ID)
    assert fields["exBase"].shape == (3 * n, cv.N_EXP)
    assert fields["texBase"].shape == (3 * n, cv.N_TEX)
    assert fields["point_buf"].shape == (n, 8) and fields["keypoints"].shape == (1, 68)
    assert fields["skinmask"].shape == (1, n) and fields["region"].shape == (1, n)
    assert fields["uv"].shape == (n, 2) and fields["frontmask2_idx"].shape == (n_front, 1)
    for name in ("meanshape", "idBase", "exBase", "meantex", "texBase", "uv"):
        assert fields[name].dtype == np.float32, name
    # every index field is 1-based
    assert fields["tri"].min() == 1 and fields["tri"].max() == n
    assert fields["point_buf"].min() == 1 and fields["point_buf"].max() == n_faces + 1
    assert fields["keypoints"].min() >= 1 and fields["keypoints"].max() <= n
    assert fields["frontmask2_idx"].min() >= 1 and fields["frontmask2_idx"].max() <= n
    # tri_mask2 is local to frontmask2_idx
    assert fields["tri_mask2"].min() == 1 and fields["tri_mask2"].max() <= n_front
    assert fields["region_names"] == ",".join(cv.REGION_NAMES)
    assert f"resolution={RES}" in fields["synth_info"] and "seed=0" in fields["synth_info"]


def test_point_buf_lists_the_incident_faces_padded_with_f_plus_1(fields):
    tri = fields["tri"] - 1
    n, n_faces = len(fields["point_buf"]), len(tri)
    for v in range(0, n, 7):
        incident = set(np.flatnonzero((tri == v).any(axis=1)).tolist())
        row = fields["point_buf"][v] - 1
        assert set(row[row < n_faces].tolist()) == incident
        assert (row[len(incident):] == n_faces).all()  # padding comes after the faces


def test_front_faces_use_only_front_vertices(fields):
    front = fields["frontmask2_idx"].ravel() - 1
    front_faces = front[fields["tri_mask2"] - 1]
    tri = {tuple(f) for f in (fields["tri"] - 1).tolist()}
    assert all(tuple(f) in tri for f in front_faces.tolist())
    region = fields["region"].ravel()
    assert not np.isin(front, np.flatnonzero(region == cv.REGION_CODES["hair_band"])).any()


def test_loads_with_the_shared_loader(model, fields):
    n = fields["meanshape"].size // 3
    assert model.n_vertices == n and model.n_faces == len(fields["tri"])
    assert model.id_base.shape == (3 * n, 80) and model.exp_base.shape == (3 * n, 64)
    assert model.tex_base.shape == (3 * n, 80)
    assert_close(model.faces, fields["tri"] - 1)
    assert_close(model.keypoints, fields["keypoints"].ravel() - 1)
    assert model.point_buf.max() == model.n_faces  # the loader maps the F+1 padding to F
    assert model.uv is not None and float(model.uv.min()) == 0.0 and float(model.uv.max()) == 1.0
    assert model.region is not None and model.region_names == cv.REGION_NAMES
    for name in cv.REGION_NAMES:
        assert int(model.region_mask(name).sum()) > 0, name
    # the loader recentres; the raw mean is not centred, so this checks the shapes line up
    mean = fields["meanshape"].reshape(-1, 3).astype(np.float64)
    assert_close(model.mean_shape, mean - mean.mean(0), atol=1e-6)


def test_write_is_atomic_and_leaves_no_temporary_files(model_path):
    assert model_path.is_file()
    assert sorted(p.name for p in model_path.parent.iterdir()) == [model_path.name]
    raw = scipy.io.loadmat(str(model_path))
    assert raw["idBase"].shape == (3 * (raw["meanshape"].size // 3), 80)


def test_deterministic_for_a_seed(fields):
    again = make_synth_bfm(RES, seed=0)
    other = make_synth_bfm(RES, seed=1)
    for name, value in fields.items():
        assert np.array_equal(value, again[name]), name
    assert not np.array_equal(fields["idBase"], other["idBase"])
    assert not np.array_equal(fields["exBase"], other["exBase"])
    assert not np.array_equal(fields["texBase"], other["texBase"])
    # the seed changes the bases, not the mean face or the landmarks
    assert np.array_equal(fields["meanshape"], other["meanshape"])
    assert np.array_equal(fields["keypoints"], other["keypoints"])


def test_too_small_resolution_is_refused():
    with pytest.raises(InputError, match="resolution"):
        make_synth_bfm(4)


# --- mean shape and landmarks ------------------------------------------------------------------


def test_nose_tip_is_the_most_forward_vertex(model):
    mean = model.mean_shape
    assert int(model.keypoints[cv.NOSE_TIP_IBUG]) == int(mean[:, 2].argmax())
    # and it protrudes well beyond the rest of the face (mm)
    tip = mean[model.keypoints[cv.NOSE_TIP_IBUG]]
    assert float(tip[2] - mean[model.keypoints[[36, 45, 48, 54]], 2].max()) * cv.MM_PER_MODEL_UNIT > 15


def test_landmarks_are_ordered_like_ibug(model):
    lm = model.mean_shape[model.keypoints].numpy()
    x, y = lm[:, 0], lm[:, 1]
    # subject's right (x < 0) first: jaw, brows, eyes and mouth corners
    assert x[0] < 0 < x[16] and x[17] < 0 < x[26] and x[36] < x[39] < 0 < x[42] < x[45]
    assert x[48] < 0 < x[54] and x[31] < x[33] < x[35]
    assert np.all(np.diff(x[0:9]) > 0) and np.all(np.diff(x[8:17]) > 0)  # jaw runs left to right
    # top to bottom: brows, eyes, nose tip, subnasale, mouth, chin
    brows, eyes, mouth = y[17:27].mean(), y[36:48].mean(), y[48:68].mean()
    assert brows > eyes > y[30] > y[33] > mouth > y[8]
    assert y[8] == y.min()  # the chin is the lowest landmark
    assert y[37] > y[41] and y[43] > y[47]  # upper lids above lower lids
    assert y[51] > y[57]  # upper lip above lower lip
    # mirror pairs are mirror images (the mean face is symmetric)
    for a, b in ((0, 16), (36, 45), (39, 42), (48, 54), (31, 35), (19, 24)):
        assert_close(lm[a] * [-1, 1, 1], lm[b], atol=1e-6)


def test_face_width_and_height_are_plausible(model):
    extent_mm = (model.mean_shape.max(0).values - model.mean_shape.min(0).values) * cv.MM_PER_MODEL_UNIT
    assert 120 < float(extent_mm[0]) < 160
    lm = model.mean_shape[model.keypoints]
    hairline = model.mean_shape[model.region_mask("hair_band"), 1].min()
    chin_to_hairline_mm = float(hairline - lm[8, 1]) * cv.MM_PER_MODEL_UNIT
    assert 170 < chin_to_hairline_mm < 220
    eye_width_mm = float(lm[45, 0] - lm[36, 0]) * cv.MM_PER_MODEL_UNIT
    assert 80 < eye_width_mm < 100  # outer eye corners, typical adult ~90 mm


def test_landmarks_sit_on_their_features(model):
    names = model.region_names
    region = model.region[model.keypoints].tolist()
    assert {names[r] for r in region[36:48]} == {"eyes"}
    assert {names[r] for r in region[48:68]} == {"mouth"}
    assert {names[r] for r in region[27:36]} == {"nose"}
    mean = model.mean_shape
    z = mean[model.keypoints, 2]
    # the eyes lie in sockets: deeper than the brow ridges above them and the nose bridge
    assert float(z[36:48].max()) < float(min(z[19], z[24], z[27]))


def test_skin_mask_leaves_out_eyes_and_hair(model):
    skin = model.skin_mask
    assert not skin[model.region_mask("eyes")].any()
    assert not skin[model.region_mask("hair_band")].any()
    assert skin[model.region_mask("cheek")].all() and skin[model.region_mask("nose")].all()


def test_front_normals_point_toward_the_camera(model):
    normals = vertex_normals(model.mean_shape[None], model.faces, model.point_buf)[0]
    front_nz = normals[model.front_vertices, 2]
    assert float(front_nz.mean()) > 0.7
    assert float((front_nz > 0).float().mean()) > 0.99
    # the face normal convention (v1 - v2) x (v2 - v3) points outward on every front face
    v = model.mean_shape[model.faces]
    face_n = torch.linalg.cross(v[:, 0] - v[:, 1], v[:, 1] - v[:, 2], dim=-1)
    assert float((face_n[:, 2] > 0).float().mean()) > 0.97
    nose_normal = normals[model.keypoints[cv.NOSE_TIP_IBUG]]
    assert float(nose_normal[2]) > 0.9


# --- bases -----------------------------------------------------------------------------------


def test_identity_bases_are_smooth_and_global(model):
    edges = _edges(model.faces.numpy())
    rng = np.random.default_rng(0)
    noise = _roughness(rng.standard_normal((model.n_vertices, 3)), edges)
    ids = _columns(model.id_base)
    rough = np.array([_roughness(b, edges) for b in ids]) / noise
    assert rough.mean() < 0.1 and rough.max() < 0.25
    support = np.array([_support(b, 0.1) for b in ids])
    assert np.median(support) > 0.85 and support.min() > 0.5
    # orthogonal to translations: the mean displacement of every component is ~0
    assert np.abs(ids.mean(axis=1)).max() < 1e-3 * np.abs(ids).max()


def test_expression_bases_are_localized(model):
    exps = _columns(model.exp_base)
    support = np.array([_support(b, 0.05) for b in exps])
    assert np.median(support) < 0.1
    assert (support < 0.3).mean() > 0.9
    jaw = exps[EXPRESSION_NAMES.index("jaw_open")]
    motion = np.linalg.norm(jaw, axis=1)
    chin = int(model.keypoints[8])
    assert motion[chin] > 0.5 * motion.max()
    assert motion[model.region_mask("forehead").numpy()].max() < 1e-6
    assert motion[model.keypoints[[36, 45, 30]].numpy()].max() < 1e-6


def test_semantic_expressions_move_the_right_landmarks(model):
    def landmarks(name: str, amount: float) -> np.ndarray:
        coeffs = torch.zeros(1, cv.N_COEFFS, dtype=torch.float64)
        coeffs[0, cv.N_ID + EXPRESSION_NAMES.index(name)] = amount
        return reconstruct(model, coeffs).shape[0, model.keypoints].numpy()

    rest = model.mean_shape[model.keypoints].numpy()
    opened = landmarks("jaw_open", 2.0)
    assert opened[57, 1] < rest[57, 1] - 0.05 and abs(opened[51, 1] - rest[51, 1]) < 0.01
    smile = landmarks("smile", 2.0)
    assert smile[48, 1] > rest[48, 1] + 0.03 and smile[54, 1] > rest[54, 1] + 0.03
    closed = landmarks("eye_close_left", 2.0)  # subject's left eye: x > 0, iBUG 42-47
    assert closed[43, 1] < rest[43, 1] - 0.03 and closed[44, 1] < rest[44, 1] - 0.03
    assert np.abs(closed[36:42] - rest[36:42]).max() < 1e-9
    raised = landmarks("brow_raise", 2.0)
    assert (raised[17:27, 1] > rest[17:27, 1] + 0.02).all()


def test_basis_stds_decrease(model):
    id_norms = model.id_base.norm(dim=0).numpy()
    assert np.all(np.diff(id_norms) < 0)
    tex_norms = model.tex_base.norm(dim=0).numpy()
    assert np.all(np.diff(tex_norms) <= 1e-6 * tex_norms[0]) and tex_norms[0] > 2 * tex_norms[-1]
    # expression components are scaled by their largest vertex motion at 1 sigma
    peaks = np.array([np.linalg.norm(b, axis=1).max() for b in _columns(model.exp_base)])
    assert np.all(np.diff(peaks) <= 1e-6 * peaks[0]) and peaks[0] > 3 * peaks[-1]
    # +-3 sigma of the first identity component stays a face-sized change (mm, RMS)
    rms_mm = np.sqrt((_columns(model.id_base)[0] ** 2).sum(1).mean()) * cv.MM_PER_MODEL_UNIT
    assert 2 < 3 * rms_mm < 25


def test_texture_stays_in_colour_range(model):
    mean = model.mean_tex.numpy()
    tex = model.tex_base.numpy()
    assert mean.min() >= 0 and mean.max() <= 255
    assert (mean[:, None] - 2 * tex).min() >= -1e-3 and (mean[:, None] + 2 * tex).max() <= 255 + 1e-3
    samples = mean[:, None] + tex @ np.random.default_rng(0).standard_normal((cv.N_TEX, 50))
    assert ((samples < 0) | (samples > 255)).mean() < 0.01
    # lips are redder than the cheeks, the hair band darker
    rgb = mean.reshape(-1, 3)
    redness = rgb[:, 0] - rgb[:, 1]
    mouth, cheek = model.region_mask("mouth").numpy(), model.region_mask("cheek").numpy()
    assert redness[mouth].max() > redness[cheek].max() + 10
    assert rgb[model.region_mask("hair_band")].mean() < 0.5 * rgb[cheek].mean()
