"""`hrn evaluate`: the point-to-surface errors against synthetic truth, per-image rows, shards,
failures that do not stop the rest, and the command line."""

from __future__ import annotations

import copy
import csv
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hrn_factory import WILD_IMAGES

from facehd import conventions as cv
from facehd.errors import FileFormatError, InputError
from facehd.morphable import rotation_matrix
from facehd.synth.wild import TRUTH_DIR, WildTruth, read_truth, truth_path, write_truth
from hrn_baseline.cli import main
from hrn_baseline.evaluate import (
    METRICS,
    evaluate,
    format_means,
    format_table,
    initial_model,
    save_preview,
    truth_errors,
)
from hrn_baseline.predict import load_model


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, device="cpu")


def _truth(shape: np.ndarray, angles: tuple[float, float, float]) -> WildTruth:
    coeffs = np.zeros(cv.N_COEFFS)
    coeffs[cv.COEFF_SLICES["angle"]] = angles
    return WildTruth(coeffs=coeffs, shape=shape.astype(np.float32), image_size=96, focal=1.0, principal_point=48.0,
                     camera_distance=10.0, crop_transform=np.array([1.0, 0.0, 0.0]),
                     landmarks_visible=np.ones(68, bool), occluded=False)


def _rotation(angles) -> np.ndarray:
    return rotation_matrix(torch.tensor([angles], dtype=torch.float64))[0].numpy()


def test_truth_errors_separate_pose_shape_and_scale(model):
    morphable = model.morphable
    shape = morphable.mean_shape.double().numpy().reshape(-1, 3)
    front, faces = morphable.front_vertices.numpy(), morphable.faces.numpy()
    angles = (0.1, 0.5, -0.05)
    truth = _truth(shape, angles)
    assert truth_errors(shape, _rotation(angles), truth, front, faces) == pytest.approx((0, 0, 0), abs=1e-6)
    # the right shape in the wrong pose: only the posed error sees it
    posed, direct, aligned = truth_errors(shape, _rotation((0.1, 0.3, -0.05)), truth, front, faces)
    assert posed > 1.0 and direct == pytest.approx(0, abs=1e-6) and aligned == pytest.approx(0, abs=1e-6)
    # a 5 % larger face: the similarity alignment takes the scale out, the direct distance does not
    posed, direct, aligned = truth_errors(1.05 * shape, _rotation(angles), truth, front, faces)
    assert direct > 0.5 and posed == pytest.approx(direct, rel=1e-6) and aligned == pytest.approx(0, abs=1e-5)
    # 1 mm (0.01 model units) along z moves every front vertex by 1 mm: about 1 mm from the surface
    _, direct, aligned = truth_errors(shape + [0.0, 0.0, 0.01], _rotation(angles), truth, front, faces)
    assert 0.5 < direct <= 1.0 + 1e-6 and aligned == pytest.approx(0, abs=1e-5)


def test_evaluate_gives_every_metric_per_image(model, tiny_wild):
    result = evaluate(model, [tiny_wild], batch_size=5)
    assert len(result.rows) == WILD_IMAGES and not result.failures
    means = result.means()
    assert set(means) == set(METRICS) and all(np.isfinite(v) and v > 0 for v in means.values())
    assert means["landmark_px"] < 60 and means["shape_mm"] < means["posed_mm"]
    # shards split the images and give each the same errors
    halves = [evaluate(model, [tiny_wild], shard=(k, 2)) for k in (0, 1)]
    rows = sorted(halves[0].rows + halves[1].rows, key=lambda r: r.name)
    assert [r.name for r in rows] == [r.name for r in result.rows]
    for a, b in zip(rows, result.rows):
        assert [getattr(a, k) for k in METRICS] == pytest.approx([getattr(b, k) for k in METRICS], rel=1e-5)
    assert not model.training  # left in the mode it came in
    model.train()
    evaluate(model, [tiny_wild])
    assert model.training
    model.eval()


def test_initial_model_predicts_the_mean_face_without_touching_the_random_state(model, tiny_wild):
    state = torch.get_rng_state()
    start = initial_model(model)
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():
        out = start(torch.rand(2, 3, model.image_size, model.image_size))
    assert torch.equal(out.coeffs, torch.zeros_like(out.coeffs))
    table = format_table({"initialisation": evaluate(start, [tiny_wild]), "trained": evaluate(model, [tiny_wild])})
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["model", "images", "landmark", "(px)"] and "aligned shape (mm)" in lines[0]
    assert lines[1].startswith("initialisation") and lines[2].split()[1] == str(WILD_IMAGES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluation_on_cuda_matches_the_cpu(model, tiny_wild):
    on_gpu = copy.deepcopy(model).cuda()
    start = initial_model(on_gpu)  # built from the CUDA model's morphable model
    assert next(start.parameters()).is_cuda
    for a, b in ((on_gpu, model), (start, initial_model(model))):
        gpu, cpu = evaluate(a, [tiny_wild]).means(), evaluate(b, [tiny_wild]).means()
        assert gpu.keys() == cpu.keys() and [gpu[k] for k in gpu] == pytest.approx([cpu[k] for k in cpu], rel=1e-3)


def test_preview_sheet_of_the_first_images(model, tiny_wild, tmp_path):
    result = evaluate(model, [tiny_wild], batch_size=2, preview=3)  # the preview spans batches
    assert [p.name for p in result.preview] == [r.name for r in result.rows[:3]]
    size = model.image_size
    first = result.preview[0]
    assert first.image.shape == first.render_mid.shape == first.render_high.shape == (size, size, 3)
    assert first.landmarks.shape == first.predicted.shape == (68, 2)
    assert 0 <= first.render_high.min() and first.render_high.max() <= 1
    assert not np.array_equal(first.render_mid, first.image)  # the face is pasted onto the input
    assert save_preview(result.preview, tmp_path / "p" / "sheet.png").read_bytes()[:4] == b"\x89PNG"
    assert not evaluate(model, [tiny_wild]).preview
    with pytest.raises(InputError, match="no image"):
        save_preview([], tmp_path / "empty.png")


def test_bad_images_are_reported_and_the_rest_evaluated(model, tiny_wild, tmp_path):
    folder = tmp_path / "wild"
    shutil.copytree(tiny_wild, folder)
    (folder / "images" / "000003.png").write_bytes(b"not a png")
    (folder / TRUTH_DIR / "000005.npz").unlink()
    plain = tmp_path / "no_truth"
    shutil.copytree(tiny_wild, plain, ignore=shutil.ignore_patterns(TRUTH_DIR))
    result = evaluate(model, [folder, plain, tmp_path / "missing"])
    failed = [where for where, _ in result.failures]
    assert failed[:2] == [f"{folder}/000003", f"{folder}/000005"] and failed[2] == str(tmp_path / "missing")
    assert "000003.png" in result.failures[0][1] and "000005.npz" in result.failures[1][1]
    assert len(result.rows) == 2 * WILD_IMAGES - 2
    without_truth = [r for r in result.rows if r.folder == str(plain)]
    assert len(without_truth) == WILD_IMAGES and all(r.shape_mm is None and r.landmark_px > 0 for r in without_truth)
    path = result.write_csv(tmp_path / "errors.csv")
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == len(result.rows) and rows[-1]["posed_mm"] == "" and float(rows[0]["posed_mm"]) > 0


def test_a_diverged_model_gets_nan_errors_not_a_crash(model, tiny_wild):
    broken = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in broken.regressor.parameters():
            parameter.fill_(float("nan"))
    result = evaluate(broken, [tiny_wild])
    assert len(result.rows) == WILD_IMAGES and not result.failures
    assert all(np.isnan(v) for v in result.means().values()) and "shape nan mm" in format_means(result.means())


def test_truth_of_another_model_is_refused(model, tiny_wild, tmp_path):
    folder = tmp_path / "wild"
    shutil.copytree(tiny_wild, folder)
    truth = read_truth(truth_path(folder, "000000"))
    write_truth(truth_path(folder, "000000"), _truth(truth.shape[:-5], (0.0, 0.0, 0.0)))
    with pytest.raises(FileFormatError, match="another morphable model") as info:
        evaluate(model, [folder])
    assert "000000.npz" in str(info.value)
    with pytest.raises(InputError, match="no image folder"):
        evaluate(model, [])


def test_cli_evaluate(tiny_checkpoint, tiny_wild, tmp_path):
    out = tmp_path / "errors.csv"
    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(tiny_checkpoint), "--images", str(tiny_wild),
                                       "--baseline", "--out", str(out), "--preview", str(tmp_path / "p.png"),
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()  # progress bars go to stderr
    assert lines[1].startswith("initialisation") and lines[2].startswith(str(tiny_checkpoint))
    assert "posed_mm: truth -> prediction point-to-surface" in result.stdout
    assert len(out.read_text().splitlines()) == WILD_IMAGES + 1
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG" and "preview: " in result.stdout
    broken = tmp_path / "broken"
    shutil.copytree(tiny_wild, broken)
    (broken / "images" / "000000.png").write_bytes(b"")
    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(tiny_checkpoint), "--images", str(broken)])
    assert result.exit_code == 1 and f"FAILED {broken}/000000" in result.stdout
    assert f"{WILD_IMAGES - 1}" in result.stdout.splitlines()[1]
