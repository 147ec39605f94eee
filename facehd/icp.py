"""Rigid point-to-plane ICP (open3d, shrinking correspondence distances) and the similarity ICP
loop of the MICC protocol (Umeyama onto exact closest surface points until the mean stalls)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import open3d as o3d

from facehd.distance import SurfaceIndex, as_faces, as_mask, as_points, vertex_normals_np
from facehd.errors import InputError
from facehd.procrustes import Similarity, fit_similarity

# Default correspondence-distance schedule, as fractions of the target's bounding-box diagonal
# (a face of ~250 mm diagonal: 12.5, 5, 2.5 mm): coarse enough to catch a landmark-level initial
# error, fine enough at the end that hair spikes and scan borders are not matched.
DEFAULT_SCHEDULE_FRACTIONS = (0.05, 0.02, 0.01)
DEFAULT_ITERATIONS = 30  # per stage; open3d's own default
# open3d stops a stage early once fitness and inlier RMSE change by less than this (relative).
ICP_RELATIVE_TOL = 1e-6
# Neighbours for estimating target normals when only target points are given.
NORMAL_KNN = 30

# MICC protocol (DESIGN.md section 8, GANFit's evaluation): stop once the mean distance improves
# by no more than 0.001 mm; the caller converts the tolerance into its units.
MICC_TOL_MM = 1e-3
MAX_SIMILARITY_ITERATIONS = 100


@dataclass(frozen=True)
class IcpStage:
    """One stage of the schedule: its correspondence distance and the fit it ended with."""

    max_distance: float  # target units
    fitness: float  # fraction of source points with a target point within max_distance
    inlier_rmse: float  # RMS point-to-point distance of those pairs, target units


@dataclass(frozen=True, eq=False)
class IcpResult:
    """Rigid ICP outcome: source -> target similarity (the init's scale, refined pose)."""

    transform: Similarity
    fitness: float  # of the final transform at the last stage's max_distance
    inlier_rmse: float  # target units
    history: tuple[IcpStage, ...]


class SimilarityIcpResult(NamedTuple):
    """Similarity ICP outcome; unpacks as (transform, history, distances)."""

    transform: Similarity  # src -> target, the iterate with the lowest mean distance
    history: np.ndarray  # (K,) masked mean distance after each iteration, target units
    distances: np.ndarray  # (N,) every src vertex's point-to-surface distance after `transform`


def _source_points(src) -> np.ndarray:
    if isinstance(src, o3d.geometry.PointCloud):
        src = np.asarray(src.points)
    return as_points(src, "source points")


def _target_cloud(vertices, faces, normals) -> o3d.geometry.PointCloud:
    """Target points with normals, which point-to-plane ICP needs (source normals it does not)."""
    pts = as_points(vertices, "target vertices")
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
    if normals is not None:
        normals = as_points(normals, "target normals", rows=len(pts))
    elif faces is not None:
        normals = vertex_normals_np(pts, as_faces(faces, len(pts), "target faces"))
    else:
        cloud.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(NORMAL_KNN))
        return cloud
    cloud.normals = o3d.utility.Vector3dVector(normals)
    return cloud


def _schedule(max_distances, iterations, target: np.ndarray) -> list[tuple[float, int]]:
    if max_distances is None:
        diagonal = float(np.linalg.norm(target.max(axis=0) - target.min(axis=0)))
        max_distances = [f * diagonal for f in DEFAULT_SCHEDULE_FRACTIONS]
    distances = np.atleast_1d(np.asarray(max_distances, dtype=np.float64))
    if distances.ndim != 1 or len(distances) == 0 or not np.all(np.isfinite(distances)) or (distances <= 0).any():
        raise InputError(f"max_distances must be one or more positive distances, got {max_distances!r}")
    counts = [iterations] * len(distances) if np.isscalar(iterations) else list(iterations)
    if len(counts) != len(distances) or any(int(c) < 1 for c in counts):
        raise InputError(f"iterations must be a positive count or one per stage ({len(distances)}), got {iterations!r}")
    return [(float(d), int(c)) for d, c in zip(distances, counts)]


def rigid_icp(src_points, tgt_vertices, tgt_faces=None, *, tgt_normals=None, init: Similarity | None = None,
              max_distances: Sequence[float] | None = None,
              iterations: int | Sequence[int] = DEFAULT_ITERATIONS) -> IcpResult:
    """Align source points (P, 3) (or an open3d PointCloud) to a target by point-to-plane ICP.

    The target is its vertices (N, 3) with normals: `tgt_normals` (N, 3) if given, else the
    area-weighted vertex normals of `tgt_faces` (F, 3), else normals estimated from the points.
    `init` (for example a landmark similarity, scan mm -> model units) is applied to the source
    first, so `max_distances` (one stage each, usually shrinking) are in target units; each stage
    runs at most `iterations` open3d iterations (open3d's legacy `registration_icp`, ~30x faster
    than its tensor version here). The result composes the rigid refinement after `init`.
    """
    src = _source_points(src_points)
    init = Similarity.identity() if init is None else init
    target = _target_cloud(tgt_vertices, tgt_faces, tgt_normals)
    stages = _schedule(max_distances, iterations, np.asarray(target.points))
    source = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(init.apply(src)))
    estimation = o3d.pipelines.registration.TransformationEstimationPointToPlane()
    pose, history = np.eye(4), []
    for max_distance, count in stages:
        criteria = o3d.pipelines.registration.ICPConvergenceCriteria(ICP_RELATIVE_TOL, ICP_RELATIVE_TOL, count)
        fit = o3d.pipelines.registration.registration_icp(source, target, max_distance, pose, estimation, criteria)
        pose = np.asarray(fit.transformation)
        history.append(IcpStage(max_distance, float(fit.fitness), float(fit.inlier_rmse)))
    # open3d reports the fit of the last iteration's correspondences; re-evaluate at the final pose.
    final = o3d.pipelines.registration.evaluate_registration(source, target, stages[-1][0], pose)
    refinement = Similarity(1.0, pose[:3, :3], pose[:3, 3])
    return IcpResult(refinement.compose(init), float(final.fitness), float(final.inlier_rmse), tuple(history))


def similarity_icp(src_vertices, src_mask, tgt_vertices, tgt_faces, *, init_correspondences=None,
                   tol: float = MICC_TOL_MM, max_iter: int = MAX_SIMILARITY_ITERATIONS) -> SimilarityIcpResult:
    """The MICC alignment loop (DESIGN.md section 8, step 2) of src (N, 3) onto a target mesh.

    Correspondences of the masked src vertices (`src_mask` (N,) bool) start as
    `init_correspondences` (N, 3) (e.g. the target's same-index vertices) or else as their closest
    target surface points. Each iteration fits a similarity (Umeyama, isotropic scale, no
    reflection) of the masked src vertices onto the correspondences, applies it to all of src,
    then moves the correspondences to the closest points on the target's triangles. It stops
    once the masked mean distance improves by no more than `tol` (target units; the protocol's
    0.001 mm must be converted by the caller) or after `max_iter` iterations. If the last step made
    the mean worse, the previous transform is the one returned.
    """
    src = as_points(src_vertices, "src vertices")
    mask = as_mask(src_mask, len(src), "src mask")
    if not (np.isfinite(tol) and tol >= 0) or int(max_iter) < 1:
        raise InputError(f"tol must be >= 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    index = SurfaceIndex(tgt_vertices, tgt_faces)  # built once, queried every iteration
    masked = src[mask]
    if init_correspondences is not None:
        corr = as_points(init_correspondences, "initial correspondences", rows=len(src))[mask]
    else:
        corr = index.closest(masked).points
    best, best_mean, history = None, np.inf, []
    for _ in range(int(max_iter)):
        # Fitting the original vertices onto the correspondences gives the whole transform at
        # once, the same as composing per-iteration steps but without accumulated rounding.
        transform = fit_similarity(masked, corr)
        hit = index.closest(transform.apply(masked))
        mean = float(hit.distances.mean())
        history.append(mean)
        if mean < best_mean:
            best, best_mean = transform, mean
        if len(history) > 1 and history[-2] - mean <= tol:
            break
        corr = hit.points
    return SimilarityIcpResult(best, np.asarray(history), index.distance(best.apply(src)))
