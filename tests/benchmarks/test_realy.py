"""REALY protocol (benchmarks.realy): naive ports of REALY's own code, invariances, errors, IO, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from functools import lru_cache

import numpy as np
import pandas as pd
import pytest
import scipy.sparse
import scipy.sparse.linalg
import scipy.spatial
from click.testing import CliRunner
from helpers import assert_close
from scipy.spatial.transform import Rotation

from benchmarks import realy
from benchmarks.cli_realy import realy_command
from benchmarks.synthetic_realy import ensure_synthetic_realy, synthetic_case
from facehd.distance import SurfaceIndex
from facehd.errors import FileFormatError, InputError
from facehd.io import Mesh, save_mesh

ZERO_MM = 1e-5  # "identical meshes give 0": every region error below this


@lru_cache(maxsize=1)
def case():
    """SynthBFM at resolution 40 (1,640 vertices; GT regions 42 / 73 / 371 / 348 vertices)."""
    return synthetic_case(40)


def evaluate(vertices, faces=None, subject=None, template=None):
    c = case()
    return realy.evaluate_prediction(vertices, c.faces if faces is None else faces, subject or c.subject,
                                     template or c.template)


# --- naive ports of REALY's code (utils/util.py fit_icp_RT, utils/rICP.py, utils/NICP.py) ------------

def naive_fit_icp_rt(source, target, with_scale=True):
    source, target = source.T, target.T  # REALY works on 3 x N
    npoint = source.shape[1]
    s1 = source - np.tile(np.mean(source, 1), (npoint, 1)).T
    t1 = target - np.tile(np.mean(target, 1), (npoint, 1)).T
    u, _, v = np.linalg.svd(t1.dot(s1.T))
    rotation = u.dot(v)
    scale = np.sum(np.sum(abs(t1))) / np.sum(np.sum(abs(rotation.dot(s1)))) if with_scale else 1.0
    translation = np.mean(target - scale * rotation.dot(source), 1)
    return scale, rotation, translation


def naive_ricp(pred_vertices, faces, gt_vertices, pred_kp, gt_kp, region, max_iteration=100):
    """REALY's region_icp_one_region, moving the prediction and rebuilding its surface each time."""
    rate = len(gt_vertices) / len(gt_kp) / (4 if region == "cheek" else 1)
    kp_corr = np.vstack([pred_kp] * int(rate))
    gt_kp_corr = np.vstack([gt_kp] * int(rate))
    error_pre, cur_iter = 0.0, 0
    while True:
        on_pred = SurfaceIndex(pred_vertices, faces).closest(gt_vertices).points
        pred_corr = np.vstack([on_pred, kp_corr])
        gt_corr = np.vstack([gt_vertices, gt_kp_corr])
        _, r, t = naive_fit_icp_rt(pred_corr, gt_corr, with_scale=False)
        error = np.sum((pred_corr @ r.T + t - gt_corr) ** 2, axis=1).mean()
        if abs(error - error_pre) < 1e-6 or cur_iter >= max_iteration:
            break
        cur_iter += 1
        error_pre = error
        pred_vertices = pred_vertices @ r.T + t
        kp_corr = kp_corr @ r.T + t
    return pred_vertices, cur_iter


def naive_nicp(src, dst, tri, kp_idx=None, kp_tgt=None):
    """REALY's nICP_with(out)_keypoints with scipy's spsolve on A^T A instead of CHOLMOD."""
    def solve(a, b):
        a = a.tocsc()
        return scipy.sparse.linalg.spsolve((a.T @ a).tocsc(), np.asarray(a.T @ b))

    pairs = {tuple(sorted(p)) for f in tri for p in ((f[0], f[1]), (f[0], f[2]), (f[1], f[2]))}
    pairs = np.array(sorted(pairs))
    e = len(pairs)
    m = scipy.sparse.csc_matrix((np.r_[np.ones(e), -np.ones(e)], (np.r_[np.arange(e), np.arange(e)],
                                 np.r_[pairs[:, 0], pairs[:, 1]])), shape=(e, len(src)))
    a1, a1_kp = scipy.sparse.kron(m, np.eye(4)), scipy.sparse.kron(m, np.diag([2.0, 2.0, 3.0, 2.0]))
    b1 = np.zeros((a1.shape[0], 3))
    tree = scipy.spatial.KDTree(dst)
    cur, cur_x = src, np.zeros((4 * len(src), 3))
    x = np.ones_like(cur_x)
    count = 0
    with_kp = kp_idx is not None
    for decay in range(4 if with_kp else 3):
        alpha = (150.0 if decay == 0 else 50 * np.exp(-0.5 * (decay - 1))) if with_kp else 50 * np.exp(-0.5 * decay)
        epsilon = 0.5 ** (decay - 1) if with_kp else 0.5**decay
        step = 0
        while not (np.linalg.norm(x - cur_x) <= epsilon or (with_kp and step > 10)):
            cur_x = x.copy()
            d, i = tree.query(cur)
            n = len(cur)
            dm = scipy.sparse.csc_matrix((np.c_[cur, np.ones(n)].ravel(), (np.repeat(np.arange(n), 4),
                                          np.arange(4 * n))), shape=(n, 4 * n))
            w = (d < max(2 * d.mean(), 1)).astype(float)
            a2, b2 = dm.multiply(w[:, None]), dst[i] * w[:, None]
            if not with_kp:
                a, b = scipy.sparse.vstack([a1 * alpha, a2]), np.vstack([b1, b2])
            else:
                kw = np.zeros((n, 1))
                kw[kp_idx] = 50.0 if decay == 0 else 50.0 * np.exp(-0.9 * count) / 10
                tgt = dst[i].copy()
                tgt[kp_idx] = kp_tgt
                a3, b3 = dm.multiply(kw), tgt * kw
                if decay == 0:
                    a, b = scipy.sparse.vstack([a1_kp * alpha, a3]), np.vstack([b1, b3])
                else:
                    a, b = scipy.sparse.vstack([a1 * alpha, a2, a3]), np.vstack([b1, b2, b3])
            x = solve(a, b)
            cur = dm @ x
            step += 1
            count += 1
            if with_kp and decay == 0:
                break
    return cur


# --- gICP ---------------------------------------------------------------------------------------

def test_fit_icp_rt_matches_naive_and_keeps_reflections():
    rng = np.random.default_rng(1)
    src = rng.normal(size=(7, 3))
    rot = Rotation.random(random_state=2).as_matrix()
    dst = 1.7 * src @ rot.T + [1.0, -2.0, 0.5] + rng.normal(scale=0.05, size=(7, 3))
    mirrored = dst * [-1.0, 1.0, 1.0]  # left/right swapped: the best orthogonal fit is a reflection
    for target in (dst, mirrored):
        fit = realy.fit_icp_rt(src, target)
        scale, rotation, translation = naive_fit_icp_rt(src, target)
        assert_close(fit.scale, scale, atol=1e-12)
        assert_close(fit.rotation, rotation, atol=1e-12)
        assert_close(fit.translation, translation, atol=1e-12)
    assert realy.fit_icp_rt(src, mirrored).reflection  # no det fix, as in REALY
    assert not realy.fit_icp_rt(src, dst).reflection


def test_gicp_scale_is_the_l1_ratio_not_umeyama():
    rng = np.random.default_rng(3)
    src = rng.normal(size=(7, 3))
    dst = 2.0 * src + rng.normal(scale=0.3, size=(7, 3))
    fit = realy.fit_icp_rt(src, dst)
    s1, t1 = src - src.mean(0), dst - dst.mean(0)
    assert_close(fit.scale, np.abs(t1).sum() / np.abs(s1 @ fit.rotation.T).sum(), atol=1e-12)
    _, d, _ = np.linalg.svd(t1.T @ s1)
    assert abs(fit.scale - d.sum() / np.sum(s1**2)) > 1e-3  # Umeyama's scale differs on noisy points


# --- rICP ---------------------------------------------------------------------------------------

def test_keypoint_repetitions_cheek_quarter():
    assert realy.keypoint_repetitions(100, 11, "nose") == 9
    assert realy.keypoint_repetitions(1000, 27, "cheek") == 9  # int(1000 / 27 / 4)
    assert realy.keypoint_repetitions(1000, 27, "forehead") == 37
    assert realy.keypoint_repetitions(107, 27, "cheek") == 0


def test_ricp_matches_naive_loop_and_stop_rule():
    c = case()
    rng = np.random.default_rng(4)
    pred = c.vertices * 100.0 / 9.0 + rng.normal(scale=0.02, size=c.vertices.shape)  # GT units, noisy
    pred = pred @ Rotation.from_euler("xyz", [2, -3, 1], degrees=True).as_matrix().T + [0.1, 0.05, -0.1]
    kp = c.template.points(pred)
    for region in ("nose", "cheek"):
        ids = list(realy.RICP_KEYPOINTS[region])
        gt = c.subject.regions[region].vertices
        icp = realy.region_icp(SurfaceIndex(pred, c.faces), gt, kp[ids], c.subject.keypoints[ids], region)
        moved, iterations = naive_ricp(pred, c.faces, gt, kp[ids], c.subject.keypoints[ids], region)
        assert icp.iterations == iterations == len(icp.mse) - 1
        # open3d picks the closest triangle in float32 (~1e-6 of the mesh size), moved or not
        assert_close(icp.transform.apply(pred), moved, atol=1e-4)
        steps = np.abs(np.diff((0.0,) + icp.mse))
        assert steps[-1] < realy.RICP_MSE_TOLERANCE and (steps[:-1] >= realy.RICP_MSE_TOLERANCE).all()
        assert icp.repetitions == realy.keypoint_repetitions(len(gt), len(ids), region)
    capped = realy.region_icp(SurfaceIndex(pred, c.faces), gt, kp[ids], c.subject.keypoints[ids], "cheek",
                              max_iterations=1)
    moved, _ = naive_ricp(pred, c.faces, gt, kp[ids], c.subject.keypoints[ids], "cheek", max_iteration=1)
    assert capped.iterations == 1 and len(capped.mse) == 2  # the second transform is computed, not applied
    assert_close(capped.transform.apply(pred), moved, atol=1e-4)


# --- bICP ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("region", ["nose", "cheek"])
def test_nicp_matches_naive_port(region):
    c = case()
    gt = c.subject.regions[region]
    rng = np.random.default_rng(5)
    targets = gt.vertices + 0.05 * np.sin(gt.vertices[:, [1, 2, 0]]) + rng.normal(scale=0.01, size=gt.vertices.shape)
    kp_idx = kp_tgt = None
    if region != "cheek":
        kp_idx = rng.choice(len(gt.vertices), 9, replace=False)
        kp_tgt = targets[kp_idx] + 0.05
    result = realy.realy_nicp(gt, targets, keypoint_index=kp_idx, keypoint_targets=kp_tgt)
    assert_close(result.vertices, naive_nicp(gt.vertices, targets, gt.faces, kp_idx, kp_tgt), atol=1e-8)


def test_region_part_without_keypoint_is_an_error():
    gt = case().subject.regions["cheek"]  # two cheeks: two connected parts
    left = np.random.default_rng(8).choice(np.flatnonzero(gt.vertices[:, 0] < 0), 6, replace=False)
    with pytest.raises(InputError, match="holds no keypoint"):
        realy.realy_nicp(gt, gt.vertices, keypoint_index=left, keypoint_targets=gt.vertices[left])
    right = np.flatnonzero(gt.vertices[:, 0] > 0)
    row = right[np.abs(gt.vertices[right, 1] - gt.vertices[right[0], 1]) < 1e-12][:3]  # 3 points: coplanar
    both = np.r_[left, row]
    with pytest.raises(InputError, match="coplanar"):
        realy.realy_nicp(gt, gt.vertices, keypoint_index=both, keypoint_targets=gt.vertices[both])


# --- the whole protocol -------------------------------------------------------------------------

def test_identical_meshes_give_zero():
    c = case()
    errors = evaluate(c.vertices).errors_mm
    assert max(errors.values()) < ZERO_MM, errors


@pytest.mark.parametrize("scale", [0.5, 1.7])
def test_similarity_transform_of_the_truth_gives_zero(scale):
    c = case()
    rotation = Rotation.random(random_state=int(scale * 10)).as_matrix()
    evaluation = evaluate(scale * c.vertices @ rotation.T + [3.0, -1.0, 2.0])
    assert max(evaluation.errors_mm.values()) < ZERO_MM, evaluation.errors_mm
    assert_close(evaluation.gicp.scale, 100.0 / 9.0 / scale, rtol=1e-9)


def test_local_bump_raises_only_its_region():
    c = case()
    centre = c.vertices[np.argmin(np.abs(c.vertices[:, 0]) + np.abs(c.vertices[:, 1] - 0.8))]  # mid forehead
    bump = 0.03 * np.exp(-np.sum((c.vertices[:, :2] - centre[:2]) ** 2, axis=1) / (2 * 0.1**2))
    errors = evaluate(c.vertices + bump[:, None] * [0.0, 0.0, 1.0]).errors_mm
    assert errors["forehead"] > 0.1, errors  # a 3 mm bump over part of the forehead
    for region in ("nose", "mouth", "cheek"):
        assert errors[region] < 1e-3, errors


def test_independent_of_vertex_order_and_winding():
    c = case()
    rng = np.random.default_rng(6)
    pred = c.vertices + rng.normal(scale=0.002, size=c.vertices.shape)
    reference = evaluate(pred).errors_mm
    perm = rng.permutation(len(pred))  # new vertex k is old vertex perm[k]
    inverse = np.argsort(perm)
    flipped = inverse[c.faces][:, [0, 2, 1]]
    swap = c.template.weights[:, [0, 2, 1]]  # corners 1 and 2 exchanged with the winding
    template = dataclasses.replace(c.template, faces=flipped, weights=swap)
    regions = {}
    for name, region in c.subject.regions.items():
        order = rng.permutation(len(region.vertices))
        regions[name] = realy.RegionMesh(name, region.vertices[order], np.argsort(order)[region.faces][:, [0, 2, 1]])
    subject = dataclasses.replace(c.subject, regions=regions)
    shuffled = evaluate(pred[perm], flipped, subject, template).errors_mm
    for name in realy.REGIONS:
        assert_close(shuffled[name], reference[name], atol=1e-9, rtol=1e-7, msg=name)


def test_prediction_with_other_topology_is_refused():
    c = case()
    with pytest.raises(InputError, match="topology"):
        evaluate(c.vertices[:-1], c.faces[c.faces.max(axis=1) < len(c.vertices) - 1])
    other = c.faces.copy()
    other[0] = other[1]
    with pytest.raises(InputError, match="topology"):
        evaluate(c.vertices, other)


# --- aggregation ---------------------------------------------------------------------------------

def test_summary_uses_ddof_1_and_all_is_the_mean_of_region_means():
    errors = pd.DataFrame({"nose": [1.0, 2.0, 6.0], "mouth": [1.0, 1.0, 1.0], "forehead": [0.0, 3.0, 3.0],
                           "cheek": [2.0, 4.0, 9.0]})
    summary = realy.summarize(errors)
    assert summary[("nose", "mean")] == 3.0 and summary[("nose", "median")] == 2.0
    assert_close(summary[("nose", "std")], np.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))
    assert_close(summary[("all", "mean")], (3.0 + 1.0 + 2.0 + 5.0) / 4)
    table = realy.realy_table("frontal", {"mine": errors})
    assert list(table.index) == ["HRN", "Deep3D", "mine"]
    assert table.loc["HRN", ("all", "mean")] == 1.537 and math.isnan(table.loc["HRN", ("nose", "std")])


# --- files --------------------------------------------------------------------------------------

def test_realy_error_round_trip_at_full_precision(tmp_path):
    rng = np.random.default_rng(7)
    results = [realy.PredictionResult(name, 1, "side", dict(zip(realy.REGIONS, rng.random(4) * np.pi)))
               for name in ("3", "3_1", "12_4")]
    path = tmp_path / "REALY_error.txt"
    realy.write_realy_error(path, results)
    for line in path.read_text().splitlines():  # REALY's own parser: 6 tab-separated fields, the 2nd empty
        name, empty, *values = line.split("\t")
        assert empty == "" and len(values) == 4
    back = realy.read_realy_error(path)
    assert list(back.index) == ["3", "3_1", "12_4"]
    for row, result in zip(back.itertuples(index=False), results):
        assert list(row) == [result.errors_mm[k] for k in realy.REGIONS]  # bit for bit


def test_readers_accept_realy_formats_and_name_bad_files(tmp_path):
    scale = tmp_path / "metrical_scale.txt"
    scale.write_text("8.754063999999999623e+00\n8.516394e+00\n")
    assert realy.read_metrical_scale(scale) == {1: 8.754064, 2: 8.516394}
    scale.write_text("# id scale\n7 9.5\n3 8.25\n")
    assert realy.read_metrical_scale(scale) == {7: 9.5, 3: 8.25}
    for bad, match in (("1 9.5\n2\n", "every line"), ("abc\n", "not a number"), ("-1\n", "positive"), ("", "no")):
        scale.write_text(bad)
        with pytest.raises(FileFormatError, match=match) as info:
            realy.read_metrical_scale(scale)
        assert "metrical_scale.txt" in str(info.value)

    rows = [[i, 0.2, 0.3] for i in range(85)]
    keypoints = tmp_path / "T.txt"
    keypoints.write_text(json.dumps(rows))  # REALY's JSON form
    template = realy.read_template_keypoints(keypoints)
    assert_close(template.weights[0], [0.2, 0.3, 0.5]) and template.faces is None
    keypoints.write_text("\n".join(f"{f} {a} {b}" for f, a, b in rows))  # plain rows
    assert_close(realy.read_template_keypoints(keypoints).face_index, np.arange(85))
    keypoints.write_text(json.dumps(rows[:84]))
    with pytest.raises(FileFormatError, match="85"):
        realy.read_template_keypoints(keypoints)
    keypoints.write_text(json.dumps([[0, 1.5, 0.2]] * 85))
    with pytest.raises(FileFormatError, match="barycentric"):
        realy.read_template_keypoints(keypoints)

    # REALY's data/3DDFA_v2.txt, row 15: float32 weights whose 1 - w0 - w1 is -1.4e-6
    real_row = [57424, 0.0232222992926836, 0.9767791032791138]
    keypoints.write_text(json.dumps(rows[:14] + [real_row] + rows[15:]))
    weights = realy.read_template_keypoints(keypoints).weights
    assert 1.0 - real_row[1] - real_row[2] < -1e-6
    assert weights[14, 2] == 0.0 and (weights >= 0).all() and (weights <= 1).all()
    assert_close(weights[14, :2], np.array(real_row[1:]) / sum(real_row[1:]))
    assert_close(weights.sum(axis=1), np.ones(85))
    assert weights[0].tolist() == [0.2, 0.3, 1.0 - 0.2 - 0.3]  # rows inside the triangle are kept as REALY's
    keypoints.write_text(json.dumps(rows[:14] + [[57424, 0.5, 0.5001]] + rows[15:]))
    with pytest.raises(FileFormatError, match="row 15"):
        realy.read_template_keypoints(keypoints)

    gt = tmp_path / "1.obj"
    save_mesh(gt, Mesh(np.zeros((84, 3)), np.zeros((0, 3), dtype=np.int64)))
    with pytest.raises(FileFormatError, match="85"):
        realy.read_gt_keypoints(gt)


def test_degenerate_gt_triangles_are_kept_and_counted_empty_region_is_an_error(tmp_path):
    vertices = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 0]])
    path = tmp_path / "nose.obj"
    save_mesh(path, Mesh(vertices, np.array([[0, 1, 2], [0, 1, 3]])))  # the second is flat: zero area
    region = realy.read_region_mesh(path)
    assert region.degenerate_faces == 1 and region.faces.tolist() == [[0, 1, 2], [0, 1, 3]]
    save_mesh(path, Mesh(vertices, np.zeros((0, 3), dtype=np.int64)))
    with pytest.raises(FileFormatError, match="empty"):
        realy.read_region_mesh(path)


def test_nicp_with_degenerate_gt_triangles_matches_naive_port():
    """REALY keeps degenerate GT triangles: their edges enter bICP's graph, a repeated vertex adds nothing."""
    gt = case().subject.regions["nose"]
    a, b, c = gt.faces[0]
    vertices = np.vstack([gt.vertices, 0.5 * (gt.vertices[a] + gt.vertices[b])])  # a vertex on edge a-b
    m = len(gt.vertices)
    faces = np.vstack([gt.faces, [[a, m, b], [c, c, a]]])  # zero area; a repeated vertex
    region = realy.RegionMesh("nose", vertices, faces, 2)
    rng = np.random.default_rng(6)
    targets = vertices + 0.05 * np.sin(vertices[:, [1, 2, 0]]) + rng.normal(scale=0.01, size=vertices.shape)
    kp_idx = np.r_[rng.choice(m, 8, replace=False), m]
    kp_tgt = targets[kp_idx] + 0.05
    result = realy.realy_nicp(region, targets, keypoint_index=kp_idx, keypoint_targets=kp_tgt)
    assert_close(result.vertices, naive_nicp(vertices, targets, faces, kp_idx, kp_tgt), atol=1e-8)


def test_degenerate_prediction_triangles_are_refused_only_where_they_could_change_the_score():
    square = np.array([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0.5, 0, 0], [2, 0, 0], [3, 0, 0]])
    good = [[0, 1, 2], [0, 2, 3]]
    covered = [[0, 0, 1], [0, 4, 1], [2, 2, 2]]  # a repeated vertex, a point on edge 0-1, one vertex
    uncovered = [[1, 5, 6], [4, 4, 4]]  # a segment off the surface, a point off its vertices
    found = realy._uncovered_degenerate_faces(square, np.array(good + covered + uncovered))
    assert found.tolist() == [5, 6]

    c = case()
    edge_faces = {}
    for f, face in enumerate(c.faces):
        for i, j in ((0, 1), (1, 2), (2, 0)):
            edge_faces.setdefault(tuple(sorted((face[i], face[j]))), []).append((f, face[3 - i - j]))
    boundary_vertices = {v for edge, owners in edge_faces.items() if len(owners) == 1 for v in edge}
    inner = next((edge, owners[0]) for edge, owners in edge_faces.items() if len(owners) == 2
                 and owners[0][1] not in boundary_vertices)
    rim = next((edge, owners[0]) for edge, owners in edge_faces.items() if len(owners) == 1)
    for (a, b), (_, apex) in (inner, rim):  # flatten the triangle: its apex onto the middle of edge a-b
        vertices = c.vertices.copy()
        vertices[apex] = 0.5 * (vertices[a] + vertices[b])
        if (a, b) == rim[0]:  # on the rim nothing else covers edge a-b: REALY's surface differs from ours
            with pytest.raises(InputError, match="1 degenerate .* that no other triangle covers"):
                evaluate(vertices)
        else:  # the neighbour across a-b covers it: the same surface, evaluated
            assert all(np.isfinite(list(evaluate(vertices).errors_mm.values())))


def test_gt_region_duplicates_are_merged_like_trimesh(tmp_path):
    vertices = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0], [9, 9, 9], [1, 1, 0]])
    merged, faces = realy.merge_gt_vertices(vertices, np.array([[0, 1, 2], [3, 5, 2]]))
    assert_close(merged, [[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])
    assert faces.tolist() == [[0, 1, 2], [1, 3, 2]]


def test_prediction_names_decide_the_track(tmp_path):
    for name in ("3.obj", "3_2.obj", "notes.obj", "frontal/7_1.obj"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("v 0 0 0\n")
    found, skipped = realy.list_predictions(tmp_path)
    assert [(p.name, p.track, p.subject_id, p.view) for p in found] == [
        ("3", "frontal", 3, None), ("7_1", "frontal", 7, 1), ("3_2", "side", 3, 2)]
    assert skipped == [str(tmp_path / "notes.obj")]


# --- CLI ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    return ensure_synthetic_realy(tmp_path_factory.mktemp("realy") / "set", n_subjects=1, side_views=1,
                                  resolution=32)


def test_cli_end_to_end(tiny_set, tmp_path):
    root = tiny_set.root
    args = ["--realy", str(root), "--template-keypoints", str(tiny_set.template_keypoints),
            "--pred", f"truth={tiny_set.predictions('truth-noise')}",
            "--pred", f"mean={tiny_set.predictions('mean-face')}", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(realy_command, args)
    assert result.exit_code == 0, result.output
    assert "REALY, frontal track" in result.output and "REALY, side track" in result.output
    frame = realy.read_realy_error(tmp_path / "out" / "truth" / "side" / "REALY_error.txt")
    assert list(frame.index) == ["1_1"] and (frame.to_numpy() < 1.0).all()
    mean = realy.read_realy_error(tmp_path / "out" / "mean" / "frontal" / "REALY_error.txt")
    assert (mean.to_numpy() > frame.to_numpy()).any()

    result = CliRunner().invoke(realy_command, args[:-2] + ["--format", "json", "--track", "frontal"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert list(data) == ["frontal"] and "truth" in data["frontal"]["rows"]


def test_cli_evaluates_gt_with_a_degenerate_triangle_and_reports_it(tiny_set, tmp_path):
    root = tmp_path / "realy"
    shutil.copytree(tiny_set.root / "REALY_HIFI3D_keypoints", root / "REALY_HIFI3D_keypoints")
    shutil.copytree(tiny_set.root / "REALY_scan_region", root / "REALY_scan_region")
    shutil.copy(tiny_set.root / "metrical_scale.txt", root)
    nose = root / "REALY_scan_region" / "1" / "nose.obj"
    vertices, faces = realy._read_obj_arrays(nose)  # the file's numbering
    a, b, _ = faces[0] + 1
    middle = (0.5 * (vertices[a - 1] + vertices[b - 1])).tolist()
    with nose.open("a") as fh:  # one zero-area triangle: a new vertex on the middle of edge a-b
        fh.write(f"v {middle[0]!r} {middle[1]!r} {middle[2]!r}\nf {a} {len(vertices) + 1} {b}\n")
    preds = tiny_set.predictions("truth-noise")
    args = ["--template-keypoints", str(tiny_set.template_keypoints), "--pred", f"truth={preds}",
            "--track", "frontal", "--format", "json", "--out"]
    before = CliRunner().invoke(realy_command, ["--realy", str(tiny_set.root)] + args + [str(tmp_path / "before")])
    after = CliRunner().invoke(realy_command, ["--realy", str(root)] + args + [str(tmp_path / "after")])
    assert before.exit_code == 0 and after.exit_code == 0, after.output
    assert "subject 1 nose 1" in json.loads(after.stdout)["frontal"]["note"]
    assert "degenerate" not in json.loads(before.stdout)["frontal"]["note"]
    rows = pd.read_csv(tmp_path / "after" / "realy_predictions.csv")
    assert rows["gt_degenerate_faces_nose"].tolist() == [1] and rows["gt_degenerate_faces_cheek"].tolist() == [0]
    old, new = (realy.read_realy_error(tmp_path / run / "truth" / "frontal" / "REALY_error.txt") for run in
                ("before", "after"))
    assert (old[["mouth", "forehead", "cheek"]] == new[["mouth", "forehead", "cheek"]]).all(axis=None)
    assert abs(new.loc["1", "nose"] - old.loc["1", "nose"]) < 2e-3  # mm: one GT vertex more in the mean


def test_cli_says_when_a_prediction_folder_holds_nothing(tiny_set, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.obj").write_text("v 0 0 0\n")
    base = ["--realy", str(tiny_set.root), "--template-keypoints", str(tiny_set.template_keypoints)]
    result = CliRunner().invoke(realy_command, base + ["--pred", f"mine={empty}"])
    assert result.exit_code == 1
    assert f"{empty}: no REALY predictions found for 'mine'" in result.output and "1 other .obj" in result.output
    side_only = tmp_path / "side_only"
    side_only.mkdir()
    shutil.copy(tiny_set.predictions("truth-noise") / "1_1.obj", side_only)
    result = CliRunner().invoke(realy_command, base + ["--pred", f"mine={side_only}", "--track", "frontal"])
    assert result.exit_code == 1 and f"{side_only}: no frontal REALY predictions" in result.output


def test_cli_refuses_incomplete_real_arguments(tiny_set):
    result = CliRunner().invoke(realy_command, ["--realy", str(tiny_set.root), "--pred", "x=/nowhere"])
    assert result.exit_code != 0 and "--template-keypoints" in result.output


def test_cli_default_runs_the_reference_methods(tiny_set, monkeypatch):
    from benchmarks import synthetic_realy

    monkeypatch.setattr(synthetic_realy, "ensure_synthetic_realy", lambda *args, **kwargs: tiny_set)
    result = CliRunner().invoke(realy_command, ["--track", "frontal", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["frontal"]["rows"]
    assert list(rows) == ["HRN", "Deep3D", "mean-face", "landmark-3dmm", "truth-noise"]
    assert rows["truth-noise"]["all mean"] < rows["mean-face"]["all mean"]
    assert "synthetic" in json.loads(result.stdout)["frontal"]["note"]


def test_parallel_runs_group_subjects_and_keep_the_order(tmp_path):
    data = ensure_synthetic_realy(tmp_path / "set", n_subjects=2, side_views=2, resolution=32)
    predictions, _ = realy.list_predictions(data.predictions("truth-noise"))
    # a broken file among them is reported in its place while the others go on
    broken = tmp_path / "9_1.obj"
    broken.write_text("v 0 0 0\n")
    predictions.append(realy.PredictionFile(broken, broken.stem, 9, 1, "side"))
    chunks = realy._subject_chunks(predictions, workers=1)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(len(predictions)))
    assert all(len({predictions[i].subject_id for i in chunk}) == 1 for chunk in chunks)
    template = realy.read_template_keypoints(data.template_keypoints)
    done = []
    serial = realy.evaluate_predictions(data.root, predictions, template, workers=1)
    parallel = realy.evaluate_predictions(data.root, predictions, template, workers=2, progress=done.append)
    assert sum(done) == len(predictions)
    assert [r.name for r in parallel[0]] == [r.name for r in serial[0]] == [p.name for p in predictions[:-1]]
    assert [r.errors_mm for r in parallel[0]] == [r.errors_mm for r in serial[0]]
    assert [f.name for f in parallel[1]] == ["9_1"]
