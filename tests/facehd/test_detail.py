import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_close
from PIL import Image
from scipy.spatial.transform import Rotation

sys.path.insert(0, str(Path(__file__).parent))  # gt_factory.py lives beside the tests

from gt_factory import MM, make_model, make_scan, make_truth  # noqa: E402

from facehd.align import align_scan, aligned_face_points  # noqa: E402
from facehd.dataset import read_gt_maps  # noqa: E402
from facehd.detail import (  # noqa: E402
    GTMaps,
    _difference_matrix,
    compare_with_truth,
    deformation_correlation,
    detailed_surface,
    fit_gt_maps,
    uv_operators,
    write_gt_maps,
    write_preview,
)
from facehd.procrustes import Similarity  # noqa: E402
from facehd.uv import rasterize_attributes, sample_uv_map  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model"), resolution=48)[1]


@pytest.fixture(scope="module")
def truth(model):
    return make_truth(model, seed=11)


# --- the linear operators agree with facehd.uv -------------------------------------------------


def test_sampling_and_raster_matrices_match_the_uv_functions(model):
    ops = uv_operators(model)
    rng = np.random.default_rng(0)
    deformation = rng.normal(size=(3, 64, 64))
    expected = sample_uv_map(torch.as_tensor(deformation), model.uv.double()).numpy()
    assert_close(ops.sample @ deformation.reshape(3, -1).T, expected, atol=1e-12)
    values = rng.normal(size=(model.n_vertices, 3))
    maps, valid = rasterize_attributes(torch.as_tensor(values), model.uv.double(), model.faces, (256, 256))
    assert_close(ops.raster @ values, maps.numpy().reshape(3, -1).T, atol=1e-6)
    assert np.array_equal(ops.valid, valid.numpy())


def test_difference_matrix_is_the_naive_total_variation():
    grid = np.random.default_rng(1).normal(size=(5, 5))
    d = _difference_matrix(5) @ grid.ravel()
    naive = np.concatenate([(grid[1:, :] - grid[:-1, :]).ravel(), (grid[:, 1:] - grid[:, :-1]).ravel()])
    assert_close(d, naive, atol=1e-12)


def test_detailed_surface_is_the_shared_truth_definition(model, truth):
    """facehd.detail's surface equals the tests' independent step-by-step construction."""
    surface = detailed_surface(model, truth.coeffs, truth.deformation, truth.displacement)
    assert_close(surface.vertices[truth.valid.ravel()], truth.grid[truth.valid.ravel()], atol=1e-12)
    assert np.array_equal(surface.faces, truth.faces)


# --- fitting -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(model, truth):
    scan = make_scan(model, truth, np.random.default_rng(5))
    alignment = align_scan(scan.mesh.vertices, scan.landmarks7_mm, model, coeffs=truth.coeffs)
    points, labels = aligned_face_points(scan.mesh.vertices, alignment, model)
    maps = fit_gt_maps(model, truth.coeffs, points[labels.keep])
    return scan, alignment, maps


def truth_record(truth, scan) -> dict:
    return {"surface_vertices": truth.grid, "surface_faces": truth.faces, "displacement_map": truth.displacement,
            "deformation_map": truth.deformation, "scan_to_model": scan.scan_to_model.as_matrix()}


def test_gt_maps_recover_the_synthetic_truth(model, truth, fitted):
    """A noisy scan (0.07 mm along the normal, one vertex per texel, holes, spikes, 0.5 mm landmark
    noise): the fitted detailed surface lies within a few hundredths of a mm of the true one (the
    issue's bound is 0.1 mm RMS) and the displacement follows the true detail. The correlation is
    held to a looser bound than the issue's 0.9: this scanner's noise per texel (3.5 times the
    generator's default) is larger than the pores, which caps it; the issue's bound is tested on
    the generator's own scans below."""
    scan, alignment, maps = fitted
    result = compare_with_truth(model, maps, alignment.scan_to_model, truth_record(truth, scan))
    assert result.surface_rms_mm < 0.06
    assert result.displacement_corr > 0.55
    assert result.texels > 0.5 * 256 * 256
    # the residuals are the scanner noise, not misfit
    assert 0.04 < maps.residual_rms_mm < 0.09
    # the deformation map carries the mid-frequency shape: it is far from zero
    assert np.sqrt(np.mean(maps.deformation**2)) > 0.5 * MM
    # masks: the eye holes and the hair band are not trusted; everything trusted is in the layout
    eye = (slice(95, 100), slice(70, 80))  # texels in the right eye hole of SynthBFM's layout
    assert not maps.displacement_mask[0][eye].any()
    assert not (maps.displacement_mask & ~maps.displacement_valid).any()
    assert maps.deformation_mask.sum() > 0.4 * 64 * 64


def test_perfect_maps_compare_perfectly(model, truth, fitted):
    scan, _, maps = fitted
    perfect = GTMaps(truth.deformation, truth.displacement, maps.deformation_mask, maps.displacement_mask,
                     maps.deformation_valid, maps.displacement_valid, truth.coeffs, maps.residual_mm, 0.0, 0.0, 1)
    result = compare_with_truth(model, perfect, scan.scan_to_model, truth_record(truth, scan))
    assert result.surface_rms_mm < 1e-6
    assert result.displacement_corr == pytest.approx(1.0, abs=1e-6)
    assert result.displacement_corr_texel == pytest.approx(1.0, abs=1e-9)
    assert result.deformation_corr == pytest.approx(1.0, abs=1e-9)
    # the true offsets are turned into the fitted frame: a rotated alignment changes nothing
    turned = Similarity(1.0, Rotation.from_rotvec([0.0, 0.3, 0.1]).as_matrix(), np.zeros(3))
    rotated = dataclasses.replace(perfect, deformation=np.einsum("ij,jhw->ihw", turned.rotation, truth.deformation))
    record = truth_record(truth, scan)
    assert deformation_correlation(rotated, turned.compose(scan.scan_to_model), record) == pytest.approx(1.0, abs=1e-9)
    assert deformation_correlation(perfect, turned.compose(scan.scan_to_model), record) < 0.99
    # offsets the wrong way round anti-correlate
    negated = dataclasses.replace(perfect, deformation=-truth.deformation)
    assert compare_with_truth(model, negated, scan.scan_to_model, record).deformation_corr == pytest.approx(-1.0)


def test_written_maps_are_readable_by_the_dataset(tmp_path, fitted):
    _, _, maps = fitted
    folder = tmp_path / "S001" / "neutral" / "gt_maps"
    write_gt_maps(folder, {"cam0": maps, "cam4": maps}, {"inputs_digest": np.str_("x")})
    write_preview(folder / "preview.png", maps, "S001/neutral")
    read = read_gt_maps(folder.parent, ["cam0", "cam1", "cam4"])
    assert read["present"].tolist() == [True, False, True]
    assert_close(read["displacement"][2], maps.displacement.astype(np.float32), atol=0)
    assert_close(read["deformation_mask"][0], maps.deformation_mask.astype(np.float32), atol=0)
    with np.load(folder / "cam4.npz") as npz:
        assert str(npz["view"]) == "cam4" and npz["coeffs"].shape == (257,)
        assert float(npz["residual_rms_mm"]) == pytest.approx(maps.residual_rms_mm)
    with Image.open(folder / "preview.png") as image:
        assert image.size[0] > 2 * image.size[1]  # three panels side by side
    assert not list(folder.glob(".*part*"))  # no temporary files left behind


def test_one_fit_per_distinct_coefficient_file(monkeypatch, model, truth, tmp_path):
    """Maps live in model space: views sharing coefficients share one fit; per-image files
    (as the paper's base model gives) get a fit each."""
    import facehd.detail as detail
    from facehd.align import Alignment
    from facehd.procrustes import Similarity

    fits = []
    monkeypatch.setattr(detail, "fit_gt_maps", lambda model, coeffs, points, **kw: fits.append(coeffs) or len(fits))
    shared, own = tmp_path / "truth.npz", tmp_path / "cam1.npz"
    np.savez(shared, coeffs=truth.coeffs)
    np.savez(own, coeffs=truth.coeffs * 0.5)
    alignment = Alignment(Similarity(MM, np.eye(3), np.zeros(3)), truth.coeffs, "fit", np.zeros(7), 1.0, 0.1, 2.5)
    views = ["cam0", "cam1", "cam2"]
    out = detail._fit_views(model, alignment, np.zeros((10, 3)), views, {"cam0": shared, "cam1": own, "cam2": shared},
                            detail.GTMapOptions())
    assert [out[v][0] for v in views] == [1, 2, 1] and len(fits) == 2
    assert_close(fits[1], truth.coeffs * 0.5, atol=0)
    assert out["cam1"][1] == str(own)
    fitted = detail._fit_views(model, alignment, np.zeros((10, 3)), views, {}, detail.GTMapOptions())
    assert {v: m for v, (m, _) in fitted.items()} == {v: 3 for v in views} and fitted["cam0"][1] == "fit"


def test_smoothness_follows_the_noise_per_texel():
    """The noise-adapted smoothness weight depends on the noise of a texel's mean: one point of
    sigma per texel and four points of 2 sigma per texel get the same weight, SMOOTH_WEIGHT when
    that noise is SMOOTH_REFERENCE_MM."""
    from facehd import detail

    rng = np.random.default_rng(0)
    texels = 20_000
    weights = np.tile([0.6, 0.3, 0.1], (4 * texels, 1))  # the nearest corner is the first
    found = []
    for per_texel, sigma_mm in ((1, detail.SMOOTH_REFERENCE_MM), (4, 2 * detail.SMOOTH_REFERENCE_MM)):
        corners = np.repeat(np.arange(texels), per_texel)[:, None] + np.array([0, 1, 2]) * texels
        residuals = rng.normal(0.0, sigma_mm * MM, len(corners))
        found.append(detail._noise_adapted_weight(residuals, corners, weights[: len(corners)]))
    assert found == pytest.approx([detail.SMOOTH_WEIGHT] * 2, rel=0.05)


def test_bad_models_and_options_are_refused(model):
    import dataclasses

    from facehd.detail import GTMapOptions
    from facehd.errors import InputError

    with pytest.raises(InputError, match="no per-vertex UVs"):
        fit_gt_maps(dataclasses.replace(model, uv=None), np.zeros(257), np.zeros((10, 3)))
    with pytest.raises(InputError, match="one threshold per round"):
        GTMapOptions(deformation_distances_mm=(5.0, 2.0))


def test_gt_maps_on_the_generators_dataset(tmp_path):
    """End to end on `facehd synth facehd`'s output (a small model, the generator's default scanner):
    `facehd gt-maps` with the generator's truth as the coefficient files, measured against the
    truth it wrote, meets the issue's bounds: the detailed surface within 0.1 mm RMS of the true
    one (here ~0.01), the displacement correlating at least 0.9 with the true one (here ~0.94)."""
    from click.testing import CliRunner

    from facehd.cli import main
    from facehd.morphable import load_morphable_model
    from facehd.procrustes import Similarity
    from facehd.synth.bfm import write_synth_bfm
    from facehd.synth.facehd import SynthConfig, generate_facehd

    model_path = write_synth_bfm(tmp_path / "model.mat", 40, 0)
    root = tmp_path / "data"
    generate_facehd(SynthConfig(out=root, n_subjects=1, n_expressions=1, seed=3, image_size=32, model_path=model_path))
    out = tmp_path / "derived"
    result = CliRunner().invoke(main, ["gt-maps", str(root), "--out", str(out), "--model", str(model_path),
                                       "--coeffs", str(root / "_truth"), "--no-preview"])
    assert result.exit_code == 0, result.output
    with np.load(out / "S001" / "neutral" / "gt_maps" / "cam0.npz") as npz:
        maps = GTMaps(npz["deformation"].astype(np.float64), npz["displacement"].astype(np.float64),
                      npz["deformation_mask"].astype(bool), npz["displacement_mask"].astype(bool),
                      npz["deformation_valid"].astype(bool), npz["displacement_valid"].astype(bool),
                      npz["coeffs"], npz["residual_mm"], float(npz["residual_rms_mm"]),
                      float(npz["residual_p95_mm"]), int(npz["points_used"]))
        scan_to_model = Similarity.from_matrix(npz["scan_to_model"])
    truth = dict(np.load(root / "_truth" / "S001" / "neutral" / "truth.npz"))
    assert_close(maps.coeffs, truth["coeffs"], atol=0)
    model = load_morphable_model(model_path, dtype=torch.float64)
    comparison = compare_with_truth(model, maps, scan_to_model, truth)
    assert comparison.surface_rms_mm < 0.03
    assert comparison.displacement_corr > 0.9
