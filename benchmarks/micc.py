"""The MICC Florence benchmark (HRN supplement Table 1, GANFit's protocol): dataset and prediction
reading, ground-truth registration to the template, the aligned distance, and the table."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.published import MICC_SETTINGS, MICC_SOURCE, micc_published_table
from facehd import conventions as cv
from facehd.distance import DEGENERATE_AREA_RTOL, SurfaceIndex, as_faces, as_points
from facehd.errors import FaceHDError, FileFormatError, InputError
from facehd.fsutil import atomic_path
from facehd.icp import MAX_SIMILARITY_ITERATIONS, MICC_TOL_MM, similarity_icp
from facehd.nicp import nonrigid_icp
from facehd.procrustes import Similarity, check_landmark_fit, fit_similarity_norm_ratio, rms_residual

# --- protocol (DESIGN.md section 8; GANFit's released MICC evaluation, followed by HRN) -----------
CROP_RADIUS_MM = 95.0  # GANFit / HRN MICC protocol: vertices within 95 mm of the nose tip
# GANFit's evaluation (followed by HRN) crops subject 28 at 60 mm instead; keyed by subject number.
SUBJECT_CROP_RADII_MM = {28: 60.0}
NOSE_TIP = cv.NOSE_TIP_IBUG  # iBUG landmark 30
ICP_TOL_MM = MICC_TOL_MM  # stop once the mean distance improves by no more than 0.001 mm
MIN_CROP_VERTICES = 3  # a similarity needs three non-collinear points
# "released": GANFit's released evaluation rule for rule (menpo's similarity, the GT scan's own nose
# landmark as the f(GT, pred) crop centre, menpo's crop, the loop returning its last distance);
# "robust": facehd's loop (Umeyama, keypoint crop centres, the best iterate, at most 100 steps).
PROTOCOLS = ("released", "robust")
# The released loop has no iteration cap; this safety net lies far above the few tens of steps the
# data needs, and reaching it is reported.
RELEASED_SAFETY_ITERATIONS = 1000
# Registration plausibility (flagged per scan in the output). Coverage = fraction of the template's
# crop, placed by the landmark similarity before any deformation, within COVERAGE_DISTANCE_MM of
# the scan: the scan's share of the face. The synthetic scans (with holes) cover 100 %, one cut to
# its top 30 % of triangles 21 % (non-rigid ICP then drew the whole template onto that band, 0.06 mm
# from it, so the residual alone does not tell).
COVERAGE_DISTANCE_MM = 10.0
MIN_PLAUSIBLE_COVERAGE = 0.8
MAX_PLAUSIBLE_SURFACE_MM = 1.0  # mean registered-to-scan distance (GANFit's registrations: ~0.1 mm)
MAX_PLAUSIBLE_LANDMARK_RMS_MM = 10.0
# MICC video folder -> column of Table 1.
SETTINGS = {"Indoor-Cooperative": "Cooperative", "PTZ-Indoor": "Indoor", "PTZ-Outdoor": "Outdoor"}
SCANS = ("frontal1", "frontal2")
DIRECTIONS = ("symmetric", "gt_to_pred", "pred_to_gt")
METRICS = ("point_to_surface", "point_to_plane")
UNITS = ("auto", "mm", "model")
MESH_SUFFIXES = (".obj", ".ply", ".wrl", ".vrml")  # preference order when one scan has several files
PREDICTION_SUFFIXES = (".obj", ".ply")
# A prediction whose size is within this factor of the template's is taken to be in its units;
# mm against model units (x100) or the reverse (/100) fall far outside.
UNIT_RATIO_TOLERANCE = 3.0
REGISTRATION_VERSION = 2  # bump when the registration changes: it is part of the cache key
# Non-rigid ICP of the ground-truth registration: menpo3d's full default schedule (facehd.nicp's
# defaults are its first five steps), from a nearly rigid fit that follows the landmarks down to a
# flexible one that follows the scan alone. The last three steps more than halve the registration
# error on the synthetic set (0.17 -> 0.07 mm with a 64-row SynthBFM template) for ~15% more time.
NICP_STIFFNESS = (50.0, 20.0, 5.0, 2.0, 0.8, 0.5, 0.35, 0.2)
NICP_LANDMARK_WEIGHTS = (5.0, 2.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0)
# Template vertices farther than this from the scan (beyond its border, in a hole) are not pulled.
NICP_MAX_DISTANCE_MM = 20.0
# The released protocol's registration: menpo3d 0.8.6 `non_rigid_icp` with its defaults (read in
# menpo3d/correspond/nicp.py): the same stiffness and landmark schedules, data weight 1 where the
# deformed template's vertex normal and the target triangle's normal have a dot product above 0.9
# (else 0; no distance cut-off, no boundary rule), each solve's affines acting on the current
# vertices, and a step ending once the RMS change of the affines between successive solves is below
# eps = 1e-3 (no cap; a safety net far above it).
MENPO3D_EPS = 1e-3
MENPO3D_MIN_NORMAL_DOT = 0.9
MENPO3D_SAFETY_SOLVES = 500

_SUBJECT_DIR = re.compile(r"^subject_?(\d+)$", re.IGNORECASE)
_SCAN_TAG = re.compile(r"frontal([12])(?!\d)", re.IGNORECASE)
_LANDMARK_SUFFIXES = (".txt", ".npy")
LJSON_SUFFIX = ".ljson"  # menpo's landmark JSON


class PredictionUnitsError(InputError):
    """A prediction's size says it is not in the template's units (e.g. mm against model units)."""


# ----------------------------------------------------------------------------------------------
# template


@dataclass(frozen=True, eq=False)
class Template:
    """The prediction template: the topology every prediction (and the registered GT) shares.

    vertices (N, 3) and faces (F, 3) in template units (a BFM-layout model: its mean shape, in
    model units), faces consistently wound; keypoints (68,) iBUG vertex indices;
    `mm_per_unit` converts distances to millimetres (BFM: 100).
    """

    vertices: np.ndarray
    faces: np.ndarray
    keypoints: np.ndarray
    mm_per_unit: float
    source: str

    @property
    def n_vertices(self) -> int:
        return len(self.vertices)

    @property
    def nose_tip(self) -> int:
        return int(self.keypoints[NOSE_TIP])

    @property
    def size(self) -> float:
        """RMS distance of the vertices from their centroid, template units."""
        return _rms_radius(self.vertices)

    @property
    def key(self) -> str:
        """A hash of the geometry, topology, keypoints and units (part of the registration cache key)."""
        h = hashlib.sha256()
        for a in (self.vertices.astype(np.float64), self.faces.astype(np.int64), self.keypoints.astype(np.int64)):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(repr(float(self.mm_per_unit)).encode())
        return h.hexdigest()[:16]


def _rms_radius(points: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.sum((points - points.mean(axis=0)) ** 2, axis=1))))


def make_template(vertices, faces, keypoints, *, mm_per_unit: float = cv.MM_PER_MODEL_UNIT,
                  source: str = "(in memory)") -> Template:
    """Validate a template: finite vertices, in-range non-degenerate faces (rewound consistently if
    needed), 68 keypoints in range."""
    vertices = as_points(vertices, f"{source}: template vertices")
    faces = as_faces(faces, len(vertices), f"{source}: template faces")
    check_triangles(vertices, faces, f"{source}: template")
    keypoints = np.asarray(keypoints).reshape(-1)
    if keypoints.size != cv.N_LANDMARKS or not np.issubdtype(keypoints.dtype, np.integer) \
            or keypoints.min() < 0 or keypoints.max() >= len(vertices):
        raise InputError(f"{source}: template keypoints must be {cv.N_LANDMARKS} vertex indices in "
                         f"[0, {len(vertices)}), got {keypoints.size} values of dtype {keypoints.dtype}")
    if not (math.isfinite(mm_per_unit) and mm_per_unit > 0):
        raise InputError(f"{source}: mm_per_unit must be positive, got {mm_per_unit}")
    return Template(vertices, consistent_winding(vertices, faces), keypoints.astype(np.int64),
                    float(mm_per_unit), source)


def read_keypoints(path: str | Path) -> np.ndarray:
    """68 0-based vertex indices from a text file (whitespace / comma separated, '#' comments) or
    a .npy array; a .mat file's 1-based `keypoints` field (the BFM layout) is also accepted."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            values = np.load(path)
        elif path.suffix.lower() == ".mat":
            import scipy.io

            values = np.asarray(scipy.io.loadmat(str(path))["keypoints"]).reshape(-1) - 1
        else:
            values = np.loadtxt(path.read_text().replace(",", " ").splitlines(), comments="#", ndmin=1)
    except (OSError, ValueError, KeyError) as exc:
        raise FileFormatError(path, f"cannot read keypoint indices ({exc})") from exc
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size != cv.N_LANDMARKS or np.any(values != np.round(values)):
        raise FileFormatError(path, f"expected {cv.N_LANDMARKS} integer vertex indices, got {values.size} values")
    return values.astype(np.int64)


def load_template(path: str | Path, *, keypoints: str | Path | None = None,
                  mm_per_unit: float | None = None) -> Template:
    """The prediction template from a BFM-layout model (`.mat`: mean shape, faces, keypoints, model
    units) or a mesh file (.obj / .ply) plus a keypoints file (`read_keypoints`).

    A mesh template is in model units (100 mm per unit) unless its metadata says `units: mm` or
    `mm_per_unit` is given.
    """
    path = Path(path)
    if path.suffix.lower() == ".mat":
        from facehd.morphable import load_morphable_model  # torch: only when a model is read

        model = load_morphable_model(path)
        kp = read_keypoints(keypoints) if keypoints is not None else model.keypoints.numpy()
        return make_template(model.mean_shape.double().numpy(), model.faces.numpy(), kp,
                             mm_per_unit=mm_per_unit or cv.MM_PER_MODEL_UNIT, source=str(path))
    from facehd.io import load_mesh

    if keypoints is None:
        raise InputError(f"{path}: a mesh template needs its 68 keypoint indices (a keypoints file)")
    mesh = load_mesh(path)
    if mm_per_unit is None:
        mm_per_unit = 1.0 if mesh.metadata.get("units", "").lower() in ("mm", "millimetre", "millimeter") \
            else cv.MM_PER_MODEL_UNIT
    return make_template(mesh.vertices, mesh.faces, read_keypoints(keypoints), mm_per_unit=mm_per_unit,
                         source=str(path))


# ----------------------------------------------------------------------------------------------
# mesh checks


def degenerate_faces(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F,) bool: triangles of (numerically) zero area, by the same rule `SurfaceIndex` uses."""
    tri = vertices[faces]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    longest = np.max(np.sum((tri - np.roll(tri, 1, axis=1)) ** 2, axis=2), axis=1)
    return ~(np.linalg.norm(cross, axis=1) > DEGENERATE_AREA_RTOL * longest)


def check_triangles(vertices: np.ndarray, faces: np.ndarray, what: str) -> None:
    """Raise InputError when any triangle is degenerate (repeated index or zero area)."""
    bad = degenerate_faces(vertices, faces)
    if bad.any():
        first = int(np.argmax(bad))
        raise InputError(f"{what}: {int(bad.sum())} degenerate (zero-area) triangles, e.g. face {first} "
                         f"{faces[first].tolist()}; the protocol needs a proper surface")


def consistent_winding(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """faces (F, 3) rewound so neighbouring triangles agree (each shared edge traversed both ways).

    Point-to-plane distances interpolate vertex normals, which cancel where windings disagree;
    everything else here ignores winding.
    """
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    codes = directed[:, 0] * (int(faces.max()) + 1) + directed[:, 1]
    if len(np.unique(codes)) == len(codes):
        return faces  # no directed edge repeats: already consistent
    import trimesh

    mesh = trimesh.Trimesh(vertices, faces, process=False)
    trimesh.repair.fix_winding(mesh)
    return np.asarray(mesh.faces, dtype=np.int64)


def _face_keys(faces: np.ndarray) -> np.ndarray:
    """Sorted rows of sorted triangles: the same for any face order or winding."""
    s = np.sort(faces, axis=1)
    return s[np.lexsort(s.T[::-1])]


# ----------------------------------------------------------------------------------------------
# predictions


def check_units(vertices: np.ndarray, template: Template, *, units: str = "auto", source: str = "prediction"
                ) -> np.ndarray:
    """Prediction vertices (N, 3) -> template units, refusing a size that betrays other units.

    units="auto": the prediction must be within UNIT_RATIO_TOLERANCE of the template's size;
    "mm": the prediction is in millimetres and is divided by `template.mm_per_unit`; "model": it
    is taken as being in the template's units, unchecked.
    """
    if units not in UNITS:
        raise InputError(f"units must be one of {UNITS}, got {units!r}")
    if units == "mm":
        return vertices / template.mm_per_unit
    if units == "model":
        return vertices
    ratio = _rms_radius(vertices) / template.size
    if 1.0 / UNIT_RATIO_TOLERANCE <= ratio <= UNIT_RATIO_TOLERANCE:
        return vertices
    per = template.mm_per_unit
    if per > 1 and abs(math.log(ratio / per)) < math.log(UNIT_RATIO_TOLERANCE):
        guess = f"it looks like millimetres while the template is in model units ({per:g} mm per unit)"
    elif per > 1 and abs(math.log(ratio * per)) < math.log(UNIT_RATIO_TOLERANCE):
        guess = f"it is about 1/{per:g} of the template's size"
    elif per == 1 and ratio < 1:
        guess = "it looks like model units while the template is in mm"
    else:
        guess = "its units are unknown"
    raise PredictionUnitsError(f"{source}: the prediction is {ratio:.3g} times the template's size "
                               f"({template.source}): {guess}. Refused: --units mm converts a prediction in "
                               "millimetres, --units model uses it as it is")


def load_prediction(path: str | Path, template: Template, *, units: str = "auto") -> np.ndarray:
    """Read one prediction (.obj / .ply on the template topology) -> (N, 3) in template units.

    Checks: the vertex count and (when the file has faces) the set of triangles equal the
    template's, ignoring face order and winding; the units (`check_units`); no degenerate
    triangles. Evaluation always uses the template's faces.
    """
    from facehd.io import load_mesh

    path = Path(path)
    mesh = load_mesh(path)
    vertices, faces = mesh.vertices, mesh.faces
    if mesh.source_vertex is not None:  # per-corner UVs split vertices on reading: undo it
        vertices = np.empty((int(mesh.source_vertex.max()) + 1, 3))
        vertices[mesh.source_vertex] = mesh.vertices
        faces = mesh.source_vertex[mesh.faces]
    n = template.n_vertices
    if len(vertices) != n:
        raise InputError(f"{path}: {len(vertices)} vertices, the template ({template.source}) has {n}: "
                         "predictions must be on the template topology")
    if len(faces) and (len(faces) != len(template.faces)
                       or not np.array_equal(_face_keys(faces), _face_keys(template.faces))):
        raise InputError(f"{path}: its {len(faces)} triangles are not the template's {len(template.faces)} "
                         f"({template.source}): the topology (or vertex order) differs from the template")
    vertices = check_units(vertices, template, units=units, source=str(path))
    check_triangles(vertices, template.faces, str(path))
    return vertices


def find_predictions(pred_dir: str | Path) -> dict[str, dict[str, Path]]:
    """subject name ("subject_01") -> {setting folder name: file} under `<pred>/subject_XX/<setting>.obj`."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise InputError(f"{pred_dir}: prediction directory does not exist")
    found: dict[str, dict[str, Path]] = {}
    for sub in sorted(pred_dir.iterdir()):
        match = _SUBJECT_DIR.match(sub.name)
        if not (sub.is_dir() and match):
            continue
        files = {}
        for setting in SETTINGS:
            for suffix in PREDICTION_SUFFIXES:
                candidate = sub / f"{setting}{suffix}"
                if candidate.is_file():
                    files[setting] = candidate
                    break
        found[_subject_name(int(match.group(1)))] = files
    return found


# ----------------------------------------------------------------------------------------------
# ground truth


@dataclass(frozen=True)
class GroundTruthScan:
    """One frontal scan of a subject and its 68 landmarks file (None if absent)."""

    subject: str  # "subject_01"
    number: int  # 1
    scan: str  # "frontal1" or "frontal2"
    mesh_path: Path
    landmarks_path: Path | None


@dataclass(frozen=True)
class GroundTruthIndex:
    """The frontal scans found under a MICC directory, and what could not be used."""

    root: Path
    scans: dict[str, tuple[GroundTruthScan, ...]]  # subject -> its frontal scans
    problems: tuple[str, ...]


def _subject_name(number: int) -> str:
    return f"subject_{number:02d}"


def _landmarks_for(mesh: Path, subject_dir: Path, tag: str, tree: tuple[Path, Path] | None) -> Path | None:
    candidates = []
    if tree is not None:  # (gt root, landmark tree): the mesh's path mirrored, as GANFit's MICC_landmarks
        rel = mesh.relative_to(tree[0]).with_suffix(LJSON_SUFFIX)
        candidates += [tree[1] / rel, tree[1] / rel.parent.parent / "obj" / rel.name]
    candidates += [mesh.with_name(f"{mesh.stem}_landmarks{s}") for s in _LANDMARK_SUFFIXES]
    candidates += [subject_dir / f"{tag}_landmarks{s}" for s in _LANDMARK_SUFFIXES]
    return next((c for c in candidates if c.is_file()), None)


def find_ground_truth(gt_dir: str | Path, *, landmarks_dir: str | Path | None = None) -> GroundTruthIndex:
    """Find the frontal scans of a MICC Florence copy.

    Subjects are folders `subject_XX` directly under `gt_dir`. A scan is any mesh file
    (.obj, .ply, .wrl, .vrml) anywhere below the subject folder whose path contains `frontal1` or
    `frontal2` (e.g. `subject_01/Model/frontal1/obj/110920150452.obj`); when one scan has several
    files (the real data ships .obj and .wrl copies) the first suffix in that order is used.
    Landmarks: with `landmarks_dir`, a tree beside the data that mirrors it (GANFit's released
    MICC landmarks: `<landmarks_dir>/subject_XX/Model/frontalN/obj/<timestamp>.ljson`, menpo's
    LJSON, see `read_landmarks`); else (or where the tree has no file) `<mesh stem>_landmarks.txt|.npy`
    beside the mesh, else `subject_XX/frontal1_landmarks.txt|.npy`: 68 x 3 in the scan's units, iBUG
    order.
    """
    root = Path(gt_dir)
    if not root.is_dir():
        raise InputError(f"{root}: ground-truth directory does not exist")
    tree = None
    if landmarks_dir is not None:
        if not Path(landmarks_dir).is_dir():
            raise InputError(f"{landmarks_dir}: landmark directory does not exist")
        tree = (root, Path(landmarks_dir))
    scans: dict[str, tuple[GroundTruthScan, ...]] = {}
    problems: list[str] = []
    for sub in sorted(root.iterdir()):
        match = _SUBJECT_DIR.match(sub.name)
        if not (sub.is_dir() and match):
            continue
        number = int(match.group(1))
        name = _subject_name(number)
        by_tag: dict[str, list[Path]] = {}
        for path in sorted(sub.rglob("*")):
            rel = str(path.relative_to(sub))
            tag = _SCAN_TAG.search(rel)
            if path.suffix.lower() in MESH_SUFFIXES and tag and path.is_file() \
                    and not path.stem.lower().endswith("_landmarks"):
                by_tag.setdefault(f"frontal{tag.group(1)}", []).append(path)
        found = []
        for tag in SCANS:
            files = by_tag.get(tag, [])
            if not files:
                continue
            suffix = min((f.suffix.lower() for f in files), key=MESH_SUFFIXES.index)
            chosen = [f for f in files if f.suffix.lower() == suffix]
            if len(chosen) > 1:
                problems.append(f"{name} {tag}: several {suffix} scans ({', '.join(str(f) for f in chosen)}); "
                                "keep one")
                continue
            found.append(GroundTruthScan(name, number, tag, chosen[0], _landmarks_for(chosen[0], sub, tag, tree)))
        if found:
            scans[name] = tuple(found)
        else:
            problems.append(f"{name}: no frontal1 / frontal2 scan found")
    if not scans:
        raise InputError(f"{root}: no subject_XX folder with a frontal1 / frontal2 scan (.obj, .ply, .wrl)")
    return GroundTruthIndex(root, scans, tuple(problems))


def read_ljson(path: str | Path) -> np.ndarray:
    """(P, 3) points of a menpo LJSON file (version 3: `{"version": 3, "groups": {NAME: {"landmarks":
    {"points": [[x, y, z], ...], "connectivity": [...]}, "labels": [...]}}}`; the group "LJSON", or
    the only group). Version 2 (`{"version": 2, "landmarks": {"points": ...}}`) is read too."""
    import json

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FileFormatError(path, f"cannot read LJSON landmarks ({exc})") from exc
    version = data.get("version") if isinstance(data, dict) else None
    if version == 3:
        groups = data.get("groups")
        if not isinstance(groups, dict) or not groups:
            raise FileFormatError(path, "LJSON version 3 without landmark groups")
        if "LJSON" in groups:
            group = groups["LJSON"]
        elif len(groups) == 1:
            group = next(iter(groups.values()))
        else:
            raise FileFormatError(path, f"several LJSON groups ({', '.join(groups)}) and none named LJSON")
        landmarks = group.get("landmarks") if isinstance(group, dict) else None
    elif version == 2:
        landmarks = data.get("landmarks")
    else:
        raise FileFormatError(path, f"unsupported LJSON version {version!r} (expected 3 or 2)")
    points = landmarks.get("points") if isinstance(landmarks, dict) else None
    if not isinstance(points, list) or any(p is None or (isinstance(p, list) and None in p) for p in points):
        raise FileFormatError(path, "LJSON landmarks without points, or with missing (null) points")
    try:
        return np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise FileFormatError(path, f"LJSON points are not numbers ({exc})") from exc


def read_landmarks(path: str | Path) -> np.ndarray:
    """(68, 3) landmarks from a .txt (68 rows of x y z, '#' comments, spaces or commas), .npy or
    menpo .ljson file (`read_ljson`)."""
    path = Path(path)
    try:
        if path.suffix.lower() == LJSON_SUFFIX:
            values = read_ljson(path)
        elif path.suffix.lower() == ".npy":
            values = np.load(path)
        else:
            values = np.loadtxt(path.read_text().replace(",", " ").splitlines(), comments="#", ndmin=2)
    except (OSError, ValueError) as exc:
        raise FileFormatError(path, f"cannot read landmarks ({exc})") from exc
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (cv.N_LANDMARKS, 3) or not np.isfinite(values).all():
        raise FileFormatError(path, f"expected {cv.N_LANDMARKS} x 3 finite landmark coordinates, got {values.shape}")
    return values


# ----------------------------------------------------------------------------------------------
# registration of the ground truth to the template


@dataclass(frozen=True, eq=False)
class RegisteredScan:
    """A frontal scan registered to the template (protocol step 1), template units and topology."""

    scan: GroundTruthScan
    vertices: np.ndarray  # (N, 3) the template deformed onto the scan
    landmark_scale: float  # template units per scan unit of the landmark similarity
    landmark_rms_mm: float  # RMS landmark residual after the similarity
    surface_mean_mm: float  # mean distance of the registered vertices to the scan surface
    nose_tip: np.ndarray  # (3,) the scan's own landmark 30 mapped by the landmark similarity, template units
    coverage: float  # fraction of the landmark-placed template's crop within COVERAGE_DISTANCE_MM of the scan
    protocol: str = "released"  # the registration's rules (landmark similarity, non-rigid schedule)

    @property
    def flags(self) -> tuple[str, ...]:
        """Why this registration is implausible (empty when it looks sound)."""
        out = []
        if self.coverage < MIN_PLAUSIBLE_COVERAGE:
            out.append(f"the scan covers only {100 * self.coverage:.0f}% of the template's crop (within "
                       f"{COVERAGE_DISTANCE_MM:g} mm; expected >= {100 * MIN_PLAUSIBLE_COVERAGE:.0f}%): "
                       "the scan may be cut short or its landmarks wrong")
        if self.surface_mean_mm > MAX_PLAUSIBLE_SURFACE_MM:
            out.append(f"mean distance to the scan {self.surface_mean_mm:.3g} mm (> {MAX_PLAUSIBLE_SURFACE_MM:g})")
        if self.landmark_rms_mm > MAX_PLAUSIBLE_LANDMARK_RMS_MM:
            out.append(f"landmark RMS {self.landmark_rms_mm:.3g} mm (> {MAX_PLAUSIBLE_LANDMARK_RMS_MM:g})")
        return tuple(out)


def _file_digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        try:
            h.update(p.read_bytes())
        except OSError as exc:
            raise FileFormatError(p, f"cannot read ({exc})") from exc
    return h.hexdigest()


def registration_key(scan: GroundTruthScan, template: Template, protocol: str = "released") -> str:
    """Cache key: the scan and landmark file contents, the template, the protocol and the
    registration settings."""
    if scan.landmarks_path is None:
        raise InputError(f"{scan.mesh_path}: no landmarks file ({scan.mesh_path.stem}_landmarks.txt|.npy beside it, "
                         f"or {scan.scan}_landmarks.txt in the subject folder); the registration needs 68 landmarks")
    h = hashlib.sha256()
    h.update(_file_digest(scan.mesh_path, scan.landmarks_path).encode())
    h.update(template.key.encode())
    h.update(repr((REGISTRATION_VERSION, protocol, NICP_STIFFNESS, NICP_LANDMARK_WEIGHTS, NICP_MAX_DISTANCE_MM,
                   COVERAGE_DISTANCE_MM, MENPO3D_EPS, MENPO3D_MIN_NORMAL_DOT, MENPO3D_SAFETY_SOLVES)).encode())
    return h.hexdigest()[:24]


_CACHED_FLOATS = ("landmark_scale", "landmark_rms_mm", "surface_mean_mm", "coverage")


def _load_cached(scan: GroundTruthScan, path: Path | None) -> RegisteredScan | None:
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path) as data:
            return RegisteredScan(scan, data["vertices"], *(float(data[k]) for k in _CACHED_FLOATS[:3]),
                                  nose_tip=np.asarray(data["nose_tip"], dtype=np.float64).reshape(3),
                                  coverage=float(data["coverage"]), protocol=str(data["protocol"]))
    except (OSError, ValueError, KeyError):
        return None  # an unreadable cache entry is recomputed and overwritten


def register_scan(scan: GroundTruthScan, template: Template, *, protocol: str = "released",
                  cache_dir: str | Path | None = None, key: str | None = None) -> RegisteredScan:
    """Protocol step 1: similarity of the scan's 68 landmarks onto the template keypoints (the
    released protocol: menpo's norm-ratio similarity; robust: Umeyama), then the template deformed
    onto the scan by non-rigid ICP (landmarks as extra pairs).

    With `cache_dir` the result is stored as `<cache_dir>/<key>.npz` (atomically) and reused:
    the key (`registration_key`, computed unless given) hashes the scan and landmark files, the
    template and the registration settings.
    """
    _check_protocol(protocol)
    key = key or registration_key(scan, template, protocol)
    path = None if cache_dir is None else Path(cache_dir) / f"{key}.npz"
    cached = _load_cached(scan, path)
    if cached is not None:
        return cached
    result = _register(scan, template, protocol)
    if path is not None:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, vertices=result.vertices, nose_tip=result.nose_tip, protocol=result.protocol,
                     **{k: getattr(result, k) for k in _CACHED_FLOATS})
    return result


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise InputError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def _register(scan: GroundTruthScan, template: Template, protocol: str) -> RegisteredScan:
    from facehd.io import load_mesh

    mesh = load_mesh(scan.mesh_path)
    if mesh.n_faces == 0:
        raise InputError(f"{scan.mesh_path}: the scan has no triangles")
    landmarks = read_landmarks(scan.landmarks_path)
    keypoints = template.vertices[template.keypoints]
    fit = check_landmark_fit(landmarks, keypoints, source=str(scan.landmarks_path))  # refuses mirrored, degenerate
    transform, rms = fit.transform, fit.rms
    if protocol == "released":  # menpo's AlignmentSimilarity, as GANFit's registration
        transform = fit_similarity_norm_ratio(landmarks, keypoints)
        rms = rms_residual(transform, landmarks, keypoints)
    scan_vertices = transform.apply(mesh.vertices)
    keep = ~degenerate_faces(scan_vertices, mesh.faces)  # raw scans carry slivers; their edges remain
    if not keep.any():
        raise InputError(f"{scan.mesh_path}: every triangle of the scan is degenerate")
    scan_faces = mesh.faces[keep]
    target_landmarks = transform.apply(landmarks)
    if protocol == "released":
        settings = dict(incremental=True, stop="affine_change", tol=MENPO3D_EPS,
                        normal_angle_max=math.degrees(math.acos(MENPO3D_MIN_NORMAL_DOT)),
                        max_inner_iterations=MENPO3D_SAFETY_SOLVES)
    else:
        settings = dict(max_distance=NICP_MAX_DISTANCE_MM / template.mm_per_unit)
    result = nonrigid_icp(
        template.vertices, template.faces, (scan_vertices, scan_faces),
        stiffness=NICP_STIFFNESS, landmark_weights=NICP_LANDMARK_WEIGHTS,
        landmark_pairs=(template.keypoints, target_landmarks), **settings)
    vertices = np.asarray(result.vertices, dtype=np.float64)
    per = template.mm_per_unit
    scan_index = SurfaceIndex(scan_vertices, scan_faces)
    surface = scan_index.distance(vertices) * per
    nose = target_landmarks[NOSE_TIP]
    crop = np.linalg.norm(template.vertices - nose, axis=1) < crop_radius_mm(scan.number) / per
    coverage = float(np.mean(scan_index.distance(template.vertices[crop]) * per <= COVERAGE_DISTANCE_MM)) \
        if crop.any() else 0.0
    return RegisteredScan(scan, vertices, transform.scale, rms * per, float(surface.mean()), nose_tip=nose,
                          coverage=coverage, protocol=protocol)


# ----------------------------------------------------------------------------------------------
# the aligned distance (protocol steps 2 and 3)


@dataclass(frozen=True, eq=False)
class AlignedDistance:
    """f(A, B): A's cropped vertices aligned onto B by similarity ICP, then measured to B."""

    mean_mm: float  # mean over the crop
    vertex_mm: np.ndarray  # (N,) per vertex of A, NaN outside the crop
    transform: Similarity  # A -> B
    iterations: int
    safety_net: bool = False  # the released loop was stopped by RELEASED_SAFETY_ITERATIONS


def crop_radius_mm(subject_number: int | None) -> float:
    """The protocol's crop radius for a subject (95 mm; 60 mm for subject 28)."""
    return SUBJECT_CROP_RADII_MM.get(subject_number, CROP_RADIUS_MM) if subject_number is not None \
        else CROP_RADIUS_MM


def crop_mask(vertices: np.ndarray, nose_index: int, radius_mm: float, mm_per_unit: float) -> np.ndarray:
    """(N,) bool: vertices within `radius_mm` of the nose-tip vertex (radius converted to the mesh's units)."""
    if not 0 <= nose_index < len(vertices):
        raise InputError(f"nose-tip index {nose_index} is outside the mesh's {len(vertices)} vertices")
    radius = radius_mm / mm_per_unit
    mask = np.linalg.norm(vertices - vertices[nose_index], axis=1) <= radius
    if mask.sum() < MIN_CROP_VERTICES:
        raise InputError(f"empty crop: only {int(mask.sum())} vertices lie within {radius_mm:g} mm "
                         f"({radius:.4g} units at {mm_per_unit:g} mm per unit) of the nose tip (vertex {nose_index}); "
                         "check the units and the template's keypoints")
    return mask


def released_crop_mask(vertices: np.ndarray, faces: np.ndarray, center, radius_mm: float,
                       mm_per_unit: float) -> np.ndarray:
    """(N,) bool: the released protocol's crop: vertices strictly within `radius_mm` of `center`
    (3,), then, as menpo's `TriMesh.from_mask`, only vertices of a triangle whose three vertices
    are all inside (a vertex in no such triangle is dropped)."""
    center = np.asarray(center, dtype=np.float64).reshape(3)
    radius = radius_mm / mm_per_unit
    inside = np.linalg.norm(vertices - center, axis=1) < radius
    kept = faces[inside[faces].all(axis=1)]
    mask = np.zeros(len(vertices), dtype=bool)
    mask[kept.reshape(-1)] = True
    if mask.sum() < MIN_CROP_VERTICES:
        raise InputError(f"empty crop: only {int(mask.sum())} vertices of whole triangles lie within {radius_mm:g} mm "
                         f"({radius:.4g} units at {mm_per_unit:g} mm per unit) of the crop centre "
                         f"{np.round(center, 6).tolist()}; check the units and the nose landmark / keypoint")
    return mask


def released_aligned_distance(a_vertices, b_vertices, faces, *, center, radius_mm: float = CROP_RADIUS_MM,
                              mm_per_unit: float = cv.MM_PER_MODEL_UNIT, metric: str = "point_to_surface",
                              max_iter: int = RELEASED_SAFETY_ITERATIONS) -> AlignedDistance:
    """f(A, B) by GANFit's released rule, for two meshes on one topology (faces (F, 3)).

    crop = `released_crop_mask` of A around `center` (template units); d0 = mean distance between
    the crop's vertices and B's same-index vertices; then repeat: fit menpo's similarity
    (`fit_similarity_norm_ratio`) of the current, already moved, crop onto its correspondences
    (first B's same-index vertices) and apply it; correspondences = the closest points on B's
    triangles, measured in float64; d = their mean distance; while the previous d minus the new
    one exceeds 0.001 mm. The LAST d is returned, even when that step made it worse. The stop test
    and the returned d are exact in float64: the float32 search's triangle is replaced by the
    float64 search's (`SurfaceIndex.closest(exact=True)`) wherever that could change them (a stop
    test within `SurfaceIndex.choice_slack` of the tolerance, and the last iterate).
    `max_iter` is only a safety net; reaching it sets `safety_net`.
    """
    if metric not in METRICS:
        raise InputError(f"metric must be one of {METRICS}, got {metric!r}")
    a = as_points(a_vertices, "A vertices")
    b = as_points(b_vertices, "B vertices", rows=len(a))
    faces = as_faces(faces, len(a))
    mask = released_crop_mask(a, faces, center, radius_mm, mm_per_unit)
    index = SurfaceIndex(b, faces)
    current, corr = a[mask], b[mask]
    # the mean distance as an interval [low, high] (mm): the float32 search's triangles give high,
    # and the float64 one is at most `choice_slack` nearer per point; the float64 search runs only
    # when a stop test falls inside the intervals, and for the value returned
    previous = float(np.linalg.norm(current - corr, axis=1).mean()) * mm_per_unit
    previous_range, previous_points = (previous, previous), None  # d0 is exact
    total, iterations, safety_net = Similarity.identity(), 0, True
    while iterations < int(max_iter):
        iterations += 1
        step = fit_similarity_norm_ratio(current, corr)
        current, total = step.apply(current), step.compose(total)
        hit = index.closest(current)
        corr = hit.points
        high = float(hit.distances.mean()) * mm_per_unit
        d_range = (high - index.choice_slack(current) * mm_per_unit, high)
        if previous_range[0] - d_range[1] > ICP_TOL_MM:  # improved by more than the tolerance, surely
            previous_range, previous_points = d_range, current
            continue
        if previous_range[1] - d_range[0] > ICP_TOL_MM:  # undecided: measure both in float64
            hit = index.closest(current, exact=True)
            d = float(hit.distances.mean()) * mm_per_unit
            if previous_points is not None:
                previous = float(index.closest(previous_points, exact=True).distances.mean()) * mm_per_unit
                previous_range = (previous, previous)
            if previous_range[0] - d > ICP_TOL_MM:
                corr = hit.points
                previous_range, previous_points = (d, d), None
                continue
        safety_net = False
        break
    hit = index.closest(current, exact=True)  # the value returned, in float64
    vertex_mm = np.full(len(a), np.nan)
    vertex_mm[mask] = (index.point_to_plane(current) if metric == "point_to_plane" else hit.distances) * mm_per_unit
    return AlignedDistance(float(vertex_mm[mask].mean()), vertex_mm, total, iterations, safety_net)


def surface_distance_mm(points, vertices, faces, *, metric: str = "point_to_surface",
                        mm_per_unit: float = cv.MM_PER_MODEL_UNIT) -> np.ndarray:
    """(P, 3) points -> (P,) distance to the mesh (N, 3) / (F, 3) in mm, as placed (no alignment).

    "point_to_surface": to the exact closest point on the triangles; "point_to_plane":
    |(p - q) . n| with n the interpolated vertex normal at that closest point q.
    """
    if metric not in METRICS:
        raise InputError(f"metric must be one of {METRICS}, got {metric!r}")
    index = SurfaceIndex(vertices, faces)
    distances = index.point_to_plane(points) if metric == "point_to_plane" else index.distance(points)
    return distances * mm_per_unit


def aligned_distance(a_vertices, b_vertices, faces, *, nose_index: int, radius_mm: float = CROP_RADIUS_MM,
                     mm_per_unit: float = cv.MM_PER_MODEL_UNIT, metric: str = "point_to_surface",
                     max_iter: int = 100) -> AlignedDistance:
    """f(A, B) of the protocol for two meshes on one topology (faces (F, 3), consistently wound).

    mask = A's vertices within `radius_mm` of A's nose tip; correspondences start as B's
    same-index vertices; `facehd.icp.similarity_icp` then fits a similarity (Umeyama, isotropic
    scale, no reflection) of the masked vertices onto them and moves them to the closest points
    on B's triangles until the mean improves by no more than 0.001 mm. The distance is
    point-to-surface (the upstream code's, though it calls it point-to-plane) or, with
    metric="point_to_plane", |(p - q) . n| with n B's interpolated vertex normal at the closest
    point q (the alignment is the same). Distances are in B's units times `mm_per_unit`.
    """
    if metric not in METRICS:
        raise InputError(f"metric must be one of {METRICS}, got {metric!r}")
    a = as_points(a_vertices, "A vertices")
    b = as_points(b_vertices, "B vertices", rows=len(a))
    mask = crop_mask(a, nose_index, radius_mm, mm_per_unit)
    fit = similarity_icp(a, mask, b, faces, init_correspondences=b, tol=ICP_TOL_MM / mm_per_unit, max_iter=max_iter)
    vertex_mm = np.full(len(a), np.nan)
    if metric == "point_to_plane":
        vertex_mm[mask] = surface_distance_mm(fit.transform.apply(a[mask]), b, faces, metric=metric,
                                              mm_per_unit=mm_per_unit)
    else:  # the loop's own final distances: the same query, already made
        vertex_mm[mask] = fit.distances[mask] * mm_per_unit
    return AlignedDistance(float(vertex_mm[mask].mean()), vertex_mm, fit.transform, len(fit.history))


@dataclass(frozen=True, eq=False)
class PairScore:
    """One ground truth against one prediction: the score and its directional parts."""

    score_mm: float  # symmetric: mean of the two directions; else the one asked for
    gt_to_pred_mm: float | None
    pred_to_gt_mm: float | None
    vertex_mm: np.ndarray  # (N,) per template vertex: the mean of the directions measured there
    safety_net: tuple[str, ...] = ()  # directions whose released loop reached the safety net


def micc_score(gt_vertices, pred_vertices, faces, *, nose_index: int, radius_mm: float = CROP_RADIUS_MM,
               mm_per_unit: float = cv.MM_PER_MODEL_UNIT, direction: str = "symmetric",
               metric: str = "point_to_surface", protocol: str = "released", gt_center=None) -> PairScore:
    """score = (f(GT, pred) + f(pred, GT)) / 2 (or one direction) for meshes on one topology.

    protocol="released" (`released_aligned_distance`): f(GT, pred)'s crop is centred on
    `gt_center` (3,), the GT scan's own landmark 30 in template units (`RegisteredScan.nose_tip`;
    the GT's keypoint vertex when None), f(pred, GT)'s on the prediction's keypoint vertex.
    protocol="robust" (`aligned_distance`): both on the keypoint vertex.
    """
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    _check_protocol(protocol)
    gt = as_points(gt_vertices, "ground-truth vertices")
    pred = as_points(pred_vertices, "prediction vertices", rows=len(gt))
    faces = consistent_winding(gt, as_faces(faces, len(gt)))
    if protocol == "released":
        if not 0 <= nose_index < len(gt):
            raise InputError(f"nose-tip index {nose_index} is outside the mesh's {len(gt)} vertices")
        kw = dict(radius_mm=radius_mm, mm_per_unit=mm_per_unit, metric=metric)
        gt_centre = gt[nose_index] if gt_center is None else as_points(np.reshape(gt_center, (1, 3)), "GT nose")[0]
        forward = released_aligned_distance(gt, pred, faces, center=gt_centre, **kw) \
            if direction != "pred_to_gt" else None
        backward = released_aligned_distance(pred, gt, faces, center=pred[nose_index], **kw) \
            if direction != "gt_to_pred" else None
    else:
        kw = dict(nose_index=nose_index, radius_mm=radius_mm, mm_per_unit=mm_per_unit, metric=metric)
        forward = aligned_distance(gt, pred, faces, **kw) if direction != "pred_to_gt" else None
        backward = aligned_distance(pred, gt, faces, **kw) if direction != "gt_to_pred" else None
    parts = [d for d in (forward, backward) if d is not None]
    stacked = np.stack([d.vertex_mm for d in parts])
    measured = np.isfinite(stacked)
    with np.errstate(invalid="ignore"):  # vertices outside both crops stay NaN
        vertex = np.where(measured, stacked, 0.0).sum(axis=0) / measured.sum(axis=0)
    net = tuple(name for name, d in (("f(GT, pred)", forward), ("f(pred, GT)", backward))
                if d is not None and d.safety_net)
    return PairScore(float(np.mean([d.mean_mm for d in parts])), None if forward is None else forward.mean_mm,
                     None if backward is None else backward.mean_mm, vertex, net)


# ----------------------------------------------------------------------------------------------
# evaluation of whole methods


@dataclass(frozen=True)
class MiccOptions:
    """How a run measures: direction, metric, prediction units, crop radii (mm)."""

    direction: str = "symmetric"
    metric: str = "point_to_surface"
    units: str = "auto"
    protocol: str = "released"
    crop_radius_mm: float = CROP_RADIUS_MM
    subject_crop_radii_mm: Mapping[int, float] = field(default_factory=lambda: dict(SUBJECT_CROP_RADII_MM))

    def __post_init__(self):
        for name, value, allowed in (("direction", self.direction, DIRECTIONS), ("metric", self.metric, METRICS),
                                     ("units", self.units, UNITS), ("protocol", self.protocol, PROTOCOLS)):
            if value not in allowed:
                raise InputError(f"{name} must be one of {allowed}, got {value!r}")

    def radius_mm(self, subject_number: int) -> float:
        return float(self.subject_crop_radii_mm.get(subject_number, self.crop_radius_mm))

    def describe(self, mm_per_unit: float) -> str:
        how = {"symmetric": "symmetric: (f(GT, pred) + f(pred, GT)) / 2",
               "gt_to_pred": "one direction: GT -> prediction, f(GT, pred)",
               "pred_to_gt": "one direction: prediction -> GT, f(pred, GT)"}[self.direction]
        what = {"point_to_surface": "point-to-surface distance (exact closest point on the triangles; "
                                    "the upstream code calls it point-to-plane)",
                "point_to_plane": "true point-to-plane distance |(p - q) . n| at the closest surface point"
                }[self.metric]
        crops = ", ".join(f"{r:g} mm for subject {s}" for s, r in sorted(self.subject_crop_radii_mm.items()))
        if self.protocol == "released":
            protocol = (
                "Protocol: released (GANFit's released MICC evaluation, rule for rule): GT registered with menpo's "
                "similarity (scale = ratio of the centred landmark sets' Frobenius norms) and menpo3d's non-rigid "
                "ICP defaults; "
                f"a {self.crop_radius_mm:g} mm crop ({crops}; strictly inside, vertices of whole triangles only) "
                "around the GT scan's own landmark 30 for f(GT, pred) and the prediction's keypoint 30 for "
                "f(pred, GT); similarity ICP with menpo's similarity from same-index correspondences, float64 "
                "closest points, stopping once the mean improves by no more than 0.001 mm and returning the last "
                f"mean (safety net {RELEASED_SAFETY_ITERATIONS} iterations, reported if reached).")
        else:
            protocol = (
                "Protocol: robust (facehd's loop, not the released one): GT registered with an Umeyama landmark "
                f"similarity and non-rigid ICP; a {self.crop_radius_mm:g} mm crop ({crops}) around each mesh's "
                "keypoint 30; similarity ICP (Umeyama, no reflection) keeping the best iterate, at most "
                f"{MAX_SIMILARITY_ITERATIONS} iterations.")
        return (f"Metric: {what}; direction: {how}. {protocol} Millimetres = template units x "
                f"{mm_per_unit:g}. Per subject the minimum over its frontal scans; per setting the mean and "
                "population std (ddof 0) over subjects; n = subjects averaged.")


@dataclass(frozen=True, eq=False)
class SubjectScore:
    """One method on one subject in one setting (a row of the per-subject CSV)."""

    method: str
    subject: str
    setting: str  # "Cooperative", "Indoor" or "Outdoor"
    status: str  # "ok", "missing" (no prediction file) or "error"
    score_mm: float = math.nan  # minimum over the frontal scans
    best_scan: str | None = None
    scan_scores_mm: Mapping[str, float] = field(default_factory=dict)
    gt_to_pred_mm: float | None = None  # of the best scan
    pred_to_gt_mm: float | None = None
    message: str = ""
    warnings: tuple[str, ...] = ()  # e.g. a released loop stopped by the safety net


@dataclass(frozen=True)
class SettingSummary:
    """Mean and population std over the subjects evaluated in one setting."""

    method: str
    setting: str
    mean_mm: float
    std_mm: float
    n_subjects: int
    not_evaluated: tuple[str, ...]  # subjects missing or failed in this setting


def aggregate(scores: Iterable[SubjectScore]) -> list[SettingSummary]:
    """Per (method, setting): mean and POPULATION std (ddof 0) of the ok scores, and who is absent."""
    scores = list(scores)
    methods = list(dict.fromkeys(s.method for s in scores))
    out = []
    for method in methods:
        for setting in MICC_SETTINGS:
            rows = [s for s in scores if s.method == method and s.setting == setting]
            ok = np.array([s.score_mm for s in rows if s.status == "ok"])
            absent = tuple(s.subject for s in rows if s.status != "ok")
            mean = float(ok.mean()) if ok.size else math.nan
            std = float(ok.std(ddof=0)) if ok.size else math.nan
            out.append(SettingSummary(method, setting, mean, std, int(ok.size), absent))
    return out


@dataclass(eq=False)
class MiccResult:
    """Everything a MICC run produced; `table()`, `per_subject_frame()` and `note()` render it."""

    options: MiccOptions
    template: Template
    methods: tuple[str, ...]
    subjects: tuple[str, ...]  # subjects with ground truth
    scores: list[SubjectScore]
    gt_problems: list[str]  # scans or subjects that could not be used
    extra_predictions: dict[str, list[str]]  # method -> subjects predicted but without ground truth
    vertex_error_mm: dict[tuple[str, str], np.ndarray]  # (method, setting) -> (N,) mean over subjects
    mean_gt_vertices: np.ndarray  # (N, 3) mean registered ground truth, template units
    synthetic: bool = False
    registrations: list[RegisteredScan] = field(default_factory=list)  # the usable GT registrations

    def warnings(self) -> list[str]:
        """Human-readable lines: implausible GT registrations (per scan) and loops stopped by the
        safety net (per cell); the scores are kept, but should be checked."""
        lines = [f"registration {r.scan.subject} {r.scan.scan} ({r.scan.mesh_path}): {flag}"
                 for r in self.registrations for flag in r.flags]
        lines += [f"{s.method} {s.subject} {s.setting}: {w}" for s in self.scores for w in s.warnings]
        return lines

    def summaries(self) -> list[SettingSummary]:
        return aggregate(self.scores)

    def table(self, *, published: bool = True) -> pd.DataFrame:
        """Rows: published methods (optional) then each evaluated method; columns (setting, stat)
        with stat mean, std (mm) and n (subjects averaged; '-' for published rows)."""
        columns = pd.MultiIndex.from_product([MICC_SETTINGS, ("mean", "std", "n")], names=["setting", "stat"])
        rows, labels = [], []
        if published:
            pub = micc_published_table()
            for method, values in pub.iterrows():
                labels.append(method)
                rows.append([x for s in MICC_SETTINGS for x in (values[(s, "mean")], values[(s, "std")], math.nan)])
        by = {(s.method, s.setting): s for s in self.summaries()}
        for method in self.methods:
            labels.append(method)
            rows.append([x for s in MICC_SETTINGS for x in
                         (by[method, s].mean_mm, by[method, s].std_mm, by[method, s].n_subjects)])
        df = pd.DataFrame(rows, index=pd.Index(labels, name="method"), columns=columns)
        for s in MICC_SETTINGS:  # counts print as integers, not 53.000; published rows have none
            counts = [math.nan if math.isnan(v) else int(v) for v in df[(s, "n")]]
            df[(s, "n")] = pd.Series(counts, index=df.index, dtype=object)
        return df

    def per_subject_frame(self) -> pd.DataFrame:
        """One row per (method, subject, setting): status, score, best scan, per-scan scores, parts."""
        records = []
        flags = {(r.scan.subject, r.scan.scan): "; ".join(r.flags) or "ok" for r in self.registrations}
        for s in self.scores:
            records.append({
                "method": s.method, "subject": s.subject, "setting": s.setting, "status": s.status,
                "score_mm": s.score_mm, "best_scan": s.best_scan or "",
                **{f"{scan}_mm": s.scan_scores_mm.get(scan, math.nan) for scan in SCANS},
                "gt_to_pred_mm": math.nan if s.gt_to_pred_mm is None else s.gt_to_pred_mm,
                "pred_to_gt_mm": math.nan if s.pred_to_gt_mm is None else s.pred_to_gt_mm,
                **{f"{scan}_registration": flags.get((s.subject, scan), "") for scan in SCANS},
                "direction": self.options.direction, "metric": self.options.metric,
                "protocol": self.options.protocol, "message": "; ".join(filter(None, (s.message, *s.warnings))),
            })
        return pd.DataFrame.from_records(records)

    def not_evaluated(self) -> list[str]:
        """Human-readable lines: each (method, subject, setting) missing or failed, and GT problems."""
        lines = [f"{s.method} {s.subject} {s.setting}: {s.status}{': ' + s.message if s.message else ''}"
                 for s in self.scores if s.status != "ok"]
        lines += [f"ground truth: {p}" for p in self.gt_problems]
        lines += [f"{m}: predictions for {', '.join(subs)} have no ground truth (ignored)"
                  for m, subs in self.extra_predictions.items() if subs]
        return lines

    def note(self, *, published: bool = True) -> str:
        """The text under the table: metric, direction, units, which rows are published / evaluated."""
        lines = [self.options.describe(self.template.mm_per_unit)]
        if published:
            lines.append(f"Published rows ({', '.join(micc_published_table().index)}): {MICC_SOURCE}.")
        where = ("the synthetic MICC stand-in (SynthBFM subjects); not comparable to the published rows, "
                 "which are on the real MICC Florence data") if self.synthetic else "this ground truth"
        lines.append(f"Evaluated here ({', '.join(self.methods)}): {len(self.subjects)} subjects of {where}; "
                     f"template {self.template.source}.")
        absent = sum(1 for s in self.scores if s.status != "ok")
        if absent or self.gt_problems:
            lines.append(f"Not evaluated: {absent} (method, subject, setting) cells and {len(self.gt_problems)} "
                         "ground-truth problems; see the list below / the per-subject CSV.")
        return "\n".join(lines)

    def write_plots(self, directory: str | Path) -> list[Path]:
        """Per method and setting, the mean per-vertex error over subjects drawn on the mean
        registered ground truth (`heatmap_<method>_<setting>.png`), and a bar chart of the table
        (`table_bars.png`, published rows in grey). Returns the files written."""
        from benchmarks.plots import plot_error_heatmap, plot_table_bars

        directory = Path(directory)
        written = []
        by = {(s.method, s.setting): s for s in self.summaries()}
        shape_mm = self.mean_gt_vertices * self.template.mm_per_unit
        for (method, setting), errors in sorted(self.vertex_error_mm.items()):
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", method)
            title = (f"{method}, {setting}: mean error over {by[method, setting].n_subjects} subjects (mm)\n"
                     f"{self.options.metric.replace('_', '-')}, {self.options.direction}")
            written.append(plot_error_heatmap(shape_mm, self.template.faces, errors,
                                              directory / f"heatmap_{safe}_{setting}.png", title))
        table = self.table()
        table = table[[c for c in table.columns if c[1] != "n"]]
        written.append(plot_table_bars(table, directory / "table_bars.png",
                                       "MICC: mean and std of the distance per setting",
                                       published_rows=list(micc_published_table().index)))
        return written


# --- running: registrations first (cached), then the protocol per subject -------------------------

# Per-process BLAS threads. The registration's many small dense factorizations ran 10-20x slower
# with OpenBLAS's default threads on a busy 2-core machine than with one thread per process.
_SINGLE_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# A spawned worker costs seconds to start (imports) and its own copy of the libraries: 24 (GT,
# prediction) pairs took 1.57x longer with 2 workers than with 1. A worker is started per this many
# registrations (~1-2 s each) or pairs (~0.1-0.3 s each) at most.
MIN_REGISTRATIONS_PER_WORKER = 8
MIN_PAIRS_PER_WORKER = 50


def _pool_size(workers: int, items: int, per_worker: int) -> int:
    """Processes worth starting for `items` jobs with at most `workers`; 1 means in this process."""
    return max(1, min(workers, items // per_worker))


@contextlib.contextmanager
def _worker_pool(workers: int):
    """A spawn-context process pool whose workers use single-threaded BLAS.

    spawn, not fork: open3d and BLAS thread pools do not survive a fork reliably. A spawned child
    copies os.environ when it starts, before it imports numpy, so the variables are set around the
    pool's lifetime only.
    """
    saved = {k: os.environ.get(k) for k in _SINGLE_THREAD_ENV}
    os.environ.update(_SINGLE_THREAD_ENV)
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            yield pool
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _register_or_error(scan: GroundTruthScan, template: Template, cache_dir: Path | None,
                       key: str, protocol: str) -> RegisteredScan | str:
    try:
        return register_scan(scan, template, protocol=protocol, cache_dir=cache_dir, key=key)
    except FaceHDError as exc:
        return f"{scan.subject} {scan.scan}: registration failed: {exc}"


def register_scans(scans: list[GroundTruthScan], template: Template, *, protocol: str = "released",
                   cache_dir: str | Path | None = None, workers: int = 1,
                   progress: Callable[[str, int, int], None] | None = None) -> list[RegisteredScan | str]:
    """Register every scan (protocol step 1); each result is a RegisteredScan or an error message.

    Cached registrations are read in this process; the others are computed (with single-threaded
    BLAS) in this process, or in up to `workers` spawned processes when there are at least
    MIN_REGISTRATIONS_PER_WORKER per process, and cached; the cache's
    index (`write_registration_index`) maps each scan file to its cache file.
    """
    cache = None if cache_dir is None else Path(cache_dir)
    results: list[RegisteredScan | str | None] = [None] * len(scans)
    keys: list[str | None] = [None] * len(scans)
    todo: list[tuple[int, str]] = []
    for i, scan in enumerate(scans):
        try:
            key = keys[i] = registration_key(scan, template, protocol)
        except FaceHDError as exc:
            results[i] = f"{scan.subject} {scan.scan}: {exc}"
            continue
        results[i] = _load_cached(scan, None if cache is None else cache / f"{key}.npz")
        if results[i] is None:
            todo.append((i, key))
    if todo and _pool_size(workers, len(todo), MIN_REGISTRATIONS_PER_WORKER) <= 1:
        from facehd.sparse_cholesky import single_threaded_blas

        with single_threaded_blas():
            for done, (i, key) in enumerate(todo, 1):
                results[i] = _register_or_error(scans[i], template, cache, key, protocol)
                if progress:
                    progress("registering ground truth", done, len(todo))
    elif todo:
        with _worker_pool(_pool_size(workers, len(todo), MIN_REGISTRATIONS_PER_WORKER)) as pool:
            futures = [pool.submit(_register_or_error, scans[i], template, cache, key, protocol) for i, key in todo]
            for done, ((i, _), future) in enumerate(zip(todo, futures), 1):
                results[i] = future.result()
                if progress:
                    progress("registering ground truth", done, len(todo))
    if cache is not None:
        write_registration_index(cache, [(r, keys[i]) for i, r in enumerate(results) if isinstance(r, RegisteredScan)])
    return results


REGISTRATION_INDEX = "index.json"


def write_registration_index(cache_dir: str | Path, entries: Iterable[tuple[RegisteredScan, str]]) -> Path:
    """Add (scan, cache key) pairs to `<cache_dir>/index.json`: {scan file (absolute): {"cache": file name,
    "subject", "scan", "landmarks", "protocol", "landmark_rms_mm", "surface_mean_mm", "coverage",
    "flags"}}, so a registration can be found and inspected. Entries of other scans are kept."""
    import json

    path = Path(cache_dir) / REGISTRATION_INDEX
    try:
        index = json.loads(path.read_text())
        index = index if isinstance(index, dict) else {}
    except (OSError, ValueError):
        index = {}  # absent or unreadable: rebuilt from this run
    for r, key in entries:
        index[str(r.scan.mesh_path.resolve())] = {
            "cache": f"{key}.npz", "subject": r.scan.subject, "scan": r.scan.scan,
            "landmarks": str(r.scan.landmarks_path.resolve()) if r.scan.landmarks_path else None,
            "protocol": r.protocol, "landmark_rms_mm": r.landmark_rms_mm, "surface_mean_mm": r.surface_mean_mm,
            "coverage": r.coverage, "flags": list(r.flags)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(index, indent=1, sort_keys=True))
    return path


@dataclass(frozen=True, eq=False)
class _SubjectJob:
    subject: str
    number: int
    registered: tuple[RegisteredScan, ...]
    predictions: dict[str, dict[str, Path]]  # method -> setting folder -> file
    template: Template
    options: MiccOptions


@dataclass(frozen=True, eq=False)
class _SubjectOutcome:
    scores: list[SubjectScore]
    vertex_mm: dict[tuple[str, str], np.ndarray]  # (method, setting) -> best scan's per-vertex error


def _score_one(job: _SubjectJob, method: str, folder: str, path: Path | None) -> tuple[SubjectScore, PairScore | None]:
    t, opt = job.template, job.options
    base = SubjectScore(method, job.subject, SETTINGS[folder], "missing")
    if path is None:
        return replace(base, message=f"no {folder}.obj / .ply"), None
    if not job.registered:
        return replace(base, status="error", message="no usable ground-truth scan"), None
    try:
        pred = load_prediction(path, t, units=opt.units)
        pairs = {r.scan.scan: micc_score(r.vertices, pred, t.faces, nose_index=t.nose_tip,
                                         radius_mm=opt.radius_mm(job.number), mm_per_unit=t.mm_per_unit,
                                         direction=opt.direction, metric=opt.metric, protocol=opt.protocol,
                                         gt_center=r.nose_tip) for r in job.registered}
    except PredictionUnitsError:
        raise  # a unit mistake is systematic: the whole run is refused
    except FaceHDError as exc:
        return replace(base, status="error", message=str(exc)), None
    best = min(pairs, key=lambda k: pairs[k].score_mm)  # protocol: the minimum over the frontal scans
    score = replace(base, status="ok", score_mm=pairs[best].score_mm, best_scan=best,
                    scan_scores_mm={k: p.score_mm for k, p in pairs.items()},
                    gt_to_pred_mm=pairs[best].gt_to_pred_mm, pred_to_gt_mm=pairs[best].pred_to_gt_mm,
                    warnings=tuple(f"{scan} {d}: the ICP loop reached the safety net of {RELEASED_SAFETY_ITERATIONS} "
                                   "iterations without meeting the stop rule" for scan, p in pairs.items()
                                   for d in p.safety_net))
    return score, pairs[best]


def _evaluate_subject(job: _SubjectJob) -> _SubjectOutcome:
    scores, vertex = [], {}
    for method, files in job.predictions.items():
        for folder in SETTINGS:
            score, best = _score_one(job, method, folder, files.get(folder))
            scores.append(score)
            if best is not None:
                vertex[method, score.setting] = best.vertex_mm
    return _SubjectOutcome(scores, vertex)


def _accumulate(outcomes: list[_SubjectOutcome], n: int) -> dict[tuple[str, str], np.ndarray]:
    """Mean over subjects of the per-vertex errors, per (method, setting), NaN where never measured."""
    sums: dict[tuple[str, str], np.ndarray] = {}
    counts: dict[tuple[str, str], np.ndarray] = {}
    for outcome in outcomes:
        for key, values in outcome.vertex_mm.items():
            ok = np.isfinite(values)
            sums.setdefault(key, np.zeros(n))[ok] += values[ok]
            counts.setdefault(key, np.zeros(n))[ok] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return {k: np.where(counts[k] > 0, sums[k] / counts[k], np.nan) for k in sums}


def _evaluate_all(jobs: list[_SubjectJob], workers: int, progress) -> list[_SubjectOutcome]:
    total, outcomes = len(jobs), []
    workers = _pool_size(workers, sum(len(j.registered) * len(j.predictions) for j in jobs) * len(SETTINGS),
                         MIN_PAIRS_PER_WORKER)
    if workers <= 1 or total <= 1:
        for done, job in enumerate(jobs, 1):
            outcomes.append(_evaluate_subject(job))
            if progress:
                progress("evaluating", done, total)
        return outcomes
    with _worker_pool(min(workers, total)) as pool:
        for done, outcome in enumerate(pool.map(_evaluate_subject, jobs), 1):
            outcomes.append(outcome)
            if progress:
                progress("evaluating", done, total)
    return outcomes


def _check_units_early(paths: Iterable[Path], template: Template, units: str) -> None:
    """Read a method's files in order until one loads, and raise PredictionUnitsError if that one
    betrays other units. Any other fault of a file is left to its own cell, where the per-file
    evaluation reports it."""
    for path in paths:
        try:
            load_prediction(path, template, units=units)
        except PredictionUnitsError:
            raise
        except FaceHDError:
            continue
        return


def evaluate_micc(gt_dir: str | Path, predictions: Mapping[str, str | Path], template: Template, *,
                  options: MiccOptions | None = None, cache_dir: str | Path | None = None, workers: int = 1,
                  progress: Callable[[str, int, int], None] | None = None, subjects: Iterable[str] | None = None,
                  synthetic: bool = False, landmarks_dir: str | Path | None = None) -> MiccResult:
    """Evaluate each prediction directory (method name -> `<pred>` with subject_XX/<setting>.obj)
    against the MICC ground truth under `gt_dir`.

    Registrations are cached under `cache_dir` (None: not cached). A missing prediction or a
    failed item is recorded (status "missing" / "error") and left out of the averages, never
    silently; a prediction in the wrong units raises `PredictionUnitsError` (the run is refused).
    `landmarks_dir`: a landmark tree mirroring `gt_dir` (`find_ground_truth`).
    `progress(stage, done, total)` is called as registrations and subjects finish. `subjects`
    (names like "subject_01") restricts the run; `workers` > 1 uses that many processes.
    """
    options = options or MiccOptions()
    gt = find_ground_truth(gt_dir, landmarks_dir=landmarks_dir)
    wanted = set(subjects) if subjects is not None else None
    names = [s for s in gt.scans if wanted is None or s in wanted]
    found = {method: find_predictions(path) for method, path in predictions.items()}
    extra = {m: sorted(set(f) - set(gt.scans)) for m, f in found.items()}
    for files in found.values():  # refuse a unit mistake before any registration work
        _check_units_early((p for subject in names for p in files.get(subject, {}).values()), template,
                           options.units)
    scans = [scan for name in names for scan in gt.scans[name]]
    registered = register_scans(scans, template, protocol=options.protocol, cache_dir=cache_dir, workers=workers,
                                progress=progress)
    problems = list(gt.problems) + [r for r in registered if isinstance(r, str)]
    ok = [r for r in registered if not isinstance(r, str)]
    jobs = [_SubjectJob(name, gt.scans[name][0].number, tuple(r for r in ok if r.scan.subject == name),
                        {m: found[m].get(name, {}) for m in found}, template, options) for name in names]
    outcomes = _evaluate_all(jobs, workers, progress)
    return MiccResult(
        options=options, template=template, methods=tuple(predictions), subjects=tuple(names),
        scores=[s for o in outcomes for s in o.scores], gt_problems=problems, extra_predictions=extra,
        vertex_error_mm=_accumulate(outcomes, template.n_vertices),
        mean_gt_vertices=np.mean([r.vertices for r in ok], axis=0) if ok else template.vertices.copy(),
        synthetic=synthetic, registrations=ok,
    )


# ----------------------------------------------------------------------------------------------
# one call for the command line: real data or the embedded synthetic default


def run_micc(gt_dir: str | Path | None = None, predictions: Mapping[str, str | Path] | None = None,
             template: str | Path | None = None, *, template_keypoints: str | Path | None = None,
             options: MiccOptions | None = None, cache_root: str | Path | None = None, workers: int = 1,
             progress: Callable[[str, int, int], None] | None = None,
             synthetic_subjects: int | None = None, synthetic_resolution: int | None = None,
             landmarks_dir: str | Path | None = None) -> MiccResult:
    """Evaluate predictions on MICC, or with no data arguments the synthetic default.

    Real data needs `gt_dir`, at least one prediction directory and the `template` (model .mat,
    or a mesh with `template_keypoints`); `landmarks_dir` is a landmark tree beside it
    (`find_ground_truth`). With none of them, the synthetic benchmark (generated
    once under `<cache_root>/synthetic-micc-v1`, `synthetic_subjects` subjects (default 53) of a
    SynthBFM with `synthetic_resolution` grid rows (default 48)) and its reference methods are
    evaluated. Registrations are cached under
    `<cache_root>/micc-registration`; cache_root defaults to $FACEHD_CACHE or ~/.cache/facehd.
    """
    from benchmarks import synthetic

    root = Path(cache_root) if cache_root is not None else synthetic.default_cache_root()
    predictions = dict(predictions or {})
    if gt_dir is None and not predictions and template is None and landmarks_dir is None:
        n = synthetic.MICC_N_SUBJECTS if synthetic_subjects is None else synthetic_subjects
        resolution = synthetic.DEFAULT_RESOLUTION if synthetic_resolution is None else synthetic_resolution
        layout = synthetic.SyntheticMicc(synthetic.ensure_synthetic_micc(
            root / f"synthetic-micc-v{synthetic.SYNTH_VERSION}", n_subjects=n, resolution=resolution,
            workers=workers))
        gt_dir, template = layout.gt_dir, layout.template
        predictions = {m: layout.predictions(m) for m in synthetic.REFERENCE_METHODS}
        is_synthetic = True
    else:
        missing = [what for what, value in (("the ground truth (--gt DIR)", gt_dir),
                                            ("at least one prediction (--pred NAME=DIR)", predictions),
                                            ("the template (--template MODEL.mat)", template)) if not value]
        if missing:
            raise InputError("evaluating real data needs " + ", ".join(missing)
                             + "; give no data arguments at all to run the synthetic default")
        is_synthetic = False
    loaded = load_template(template, keypoints=template_keypoints)
    return evaluate_micc(gt_dir, predictions, loaded, options=options, cache_dir=root / "micc-registration",
                         workers=workers, progress=progress, synthetic=is_synthetic, landmarks_dir=landmarks_dir)
