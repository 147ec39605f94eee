import filecmp
import json
import math

import numpy as np
import pytest
import scipy.io
from click.testing import CliRunner
from factories import tiny_fields
from helpers import assert_close
from PIL import Image

from facehd import conventions as cv
from facehd.capture import (
    CAMERA_NAMES,
    Camera,
    find_captures,
    load_capture,
    read_landmarks7,
    read_landmarks68,
    read_subjects,
)
from facehd.cli import main
from facehd.dataset import FaceHD100
from facehd.distance import closest_points_on_mesh
from facehd.errors import InputError
from facehd.io import load_mesh
from facehd.morphable import load_morphable_model
from facehd.procrustes import Similarity
from facehd.synth.bfm import EXPRESSION_NAMES, write_synth_bfm
from facehd.synth.facehd import (
    TRUTH_DIR,
    SynthConfig,
    expression_names,
    generate_facehd,
    prepare_output,
    read_truth,
    sample_subjects,
    truth_path,
)
from facehd.synth.render_views import (
    BACKGROUND_RGB,
    RenderMesh,
    ViewRenderer,
    opengl_pose,
    rig_cameras,
)
from facehd.synth.scan import SAMPLE_JITTER, SCAN_NOISE_MM, _cell_samples, interpolate_grid
from facehd.synth.truth import build_model_context, load_truth_model, synth_model_parameters, true_surface
from facehd.uv import uv_grid_mesh
from facehd.validate import validate_dataset

# Small and fast: a 32-row SynthBFM (the truth grid and the scan are 256 x 256 whatever the model).
MODEL_RESOLUTION = 32
IMAGE_SIZE = 96
SEED = 7
MM = cv.MM_PER_MODEL_UNIT


def small_config(out, **changes) -> SynthConfig:
    settings = dict(out=out, n_subjects=2, n_expressions=2, seed=SEED, image_size=IMAGE_SIZE,
                    model_resolution=MODEL_RESOLUTION)
    settings.update(changes)
    return SynthConfig(**settings)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "facehd"
    generate_facehd(small_config(out))
    return out


@pytest.fixture(scope="module")
def captures(dataset):
    """(capture, truth dict, scan mesh, scan_to_model) of every capture."""
    out = []
    for ref in find_captures(dataset):
        truth = read_truth(truth_path(dataset, ref.subject, ref.expression))
        scan_to_model = Similarity.from_matrix(truth["scan_to_model"])
        out.append((load_capture(ref), truth, load_mesh(ref.paths.scan), scan_to_model))
    return out


# --- the dataset as a whole ------------------------------------------------------------------


def test_output_passes_validation_with_no_problem(dataset):
    report = validate_dataset(dataset)
    assert report.problems == [], report.lines()
    assert report.captures_checked == report.captures_passed == 4


def test_output_loads_with_the_dataset_class(dataset):
    data = FaceHD100(dataset, load_scan=True)
    assert len(data) == 4
    item = data[0]
    assert item["images"].shape == (9, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert item["subject"] == "S001" and item["expression"] == "neutral"
    assert item["scan_vertices"].shape[0] > 50_000  # denser than any BFM-sized model (35,709)
    assert item["landmarks68"][0, :, 2].sum() > 60  # the frontal view sees nearly all 68 landmarks


def test_layout_keeps_the_truth_outside_the_captures(dataset):
    assert sorted(p.name for p in dataset.iterdir()) == ["S001", "S002", TRUTH_DIR, "subjects.csv"]
    capture = dataset / "S001" / "smile"
    assert sorted(p.name for p in capture.iterdir()) == ["cameras.json", "images", "landmarks68", "landmarks7.txt",
                                                       "scan.ply"]
    assert sorted(p.name for p in (capture / "images").iterdir()) == [f"{n}.jpg" for n in CAMERA_NAMES]
    assert load_mesh(capture / "scan.ply").metadata["units"] == "mm"
    assert (dataset / TRUTH_DIR / "README.md").is_file()
    generator = json.loads((dataset / TRUTH_DIR / "generator.json").read_text())
    assert generator["seed"] == SEED and generator["model"]["resolution"] == MODEL_RESOLUTION
    assert not [p for p in dataset.rglob("*") if ".part" in p.name]  # no atomic-write leftovers


def test_subjects_and_expressions_on_disk(dataset):
    subjects = read_subjects(dataset / "subjects.csv")
    assert list(subjects["subject_id"]) == ["S001", "S002"]
    assert sorted(p.name for p in (dataset / "S002").iterdir()) == ["neutral", "smile"]


# --- subjects and expressions -------------------------------------------------------------------


def test_demographics_match_the_supplement_in_expectation():
    subjects = sample_subjects(20_000, np.random.default_rng(0))
    ethnicity = np.array([s.ethnicity for s in subjects])
    assert abs((ethnicity == "asian").mean() - 0.95) < 0.01
    assert abs((ethnicity == "white").mean() - 0.03) < 0.005
    assert abs((ethnicity == "black").mean() - 0.02) < 0.005
    assert abs(np.mean([s.gender == "female" for s in subjects]) - 0.5) < 0.02
    ages = np.array([s.age for s in subjects])
    assert ages.min() >= 17 and ages.max() <= 60 and (ages > 40).any()  # a small tail of older people
    assert 24 <= np.median(ages) <= 26 and ((ages >= 17) & (ages <= 35)).mean() > 0.9
    assert subjects[0].subject_id == "S00001" and len({s.subject_id for s in subjects}) == len(subjects)


def test_expression_names_start_neutral_and_come_from_the_model():
    names = expression_names(25)
    assert names[0] == "neutral" and len(set(names)) == 25
    assert set(names[1:]) == set(EXPRESSION_NAMES)
    assert all(n == n.lower() and n.isidentifier() for n in names)
    assert expression_names(3) == ["neutral", "smile", "jaw_open"]
    with pytest.raises(InputError):
        expression_names(26)


# --- the truth ---------------------------------------------------------------------------------


def test_truth_keys_and_shapes(captures):
    _, truth, _, _ = captures[0]
    assert truth["coeffs"].shape == (257,) and truth["coeffs"].dtype == np.float64
    assert not truth["coeffs"][224:].any()  # angle, gamma and trans zero
    assert truth["deformation_map"].shape == (3, 64, 64)
    assert truth["displacement_map"].shape == (1, 256, 256)
    assert truth["valid_mask_256"].shape == (256, 256) and truth["valid_mask_256"].dtype == bool
    assert truth["surface_vertices"].shape == (256 * 256, 3)
    assert truth["surface_faces"].shape[1] == 3 and truth["surface_faces"].max() < 256 * 256
    assert truth["scan_to_model"].shape == (4, 4)
    assert int(truth["model_resolution"]) == MODEL_RESOLUTION and int(truth["model_seed"]) == 0
    # amplitudes: mid frequency 1-2 mm at its peak, detail within about half a millimetre
    assert 0.95 <= np.linalg.norm(truth["deformation_map"], axis=0).max() * MM <= 2.05
    assert 0.05 < np.abs(truth["displacement_map"]).max() * MM < 0.7


def test_truth_rebuilds_from_its_own_definition(captures):
    """A consumer holding only truth.npz rebuilds the same surface with the documented recipe."""
    _, truth, _, _ = captures[1]
    model = load_truth_model(int(truth["model_resolution"]), int(truth["model_seed"]))
    surface = true_surface(model, truth["coeffs"], truth["deformation_map"], truth["displacement_map"])
    assert_close(surface.vertices, truth["surface_vertices"], atol=1e-12, rtol=0)
    assert np.array_equal(surface.faces, truth["surface_faces"])
    assert np.array_equal(surface.valid, truth["valid_mask_256"])
    _, faces = uv_grid_mesh(256, 256, mask=surface.valid)
    assert np.array_equal(faces.numpy(), truth["surface_faces"])


def test_expressions_share_the_subject_but_not_the_expression(captures):
    by_key = {(c.subject, c.expression): t for c, t, _, _ in captures}
    neutral, smile = by_key["S001", "neutral"], by_key["S001", "smile"]
    assert np.array_equal(neutral["coeffs"][:80], smile["coeffs"][:80])  # identity
    assert np.array_equal(neutral["deformation_map"], smile["deformation_map"])  # per subject
    smile_index = 80 + EXPRESSION_NAMES.index("smile")
    assert smile["coeffs"][smile_index] > 1.0 > abs(neutral["coeffs"][smile_index])
    other = by_key["S002", "neutral"]
    assert not np.array_equal(neutral["coeffs"][:80], other["coeffs"][:80])


# --- the scan ----------------------------------------------------------------------------------


def test_scan_is_in_millimetres_in_a_random_pose(captures):
    for _, _, scan, to_model in captures:
        assert to_model.scale == pytest.approx(1.0 / MM)
        model_mm = to_model.apply(scan.vertices) * MM
        extent = model_mm.max(axis=0) - model_mm.min(axis=0)
        assert 150.0 < extent.max() < 260.0 and 100.0 < extent[0] < 200.0  # face height, width in mm
        angle = math.degrees(math.acos(np.clip((np.trace(to_model.rotation) - 1.0) / 2.0, -1.0, 1.0)))
        assert angle < 35.0  # scanner frame up to 25 deg, head jitter a few deg
    angles = {round(float(np.trace(c[3].rotation)), 6) for c in captures}
    assert len(angles) == len(captures)  # every capture has its own pose


def test_scan_maps_onto_the_true_surface(captures):
    _, truth, scan, to_model = captures[0]
    distances = closest_points_on_mesh(to_model.apply(scan.vertices), truth["surface_vertices"],
                                       truth["surface_faces"]).distances * MM
    # |N(0, sigma)| has median 0.674 sigma; spikes are a few per cent of the hair band only
    assert np.median(distances) == pytest.approx(0.674 * SCAN_NOISE_MM, rel=0.15)
    assert np.mean(distances > 1.0) < 0.01


def test_scan_has_holes_at_the_eyes_and_nostrils(captures):
    _, truth, scan, to_model = captures[0]
    scan_model = to_model.apply(scan.vertices)
    surface = truth["surface_vertices"][truth["valid_mask_256"].reshape(-1)]
    keypoints = truth["landmarks68_model"]
    # (landmarks around the hole, the scan's clearance in mm): eye openings, nostrils
    for group, clearance in (([36, 37, 38, 39, 40, 41], 4.0), ([42, 43, 44, 45, 46, 47], 4.0),
                             ([31, 32, 33], 2.0), ([33, 34, 35], 2.0)):
        to_centre = np.linalg.norm(surface - keypoints[group].mean(axis=0), axis=1)
        assert to_centre.min() * MM < 1.5  # the true surface passes by the landmarks' centre ...
        centre = surface[np.argmin(to_centre)]
        assert np.linalg.norm(scan_model - centre, axis=1).min() * MM > clearance, group  # ... the scan does not


def test_scan_has_spikes_in_the_hair_band_only(captures):
    _, truth, scan, to_model = captures[0]
    scan_model = to_model.apply(scan.vertices)
    distances = closest_points_on_mesh(scan_model, truth["surface_vertices"], truth["surface_faces"]).distances * MM
    spikes = distances > 2.0
    assert 50 < spikes.sum() < 0.02 * len(scan.vertices)
    brows_top = truth["landmarks68_model"][17:27, 1].max()
    assert (scan_model[spikes, 1] > brows_top + 0.2).all()  # well above the brows: the hair band


def test_landmarks7_lie_near_the_true_keypoints(captures):
    for capture, truth, _, to_model in captures:
        landmarks = to_model.apply(read_landmarks7(capture.paths.landmarks7))
        error = np.linalg.norm(landmarks - truth["landmarks68_model"][list(cv.LANDMARKS7_IBUG)], axis=1) * MM
        assert error.max() < 2.5 and error.mean() < 1.5  # 0.5 mm annotation noise per axis


# --- the cameras and views -----------------------------------------------------------------------


def test_rig_surrounds_the_face_as_in_the_supplement(captures):
    _, truth, _, to_model = captures[0]
    capture = captures[0][0]
    face_centre = truth["landmarks68_model"].mean(axis=0)
    directions = {}
    for name, camera in capture.cameras.items():
        offset = (to_model.apply(camera.center_mm[None])[0] - face_centre) * MM
        assert 600.0 < np.linalg.norm(offset) < 800.0
        directions[name] = offset / np.linalg.norm(offset)
    yaw = {n: math.degrees(math.atan2(d[0], d[2])) for n, d in directions.items()}
    pitch = {n: math.degrees(math.asin(d[1])) for n, d in directions.items()}
    assert abs(yaw["cam0"]) < 10 and abs(pitch["cam0"]) < 10
    assert sorted(round(yaw[n] / 30) for n in ("cam1", "cam2", "cam3", "cam4")) == [-2, -1, 1, 2]
    assert pitch["cam5"] > 15 and pitch["cam6"] < -15
    assert all(abs(yaw[n]) > 25 and pitch[n] > 10 for n in ("cam7", "cam8"))


def test_nose_tip_projects_onto_the_rendered_face_in_every_view(captures):
    background = np.array(BACKGROUND_RGB, dtype=float)
    for capture, truth, _, to_model in captures:
        nose_mm = to_model.inverse().apply(truth["landmarks68_model"][[cv.NOSE_TIP_IBUG]])
        for name, camera in capture.cameras.items():
            image = np.asarray(Image.open(capture.paths.images[CAMERA_NAMES.index(name)]).convert("RGB"), dtype=float)
            pixels, depth = camera.project(nose_mm)
            assert depth[0] > 0 and camera.inside_image(pixels)[0]
            col, row = np.rint(pixels[0]).astype(int)
            window = image[row - 1:row + 2, col - 1:col + 2]  # the tip is on the silhouette in profile views
            assert (np.abs(window - background).sum(axis=-1) > 60).any(), (capture.subject, capture.expression, name)
            face_fraction = (np.abs(image - background).sum(axis=-1) > 60).mean()
            assert 0.1 < face_fraction < 0.6, name  # the face fills a good part of the frame


def test_landmarks68_are_the_projected_truth_with_visibility(captures):
    capture, truth, _, to_model = captures[1]
    keypoints_mm = to_model.inverse().apply(truth["landmarks68_model"])
    hidden = {}
    for view, name in enumerate(CAMERA_NAMES):
        landmarks = read_landmarks68(capture.paths.landmarks68[view])
        pixels, _ = capture.cameras[name].project(keypoints_mm)
        assert_close(landmarks[:, :2], pixels, atol=2e-3, rtol=0)  # files keep 3 decimals
        hidden[name] = int((landmarks[:, 2] == 0).sum())
    assert hidden["cam0"] <= 4
    assert hidden["cam3"] >= 5 and hidden["cam4"] >= 5  # the far side of the face at 60 deg yaw
    assert hidden["cam3"] > hidden["cam1"] and hidden["cam4"] > hidden["cam2"]


def test_opengl_pose_flips_the_opencv_camera_axes():
    camera = rig_cameras(np.zeros(3), 64, np.random.default_rng(0))[2]
    point = camera.center_mm + 500.0 * camera.R[2]  # 500 mm along the optical axis
    in_gl = np.linalg.inv(opengl_pose(camera)) @ np.append(point, 1.0)
    assert_close(in_gl[:3], [0.0, 0.0, -500.0], atol=1e-9)
    down = np.linalg.inv(opengl_pose(camera)) @ np.append(point + 10.0 * camera.R[1], 1.0)  # image down
    assert down[1] < -9.99  # is OpenGL's -y


def test_renderer_matches_the_opencv_projection_to_a_fraction_of_a_pixel():
    """A square drawn by pyrender is centred where Camera.project puts its centre (a half-pixel
    principal-point or axis-flip mistake would show here)."""
    size = 64
    camera = Camera(K=[[80.0, 0, 30.3], [0, 80.0, 34.6], [0, 0, 1]], R=np.eye(3), t=np.zeros(3), width=size,
                    height=size)
    centre = np.array([7.0, -4.0, 600.0])
    half = 45.0  # ~12 px across
    corners = centre + np.array([[-half, -half, 0], [half, -half, 0], [half, half, 0], [-half, half, 0]])
    faces = np.array([[0, 2, 1], [0, 3, 2]])  # counter-clockwise seen from the camera (y down in OpenCV)
    mesh = RenderMesh(corners, faces, np.ones((4, 3)))
    with ViewRenderer(size) as renderer:
        (view,) = renderer.render(mesh, [camera])
    coverage = (np.abs(view.rgb.astype(float) - BACKGROUND_RGB).sum(axis=-1)
                / np.abs(255.0 - np.array(BACKGROUND_RGB)).sum())
    rows, cols = np.mgrid[0:size, 0:size]
    found = np.array([(coverage * cols).sum(), (coverage * rows).sum()]) / coverage.sum()
    expected, _ = camera.project(centre[None])
    assert np.abs(found - expected[0]).max() < 0.15
    assert view.depth[int(round(expected[0, 1])), int(round(expected[0, 0]))] == pytest.approx(600.0, abs=0.01)


# --- determinism, CLI, errors ------------------------------------------------------------------


def test_same_seed_gives_identical_files(tmp_path):
    for name in ("a", "b"):
        generate_facehd(small_config(tmp_path / name, n_subjects=1, n_expressions=1))
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 1 + (9 + 1 + 1 + 1 + 9) + 1 + 2  # csv, a capture, its truth, README and json
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", [str(f) for f in files], shallow=False)
    assert mismatch == [] and errors == []


def test_cli_generates_and_refuses_a_non_empty_folder(tmp_path):
    out = tmp_path / "cli"
    args = ["synth", "facehd", "--out", str(out), "--subjects", "1", "--expressions", "1", "--seed", "3",
            "--image-size", "64", "--model-resolution", "24"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "1 captures" in result.output and "9 images" in result.output
    before = (out / "S001" / "neutral" / "scan.ply").read_bytes()
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "--overwrite" in refused.output and "Traceback" not in refused.output
    again = CliRunner().invoke(main, [*args, "--overwrite"])
    assert again.exit_code == 0, again.output
    assert (out / "S001" / "neutral" / "scan.ply").read_bytes() == before
    assert validate_dataset(out).problems == []


def test_overwrite_never_deletes_files_the_generator_did_not_write(tmp_path):
    (tmp_path / "S001").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        prepare_output(tmp_path, overwrite=False)
    with pytest.raises(InputError, match="notes.txt"):
        prepare_output(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "S001").is_dir()


def test_a_given_model_file_reports_its_synthbfm_parameters(tmp_path):
    path = write_synth_bfm(tmp_path / "model.mat", resolution=20, seed=3)
    assert synth_model_parameters(path) == (20, 3)
    scipy.io.savemat(tmp_path / "other.mat", tiny_fields())
    assert synth_model_parameters(tmp_path / "other.mat") == (-1, -1)


def test_a_model_without_uvs_is_refused_by_name(tmp_path):
    scipy.io.savemat(tmp_path / "bfm_like.mat", tiny_fields())
    with pytest.raises(InputError, match="bfm_like.mat.*UVs"):
        build_model_context(load_morphable_model(tmp_path / "bfm_like.mat"))


def test_interpolate_grid_is_exact_on_the_grid_triangles():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(5, 6, 2))
    # at texel centres the grid values; inside a cell, the plane through the triangle's corners
    assert_close(interpolate_grid(values, np.array([2.0, 4.0]), np.array([3.0, 5.0])), values[[2, 4], [3, 5]])
    t, s = 0.7, 0.2  # below the diagonal: triangle top-left, bottom-left, bottom-right
    expected = (1 - t) * values[1, 1] + (t - s) * values[2, 1] + s * values[2, 2]
    assert_close(interpolate_grid(values, np.array([1.0 + t]), np.array([1.0 + s]))[0], expected)


def test_scan_samples_fill_every_sub_cell_once():
    valid = np.ones((5, 6), dtype=bool)
    valid[4, 0] = False  # the bottom-left cell loses a corner
    per_cell = 2
    rows, cols, keep, faces = _cell_samples(valid, np.random.default_rng(0), per_cell)
    assert len(rows) == per_cell**2 * 4 * 5
    # one sample strictly inside each sub-cell, so none lies on an edge of the truth's grid
    sub_r, sub_c = np.floor(rows * per_cell), np.floor(cols * per_cell)
    assert len(set(zip(sub_r.tolist(), sub_c.tolist()))) == len(rows)
    frac = np.concatenate([rows * per_cell - sub_r, cols * per_cell - sub_c])
    assert frac.min() >= SAMPLE_JITTER[0] and frac.max() <= SAMPLE_JITTER[1]
    # samples of the cell with an invalid corner are dropped, all others kept
    in_bad_cell = (np.floor(rows) == 3) & (np.floor(cols) == 0)
    assert in_bad_cell.sum() == per_cell**2 and not keep[in_bad_cell].any() and keep[~in_bad_cell].all()
    # triangles join neighbouring samples: no edge spans more than one sub-cell per axis
    for a, b in ((0, 1), (1, 2), (0, 2)):
        assert np.abs(sub_r[faces[:, a]] - sub_r[faces[:, b]]).max() == 1
        assert np.abs(sub_c[faces[:, a]] - sub_c[faces[:, b]]).max() == 1
    assert len(faces) == 2 * (4 * per_cell - 1) * (5 * per_cell - 1)
