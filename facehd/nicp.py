"""Non-rigid ICP (Amberg, Romdhani, Vetter, CVPR 2007): per-vertex affine registration of a source mesh
onto a target under a decreasing stiffness schedule, as used by the MICC registration and REALY's bICP."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from facehd.distance import SurfaceIndex, as_faces, as_points, face_normals_np, vertex_normals_np
from facehd.errors import InputError
from facehd.sparse_cholesky import HOMOGENEOUS, block_cholesky, single_threaded_blas

# menpo3d's non-rigid ICP schedule (its first five steps); the weights are meant for a source scaled to
# a unit bounding-box diagonal, which `normalize=True` does, so they do not depend on the mesh units.
DEFAULT_STIFFNESS = (50.0, 20.0, 5.0, 2.0, 0.8)
DEFAULT_LANDMARK_WEIGHTS = (5.0, 2.0, 0.5, 0.0, 0.0)  # menpo3d's landmark schedule, same steps
DEFAULT_MAX_INNER_ITERATIONS = 10
# inner loop stops when the RMS vertex motion of a solve is below this x the bounding-box diagonal
# (menpo3d's eps, which it applies to the RMS change of X in the same unit-diagonal frame)
DEFAULT_TOL = 1e-3
# A proximal term damping * ||X - X_previous||^2 (frame units) keeps the system positive definite where
# the data leave directions free (a flat source's normal row); its pull fades with each inner iteration,
# which is why fixed targets still get a second (cheap: same factorization) solve per step.
DEFAULT_DAMPING = 1e-8

STOP_RULES = ("motion", "affine_change")

_TINY = 1e-300  # guards normalisations of zero-length vectors


class ClosestPoints(Protocol):
    """A target surface: for each query point its correspondence and, optionally, the surface normal there.

    Rows of NaN in the returned points mean "no correspondence" (the vertex gets weight 0).
    """

    def __call__(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]: ...


@dataclass(frozen=True)
class NicpIteration:
    """One solve of the inner loop; distances are in the caller's units."""

    step: int  # index into the stiffness schedule
    iteration: int  # inner iteration within the step
    stiffness: float  # alpha
    landmark_weight: float  # beta
    n_matched: int  # correspondences with a non-zero weight
    mean_distance: float  # mean |vertex - correspondence| over the matched vertices, before the solve
    rms_motion: float  # RMS vertex displacement produced by the solve


@dataclass(frozen=True)
class NicpResult:
    """Registered source: ``vertices[i] = [src_vertices[i], 1] @ affines[i]`` (row vectors, caller's units)."""

    vertices: np.ndarray  # (N, 3) deformed source vertices
    affines: np.ndarray  # (N, 4, 3) per-vertex affine transforms
    history: tuple[NicpIteration, ...]


class MeshClosestPoints:
    """Exact closest points on a triangle mesh (the default target for a ``(vertices, faces)`` pair).

    open3d's float32 ray-casting scene picks the closest triangle; the point on it is then recomputed in
    float64, so results are exact to double precision up to near-ties between triangles.
    Returns the points and the unit normals of the triangles they lie on.
    """

    def __init__(self, vertices: np.ndarray, faces: np.ndarray):
        self.vertices = as_points(vertices, "target vertices")
        self.faces = as_faces(faces, len(self.vertices), "target faces")
        if len(self.faces) == 0:
            raise InputError("target faces: the target mesh has no triangles")
        self._index = SurfaceIndex(self.vertices, self.faces)
        self._face_normals = face_normals_np(self.vertices, self.faces)

    def __call__(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hit = self._index.closest(as_points(points, "query points"))
        return hit.points, self._face_normals[hit.face_index]


def mesh_edges(faces: np.ndarray) -> np.ndarray:
    """(E, 2) int64 unique undirected edges of a triangle mesh, each as (i, j) with i < j, sorted."""
    faces = np.asarray(faces)
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise InputError(f"faces must have shape (F, 3), got {faces.shape}")
    pairs = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2).astype(np.int64), axis=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]  # degenerate faces repeat a vertex
    if len(pairs) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    base = int(pairs.max()) + 1
    keys = np.unique(pairs[:, 0] * base + pairs[:, 1])
    return np.stack([keys // base, keys % base], axis=1)


def nonrigid_icp(
    src_vertices: np.ndarray,
    src_faces: np.ndarray,
    target: ClosestPoints | tuple[np.ndarray, np.ndarray] | np.ndarray,
    *,
    stiffness: float | Sequence[float] = DEFAULT_STIFFNESS,
    landmark_pairs: tuple[np.ndarray, np.ndarray] | None = None,
    landmark_weights: float | Sequence[float] | None = None,
    max_inner_iterations: int = DEFAULT_MAX_INNER_ITERATIONS,
    tol: float = DEFAULT_TOL,
    gamma: float = 1.0,
    max_distance: float | None = None,
    normal_angle_max: float | None = None,
    vertex_weights: np.ndarray | None = None,
    incremental: bool = False,
    damping: float = DEFAULT_DAMPING,
    normalize: bool = True,
    stop: str = "motion",
) -> NicpResult:
    """Optimal-step non-rigid ICP of a source mesh onto a target (Amberg et al. 2007).

    Unknown: one affine transform per source vertex, X (4N x 3). For each stiffness alpha (and landmark
    weight beta) of the schedule, repeat: find correspondences U for the current deformed vertices, then
    minimise ||[alpha M kron G; W D; beta D_L] X - [0; W U; U_L]||^2 + damping ||X - X_prev||^2, where
    M is the edge-vertex incidence matrix of the source, G = diag(1, 1, 1, gamma), D holds the
    homogeneous source vertices, W the correspondence weights; until the vertices move less than tol.

    Args:
        src_vertices: (N, 3) source vertices.
        src_faces: (F, 3) integer source triangles; their edges define the stiffness term.
        target: one of
            - a callable ``closest(points (N, 3)) -> (points (N, 3), normals (N, 3) or None)``
              (see `ClosestPoints`), called once per inner iteration with the deformed vertices;
            - a ``(vertices, faces)`` tuple: exact closest points on those triangles (`MeshClosestPoints`);
            - fixed target points (N, 3), one per source vertex: correspondences never change, so each
              stiffness step is one factorization (plus a cheap re-solve that removes the damping's pull)
              unless ``max_distance`` makes the weights move.
        stiffness: alpha schedule (positive, usually decreasing).
        landmark_pairs: ``(source vertex indices (L,), target points (L, 3))``.
        landmark_weights: beta per stiffness step (or one value for all); default
            `DEFAULT_LANDMARK_WEIGHTS`, padded with zeros.
        max_inner_iterations: solves per stiffness step at most.
        tol: a step ends when the RMS vertex motion of a solve is below tol x the source's bounding-box
            diagonal.
        gamma: weight of the translational part against the linear part in the stiffness term.
        max_distance: correspondences farther than this (caller's units) get weight 0.
        normal_angle_max: correspondences whose target normal deviates from the deformed source's vertex
            normal by more than this many degrees get weight 0 (meshes consistently oriented).
        vertex_weights: (N,) in [0, 1] multiplying the correspondence weights W (e.g. to down-weight the
            boundary).
        incremental: build D from the current deformed vertices at every solve, so the stiffness acts on
            each update rather than on the whole deformation (menpo3d's and REALY's variant); the
            returned affines are then the composition of the updates.
        damping: weight of the proximal term, in the normalised frame (0 disables it).
        normalize: solve in a frame where the source is centred on its centroid with a unit bounding-box
            diagonal, so that stiffness, landmark weights and gamma do not depend on units (as menpo3d).
        stop: "motion" (the rule of ``tol`` above) or "affine_change", menpo3d's rule (needs
            ``incremental``): a step ends when ||X - X_prev||_F / sqrt(X.size) < tol, X the solve's
            per-vertex affines (N, 4, 3) in the frame and X_prev the previous solve's, carried over
            from step to step and zero before the first solve.

    Returns:
        `NicpResult` with the deformed vertices, the per-vertex affines and one record per solve.

    Raises:
        InputError: non-finite values, wrong shapes, faces out of range, mismatched landmarks, a source
            without edges, invalid schedules or thresholds, or a system that is not positive definite.
    """
    vertices = as_points(src_vertices, "src_vertices")
    faces = as_faces(src_faces, len(vertices), "src_faces")
    edges = mesh_edges(faces)
    if len(edges) == 0:
        raise InputError("src_faces: the source mesh has no edges, so there is no stiffness term")
    n = len(vertices)
    alphas = _as_schedule(stiffness, None, "stiffness", positive=True)
    landmarks = _as_landmarks(landmark_pairs, n)
    betas = _landmark_schedule(landmark_weights, len(alphas), landmarks is not None)
    weights = _as_vertex_weights(vertex_weights, n)
    _check_settings(max_inner_iterations, tol, gamma, max_distance, normal_angle_max, damping)
    if stop not in STOP_RULES:
        raise InputError(f"stop must be one of {STOP_RULES}, got {stop!r}")
    if stop == "affine_change" and not incremental:
        raise InputError("stop='affine_change' compares successive updates: it needs incremental=True")

    frame = _Frame.of(vertices, normalize)
    matcher = _Matcher.of(target, n, frame, max_distance, normal_angle_max, weights)
    system = _AmbergSystem(frame.to_frame(vertices), edges, gamma, damping, landmarks, frame)
    loop = _InnerLoop(system, matcher, faces, int(max_inner_iterations), tol * frame.diagonal, incremental, frame,
                      tol if stop == "affine_change" else None, [np.zeros((n, HOMOGENEOUS, 3))])
    affines = _identity_affines(n)  # frame units throughout
    history: list[NicpIteration] = []
    with single_threaded_blas():
        for step, (alpha, beta) in enumerate(zip(alphas, betas)):
            affines = loop.run(affines, step, alpha, beta, history)
    deformed = frame.from_frame(system.deform(affines))
    return NicpResult(vertices=deformed, affines=frame.affines_from_frame(affines), history=tuple(history))


@dataclass(frozen=True)
class _InnerLoop:
    """The iterations at one stiffness value: correspondences, solve, until the vertices stop moving."""

    system: _AmbergSystem
    matcher: _Matcher
    faces: np.ndarray
    max_iterations: int
    min_motion: float  # frame units
    incremental: bool
    frame: _Frame
    max_affine_change: float | None  # stop="affine_change": its tol; None: the motion rule
    previous_update: list  # [the last solve's affines (N, 4, 3)], carried across steps

    def run(self, affines, step, alpha, beta, history) -> np.ndarray:
        system = self.system
        factor = previous_weights = None
        current = system.deform(affines)
        for iteration in range(self.max_iterations):
            targets, weights = self.matcher(current, self.faces)
            same_weights = previous_weights is not None and np.array_equal(weights, previous_weights)
            if self.incremental:
                basis = _homogeneous(current)
                update = system.solve(alpha, beta, weights, targets, _identity_affines(len(current)), basis)
                affines = _compose(affines, update)
                change = float(np.linalg.norm(update - self.previous_update[0]) / np.sqrt(update.size))
                self.previous_update[0] = update
            else:
                if factor is None or not same_weights:  # the matrix depends on the weights, not the targets
                    factor = system.factorize(alpha, beta, weights, system.source)
                affines = factor.solve(system.right_hand_side(beta, weights, targets, affines, system.source))
            moved = system.deform(affines)
            motion = float(np.sqrt(np.mean(np.sum((moved - current) ** 2, axis=1))))
            history.append(_record(step, iteration, alpha, beta, weights, current, targets, motion, self.frame))
            current, previous_weights = moved, weights
            if (change < self.max_affine_change) if self.max_affine_change is not None else motion < self.min_motion:
                break
        return affines


def _record(step, iteration, alpha, beta, weights, current, targets, motion, frame) -> NicpIteration:
    matched = weights > 0
    gap = np.linalg.norm(current[matched] - targets[matched], axis=1) / frame.scale
    return NicpIteration(
        step=step,
        iteration=iteration,
        stiffness=float(alpha),
        landmark_weight=float(beta),
        n_matched=int(matched.sum()),
        mean_distance=float(gap.mean()) if len(gap) else float("nan"),
        rms_motion=motion / frame.scale,
    )


def _identity_affines(n: int) -> np.ndarray:
    return np.tile(np.eye(HOMOGENEOUS, 3), (n, 1, 1))


def _homogeneous(points: np.ndarray) -> np.ndarray:
    return np.concatenate([points, np.ones((len(points), 1))], axis=1)


def _compose(first: np.ndarray, then: np.ndarray) -> np.ndarray:
    """Per-vertex affines applying ``first`` and then ``then`` (row-vector convention, (N, 4, 3))."""
    lifted = np.concatenate([first, np.tile([[[0.0], [0.0], [0.0], [1.0]]], (len(first), 1, 1))], axis=2)
    return lifted @ then


@dataclass(frozen=True)
class _Frame:
    """The solving frame: frame = (caller - centre) * scale."""

    centre: np.ndarray  # (3,)
    scale: float
    diagonal: float  # source bounding-box diagonal in frame units

    @classmethod
    def of(cls, vertices: np.ndarray, normalize: bool) -> _Frame:
        extent = float(np.linalg.norm(np.ptp(vertices, axis=0)))
        if not normalize:
            return cls(centre=np.zeros(3), scale=1.0, diagonal=max(extent, _TINY))
        if extent == 0.0:
            raise InputError("src_vertices: all source vertices coincide, so the mesh cannot be normalised")
        return cls(centre=vertices.mean(axis=0), scale=1.0 / extent, diagonal=1.0)

    def to_frame(self, points: np.ndarray) -> np.ndarray:
        return (points - self.centre) * self.scale

    def from_frame(self, points: np.ndarray) -> np.ndarray:
        return points / self.scale + self.centre

    def affines_from_frame(self, affines: np.ndarray) -> np.ndarray:
        """Per-vertex affines acting on caller-unit homogeneous points and giving caller-unit points."""
        linear, shift = affines[:, :3], affines[:, 3]
        caller_shift = shift / self.scale + self.centre - self.centre @ linear
        return np.concatenate([linear, caller_shift[:, None]], axis=1)


class _Matcher:
    """Correspondences and weights for the current deformed vertices (frame units in and out)."""

    def __init__(self, closest, fixed, frame, max_distance, normal_angle_max, vertex_weights):
        self.closest = closest  # callable in caller units, or None
        self.fixed = fixed  # (N, 3) frame units, or None
        self.frame = frame
        self.max_distance = None if max_distance is None else max_distance * frame.scale
        self.min_cosine = None if normal_angle_max is None else np.cos(np.radians(normal_angle_max))
        self.vertex_weights = vertex_weights

    @classmethod
    def of(cls, target, n, frame, max_distance, normal_angle_max, vertex_weights) -> _Matcher:
        args = (frame, max_distance, normal_angle_max, vertex_weights)
        if isinstance(target, tuple) and len(target) == 2:
            return cls(MeshClosestPoints(*target), None, *args)
        if callable(target):
            return cls(target, None, *args)
        points = as_points(target, "target points")
        if len(points) != n:
            raise InputError(f"target points: expected one per source vertex ({n}), got {len(points)}")
        if normal_angle_max is not None:
            raise InputError("normal_angle_max needs target normals: pass a callable target, not fixed points")
        return cls(None, frame.to_frame(points), *args)

    def __call__(self, current: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.fixed is not None:
            targets, normals = self.fixed, None
        else:
            targets, normals = self._ask(current)
        weights = self.vertex_weights.copy()
        missing = ~np.isfinite(targets).all(axis=1)
        weights[missing] = 0.0
        targets = np.where(missing[:, None], current, targets)  # any finite value: its weight is 0
        if self.max_distance is not None:
            weights[np.linalg.norm(targets - current, axis=1) > self.max_distance] = 0.0
        if self.min_cosine is not None:
            cosine = np.sum(vertex_normals_np(current, faces) * normals, axis=1)
            weights[~(cosine >= self.min_cosine)] = 0.0
        return targets, weights

    def _ask(self, current: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        answer = self.closest(self.frame.from_frame(current))
        if not (isinstance(answer, tuple) and len(answer) == 2):
            raise InputError("target callable must return a (points, normals or None) pair")
        points = np.asarray(answer[0], dtype=np.float64)
        if points.shape != current.shape:
            raise InputError(f"target callable returned points of shape {points.shape}, expected {current.shape}")
        normals = answer[1]
        if normals is None:
            if self.min_cosine is not None:
                raise InputError("normal_angle_max is set but the target callable returned no normals")
            return self.frame.to_frame(points), None
        normals = np.asarray(normals, dtype=np.float64)
        if normals.shape != current.shape:
            raise InputError(f"target callable returned normals of shape {normals.shape}, expected {current.shape}")
        length = np.linalg.norm(normals, axis=1, keepdims=True)
        return self.frame.to_frame(points), normals / np.maximum(length, _TINY)


class _AmbergSystem:
    """Normal equations of Amberg's cost in the frame, for a basis D of homogeneous vertices (N, 4):
    K X = R with K = alpha^2 (M^T M kron G^2) + blockdiag((w_i^2 + beta^2 l_i) d_i d_i^T + damping I)
    and R_i = d_i (w_i^2 u_i + beta^2 sum of i's landmark targets)^T + damping X_prior_i, where l_i counts
    the landmarks on vertex i."""

    def __init__(self, vertices, edges, gamma, damping, landmarks, frame):
        n = len(vertices)
        self.source = _homogeneous(vertices)  # Amberg's D
        self.degree = np.bincount(edges.ravel(), minlength=n).astype(np.float64)
        self.g2 = np.diag([1.0, 1.0, 1.0, gamma**2])
        self.damping = damping
        self.landmark_count = np.zeros(n)
        self.landmark_sum = np.zeros((n, 3))
        if landmarks is not None:
            index, points = landmarks
            np.add.at(self.landmark_count, index, 1.0)
            np.add.at(self.landmark_sum, index, frame.to_frame(points))
        self.cholesky = block_cholesky(vertices, edges)

    def deform(self, affines: np.ndarray) -> np.ndarray:
        return np.einsum("ni,nij->nj", self.source, affines)

    def factorize(self, alpha, beta, weights, basis):
        data = weights**2 + beta**2 * self.landmark_count
        diagonal = (
            alpha**2 * self.degree[:, None, None] * self.g2
            + data[:, None, None] * basis[:, :, None] * basis[:, None, :]
            + self.damping * np.eye(HOMOGENEOUS)
        )
        return self.cholesky.factorize(diagonal, -(alpha**2) * self.g2)

    def right_hand_side(self, beta, weights, targets, prior, basis) -> np.ndarray:
        pulled = (weights**2)[:, None] * targets + beta**2 * self.landmark_sum
        return basis[:, :, None] * pulled[:, None, :] + self.damping * prior

    def solve(self, alpha, beta, weights, targets, prior, basis) -> np.ndarray:
        factor = self.factorize(alpha, beta, weights, basis)
        return factor.solve(self.right_hand_side(beta, weights, targets, prior, basis))


def _as_schedule(values, length: int | None, name: str, *, positive: bool) -> np.ndarray:
    schedule = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if schedule.ndim != 1 or len(schedule) == 0:
        raise InputError(f"{name} must be a number or a non-empty sequence of numbers")
    if length is not None and len(schedule) == 1:
        schedule = np.full(length, schedule[0])
    if length is not None and len(schedule) != length:
        raise InputError(f"{name} has {len(schedule)} values but the stiffness schedule has {length}")
    out_of_range = (schedule <= 0) if positive else (schedule < 0)
    if not np.isfinite(schedule).all() or out_of_range.any():
        bound = "positive" if positive else "non-negative"
        raise InputError(f"{name} must be finite and {bound}, got {schedule.tolist()}")
    return schedule


def _landmark_schedule(weights, steps: int, has_landmarks: bool) -> np.ndarray:
    if not has_landmarks:
        if weights is not None:
            raise InputError("landmark_weights given without landmark_pairs")
        return np.zeros(steps)
    if weights is None:
        default = np.zeros(steps)
        count = min(steps, len(DEFAULT_LANDMARK_WEIGHTS))
        default[:count] = DEFAULT_LANDMARK_WEIGHTS[:count]
        return default
    return _as_schedule(weights, steps, "landmark_weights", positive=False)


def _as_landmarks(pairs, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    if pairs is None:
        return None
    if not (isinstance(pairs, Sequence) and len(pairs) == 2):
        raise InputError("landmark_pairs must be (source vertex indices (L,), target points (L, 3))")
    index = np.asarray(pairs[0])
    if index.ndim != 1 or (index.size and not np.issubdtype(index.dtype, np.integer)):
        raise InputError(f"landmark_pairs: indices must be a 1-D integer array, got {index.dtype} {index.shape}")
    points = as_points(pairs[1], "landmark_pairs target points")
    if len(index) != len(points):
        raise InputError(f"landmark_pairs: {len(index)} source indices but {len(points)} target points")
    if index.min() < 0 or index.max() >= n:
        raise InputError(f"landmark_pairs: source indices must lie in [0, {n}), found {index.min()} .. {index.max()}")
    return index.astype(np.int64), points


def _as_vertex_weights(weights, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    array = np.asarray(weights, dtype=np.float64)
    if array.shape != (n,):
        raise InputError(f"vertex_weights must have shape ({n},), got {array.shape}")
    if not np.isfinite(array).all() or (array < 0).any() or (array > 1).any():
        raise InputError("vertex_weights must be finite and lie in [0, 1]")
    return array


def _check_settings(max_inner_iterations, tol, gamma, max_distance, normal_angle_max, damping) -> None:
    if int(max_inner_iterations) != max_inner_iterations or max_inner_iterations < 1:
        raise InputError(f"max_inner_iterations must be a positive integer, got {max_inner_iterations}")
    checks = [
        ("tol", tol, tol >= 0),
        ("gamma", gamma, gamma > 0),
        ("damping", damping, damping >= 0),
        ("max_distance", max_distance, max_distance is None or max_distance > 0),
        ("normal_angle_max", normal_angle_max, normal_angle_max is None or 0 < normal_angle_max <= 180),
    ]
    for name, value, valid in checks:
        if not valid or (value is not None and not np.isfinite(value)):
            raise InputError(f"{name} out of range: {value}")
