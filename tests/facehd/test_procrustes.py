import json

import numpy as np
import pytest
from helpers import assert_close
from scipy.spatial.transform import Rotation

from facehd.errors import InputError
from facehd.procrustes import (
    Similarity,
    check_landmark_fit,
    fit_rigid,
    fit_similarity,
    fit_similarity_norm_ratio,
    rms_residual,
)

# Seven face landmarks in mm (outer/inner eye corners, subnasale, mouth corners; DESIGN section 3
# order), roughly a real face: wide, tall, and shallow in depth.
FACE7_MM = np.array([
    [-45.0, 35.0, 0.0], [-15.0, 33.0, 4.0], [15.0, 33.0, 4.0], [45.0, 35.0, 0.0],
    [0.0, 0.0, 22.0], [-25.0, -30.0, 10.0], [25.0, -30.0, 10.0],
])
LEFT_RIGHT_SWAP = [3, 2, 1, 0, 4, 6, 5]


def random_similarity(seed: int, scale: float) -> Similarity:
    rng = np.random.default_rng(seed)
    rotation = Rotation.random(random_state=seed).as_matrix()
    return Similarity(scale, rotation, rng.normal(0.0, 2.0, 3))


def naive_similarity_apply(t: Similarity, points):
    return np.array([t.scale * t.rotation @ p + t.translation for p in points])


# --- the record -------------------------------------------------------------------------------------

def test_apply_inverse_compose_and_matrix():
    a, b = random_similarity(0, 0.5), random_similarity(1, 1.7)
    pts = np.random.default_rng(2).normal(size=(10, 3))
    assert_close(a.apply(pts), naive_similarity_apply(a, pts), atol=1e-12)
    assert_close(a.inverse().apply(a.apply(pts)), pts, atol=1e-12)
    assert_close(a.compose(b).apply(pts), a.apply(b.apply(pts)), atol=1e-12)
    assert_close(a.compose(b).as_matrix(), a.as_matrix() @ b.as_matrix(), atol=1e-12)
    homogeneous = np.column_stack([pts, np.ones(10)]) @ a.as_matrix().T
    assert_close(homogeneous[:, :3], a.apply(pts), atol=1e-12)
    back = Similarity.from_matrix(a.as_matrix())
    assert_close(back.scale, a.scale, atol=1e-12)
    assert_close(back.rotation, a.rotation, atol=1e-12)


def test_json_round_trip():
    a = random_similarity(3, 1.7)
    b = Similarity.from_dict(json.loads(json.dumps(a.to_dict())))
    assert b.scale == a.scale
    assert_close(b.rotation, a.rotation, atol=0)
    assert_close(b.translation, a.translation, atol=0)
    with pytest.raises(InputError, match="similarity record"):
        Similarity.from_dict({"scale": 1.0})


@pytest.mark.parametrize(
    "scale, rotation, translation, match",
    [
        (0.0, np.eye(3), np.zeros(3), "scale"),
        (np.nan, np.eye(3), np.zeros(3), "scale"),
        (1.0, 2 * np.eye(3), np.zeros(3), "orthonormal"),
        (1.0, np.eye(3), np.zeros(2), "translation"),
    ],
)
def test_invalid_similarity_raises(scale, rotation, translation, match):
    with pytest.raises(InputError, match=match):
        Similarity(scale, rotation, translation)


# --- Umeyama ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [0.5, 1.7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_known_similarity(scale, seed):
    truth = random_similarity(seed, scale)
    src = np.random.default_rng(seed + 10).normal(size=(30, 3))
    dst = truth.apply(src)
    fit = fit_similarity(src, dst)
    assert_close(fit.scale, scale, atol=1e-12)
    assert_close(fit.rotation, truth.rotation, atol=1e-12)
    assert_close(fit.translation, truth.translation, atol=1e-12)
    # with noise: still close, and no worse than the truth in least squares
    noisy = dst + np.random.default_rng(seed + 20).normal(0.0, 0.01, dst.shape)
    fit = fit_similarity(src, noisy)
    assert abs(fit.scale - scale) < 0.01 * scale
    assert np.degrees(Rotation.from_matrix(fit.rotation @ truth.rotation.T).magnitude()) < 1.0
    assert rms_residual(fit, src, noisy) <= rms_residual(truth, src, noisy)


def test_rigid_matches_scipy_kabsch():
    rng = np.random.default_rng(5)
    src = rng.normal(size=(20, 3))
    dst = random_similarity(5, 1.0).apply(src) + rng.normal(0, 0.05, (20, 3))
    weights = rng.uniform(0.1, 1.0, 20)
    fit = fit_rigid(src, dst, weights)
    assert fit.scale == 1.0
    mu_s, mu_d = np.average(src, 0, weights), np.average(dst, 0, weights)
    rot, _ = Rotation.align_vectors(dst - mu_d, src - mu_s, weights=weights)
    assert_close(fit.rotation, rot.as_matrix(), atol=1e-9)
    assert_close(fit.translation, mu_d - rot.as_matrix() @ mu_s, atol=1e-9)


def test_reflection_trap_still_returns_a_rotation():
    src = np.random.default_rng(6).normal(size=(15, 3))
    mirrored = random_similarity(6, 1.3).apply(src * np.array([-1.0, 1.0, 1.0]))
    fit = fit_similarity(src, mirrored)
    assert np.isclose(np.linalg.det(fit.rotation), 1.0)
    free = fit_similarity(src, mirrored, allow_reflection=True)
    assert np.isclose(np.linalg.det(free.rotation), -1.0)
    assert rms_residual(free, src, mirrored) < 1e-12 < rms_residual(fit, src, mirrored)


def test_weights_ignore_outliers_and_equal_repetition():
    truth = random_similarity(7, 0.8)
    src = np.random.default_rng(7).normal(size=(12, 3))
    dst = truth.apply(src)
    dst[:3] += 5.0  # outliers that weight 0 must remove
    weights = np.r_[np.zeros(3), np.ones(9)]
    fit = fit_similarity(src, dst, weights)
    assert_close(fit.as_matrix(), truth.as_matrix(), atol=1e-12)
    # integer weights act like repeating rows
    w = np.arange(1, 13)
    rep = np.repeat(np.arange(12), w)
    assert_close(fit_similarity(src, dst, w).as_matrix(), fit_similarity(src[rep], dst[rep]).as_matrix(), atol=1e-12)


@pytest.mark.parametrize(
    "src, match",
    [
        (np.ones((5, 3)), "coincident or collinear"),
        (np.outer(np.arange(5.0), [1.0, 2.0, 3.0]), "coincident or collinear"),
        (np.zeros((0, 3)), "empty"),
        (np.array([[np.nan, 0, 0], [1, 0, 0], [0, 1, 0]]), "NaN"),
    ],
)
def test_fit_rejects_degenerate_input(src, match):
    with pytest.raises(InputError, match=match):
        fit_similarity(src, src + 1.0)


def test_fit_rejects_bad_pairs_and_weights():
    src = np.random.default_rng(8).normal(size=(5, 3))
    with pytest.raises(InputError, match="one to one"):
        fit_similarity(src, src[:4])
    with pytest.raises(InputError, match="weights"):
        fit_similarity(src, src, -np.ones(5))


# --- landmark checks -------------------------------------------------------------------------------

def test_good_landmarks_pass():
    truth = Similarity(0.01, Rotation.from_euler("xyz", [5, -20, 3], degrees=True).as_matrix(), [0.1, 0.0, -0.2])
    dst = truth.apply(FACE7_MM) + np.random.default_rng(9).normal(0, 0.002, (7, 3))  # 0.2 mm noise
    fit = check_landmark_fit(FACE7_MM, dst, max_rms=0.01)
    assert abs(fit.transform.scale - 0.01) < 2e-4
    assert fit.rms < 0.005 and fit.residuals.shape == (7,)


def test_mirrored_landmarks_raise():
    dst = random_similarity(10, 0.01).apply(FACE7_MM)[LEFT_RIGHT_SWAP]
    with pytest.raises(InputError, match="mirror") as err:
        check_landmark_fit(FACE7_MM, dst, source="subj01/landmarks7.txt")
    assert "subj01/landmarks7.txt" in str(err.value)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.tile(FACE7_MM[:1], (7, 1)), "coincide"),
        (np.outer(np.linspace(-1, 1, 7), [40.0, 5.0, 1.0]) + np.random.default_rng(0).normal(0, 0.1, (7, 3)),
         "collinear"),
    ],
)
def test_degenerate_landmarks_raise(bad, match):
    with pytest.raises(InputError, match=f"degenerate source landmarks.*{match}"):
        check_landmark_fit(bad, FACE7_MM)
    with pytest.raises(InputError, match=f"degenerate target landmarks.*{match}"):
        check_landmark_fit(FACE7_MM, bad)


def test_large_residual_raises():
    dst = FACE7_MM.copy()
    dst[4] += [0.0, 0.0, 15.0]  # a misplaced subnasale
    with pytest.raises(InputError, match="RMS residual .* exceeds the limit"):
        check_landmark_fit(FACE7_MM, dst, max_rms=1.0)
    with pytest.raises(InputError, match="differ in size"):
        check_landmark_fit(FACE7_MM, dst[:5])


# --- menpo's AlignmentSimilarity (scale = ratio of the centred sets' Frobenius norms) --------------

def naive_norm_ratio_similarity(src, dst):
    """Step by step as menpo composes it: centre, scale to the target's norm, Kabsch, translate."""
    c_src = sum(src) / len(src)
    c_dst = sum(dst) / len(dst)
    x = [p - c_src for p in src]
    y = [q - c_dst for q in dst]
    scale = np.sqrt(sum(float(q @ q) for q in y)) / np.sqrt(sum(float(p @ p) for p in x))
    correlation = sum(np.outer(q, scale * p) for p, q in zip(x, y))
    u, _, vt = np.linalg.svd(correlation)
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:
        rotation = u @ np.diag([1.0, 1.0, -1.0]) @ vt
    return scale, rotation, c_dst - scale * rotation @ c_src


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_norm_ratio_similarity_matches_a_naive_version(seed):
    rng = np.random.default_rng(seed)
    src = rng.normal(size=(40, 3)) * [3.0, 2.0, 0.5]
    dst = random_similarity(seed + 10, 1.3).apply(src) + rng.normal(0.0, 0.4, src.shape)
    fit = fit_similarity_norm_ratio(src, dst)
    scale, rotation, translation = naive_norm_ratio_similarity(list(src), list(dst))
    assert fit.scale == pytest.approx(scale, rel=1e-12)
    assert_close(fit.rotation, rotation, atol=1e-12)
    assert_close(fit.translation, translation, atol=1e-10)
    # not Umeyama's: with noise the norm ratio is larger than the least-squares scale (Cauchy-Schwarz)
    assert fit.scale > fit_similarity(src, dst).scale * (1 + 1e-3)


def test_norm_ratio_similarity_recovers_an_exact_similarity_without_reflection():
    truth = random_similarity(3, 0.01)
    fit = fit_similarity_norm_ratio(FACE7_MM, truth.apply(FACE7_MM))
    assert fit.scale == pytest.approx(0.01, rel=1e-12)
    assert_close(fit.rotation, truth.rotation, atol=1e-10)
    mirrored = fit_similarity_norm_ratio(FACE7_MM, FACE7_MM * [-1.0, 1.0, 1.0])
    assert np.linalg.det(mirrored.rotation) == pytest.approx(1.0)
    with pytest.raises(InputError, match="collinear"):
        fit_similarity_norm_ratio(np.outer(np.arange(5.0), [1.0, 2.0, 3.0]), FACE7_MM[:5])
