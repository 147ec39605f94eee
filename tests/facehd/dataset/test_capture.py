import json

import numpy as np
import pandas as pd
import pytest
from capture_factory import look_at_camera, make_capture, rig_cameras
from helpers import assert_close

from facehd.capture import (
    CAMERA_NAMES,
    CAMERAS_CONVENTION,
    N_VIEWS,
    Camera,
    CaptureRef,
    capture_paths,
    find_captures,
    read_cameras,
    read_landmarks7,
    read_landmarks68,
    read_subjects,
    scale_intrinsics,
    subjects_problems,
    write_cameras,
    write_landmarks7,
    write_landmarks68,
    write_subjects,
)
from facehd.errors import FileFormatError, InputError


def naive_project(camera: Camera, point: np.ndarray) -> np.ndarray:
    """One point through OpenCV's projectPoints formulas, written out term by term."""
    X, Y, Z = camera.R @ point + camera.t
    x, y = X / Z, Y / Z
    k1, k2, p1, p2, k3 = camera.distortion
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2**2 + k3 * r2**3
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    K = camera.K
    return np.array([K[0, 0] * xd + K[0, 1] * yd + K[0, 2], K[1, 1] * yd + K[1, 2]])


def test_layout_constants():
    assert N_VIEWS == 9 and CAMERA_NAMES == tuple(f"cam{i}" for i in range(9))


def test_project_matches_the_opencv_formulas_with_and_without_distortion():
    rng = np.random.default_rng(0)
    camera = look_at_camera(20.0, 10.0)
    camera.K[0, 1] = 0.3  # skew, to exercise the full K
    camera.distortion = np.array([-0.2, 0.05, 0.001, -0.002, 0.01])
    points = rng.uniform(-80, 80, size=(20, 3))
    pixels, depth = camera.project(points)
    assert_close(pixels, np.stack([naive_project(camera, p) for p in points]), atol=1e-9)
    assert_close(depth, (points @ camera.R.T + camera.t)[:, 2])
    ideal, _ = camera.project(points, distort=False)
    camera.distortion = np.zeros(5)
    assert_close(ideal, np.stack([naive_project(camera, p) for p in points]), atol=1e-9)


def test_camera_looks_at_the_origin_and_points_behind_give_nan_pixels():
    camera = look_at_camera(0.0, 0.0)
    pixels, depth = camera.project(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1000.0], [0.0, 50.0, 0.0]]))
    assert_close(pixels[0], camera.K[:2, 2])  # the origin lands on the principal point
    assert depth[0] == pytest.approx(600.0) and depth[1] < 0
    assert np.isnan(pixels[1]).all()
    assert pixels[2, 1] < pixels[0, 1]  # world up is image up (smaller row)
    assert_close(camera.center_mm, [0.0, 0.0, 600.0], atol=1e-9)


def test_resized_camera_maps_pixel_centres_consistently():
    camera = look_at_camera(-35.0, 15.0)
    points = np.random.default_rng(1).uniform(-60, 60, size=(10, 3))
    small = camera.resized(32, 24)
    pixels, _ = camera.project(points)
    pixels_small, _ = small.project(points)
    # pixel centres at integers: edges at -0.5, so u' = (u + 0.5) * s - 0.5
    assert_close(pixels_small, (pixels + 0.5) * 0.5 - 0.5, atol=1e-9)
    assert_close(scale_intrinsics(np.eye(3), 2.0, 2.0), [[2, 0, 0.5], [0, 2, 0.5], [0, 0, 1]])


def test_cameras_round_trip(tmp_path):
    cameras = rig_cameras()
    cameras["cam3"].distortion = np.array([0.1, 0.0, 0.0, 0.0, 0.0])
    write_cameras(tmp_path / "cameras.json", cameras)
    doc = json.loads((tmp_path / "cameras.json").read_text())
    assert doc["units"] == "mm" and doc["convention"] == CAMERAS_CONVENTION
    back = read_cameras(tmp_path / "cameras.json")
    assert list(back) == list(CAMERA_NAMES)
    for name, cam in cameras.items():
        for attr in ("K", "R", "t", "distortion"):
            assert_close(getattr(back[name], attr), getattr(cam, attr))
        assert (back[name].width, back[name].height) == (cam.width, cam.height)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def _broken_cameras(tmp_path, change) -> str:
    write_cameras(tmp_path / "cameras.json", rig_cameras())
    doc = json.loads((tmp_path / "cameras.json").read_text())
    change(doc)
    (tmp_path / "cameras.json").write_text(json.dumps(doc))
    with pytest.raises(FileFormatError) as info:
        read_cameras(tmp_path / "cameras.json")
    assert "cameras.json" in str(info.value)
    return str(info.value)


def test_read_cameras_names_each_problem(tmp_path):
    assert "missing key 'R'" in _broken_cameras(tmp_path, lambda d: d["cameras"]["cam1"].pop("R"))
    assert "shape (2, 3), expected (3, 3)" in _broken_cameras(tmp_path, lambda d: d["cameras"]["cam2"].update(
        K=[[1, 0, 0], [0, 1, 0]]))
    assert "not numeric" in _broken_cameras(tmp_path, lambda d: d["cameras"]["cam0"].update(t=["a", 0, 0]))
    assert "units are 'm'" in _broken_cameras(tmp_path, lambda d: d.update(units="m"))
    assert "missing key 'cameras'" in _broken_cameras(tmp_path, lambda d: d.pop("cameras"))
    assert "width must be a positive integer" in _broken_cameras(tmp_path, lambda d: d["cameras"]["cam0"].update(
        width=64.5))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FileFormatError, match="bad.json: invalid JSON"):
        read_cameras(tmp_path / "bad.json")


def test_landmarks7_round_trip_and_errors(tmp_path):
    points = np.random.default_rng(2).normal(size=(7, 3)) * 50
    write_landmarks7(tmp_path / "landmarks7.txt", points)
    assert_close(read_landmarks7(tmp_path / "landmarks7.txt"), points, atol=1e-6)
    (tmp_path / "six.txt").write_text("1 2 3\n" * 6)
    with pytest.raises(FileFormatError, match="six.txt: 6 landmarks, expected 7"):
        read_landmarks7(tmp_path / "six.txt")
    (tmp_path / "word.txt").write_text("1 2 3\n" * 3 + "1 x 3\n" + "1 2 3\n" * 3)
    with pytest.raises(FileFormatError, match="word.txt: line 4: non-numeric value 'x'"):
        read_landmarks7(tmp_path / "word.txt")
    (tmp_path / "two.txt").write_text("1 2\n" * 7)
    with pytest.raises(FileFormatError, match="line 1: 2 values, expected 3"):
        read_landmarks7(tmp_path / "two.txt")
    with pytest.raises(InputError):
        write_landmarks7(tmp_path / "x.txt", points[:6])


def test_landmarks68_round_trip_visibility_and_errors(tmp_path):
    points = np.random.default_rng(3).uniform(0, 60, size=(68, 3))
    points[:, 2] = np.arange(68) % 2
    write_landmarks68(tmp_path / "cam0.txt", points)
    assert_close(read_landmarks68(tmp_path / "cam0.txt"), points, atol=1e-3)
    (tmp_path / "xy.txt").write_text("1.5 2.5\n" * 68)  # no visibility column: all visible
    assert_close(read_landmarks68(tmp_path / "xy.txt"), np.tile([1.5, 2.5, 1.0], (68, 1)))
    (tmp_path / "short.txt").write_text("1 2 1\n" * 67)
    with pytest.raises(FileFormatError, match="67 landmarks, expected 68"):
        read_landmarks68(tmp_path / "short.txt")
    (tmp_path / "flag.txt").write_text("1 2 1\n" * 10 + "1 2 0.5\n" + "1 2 1\n" * 57)
    with pytest.raises(FileFormatError, match="line 11: visible must be 0 or 1"):
        read_landmarks68(tmp_path / "flag.txt")


SUBJECT_ROWS = [
    {"subject_id": "S001", "gender": "female", "age": 21, "ethnicity": "asian"},
    {"subject_id": "S002", "gender": "male", "age": 33, "ethnicity": "black"},
]


def test_subjects_round_trip(tmp_path):
    write_subjects(tmp_path / "subjects.csv", SUBJECT_ROWS)
    table = read_subjects(tmp_path / "subjects.csv")
    assert list(table.columns) == ["subject_id", "gender", "age", "ethnicity"]
    assert table["age"].dtype == np.int64 and table["age"].tolist() == [21, 33]
    assert table["subject_id"].tolist() == ["S001", "S002"]


def test_subjects_problems_are_each_named(tmp_path):
    table = pd.DataFrame({"subject_id": ["S001", "S001", "X3"], "gender": ["female", "f", "male"],
                          "age": ["20", "2O", "40"], "ethnicity": ["asian", "asian", "martian"]})
    problems = subjects_problems(table)
    text = "\n".join(problems)
    assert "line 3 (S001): gender 'f'" in text and "line 3 (S001): age '2O'" in text
    assert "line 4 (X3): subject_id 'X3' is not like S001" in text and "ethnicity 'martian'" in text
    assert "subject_id S001 appears 2 times" in text
    table.to_csv(tmp_path / "subjects.csv", index=False)
    with pytest.raises(FileFormatError, match="subjects.csv: .*gender 'f'"):
        read_subjects(tmp_path / "subjects.csv")
    assert len(read_subjects(tmp_path / "subjects.csv", check=False)) == 3
    (tmp_path / "cols.csv").write_text("subject_id,gender\nS001,female\n")
    with pytest.raises(FileFormatError, match="cols.csv: missing column.*age, ethnicity"):
        read_subjects(tmp_path / "cols.csv")
    with pytest.raises(InputError, match="gender"):
        write_subjects(tmp_path / "out.csv", [{**SUBJECT_ROWS[0], "gender": "x"}])


def test_find_captures_is_sorted_and_skips_hidden_folders(tmp_path):
    for subject, expression in [("S002", "smile"), ("S001", "smile"), ("S001", "neutral")]:
        (tmp_path / subject / expression).mkdir(parents=True)
    (tmp_path / ".cache" / "x").mkdir(parents=True)
    (tmp_path / "S001" / ".tmp").mkdir()
    (tmp_path / "subjects.csv").write_text("")
    refs = find_captures(tmp_path)
    assert [(r.subject, r.expression) for r in refs] == [("S001", "neutral"), ("S001", "smile"), ("S002", "smile")]
    assert refs[0].directory == tmp_path / "S001" / "neutral"
    with pytest.raises(InputError, match="not a directory"):
        find_captures(tmp_path / "nope")


def test_capture_paths_find_png_views_and_load_reads_cameras(tmp_path):
    ref = make_capture(tmp_path, "S007", "smile", image_suffix=".png")
    paths = capture_paths(ref.directory)
    assert all(p.suffix == ".png" and p.is_file() for p in paths.images)
    assert paths.landmarks68[8] == ref.directory / "landmarks68" / "cam8.txt"
    capture = CaptureRef(tmp_path, "S007", "smile").load()
    assert list(capture.cameras) == list(CAMERA_NAMES)
    assert capture.landmarks7().shape == (7, 3) and capture.landmarks68(2).shape == (68, 3)
    assert capture.load_scan().n_vertices > 100
