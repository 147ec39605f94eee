"""The face detector's 468 -> iBUG 68 table, the messages without the detector environment, and
(with `bash scripts/setup.sh --detect`) a real detection on synthetic renders."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from facehd.cli import main
from facehd.errors import FaceHDError
from facehd.landmarks_detect import (
    DETECTED_DIR,
    MEDIAPIPE_POINTS,
    MEDIAPIPE_TO_IBUG68,
    DetectorMissing,
    detect_landmarks,
    detector_available,
    mediapipe_to_ibug68,
    photo_landmark_folders,
)
from facehd.synth.bfm import landmark_design
from facehd.wild import CROP_SIZE, crop_transform, read_landmarks, template5_from_model
from tests.helpers import assert_close

# MediaPipe's own region index sets (mediapipe/python/solutions/face_mesh_connections.py, the
# vertices of FACEMESH_RIGHT_EYE etc.): the subject's right and left, independent of our table.
MP_RIGHT_EYE = {7, 33, 133, 144, 145, 153, 154, 155, 157, 158, 159, 160, 161, 163, 173, 246}
MP_LEFT_EYE = {249, 263, 362, 373, 374, 380, 381, 382, 384, 385, 386, 387, 388, 390, 398, 466}
MP_RIGHT_BROW = {46, 52, 53, 55, 63, 65, 66, 70, 105, 107}
MP_LEFT_BROW = {276, 282, 283, 285, 293, 295, 296, 300, 334, 336}
MP_LIPS = {0, 13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181, 185, 191, 267, 269, 270,
           291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415}
MP_FACE_OVAL = {10, 21, 54, 58, 67, 93, 103, 109, 127, 132, 136, 148, 149, 150, 152, 162, 172, 176, 234, 251, 284, 288,
                297, 323, 332, 338, 356, 361, 365, 377, 378, 379, 389, 397, 400, 454}
IBUG_GROUPS = {  # iBUG index ranges (the subject's right and left) and MediaPipe's set for each
    "right eye": (range(36, 42), MP_RIGHT_EYE), "left eye": (range(42, 48), MP_LEFT_EYE),
    "right brow": (range(17, 22), MP_RIGHT_BROW), "left brow": (range(22, 27), MP_LEFT_BROW),
    "mouth": (range(48, 68), MP_LIPS), "jaw": (range(0, 17), MP_FACE_OVAL),
}
PIXELS_PER_UNIT = 100.0  # frontal "photo" of the designed landmarks: x right, rows down


def frontal_face() -> np.ndarray:
    """(68, 2) pixels of a frontal face: SynthBFM's designed landmarks (x < 0: the subject's right)
    seen by facehd's camera (on +z, looking at the face), so the subject's right is the image's left."""
    design = landmark_design()
    return np.stack([CROP_SIZE / 2 + PIXELS_PER_UNIT * design[:, 0], CROP_SIZE / 2 - PIXELS_PER_UNIT * design[:, 1]], 1)


def test_table_shape_and_regions_agree_with_mediapipe_sides():
    assert len(MEDIAPIPE_TO_IBUG68) == 68
    assert all(1 <= len(group) <= 2 and all(0 <= i < MEDIAPIPE_POINTS for i in group) for group in MEDIAPIPE_TO_IBUG68)
    for name, (ibug, mediapipe_set) in IBUG_GROUPS.items():
        for k in ibug:
            assert set(MEDIAPIPE_TO_IBUG68[k]) <= mediapipe_set, f"iBUG {k} ({name}) -> {MEDIAPIPE_TO_IBUG68[k]}"


def test_known_face_maps_to_its_68_points_with_pairs_averaged():
    """468 points built so that each iBUG point is its table entry's average (a pair straddles the
    point, the shared vertex 58 included; unused vertices are noise) map back to the face."""
    rng = np.random.default_rng(0)
    truth = frontal_face()
    weights = np.zeros((68, MEDIAPIPE_POINTS))
    for k, group in enumerate(MEDIAPIPE_TO_IBUG68):
        weights[k, list(group)] = 1.0 / len(group)
    noise = rng.normal(0.0, 30.0, (MEDIAPIPE_POINTS, 2))
    # the nearest points to the noise whose averages are the face: noise + W^+ (truth - W noise)
    points = noise + np.linalg.pinv(weights) @ (truth - weights @ noise)
    assert np.abs(points[132] - points[58]).max() > 1.0  # the pairs really differ
    assert_close(mediapipe_to_ibug68(points), truth, atol=1e-9)
    with_iris = np.concatenate([points, rng.normal(size=(10, 2))])  # refine_landmarks's 478
    assert_close(mediapipe_to_ibug68(with_iris[None])[0], truth, atol=1e-9)


def test_frontal_face_has_the_right_eye_on_the_image_left():
    """Place MediaPipe's vertices by MediaPipe's own sides (its right eye and brow on the image's
    left, as in a photo): the mapped right eye corner (36) lies left of the left one (45) and on
    the right eye; a mirrored table puts it on the other eye."""
    face = frontal_face()
    assert face[36, 0] < face[45, 0]  # facehd's convention, which SynthBFM and the renders follow
    points = np.tile(face[30], (MEDIAPIPE_POINTS, 1))  # everything else at the nose tip
    for name in ("right eye", "left eye", "right brow", "left brow"):
        ibug, mediapipe_set = IBUG_GROUPS[name]
        points[list(mediapipe_set)] = face[list(ibug)].mean(axis=0)
    mapped = mediapipe_to_ibug68(points)
    assert mapped[36, 0] < mapped[45, 0]
    assert_close(mapped[36:42], np.tile(face[36:42].mean(axis=0), (6, 1)))
    assert_close(mapped[17:22], np.tile(face[17:22].mean(axis=0), (5, 1)))
    mirrored = [MEDIAPIPE_TO_IBUG68[k] for k in (*range(42, 48), *range(36, 42))]
    swapped = np.stack([points[list(g)].mean(axis=0) for g in mirrored])
    assert swapped[0, 0] > swapped[9, 0]  # the test would catch the mirror


def test_without_the_detector_a_one_line_message_says_how_to_install_it(tmp_path, monkeypatch):
    missing = tmp_path / "no-detector" / "python"
    monkeypatch.setenv("FACEHD_DETECT_PYTHON", str(missing))
    assert not detector_available()
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.full((100, 80, 3), 90, np.uint8)).save(photos / "face.png")
    with pytest.raises(DetectorMissing) as info:
        detect_landmarks([photos / "face.png"])
    assert "bash scripts/setup.sh --detect" in str(info.value) and "\n" not in str(info.value)

    result = CliRunner().invoke(main, ["landmarks", "--images", str(photos), "--out", str(tmp_path / "lm")])
    assert result.exit_code == 1
    assert "bash scripts/setup.sh --detect" in result.output and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0

    folders, problems = photo_landmark_folders([photos / "face.png"], tmp_path / "out", CROP_SIZE)
    message = problems[photos / "face.png"]
    assert "setup.sh --detect" in message and "--landmarks" in message and "\n" not in message
    assert photos / "face.png" not in folders


def test_landmarks_beside_a_photo_and_pre_cropped_images_need_no_detector(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEHD_DETECT_PYTHON", str(tmp_path / "none"))
    Image.fromarray(np.zeros((100, 80, 3), np.uint8)).save(tmp_path / "photo.png")
    (tmp_path / "photo.txt").write_text("0 0\n" * 68)
    Image.fromarray(np.zeros((CROP_SIZE, CROP_SIZE, 3), np.uint8)).save(tmp_path / "crop.png")
    folders, problems = photo_landmark_folders([tmp_path / "photo.png", tmp_path / "crop.png"], tmp_path, CROP_SIZE)
    assert problems == {} and folders == {tmp_path / "photo.png": tmp_path, tmp_path / "crop.png": None}


def test_a_broken_detector_environment_is_one_line(tmp_path):
    """A Python without mediapipe (this one): the worker's import error, in one line."""
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(FaceHDError, match="mediapipe") as info:
        detect_landmarks([tmp_path / "a.png"], python=sys.executable)
    assert "failed" in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# real detection (needs `bash scripts/setup.sh --detect`)

MAX_ALIGNMENT_ERROR_PX = 6.0  # the crop's 7 points, at 224; measured ~3 px on near-frontal renders
MAX_MEAN_ERROR_PX = 14.0  # all 68 at 224; measured ~8 px (SynthBFM's brows and jaw differ from MediaPipe's)
NEAR_FRONTAL_YAW_DEG = 30.0


@pytest.mark.skipif(not detector_available(), reason="no face detector (bash scripts/setup.sh --detect)")
def test_detection_on_synthetic_renders(tmp_path):
    from facehd.conventions import LANDMARKS7_IBUG
    from facehd.synth.wild import _resolve_model, render_wild
    from facehd.wild import write_sample

    model, _ = _resolve_model(None, None, tmp_path)
    renders = [r for r in render_wild(model, range(6), seed=0, image_size=256, occluder_probability=0.0)
               if abs(np.degrees(r.truth.coeffs[225])) < NEAR_FRONTAL_YAW_DEG]
    assert len(renders) >= 3
    paths = [write_sample(tmp_path, r.sample) for r in renders]
    folders, problems = photo_landmark_folders(paths, tmp_path / "out", CROP_SIZE)
    assert problems == {}
    template5 = template5_from_model(model)
    for render, path in zip(renders, paths):
        assert folders[path] == tmp_path / "out" / DETECTED_DIR
        found = read_landmarks(folders[path] / f"{path.stem}.txt")
        truth = render.sample.landmarks
        assert found[36, 0] < found[45, 0] and truth[36, 0] < truth[45, 0]
        to_crop = crop_transform(truth, template5, CROP_SIZE)
        error = np.linalg.norm(to_crop.apply(found) - to_crop.apply(truth), axis=1)
        assert error[list(LANDMARKS7_IBUG)].mean() < MAX_ALIGNMENT_ERROR_PX, error[list(LANDMARKS7_IBUG)]
        assert error.mean() < MAX_MEAN_ERROR_PX, error.mean()
