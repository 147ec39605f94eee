import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from capture_factory import (
    drop_a_landmark,
    make_capture,
    put_nans_in_scan,
    scan_in_metres,
    truncate,
)
from click.testing import CliRunner
from PIL import Image, ImageFile

from facehd.capture import (
    CaptureRef,
    read_cameras,
    read_landmarks7,
    read_landmarks68,
    write_cameras,
    write_landmarks7,
    write_landmarks68,
)
from facehd.cli_dataset import validate
from facehd.errors import InputError
from facehd.io import Mesh, load_mesh, save_mesh
from facehd.validate import CHECKS, landmarks7_normal, validate_dataset

# landmarks7.txt rows (iBUG 36, 39, 42, 45, 33, 48, 54) with the subject's left and right swapped
LEFT_RIGHT_SWAP = [3, 2, 1, 0, 4, 6, 5]

# --- the corpus of bad captures: each breaks one thing in one capture of the valid dataset ---------


def truncated_jpeg(ref):
    truncate(ref.paths.images[3])
    return "images/cam3.jpg", "image_decodable", "truncated"


def missing_view(ref):
    ref.paths.images[4].unlink()
    return "images/cam4.jpg", "image_missing", "missing view cam4"


def nan_in_scan(ref):
    put_nans_in_scan(ref, count=3)
    return "scan.ply", "scan_finite", "3 of 576"


def truncated_ply(ref):
    truncate(ref.paths.scan)
    return "scan.ply", "scan_readable", "truncated"


def scan_in_m(ref):
    scan_in_metres(ref)
    return "scan.ply", "scan_units", "metres"


def six_landmarks(ref):
    drop_a_landmark(ref)
    return "landmarks7.txt", "landmarks7", "6 landmarks, expected 7"


def non_orthonormal_rotation(ref):
    cameras = read_cameras(ref.paths.cameras)
    cameras["cam2"].R = cameras["cam2"].R * 1.1
    write_cameras(ref.paths.cameras, cameras)
    return "cameras.json", "rotation", "cam2: R is not orthonormal"


def image_size_mismatch(ref):
    Image.new("RGB", (32, 48)).save(ref.paths.images[1])
    return "images/cam1.jpg", "image_size", "32x48 px but cameras.json says 64x48"


def principal_point_outside(ref):
    cameras = read_cameras(ref.paths.cameras)
    cameras["cam5"].K[0, 2] = 500.0
    write_cameras(ref.paths.cameras, cameras)
    return "cameras.json", "intrinsics", "cam5: principal point (500"


def camera_facing_away(ref):
    cameras = read_cameras(ref.paths.cameras)
    flip = np.diag([-1.0, 1.0, -1.0])  # a proper rotation: half a turn about the camera's y axis
    cameras["cam6"].R = flip @ cameras["cam6"].R
    cameras["cam6"].t = flip @ cameras["cam6"].t
    write_cameras(ref.paths.cameras, cameras)
    return "cameras.json", "landmarks7_projection", "cam6: landmarks7.txt landmarks 1, 2, 3, 4, 5, 6, 7"


def shifted_landmarks68(ref):
    path = ref.paths.landmarks68[7]
    points = read_landmarks68(path)
    points[36, 0] -= 10.0  # 10 px off on a 64 px image: more than the 5 % tolerance (3.2 px)
    write_landmarks68(path, points)
    return "landmarks68/cam7.txt", "landmarks68_reprojection", "iBUG 36"


def landmarks68_outside(ref):
    path = ref.paths.landmarks68[0]
    points = read_landmarks68(path)
    points[5, :2] = (200.0, 10.0)
    write_landmarks68(path, points)
    return "landmarks68/cam0.txt", "landmarks68", "1 visible landmarks outside cam0's 64x48 image"


def camera_without_key(ref):
    doc = json.loads(ref.paths.cameras.read_text())
    del doc["cameras"]["cam4"]["K"]
    ref.paths.cameras.write_text(json.dumps(doc))
    return "cameras.json", "cameras_file", "camera 'cam4': missing key 'K'"


def reflected_rotation(ref):
    cameras = read_cameras(ref.paths.cameras)
    cameras["cam8"].R[0] *= -1.0  # still orthonormal, but a mirror
    write_cameras(ref.paths.cameras, cameras)
    return "cameras.json", "rotation", "cam8: R has determinant -1.0000"


def degenerate_scan(ref):
    flat = np.array([[0.0, 0.0, 0.0], [100.0, 0.0, 0.0], [200.0, 0.0, 0.0], [0.0, 150.0, 0.0]])
    save_mesh(ref.paths.scan, Mesh(flat, [[0, 1, 2], [0, 1, 2]]))
    return "scan.ply", "scan_degenerate", "only 4 vertices"


def mirrored_landmarks7(ref):
    """Left and right swapped, with no 68-point files to compare against."""
    shutil.rmtree(ref.directory / "landmarks68")
    write_landmarks7(ref.paths.landmarks7, read_landmarks7(ref.paths.landmarks7)[LEFT_RIGHT_SWAP])
    return "landmarks7.txt", "landmarks7_mirrored", "left and right look swapped"


def landmarks7_scaled_by_10(ref):
    write_landmarks7(ref.paths.landmarks7, read_landmarks7(ref.paths.landmarks7) * 10.0)
    return "landmarks7.txt", "landmarks7_units", "x0.1 gives"


def scan_symlink_loop(ref):
    ref.paths.scan.unlink()
    os.symlink(ref.paths.scan.name, ref.paths.scan)  # scan.ply -> scan.ply
    return "scan.ply", "layout", "scan.ply is a symlink loop"


CORPUS = [truncated_jpeg, missing_view, nan_in_scan, truncated_ply, scan_in_m, six_landmarks,
          non_orthonormal_rotation, image_size_mismatch, principal_point_outside, camera_facing_away,
          shifted_landmarks68, landmarks68_outside, camera_without_key, reflected_rotation, degenerate_scan,
          mirrored_landmarks7, landmarks7_scaled_by_10, scan_symlink_loop]


def find(report, file: str, check: str, words: str):
    """The report lines naming ``file`` under ``check`` that contain ``words`` (case-insensitive)."""
    return [line for line in report.lines() if file in line and f"[{check}]" in line and words.lower() in line.lower()]


def test_valid_dataset_passes(dataset):
    report = validate_dataset(dataset)
    assert report.problems == [], report.lines()
    assert report.ok and report.captures_checked == report.captures_passed == 8


@pytest.mark.parametrize("breakage", CORPUS, ids=lambda f: f.__name__)
def test_each_bad_capture_is_named(dataset, breakage):
    ref = CaptureRef(dataset, "S002", "smile")
    file, check, words = breakage(ref)
    report = validate_dataset(dataset)
    assert find(report, f"S002/smile/{file}", check, words), "\n".join(report.lines())
    assert check in CHECKS
    assert not report.ok and report.captures_passed == 7
    # the problem is reported against the broken capture only
    assert all("S002/smile" in line for line in report.lines()), report.lines()


def test_all_problems_are_reported_in_one_run_and_by_the_cli(dataset, tmp_path):
    expected = []
    for k, breakage in enumerate(CORPUS[:7]):  # the seven the issue lists, one capture each
        subject = f"S{k + 10:03d}"
        ref = make_capture(dataset, subject, "neutral")
        file, check, words = breakage(ref)
        expected.append((f"{subject}/neutral/{file}", check, words))
    # S010..S016 have folders but no subjects.csv row: a subject folder missing from the table
    report = validate_dataset(dataset)
    for file, check, words in expected:
        assert find(report, file, check, words), f"{file} {check} not reported:\n" + "\n".join(report.lines())
    assert find(report, "S010", "subjects_match", "subject folder S010 has no row in subjects.csv")
    assert report.captures_checked == 15 and report.captures_passed == 8

    md, html = tmp_path / "report.md", tmp_path / "report.html"
    result = CliRunner().invoke(validate, [str(dataset), "--report", str(md)])
    assert result.exit_code == 1, result.output
    assert result.stdout.startswith("FAILED") and "15 captures checked, 8 passed" in result.stdout
    for file, check, _ in expected:
        assert f"{file} [{check}]" in result.stdout and file in md.read_text()
    CliRunner().invoke(validate, [str(dataset), "--report", str(html)])
    text = html.read_text()
    assert text.startswith("<!DOCTYPE html>") and "S013/neutral/scan.ply" in text and "metres" in text


def test_cli_passes_a_valid_dataset_and_writes_the_report(dataset, tmp_path):
    result = CliRunner().invoke(validate, [str(dataset), "--report", str(tmp_path / "ok.md")])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("PASSED") and "8 captures checked, 8 passed" in result.stdout
    assert "No problems found." in (tmp_path / "ok.md").read_text()
    bad = CliRunner().invoke(validate, [str(dataset), "--report", str(tmp_path / "r.txt")])
    assert bad.exit_code == 2 and ".html" in bad.output


def test_subjects_csv_against_the_folders(dataset):
    table = pd.read_csv(dataset / "subjects.csv")
    table.loc[len(table)] = ["S050", "male", 30, "other"]  # a row without a folder
    table.loc[1, "gender"] = "M"
    table.loc[len(table)] = table.loc[0]  # a duplicate
    table.to_csv(dataset / "subjects.csv", index=False)
    report = validate_dataset(dataset)
    assert find(report, "subjects.csv", "subjects_match", "row S050 has no subject folder")
    assert find(report, "subjects.csv", "subjects_csv", "line 3 (S002): gender 'M'")
    assert find(report, "subjects.csv", "subjects_csv", "S001 appears 2 times")
    (dataset / "subjects.csv").unlink()
    assert find(validate_dataset(dataset), "subjects.csv", "layout", "missing subjects.csv")


def test_png_views_and_missing_68_point_files_are_fine(tmp_path):
    make_capture(tmp_path, "S001", "neutral", image_suffix=".png", with_landmarks68=False)
    (tmp_path / "subjects.csv").write_text("subject_id,gender,age,ethnicity\nS001,male,20,asian\n")
    report = validate_dataset(tmp_path)
    assert report.ok and not report.problems, report.lines()


def test_empty_capture_lists_every_missing_file(dataset):
    (dataset / "S003" / "blank").mkdir()
    report = validate_dataset(dataset)
    lines = "\n".join(report.lines())
    for name in ("cameras.json", "scan.ply", "landmarks7.txt", "images/cam0.jpg", "images/cam8.jpg"):
        assert f"S003/blank/{name}" in lines
    assert report.captures_passed == 8 and report.captures_checked == 9


def test_progress_wrapper_sees_every_capture_and_pillow_setting_is_restored(dataset):
    seen = []

    def progress(items, total, desc):
        seen.append(total)
        yield from items

    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        truncate(CaptureRef(dataset, "S001", "neutral").paths.images[0])
        report = validate_dataset(dataset, progress=progress)
        assert find(report, "S001/neutral/images/cam0.jpg", "image_decodable", "truncated")
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    assert seen == [8]


# --- mirrored and wrong-scale landmarks --------------------------------------------------------


@pytest.mark.parametrize("mirror", ["rows swapped", "points reflected", "whole capture reflected"])
def test_mirrored_landmarks7_are_caught_without_the_68_point_files(dataset, mirror):
    ref = CaptureRef(dataset, "S002", "smile")
    shutil.rmtree(ref.directory / "landmarks68")
    landmarks = read_landmarks7(ref.paths.landmarks7)
    reflect = np.array([-1.0, 1.0, 1.0])  # world x: the subject's right-left axis
    if mirror == "rows swapped":
        landmarks = landmarks[LEFT_RIGHT_SWAP]
    elif mirror == "points reflected":  # about the landmarks' own centre, so they stay on the scan
        centre = landmarks.mean(axis=0)
        landmarks = centre + (landmarks - centre) * reflect
    else:  # a mirrored scan with its landmarks: consistent with each other, but still a mirror image
        scan = load_mesh(ref.paths.scan)
        save_mesh(ref.paths.scan, Mesh(scan.vertices * reflect, scan.faces[:, ::-1]))
        landmarks = landmarks * reflect
    write_landmarks7(ref.paths.landmarks7, landmarks)
    report = validate_dataset(dataset)
    assert [p.check for p in report.errors] == ["landmarks7_mirrored"], report.lines()
    assert find(report, "S002/smile/landmarks7.txt", "landmarks7_mirrored", "left and right look swapped")
    assert report.captures_passed == 7


def test_landmark_handedness_gives_the_face_normal_in_any_pose(dataset):
    landmarks = read_landmarks7(CaptureRef(dataset, "S001", "neutral").paths.landmarks7)
    assert landmarks7_normal(landmarks) @ [0.0, 0.0, 1.0] > 0.9  # the factory's face looks along +z
    rotation = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))[0]
    rotation *= np.linalg.det(rotation)  # a proper rotation
    posed = landmarks @ rotation.T + [40.0, -300.0, 900.0]
    assert np.allclose(landmarks7_normal(posed), rotation @ landmarks7_normal(landmarks))
    assert np.allclose(landmarks7_normal(posed[LEFT_RIGHT_SWAP]), -landmarks7_normal(posed), atol=0.2)


def test_wrong_scale_landmarks_are_blamed_once_without_a_cascade(dataset):
    ref = CaptureRef(dataset, "S002", "smile")
    write_landmarks7(ref.paths.landmarks7, read_landmarks7(ref.paths.landmarks7) * 10.0)
    report = validate_dataset(dataset)
    assert len(report.problems) == 1, report.lines()
    assert find(report, "S002/smile/landmarks7.txt", "landmarks7_units", "tenths of a millimetre (x0.1 gives 42 mm)")
    write_landmarks7(ref.paths.landmarks7, read_landmarks7(ref.paths.landmarks7) / 1000.0)  # 1/100 of mm
    report = validate_dataset(dataset)
    assert len(report.problems) == 1 and find(report, "landmarks7.txt", "landmarks7_units", "model units")


# --- what is given as ROOT, strict mode, symlinks -------------------------------------------------


def test_a_subject_or_capture_folder_is_not_a_dataset_root(dataset, tmp_path):
    with pytest.raises(InputError, match=f"S001: a subject folder, not a dataset root.*give its parent, {dataset}$"):
        validate_dataset(dataset / "S001")
    with pytest.raises(InputError, match=f"neutral: a capture folder .*give the dataset root, {dataset}$"):
        validate_dataset(dataset / "S001" / "neutral")
    with pytest.raises(InputError, match="empty: no dataset here"):
        validate_dataset((tmp_path / "empty").mkdir() or tmp_path / "empty")
    cases = ((dataset / "S001", "a subject folder, not a dataset root"), (tmp_path / "nowhere", "no such folder"))
    for root, words in cases:
        result = CliRunner().invoke(validate, [str(root)])  # the README: bad input exits 1 with one line
        assert result.exit_code == 1, result.output
        assert len(result.output.strip().splitlines()) == 1 and result.output.startswith(f"Error: {root}: {words}")


def test_strict_verdict_agrees_with_the_exit_status(dataset):
    stray = CaptureRef(dataset, "S003", "smile").directory / "landmarks68" / "notes.txt"
    stray.write_text("clicked by A.\n")  # a warning: not a landmarks68/cam<i>.txt file
    result = CliRunner().invoke(validate, [str(dataset)])
    assert result.exit_code == 0 and result.stdout.startswith("PASSED: ")
    assert "8 passed; 0 errors, 1 warnings" in result.stdout
    result = CliRunner().invoke(validate, [str(dataset), "--strict"])
    assert result.exit_code == 1, result.output
    assert result.stdout.startswith("FAILED (strict: warnings fail): ")
    assert "7 passed; 0 errors, 1 warnings" in result.stdout
    assert "WARNING S003/smile/landmarks68/notes.txt [landmarks68]" in result.stdout


def test_symlinks_to_nothing_are_named_as_such(dataset):
    ref = CaptureRef(dataset, "S001", "smile")
    ref.paths.landmarks7.unlink()
    os.symlink("elsewhere.txt", ref.paths.landmarks7)
    ref.paths.images[2].unlink()
    os.symlink(ref.paths.images[2].name, ref.paths.images[2])
    loop68 = ref.paths.landmarks68[5]
    loop68.unlink()
    os.symlink(loop68.name, loop68)
    report = validate_dataset(dataset)
    assert find(report, "S001/smile/landmarks7.txt", "layout", "landmarks7.txt is a broken symlink (to elsewhere.txt)")
    assert find(report, "S001/smile/images/cam2.jpg", "image_missing", "view cam2: images/cam2.jpg is a symlink loop")
    assert find(report, "S001/smile/landmarks68/cam5.txt", "landmarks68", "landmarks68/cam5.txt is a symlink loop")
    assert not any("]: missing" in line for line in report.lines()), report.lines()
