"""`hrn mv` on tiny captures: the fused files, bad views skipped with a line naming the file, a
capture with too few views failing alone in a batch, resuming, and a plain image folder."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))

from mv_factory import render_truth, rig, tiny_model, write_capture  # noqa: E402

from hrn_baseline.cli import main  # noqa: E402

TINY_MODEL_YAML = "model: {synth_resolution: 24, image_size: 64, mid_map_size: 16, high_map_size: 32}\n"
FAST_FIT_YAML = "fit: {iterations: 1, rigid_iterations: 10, landmark_iterations: 30}\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("mv")
    (base / "model.yaml").write_text(TINY_MODEL_YAML)
    (base / "fit.yaml").write_text(FAST_FIT_YAML)
    views, _ = render_truth(tiny_model(), rig(), seed=1)
    write_capture(base / "root" / "S001" / "neutral", views)
    return base, views


def _run(base: Path, *args: str):
    result = CliRunner().invoke(main, ["mv", "--model-config", str(base / "model.yaml"), "--config",
                                       str(base / "fit.yaml"), *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def test_capture_writes_the_fused_result(setup, tmp_path):
    base, _ = setup
    result = _run(base, "--capture", str(base / "root" / "S001" / "neutral"), "--out", str(tmp_path / "out"),
                  "--units", "mm", "--views", "cam0,cam1,cam2", "--per-view")
    assert result.exit_code == 0, result.output
    fused = tmp_path / "out" / "fused"
    for name in ("coarse.obj", "mid.obj", "high.obj", "mid.png", "deformation.npy", "deformation_x.png",
                 "displacement.npy", "displacement.png", "texture.png", "valid_mask.png", "coeffs.npz", "maps.json"):
        assert (fused / name).is_file(), name
    assert (tmp_path / "out" / "preview.png").is_file()
    assert sorted(p.name for p in (tmp_path / "out" / "views").iterdir()) == ["cam0", "cam1", "cam2"]
    assert json.loads((fused / "maps.json").read_text())["units"] == "mm"
    assert "# units: mm" in (fused / "mid.obj").read_text()[:500]
    summary = json.loads((tmp_path / "out" / "mv.json").read_text())
    assert summary["calibrated"] and summary["views"] == ["cam0", "cam1", "cam2"]
    coeffs = np.load(fused / "coeffs.npz")
    assert coeffs["id"].shape == (80,) and np.abs(coeffs["exp"]).max() == 0  # expression zero by default
    assert coeffs["view_exp"].shape == (3, 64) and coeffs["coeffs"].shape == (257,)
    np.testing.assert_array_equal(coeffs["coeffs"][:80], coeffs["id"])
    np.testing.assert_allclose(coeffs["coeffs"][144:224], coeffs["view_tex"].mean(0), atol=1e-6)
    assert "files in" in result.stdout


def test_bad_views_are_skipped_with_a_line_naming_the_file(setup, tmp_path):
    base, _ = setup
    capture = tmp_path / "S001" / "neutral"
    shutil.copytree(base / "root" / "S001" / "neutral", capture)
    (capture / "landmarks68" / "cam1.txt").unlink()  # a view without landmarks
    (capture / "images" / "cam2.png").write_bytes(b"not an image")  # an unreadable image
    from PIL import Image

    Image.new("RGB", (50, 40)).save(capture / "images" / "cam3.png")  # a size cameras.json does not say
    result = _run(base, "--capture", str(capture), "--out", str(tmp_path / "out"), "--views",
                  "cam0,cam1,cam2,cam3,cam4", "--no-preview")
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.stdout.splitlines() if line.startswith("skipped view")]
    assert len(skipped) == 3
    assert "cam1.txt" in skipped[0] and "missing landmark file" in skipped[0]
    assert "cam2.png" in skipped[1] and "cannot decode" in skipped[1]
    assert "cam3.png" in skipped[2] and "50 x 40" in skipped[2]
    assert json.loads((tmp_path / "out" / "mv.json").read_text())["views"] == ["cam0", "cam4"]


def test_root_batch_goes_on_past_a_capture_with_too_few_views_and_resumes(setup, tmp_path):
    base, _ = setup
    root = tmp_path / "root"
    shutil.copytree(base / "root" / "S001", root / "S001")
    shutil.copytree(base / "root" / "S001", root / "S002")
    for name in ("cam1", "cam2", "cam3", "cam4", "cam5", "cam6", "cam7", "cam8"):
        (root / "S002" / "neutral" / "images" / f"{name}.png").unlink()
    args = ["--root", str(root), "--out", str(tmp_path / "out"), "--views", "cam0,cam1,cam2", "--no-preview"]
    from facehd.fsutil import owner_tag

    host = owner_tag().rsplit("-", 1)[0]
    stale = tmp_path / "out" / "S001" / f".neutral.part-{host}-999999999-abc123"  # a killed run's folder
    (stale / "fused").mkdir(parents=True)
    result = _run(base, *args)
    assert not stale.exists()
    assert result.exit_code == 1
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "S002/neutral" in failed[0] and "1 readable view(s), at least 2" in failed[0]
    assert "images/cam1.jpg: missing image" in failed[0] and "\n" not in failed[0]
    assert (tmp_path / "out" / "S001" / "neutral" / "fused" / "mid.obj").is_file()
    assert not (tmp_path / "out" / "S002").exists() or not any((tmp_path / "out" / "S002").rglob("mv.json"))
    assert "2 captures: 1 fitted, 0 up to date, 1 failed" in result.stdout
    again = _run(base, *args)
    assert "2 captures: 0 fitted, 1 up to date, 1 failed" in again.stdout


def test_image_folder_with_landmarks(setup, tmp_path):
    base, views = setup
    images, landmarks = tmp_path / "images", tmp_path / "landmarks"
    images.mkdir()
    landmarks.mkdir()
    from PIL import Image

    for view in views[:3]:
        Image.fromarray(view.photo).save(images / f"{view.name}.png")
        rows = np.concatenate([view.landmarks, view.visible[:, None]], axis=1)
        np.savetxt(landmarks / f"{view.name}.txt", rows, fmt="%.3f %.3f %d")
    result = _run(base, "--images", str(images), "--landmarks", str(landmarks), "--out", str(tmp_path / "out"),
                  "--no-preview")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "mv.json").read_text())
    assert not summary["calibrated"] and summary["views"] == ["cam0", "cam1", "cam2"]


def test_exactly_one_input_is_required(setup, tmp_path):
    base, _ = setup
    result = _run(base, "--out", str(tmp_path / "out"))
    assert result.exit_code != 0 and "exactly one of --capture, --images or --root" in result.output


def test_an_unknown_expression_is_refused_before_fitting(setup, tmp_path):
    base, _ = setup
    result = _run(base, "--capture", str(base / "root" / "S001" / "neutral"), "--out", str(tmp_path / "out"),
                  "--views", "cam0,cam1", "--expression", "cam7")
    assert result.exit_code == 1 and "--expression 'cam7' is not zero, mean or one of the views (cam0, cam1)" \
        in result.output
    assert not (tmp_path / "out").exists()


def test_image_folder_finds_landmarks_as_hrn_predict_does(setup, tmp_path, monkeypatch):
    """Without --landmarks: <stem>.txt beside a photo is used; a photo with none goes to the face
    detector, and without the detector it is skipped with a line saying how to install it."""
    base, views = setup
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    border = 24  # photos, not crops: a crop-sized image would be taken as already cropped
    for view in views[:3]:
        Image.fromarray(np.pad(view.photo, ((border, border), (border, border), (0, 0)), mode="edge")).save(
            images / f"{view.name}.png")
    for view in views[:2]:
        rows = np.concatenate([view.landmarks + border, view.visible[:, None]], axis=1)
        np.savetxt(images / f"{view.name}.txt", rows, fmt="%.3f %.3f %d")
    monkeypatch.setenv("FACEHD_DETECT_PYTHON", str(tmp_path / "no-detector" / "python"))
    result = _run(base, "--images", str(images), "--out", str(tmp_path / "out"), "--no-preview")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "mv.json").read_text())
    assert summary["views"] == ["cam0", "cam1"]
    skipped = [line for line in result.output.splitlines() if "cam2.png" in line]
    assert skipped and "setup.sh --detect" in skipped[0]
