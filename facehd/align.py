"""Scan-to-BFM alignment: a similarity from the 7 landmark pairs, rigid point-to-plane ICP on the
scan's face region, and the coarse shape M0 (coefficient files, or a fit of id and exp)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse as sp
import torch
from scipy.spatial.transform import Rotation

from facehd import __version__
from facehd import conventions as cv
from facehd.batch import BatchReport, ItemResult, Progress, Shard, inputs_digest, run_item, run_resumable
from facehd.capture import CAMERA_NAMES, CaptureRef, find_captures, read_cameras, read_landmarks7
from facehd.dataset import ALIGN_JSON, GT_MAPS_DIR, capture_digest
from facehd.distance import SurfaceIndex, as_points, face_normals_np, vertex_normals_np
from facehd.errors import FaceHDError, FileFormatError, InputError
from facehd.fsutil import atomic_open, owned_temporary_folder, remove_stale_parts
from facehd.icp import rigid_icp
from facehd.masks import ModelMasks, ScanMask, model_masks, scan_mask
from facehd.morphable import MorphableModel, compute_shape, load_morphable_model
from facehd.procrustes import Similarity, check_landmark_fit, fit_similarity
from facehd.uv import read_uv_file

MM = 1.0 / cv.MM_PER_MODEL_UNIT  # model units per millimetre

# Landmark fit: a mean face and a real one differ by a few millimetres at the eye and mouth
# corners; beyond this RMS the landmarks belong to something else (wrong order, wrong file).
MAX_LANDMARK_RMS_MM = 12.0
# Scans are in millimetres and the model in units of 100 mm, so the landmark scale must be near
# 1/100; a scan in metres or centimetres (or model units) is off by 10x or more.
SCALE_TOLERANCE = 1.6  # accepted ratio either way: face sizes vary by ~20%
# How the scan-to-model scale is set after the landmark similarity: "metric" (scans in mm, the
# model in units of 100 mm: the scale is known, and the landmark scale, which mixes the subject's
# size with the units, only checks the units) or "landmarks" (keep the Procrustes scale).
SCALE_MODES = ("metric", "landmarks")
# Before ICP the face region is taken generously: the landmark pose can be a few mm off.
FACE_REGION_INITIAL_MM = 20.0
MIN_FACE_POINTS = 500  # fewer aligned face points than this: no face region to fit
# ICP correspondence distances (mm) per stage: the first catches a landmark-level error, the
# last is near the mid-frequency shape the coarse model lacks, so spikes and borders drop out.
ICP_DISTANCES_MM = (10.0, 5.0, 2.5)
ICP_ITERATIONS = 30
# Coefficient fit when no coefficient file is given: rounds of (fit id + exp, then rigid ICP).
FIT_ROUNDS = 3
FIT_STEPS_PER_ROUND = 3  # Gauss-Newton steps (closest points, then solve) between ICP runs
FIT_MAX_POINTS = 8_000  # scan points per round: plenty for 150 unknowns, fast closest points
ICP_MAX_POINTS = 20_000  # face points ICP uses: a 6-parameter fit needs no more
# Per-coefficient Gaussian prior (the bases are premultiplied by their standard deviations, so a
# coefficient is ~N(0, 1)); its weight equals a mean squared residual of PRIOR_RESIDUAL_MM^2.
PRIOR_RESIDUAL_MM = 0.01
LANDMARK_WEIGHT = 0.05  # landmark rows relative to the mean point row (they guide, points decide)
# The fit's landmark weight per round: hand-clicked landmarks are off by a millimetre or so, which
# is enough to bend identity and expression around them; they steer the first round, when the shape
# may still be far off, and the dense points alone decide the later ones (on the synthetic
# FaceHD-100 this raised the GT displacement's correlation with the truth from 0.89 to 0.91).
LANDMARK_WEIGHTS_BY_ROUND = (LANDMARK_WEIGHT, 0.0)
FIT_MAX_DISTANCE_MM = 5.0  # closest-point pairs farther than this are left out of the fit
DEFAULT_SEED = 0

COEFF_SUFFIXES = (".npz", ".mat")
DEEP3D_KEYS = ("id", "exp", "tex", "angle", "gamma", "trans")  # Deep3DFaceRecon's .mat layout


@dataclass(frozen=True)
class AlignOptions:
    """Parameters of `align_scan` (lengths in mm)."""

    scale: str = "metric"
    max_landmark_rms_mm: float = MAX_LANDMARK_RMS_MM
    icp_distances_mm: tuple[float, ...] = ICP_DISTANCES_MM
    icp_iterations: int = ICP_ITERATIONS
    fit_rounds: int = FIT_ROUNDS
    fit_max_points: int = FIT_MAX_POINTS
    prior_residual_mm: float = PRIOR_RESIDUAL_MM
    seed: int = DEFAULT_SEED

    def __post_init__(self):
        if self.scale not in SCALE_MODES:
            raise InputError(f"scale must be one of {', '.join(SCALE_MODES)}, got {self.scale!r}")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True, eq=False)
class Alignment:
    """A scan aligned to the model: the transform, the coarse shape's coefficients and the fit quality."""

    scan_to_model: Similarity  # scan millimetres -> model units
    coeffs: np.ndarray  # (257,) the coarse shape M0 (id and exp used; the rest as given)
    coeffs_source: str  # "fit" or the coefficient file(s)
    landmark_residuals_mm: np.ndarray  # (7,) |aligned scan landmark - model landmark| in mm
    icp_fitness: float  # fraction of face points within the last ICP distance
    icp_inlier_rmse_mm: float  # RMS distance of those points to their model vertex, mm
    icp_max_distance_mm: float  # the last ICP stage's correspondence distance
    scan_labels: dict[str, int] = field(default_factory=dict)  # scan points per `SCAN_LABELS`

    @property
    def landmark_rms_mm(self) -> float:
        return float(np.sqrt(np.mean(self.landmark_residuals_mm**2)))

    def to_dict(self) -> dict:
        """The align.json record (JSON-ready)."""
        return {
            "scan_to_model": self.scan_to_model.to_dict(),
            "scan_to_model_matrix": self.scan_to_model.as_matrix().tolist(),
            "units": {"scan": "mm", "model": f"model units (1 unit = {cv.MM_PER_MODEL_UNIT:g} mm)"},
            "convention": "x_model = scale * rotation @ x_scan + translation",
            "landmarks": {
                "ibug": list(cv.LANDMARKS7_IBUG),
                "residuals_mm": self.landmark_residuals_mm.tolist(),
                "rms_mm": self.landmark_rms_mm,
            },
            "icp": {
                "method": "open3d point-to-plane, rigid, face region only",
                "fitness": self.icp_fitness,
                "inlier_rmse_mm": self.icp_inlier_rmse_mm,
                "max_distance_mm": self.icp_max_distance_mm,
            },
            "coefficients": {"source": self.coeffs_source, "coeffs": self.coeffs.tolist()},
            "scan_points": self.scan_labels,
        }

    @classmethod
    def from_dict(cls, record: dict, source: str | Path | None = None) -> Alignment:
        """Inverse of `to_dict` (e.g. of a read align.json); `source` names the file in errors."""
        try:
            coeffs = np.asarray(record["coefficients"]["coeffs"], dtype=np.float64)
            if coeffs.shape != (cv.N_COEFFS,):
                raise ValueError(f"coefficients have shape {coeffs.shape}, expected ({cv.N_COEFFS},)")
            return cls(
                scan_to_model=Similarity.from_dict(record["scan_to_model"]),
                coeffs=coeffs,
                coeffs_source=str(record["coefficients"]["source"]),
                landmark_residuals_mm=np.asarray(record["landmarks"]["residuals_mm"], dtype=np.float64),
                icp_fitness=float(record["icp"]["fitness"]),
                icp_inlier_rmse_mm=float(record["icp"]["inlier_rmse_mm"]),
                icp_max_distance_mm=float(record["icp"]["max_distance_mm"]),
                scan_labels=dict(record.get("scan_points", {})),
            )
        except (KeyError, TypeError, ValueError, InputError) as exc:
            raise FileFormatError(source, f"not an align.json record: {exc}") from None


# --- the alignment -----------------------------------------------------------------------------


def model_shape(model: MorphableModel, coeffs) -> np.ndarray:
    """(257,) coefficients (None: the mean) -> (N, 3) float64 id + exp shape M0, model units."""
    if coeffs is None:
        return model.mean_shape.detach().cpu().double().numpy()
    c = torch.as_tensor(np.asarray(coeffs, dtype=np.float64))[None]
    m = model.to(dtype=torch.float64)
    return compute_shape(m, c[:, cv.COEFF_SLICES["id"]], c[:, cv.COEFF_SLICES["exp"]])[0].numpy()


def align_scan(scan_vertices_mm, landmarks7_mm, model: MorphableModel, *, coeffs=None,
               coeffs_source: str = "fit", options: AlignOptions = AlignOptions(),
               source: str | Path | None = None, landmarks_source: str | Path | None = None) -> Alignment:
    """Align a scan (P, 3) in mm to the model, given its 7 landmarks (7, 3) in mm.

    1. Similarity (Umeyama, isotropic scale, no reflection) of the 7 scan landmarks onto the same
       model vertices (`model.landmarks7`) of M0, checked by `check_landmark_fit` (mirrored,
       degenerate, RMS above `max_landmark_rms_mm`) and for a millimetre scale; with
       `options.scale` "metric" (the default) the scale is then fixed to 1/100 (`landmark_similarity`).
    2. Rigid point-to-plane ICP (open3d, shrinking distances) of the scan's face region (its points
       on the model's front, away from eyes, nostrils, mouth interior and hair) onto M0's face.
    3. M0 is given by `coeffs` (257,), or else fitted: `fit_rounds` rounds of a regularized
       least-squares fit of id and exp (point-to-plane closest points, and the landmarks with the
       weights of `LANDMARK_WEIGHTS_BY_ROUND`) followed by ICP again.
    `source` (the scan file) and `landmarks_source` (the landmark file, default `source`) prefix
    the error messages about them.
    """
    landmarks_source = source if landmarks_source is None else landmarks_source
    points = as_points(scan_vertices_mm, f"{_prefix(source)}scan vertices")
    landmarks = as_points(landmarks7_mm, f"{_prefix(landmarks_source)}scan landmarks", rows=len(cv.LANDMARKS7_IBUG))
    lm_index = model.landmarks7.cpu().numpy()
    faces = model.faces.cpu().numpy()
    fitting = coeffs is None
    coeffs = np.zeros(cv.N_COEFFS) if fitting else _check_coeffs(coeffs, source)
    shape = model_shape(model, coeffs)
    transform = landmark_similarity(landmarks, shape[lm_index], options, landmarks_source)
    masks = model_masks(model, shape)
    face_points = _face_region(points, transform, shape, faces, masks, FACE_REGION_INITIAL_MM * MM, source)
    icp = _icp(face_points, transform, shape, faces, masks, options)
    transform = icp.transform
    rng = np.random.default_rng(options.seed)
    for round_ in range(options.fit_rounds if fitting else 0):
        sample = _subsample(face_points, options.fit_max_points, rng)
        weight = LANDMARK_WEIGHTS_BY_ROUND[min(round_, len(LANDMARK_WEIGHTS_BY_ROUND) - 1)]
        for _ in range(FIT_STEPS_PER_ROUND):
            coeffs, motion = fit_coefficients(model, transform.apply(sample), transform.apply(landmarks), coeffs,
                                              prior_residual_mm=options.prior_residual_mm, landmark_weight=weight)
            transform = motion.compose(transform)
        shape = model_shape(model, coeffs)
        masks = model_masks(model, shape)
        face_points = _face_region(points, transform, shape, faces, masks, FACE_REGION_INITIAL_MM * MM, source)
        icp = _icp(face_points, transform, shape, faces, masks, options)
        transform = icp.transform
    labels = scan_mask(transform.apply(points), shape, faces, masks)
    residuals_mm = np.linalg.norm(transform.apply(landmarks) - shape[lm_index], axis=1) / transform.scale
    return Alignment(
        scan_to_model=transform,
        coeffs=coeffs,
        coeffs_source=coeffs_source if not fitting else "fit",
        landmark_residuals_mm=residuals_mm,
        icp_fitness=icp.fitness,
        icp_inlier_rmse_mm=icp.inlier_rmse / transform.scale,
        icp_max_distance_mm=float(options.icp_distances_mm[-1]),
        scan_labels=labels.counts(),
    )


def aligned_face_points(scan_vertices_mm, alignment: Alignment, model: MorphableModel) -> tuple[np.ndarray, ScanMask]:
    """The scan in model units and its mask after `alignment`: (P, 3) points and which to fit."""
    points = alignment.scan_to_model.apply(as_points(scan_vertices_mm, "scan vertices"))
    shape = model_shape(model, alignment.coeffs)
    return points, scan_mask(points, shape, model.faces.cpu().numpy(), model_masks(model, shape))


def _prefix(source) -> str:
    """"<file>: " for error messages, or nothing when the caller gave no file."""
    return f"{source}: " if source else ""


def _check_coeffs(coeffs, source) -> np.ndarray:
    c = np.asarray(coeffs, dtype=np.float64).reshape(-1)
    if c.shape != (cv.N_COEFFS,) or not np.isfinite(c).all():
        raise InputError(f"{_prefix(source)}coefficients must be {cv.N_COEFFS} finite values, got shape {c.shape}")
    return c


def landmark_similarity(landmarks_mm, model_landmarks, options: AlignOptions = AlignOptions(),
                        source: str | Path | None = None) -> Similarity:
    """Scan landmarks (7, 3) mm -> model landmarks (7, 3): the checked Procrustes similarity
    (`check_landmark_fit`: degenerate, mirrored, RMS above `max_landmark_rms_mm`), refused when
    its scale says the scan is not in millimetres; with `options.scale` "metric" the result is the
    best rotation and translation at exactly 1/100 model units per mm."""
    fit = check_landmark_fit(landmarks_mm, model_landmarks, max_rms=options.max_landmark_rms_mm * MM,
                             source=str(source) if source else None, unit=(cv.MM_PER_MODEL_UNIT, "mm"))
    ratio = fit.transform.scale / MM
    if not 1.0 / SCALE_TOLERANCE <= ratio <= SCALE_TOLERANCE:
        raise InputError(f"{_prefix(source)}the landmarks give {1.0 / fit.transform.scale:.4g} scan units per "
                         f"model unit, expected about {cv.MM_PER_MODEL_UNIT:g} (scan in millimetres); is the scan in "
                         f"{_scan_unit_guess(ratio)}?")
    if options.scale == "landmarks":
        return fit.transform
    # metric: the best rotation and translation at the known scale
    rigid = fit_similarity(landmarks_mm * MM, model_landmarks, scale=False)
    return rigid.compose(Similarity(MM, np.eye(3), np.zeros(3)))


# Units a scan said to be in millimetres may really be in: name, millimetres per unit.
SCAN_UNIT_GUESSES = (("micrometres", 1e-3), ("centimetres", 10.0),
                     ("model units (decimetres: 1 unit = 100 mm)", cv.MM_PER_MODEL_UNIT), ("metres", 1000.0))


def _scan_unit_guess(mm_per_unit: float) -> str:
    """The unit of `SCAN_UNIT_GUESSES` nearest ``mm_per_unit`` (within sqrt(10)x), else 'another unit'."""
    name, size = min(SCAN_UNIT_GUESSES, key=lambda guess: abs(np.log10(mm_per_unit / guess[1])))
    return name if abs(np.log10(mm_per_unit / size)) <= 0.5 else "another unit"


def _face_region(points_mm: np.ndarray, transform: Similarity, shape: np.ndarray, faces: np.ndarray,
                 masks: ModelMasks, max_distance: float, source) -> np.ndarray:
    """The scan points (mm) that fall on the model's face region, noisy regions removed."""
    labels = scan_mask(transform.apply(points_mm), shape, faces, masks, max_distance=max_distance)
    kept = int(labels.keep.sum())
    if kept < MIN_FACE_POINTS:
        counts = ", ".join(f"{k} {v}" for k, v in labels.counts().items() if v)
        raise InputError(f"{_prefix(source)}no face region: {kept} of {len(points_mm)} scan points lie on the aligned "
                         f"model's face (need {MIN_FACE_POINTS}; {counts}); check the scan and its landmarks")
    return points_mm[labels.keep]


def _face_submesh(shape: np.ndarray, faces: np.ndarray, masks: ModelMasks) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and faces of the model's face region (unused vertices dropped: ICP matches
    target vertices, and a vertex without faces has no normal)."""
    keep = masks.face[faces].all(axis=1)
    sub = faces[keep]
    used, inverse = np.unique(sub, return_inverse=True)
    return shape[used], inverse.reshape(-1, 3)


def _icp(face_points_mm: np.ndarray, init: Similarity, shape: np.ndarray, faces: np.ndarray,
         masks: ModelMasks, options: AlignOptions):
    vertices, sub_faces = _face_submesh(shape, faces, masks)
    normals = vertex_normals_np(vertices, sub_faces)
    points = _subsample(face_points_mm, ICP_MAX_POINTS, np.random.default_rng(options.seed))
    with _open3d_single_thread():
        return rigid_icp(points, vertices, tgt_normals=normals, init=init,
                         max_distances=[d * MM for d in options.icp_distances_mm], iterations=options.icp_iterations)


@contextlib.contextmanager
def _open3d_single_thread() -> Iterator[None]:
    """open3d on one thread for the block. Its ICP sums the normal equations in parallel (TBB) in
    an order that changes from run to run: the pose moved by ~1e-16 between two runs on the same
    inputs, and the GT maps fitted to it by up to 1e-4 model units. One thread makes the same
    inputs give the same bytes, whatever the machine's load or core count."""
    import open3d as o3d

    before = o3d.utility.get_max_threads()
    o3d.utility.set_max_threads(1)
    try:
        yield
    finally:
        o3d.utility.set_max_threads(before)


def _subsample(points: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    if len(points) <= count:
        return points
    return points[np.sort(rng.choice(len(points), count, replace=False))]


# --- coefficient fit ---------------------------------------------------------------------------


def fit_coefficients(model: MorphableModel, points, landmarks, coeffs, *,
                     prior_residual_mm: float = PRIOR_RESIDUAL_MM,
                     max_distance_mm: float = FIT_MAX_DISTANCE_MM,
                     landmark_weight: float = LANDMARK_WEIGHT) -> tuple[np.ndarray, Similarity]:
    """Regularized least-squares id and exp coefficients, and a small rigid correction of the
    scan, for aligned scan points (P, 3) and the 7 aligned scan landmarks (7, 3), model units.

    One Gauss-Newton step from `coeffs` (257,): minimises
    mean_j (n_j . (M0(c)(q_j) - D(x_j)))^2 + landmark_weight mean_l |M0(c)[lm_l] - D(y_l)|^2
    + (prior_residual_mm MM)^2 |c|^2 over c and a linearized rigid motion D of the scan (free, so
    that motions of the face go to the pose rather than into identity), with q_j the closest
    point of x_j on the current shape (barycentric weights kept) and n_j its triangle's normal.
    Returns the new coefficients (the others kept) and D, to be composed after the alignment.
    """
    points, landmarks = np.asarray(points), np.asarray(landmarks)
    shape = model_shape(model, coeffs)
    faces = model.faces.cpu().numpy()
    hit = SurfaceIndex(shape, faces).closest(points)
    near = hit.distances < max_distance_mm * MM
    corners, weights, x = faces[hit.face_index[near]], hit.barycentric[near], points[near]
    normals = face_normals_np(shape, faces)[hit.face_index[near]]
    basis = _shape_basis(model)  # (N, 3, K)
    mean = model.mean_shape.detach().cpu().double().numpy()
    centre = x.mean(axis=0) if len(x) else landmarks.mean(axis=0)
    # point-to-plane rows: n . (sum_k w_k (mean_k + B_k c) - x - w x (x - centre) - t) = 0;
    # the basis part as three sparse (P, N) x (N, K) products, one per axis
    interp = sp.csr_matrix((weights.ravel(), (np.repeat(np.arange(len(x)), 3), corners.ravel())),
                           shape=(len(x), len(mean)))
    basis_rows = sum(sp.diags(normals[:, d]) @ (interp @ basis[:, d, :]) for d in range(3))
    rows = np.concatenate([basis_rows, -np.cross(x - centre, normals), -normals], axis=1)
    rhs = np.einsum("pd,pd->p", normals, x - interp @ mean)
    lm = model.landmarks7.cpu().numpy()
    arm = landmarks - centre
    cross = np.zeros((len(lm), 3, 3))  # [arm]_x, so that w x arm = -[arm]_x w
    cross[:, 0, 1], cross[:, 0, 2], cross[:, 1, 2] = -arm[:, 2], arm[:, 1], -arm[:, 0]
    cross -= cross.transpose(0, 2, 1)
    lm_rows = np.concatenate([basis[lm], cross, -np.broadcast_to(np.eye(3), (len(lm), 3, 3))], axis=2)
    lm_rows = lm_rows.reshape(-1, rows.shape[1])
    lm_rhs = (landmarks - mean[lm]).reshape(-1)
    n_coeffs = basis.shape[2]
    lhs = rows.T @ rows / max(len(rows), 1) + landmark_weight * lm_rows.T @ lm_rows / len(lm_rhs)
    lhs[:n_coeffs, :n_coeffs] += (prior_residual_mm * MM) ** 2 * np.eye(n_coeffs)
    b = rows.T @ rhs / max(len(rows), 1) + landmark_weight * lm_rows.T @ lm_rhs / len(lm_rhs)
    solution = np.linalg.solve(lhs, b)
    out = np.array(coeffs, dtype=np.float64)
    out[cv.COEFF_SLICES["id"]] = solution[: cv.N_ID]
    out[cv.COEFF_SLICES["exp"]] = solution[cv.N_ID:n_coeffs]
    rotation = Rotation.from_rotvec(solution[n_coeffs:n_coeffs + 3]).as_matrix()
    # x -> R (x - centre) + centre + t
    motion = Similarity(1.0, rotation, centre - rotation @ centre + solution[n_coeffs + 3:])
    return out, motion


def _shape_basis(model: MorphableModel) -> np.ndarray:
    """(N, 3, 144) id and exp bases per vertex, float64 (cached for the last model)."""
    cached = _BASES.get(id(model))
    if cached is not None and cached[0] is model:
        return cached[1]
    base = torch.cat([model.id_base, model.exp_base], dim=1).detach().cpu().double().numpy()
    basis = base.reshape(model.n_vertices, 3, -1)
    _BASES.clear()
    _BASES[id(model)] = (model, basis)
    return basis


_BASES: dict[int, tuple[MorphableModel, np.ndarray]] = {}


# --- coefficient files -------------------------------------------------------------------------


def read_coeffs(path: str | Path) -> np.ndarray:
    """A coefficient file -> (257,) float64: `.npz` with key `coeffs` (257 or 1 x 257 values), or a
    Deep3DFaceRecon-style `.mat` with keys id, exp, tex, angle, gamma, trans (or `coeffs`)."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(path, "coefficient file not found")
    try:
        if path.suffix == ".npz":
            with np.load(path) as npz:
                data = {k: npz[k] for k in npz.files}
        elif path.suffix == ".mat":
            data = scipy.io.loadmat(str(path))
        else:
            raise FileFormatError(path, f"unsupported coefficient file suffix (expected {' or '.join(COEFF_SUFFIXES)})")
    except (OSError, ValueError, NotImplementedError) as exc:
        raise FileFormatError(path, f"cannot read coefficients: {exc}") from None
    if "coeffs" in data:
        values = np.asarray(data["coeffs"], dtype=np.float64).reshape(-1)
    elif all(k in data for k in DEEP3D_KEYS):
        values = np.concatenate([np.asarray(data[k], dtype=np.float64).reshape(-1) for k in DEEP3D_KEYS])
    else:
        raise FileFormatError(path, f"no coefficients: expected key 'coeffs' or the keys {', '.join(DEEP3D_KEYS)}")
    if values.shape != (cv.N_COEFFS,):
        raise FileFormatError(path, f"{values.size} coefficients, expected {cv.N_COEFFS}")
    if not np.isfinite(values).all():
        raise FileFormatError(path, "coefficients contain NaN or inf")
    return values


def coeff_files(coeffs_dir: str | Path, subject: str, expression: str, views) -> dict[str, Path]:
    """view -> coefficient file of one capture under `coeffs_dir`.

    Per-image files `<dir>/<subject>/<expression>/<view>.npz|.mat` are used where they exist;
    otherwise one capture-level file serves every view: the only other `.npz` / `.mat` in that
    folder (e.g. the generator's `_truth/.../truth.npz`) or `<dir>/<subject>/<expression>.npz|.mat`.
    """
    folder = Path(coeffs_dir) / subject / expression
    per_view = {v: _first_existing(folder / v) for v in views}
    found = {v: p for v, p in per_view.items() if p is not None}
    if len(found) == len(per_view):
        return found
    capture = _capture_file(folder)
    if capture is None and not found:
        raise FileFormatError(folder, f"no coefficient file: expected {folder}/<view>.npz|.mat, one .npz/.mat "
                                      f"in {folder}, or {folder}.npz|.mat")
    if capture is None:
        missing = sorted(set(per_view) - set(found))
        raise FileFormatError(folder, f"coefficient files for {', '.join(missing)} are missing")
    return {v: found.get(v, capture) for v in views}


def _first_existing(stem: Path) -> Path | None:
    for suffix in COEFF_SUFFIXES:
        if stem.with_name(stem.name + suffix).is_file():
            return stem.with_name(stem.name + suffix)
    return None


def _capture_file(folder: Path) -> Path | None:
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix in COEFF_SUFFIXES and p.is_file()
                       and not p.stem.startswith("cam"))
        if len(files) > 1:
            names = ", ".join(p.name for p in files)
            raise FileFormatError(folder, f"several capture-level coefficient files: {names}")
        if files:
            return files[0]
    return _first_existing(folder)


def mean_coeffs(files: dict[str, Path]) -> tuple[np.ndarray, str]:
    """The capture's coefficients for alignment: the mean over the distinct files (per-image
    estimates of one face differ a little), and a description of the source."""
    paths = sorted(set(files.values()))
    values = np.mean([read_coeffs(p) for p in paths], axis=0)
    source = str(paths[0]) if len(paths) == 1 else f"mean of {len(paths)} per-view files in {paths[0].parent}"
    return values, source


# --- align.json --------------------------------------------------------------------------------


def write_align_json(path: str | Path, alignment: Alignment, extra: dict | None = None) -> None:
    """Write align.json atomically: `Alignment.to_dict` plus `extra` (inputs, versions)."""
    record = {"format": "facehd align", "version": 1, **alignment.to_dict(), **(extra or {})}
    with atomic_open(path) as fh:
        json.dump(record, fh, indent=1)
        fh.write("\n")


def read_align_json(path: str | Path) -> tuple[Alignment, dict]:
    """align.json -> (Alignment, the whole record)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FileFormatError(path, f"cannot read align.json: {exc}") from None
    return Alignment.from_dict(record, path), record



# --- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """Which morphable model a batch uses: a file, or (path None) the built-in SynthBFM at its
    default resolution and seed, the model `facehd synth model` and `facehd synth facehd` use."""

    path: Path | None = None
    builtin_resolution: int = 0  # set for the built-in model (0: from facehd.synth.bfm's default)
    builtin_seed: int = 0
    uv_path: Path | None = None  # (N, 2) .npy of per-vertex UVs for a model file without them (BFM09)

    def digest_files(self) -> list[Path]:
        return ([] if self.is_builtin else [self.path]) + ([] if self.uv_path is None else [self.uv_path])

    def digest_params(self) -> dict:
        if self.is_builtin:
            return {"model": "SynthBFM", "resolution": self.resolution, "seed": self.builtin_seed}
        return {"model": "file"}

    def check(self, *, need_uv: bool) -> None:
        """Refuse, before any capture is processed, a UV file whose vertex count is not the model
        file's, or (with `need_uv`) a model file that has no UVs and no UV file to supply them.
        Reads only the model file's mean shape and field names."""
        if self.is_builtin:
            if self.uv_path is not None:
                read_uv_file(self.uv_path, self.load().n_vertices)
            return
        try:
            fields = {name for name, _, _ in scipy.io.whosmat(str(self.path))}
            meanshape = scipy.io.loadmat(str(self.path), variable_names=["meanshape"]).get("meanshape")
        except Exception as exc:  # scipy raises several unrelated types for corrupt files
            raise FileFormatError(self.path, f"not a readable MATLAB .mat file ({exc})") from None
        if meanshape is None:
            raise FileFormatError(self.path, "no field 'meanshape': not a BFM_model_front.mat layout")
        if self.uv_path is not None:
            read_uv_file(self.uv_path, meanshape.size // 3)
        elif need_uv and "uv" not in fields:
            raise FileFormatError(self.path, "the model has no per-vertex UVs (no 'uv' field, as in BFM09's "
                                             "BFM_model_front.mat): pass --uv FILE, an (N, 2) .npy of UVs such as "
                                             "HRN's bfm_uvs2.npy")

    @property
    def is_builtin(self) -> bool:
        return self.path is None or self.builtin_resolution > 0

    @property
    def resolution(self) -> int:
        from facehd.synth.bfm import DEFAULT_RESOLUTION

        return self.builtin_resolution or DEFAULT_RESOLUTION

    def describe(self) -> str:
        if self.is_builtin:
            return f"built-in SynthBFM (resolution {self.resolution}, seed {self.builtin_seed})"
        return str(self.path)

    @contextlib.contextmanager
    def materialized(self) -> Iterator[ModelSource]:
        """This source with a file to load: the built-in model is written to a temporary folder
        once, so worker processes load it instead of each generating it."""
        if self.path is not None:
            yield self
            return
        from facehd.synth.bfm import write_synth_bfm

        # the folder names this process, so a later run removes it if this one is killed
        with owned_temporary_folder(MODEL_FOLDER_PREFIX) as tmp:
            path = write_synth_bfm(tmp / "BFM_model_front.mat", self.resolution, self.builtin_seed)
            yield ModelSource(path, self.resolution, self.builtin_seed, self.uv_path)

    def load(self) -> MorphableModel:
        """The model in float64, loaded (or for the built-in one without a file, generated) once
        per process."""
        key = f"SynthBFM:{self.resolution}:{self.builtin_seed}" if self.path is None else str(Path(self.path).resolve())
        key += "" if self.uv_path is None else f"+uv:{Path(self.uv_path).resolve()}"
        if key not in _MODELS:
            _MODELS.clear()  # one model per process at a time
            with self.materialized() as source:
                model = load_morphable_model(source.path, dtype=torch.float64)
            if self.uv_path is not None:
                uv = torch.as_tensor(read_uv_file(self.uv_path, model.n_vertices), dtype=torch.float64)
                model = dataclasses.replace(model, uv=uv)
            _MODELS[key] = model
        return _MODELS[key]


_MODELS: dict[str, MorphableModel] = {}
MODEL_FOLDER_PREFIX = "facehd-model-"  # the built-in model's temporary folder: $TMPDIR/facehd-model-<host>-<pid>-*


# --- one capture -------------------------------------------------------------------------------

ALIGN_FORMAT_VERSION = 3  # bump when align.json's content or the method changes


@dataclass(frozen=True)
class AlignJob:
    """Everything `align_capture` needs besides the capture (picklable for worker processes)."""

    out: Path  # derived-products root: <out>/<subject>/<expression>/align.json
    model: ModelSource = ModelSource()
    coeffs_dir: Path | None = None
    options: AlignOptions = AlignOptions()
    force: bool = False  # recompute even when align.json is up to date

    @contextlib.contextmanager
    def prepared(self) -> Iterator[AlignJob]:
        """This job with its model in a file that worker processes load (see `ModelSource`)."""
        with self.model.materialized() as model:
            yield dataclasses.replace(self, model=model)


def capture_views(ref: CaptureRef) -> list[str]:
    """The capture's view names: those of its cameras.json, or cam0..cam8 without one."""
    path = ref.paths.cameras
    return list(read_cameras(path)) if path.is_file() else list(CAMERA_NAMES)


def capture_coeff_files(ref: CaptureRef, job: AlignJob) -> dict[str, Path]:
    """view -> coefficient file, or {} when the job fits the coefficients."""
    if job.coeffs_dir is None:
        return {}
    return coeff_files(job.coeffs_dir, ref.subject, ref.expression, capture_views(ref))


def align_digest(ref: CaptureRef, job: AlignJob, coeff_paths: dict[str, Path]) -> str:
    """Digest of everything align.json depends on: scan, landmarks, model, coefficient files and
    the options."""
    files = [ref.paths.scan, ref.paths.landmarks7, *job.model.digest_files(), *sorted(set(coeff_paths.values()))]
    params = {"tool": "align", "version": ALIGN_FORMAT_VERSION, **job.model.digest_params(),
              "options": job.options.to_dict(), "coeffs": bool(coeff_paths)}
    return inputs_digest(files, params)


def align_json_path(ref: CaptureRef, out: Path) -> Path:
    return Path(out) / ref.subject / ref.expression / ALIGN_JSON


def stored_digest(path: Path) -> str | None:
    """The inputs digest an align.json was written with, or None (missing, unreadable)."""
    try:
        return json.loads(path.read_text())["inputs"]["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_scan_inputs(ref: CaptureRef) -> tuple[np.ndarray, np.ndarray]:
    """(P, 3) scan vertices and (7, 3) landmarks in mm; errors name the file."""
    from facehd.io import load_mesh

    paths = ref.paths
    for path in (paths.scan, paths.landmarks7):
        if not path.is_file():
            raise FileFormatError(path, "missing (alignment needs scan.ply and landmarks7.txt)")
    mesh = load_mesh(paths.scan)
    if mesh.n_vertices == 0:
        raise FileFormatError(paths.scan, "the scan has no vertices")
    return mesh.vertices, read_landmarks7(paths.landmarks7)


def align_capture(ref: CaptureRef, job: AlignJob) -> tuple[Alignment, bool]:
    """The capture's alignment: read from an up-to-date align.json, or computed and written.
    Returns it and whether it was computed now. When it fails, an align.json that does not match
    the current inputs (or whose inputs cannot be read) is removed, so no stale result stays
    looking valid."""
    path = align_json_path(ref, job.out)
    digest = None
    try:
        coeff_paths = capture_coeff_files(ref, job)
        digest = align_digest(ref, job, coeff_paths)
        if not job.force and stored_digest(path) == digest:
            return read_align_json(path)[0], False
        return _compute_alignment(ref, job, coeff_paths, digest, path), True
    except Exception:
        if digest is None or stored_digest(path) != digest:
            path.unlink(missing_ok=True)
        raise


def _compute_alignment(ref: CaptureRef, job: AlignJob, coeff_paths: dict[str, Path], digest: str,
                       path: Path) -> Alignment:
    inputs = capture_digest(ref.paths)  # before reading them: a file changed meanwhile shows as stale
    scan, landmarks = load_scan_inputs(ref)
    model = job.model.load()
    coeffs, source = mean_coeffs(coeff_paths) if coeff_paths else (None, "fit")
    alignment = align_scan(scan, landmarks, model, coeffs=coeffs, coeffs_source=source, options=job.options,
                           source=ref.paths.scan, landmarks_source=ref.paths.landmarks7)
    extra = {
        "subject": ref.subject,
        "expression": ref.expression,
        "inputs": {"digest": digest, "capture_digest": inputs, "scan": str(ref.paths.scan),
                   "landmarks7": str(ref.paths.landmarks7), "model": job.model.describe(),
                   "options": job.options.to_dict()},
        "facehd_version": __version__,
    }
    write_align_json(path, alignment, extra)
    return alignment


def capture_name(ref: CaptureRef) -> str:
    return f"{ref.subject}/{ref.expression}"


def align_task(job: AlignJob, ref: CaptureRef) -> ItemResult:
    """`align_capture` as a batch item (module level, so worker processes can run it)."""
    return run_item(capture_name(ref), lambda: "done" if align_capture(ref, job)[1] else "skipped")


def align_up_to_date(ref: CaptureRef, job: AlignJob) -> bool:
    """Whether the capture's align.json was written from the current inputs (False on any error,
    which the task itself then reports)."""
    try:
        digest = align_digest(ref, job, capture_coeff_files(ref, job))
    except FaceHDError:
        return False
    return not job.force and stored_digest(align_json_path(ref, job.out)) == digest


def align_dataset(root: str | Path, job: AlignJob, *, workers: int = 1, shard: Shard | None = None,
                  progress: Progress | None = None,
                  on_result: Callable[[ItemResult], None] | None = None) -> BatchReport:
    """Align every capture of a dataset (this shard of them), writing <out>/<subject>/<expression>/
    align.json; finished captures whose inputs are unchanged are skipped, and a capture that
    fails is reported in the returned `BatchReport` while the others go on."""
    job.model.check(need_uv=False)
    refs = (shard or Shard()).select(dataset_captures(root, job.out))
    remove_leftovers(refs, job.out)
    return run_resumable(refs, name=capture_name, up_to_date=functools.partial(align_up_to_date, job=job),
                         task=align_task, prepare=job.prepared, workers=workers, progress=progress,
                         on_result=on_result, desc="align")


def dataset_captures(root: str | Path, out: str | Path) -> list[CaptureRef]:
    """The dataset's captures, after checking that the outputs go beside the data, not into it;
    a root without any capture is an error (a mistyped or empty folder must not pass as done)."""
    given = Path(root)
    root, out = given.resolve(), Path(out).resolve()
    if out == root or root in out.parents and not out.relative_to(root).parts[0].startswith((".", "_")):
        raise InputError(f"--out {out} would write into the dataset {root}: derived products go beside the "
                         "data (another folder, or a '_' folder inside it such as ROOT/_derived)")
    captures = find_captures(root)
    if not captures:
        raise InputError(f"{given}: no captures found (expected <subject>/<expression>/ folders with scan.ply and "
                         "landmarks7.txt)")
    return captures


def remove_leftovers(refs: list[CaptureRef], out: str | Path) -> None:
    """Remove the temporary files that killed runs left in these captures' output folders
    (`facehd.fsutil.remove_stale_parts`: only those whose process has ended)."""
    for ref in refs:
        folder = Path(out) / ref.subject / ref.expression
        remove_stale_parts(folder)
        remove_stale_parts(folder / GT_MAPS_DIR)
