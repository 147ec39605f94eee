"""GANFit's released MICC rules (the default protocol), each against a naive step-by-step version
on a small SynthBFM face: menpo's crop, the loop that returns its last distance, the GT crop centre,
float64 closest points and the safety net."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close

from benchmarks import micc
from facehd.distance import SurfaceIndex, _closest_on_triangles
from facehd.icp import similarity_icp

RESOLUTION = 16  # 272 vertices, 480 triangles: the naive versions stay fast
RADIUS_MM = 80.0  # crops part of the face (the synthetic face spans ~ +-110 mm)
TOL_MM = micc.ICP_TOL_MM


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    from facehd.synth.bfm import write_synth_bfm

    return micc.load_template(write_synth_bfm(tmp_path_factory.mktemp("tpl") / "m.mat", resolution=RESOLUTION))


def bumped(template, seed: int) -> np.ndarray:
    """The template with noise and a random bump, template units."""
    v = template.vertices
    rng = np.random.default_rng(seed)
    b = v + rng.normal(0, 0.01, v.shape)
    bump = np.exp(-np.sum((v[:, :2] - rng.uniform(-0.4, 0.4, 2)) ** 2, axis=1) / (2 * 0.1**2))
    b[:, 2] += rng.uniform(0.02, 0.08) * bump
    return b


# --- naive versions ------------------------------------------------------------------------------

def naive_norm_ratio_apply(src, dst):
    """menpo's AlignmentSimilarity of src onto dst, applied to src, one point at a time."""
    c_src, c_dst = src.mean(axis=0), dst.mean(axis=0)
    x, y = src - c_src, dst - c_dst
    scale = np.sqrt((y**2).sum()) / np.sqrt((x**2).sum())
    u, _, vt = np.linalg.svd(sum(np.outer(q, p) for p, q in zip(x, y)))
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:
        rotation = u @ np.diag([1.0, 1.0, -1.0]) @ vt
    return np.array([scale * rotation @ (p - c_src) + c_dst for p in src])


def naive_closest(points, vertices, faces):
    """Closest points on the triangles by trying every triangle, float64."""
    best_d, best_q = np.full(len(points), np.inf), np.zeros_like(points)
    for f in faces:
        tri = np.broadcast_to(vertices[f], (len(points), 3, 3))
        q = np.einsum("pk,pkd->pd", _closest_on_triangles(points, tri[:, 0], tri[:, 1], tri[:, 2]), tri)
        d = np.linalg.norm(points - q, axis=1)
        better = d < best_d
        best_d[better], best_q[better] = d[better], q[better]
    return best_q, best_d


def naive_crop(a, faces, center, radius):
    inside = [np.linalg.norm(v - center) < radius for v in a]
    return sorted({int(i) for f in faces if all(inside[i] for i in f) for i in f})


def naive_released(a, b, faces, center, radius, tol):
    """f(A, B) by the released rule: (crop indices, the mean after each step (d0 first), last distances)."""
    kept = naive_crop(a, faces, center, radius)
    current, corr = a[kept], b[kept]
    previous = np.linalg.norm(current - corr, axis=1).mean()
    history = [previous]
    while True:
        current = naive_norm_ratio_apply(current, corr)
        corr, d = naive_closest(current, b, faces)
        history.append(d.mean())
        if not previous - d.mean() > tol:
            return kept, history, d
        previous = d.mean()


# --- the rules -----------------------------------------------------------------------------------

def test_crop_is_strictly_inside_and_keeps_only_whole_triangles(template):
    v, faces = template.vertices, template.faces
    center = v[template.nose_tip]
    radius_mm = float(np.linalg.norm(v[5] - center)) * template.mm_per_unit  # vertex 5 lies exactly on it
    mask = micc.released_crop_mask(v, faces, center, radius_mm, template.mm_per_unit)
    assert np.nonzero(mask)[0].tolist() == naive_crop(v, faces, center, radius_mm / template.mm_per_unit)
    assert not mask[5]
    # a radius between two vertex distances where an inside vertex belongs to no whole triangle
    distances = np.sort(np.linalg.norm(v - center, axis=1))
    for radius in (distances[:-1] + distances[1:]) / 2:
        whole = naive_crop(v, faces, center, radius)
        if len(whole) >= 3 and len(whole) < int((distances < radius).sum()):
            break
    mask = micc.released_crop_mask(v, faces, center, radius * template.mm_per_unit, template.mm_per_unit)
    assert np.nonzero(mask)[0].tolist() == whole and mask.sum() < (distances < radius).sum()
    with pytest.raises(micc.InputError, match="empty crop"):
        micc.released_crop_mask(v, faces, center, 0.1, template.mm_per_unit)


@pytest.mark.parametrize("seed", [1, 16, 36])
def test_released_loop_matches_the_naive_one(template, seed):
    v, faces, per = template.vertices, template.faces, template.mm_per_unit
    b = bumped(template, seed)
    center = v[template.nose_tip] + [0.01, -0.02, 0.0]
    kept, history, last = naive_released(v, b, faces, center, RADIUS_MM / per, TOL_MM / per)
    got = micc.released_aligned_distance(v, b, faces, center=center, radius_mm=RADIUS_MM, mm_per_unit=per)
    assert np.nonzero(np.isfinite(got.vertex_mm))[0].tolist() == kept
    assert got.iterations == len(history) - 1 and not got.safety_net
    assert got.mean_mm == pytest.approx(history[-1] * per, rel=1e-9)
    assert_close(got.vertex_mm[kept], last * per, atol=1e-9)


def test_the_last_distance_is_returned_even_when_the_last_step_made_it_worse(template):
    v, faces, per = template.vertices, template.faces, template.mm_per_unit
    b = bumped(template, 16)  # found by search: the second step raises the mean by ~0.002 mm
    center = v[template.nose_tip] + [0.01, -0.02, 0.0]
    _, history, _ = naive_released(v, b, faces, center, RADIUS_MM / per, TOL_MM / per)
    assert history[-1] > history[-2]
    got = micc.released_aligned_distance(v, b, faces, center=center, radius_mm=RADIUS_MM, mm_per_unit=per)
    assert got.mean_mm == pytest.approx(history[-1] * per, rel=1e-9) and got.mean_mm > history[-2] * per
    # the robust loop keeps the better iterate instead
    mask = np.isfinite(got.vertex_mm)
    robust = similarity_icp(v, mask, b, faces, init_correspondences=b, tol=TOL_MM / per)
    assert robust.distances[mask].mean() * per < got.mean_mm


def test_the_safety_net_is_reported(template):
    v, faces, per = template.vertices, template.faces, template.mm_per_unit
    b = bumped(template, 36)  # needs three steps
    got = micc.released_aligned_distance(v, b, faces, center=v[template.nose_tip], radius_mm=RADIUS_MM,
                                         mm_per_unit=per, max_iter=1)
    assert got.safety_net and got.iterations == 1


def test_the_ground_truth_crop_is_centred_on_the_scans_own_nose_landmark(template):
    v, faces, per = template.vertices, template.faces, template.mm_per_unit
    b = bumped(template, 3)
    nose = v[template.nose_tip] + [0.0, 0.15, 0.0]  # the scan's landmark 30, 15 mm above the keypoint
    kw = dict(nose_index=template.nose_tip, radius_mm=RADIUS_MM, mm_per_unit=per)
    score = micc.micc_score(v, b, faces, gt_center=nose, **kw)
    forward = micc.released_aligned_distance(v, b, faces, center=nose, radius_mm=RADIUS_MM, mm_per_unit=per)
    backward = micc.released_aligned_distance(b, v, faces, center=b[template.nose_tip], radius_mm=RADIUS_MM,
                                              mm_per_unit=per)
    assert score.gt_to_pred_mm == forward.mean_mm and score.pred_to_gt_mm == backward.mean_mm
    at_keypoint = micc.micc_score(v, b, faces, **kw)
    assert abs(at_keypoint.gt_to_pred_mm - score.gt_to_pred_mm) > 1e-3
    assert at_keypoint.pred_to_gt_mm == score.pred_to_gt_mm


def test_exact_closest_points_are_the_float64_closest_triangle(template):
    v, faces = template.vertices + [3.0, -2.0, 5.0], template.faces  # away from the origin
    rng = np.random.default_rng(0)
    points = v + rng.normal(0, 0.05, v.shape)
    index = SurfaceIndex(v, faces)
    exact, fast = index.closest(points, exact=True), index.closest(points)
    _, truth = naive_closest(points, v, faces)
    assert_close(exact.distances, truth, atol=1e-15)
    assert (exact.distances <= fast.distances).all()
    # the float32 choice is never farther than the slack the released loop's stop test allows for
    assert (fast.distances - exact.distances <= index.choice_slack(points)).all()
    assert index.choice_slack(points) < 1e-4 * np.abs(v).max()  # a few float32 ulps, not a loose bound
    assert_close(np.einsum("pk,pkd->pd", exact.barycentric, v[faces[exact.face_index]]), exact.points, atol=1e-12)
