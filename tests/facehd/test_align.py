import json
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from helpers import assert_close
from scipy.spatial.transform import Rotation

sys.path.insert(0, str(Path(__file__).parent))  # gt_factory.py lives beside the tests

from gt_factory import MM, make_model, make_scan, make_truth, write_capture  # noqa: E402

from facehd import conventions as cv  # noqa: E402
from facehd.align import (  # noqa: E402
    AlignJob,
    Alignment,
    AlignOptions,
    ModelSource,
    align_capture,
    align_scan,
    coeff_files,
    landmark_similarity,
    model_shape,
    read_align_json,
    read_coeffs,
    write_align_json,
)
from facehd.capture import CaptureRef  # noqa: E402
from facehd.distance import SurfaceIndex  # noqa: E402
from facehd.errors import FaceHDError, FileFormatError, InputError  # noqa: E402
from facehd.masks import model_masks  # noqa: E402
from facehd.procrustes import Similarity, fit_similarity  # noqa: E402

LEFT_RIGHT_SWAP = [3, 2, 1, 0, 4, 6, 5]  # the 7 landmarks' mirror partners (iBUG 36,39,42,45,33,48,54)


@pytest.fixture(scope="module")
def model_and_path(tmp_path_factory):
    path, model = make_model(tmp_path_factory.mktemp("model"), resolution=48)
    return model, path


@pytest.fixture(scope="module")
def model(model_and_path):
    return model_and_path[0]


@pytest.fixture(scope="module")
def rigid_truth(model):
    """A face with no deformation outside the model's span, so its pose is well defined."""
    return make_truth(model, seed=7, deformation_rms_mm=0.0)


@pytest.fixture(scope="module")
def scan(model, rigid_truth):
    return make_scan(model, rigid_truth, np.random.default_rng(3))


def rotation_error_deg(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(Rotation.from_matrix(a @ b.T).magnitude()))


def pose_error_mm(found: Similarity, truth: Similarity, points_mm: np.ndarray) -> float:
    """Mean distance (mm) between where the two transforms put the scan points."""
    return float(np.linalg.norm(found.apply(points_mm) - truth.apply(points_mm), axis=1).mean() / MM)


def model_landmarks(model) -> np.ndarray:
    return model.mean_shape.numpy()[model.landmarks7.numpy()]


# --- the landmark similarity -------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_landmark_similarity_recovers_a_known_similarity(model, seed):
    target = model_landmarks(model)
    truth = Similarity(MM * (0.9 + 0.1 * seed), Rotation.random(random_state=seed).as_matrix(),
                       np.random.default_rng(seed).normal(0, 1, 3))
    scan_landmarks = truth.inverse().apply(target)
    found = landmark_similarity(scan_landmarks, target, AlignOptions(scale="landmarks"))
    assert found.scale == pytest.approx(truth.scale, rel=1e-10)
    assert_close(found.rotation, truth.rotation, atol=1e-10)
    assert_close(found.translation, truth.translation, atol=1e-10)
    # metric: the scale is the units' 1/100 exactly; the best pose at that scale
    metric = landmark_similarity(scan_landmarks, target)
    assert metric.scale == MM
    if seed == 1:  # 1/100 is the true scale here, so the metric fit is exact too
        assert_close(metric.rotation, truth.rotation, atol=1e-10)
        assert_close(metric.translation, truth.translation, atol=1e-10)
    expected = fit_similarity(scan_landmarks * MM, target, scale=False)
    assert_close(metric.rotation, expected.rotation, atol=1e-12)


def test_reflection_trap_mirrored_landmarks_are_refused(model):
    """A mirrored scan (or left/right swapped landmarks) fits perfectly with a reflection; the
    proper rotation that alignment must use fits badly, and we say so instead of aligning."""
    target = model_landmarks(model)
    truth = Similarity(MM, Rotation.random(random_state=4).as_matrix(), [0.1, -0.2, 0.3])
    scan_landmarks = truth.inverse().apply(target)
    mirrored = scan_landmarks * np.array([-1.0, 1.0, 1.0])
    reflection = fit_similarity(mirrored, target, allow_reflection=True)
    assert np.linalg.det(reflection.rotation) < 0  # the trap: a reflection would fit exactly
    assert np.abs(reflection.apply(mirrored) - target).max() < 1e-9
    for bad in (mirrored, scan_landmarks[LEFT_RIGHT_SWAP]):
        with pytest.raises(InputError, match=r"landmarks7\.txt: .*mirrored.*RMS [\d.]+ mm, .* RMS [\d.e-]+ mm$"):
            landmark_similarity(bad, target, source="S001/neutral/landmarks7.txt")


def test_degenerate_wrong_units_and_bad_landmarks_are_refused(model):
    target = model_landmarks(model)
    scan_landmarks = Similarity(MM, np.eye(3), np.zeros(3)).inverse().apply(target)
    collinear = np.outer(np.linspace(0, 60, 7), [1.0, 0.5, 0.2])
    with pytest.raises(InputError, match="degenerate source landmarks"):
        landmark_similarity(collinear, target, source="lm.txt")
    for mm_per_unit, unit in ((1000.0, "metres"), (100.0, "model units"), (10.0, "centimetres")):
        with pytest.raises(InputError, match=rf"lm.txt: .*is the scan in {unit}\b"):
            landmark_similarity(scan_landmarks / mm_per_unit, target, source="lm.txt")
    scrambled = scan_landmarks + np.random.default_rng(0).normal(0, 25.0, (7, 3))
    with pytest.raises(InputError, match=r"RMS residual [\d.]+ mm exceeds the limit 12 mm"):
        landmark_similarity(scrambled, target, source="lm.txt")


# --- ICP and the coarse shape ------------------------------------------------------------------


def test_icp_recovers_a_known_pose(model, rigid_truth, scan):
    """With the true coefficients, the scan's pose comes back to a small fraction of a mm; the
    landmarks alone (0.5 mm annotation noise) are several times worse."""
    points = scan.mesh.vertices
    alignment = align_scan(points, scan.landmarks7_mm, model, coeffs=rigid_truth.coeffs, coeffs_source="truth")
    rough = landmark_similarity(scan.landmarks7_mm, model_shape(model, rigid_truth.coeffs)[model.landmarks7.numpy()])
    icp_error = pose_error_mm(alignment.scan_to_model, scan.scan_to_model, points)
    assert icp_error < 0.1
    assert pose_error_mm(rough, scan.scan_to_model, points) > 3 * icp_error
    assert rotation_error_deg(alignment.scan_to_model.rotation, scan.scan_to_model.rotation) < 0.05
    assert alignment.scan_to_model.scale == MM
    assert alignment.icp_fitness > 0.8  # to model vertices ~5 mm apart; the scan is on the surface
    assert alignment.landmark_residuals_mm.shape == (7,) and alignment.landmark_rms_mm < 1.5
    assert alignment.coeffs_source == "truth"
    labels = alignment.scan_labels
    assert labels["kept"] > 0.6 * len(points) and labels["hair_band"] > 0 and labels["far"] > 0  # spikes


def test_fitted_coefficients_explain_the_scan(model, rigid_truth, scan):
    """Without coefficients, id and exp are fitted: the coarse shape then lies within a few tenths
    of a mm of the face, and the pose is close (identity and pose trade off a little)."""
    points = scan.mesh.vertices
    alignment = align_scan(points, scan.landmarks7_mm, model)
    assert alignment.coeffs_source == "fit"
    assert np.abs(alignment.coeffs[cv.COEFF_SLICES["id"]]).max() > 0.1
    shape = model_shape(model, alignment.coeffs)
    faces = model.faces.numpy()
    face = model_masks(model, shape).face
    hit = SurfaceIndex(shape, faces).closest(alignment.scan_to_model.apply(points))
    on_face = face[faces[hit.face_index]].all(axis=1)
    fitted_rms = np.sqrt(np.mean(hit.distances[on_face] ** 2)) / MM
    mean_hit = SurfaceIndex(model.mean_shape.numpy(), faces).closest(alignment.scan_to_model.apply(points))
    mean_rms = np.sqrt(np.mean(mean_hit.distances[on_face] ** 2)) / MM
    assert fitted_rms < 0.4 and fitted_rms < mean_rms / 5
    assert pose_error_mm(alignment.scan_to_model, scan.scan_to_model, points) < 2.0


# --- files -------------------------------------------------------------------------------------


def test_read_coeffs_npz_and_deep3d_mat(tmp_path):
    coeffs = np.arange(cv.N_COEFFS, dtype=np.float64) / 100.0
    np.savez(tmp_path / "a.npz", coeffs=coeffs[None])
    assert_close(read_coeffs(tmp_path / "a.npz"), coeffs, atol=0)
    parts = {k: coeffs[cv.COEFF_SLICES[k]][None] for k in ("id", "exp", "tex", "angle", "gamma", "trans")}
    scipy.io.savemat(tmp_path / "b.mat", {**parts, "lm68": np.zeros((1, 68, 2))})
    assert_close(read_coeffs(tmp_path / "b.mat"), coeffs, atol=0)
    np.savez(tmp_path / "short.npz", coeffs=coeffs[:200])
    np.savez(tmp_path / "nan.npz", coeffs=np.full(cv.N_COEFFS, np.nan))
    scipy.io.savemat(tmp_path / "keys.mat", {"id": parts["id"]})
    for name, match in (("short.npz", "200 coefficients"), ("nan.npz", "NaN"), ("keys.mat", "no coefficients"),
                        ("missing.npz", "not found")):
        with pytest.raises(FileFormatError, match=rf"{name}: .*{match}"):
            read_coeffs(tmp_path / name)


def test_coefficient_files_per_view_or_per_capture(tmp_path):
    views = ["cam0", "cam1"]
    folder = tmp_path / "S001" / "smile"
    folder.mkdir(parents=True)
    with pytest.raises(FileFormatError, match="no coefficient file"):
        coeff_files(tmp_path, "S001", "smile", views)
    np.savez(folder / "truth.npz", coeffs=np.zeros(cv.N_COEFFS))  # one file for the capture
    assert coeff_files(tmp_path, "S001", "smile", views) == {v: folder / "truth.npz" for v in views}
    np.savez(folder / "cam1.npz", coeffs=np.ones(cv.N_COEFFS))  # per-image files win where present
    assert coeff_files(tmp_path, "S001", "smile", views) == {"cam0": folder / "truth.npz", "cam1": folder / "cam1.npz"}
    np.savez(folder / "other.npz", coeffs=np.zeros(cv.N_COEFFS))
    with pytest.raises(FileFormatError, match="several capture-level"):
        coeff_files(tmp_path, "S001", "smile", views)


def test_align_json_round_trip(tmp_path, model, rigid_truth, scan):
    alignment = Alignment(Similarity(MM, Rotation.random(random_state=1).as_matrix(), [1.0, 2.0, 3.0]),
                          rigid_truth.coeffs, "fit", np.arange(7.0), 0.9, 0.3, 2.5, {"kept": 10})
    write_align_json(tmp_path / "align.json", alignment, {"inputs": {"digest": "abc"}})
    back, record = read_align_json(tmp_path / "align.json")
    assert record["inputs"]["digest"] == "abc" and record["format"] == "facehd align"
    assert_close(back.scan_to_model.as_matrix(), alignment.scan_to_model.as_matrix(), atol=0)
    assert_close(back.coeffs, alignment.coeffs, atol=0)
    assert back.landmark_rms_mm == pytest.approx(alignment.landmark_rms_mm)
    assert json.loads((tmp_path / "align.json").read_text())["icp"]["inlier_rmse_mm"] == 0.3
    (tmp_path / "bad.json").write_text("{\"scan_to_model\": 1}")
    with pytest.raises(FileFormatError, match="bad.json: not an align.json"):
        read_align_json(tmp_path / "bad.json")


# --- bad captures ------------------------------------------------------------------------------


@pytest.fixture
def capture(tmp_path, model_and_path, rigid_truth):
    model, path = model_and_path
    write_capture(tmp_path / "data", "S001", "neutral", model, path, seed=7, truth=rigid_truth)
    ref = CaptureRef(tmp_path / "data", "S001", "neutral")
    return ref, AlignJob(out=tmp_path / "out", model=ModelSource(path), coeffs_dir=tmp_path / "data" / "_truth")


def test_align_capture_writes_align_json(capture):
    ref, job = capture
    alignment, computed = align_capture(ref, job)
    assert computed
    record = json.loads((job.out / "S001" / "neutral" / "align.json").read_text())
    assert record["coefficients"]["source"].endswith("truth.npz")
    assert record["icp"]["fitness"] == alignment.icp_fitness and len(record["landmarks"]["residuals_mm"]) == 7
    assert align_capture(ref, job)[1] is False  # up to date: read back, not recomputed


def write_scan(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    """An ASCII PLY written by hand, so it can hold NaN."""
    head = ["ply", "format ascii 1.0", f"element vertex {len(vertices)}", "property float x",
            "property float y", "property float z", f"element face {len(faces)}",
            "property list uchar int vertex_indices", "end_header"]
    rows = [" ".join("nan" if not np.isfinite(v) else f"{v:.5f}" for v in p) for p in vertices]
    path.write_text("\n".join(head + rows + [f"3 {a} {b} {c}" for a, b, c in faces]) + "\n")


def test_bad_inputs_give_errors_naming_the_file(capture):
    from facehd.io import load_mesh

    ref, job = capture
    scan = load_mesh(ref.paths.scan)
    vertices, faces = scan.vertices.copy(), scan.faces[:2000]
    vertices[5] = np.nan
    write_scan(ref.paths.scan, vertices[:3000], faces[faces.max(axis=1) < 3000])
    with pytest.raises(FaceHDError, match=r"scan\.ply: .*(NaN|non-finite)"):
        align_capture(ref, job)
    # a scan with no face where its landmarks say: the surface is 300 mm away from them
    write_scan(ref.paths.scan, scan.vertices + 300.0, scan.faces)
    with pytest.raises(InputError, match=r"scan\.ply: no face region"):
        align_capture(ref, job)
    landmarks = np.loadtxt(ref.paths.landmarks7)
    np.savetxt(ref.paths.landmarks7, landmarks * np.array([-1.0, 1.0, 1.0]))
    with pytest.raises(InputError, match=r"landmarks7\.txt: .*mirrored"):
        align_capture(ref, job)
    ref.paths.landmarks7.unlink()
    with pytest.raises(FileFormatError, match=r"landmarks7\.txt: missing"):
        align_capture(ref, job)
