"""Synthetic benchmark subjects from SynthBFM (ground-truth scans in mm with shape outside the 3DMM
span, reference predictions on the model topology) and the cached synthetic MICC benchmark."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from facehd import conventions as cv
from facehd.distance import vertex_normals_np
from facehd.errors import InputError
from facehd.fsutil import atomic_open
from facehd.procrustes import Similarity

if TYPE_CHECKING:
    from facehd.morphable import MorphableModel

# Bump when anything below changes the generated files: the cache key includes it.
SYNTH_VERSION = 1
DEFAULT_SEED = 0
# A 48-row SynthBFM (2,352 vertices, 4.8 mm spacing) keeps the whole 53-subject benchmark inside
# its one-minute budget on 2 cores (64 rows cost 1.7x more for the same ranking); the protocol code
# is resolution-independent (real BFM: 35,709 vertices).
DEFAULT_RESOLUTION = 48
MICC_N_SUBJECTS = 53  # MICC Florence has 53 subjects
SUBDIVISIONS = 1  # the ground-truth scan is the model mesh subdivided this many times (4x faces each)

REFERENCE_METHODS = ("mean-face", "landmark-3dmm", "truth-noise")
MICC_SETTING_DIRS = ("Indoor-Cooperative", "PTZ-Indoor", "PTZ-Outdoor")  # MICC video folder names
MICC_SCANS = ("frontal1", "frontal2")
MODEL_CONFIG_NAME = "hrn_model.yaml"

# --- subject ------------------------------------------------------------------------------------
# Coefficients are in units of each basis' standard deviation (the bases are premultiplied).
ID_COEFF_STD = 1.0
EXP_COEFF_STD = 0.3  # MICC scans are near-neutral
# Mid-frequency shape: Gaussian bumps in UV along the surface normal, narrower than any identity
# component (SynthBFM's identity fields are cosines of at most 6 half-periods across the UV square).
MID_BUMPS = 24
MID_SIGMA_UV = (0.025, 0.06)  # ~5-12 mm on the face
MID_AMPLITUDE_MM = 0.8  # standard deviation of each bump's height
MID_CENTRE_UV = ((0.2, 0.8), (0.15, 0.85))  # bumps sit on the face, not the border or hair band
# Fine detail (scan only): forehead wrinkles and pore-scale roughness.
WRINKLE_AMPLITUDE_MM = 0.15
WRINKLE_PERIOD_UV = 0.03  # ~6.7 mm between wrinkles
WRINKLE_CENTRE_UV = (0.5, 0.78)
WRINKLE_RADII_UV = (0.22, 0.07)
PORE_MM = 0.03
# --- scan capture -------------------------------------------------------------------------------
SCAN_NOISE_MM = 0.02  # structured-light scanner noise
SCAN_MAX_ANGLE_DEG = 20.0  # scans come in the scanner's frame, not the model's
SCAN_MAX_SHIFT_MM = 100.0
LANDMARK_NOISE_MM = 0.3  # manual 3D landmark annotation


@dataclass(frozen=True)
class PredictionNoise:
    """How far a reference prediction strays in one setting: vertex jitter (mm, every method),
    2D-landmark error (mm, landmark-3dmm) and a rigid pose perturbation of the output file."""

    vertex_mm: float
    landmark_mm: float
    angle_deg: float
    shift_mm: float


# The harder the video setting, the noisier the reference methods, so the three columns differ.
MICC_SETTING_NOISE = {
    "Indoor-Cooperative": PredictionNoise(vertex_mm=0.30, landmark_mm=1.0, angle_deg=2.0, shift_mm=2.0),
    "PTZ-Indoor": PredictionNoise(vertex_mm=0.35, landmark_mm=1.5, angle_deg=4.0, shift_mm=4.0),
    "PTZ-Outdoor": PredictionNoise(vertex_mm=0.40, landmark_mm=2.0, angle_deg=6.0, shift_mm=6.0),
}
DEFAULT_NOISE = MICC_SETTING_NOISE["Indoor-Cooperative"]


@dataclass(frozen=True, eq=False)
class SyntheticSubject:
    """One synthetic subject: its 3DMM truth on the model topology and a dense scan in mm.

    The scan is in the model's frame scaled to millimetres (`posed_scan` gives captures in a
    scanner frame). Its first N vertices are the model's vertices (index i of the scan is model
    vertex i), so `scan_vertices_mm[model.keypoints]` are the landmarks before annotation noise.
    """

    index: int  # 1-based subject number (MICC: subject_01 ... subject_53)
    seed: int
    id_coeff: np.ndarray  # (80,) in basis standard deviations
    exp_coeff: np.ndarray  # (64,)
    shape_model: np.ndarray  # (N, 3) 3DMM shape mean + id + exp, model units
    mid_model: np.ndarray  # (N, 3) mid-frequency offsets at the model vertices, model units
    scan_vertices_mm: np.ndarray  # (M, 3) dense ground-truth surface (shape + mid + detail), mm
    scan_faces: np.ndarray  # (G, 3)
    scan_uv: np.ndarray  # (M, 2) UV of each scan vertex (interpolated from the model's)
    scan_region: np.ndarray  # (M,) region codes (facehd.conventions.REGION_NAMES), -1 if the model has none
    scan_landmarks_mm: np.ndarray  # (68, 3) exact iBUG landmarks on the scan, mm

    @property
    def truth_model(self) -> np.ndarray:
        """(N, 3) the ground truth sampled at the model vertices (shape + mid), model units."""
        return self.shape_model + self.mid_model

    @property
    def name(self) -> str:
        return f"subject_{self.index:02d}"


@dataclass(frozen=True, eq=False)
class ScanCapture:
    """A scan as a scanner delivers it: mesh and annotated landmarks in mm, scanner frame."""

    vertices_mm: np.ndarray  # (M, 3)
    faces: np.ndarray  # (G, 3)
    landmarks_mm: np.ndarray  # (68, 3) with annotation noise
    canonical_to_scan: Similarity  # scale 1: subject scan frame (mm) -> this capture (mm)


# ----------------------------------------------------------------------------------------------
# geometry helpers


def subdivide_midpoint(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split each triangle into four at its edge midpoints.

    Returns (vertices (N + E, 3), faces (4F, 3), edges (E, 2)): the original vertices keep their
    indices, new vertex N + e is the midpoint of `edges[e]`, and the winding is preserved. Any
    per-vertex attribute a interpolates as `np.concatenate([a, a[edges].mean(axis=1)])`.
    """
    faces = np.asarray(faces, dtype=np.int64)
    n = len(vertices)
    corner_edges = np.stack([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], axis=1)  # (F, 3, 2)
    edges, inverse = np.unique(np.sort(corner_edges.reshape(-1, 2), axis=1), axis=0, return_inverse=True)
    mid = n + inverse.reshape(-1, 3)  # (F, 3) midpoint of edge 01, 12, 20
    a, b, c = faces.T
    m01, m12, m20 = mid.T
    new_faces = np.concatenate([
        np.stack([a, m01, m20], 1), np.stack([m01, b, m12], 1),
        np.stack([m20, m12, c], 1), np.stack([m01, m12, m20], 1),
    ])
    new_vertices = np.concatenate([vertices, np.asarray(vertices)[edges].mean(axis=1)])
    return new_vertices, new_faces, edges


def _interpolate(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.concatenate([values, values[edges].mean(axis=1)])


def _gauss_uv(uv: np.ndarray, centre, radii) -> np.ndarray:
    d = (uv - np.asarray(centre)) / np.asarray(radii)
    return np.exp(-0.5 * np.sum(d * d, axis=-1))


def random_rotation(rng: np.random.Generator, max_angle_deg: float) -> np.ndarray:
    """(3, 3) rotation by a uniform angle up to `max_angle_deg` about a random axis."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.radians(rng.uniform(0.0, max_angle_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _random_pose(rng: np.random.Generator, max_angle_deg: float, max_shift: float) -> Similarity:
    return Similarity(1.0, random_rotation(rng, max_angle_deg), rng.uniform(-max_shift, max_shift, 3))


# ----------------------------------------------------------------------------------------------
# model access


@dataclass(frozen=True, eq=False)
class _ModelArrays:
    mean: np.ndarray  # (N, 3)
    id_base: np.ndarray  # (3N, 80)
    exp_base: np.ndarray  # (3N, 64)
    faces: np.ndarray
    keypoints: np.ndarray
    uv: np.ndarray | None
    region: np.ndarray | None


# id(model) -> (model, arrays): the model is kept so its id stays unique while cached.
_ARRAYS_CACHE: dict[int, tuple[object, _ModelArrays]] = {}
_ARRAYS_CACHE_SIZE = 4


def _arrays(model: MorphableModel) -> _ModelArrays:
    """float64 numpy copies of the model's fields, converted once per model object."""
    hit = _ARRAYS_CACHE.get(id(model))
    if hit is not None and hit[0] is model:
        return hit[1]

    def np64(t):
        return None if t is None else t.detach().cpu().numpy().astype(np.float64)

    arrays = _ModelArrays(np64(model.mean_shape), np64(model.id_base), np64(model.exp_base),
                          model.faces.cpu().numpy().astype(np.int64), model.keypoints.cpu().numpy().astype(np.int64),
                          np64(model.uv), None if model.region is None else model.region.cpu().numpy())
    if len(_ARRAYS_CACHE) >= _ARRAYS_CACHE_SIZE:
        _ARRAYS_CACHE.pop(next(iter(_ARRAYS_CACHE)))
    _ARRAYS_CACHE[id(model)] = (model, arrays)
    return arrays


def _shape(m: _ModelArrays, id_coeff: np.ndarray, exp_coeff: np.ndarray) -> np.ndarray:
    return m.mean + (m.id_base @ id_coeff + m.exp_base @ exp_coeff).reshape(-1, 3)


def model_shape(model: MorphableModel, id_coeff, exp_coeff) -> np.ndarray:
    """(80,), (64,) coefficients -> (N, 3) float64 shape mean + idBase id + exBase exp, model units
    (the numpy counterpart of `facehd.morphable.compute_shape` for one face)."""
    return _shape(_arrays(model), np.asarray(id_coeff, dtype=np.float64), np.asarray(exp_coeff, dtype=np.float64))


def fit_landmarks_3dmm(model: MorphableModel, landmarks_model: np.ndarray, *, noise_mm: float = 1.0,
                       fit_expression: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """MAP fit of identity (and expression) coefficients to 68 landmarks in the model frame.

    landmarks_model (68, 3) in model units. Coefficients have a standard normal prior (the bases
    are premultiplied by their standard deviations) and the landmarks Gaussian noise of
    `noise_mm`, so the ridge weight is (noise in model units)^2. Returns (id (80,), exp (64,)).
    """
    m = _arrays(model)
    ridge = (max(noise_mm, 1e-3) / cv.MM_PER_MODEL_UNIT) ** 2
    solver = _landmark_solver(model, m, ridge, fit_expression)
    x = solver @ (np.asarray(landmarks_model, dtype=np.float64) - m.mean[m.keypoints]).reshape(-1)
    exp = x[cv.N_ID:] if fit_expression else np.zeros(cv.N_EXP)
    return x[:cv.N_ID], exp


# (id(model), ridge, fit_expression) -> (model, (K, 204) ridge-regression matrix)
_SOLVER_CACHE: dict[tuple, tuple[object, np.ndarray]] = {}


def _landmark_solver(model: MorphableModel, m: _ModelArrays, ridge: float, fit_expression: bool) -> np.ndarray:
    """(A^T A + ridge I)^-1 A^T for the landmark rows of the bases; the same for every subject."""
    key = (id(model), ridge, fit_expression)
    hit = _SOLVER_CACHE.get(key)
    if hit is not None and hit[0] is model:
        return hit[1]
    rows = (3 * m.keypoints[:, None] + np.arange(3)).reshape(-1)
    a = np.concatenate([m.id_base[rows]] + ([m.exp_base[rows]] if fit_expression else []), axis=1)
    solver = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T)
    if len(_SOLVER_CACHE) >= 4 * _ARRAYS_CACHE_SIZE:
        _SOLVER_CACHE.pop(next(iter(_SOLVER_CACHE)))
    _SOLVER_CACHE[key] = (model, solver)
    return solver


# ----------------------------------------------------------------------------------------------
# subjects


def _mid_field_mm(uv: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(M,) smooth random height field in mm: MID_BUMPS Gaussian bumps in UV."""
    centres = np.stack([rng.uniform(*MID_CENTRE_UV[0], MID_BUMPS), rng.uniform(*MID_CENTRE_UV[1], MID_BUMPS)], 1)
    sigmas = rng.uniform(*MID_SIGMA_UV, MID_BUMPS)
    heights = rng.normal(0.0, MID_AMPLITUDE_MM, MID_BUMPS)
    field = np.zeros(len(uv))
    for centre, sigma, height in zip(centres, sigmas, heights):
        field += height * _gauss_uv(uv, centre, (sigma, sigma))
    return field


def _detail_mm(uv: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(M,) fine detail in mm: forehead wrinkles (smooth in u, periodic in v) and pores."""
    phase = rng.uniform(0.0, 2 * np.pi)
    wrinkles = np.sin(2 * np.pi * uv[:, 1] / WRINKLE_PERIOD_UV + phase)
    wrinkles *= WRINKLE_AMPLITUDE_MM * _gauss_uv(uv, WRINKLE_CENTRE_UV, WRINKLE_RADII_UV)
    return wrinkles + rng.normal(0.0, PORE_MM, len(uv))


def _model_uv(m: _ModelArrays) -> np.ndarray:
    if m.uv is not None:
        return m.uv
    # A model without UVs (e.g. the real BFM): a frontal projection normalised to the unit square.
    xy = m.mean[:, :2]
    return (xy - xy.min(axis=0)) / np.ptp(xy, axis=0)


def make_subject(model: MorphableModel, index: int, seed: int = DEFAULT_SEED, *, exp_std: float = EXP_COEFF_STD,
                 subdivisions: int = SUBDIVISIONS) -> SyntheticSubject:
    """A deterministic synthetic subject of a morphable model (SynthBFM or any BFM-layout model).

    Identity ~ N(0, ID_COEFF_STD^2), expression ~ N(0, exp_std^2) per coefficient; the ground
    truth adds a mid-frequency height field (~1 mm, outside the 3DMM span) along the normals, and
    the dense scan (model mesh subdivided `subdivisions` times) adds fine detail. The same
    (model, index, seed) always gives the same subject.
    """
    if index < 1:
        raise InputError(f"subject index must be >= 1, got {index}")
    m = _arrays(model)
    rng = np.random.default_rng([seed, index, 0])
    id_coeff = rng.normal(0.0, ID_COEFF_STD, cv.N_ID)
    exp_coeff = rng.normal(0.0, exp_std, cv.N_EXP)
    shape = _shape(m, id_coeff, exp_coeff)
    normals = vertex_normals_np(shape, m.faces)
    uv = _model_uv(m)
    region = m.region if m.region is not None else np.full(len(shape), -1)

    vertices, faces = shape, m.faces
    for _ in range(subdivisions):
        vertices, faces, edges = subdivide_midpoint(vertices, faces)
        normals = _interpolate(normals, edges)
        uv = _interpolate(uv, edges)
        # a midpoint between two regions takes the lower code, so region borders stay thin
        region = np.concatenate([region, region[edges].min(axis=1)])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)

    mid_mm = _mid_field_mm(uv, rng)
    n = len(shape)
    mid_model = (mid_mm[:n, None] / cv.MM_PER_MODEL_UNIT) * normals[:n]
    surface_mm = vertices * cv.MM_PER_MODEL_UNIT + (mid_mm + _detail_mm(uv, rng))[:, None] * normals
    return SyntheticSubject(
        index=index, seed=seed, id_coeff=id_coeff, exp_coeff=exp_coeff, shape_model=shape, mid_model=mid_model,
        scan_vertices_mm=surface_mm, scan_faces=faces, scan_uv=uv, scan_region=region,
        scan_landmarks_mm=surface_mm[m.keypoints],
    )


def posed_scan(subject: SyntheticSubject, rng: np.random.Generator, *, max_angle_deg: float = SCAN_MAX_ANGLE_DEG,
               max_shift_mm: float = SCAN_MAX_SHIFT_MM, noise_mm: float = SCAN_NOISE_MM,
               landmark_noise_mm: float = LANDMARK_NOISE_MM) -> ScanCapture:
    """One capture of the subject's scan: a random rigid pose, scanner noise and landmark noise."""
    pose = _random_pose(rng, max_angle_deg, max_shift_mm)
    vertices = pose.apply(subject.scan_vertices_mm) + rng.normal(0.0, noise_mm, subject.scan_vertices_mm.shape)
    landmarks = pose.apply(subject.scan_landmarks_mm) + rng.normal(0.0, landmark_noise_mm, (cv.N_LANDMARKS, 3))
    return ScanCapture(vertices, subject.scan_faces, landmarks, pose)


def predict_reference(model: MorphableModel, subject: SyntheticSubject, method: str, rng: np.random.Generator, *,
                      noise: PredictionNoise = DEFAULT_NOISE) -> tuple[np.ndarray, np.ndarray]:
    """A reference method's reconstruction: (vertices (N, 3) in MODEL UNITS on the model topology, faces).

    "mean-face": the model's mean shape. "landmark-3dmm": the MAP 3DMM fit (identity and
    expression) to the subject's 68 landmarks seen with `noise.landmark_mm` error.
    "truth-noise": the true 3DMM shape plus the mid-frequency field at the model vertices. Every
    method then gets Gaussian vertex noise (`noise.vertex_mm` per coordinate) and a small rigid
    pose perturbation, which the protocol's alignment removes. Expected ranking of the distance:
    truth-noise << landmark-3dmm < mean-face.
    """
    m = _arrays(model)
    if method == "mean-face":
        vertices = m.mean.copy()
    elif method == "landmark-3dmm":
        seen = subject.shape_model[m.keypoints] + subject.mid_model[m.keypoints]
        seen = seen + rng.normal(0.0, noise.landmark_mm / cv.MM_PER_MODEL_UNIT, seen.shape)
        id_coeff, exp_coeff = fit_landmarks_3dmm(model, seen, noise_mm=noise.landmark_mm)
        vertices = _shape(m, id_coeff, exp_coeff)
    elif method == "truth-noise":
        vertices = subject.truth_model.copy()
    else:
        raise InputError(f"unknown reference method {method!r}; choose from {', '.join(REFERENCE_METHODS)}")
    vertices = vertices + rng.normal(0.0, noise.vertex_mm / cv.MM_PER_MODEL_UNIT, vertices.shape)
    pose = _random_pose(rng, noise.angle_deg, noise.shift_mm / cv.MM_PER_MODEL_UNIT)
    return pose.apply(vertices), m.faces.copy()


# ----------------------------------------------------------------------------------------------
# the cached synthetic MICC benchmark


def default_cache_root() -> Path:
    """$FACEHD_CACHE, else ~/.cache/facehd."""
    env = os.environ.get("FACEHD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "facehd"


@dataclass(frozen=True)
class SyntheticMicc:
    """Where the parts of a synthetic MICC benchmark live under its cache directory."""

    root: Path

    @property
    def gt_dir(self) -> Path:
        """MICC Florence layout: subject_XX/Model/frontal{1,2}/obj/*.obj + *_landmarks.txt."""
        return self.root / "MICC"

    @property
    def template(self) -> Path:
        """The SynthBFM model file, the predictions' template."""
        return self.root / "model" / "SynthBFM.mat"

    def predictions(self, method: str) -> Path:
        """<root>/predictions/<method>/subject_XX/{Indoor-Cooperative,PTZ-Indoor,PTZ-Outdoor}.obj"""
        return self.root / "predictions" / method

    def video(self, subject: str, setting: str) -> Path:
        """<root>/MICC/subject_XX/Video/<setting>.mp4, its frames' landmarks beside it
        (`benchmarks.micc_frames`)."""
        from benchmarks.micc_frames import video_path

        return video_path(self.gt_dir / subject, setting)

    @property
    def model_config(self) -> Path:
        """A YAML whose model section names the template (`hrn mv --model-config`), so that a
        reconstruction from the videos lands on the template's topology."""
        return self.root / "model" / MODEL_CONFIG_NAME

    def methods(self) -> dict[str, Path]:
        """Method name -> prediction folder: the reference methods, then any other folder under
        predictions/ (e.g. one `hrn mv --micc` wrote to predictions/mv-hrn), by name."""
        found = {m: self.predictions(m) for m in REFERENCE_METHODS}
        folder = self.root / "predictions"
        extra = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if folder.is_dir() else []
        found.update({name: folder / name for name in extra if name not in found})
        return found

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"


def synthetic_micc_parameters(*, n_subjects: int = MICC_N_SUBJECTS, resolution: int = DEFAULT_RESOLUTION,
                              seed: int = DEFAULT_SEED, frames: bool = True) -> dict:
    """Everything the generated files depend on; its hash is the cache key. ``frames``: the videos
    (`benchmarks.micc_frames`) are part of the benchmark."""
    from benchmarks.micc_frames import frames_parameters
    from facehd.synth import bfm

    return {
        "generator": "benchmarks.synthetic", "version": SYNTH_VERSION,
        "synth_bfm_version": bfm.GENERATOR_VERSION, "n_subjects": n_subjects, "resolution": resolution,
        "seed": seed, "subdivisions": SUBDIVISIONS, "methods": list(REFERENCE_METHODS),
        "settings": {k: vars(v) for k, v in MICC_SETTING_NOISE.items()},
        "subject": {"id_std": ID_COEFF_STD, "exp_std": EXP_COEFF_STD, "mid_bumps": MID_BUMPS,
                    "mid_sigma_uv": MID_SIGMA_UV, "mid_mm": MID_AMPLITUDE_MM, "mid_centre_uv": MID_CENTRE_UV,
                    "wrinkle_mm": WRINKLE_AMPLITUDE_MM, "wrinkle_period_uv": WRINKLE_PERIOD_UV,
                    "wrinkle_centre_uv": WRINKLE_CENTRE_UV, "wrinkle_radii_uv": WRINKLE_RADII_UV, "pore_mm": PORE_MM},
        "scan": {"noise_mm": SCAN_NOISE_MM, "angle_deg": SCAN_MAX_ANGLE_DEG, "shift_mm": SCAN_MAX_SHIFT_MM,
                 "landmark_mm": LANDMARK_NOISE_MM},
        "frames": frames_parameters() if frames else None,
    }


def _key(parameters: dict) -> str:
    return hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()[:16]


def _cached_key(root: Path) -> str | None:
    try:
        return json.loads((root / "manifest.json").read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_obj(path: Path, vertices: np.ndarray, faces: np.ndarray, units: str, digits: int) -> None:
    from facehd.io import Mesh, save_mesh

    save_mesh(path, Mesh(vertices, faces, metadata={"units": units}), precision=digits)


def _write_model_config(layout: SyntheticMicc) -> None:
    with atomic_open(layout.model_config, "w") as fh:
        fh.write("# The model section for `hrn mv --model-config` on this synthetic MICC: reconstructions must be on\n"
                 "# the template's topology, so the fit uses the template's morphable model.\n"
                 f"model:\n  morphable_model: {layout.template.name}\n")


def _write_landmarks(path: Path, landmarks_mm: np.ndarray) -> None:
    with atomic_open(path, "w") as fh:
        fh.write("# 68 iBUG landmarks, x y z in mm, scan frame\n")
        np.savetxt(fh, landmarks_mm, fmt="%.4f")


def _write_subject(layout: SyntheticMicc, model: MorphableModel, index: int, seed: int, frames: bool = True
                   ) -> None:
    subject = make_subject(model, index, seed)
    name = subject.name
    for k, scan in enumerate(MICC_SCANS):
        capture = posed_scan(subject, np.random.default_rng([seed, index, 1, k]))
        folder = layout.gt_dir / name / "Model" / scan / "obj"
        _write_obj(folder / f"{name}_{scan}.obj", capture.vertices_mm, capture.faces, "mm", 8)
        _write_landmarks(folder / f"{name}_{scan}_landmarks.txt", capture.landmarks_mm)
    for j, method in enumerate(REFERENCE_METHODS):
        for k, setting in enumerate(MICC_SETTING_DIRS):
            rng = np.random.default_rng([seed, index, 2, j, k])
            vertices, faces = predict_reference(model, subject, method, rng, noise=MICC_SETTING_NOISE[setting])
            _write_obj(layout.predictions(method) / name / f"{setting}.obj", vertices, faces, "model", 8)
    if frames:  # from their own random streams: the files above do not depend on them
        from benchmarks.micc_frames import write_subject_videos

        write_subject_videos(layout.gt_dir / name, model, subject, seed, MICC_SETTING_DIRS)


@functools.lru_cache(maxsize=2)
def _load_model(path: str):
    from facehd.morphable import load_morphable_model

    return load_morphable_model(path)


def _write_subject_at(root: str, index: int, seed: int, frames: bool = True) -> None:
    """`_write_subject` for a worker process: everything it needs travels as plain values."""
    layout = SyntheticMicc(Path(root))
    _write_subject(layout, _load_model(str(layout.template)), index, seed, frames)


def _generate(root: Path, parameters: dict, workers: int) -> None:
    from facehd.synth.bfm import write_synth_bfm

    layout = SyntheticMicc(root)
    write_synth_bfm(layout.template, resolution=parameters["resolution"], seed=parameters["seed"])
    _write_model_config(layout)
    indices = range(1, parameters["n_subjects"] + 1)
    frames = parameters.get("frames") is not None
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            list(pool.map(_write_subject_at, [str(root)] * len(indices), indices, [parameters["seed"]] * len(indices),
                          [frames] * len(indices)))
    else:
        for index in indices:
            _write_subject_at(str(root), index, parameters["seed"], frames)
    with atomic_open(layout.manifest, "w") as fh:  # written last: its presence means complete
        json.dump({"key": _key(parameters), "parameters": parameters}, fh, indent=2)


def _check_replaceable(root: Path) -> None:
    """Only a previous synthetic benchmark (or an empty folder) may be replaced wholesale."""
    try:
        generator = json.loads((root / "manifest.json").read_text())["parameters"]["generator"]
    except (OSError, ValueError, KeyError, TypeError):
        generator = None
    if generator != "benchmarks.synthetic" and any(root.iterdir()):
        raise InputError(f"{root}: exists and is not a synthetic MICC cache (no manifest.json from "
                         "benchmarks.synthetic); refusing to replace it, choose another cache directory")


def ensure_synthetic_micc(cache_dir: str | Path | None = None, *, n_subjects: int = MICC_N_SUBJECTS,
                          resolution: int = DEFAULT_RESOLUTION, seed: int = DEFAULT_SEED, workers: int = 1,
                          frames: bool = True) -> Path:
    """Generate the synthetic MICC benchmark once and return its directory (see `SyntheticMicc`).

    Default directory: `<$FACEHD_CACHE or ~/.cache/facehd>/synthetic-micc-v1`. The directory's
    manifest holds a key hashed from `synthetic_micc_parameters`; a missing or different key
    (another generator version, seed or size) regenerates everything. Generation happens in a
    temporary sibling directory that is renamed into place, so an interrupted run leaves nothing
    that looks finished. `workers` > 1 writes subjects in that many processes (the files do not
    depend on it). ``frames``: also the videos of each subject (`SyntheticMicc.video`); the scans,
    their landmarks and the reference predictions do not depend on it.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_root() / f"synthetic-micc-v{SYNTH_VERSION}"
    if n_subjects < 1:
        raise InputError(f"n_subjects must be >= 1, got {n_subjects}")
    parameters = synthetic_micc_parameters(n_subjects=n_subjects, resolution=resolution, seed=seed, frames=frames)
    key = _key(parameters)
    if _cached_key(root) == key:
        return root
    if root.exists():
        _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".part", dir=root.parent))
    try:
        _generate(work, parameters, workers)
        if root.exists():
            if _cached_key(root) == key:  # another process finished first
                return root
            _check_replaceable(root)
            stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent))
            os.replace(root, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(work, root)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return root
