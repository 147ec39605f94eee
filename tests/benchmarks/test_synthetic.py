"""Synthetic benchmark subjects, reference predictions and the cached synthetic MICC set."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from helpers import assert_close

from benchmarks import synthetic as syn
from benchmarks.micc import micc_score
from facehd.errors import InputError
from facehd.morphable import load_morphable_model
from facehd.synth.bfm import write_synth_bfm

RESOLUTION = 28  # small SynthBFM: ~800 vertices


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_synth_bfm(tmp_path_factory.mktemp("model") / "synth.mat", resolution=RESOLUTION, seed=0)
    return load_morphable_model(path)


def _digest(root) -> dict[str, str]:
    """File hashes; the .mat header holds its creation time, so the model is compared by content."""
    digest = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".mat"}
    model = load_morphable_model(syn.SyntheticMicc(root).template)
    digest["model"] = hashlib.sha256(model.mean_shape.numpy().tobytes() + model.id_base.numpy().tobytes()).hexdigest()
    return digest


def test_subdivide_midpoint_keeps_vertices_and_winding():
    vertices = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])
    faces = np.array([[0, 1, 2], [1, 3, 2]])
    dense, dense_faces, edges = syn.subdivide_midpoint(vertices, faces)
    assert len(edges) == 5 and len(dense) == 4 + 5 and len(dense_faces) == 8
    assert_close(dense[:4], vertices, atol=0)
    assert_close(dense[4:], vertices[edges].mean(axis=1), atol=0)
    corners = dense[dense_faces]
    cross = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    assert (cross[:, 2] > 0).all()  # the input's counter-clockwise winding is kept
    assert_close(0.5 * np.abs(cross[:, 2]).sum(), 1.0)  # same area


def test_make_subject_is_deterministic_and_in_mm(model):
    a, b = syn.make_subject(model, 3, seed=5), syn.make_subject(model, 3, seed=5)
    assert_close(a.scan_vertices_mm, b.scan_vertices_mm, atol=0)
    assert_close(a.id_coeff, b.id_coeff, atol=0)
    other = syn.make_subject(model, 4, seed=5)
    assert np.abs(other.id_coeff - a.id_coeff).max() > 0.1
    n = model.n_vertices
    assert len(a.scan_vertices_mm) > 3 * n and len(a.scan_faces) == 4 * model.n_faces  # one subdivision
    extent = np.ptp(a.scan_vertices_mm, axis=0)
    assert 100 < extent[0] < 220 and 150 < extent[1] < 300  # a face in millimetres
    assert_close(a.scan_landmarks_mm, a.scan_vertices_mm[model.keypoints.numpy()], atol=0)
    # the scan's first N vertices are the truth at the model vertices, plus sub-millimetre detail
    detail = np.linalg.norm(a.scan_vertices_mm[:n] - 100 * a.truth_model, axis=1)
    assert detail.max() < 1.0 and detail.mean() > 0.005
    assert a.name == "subject_03"


def test_mid_frequency_shape_lies_outside_the_3dmm_span(model):
    subject = syn.make_subject(model, 1)
    mid = subject.mid_model.reshape(-1)
    basis = np.concatenate([model.id_base.double().numpy(), model.exp_base.double().numpy()], axis=1)
    coeffs, *_ = np.linalg.lstsq(basis, mid, rcond=None)
    residual = np.linalg.norm(mid - basis @ coeffs) / np.linalg.norm(mid)
    assert residual > 0.5, f"only {residual:.0%} of the mid-frequency field is outside the 3DMM span"
    rms_mm = 100 * np.sqrt(np.mean(np.sum(subject.mid_model ** 2, axis=1)))
    assert 0.2 < rms_mm < 3.0


def test_posed_scan_moves_scan_and_landmarks_together(model):
    subject = syn.make_subject(model, 2)
    capture = syn.posed_scan(subject, np.random.default_rng(0), noise_mm=0.0, landmark_noise_mm=0.0)
    assert_close(capture.vertices_mm, capture.canonical_to_scan.apply(subject.scan_vertices_mm), atol=1e-9)
    assert_close(capture.landmarks_mm, capture.canonical_to_scan.apply(subject.scan_landmarks_mm), atol=1e-9)
    assert capture.canonical_to_scan.scale == 1.0


def test_reference_predictions_are_model_units_on_the_topology_and_rank(model):
    subject = syn.make_subject(model, 1)
    faces = model.faces.numpy()
    nose = int(model.keypoints[30])
    scores = {}
    for method in syn.REFERENCE_METHODS:
        vertices, pred_faces = syn.predict_reference(model, subject, method, np.random.default_rng(0))
        assert vertices.shape == (model.n_vertices, 3)
        assert np.array_equal(pred_faces, faces)
        assert 0.3 < np.ptp(vertices[:, 1]) < 3.0  # model units (1 unit = 100 mm), not mm
        scores[method] = micc_score(subject.truth_model, vertices, faces, nose_index=nose).score_mm
    assert scores["truth-noise"] < 0.6 * scores["landmark-3dmm"] < 0.6 * scores["mean-face"], scores
    with pytest.raises(InputError, match="unknown reference method"):
        syn.predict_reference(model, subject, "oracle", np.random.default_rng(0))


def test_landmark_fit_recovers_coefficients_from_clean_landmarks(model):
    subject = syn.make_subject(model, 6)
    kp = model.keypoints.numpy()
    id_coeff, exp_coeff = syn.fit_landmarks_3dmm(model, subject.shape_model[kp], noise_mm=0.01)
    fitted = syn.model_shape(model, id_coeff, exp_coeff)
    assert 100 * np.abs(fitted[kp] - subject.shape_model[kp]).max() < 0.05  # mm at the landmarks


def test_synthetic_cache_is_deterministic_and_keyed(tmp_path, monkeypatch):
    kwargs = dict(n_subjects=2, resolution=20)
    first = syn.ensure_synthetic_micc(tmp_path / "a", **kwargs)
    layout = syn.SyntheticMicc(first)
    files = _digest(first)
    names = set(files)
    for subject in ("subject_01", "subject_02"):
        for scan in syn.MICC_SCANS:
            assert f"MICC/{subject}/Model/{scan}/obj/{subject}_{scan}.obj" in names
            assert f"MICC/{subject}/Model/{scan}/obj/{subject}_{scan}_landmarks.txt" in names
        for method in syn.REFERENCE_METHODS:
            for setting in syn.MICC_SETTING_DIRS:
                assert f"predictions/{method}/{subject}/{setting}.obj" in names
    assert layout.template.is_file() and layout.gt_dir.is_dir()

    stamp = layout.manifest.stat().st_mtime_ns
    assert syn.ensure_synthetic_micc(tmp_path / "a", **kwargs) == first
    assert layout.manifest.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert _digest(syn.ensure_synthetic_micc(tmp_path / "b", **kwargs)) == files  # deterministic

    key = json.loads(layout.manifest.read_text())["key"]
    syn.ensure_synthetic_micc(tmp_path / "a", seed=1, **kwargs)  # another seed: regenerated
    assert json.loads(layout.manifest.read_text())["key"] != key
    assert _digest(first) != files
    monkeypatch.setattr(syn, "SYNTH_VERSION", syn.SYNTH_VERSION + 1)  # a changed generator too
    syn.ensure_synthetic_micc(tmp_path / "a", seed=1, **kwargs)
    assert json.loads(layout.manifest.read_text())["parameters"]["version"] == syn.SYNTH_VERSION
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_cache_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a synthetic MICC cache"):
        syn.ensure_synthetic_micc(tmp_path, n_subjects=1, resolution=20)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_default_cache_root_respects_facehd_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FACEHD_CACHE", str(tmp_path))
    assert syn.default_cache_root() == tmp_path
    monkeypatch.delenv("FACEHD_CACHE")
    assert syn.default_cache_root().parts[-2:] == (".cache", "facehd")
