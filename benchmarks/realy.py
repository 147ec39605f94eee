"""The REALY region-aware benchmark: readers for its files, the gICP / rICP / bICP protocol of REALY's
own evaluation code (czh-98/REALY, DESIGN.md section 8), `REALY_error.txt` and per-region tables."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from benchmarks.published import REALY_PUBLISHED, REALY_SOURCE
from facehd.distance import SurfaceIndex
from facehd.errors import FaceHDError, FileFormatError, InputError
from facehd.fsutil import atomic_open
from facehd.nicp import mesh_edges
from facehd.sparse_cholesky import block_cholesky, single_threaded_blas

# --- the protocol's constants (REALY main.py, utils/util.py, utils/rICP.py) ------------------------

REGIONS = ("nose", "mouth", "forehead", "cheek")  # column order of REALY_error.txt (main.py)
TRACKS = ("frontal", "side")
N_KEYPOINTS = 85  # REALY_HIFI3D_keypoints/<id>.obj and the template file: 68 iBUG + 17 HIFI3D points
# gICP: eye corners, subnasale, mouth corners (util.keypoints_region_map["seven_keypoints"])
GICP_KEYPOINTS = (36, 39, 42, 45, 33, 48, 54)
_MOUTH = tuple(range(48, 61)) + (64,)
# rICP keypoints per region, in REALY's order (the nose uses "nose_part", which adds 70 and 71)
RICP_KEYPOINTS = {
    "nose": (27, 28, 29, 30, 31, 35, 32, 33, 34, 70, 71),
    "mouth": _MOUTH,
    "forehead": tuple(range(36, 48)) + tuple(range(17, 27)),
    "cheek": _MOUTH + (76, 77, 36, 41, 40, 39, 42, 47, 46, 45, 7, 8, 9),
}
# bICP keypoints (main.py keypoints_map): the nose uses "nose" (27..35), the cheek none.
BICP_KEYPOINTS = {
    "nose": tuple(range(27, 36)),
    "mouth": RICP_KEYPOINTS["mouth"],
    "forehead": RICP_KEYPOINTS["forehead"],
    "cheek": None,
}
RICP_MAX_ITERATIONS = 100  # main.py passes max_iteration=100
RICP_MSE_TOLERANCE = 1e-6  # rICP stops when |MSE - previous MSE| < 1e-6 (GT units squared)
CHEEK_KEYPOINT_DIVISOR = 4  # the cheek's keypoint pairs are repeated a quarter as often
# trimesh's process=True (used by main.py on the GT region) merges vertices equal to 8 decimals.
GT_MERGE_DECIMALS = 8
DEGENERATE_AREA_RTOL = 1e-12  # as facehd.distance: doubled area below this x longest edge^2
# template weights may stray this far outside [0, 1]: they are float32 written as text, so 1 - w0 - w1
# is off by up to ~1e-6 (REALY's own data/3DDFA_v2.txt has a row with 1 - w0 - w1 = -1.4e-6)
BARYCENTRIC_ATOL = 1e-5
RANK_RTOL = 1e-9  # keypoints spanning less than this fraction of their spread are coplanar

# bICP: non-rigid ICP of utils/eval.py + utils/NICP.py (epsilon, gamma, alpha, alpha2, kp_w1 there)
NICP_EPSILON = 1.0  # stop a stage when |X - X_previous| (Frobenius, all 4N x 3) <= epsilon x 0.5^stage
NICP_GAMMA = 1.0  # stiffness weight of the translation row of each per-vertex affine
NICP_ALPHA = 50.0  # stiffness of the data stages, decaying as exp(-0.5 k)
NICP_ALPHA_DECAY = 0.5
NICP_ALPHA_KEYPOINT_STAGE = 150.0  # the first, keypoints-only stage (alpha2 = 50 x 3)
NICP_STIFFNESS_KEYPOINT_STAGE = (2.0, 2.0, 3.0, 2.0)  # G_KP = diag(2, 2, 3, 2 gamma)
NICP_KEYPOINT_WEIGHT = 50.0  # kp_w1
NICP_KEYPOINT_WEIGHT_DECAY = 0.9  # later stages: kp_w1 exp(-0.9 count) / 10
NICP_KEYPOINT_WEIGHT_DIVISOR = 10.0
NICP_STAGES_WITH_KEYPOINTS = 4  # stage 0 (keypoints only, one solve) + 3 data stages
NICP_STAGES_WITHOUT_KEYPOINTS = 3
NICP_MAX_STEP = 10  # with keypoints a stage stops once step > 10 (11 solves)
NICP_MIN_THRESHOLD = 1.0  # a vertex is used when its NN distance < max(2 x mean NN distance, 1)
NICP_THRESHOLD_FACTOR = 2.0
# REALY's cheek loop has no step limit; one that has not converged after this many solves is an error.
NICP_SAFETY_MAX_STEPS = 1000
# the sparse Cholesky of the bICP solves (facehd.sparse_cholesky): CHOLMOD when available; the same
# numbers either way (to ~1e-12), `benchmarks.speed_realy --backend` compares their speed
CHOLESKY_BACKEND = "auto"

_PREDICTION_NAME = re.compile(r"^(\d+)(?:_(\d+))?$")


# --- records ------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class TemplateKeypoints:
    """The prediction template's 85 barycentric keypoints (REALY `data/<topology>.txt`).

    Keypoint k = w0 v[a] + w1 v[b] + (1 - w0 - w1) v[c] where (a, b, c) = faces[face_index[k]],
    the corners in file order, and face_index is 0-based into the template's faces. `faces` is the
    template mesh's (F, 3) faces when its OBJ was given (then predictions must share them); None
    means each prediction's own faces are used, as a prediction must share the template topology.
    """

    face_index: np.ndarray  # (85,) int64, 0-based
    weights: np.ndarray  # (85, 3) float64, rows sum to 1
    faces: np.ndarray | None = None  # (F, 3) int64 template faces, or None
    n_vertices: int | None = None  # template vertex count when the template OBJ was given
    source: str = ""

    def corners(self, faces: np.ndarray | None = None) -> np.ndarray:
        """(85, 3) vertex indices of each keypoint's triangle (template faces, else `faces`)."""
        table = self.faces if self.faces is not None else faces
        if table is None:
            raise InputError(f"{self.source}: no faces to resolve the keypoints with")
        if int(self.face_index.max()) >= len(table):
            raise InputError(f"{self.source}: keypoint face index {int(self.face_index.max())} is out of range "
                             f"for a mesh with {len(table)} faces (different topology?)")
        return table[self.face_index]

    def points(self, vertices: np.ndarray, faces: np.ndarray | None = None) -> np.ndarray:
        """(N, 3) vertices of a mesh on the template topology -> (85, 3) keypoints."""
        corners = self.corners(faces)
        return np.einsum("kc,kcd->kd", self.weights, np.asarray(vertices, dtype=np.float64)[corners])


@dataclass(frozen=True, eq=False)
class RegionMesh:
    """A ground-truth region as REALY uses it: duplicate vertices merged, unreferenced dropped.

    Degenerate triangles (zero area or a repeated vertex) stay in `faces`, as in REALY (trimesh's
    `process=True` keeps them): the GT triangles only give bICP its edge graph, and errors are
    measured at the GT vertices, so such a triangle adds at most an edge. `degenerate_faces` counts
    them, for the report."""

    name: str
    vertices: np.ndarray  # (N, 3) float64, GT units (mm = units x metrical scale)
    faces: np.ndarray  # (F, 3) int64, 0-based
    degenerate_faces: int = 0  # zero-area or repeated-vertex triangles in the file


@dataclass(frozen=True, eq=False)
class RealySubject:
    """One REALY subject: 85 GT keypoints, four GT region meshes and the metrical scale."""

    subject_id: int
    keypoints: np.ndarray  # (85, 3) GT units
    regions: dict[str, RegionMesh]
    metrical_scale: float  # millimetres per GT unit


@dataclass(frozen=True)
class PredictionFile:
    """A prediction `<id>.obj` (frontal) or `<id>_<k>.obj` (side view k), or any name under a
    `frontal/` or `side/` subfolder, which decides the track."""

    path: Path
    name: str  # the file stem, REALY_error.txt's first column
    subject_id: int
    view: int | None  # k of `<id>_<k>`, None for `<id>`
    track: str  # "frontal" or "side"


@dataclass(frozen=True, eq=False)
class RigidFit:
    """REALY's `fit_icp_RT`: x -> scale * rotation @ x + translation (row vectors: x @ (sR).T + t).

    `rotation` is U V^T with no reflection fix, so det may be -1 (`reflection` says so)."""

    scale: float
    rotation: np.ndarray  # (3, 3)
    translation: np.ndarray  # (3,)

    @property
    def reflection(self) -> bool:
        return bool(np.linalg.det(self.rotation) < 0)

    def apply(self, points: np.ndarray) -> np.ndarray:
        return np.asarray(points, dtype=np.float64) @ (self.scale * self.rotation).T + self.translation


@dataclass(frozen=True, eq=False)
class RegionIcp:
    """The rICP result for one region: the rigid transform applied after gICP (the last computed
    transform is not applied, as in REALY) and how the loop ended."""

    transform: RigidFit  # cumulative rigid transform of the gICP-aligned prediction
    iterations: int  # transforms applied (0..RICP_MAX_ITERATIONS)
    mse: tuple[float, ...]  # MSE of every computed transform, GT units squared
    repetitions: int  # times each keypoint pair was repeated
    reflection: bool  # some applied transform was a reflection


@dataclass(frozen=True, eq=False)
class RegionEvaluation:
    """The error of one prediction on one region."""

    region: str
    error_units: float  # mean distance in GT units (REALY's NMSE before scaling)
    error_mm: float  # error_units x metrical scale
    icp: RegionIcp
    nicp_steps: int  # linear solves of the bICP
    vertex_errors_mm: np.ndarray  # (N,) per GT-region vertex, mm
    gt: RegionMesh


@dataclass(frozen=True, eq=False)
class PredictionEvaluation:
    """Everything REALY computes for one prediction."""

    gicp: RigidFit
    regions: dict[str, RegionEvaluation]

    @property
    def errors_mm(self) -> dict[str, float]:
        return {name: self.regions[name].error_mm for name in REGIONS}


@dataclass(frozen=True)
class PredictionResult:
    """One row of REALY_error.txt plus the diagnostics a reproducer wants."""

    name: str
    subject_id: int
    track: str
    errors_mm: dict[str, float]
    gicp_scale: float = math.nan
    gicp_reflection: bool = False
    ricp_iterations: dict[str, int] = field(default_factory=dict)
    ricp_reflection: bool = False
    gt_degenerate_faces: dict[str, int] = field(default_factory=dict)  # per region, see RegionMesh


@dataclass(frozen=True)
class PredictionFailure:
    """A prediction that could not be evaluated, and why."""

    name: str
    path: str
    track: str
    message: str


# --- readers ------------------------------------------------------------------------------------

def _read_obj_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(vertices, faces) of an OBJ as its `v` / `f` lines give them (UV splits undone), so vertex
    indices match the file, as in REALY's reader."""
    from facehd.io import load_mesh

    mesh = load_mesh(path)
    if mesh.source_vertex is None:
        return mesh.vertices, mesh.faces
    source = mesh.source_vertex
    vertices = np.empty((int(source.max()) + 1, 3))
    vertices[source] = mesh.vertices
    return vertices, source[mesh.faces]


def read_gt_keypoints(path: str | Path) -> np.ndarray:
    """`REALY_HIFI3D_keypoints/<id>.obj` -> (85, 3) keypoints (the OBJ's vertices), GT units."""
    path = Path(path)
    vertices, _ = _read_obj_arrays(path)
    if len(vertices) != N_KEYPOINTS:
        raise FileFormatError(path, f"expected {N_KEYPOINTS} keypoint vertices, found {len(vertices)}")
    return vertices


def _degenerate_faces(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    repeated = (faces[:, 0] == faces[:, 1]) | (faces[:, 1] == faces[:, 2]) | (faces[:, 0] == faces[:, 2])
    tri = vertices[faces]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    longest = np.max(np.sum((tri - np.roll(tri, 1, axis=1)) ** 2, axis=2), axis=1)
    return repeated | (np.linalg.norm(cross, axis=1) <= DEGENERATE_AREA_RTOL * longest)


def merge_gt_vertices(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What trimesh's `process=True` does to REALY's GT region: drop unreferenced vertices and merge
    vertices equal to GT_MERGE_DECIMALS decimals (first occurrence kept, in file order)."""
    used = np.unique(faces)
    keys = np.round(vertices[used] * 10.0 ** GT_MERGE_DECIMALS).astype(np.int64)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # new vertices in order of first occurrence
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    remap = np.full(len(vertices), -1, dtype=np.int64)
    remap[used] = rank[inverse.reshape(-1)]
    return vertices[used[first[order]]], remap[faces]


def read_region_mesh(path: str | Path, name: str | None = None) -> RegionMesh:
    """`REALY_scan_region/<id>/<region>.obj` -> the region as REALY evaluates it (GT units).

    Degenerate (zero-area or repeated-vertex) triangles are kept and counted (`RegionMesh`).
    Raises FileFormatError for an empty region.
    """
    path = Path(path)
    vertices, faces = _read_obj_arrays(path)
    if len(faces) == 0:
        raise FileFormatError(path, "GT region has no triangles (empty region)")
    degenerate = int(_degenerate_faces(vertices, faces).sum())
    merged_vertices, merged_faces = merge_gt_vertices(vertices, faces)
    return RegionMesh(name or path.stem, merged_vertices, merged_faces, degenerate)


def read_metrical_scale(path: str | Path) -> dict[int, float]:
    """`metrical_scale.txt` -> {subject id: millimetres per GT unit}.

    Two forms are accepted: REALY's own file, one number per line where line k (1-based) is
    subject k (REALY indexes `metrical_scale[subject_id - 1]`), or lines `<id> <scale>`. Blank
    lines and `#` comments are ignored; scales must be finite and positive, ids unique integers.
    """
    path = Path(path)
    rows = []
    try:
        text = path.read_text()
    except OSError as exc:
        raise FileFormatError(path, f"cannot read the metrical scale file ({exc.strerror})") from exc
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if fields:
            rows.append((number, fields))
    if not rows:
        raise FileFormatError(path, "no metrical scales found (expected one '<scale>' or '<id> <scale>' per line)")
    widths = {len(f) for _, f in rows}
    if widths - {1, 2} or len(widths) != 1:
        number, fields = next((n, f) for n, f in rows if len(f) != len(rows[0][1]) or len(f) > 2)
        raise FileFormatError(path, f"line {number}: expected every line to be '<scale>' or every line "
                                    f"'<id> <scale>', got {' '.join(fields)!r}")
    scales: dict[int, float] = {}
    for k, (number, fields) in enumerate(rows, 1):
        try:
            subject = k if len(fields) == 1 else int(fields[0])
            scale = float(fields[-1])
        except ValueError as exc:
            raise FileFormatError(path, f"line {number}: not a number ({exc})") from exc
        if not (math.isfinite(scale) and scale > 0):
            raise FileFormatError(path, f"line {number}: metrical scale must be finite and positive, got {scale}")
        if subject in scales:
            raise FileFormatError(path, f"line {number}: subject {subject} is listed twice")
        scales[subject] = scale
    return scales


def _parse_template_rows(path: Path, text: str) -> np.ndarray:
    stripped = text.strip()
    if stripped.startswith("["):  # REALY's own files are a JSON list of [face, w0, w1]
        try:
            rows = json.loads(stripped)
        except ValueError as exc:
            raise FileFormatError(path, f"not valid JSON ({exc})") from exc
    else:
        rows = [line.replace(",", " ").split() for line in text.splitlines()
                if line.split("#", 1)[0].strip()]
        rows = [r for r in rows if r and not r[0].startswith("#")]
    try:
        table = np.array(rows, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise FileFormatError(path, f"expected rows of three numbers 'face_idx w0 w1' ({exc})") from exc
    if table.ndim != 2 or table.shape[1] != 3:
        raise FileFormatError(path, f"expected rows of three numbers 'face_idx w0 w1', got shape {table.shape}")
    return table


def read_template_keypoints(path: str | Path, template_mesh: str | Path | None = None) -> TemplateKeypoints:
    """The template's 85 barycentric keypoints: REALY's JSON `[[face_idx, w0, w1], ...]` or 85 text
    rows `face_idx w0 w1` (spaces or commas); face_idx is 0-based into the template's faces.
    Weights up to BARYCENTRIC_ATOL outside [0, 1] (float32 rounding) are clamped into the triangle.

    `template_mesh` is the template OBJ; by default `<same stem>.obj` beside the file when it exists
    (REALY keeps `data/<topology>.obj` beside `data/<topology>.txt`).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise FileFormatError(path, f"cannot read the template keypoint file ({exc.strerror})") from exc
    table = _parse_template_rows(path, text)
    if len(table) != N_KEYPOINTS:
        raise FileFormatError(path, f"expected {N_KEYPOINTS} keypoint rows, found {len(table)}")
    if not np.isfinite(table).all():
        raise FileFormatError(path, "contains NaN or inf")
    face_index = table[:, 0]
    if (face_index != np.round(face_index)).any() or face_index.min() < 0:
        k = int(np.argmax((face_index != np.round(face_index)) | (face_index < 0)))
        raise FileFormatError(path, f"row {k + 1}: face index must be a non-negative integer, got {face_index[k]}")
    weights = np.column_stack([table[:, 1], table[:, 2], 1.0 - table[:, 1] - table[:, 2]])
    bad = ((weights < -BARYCENTRIC_ATOL) | (weights > 1 + BARYCENTRIC_ATOL)).any(axis=1)
    if bad.any():
        k = int(np.argmax(bad))
        raise FileFormatError(path, f"row {k + 1}: weights {weights[k].tolist()} are not barycentric "
                                    f"(w0, w1 and 1 - w0 - w1 must lie in [0, 1], give or take {BARYCENTRIC_ATOL})")
    strays = ((weights < 0) | (weights > 1)).any(axis=1)
    if strays.any():  # clamp into the triangle; the other rows keep REALY's exact weights
        clamped = np.clip(weights[strays], 0.0, 1.0)
        weights[strays] = clamped / clamped.sum(axis=1, keepdims=True)
    faces, n_vertices = None, None
    mesh_path = Path(template_mesh) if template_mesh is not None else path.with_suffix(".obj")
    if template_mesh is not None or mesh_path.exists():
        vertices, faces = _read_obj_arrays(mesh_path)
        n_vertices = len(vertices)
        if int(face_index.max()) >= len(faces):
            raise FileFormatError(path, f"face index {int(face_index.max())} is out of range for the template "
                                        f"{mesh_path} with {len(faces)} faces")
    return TemplateKeypoints(face_index.astype(np.int64), weights, faces, n_vertices, str(path))


def read_template_mask(path: str | Path, n_vertices: int | None = None) -> np.ndarray:
    """REALY's optional `--template_mask`: 0/1 per template vertex (comma or space separated);
    a triangle is evaluated in bICP only when all its vertices are 1 (rICP uses every triangle)."""
    path = Path(path)
    try:
        values = np.array(path.read_text().replace(",", " ").split(), dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise FileFormatError(path, f"expected 0/1 values separated by commas or spaces ({exc})") from exc
    if not np.isin(values, (0.0, 1.0)).all():
        raise FileFormatError(path, "template mask values must be 0 or 1")
    if n_vertices is not None and len(values) != n_vertices:
        raise FileFormatError(path, f"template mask has {len(values)} values, the template {n_vertices} vertices")
    return values.astype(bool)


def parse_prediction_name(path: str | Path, track: str | None = None) -> PredictionFile:
    """`<id>.obj` -> frontal, `<id>_<k>.obj` -> side view k; `track` overrides (a `frontal/` or
    `side/` folder)."""
    path = Path(path)
    match = _PREDICTION_NAME.match(path.stem)
    if match is None:
        raise InputError(f"{path}: prediction names must be '<id>.obj' or '<id>_<k>.obj' (REALY's image names)")
    view = None if match.group(2) is None else int(match.group(2))
    inferred = "frontal" if view is None else "side"
    return PredictionFile(path, path.stem, int(match.group(1)), view, track or inferred)


def list_predictions(directory: str | Path, track: str = "both") -> tuple[list[PredictionFile], list[str]]:
    """The predictions under `directory` for `track` ("frontal", "side" or "both"), sorted by
    (id, view), and the names of the .obj files that are not predictions (reported, not used).

    Files directly in `directory` are frontal (`<id>.obj`) or side (`<id>_<k>.obj`); files in
    `directory/frontal/` and `directory/side/` belong to that track whatever their name.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: prediction directory does not exist")
    found, skipped = [], []
    for folder, forced in ((directory, None), (directory / "frontal", "frontal"), (directory / "side", "side")):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.obj")):
            try:
                found.append(parse_prediction_name(path, forced))
            except InputError:
                skipped.append(str(path))
    wanted = TRACKS if track == "both" else (track,)
    found = [p for p in found if p.track in wanted]
    found.sort(key=lambda p: (TRACKS.index(p.track), p.subject_id, -1 if p.view is None else p.view, p.name))
    return found, skipped


@dataclass(frozen=True)
class RealyData:
    """A REALY ground-truth directory: `REALY_HIFI3D_keypoints/<id>.obj`,
    `REALY_scan_region/<id>/{nose,mouth,forehead,cheek}.obj` and `metrical_scale.txt`."""

    root: Path

    @property
    def keypoint_dir(self) -> Path:
        return self.root / "REALY_HIFI3D_keypoints"

    @property
    def region_dir(self) -> Path:
        return self.root / "REALY_scan_region"

    @property
    def scale_path(self) -> Path:
        return self.root / "metrical_scale.txt"

    def check(self) -> None:
        """Raise InputError naming what is missing from the layout."""
        missing = [str(p) for p in (self.keypoint_dir, self.region_dir, self.scale_path) if not p.exists()]
        if missing:
            raise InputError(f"{self.root}: not a REALY data directory, missing {', '.join(missing)}")

    def subject_ids(self) -> list[int]:
        return sorted(int(p.name) for p in self.region_dir.iterdir() if p.is_dir() and p.name.isdigit())

    def load_subject(self, subject_id: int) -> RealySubject:
        return _load_subject(self.root, int(subject_id))


@lru_cache(maxsize=8)
def _scales(root: Path) -> dict[int, float]:
    return read_metrical_scale(RealyData(root).scale_path)


# runs visit a subject's predictions one after the other (`_subject_chunks`), so two subjects are
# enough; each keeps its analysed bICP systems (CHOLMOD factors: over 100 MB for 20k GT vertices) alive
@lru_cache(maxsize=2)
def _load_subject(root: Path, subject_id: int) -> RealySubject:
    data = RealyData(root)
    scales = _scales(root)
    if subject_id not in scales:
        raise InputError(f"{data.scale_path}: no metrical scale for subject {subject_id}")
    region_dir = data.region_dir / str(subject_id)
    if not region_dir.is_dir():
        raise InputError(f"{region_dir}: no GT regions for subject {subject_id}")
    keypoints = read_gt_keypoints(data.keypoint_dir / f"{subject_id}.obj")
    regions = {name: read_region_mesh(region_dir / f"{name}.obj", name) for name in REGIONS}
    return RealySubject(subject_id, keypoints, regions, scales[subject_id])


# --- bICP: REALY's non-rigid ICP ----------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class NicpResult:
    """The deformed GT region and how many linear solves it took."""

    vertices: np.ndarray  # (N, 3)
    steps: int


class _NicpSystem:
    """REALY's NICP step as normal equations on the region's vertex graph.

    REALY solves min |alpha kron(M, G) X|^2 + |W (D X - B)|^2 for the (4N, 3) per-vertex affines X
    (M: edge-vertex incidence, D: the current homogeneous vertices) by Cholesky of the normal matrix
    alpha^2 kron(M^T M, G^2) + D^T W^2 D. That matrix has one 4x4 block per vertex and the same block
    -alpha^2 G^2 per edge, which is what facehd.sparse_cholesky factors; its symbolic analysis depends
    only on the mesh, so it is done once per GT region and reused.
    """

    def __init__(self, vertices: np.ndarray, faces: np.ndarray):
        self.edges = mesh_edges(faces)
        if len(self.edges) == 0:
            raise InputError("the GT region has no edges")
        self.degree = np.bincount(self.edges.ravel(), minlength=len(vertices)).astype(np.float64)
        self.cholesky = block_cholesky(vertices, self.edges, backend=CHOLESKY_BACKEND)
        # the last `keep=True` solve: (alpha, stiffness, x, weights), and its factor once it came twice
        self._kept_inputs: tuple | None = None
        self._kept_factor = None
        self._keeper = None  # the kept factor's own analysis, so that other solves do not overwrite it

    def solve(self, alpha: float, stiffness: Sequence[float], homogeneous: np.ndarray, weights: np.ndarray,
              weighted_targets: np.ndarray, *, keep: bool = False) -> np.ndarray:
        """X (N, 4, 3) minimising the stiffness plus sum_i weights_i |x_i^T X_i - target_i|^2, given
        homogeneous x (N, 4), weights (N,) (squared row weights) and weights_i target_i (N, 3).

        ``keep``: the matrix will come again (bICP's keypoint stage: the GT region, its keypoints and
        weights are the same for every prediction of a subject), so keep its factorization and reuse
        it while alpha, stiffness, x and the weights are unchanged; only the right-hand side differs.
        """
        inputs = (float(alpha), tuple(float(s) for s in stiffness), homogeneous, weights)
        rhs = homogeneous[:, :, None] * weighted_targets[:, None, :]
        again = keep and self._kept_inputs is not None and _same_inputs(self._kept_inputs, inputs)
        if again and self._kept_factor is not None:
            return self._kept_factor.solve(rhs)
        g2 = np.diag(np.square(np.asarray(stiffness, dtype=np.float64)))
        diagonal = (alpha**2) * self.degree[:, None, None] * g2 + (
            weights[:, None, None] * homogeneous[:, :, None] * homogeneous[:, None, :])
        cholesky = self.cholesky
        if again:  # the second time: worth an analysis of its own (a subject with one prediction never pays it)
            if self._keeper is None:
                self._keeper = block_cholesky(homogeneous[:, :3], self.edges, backend=CHOLESKY_BACKEND)
            cholesky = self._keeper
        try:
            factor = cholesky.factorize(diagonal, -(alpha**2) * g2)
        except InputError as exc:
            raise InputError("the bICP system is singular: the region is flat or a part of it has no "
                             "correspondence (REALY's Cholesky fails here too)") from exc
        if keep:
            self._kept_inputs = (inputs[0], inputs[1], homogeneous.copy(), weights.copy())
            self._kept_factor = factor if again else None
        return factor.solve(rhs)


def _same_inputs(kept: tuple, inputs: tuple) -> bool:
    return (kept[0] == inputs[0] and kept[1] == inputs[1] and np.array_equal(kept[2], inputs[2])
            and np.array_equal(kept[3], inputs[3]))


_SYSTEMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

def _system_of(region: RegionMesh) -> _NicpSystem:
    """One analysed system per GT region object, shared by every prediction of the subject."""
    if region not in _SYSTEMS:
        _SYSTEMS[region] = _NicpSystem(region.vertices, region.faces)
    return _SYSTEMS[region]


def _check_keypoint_components(vertices: np.ndarray, edges: np.ndarray, keypoint_index: np.ndarray,
                               name: str) -> None:
    """The keypoint-only first stage is singular unless every connected component of the region
    holds at least 4 keypoints that are not coplanar (REALY's Cholesky fails there)."""
    n = len(vertices)
    graph = sp.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    count, labels = connected_components(graph, directed=False)
    held = np.bincount(labels[keypoint_index], minlength=count)
    if not held.all():
        size = int(np.sum(labels == int(np.argmin(held))))
        raise InputError(f"GT region {name!r}: a connected part of {size} vertices holds no keypoint, so "
                         "bICP's keypoint stage cannot place it (REALY's solver fails there too)")
    for component in range(count):
        inside = np.unique(keypoint_index[labels[keypoint_index] == component])
        size = int(np.sum(labels == component))
        centred = vertices[inside] - vertices[inside].mean(axis=0)
        sv = np.linalg.svd(centred, compute_uv=False) if len(inside) >= 4 else np.zeros(3)
        if not sv[2] > RANK_RTOL * max(sv[0], np.finfo(float).tiny):
            raise InputError(f"GT region {name!r}: a connected part of {size} vertices holds only {len(inside)} "
                             "distinct keypoint vertices, all coplanar; bICP's keypoint stage needs 4 "
                             "non-coplanar ones in every part (REALY's solver fails there too)")


def realy_nicp(region: RegionMesh, targets, *, keypoint_index=None, keypoint_targets=None) -> NicpResult:
    """REALY's bICP deformation of a GT region toward `targets` (N, 3), the FIXED closest points of the
    region's vertices on the aligned prediction.

    Amberg-style per-vertex affines, following utils/NICP.py step by step: each step finds for every
    current vertex its nearest target POINT (KD-tree), keeps those nearer than max(2 x mean, 1),
    solves the stiffness + data least squares for affines X applied to the CURRENT vertices, and
    moves them. Without keypoints (cheek): 3 stages, alpha = 50 exp(-0.5 k), each until
    |X - X_prev| (Frobenius) <= 0.5^k. With keypoints (`keypoint_index` (K,) region vertices,
    `keypoint_targets` (K, 3) the prediction's keypoints): one keypoints-only solve (alpha 150,
    G = diag(2, 2, 3, 2)), then 3 stages with data plus keypoints weighted 50 exp(-0.9 count) / 10,
    at most 11 solves each. X starts as all ones, so the first test never stops a stage.
    """
    src = region.vertices
    targets = np.asarray(targets, dtype=np.float64)
    system = _system_of(region)
    tree = cKDTree(targets)
    with_keypoints = keypoint_index is not None
    if with_keypoints:
        keypoint_index = np.asarray(keypoint_index, dtype=np.int64)
        keypoint_targets = np.asarray(keypoint_targets, dtype=np.float64)
        _check_keypoint_components(src, system.edges, keypoint_index, region.name)
    stiffness = (1.0, 1.0, 1.0, NICP_GAMMA)
    keypoint_stiffness = NICP_STIFFNESS_KEYPOINT_STAGE[:3] + (NICP_STIFFNESS_KEYPOINT_STAGE[3] * NICP_GAMMA,)
    current = src
    x_previous = np.zeros((len(src), 4, 3))
    x = np.ones((len(src), 4, 3))
    steps = count = 0
    n_stages = NICP_STAGES_WITH_KEYPOINTS if with_keypoints else NICP_STAGES_WITHOUT_KEYPOINTS
    for stage in range(n_stages):
        first_stage = with_keypoints and stage == 0
        k = stage - 1 if with_keypoints else stage
        alpha = NICP_ALPHA_KEYPOINT_STAGE if first_stage else NICP_ALPHA * np.exp(-NICP_ALPHA_DECAY * k)
        epsilon = NICP_EPSILON * 0.5**k
        step = 0
        while not (np.linalg.norm(x - x_previous) <= epsilon or (with_keypoints and step > NICP_MAX_STEP)):
            if steps >= NICP_SAFETY_MAX_STEPS:
                raise InputError(f"GT region {region.name!r}: bICP did not converge in {steps} solves")
            x_previous = x
            distances, nearest = tree.query(current)
            threshold = max(NICP_THRESHOLD_FACTOR * float(np.mean(distances)), NICP_MIN_THRESHOLD)
            goal = targets[nearest]
            # D's rows are weighted 0/1 (data) and by the keypoint weight: squared in the normal equations
            weights = (distances < threshold).astype(np.float64)
            weighted = weights[:, None] * goal
            if with_keypoints:
                kp_weight = np.zeros(len(src))
                kp_weight[keypoint_index] = NICP_KEYPOINT_WEIGHT if first_stage else (
                    NICP_KEYPOINT_WEIGHT * np.exp(-NICP_KEYPOINT_WEIGHT_DECAY * count) / NICP_KEYPOINT_WEIGHT_DIVISOR)
                kp_goal = goal.copy()
                kp_goal[keypoint_index] = keypoint_targets  # a repeated vertex keeps its last keypoint, as in REALY
                kp_weight = kp_weight**2
                if first_stage:  # the keypoints-only stage has no data term
                    weights, weighted = kp_weight, kp_weight[:, None] * kp_goal
                else:
                    weights, weighted = weights + kp_weight, weighted + kp_weight[:, None] * kp_goal
            homogeneous = np.column_stack([current, np.ones(len(current))])
            x = system.solve(alpha, keypoint_stiffness if first_stage else stiffness, homogeneous, weights, weighted,
                             keep=first_stage)
            current = np.einsum("na,nac->nc", homogeneous, x)
            step += 1
            count += 1
            steps += 1
            if first_stage:
                break
    return NicpResult(current, steps)


# --- protocol -----------------------------------------------------------------------------------

def fit_icp_rt(source, target, *, with_scale: bool = True) -> RigidFit:
    """REALY's `fit_icp_RT`: source (N, 3) onto target (N, 3).

    R = U V^T from the SVD of the centred cross-covariance sum_i t_i s_i^T, with no reflection
    fix (det R = -1 is possible, as in REALY); scale = sum |t - t_mean|_1 / sum |R (s - s_mean)|_1
    (an L1 ratio, not Umeyama's); translation = mean(t - s R s).
    """
    src = np.asarray(source, dtype=np.float64)
    tgt = np.asarray(target, dtype=np.float64)
    s1 = src - src.mean(axis=0)
    t1 = tgt - tgt.mean(axis=0)
    u, _, vt = np.linalg.svd(t1.T @ s1)
    rotation = u @ vt
    scale = float(np.abs(t1).sum() / np.abs(s1 @ rotation.T).sum()) if with_scale else 1.0
    translation = np.mean(tgt - scale * src @ rotation.T, axis=0)
    return RigidFit(scale, rotation, translation)


def keypoint_repetitions(n_region_vertices: int, n_keypoints: int, region: str) -> int:
    """How often rICP repeats the region's keypoint pairs: int(N / K), the cheek int(N / K / 4)."""
    rate = n_region_vertices / n_keypoints
    if region == "cheek":
        rate /= CHEEK_KEYPOINT_DIVISOR
    return int(rate)


def region_icp(index: SurfaceIndex, gt_vertices: np.ndarray, pred_keypoints: np.ndarray,
               gt_keypoints: np.ndarray, region: str, *, max_iterations: int = RICP_MAX_ITERATIONS,
               tolerance: float = RICP_MSE_TOLERANCE) -> RegionIcp:
    """REALY's rICP of the gICP-aligned prediction (indexed by `index`) onto one GT region.

    Each iteration: correspondences = the closest surface points of the current prediction for every
    GT vertex plus the keypoint pairs repeated `keypoint_repetitions` times; a rigid fit (no scale,
    no reflection fix); MSE of the fitted correspondences. The loop stops, WITHOUT applying the
    transform just computed, when |MSE - previous MSE| < tolerance (the previous MSE starts at 0) or
    after `max_iterations` applied transforms. The prediction is never re-indexed: GT points are
    mapped into its frame instead (rigid transforms preserve closest points).
    """
    repetitions = keypoint_repetitions(len(gt_vertices), len(gt_keypoints), region)
    if repetitions < 1:
        # REALY's np.vstack([...] * 0) fails here; say why instead
        raise InputError(f"GT region {region!r} has {len(gt_vertices)} vertices, too few for its "
                         f"{len(gt_keypoints)} rICP keypoints")
    gt_corr = np.concatenate([gt_vertices, np.tile(gt_keypoints, (repetitions, 1))])
    kp_corr = np.tile(pred_keypoints, (repetitions, 1))
    rotation, translation = np.eye(3), np.zeros(3)
    mse_history: list[float] = []
    previous, iterations, reflection = 0.0, 0, False
    while True:
        local = (gt_vertices - translation) @ rotation  # GT in the gICP-aligned prediction's frame
        on_pred = index.closest(local).points @ rotation.T + translation
        pred_corr = np.concatenate([on_pred, kp_corr @ rotation.T + translation])
        fit = fit_icp_rt(pred_corr, gt_corr, with_scale=False)
        mse = float(np.mean(np.sum((fit.apply(pred_corr) - gt_corr) ** 2, axis=1)))
        mse_history.append(mse)
        if abs(mse - previous) < tolerance or iterations >= max_iterations:
            break
        iterations += 1
        previous = mse
        reflection |= fit.reflection
        rotation, translation = fit.rotation @ rotation, fit.rotation @ translation + fit.translation
    return RegionIcp(RigidFit(1.0, rotation, translation), iterations, tuple(mse_history), repetitions, reflection)


def _nearest_vertices(vertices: np.ndarray, points: np.ndarray) -> np.ndarray:
    return cKDTree(vertices).query(points)[1].astype(np.int64)


def _region_error(index: SurfaceIndex, icp: RigidFit, gt: RegionMesh, pred_keypoints: np.ndarray | None,
                  gt_keypoints: np.ndarray | None) -> tuple[np.ndarray, int]:
    """bICP: deform the GT region toward the fixed closest points on the aligned prediction, then
    per GT vertex |closest point of its deformed position on the prediction - GT vertex| (GT units)."""

    def closest_on_aligned(points: np.ndarray) -> np.ndarray:
        local = (points - icp.translation) @ icp.rotation
        return index.closest(local).points @ icp.rotation.T + icp.translation

    targets = closest_on_aligned(gt.vertices)
    keypoint_index = None if gt_keypoints is None else _nearest_vertices(gt.vertices, gt_keypoints)
    result = realy_nicp(gt, targets, keypoint_index=keypoint_index, keypoint_targets=pred_keypoints)
    updated = closest_on_aligned(result.vertices)
    return np.linalg.norm(updated - gt.vertices, axis=1), result.steps


def _uncovered_degenerate_faces(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Indices of the degenerate (zero-area) faces whose points are not all on other faces.

    A degenerate triangle is the segment between its two farthest corners (a point when all three
    coincide). `SurfaceIndex` leaves it out, which changes no closest point when that segment lies
    on the edges of the non-degenerate faces: the segment is such an edge, or its two parts through
    the middle corner are. Vertices are compared by position, so split copies of a vertex count as one.
    """
    degenerate = _degenerate_faces(vertices, faces)
    if not degenerate.any():
        return np.zeros(0, dtype=np.int64)
    _, canonical = np.unique(vertices, axis=0, return_inverse=True)
    canonical = canonical.reshape(-1).astype(np.int64)
    n = int(canonical.max()) + 1
    good = canonical[faces[~degenerate]]
    pairs = np.sort(good[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    edge_keys = np.unique(pairs[:, 0] * n + pairs[:, 1])
    good_vertices = np.unique(good)

    def on_surface(x: np.ndarray, y: np.ndarray) -> np.ndarray:  # segment x-y is an edge, or a used point
        low, high = np.minimum(x, y), np.maximum(x, y)
        return np.where(x == y, np.isin(x, good_vertices), np.isin(low * n + high, edge_keys))

    index = np.flatnonzero(degenerate)
    corners = canonical[faces[index]]  # (D, 3)
    tri = vertices[faces[index]]
    lengths = np.stack([np.sum((tri[:, (k + 1) % 3] - tri[:, (k + 2) % 3]) ** 2, axis=1) for k in range(3)],
                       axis=1)  # column k: the edge opposite corner k
    middle = np.argmax(lengths, axis=1)  # the corner opposite the longest edge
    rows = np.arange(len(index))
    p, m, q = corners[rows, (middle + 1) % 3], corners[rows, middle], corners[rows, (middle + 2) % 3]
    covered = on_surface(p, q) | (on_surface(p, m) & on_surface(m, q))
    return index[~covered]


def _prediction_surface(vertices: np.ndarray, faces: np.ndarray, source: str) -> SurfaceIndex:
    """The prediction's `SurfaceIndex`, refused when leaving its degenerate faces out (as SurfaceIndex
    does) could change a closest point, i.e. REALY's score."""
    uncovered = _uncovered_degenerate_faces(vertices, faces)
    if len(uncovered):
        k = int(uncovered[0])
        raise InputError(f"{source}: {len(uncovered)} degenerate (zero-area) triangles that no other triangle "
                         f"covers, first: face {k + 1} = vertices {(faces[k] + 1).tolist()} (1-based); REALY "
                         "measures to them, facehd cannot, so the score could differ: fix the mesh")
    return SurfaceIndex(vertices, faces)


def _check_topology(template: TemplateKeypoints, vertices: np.ndarray, faces: np.ndarray, source: str) -> None:
    if template.n_vertices is not None and len(vertices) != template.n_vertices:
        raise InputError(f"{source}: has {len(vertices)} vertices, the template {template.source} "
                         f"{template.n_vertices}: not the template's topology")
    if template.faces is not None:
        same = len(faces) == len(template.faces) and np.array_equal(
            np.unique(np.sort(faces, axis=1), axis=0), np.unique(np.sort(template.faces, axis=1), axis=0))
        if not same:
            raise InputError(f"{source}: its triangles differ from the template's ({len(faces)} vs "
                             f"{len(template.faces)} faces): not the template's topology")
    elif int(template.face_index.max()) >= len(faces):
        raise InputError(f"{source}: has {len(faces)} faces but the template keypoints refer to face "
                         f"{int(template.face_index.max())}: not the template's topology")


def evaluate_prediction(vertices, faces, subject: RealySubject, template: TemplateKeypoints, *,
                        template_mask: np.ndarray | None = None, source: str = "prediction") -> PredictionEvaluation:
    """REALY's evaluation of one prediction (vertices (N, 3) in any unit and frame, faces (F, 3) on
    the template topology) against one subject, steps 1-4 of DESIGN.md section 8.

    The prediction is aligned to the GT (never the reverse): gICP on the 7 keypoints, then per region
    rICP from the gICP result and bICP of the GT region toward the aligned prediction. Errors are in
    millimetres (GT units x the subject's metrical scale).
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    _check_topology(template, vertices, faces, source)
    keypoints = template.points(vertices, faces)
    seven = list(GICP_KEYPOINTS)
    gicp = fit_icp_rt(keypoints[seven], subject.keypoints[seven], with_scale=True)
    aligned = gicp.apply(vertices)
    aligned_keypoints = gicp.apply(keypoints)
    icp_index = _prediction_surface(aligned, faces, source)
    eval_index = icp_index
    if template_mask is not None:
        if len(template_mask) != len(vertices):
            raise InputError(f"{source}: template mask has {len(template_mask)} values for {len(vertices)} vertices")
        eval_index = _prediction_surface(aligned, faces[template_mask[faces].all(axis=1)], source)
    regions = {}
    with single_threaded_blas():  # many small dense kernels: BLAS threads only contend
        for name in REGIONS:
            gt = subject.regions[name]
            ricp_kp = list(RICP_KEYPOINTS[name])
            icp = region_icp(icp_index, gt.vertices, aligned_keypoints[ricp_kp], subject.keypoints[ricp_kp], name)
            bicp_kp = BICP_KEYPOINTS[name]
            pred_kp = None if bicp_kp is None else icp.transform.apply(aligned_keypoints[list(bicp_kp)])
            gt_kp = None if bicp_kp is None else subject.keypoints[list(bicp_kp)]
            try:
                per_vertex, steps = _region_error(eval_index, icp.transform, gt, pred_kp, gt_kp)
            except InputError as exc:
                raise InputError(f"subject {subject.subject_id}, region {name}: {exc}") from exc
            error = float(per_vertex.mean())
            regions[name] = RegionEvaluation(name, error, error * subject.metrical_scale, icp, steps,
                                             per_vertex * subject.metrical_scale, gt)
    return PredictionEvaluation(gicp, regions)


def _result(prediction: PredictionFile, evaluation: PredictionEvaluation) -> PredictionResult:
    return PredictionResult(
        prediction.name, prediction.subject_id, prediction.track, evaluation.errors_mm,
        evaluation.gicp.scale, evaluation.gicp.reflection,
        {k: r.icp.iterations for k, r in evaluation.regions.items()},
        any(r.icp.reflection for r in evaluation.regions.values()),
        {k: r.gt.degenerate_faces for k, r in evaluation.regions.items()},
    )


def evaluate_path(data_root: str | Path, prediction: PredictionFile, template: TemplateKeypoints,
                  template_mask: np.ndarray | None = None) -> PredictionEvaluation:
    """Read one prediction file and its subject's GT, and evaluate it (raises FaceHDError)."""
    subject = RealyData(Path(data_root)).load_subject(prediction.subject_id)
    vertices, faces = _read_obj_arrays(prediction.path)
    return evaluate_prediction(vertices, faces, subject, template, template_mask=template_mask,
                               source=str(prediction.path))


def evaluate_file(data_root: str | Path, prediction: PredictionFile, template: TemplateKeypoints,
                  template_mask: np.ndarray | None = None) -> PredictionResult | PredictionFailure:
    """Evaluate one prediction file; a FaceHDError becomes a PredictionFailure (batch runs go on)."""
    try:
        return _result(prediction, evaluate_path(data_root, prediction, template, template_mask))
    except FaceHDError as exc:
        return PredictionFailure(prediction.name, str(prediction.path), prediction.track, str(exc))


def _outcomes(data_root: Path, predictions: Sequence[PredictionFile], template: TemplateKeypoints,
              template_mask: np.ndarray | None, workers: int, progress: Callable[[int], None] | None,
              ) -> list[PredictionResult | PredictionFailure]:
    RealyData(data_root).check()
    _scales(data_root)  # a malformed metrical_scale.txt stops the run before any work
    outcomes: list = [None] * len(predictions)
    if workers <= 1 or len(predictions) <= 1:
        for chunk in _subject_chunks(predictions, 1):  # a subject's predictions one after the other
            for i in chunk:
                outcomes[i] = evaluate_file(data_root, predictions[i], template, template_mask)
                if progress:
                    progress(1)
        return outcomes
    with ProcessPoolExecutor(max_workers=workers) as pool:
        tasks = [(chunk, pool.submit(_evaluate_files, data_root, [predictions[i] for i in chunk], template,
                                     template_mask))
                 for chunk in _subject_chunks(predictions, workers)]
        for chunk, future in tasks:
            for i, outcome in zip(chunk, future.result()):
                outcomes[i] = outcome
            if progress:
                progress(len(chunk))
    return outcomes


def _subject_chunks(predictions: Sequence[PredictionFile], workers: int) -> list[list[int]]:
    """Indices of the predictions, grouped by subject so that a process loads and analyses a subject's
    GT regions once for all its predictions (REALY: 1 frontal + 4 side views per subject); groups are
    cut to at most len / (4 x workers) so that a run of a few subjects still keeps every process busy."""
    by_subject: dict[int, list[int]] = {}
    for i, prediction in enumerate(predictions):
        by_subject.setdefault(prediction.subject_id, []).append(i)
    most = max(1, -(-len(predictions) // (4 * workers)))
    return [group[start : start + most] for group in by_subject.values() for start in range(0, len(group), most)]


def _evaluate_files(data_root: Path, predictions: Sequence[PredictionFile], template: TemplateKeypoints,
                    template_mask: np.ndarray | None) -> list[PredictionResult | PredictionFailure]:
    return [evaluate_file(data_root, p, template, template_mask) for p in predictions]


def evaluate_predictions(data_root: str | Path, predictions: Sequence[PredictionFile], template: TemplateKeypoints,
                         *, template_mask: np.ndarray | None = None, workers: int = 1,
                         progress: Callable[[int], None] | None = None,
                         ) -> tuple[list[PredictionResult], list[PredictionFailure]]:
    """Evaluate many predictions (in `workers` processes); results keep the input order.

    `progress(n)` is called as predictions finish. Failures are returned, not raised.
    """
    outcomes = _outcomes(Path(data_root), predictions, template, template_mask, workers, progress)
    return ([o for o in outcomes if isinstance(o, PredictionResult)],
            [o for o in outcomes if isinstance(o, PredictionFailure)])


# --- REALY_error.txt ----------------------------------------------------------------------------

def write_realy_error(path: str | Path, results: Iterable[PredictionResult]) -> None:
    """Write REALY's `REALY_error.txt` at full precision, atomically.

    One line per prediction: `<name>\\t\\t<nose>\\t<mouth>\\t<forehead>\\t<cheek>`, errors in mm.
    REALY writes `str(value)[:9]`; here each value is Python's shortest exact repr, so it reads back
    bit for bit. The empty second column is REALY's (its `f_w.write("\\t")` before each region).
    """
    lines = []
    for result in results:
        values = "\t".join(repr(float(result.errors_mm[name])) for name in REGIONS)
        lines.append(f"{result.name}\t\t{values}\n")
    with atomic_open(path, "w", newline="\n") as fh:
        fh.writelines(lines)


def read_realy_error(path: str | Path) -> pd.DataFrame:
    """REALY_error.txt (REALY's or ours) -> DataFrame indexed by prediction name, one column per region (mm)."""
    path = Path(path)
    names, rows = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) == 6 and fields[1] == "":
            fields = [fields[0]] + fields[2:]
        if len(fields) != 5:
            raise FileFormatError(path, f"line {number}: expected 5 tab-separated fields "
                                        "'<name>\\t\\t<nose>\\t<mouth>\\t<forehead>\\t<cheek>'")
        try:
            rows.append([float(v) for v in fields[1:]])
        except ValueError as exc:
            raise FileFormatError(path, f"line {number}: not a number ({exc})") from exc
        names.append(fields[0])
    return pd.DataFrame(rows, index=pd.Index(names, name="prediction"), columns=list(REGIONS))


# --- aggregation --------------------------------------------------------------------------------

def errors_frame(results: Iterable[PredictionResult]) -> pd.DataFrame:
    """Per-prediction errors (mm): index = prediction name, columns = REGIONS."""
    results = list(results)
    return pd.DataFrame([[r.errors_mm[k] for k in REGIONS] for r in results],
                        index=pd.Index([r.name for r in results], name="prediction"), columns=list(REGIONS))


def summarize(errors: pd.DataFrame) -> pd.Series:
    """REALY's statistics over all rows (step 5): per region mean, median and std (ddof 1, as
    REALY's `std * sqrt(n) / sqrt(n - 1)`), and "all" = the mean of the four region means."""
    out = {}
    for name in REGIONS:
        column = errors[name].to_numpy(dtype=np.float64)
        out[(name, "mean")] = float(column.mean()) if len(column) else math.nan
        out[(name, "median")] = float(np.median(column)) if len(column) else math.nan
        out[(name, "std")] = float(column.std(ddof=1)) if len(column) > 1 else math.nan
    out[("all", "mean")] = float(np.mean([out[(name, "mean")] for name in REGIONS]))
    return pd.Series(out)


def realy_table(track: str, evaluated: dict[str, pd.DataFrame], *, published: bool = True) -> pd.DataFrame:
    """Rows: the published methods of `track` (optional), then each evaluated method; columns
    (region, stat) for the four regions x (mean, median, std) and ("all", "mean"); millimetres.
    Published rows carry means only; an evaluated method named like one is labelled "(this run)"."""
    columns = pd.MultiIndex.from_tuples([(r, s) for r in REGIONS for s in ("mean", "median", "std")]
                                        + [("all", "mean")], names=["region", "stat"])
    rows, labels = [], []
    shown = REALY_PUBLISHED.get(track, {}) if published else {}
    for method, means in shown.items():
        by_region = dict(zip(REGIONS + ("all",), means))
        rows.append([by_region[r] if s == "mean" else math.nan for r, s in columns])
        labels.append(method)
    for method, errors in evaluated.items():
        summary = summarize(errors)
        rows.append([summary.get((r, s), math.nan) for r, s in columns])
        labels.append(f"{method} (this run)" if method in shown else method)
    return pd.DataFrame(rows, index=pd.Index(labels, name="method"), columns=columns)


def table_note(track: str, counts: dict[str, int], *, published: bool = True, synthetic: bool = False,
               degenerate_gt: dict[tuple[int, str], int] | None = None) -> str:
    """The text under a REALY table: what was measured, how, on what, and where published rows come from.

    `degenerate_gt`: (subject, region) -> degenerate GT triangles of the evaluated subjects (see RegionMesh)."""
    evaluated = ", ".join(f"{m}: {n}" for m, n in counts.items()) or "none"
    expected = {"frontal": 100, "side": 400}[track]
    lines = [
        f"REALY {track} track; predictions evaluated: {evaluated} (REALY has {expected} {track} images).",
        "Error per region (REALY's NMSE): mean over the GT region's vertices of |closest point on the aligned "
        "prediction of the bICP-deformed GT vertex - GT vertex| (direction GT -> prediction, point-to-surface), "
        "x the subject's metrical scale, in mm. The prediction is aligned to the GT: gICP on 7 keypoints, "
        "then rICP per region. Mean, median and std (ddof 1) over predictions; all = mean of the four region "
        "means.",
    ]
    if published:
        lines.append(f"Published rows ({', '.join(REALY_PUBLISHED.get(track, {}))}): {REALY_SOURCE}.")
    if synthetic:
        lines.append("Data: the synthetic REALY stand-in (SynthBFM subjects), not comparable to the published rows.")
    shown = {key: n for key, n in sorted((degenerate_gt or {}).items()) if n}
    if shown:
        where = ", ".join(f"subject {subject} {region} {n}" for (subject, region), n in shown.items())
        lines.append(f"GT regions with degenerate (zero-area) triangles, evaluated as REALY does (such a triangle "
                     f"only adds edges to bICP's graph): {where}.")
    return "\n".join(lines)


# --- a whole run: several methods, both tracks ---------------------------------------------------

@dataclass(frozen=True, eq=False)
class RealyRun:
    """The outcome of evaluating several methods' prediction folders on one REALY data directory."""

    data_root: Path
    template: TemplateKeypoints
    template_mask: np.ndarray | None
    tracks: tuple[str, ...]
    predictions: dict[str, list[PredictionFile]]  # method -> files, in evaluation order
    results: dict[str, list[PredictionResult]]  # method -> rows, in prediction order
    failures: dict[str, list[PredictionFailure]]
    skipped: dict[str, list[str]]  # method -> .obj files that are not named like predictions
    synthetic: bool = False  # the embedded synthetic benchmark

    def errors(self, method: str, track: str) -> pd.DataFrame:
        return errors_frame(r for r in self.results[method] if r.track == track)

    def table(self, track: str, *, published: bool = True) -> pd.DataFrame:
        return realy_table(track, {m: self.errors(m, track) for m in self.results}, published=published)

    def note(self, track: str, *, published: bool = True) -> str:
        degenerate = {(r.subject_id, region): n for results in self.results.values() for r in results
                      if r.track == track for region, n in r.gt_degenerate_faces.items()}
        return table_note(track, {m: len(self.errors(m, track)) for m in self.results}, published=published,
                          synthetic=self.synthetic, degenerate_gt=degenerate)


def collect_predictions(methods: dict[str, Path], track: str = "both"
                        ) -> tuple[dict[str, list[PredictionFile]], dict[str, list[str]]]:
    """Each method's prediction files for `track`, and the .obj files skipped as not REALY-named.

    Raises InputError naming the folder when a method has no predictions for `track`."""
    if track not in TRACKS + ("both",):
        raise InputError(f"unknown track {track!r}; choose frontal, side or both")
    listed = {method: list_predictions(folder, track) for method, folder in methods.items()}
    for method, (found, skipped) in listed.items():
        if not found:
            which = "" if track == "both" else f" {track}"
            others = f"; {len(skipped)} other .obj files skipped" if skipped else ""
            raise InputError(f"{methods[method]}: no{which} REALY predictions found for {method!r} (expected "
                             f"<id>.obj or <id>_<k>.obj, or any <id>[_<k>].obj under frontal/ or side/{others})")
    return {m: found for m, (found, _) in listed.items()}, {m: skipped for m, (_, skipped) in listed.items()}


def evaluate_methods(data_root: str | Path, predictions: dict[str, list[PredictionFile]],
                     template: TemplateKeypoints, *, track: str = "both", template_mask: np.ndarray | None = None,
                     workers: int = 1, progress: Callable[[int], None] | None = None,
                     skipped: dict[str, list[str]] | None = None) -> RealyRun:
    """Evaluate every method's predictions in one pool; see `evaluate_predictions`."""
    flat = [(method, p) for method, files in predictions.items() for p in files]
    outcomes = _outcomes(Path(data_root), [p for _, p in flat], template, template_mask, workers, progress)
    results: dict[str, list[PredictionResult]] = {m: [] for m in predictions}
    failures: dict[str, list[PredictionFailure]] = {m: [] for m in predictions}
    for (method, _), outcome in zip(flat, outcomes):
        (results if isinstance(outcome, PredictionResult) else failures)[method].append(outcome)
    tracks = TRACKS if track == "both" else (track,)
    return RealyRun(Path(data_root), template, template_mask, tracks, predictions, results, failures,
                    dict(skipped or {}))


def write_run(run: RealyRun, out_dir: str | Path) -> list[Path]:
    """`<out>/<method>/<track>/REALY_error.txt` (full precision) and `<out>/realy_predictions.csv`
    (every prediction with its diagnostics); returns the written paths."""
    out_dir = Path(out_dir)
    written = []
    rows = []
    for method, results in run.results.items():
        for track in run.tracks:
            path = out_dir / method / track / "REALY_error.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_realy_error(path, [r for r in results if r.track == track])
            written.append(path)
        for r in results:
            rows.append({"method": method, "track": r.track, "prediction": r.name, "subject": r.subject_id,
                         **{f"{k}_mm": r.errors_mm[k] for k in REGIONS}, "gicp_scale": r.gicp_scale,
                         "gicp_reflection": r.gicp_reflection, "ricp_reflection": r.ricp_reflection,
                         **{f"ricp_iterations_{k}": r.ricp_iterations.get(k) for k in REGIONS},
                         **{f"gt_degenerate_faces_{k}": r.gt_degenerate_faces.get(k) for k in REGIONS}})
    path = out_dir / "realy_predictions.csv"
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", newline="") as fh:
        pd.DataFrame(rows).to_csv(fh, index=False, float_format="%.17g")
    written.append(path)
    return written


def run_realy(realy_dir: str | Path | None, preds: dict[str, Path], template_keypoints: str | Path | None = None,
              *, template_mask: str | Path | None = None, track: str = "both", cache_root: str | Path | None = None,
              workers: int = 1, progress: Callable[[str, int, int], None] | None = None,
              synthetic_subjects: int | None = None) -> RealyRun:
    """Everything `facehd-bench realy` does before printing.

    With `realy_dir`, the real benchmark: `preds` (method -> folder) and `template_keypoints` are
    required. Without it, the embedded synthetic benchmark (generated once under `cache_root`, default
    $FACEHD_CACHE or ~/.cache/facehd): its reference methods unless `preds` are given, its SynthBFM
    template unless `template_keypoints` is. `progress(stage, done, total)` reports both stages.
    """
    synthetic = realy_dir is None
    if synthetic:
        from benchmarks import synthetic_realy

        if progress:
            progress("generating the synthetic set", 0, 1)
        root = None if cache_root is None else Path(cache_root) / synthetic_realy.default_root().name
        kwargs = {} if synthetic_subjects is None else {"n_subjects": synthetic_subjects}
        layout = synthetic_realy.ensure_synthetic_realy(root, **kwargs)
        realy_dir = layout.root
        template_keypoints = template_keypoints or layout.template_keypoints
        if not preds:
            from benchmarks.synthetic import REFERENCE_METHODS

            preds = {method: layout.predictions(method) for method in REFERENCE_METHODS}
    else:
        if not preds:
            raise InputError("--realy needs at least one --pred NAME=DIR")
        if template_keypoints is None:
            raise InputError("--realy needs --template-keypoints: the predictions' 85 barycentric keypoints "
                             "(REALY's data/<topology>.txt, with <topology>.obj beside it)")
    data = RealyData(Path(realy_dir))
    data.check()
    template = read_template_keypoints(template_keypoints)
    mask = None if template_mask is None else read_template_mask(template_mask, template.n_vertices)
    predictions, skipped = collect_predictions(dict(preds), track)
    total = sum(len(v) for v in predictions.values())
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress("evaluating", done, total)

    run = evaluate_methods(data.root, predictions, template, track=track, template_mask=mask, workers=workers,
                           progress=step, skipped=skipped)
    return dataclasses.replace(run, synthetic=synthetic)


def write_plots(run: RealyRun, plots_dir: str | Path) -> list[Path]:
    """Per track a bar chart of the table, and per method one example prediction (its first one)
    drawn as per-vertex error heat maps on each GT region (benchmarks.plots)."""
    from benchmarks.plots import plot_error_heatmap, plot_table_bars

    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for track in run.tracks:
        table = run.table(track).copy()
        table[("all", "median")] = math.nan  # "all" is a mean of means: no spread to draw
        table[("all", "std")] = math.nan
        published = list(REALY_PUBLISHED.get(track, {}))
        written.append(plot_table_bars(table, plots_dir / f"realy_{track}_bars.png",
                                       f"REALY {track}: mean error per region (mm)", published_rows=published))
    for method, files in run.predictions.items():
        done = {r.name for r in run.results[method]}
        example = next((p for p in files if p.name in done), None)
        if example is None:
            continue
        evaluation = evaluate_path(run.data_root, example, run.template, run.template_mask)
        for name, region in evaluation.regions.items():
            path = plots_dir / f"realy_{method}_{example.name}_{name}.png"
            title = f"{method}, prediction {example.name}, {name}: mean {region.error_mm:.3f} mm"
            written.append(plot_error_heatmap(region.gt.vertices, region.gt.faces, region.vertex_errors_mm,
                                              path, title))
    return written

