"""Ground-truth detail maps: the deformation map (3x64x64) and displacement map (1x256x256) that make
the detailed surface of a frozen coarse shape fit an aligned, masked scan (HRN supplement Sec. 3.1)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from facehd import __version__
from facehd import conventions as cv
from facehd.align import (
    AlignJob,
    Alignment,
    align_capture,
    align_digest,
    aligned_face_points,
    capture_coeff_files,
    capture_name,
    capture_views,
    dataset_captures,
    load_scan_inputs,
    model_shape,
    read_coeffs,
    remove_leftovers,
)
from facehd.batch import BatchReport, ItemResult, Progress, Shard, inputs_digest, run_item, run_resumable
from facehd.capture import CaptureRef
from facehd.dataset import CAPTURE_DIGEST_KEY, GT_MAPS_DIR, capture_digest
from facehd.distance import SurfaceIndex, as_points, face_normals_np
from facehd.errors import FaceHDError, InputError
from facehd.fsutil import atomic_path
from facehd.masks import ModelMasks, model_masks, uv_masks
from facehd.morphable import MorphableModel, vertex_normals
from facehd.uv import (
    UVRaster,
    dense_positions_from_map,
    rasterize_attributes,
    sample_uv_map,
    uv_grid_mesh,
    uv_rasterize,
)

MM = 1.0 / cv.MM_PER_MODEL_UNIT  # model units per millimetre
DEF_SIZE = cv.DEFORMATION_MAP_SIZE  # 64
DISP_SIZE = cv.DISPLACEMENT_MAP_SIZE  # 256

# Stage 1, deformation: closest-point / least-squares rounds against the coarse mesh M1, with
# the correspondence distance shrinking as M1 approaches the scan (mm).
DEFORMATION_DISTANCES_MM = (5.0, 3.0, 2.0, 1.5)
DEFORMATION_MAX_POINTS = 40_000  # 64^2 x 3 unknowns: ten points per unknown is plenty
# HRN's total variation of the deformation map, in its squared form (the public code's TVLoss:
# 2 * (mean squared vertical + mean squared horizontal differences)), weighted against the mean
# squared point-to-plane residual.
TV_FACTOR = 2.0
TV_WEIGHT = 0.01
# TV alone cannot keep wrinkles out of the map: forehead lines 8-12 mm apart are 2.3-3.4 texels of
# the 64 x 64 map, inside its band, and a TV weight that holds them back (0.5 held back only part
# of them) also flattens the narrow 1-2 mm mid-frequency bumps the map is there for, which then
# land in d. The same squared TV of the map's Laplacian (a third-order smoothness, normalized like
# TV) is far more selective: per unit amplitude it costs a 3-texel ripple (3 / 0.59)^3 ~ 130 times
# an 8-texel bump, where TV's ratio is 5. On the synthetic FaceHD-100 (benchmarks.speed_gt_maps)
# it raised the displacement's correlation with the truth from 0.90 / 0.88 with TV 0.5 alone to
# 0.93 / 0.91 (true / fitted coefficients).
LAPLACIAN_TV_WEIGHT = 0.45
DEFORMATION_RIDGE = 1e-9  # keeps texels no vertex samples at zero (model units^2 per texel)
# Stage 2, displacement: rounds against the dense UV-grid surface (one vertex per texel).
DISPLACEMENT_DISTANCES_MM = (1.5, 1.0, 1.0)
# HRN's L1 of the displacement map (mean |d|), solved by iteratively reweighted least squares:
# it sends texels without scan points to 0 and keeps what the deformation explains out of d.
L1_WEIGHT = 3e-5
L1_EPS_MM = 0.01  # IRLS floor: |d| below this is treated as this (avoids dividing by zero)
# A squared-Laplacian term on d filters scanner noise at the finest scale (weighted like TV_WEIGHT
# against the mean residual): a sharper low-pass than a squared gradient, which, weighted to filter
# the same noise, kept ~80 % of the forehead lines' depth where this keeps ~90 %. Its best weight
# grows with the noise variance per texel, so by default it is set from the residuals of a first
# round at SMOOTH_WEIGHT: weight = SMOOTH_WEIGHT (sigma_texel / SMOOTH_REFERENCE_MM)^2, with
# sigma_texel their robust spread over the square root of the mean number of scan points per texel
# (points on one texel average their noise); 0.3 suits ~0.02 mm of noise per texel (0.04 mm per
# scan vertex, four vertices per texel: the synthetic generator's default).
SMOOTH_WEIGHT = 0.3
SMOOTH_REFERENCE_MM = 0.02
SMOOTH_WEIGHT_RANGE = (0.01, 10.0)
MAD_TO_SIGMA = 1.4826  # median absolute deviation -> standard deviation of a Gaussian
HUBER_MM = 0.3  # residuals beyond this get weight HUBER_MM / |r| (leftover spikes and holes' rims)
# Stage 1's Huber thresholds per round: least squares first, so the map follows the mid-frequency
# shape, then robust, like a median, so wrinkles and pores (narrow, mostly one-signed dents) count
# as outliers instead of being blurred into the map.
DEFORMATION_HUBER_MM = (0.3, 0.3, 0.1, 0.03)
CG_TOL = 1e-8
# The deformation's normal equations have near-null modes (tangential offsets, texels off the
# scan) that CG converges on slowly and that do not change the surface; the maps stop changing
# well before this (2000 iterations gave the same maps to the benchmark's third decimal, 5x slower).
CG_MAX_ITER = 400
# A texel is supported by the scan when a scan point's closest surface point lies within this
# many texels of it; the masks mark supported texels of the model's face region.
SUPPORT_RADIUS_TEXELS = 1
DEFORMATION_MASK_FRACTION = 0.5  # of a 64-texel's 4x4 displacement texels that must be trusted
MIN_FIT_POINTS = 1000  # fewer masked face points than this cannot support a 64 x 64 deformation map


@dataclass(frozen=True)
class GTMapOptions:
    """Parameters of `fit_gt_maps` (weights against the mean squared residual, lengths in mm)."""

    tv_weight: float = TV_WEIGHT
    laplacian_tv_weight: float = LAPLACIAN_TV_WEIGHT
    l1_weight: float = L1_WEIGHT
    smooth_weight: float | None = None  # None: from the scan's noise (see SMOOTH_WEIGHT)
    deformation_distances_mm: tuple[float, ...] = DEFORMATION_DISTANCES_MM
    deformation_huber_mm: tuple[float, ...] = DEFORMATION_HUBER_MM
    displacement_distances_mm: tuple[float, ...] = DISPLACEMENT_DISTANCES_MM
    deformation_max_points: int = DEFORMATION_MAX_POINTS
    seed: int = 0

    def __post_init__(self):
        if len(self.deformation_huber_mm) != len(self.deformation_distances_mm):
            raise InputError(f"deformation_huber_mm needs one threshold per round "
                             f"({len(self.deformation_distances_mm)}), got {len(self.deformation_huber_mm)}")
        if min(self.tv_weight, self.laplacian_tv_weight, self.l1_weight, self.smooth_weight or 0.0) < 0:
            raise InputError("regularization weights must be >= 0")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True, eq=False)
class GTMaps:
    """Fitted detail maps of one coarse shape, model units, and how well they fit the scan.

    The masks mark texels of the model's face region (noisy regions excluded) that scan points
    support: train on those. `*_valid` marks the texels the UV layout covers at all.
    """

    deformation: np.ndarray  # (3, 64, 64) model-space xyz offsets added to M0's vertices
    displacement: np.ndarray  # (1, 256, 256) offsets along M0's normals
    deformation_mask: np.ndarray  # (1, 64, 64) bool
    displacement_mask: np.ndarray  # (1, 256, 256) bool
    deformation_valid: np.ndarray  # (1, 64, 64) bool
    displacement_valid: np.ndarray  # (1, 256, 256) bool
    coeffs: np.ndarray  # (257,) the frozen coefficients of M0
    residual_mm: np.ndarray  # (1, 256, 256) RMS scan-to-surface distance of the points at each texel, mm
    residual_rms_mm: float  # over the scan points used (face region, masked), mm
    residual_p95_mm: float
    points_used: int

    def arrays(self) -> dict[str, np.ndarray]:
        """The npz payload: maps float32, masks uint8, coefficients float64, residuals."""
        return {
            "deformation": self.deformation.astype(np.float32),
            "displacement": self.displacement.astype(np.float32),
            "deformation_mask": self.deformation_mask.astype(np.uint8),
            "displacement_mask": self.displacement_mask.astype(np.uint8),
            "deformation_valid": self.deformation_valid.astype(np.uint8),
            "displacement_valid": self.displacement_valid.astype(np.uint8),
            "coeffs": self.coeffs.astype(np.float64),
            "residual_mm": self.residual_mm.astype(np.float32),
            "residual_rms_mm": np.float64(self.residual_rms_mm),
            "residual_p95_mm": np.float64(self.residual_p95_mm),
            "points_used": np.int64(self.points_used),
        }


# --- the model's UV operators ------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class UVOperators:
    """Sparse linear maps of a model's UV layout (they depend on the model only)."""

    sample: sp.csr_matrix  # (N, 64*64): vertex values = sample @ deformation texels (sample_uv_map)
    raster: sp.csr_matrix  # (256*256, N): texel values = raster @ vertex values (rasterize_attributes)
    valid: np.ndarray  # (256, 256) bool texels covered by the UV layout
    grid_faces: np.ndarray  # (M, 3) triangles of the valid UV grid (uv_grid_mesh), texel indices
    tv: sp.csr_matrix  # (E, 64*64) first differences, vertical then horizontal
    face_uv: np.ndarray  # (256, 256) bool: the model's face region (ModelMasks.face) in UV
    uv_raster: UVRaster  # the model's UV raster at 256 x 256 (facehd.uv)


_OPERATORS: dict[int, tuple[MorphableModel, UVOperators]] = {}


def uv_operators(model: MorphableModel) -> UVOperators:
    """The model's `UVOperators`, built once per model object (cached)."""
    cached = _OPERATORS.get(id(model))
    if cached is not None and cached[0] is model:
        return cached[1]
    if model.uv is None:
        raise InputError(f"{model.source or 'this model'} has no per-vertex UVs: detail maps need them")
    uv = model.uv.detach().cpu()
    faces = model.faces.detach().cpu()
    raster = uv_rasterize(uv, faces, (DISP_SIZE, DISP_SIZE))
    valid = raster.mask.numpy()
    texel = np.flatnonzero(valid)
    corners = faces.numpy()[raster.face_index.numpy().reshape(-1)[texel]]
    bary = raster.bary.double().numpy().reshape(-1, 3)[texel]
    raster_matrix = sp.csr_matrix((bary.ravel(), (np.repeat(texel, 3), corners.ravel())),
                                  shape=(DISP_SIZE * DISP_SIZE, model.n_vertices))
    _, grid_faces = uv_grid_mesh(DISP_SIZE, DISP_SIZE, mask=raster.mask)
    ops = UVOperators(
        sample=_bilinear_matrix(uv.double().numpy(), DEF_SIZE),
        raster=raster_matrix,
        valid=valid,
        grid_faces=grid_faces.numpy(),
        tv=_difference_matrix(DEF_SIZE),
        face_uv=uv_masks(model, model_masks(model), DISP_SIZE, raster)["face"],
        uv_raster=raster,
    )
    _OPERATORS.clear()  # one model at a time per process is the common case; keep memory flat
    _OPERATORS[id(model)] = (model, ops)
    return ops


def _bilinear_matrix(uv: np.ndarray, size: int) -> sp.csr_matrix:
    """(N, size^2) weights of `sample_uv_map`'s bilinear lookup (grid_sample, align_corners=False,
    border padding: coordinates clamped to the outer texel centres)."""
    x = np.clip(uv[:, 0] * size - 0.5, 0.0, size - 1)
    y = np.clip((1.0 - uv[:, 1]) * size - 0.5, 0.0, size - 1)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = x - x0, y - y0
    x1, y1 = np.minimum(x0 + 1, size - 1), np.minimum(y0 + 1, size - 1)
    cols = np.stack([y0 * size + x0, y0 * size + x1, y1 * size + x0, y1 * size + x1], axis=1)
    vals = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], axis=1)
    rows = np.repeat(np.arange(len(uv)), 4)
    return sp.csr_matrix((vals.ravel(), (rows, cols.ravel())), shape=(len(uv), size * size))


def _difference_matrix(size: int) -> sp.csr_matrix:
    """(2 size (size-1), size^2) vertical then horizontal first differences of a size^2 grid."""
    index = np.arange(size * size).reshape(size, size)
    pairs = [(index[1:, :].ravel(), index[:-1, :].ravel()), (index[:, 1:].ravel(), index[:, :-1].ravel())]
    rows, cols, vals, start = [], [], [], 0
    for plus, minus in pairs:
        r = start + np.arange(len(plus))
        rows += [r, r]
        cols += [plus, minus]
        vals += [np.ones(len(plus)), -np.ones(len(plus))]
        start += len(plus)
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(start, size * size))


# --- the detailed surface ----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DetailedSurface:
    """The dense detailed mesh: one vertex per displacement texel (r * 256 + c), model units."""

    vertices: np.ndarray  # (256 * 256, 3); texels outside `valid` are at 0 and unused
    faces: np.ndarray  # (M, 3) triangles of the valid texels
    valid: np.ndarray  # (256, 256) bool


def detailed_surface(model: MorphableModel, coeffs, deformation, displacement) -> DetailedSurface:
    """The shared definition of the detailed surface, with `facehd.uv`'s functions:
    M0 = mean + id + exp; M1 = M0 + sample_uv_map(deformation (3, 64, 64), uv);
    P1 = rasterize_attributes(M1); N0 = rasterize_attributes(vertex_normals(M0)) (normalized);
    vertices = dense_positions_from_map(P1, N0, displacement (1, 256, 256)) on the valid UV grid."""
    m = model.to(dtype=torch.float64)
    m0 = torch.as_tensor(model_shape(model, coeffs))
    m1 = m0 + sample_uv_map(torch.as_tensor(np.asarray(deformation, dtype=np.float64)), m.uv)
    size = (DISP_SIZE, DISP_SIZE)
    p1, valid = rasterize_attributes(m1, m.uv, m.faces, size)
    n0, _ = rasterize_attributes(vertex_normals(m0[None], m.faces, m.point_buf)[0], m.uv, m.faces, size)
    disp = torch.as_tensor(np.asarray(displacement, dtype=np.float64)) * valid
    vertices = dense_positions_from_map(p1[None], n0[None], disp[None])[0]
    _, faces = uv_grid_mesh(DISP_SIZE, DISP_SIZE, mask=valid)
    return DetailedSurface(vertices.numpy(), faces.numpy(), valid.numpy())


# --- the fit -----------------------------------------------------------------------------------


def fit_gt_maps(model: MorphableModel, coeffs, points, *, masks: ModelMasks | None = None,
                options: GTMapOptions = GTMapOptions()) -> GTMaps:
    """Fit the deformation and displacement maps of the frozen shape `coeffs` (257,) to scan
    points (P, 3) already aligned to model space and masked (model units).

    Stage 1 fits the deformation map against M1 = M0 + sample(D): rounds of closest points on M1
    and a sparse least-squares solve of the point-to-plane residuals plus HRN's squared TV and the
    squared TV of D's Laplacian (keeps wrinkles out of D). Stage 2 fits the displacement map on the
    dense UV-grid surface P1 + d N0: rounds of closest points and a sparse solve of the residuals
    along N0 plus L1 (IRLS) and a squared-Laplacian smoothness set from the scan's noise. Both
    stages use Huber weights. `masks` (default: of M0) decides the face region of the masks.
    """
    points = as_points(points, "scan points")
    ops = uv_operators(model)
    m0 = model_shape(model, coeffs)
    faces = model.faces.cpu().numpy()
    rng = np.random.default_rng(options.seed)
    sample = points if len(points) <= options.deformation_max_points else \
        points[np.sort(rng.choice(len(points), options.deformation_max_points, replace=False))]
    deformation = _fit_deformation(ops, m0, faces, sample, options)
    m1 = m0 + ops.sample @ deformation
    p1 = ops.raster @ m1
    normals = vertex_normals(torch.as_tensor(m0)[None], model.faces, model.point_buf)[0].numpy()
    n0 = ops.raster @ normals
    n0 /= np.maximum(np.linalg.norm(n0, axis=1, keepdims=True), 1e-12)
    disp, fit = _fit_displacement(ops, p1, n0, points, options)
    face_uv = ops.face_uv if masks is None else uv_masks(model, masks, DISP_SIZE, ops.uv_raster)["face"]
    support = _dilate(fit.texel_hits > 0, SUPPORT_RADIUS_TEXELS)
    disp_mask = ops.valid & face_uv & support
    def_mask = _pool_fraction(disp_mask, DISP_SIZE // DEF_SIZE) >= DEFORMATION_MASK_FRACTION
    residual = np.abs(fit.residuals) / MM
    return GTMaps(
        deformation=deformation.T.reshape(3, DEF_SIZE, DEF_SIZE),
        displacement=(disp * ops.valid.ravel()).reshape(1, DISP_SIZE, DISP_SIZE),
        deformation_mask=def_mask[None],
        displacement_mask=disp_mask[None],
        deformation_valid=(_pool_fraction(ops.valid, DISP_SIZE // DEF_SIZE) > 0)[None],
        displacement_valid=ops.valid[None],
        coeffs=np.asarray(coeffs, dtype=np.float64).copy(),
        residual_mm=fit.texel_rms.reshape(1, DISP_SIZE, DISP_SIZE) / MM,
        residual_rms_mm=float(np.sqrt(np.mean(residual**2))) if len(residual) else float("nan"),
        residual_p95_mm=float(np.percentile(residual, 95)) if len(residual) else float("nan"),
        points_used=int(len(residual)),
    )


def _huber(residuals: np.ndarray, threshold_mm: float = HUBER_MM) -> np.ndarray:
    scale = threshold_mm * MM
    return np.minimum(1.0, scale / np.maximum(np.abs(residuals), 1e-300))


def _interp_matrix(corners: np.ndarray, weights: np.ndarray, n: int) -> sp.csr_matrix:
    """(P, n) sparse rows holding each point's barycentric weights on its triangle's corners."""
    rows = np.repeat(np.arange(len(corners)), corners.shape[1])
    return sp.csr_matrix((weights.ravel(), (rows, corners.ravel())), shape=(len(corners), n))


def _fit_deformation(ops: UVOperators, m0: np.ndarray, faces: np.ndarray, points: np.ndarray,
                     options: GTMapOptions) -> np.ndarray:
    """(64*64, 3) deformation texels: point-to-plane least squares against M1 with squared TV of
    the map and of its Laplacian."""
    n_tex = DEF_SIZE * DEF_SIZE
    scale = TV_FACTOR / (3 * ops.tv.shape[0] / 2)  # HRN's means over C x (H-1) x W
    tv = ops.tv.T @ ops.tv
    laplacian_tv = tv @ tv @ tv  # (D L)^T (D L) with L = D^T D
    per_channel = (options.tv_weight * scale) * tv + (options.laplacian_tv_weight * scale) * laplacian_tv
    reg = sp.block_diag([per_channel] * 3) + DEFORMATION_RIDGE * sp.eye(3 * n_tex)
    deformation = np.zeros((n_tex, 3))
    for max_distance, huber_mm in zip(options.deformation_distances_mm, options.deformation_huber_mm):
        m1 = m0 + ops.sample @ deformation
        hit = SurfaceIndex(m1, faces).closest(points)
        near = hit.distances < max_distance * MM
        if not near.any():
            raise InputError(f"no scan point lies within {max_distance} mm of the coarse shape: is the scan aligned?")
        corners = faces[hit.face_index[near]]
        normals = face_normals_np(m1, faces)[hit.face_index[near]]
        interp = _interp_matrix(corners, hit.barycentric[near], len(m0))
        texels = interp @ ops.sample  # (P, 64*64)
        design = sp.hstack([sp.diags(normals[:, d]) @ texels for d in range(3)]).tocsr()
        rhs = np.einsum("pd,pd->p", normals, points[near] - interp @ m0)
        current = design @ deformation.T.ravel() - rhs
        weights = _huber(current, huber_mm)
        weights /= weights.sum()  # the mean weight stays 1/P, so the TV balance does not drift
        lhs = design.T @ sp.diags(weights) @ design + reg
        solution = _solve_spd(lhs.tocsr(), design.T @ (weights * rhs), deformation.T.ravel())
        deformation = solution.reshape(3, n_tex).T
    return deformation


@dataclass(frozen=True, eq=False)
class _DisplacementFit:
    residuals: np.ndarray  # (P,) signed residual along N0 of the points used, model units
    texel_hits: np.ndarray  # (256*256,) scan points whose closest point's nearest texel is this one
    texel_rms: np.ndarray  # (256*256,) RMS residual of those points, model units (0 without any)


def _fit_displacement(ops: UVOperators, p1: np.ndarray, n0: np.ndarray, points: np.ndarray,
                      options: GTMapOptions) -> tuple[np.ndarray, _DisplacementFit]:
    """(256*256,) displacement texels: residuals along N0 on the dense surface, L1 by IRLS."""
    n_tex = DISP_SIZE * DISP_SIZE
    valid = ops.valid.ravel()
    n_valid = int(valid.sum())
    grad = _difference_matrix(DISP_SIZE)
    grad = grad[np.asarray(np.abs(grad) @ valid.astype(np.float64) == 2).ravel()]  # both texels valid
    laplacian = grad.T @ grad
    bending = laplacian @ laplacian * (TV_FACTOR / grad.shape[0])
    smooth_weight = SMOOTH_WEIGHT if options.smooth_weight is None else options.smooth_weight
    disp = np.zeros(n_tex)
    for round_, max_distance in enumerate(options.displacement_distances_mm):
        surface = p1 + disp[:, None] * n0
        hit = SurfaceIndex(surface, ops.grid_faces).closest(points)
        near = hit.distances < max_distance * MM
        corners = ops.grid_faces[hit.face_index[near]]
        weights = hit.barycentric[near]
        direction = np.einsum("pk,pkd->pd", weights, n0[corners])
        direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-12)
        # d's coefficient is w_k (m . N0_k), the part of texel k's normal along the measured direction
        coef = weights * np.einsum("pd,pkd->pk", direction, n0[corners])
        design = _interp_matrix(corners, coef, n_tex)
        rhs = np.einsum("pd,pd->p", direction, points[near] - np.einsum("pk,pkd->pd", weights, p1[corners]))
        point_w = _huber(design @ disp - rhs) / len(rhs)
        lhs = design.T @ sp.diags(point_w) @ design + smooth_weight * bending
        if round_ > 0 and options.l1_weight > 0:
            # IRLS for l1_weight * mean|d|: |d| ~ d^2 / |d_prev|
            irls = options.l1_weight / (n_valid * np.maximum(np.abs(disp), L1_EPS_MM * MM))
            lhs = lhs + sp.diags(irls * valid)
        lhs = lhs + sp.diags(np.where(valid, 1e-12, 1.0))  # pins texels outside the layout at 0
        disp = _solve_spd(lhs.tocsr(), design.T @ (point_w * rhs), disp)
        if round_ == 0 and options.smooth_weight is None:
            smooth_weight = _noise_adapted_weight(design @ disp - rhs, corners, weights)
    residuals = design @ disp - rhs
    nearest = corners[np.arange(len(corners)), np.argmax(weights, axis=1)]
    hits = np.bincount(nearest, minlength=n_tex)
    sq = np.bincount(nearest, weights=residuals**2, minlength=n_tex)
    rms = np.sqrt(sq / np.maximum(hits, 1))
    return disp, _DisplacementFit(residuals, hits, rms)


def _noise_adapted_weight(residuals: np.ndarray, corners: np.ndarray, weights: np.ndarray) -> float:
    """The smoothness weight for the noise per texel (see SMOOTH_WEIGHT): the residuals' robust
    spread over the square root of the mean number of points per texel that points fall nearest to."""
    sigma_mm = MAD_TO_SIGMA * float(np.median(np.abs(residuals))) / MM
    nearest = corners[np.arange(len(corners)), np.argmax(weights, axis=1)]
    points_per_texel = len(nearest) / max(len(np.unique(nearest)), 1)
    weight = SMOOTH_WEIGHT * (sigma_mm / SMOOTH_REFERENCE_MM) ** 2 / points_per_texel
    return float(np.clip(weight, *SMOOTH_WEIGHT_RANGE))


def _solve_spd(lhs: sp.csr_matrix, rhs: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Jacobi-preconditioned conjugate gradients from `start` (a warm start from the last round).

    Written out rather than scipy's `cg`: its vector products go to a multithreaded BLAS, whose
    threads spin for vectors this short and slow the solve down tenfold on a busy machine;
    einsum's plain loops do not.
    """
    inv_diag = 1.0 / lhs.diagonal()
    x = start.copy()
    r = rhs - lhs @ x
    z = r * inv_diag
    p = z.copy()
    rz = _dot(r, z)
    stop = (CG_TOL * np.sqrt(_dot(rhs, rhs))) ** 2
    for _ in range(CG_MAX_ITER):
        if _dot(r, r) <= stop:
            break
        q = lhs @ p
        step = rz / _dot(p, q)
        x += step * p
        r -= step * q
        z = r * inv_diag
        rz_next = _dot(r, z)
        p *= rz_next / rz
        p += z
        rz = rz_next
    return x


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.einsum("i,i->", a, b))


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """(H*W,) or (H, W) bool -> (H, W) bool, grown by `radius` texels (square neighbourhood)."""
    grid = mask.reshape(DISP_SIZE, DISP_SIZE)
    out = grid.copy()
    for dr in range(-radius, radius + 1):
        for dc in range(-radius, radius + 1):
            out |= np.roll(np.roll(grid, dr, axis=0), dc, axis=1)
    return out


def _pool_fraction(mask: np.ndarray, factor: int) -> np.ndarray:
    """(H, W) bool -> (H/f, W/f) fraction of True texels in each f x f block."""
    h, w = mask.shape
    return mask.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


# --- comparison with a known truth -------------------------------------------------------------


@dataclass(frozen=True)
class TruthComparison:
    """Fitted maps against a synthetic capture's truth, on the trusted texels, in scan mm."""

    surface_rms_mm: float  # fitted detailed surface -> true surface, point-to-surface, RMS
    surface_p95_mm: float
    displacement_corr: float  # fitted d vs the true d at the same surface points (closest point)
    displacement_corr_texel: float  # fitted d vs the true d at the same texel
    texels: int
    # fitted deformation map vs the true one (xyz offsets turned into the fitted model frame) on the
    # trusted texels of the 64 x 64 map; NaN when the truth has no `deformation_map`
    deformation_corr: float = float("nan")


def compare_with_truth(model: MorphableModel, maps: GTMaps, scan_to_model, truth) -> TruthComparison:
    """Measure `maps` (fitted with the alignment `scan_to_model`, a `Similarity`) against a truth
    record with `surface_vertices`, `surface_faces`, `displacement_map` and `scan_to_model` (4x4),
    as the FaceHD-100 generator writes it. Both surfaces are compared in the scan's millimetres, so
    a different (equally valid) model-space frame is not counted as error; the correlation at the
    same surface points likewise follows the surface rather than the texel grid."""
    from facehd.procrustes import Similarity

    surface = detailed_surface(model, maps.coeffs, maps.deformation, maps.displacement)
    sel = maps.displacement_mask.reshape(-1)
    fitted_mm = scan_to_model.inverse().apply(surface.vertices[sel])
    true_to_mm = Similarity.from_matrix(np.asarray(truth["scan_to_model"])).inverse()
    faces = np.asarray(truth["surface_faces"])
    index = SurfaceIndex(true_to_mm.apply(np.asarray(truth["surface_vertices"])), faces)
    hit = index.closest(fitted_mm)
    true_d = np.asarray(truth["displacement_map"], dtype=np.float64).reshape(-1)
    at_points = np.einsum("pk,pk->p", hit.barycentric, true_d[faces[hit.face_index]])
    fitted_d = maps.displacement.reshape(-1)[sel]
    return TruthComparison(
        surface_rms_mm=float(np.sqrt(np.mean(hit.distances**2))),
        surface_p95_mm=float(np.percentile(hit.distances, 95)),
        displacement_corr=float(np.corrcoef(fitted_d, at_points)[0, 1]),
        displacement_corr_texel=float(np.corrcoef(fitted_d, true_d[sel])[0, 1]),
        texels=int(sel.sum()),
        deformation_corr=deformation_correlation(maps, scan_to_model, truth),
    )


def deformation_correlation(maps: GTMaps, scan_to_model, truth) -> float:
    """Correlation of the fitted deformation map with the truth's `deformation_map` over the
    trusted texels, all three channels pooled. The true offsets are turned from the truth's model
    frame into the fitted one (through the scan: its `scan_to_model` and the fitted alignment),
    so an equally valid frame is not counted as error; the coarse shapes are not aligned, so a
    fitted M0 that absorbed part of the mid-frequency shape lowers it. NaN without a true map."""
    from facehd.procrustes import Similarity

    if "deformation_map" not in truth:
        return float("nan")
    true_frame = Similarity.from_matrix(np.asarray(truth["scan_to_model"]))
    turn = (scan_to_model.scale / true_frame.scale) * scan_to_model.rotation @ true_frame.rotation.T
    true = np.einsum("ij,jhw->ihw", turn, np.asarray(truth["deformation_map"], dtype=np.float64))
    trusted = maps.deformation_mask[0].astype(bool)
    return float(np.corrcoef(maps.deformation[:, trusted].ravel(), true[:, trusted].ravel())[0, 1])


# --- files -------------------------------------------------------------------------------------

GT_FORMAT_VERSION = 3  # bump when the npz content or the fitting method changes
PREVIEW_PNG = "preview.png"
PREVIEW_RESIDUAL_MAX_MM = 0.2  # the residual heat map saturates here


def write_gt_maps(folder: str | Path, views: dict[str, GTMaps], extra: dict[str, np.ndarray]) -> list[Path]:
    """Write `<folder>/<view>.npz` for every view, each atomically (`GTMaps.arrays` plus `extra`
    and the view's name); returns the paths."""
    paths = []
    for view, maps in views.items():
        path = Path(folder) / f"{view}.npz"
        with atomic_path(path) as tmp:
            np.savez_compressed(tmp, **maps.arrays(), **extra, view=np.str_(view))
        paths.append(path)
    return paths


def write_preview(path: str | Path, maps: GTMaps, title: str = "") -> None:
    """A PNG of the deformation map (xyz as RGB, symmetric range), the displacement map and the
    residual heat map (mm), masked texels dimmed; written atomically."""
    from matplotlib.figure import Figure

    deformation = maps.deformation.transpose(1, 2, 0) / MM
    scale = max(float(np.abs(deformation).max()), 1e-9)
    rgb = np.clip(0.5 + 0.5 * deformation / scale, 0.0, 1.0) * np.where(maps.deformation_mask[0], 1.0, 0.4)[..., None]
    disp = maps.displacement[0] / MM
    disp_range = max(float(np.percentile(np.abs(disp[maps.displacement_mask[0]]), 99)), 1e-6) \
        if maps.displacement_mask.any() else 1.0
    residual = np.where(maps.displacement_mask[0], maps.residual_mm[0], np.nan)
    fig = Figure(figsize=(13.5, 4.6), dpi=100)
    axes = fig.subplots(1, 3)
    panels = [
        (rgb, {}, f"deformation (xyz -> rgb, +-{scale:.2f} mm)"),
        (np.where(maps.displacement_mask[0], disp, np.nan), {"cmap": "coolwarm", "vmin": -disp_range,
                                                             "vmax": disp_range}, "displacement (mm)"),
        (residual, {"cmap": "inferno", "vmin": 0.0, "vmax": PREVIEW_RESIDUAL_MAX_MM},
         f"scan residual (mm), RMS {maps.residual_rms_mm:.3f}"),
    ]
    for ax, (image, style, label) in zip(axes, panels):
        shown = ax.imshow(image, interpolation="nearest", **style)
        ax.set_title(label, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        if style:
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


# --- one capture -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GTJob:
    """Everything `gt_maps_capture` needs besides the capture (picklable for worker processes)."""

    align: AlignJob  # the alignment (and its model, coefficients and output root)
    options: GTMapOptions = GTMapOptions()
    preview: bool = True

    @contextlib.contextmanager
    def prepared(self) -> Iterator[GTJob]:
        """This job with its model in a file that worker processes load (see `ModelSource`)."""
        with self.align.prepared() as align:
            yield dataclasses.replace(self, align=align)


def gt_maps_folder(ref: CaptureRef, out: Path) -> Path:
    return Path(out) / ref.subject / ref.expression / GT_MAPS_DIR


def gt_digest(ref: CaptureRef, job: GTJob, views: list[str], coeff_paths: dict[str, Path]) -> str:
    """Digest of everything the maps depend on: the alignment's inputs, the per-view coefficient
    files, the fitting options and the views."""
    params = {"tool": "gt-maps", "version": GT_FORMAT_VERSION, "options": job.options.to_dict(),
              "views": views, "align": align_digest(ref, job.align, coeff_paths)}
    return inputs_digest([coeff_paths.get(v) for v in views], params)


def _npz_digest(path: Path) -> str | None:
    try:
        with np.load(path) as npz:
            return str(npz["inputs_digest"])
    except (OSError, ValueError, KeyError):
        return None


def gt_up_to_date(ref: CaptureRef, job: GTJob) -> bool:
    """Whether every view's npz (and the preview) was written from the current inputs."""
    try:
        views = capture_views(ref)
        digest = gt_digest(ref, job, views, capture_coeff_files(ref, job.align))
    except FaceHDError:
        return False
    folder = gt_maps_folder(ref, job.align.out)
    if job.align.force or (job.preview and not (folder / PREVIEW_PNG).is_file()):
        return False
    return all(_npz_digest(folder / f"{view}.npz") == digest for view in views)


def gt_maps_capture(ref: CaptureRef, job: GTJob) -> bool:
    """Fit and write one capture's maps (aligning it first when its align.json is missing or
    stale): gt_maps/<view>.npz for every view and preview.png of the first view's maps; False
    when they were already up to date. When it fails, maps that do not match the current inputs
    (or whose inputs cannot be read) are removed, so no stale map stays looking valid."""
    digest = None
    try:
        if gt_up_to_date(ref, job):
            return False
        views = capture_views(ref)
        coeff_paths = capture_coeff_files(ref, job.align)
        digest = gt_digest(ref, job, views, coeff_paths)
        _fit_capture(ref, job, views, coeff_paths, digest)
        return True
    except Exception:
        _remove_stale_maps(gt_maps_folder(ref, job.align.out), digest)
        raise


def _remove_stale_maps(folder: Path, digest: str | None) -> None:
    """Remove the npz files not written with `digest` (all of them when it is None), and the
    preview with them."""
    stale = [p for p in sorted(folder.glob("*.npz")) if digest is None or _npz_digest(p) != digest]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale or digest is None:
        (folder / PREVIEW_PNG).unlink(missing_ok=True)


def _fit_capture(ref: CaptureRef, job: GTJob, views: list[str], coeff_paths: dict[str, Path], digest: str) -> None:
    inputs = capture_digest(ref.paths)  # before reading them: a file changed meanwhile shows as stale
    alignment, _ = align_capture(ref, job.align)
    model = job.align.model.load()
    scan, _ = load_scan_inputs(ref)
    points, labels = aligned_face_points(scan, alignment, model)
    kept = points[labels.keep]
    if len(kept) < MIN_FIT_POINTS:
        raise InputError(f"{ref.paths.scan}: only {len(kept)} scan points are left on the face after alignment "
                         f"and masking (need {MIN_FIT_POINTS})")
    per_view = _fit_views(model, alignment, kept, views, coeff_paths, job.options)
    extra = {
        "inputs_digest": np.str_(digest),
        CAPTURE_DIGEST_KEY: np.str_(inputs),
        "scan_to_model": alignment.scan_to_model.as_matrix(),
        "units": np.str_(f"maps and coeffs in model units (1 unit = {cv.MM_PER_MODEL_UNIT:g} mm); residuals in mm"),
        "facehd_version": np.str_(__version__),
    }
    folder = gt_maps_folder(ref, job.align.out)
    for view, (maps, source) in per_view.items():
        write_gt_maps(folder, {view: maps}, {**extra, "coeffs_source": np.str_(source)})
    if job.preview:
        first, (maps, _) = next(iter(per_view.items()))
        write_preview(folder / PREVIEW_PNG, maps, f"{capture_name(ref)} ({first})")


def _fit_views(model: MorphableModel, alignment: Alignment, points: np.ndarray, views: list[str],
               coeff_paths: dict[str, Path], options: GTMapOptions) -> dict[str, tuple[GTMaps, str]]:
    """One fit per distinct coefficient vector: views sharing a file (or the fitted coefficients)
    share the maps, since the maps live in model space, not in any view."""
    fits: dict[str, GTMaps] = {}
    out = {}
    for view in views:
        path = coeff_paths.get(view)
        key = "fit" if path is None else str(path)
        if key not in fits:
            coeffs = alignment.coeffs if path is None else read_coeffs(path)
            fits[key] = fit_gt_maps(model, coeffs, points, masks=model_masks(model, model_shape(model, coeffs)),
                                    options=options)
        out[view] = (fits[key], alignment.coeffs_source if path is None else key)
    return out


def gt_maps_task(job: GTJob, ref: CaptureRef) -> ItemResult:
    """`gt_maps_capture` as a batch item (module level, so worker processes can run it)."""
    return run_item(capture_name(ref), lambda: "done" if gt_maps_capture(ref, job) else "skipped")


def gt_maps_dataset(root: str | Path, job: GTJob, *, workers: int = 1, shard: Shard | None = None,
                    progress: Progress | None = None,
                    on_result: Callable[[ItemResult], None] | None = None) -> BatchReport:
    """Fit the maps of every capture of a dataset (this shard of them), writing
    <out>/<subject>/<expression>/gt_maps/<view>.npz and preview.png (and align.json where it is
    missing or stale); up-to-date captures are skipped, failures reported while the rest go on."""
    job.align.model.check(need_uv=True)  # before any capture is aligned
    refs = (shard or Shard()).select(dataset_captures(root, job.align.out))
    remove_leftovers(refs, job.align.out)
    return run_resumable(refs, name=capture_name, up_to_date=functools.partial(gt_up_to_date, job=job),
                         task=gt_maps_task, prepare=job.prepared, workers=workers, progress=progress,
                         on_result=on_result, desc="gt-maps")
