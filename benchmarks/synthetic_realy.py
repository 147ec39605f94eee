"""The synthetic REALY benchmark: the shared synthetic subjects (benchmarks.synthetic) written in REALY's
real layout, with a SynthBFM template keypoint file and reference predictions, generated once and cached."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from benchmarks import synthetic
from benchmarks.realy import REGIONS, RealySubject, RegionMesh, TemplateKeypoints, merge_gt_vertices
from facehd import conventions as cv
from facehd.errors import InputError
from facehd.fsutil import atomic_open

# Bump when anything below changes the generated files: the cache key includes it.
SYNTH_REALY_VERSION = 1
DEFAULT_SUBJECTS = 3  # REALY has 100 subjects; a few keep the embedded default quick (45 predictions)
SIDE_VIEWS = 4  # REALY's side track has 4 images per subject (400 for 100 subjects)
# REALY's metrical scales (mm per GT unit) lie between 6.5 and 10.2; draw the synthetic ones there.
METRICAL_SCALE_RANGE = (7.5, 10.0)
TEMPLATE_NAME = "SynthBFM"
FOREHEAD_BELOW_EYES_MM = 5.0  # the synthetic forehead reaches this far under the eyes (see region_masks)
FOREHEAD_BEYOND_BROWS_MM = 8.0
# The frontal image is the easy one; side views see the face at an angle, so the reference methods'
# landmarks (and hence their fits) are noisier there.
FRONTAL_NOISE = synthetic.PredictionNoise(vertex_mm=0.30, landmark_mm=1.0, angle_deg=3.0, shift_mm=3.0)
SIDE_NOISE = synthetic.PredictionNoise(vertex_mm=0.30, landmark_mm=1.6, angle_deg=6.0, shift_mm=5.0)

# The 17 keypoints after the 68 iBUG ones (REALY's HIFI3D set uses 70, 71 for the nose and 76, 77 for
# the cheeks). Each is a point in the frontal (x, y) plane, built from iBUG landmarks as
# (anchor landmarks averaged) + offset in model units, then snapped to the nearest template vertex.
# x < 0 is the subject's right, as in SynthBFM.
EXTRA_KEYPOINTS = (
    ("forehead centre", (21, 22), (0.0, 0.30)),  # 68
    ("glabella", (21, 22), (0.0, 0.0)),  # 69
    ("right alar crease", (31,), (-0.05, 0.03)),  # 70
    ("left alar crease", (35,), (0.05, 0.03)),  # 71
    ("right temple", (36,), (-0.10, 0.08)),  # 72
    ("left temple", (45,), (0.10, 0.08)),  # 73
    ("right cheekbone", (36, 39, 40, 41), (-0.04, -0.16)),  # 74
    ("left cheekbone", (42, 45, 46, 47), (0.04, -0.16)),  # 75
    ("right mid-cheek", (31, 3), (0.0, 0.0)),  # 76
    ("left mid-cheek", (35, 13), (0.0, 0.0)),  # 77
    ("right nasolabial fold", (31, 48), (-0.03, 0.0)),  # 78
    ("left nasolabial fold", (35, 54), (0.03, 0.0)),  # 79
    ("right jaw angle", (4,), (0.06, 0.0)),  # 80
    ("left jaw angle", (12,), (-0.06, 0.0)),  # 81
    ("chin centre", (57, 8), (0.0, 0.0)),  # 82
    ("right forehead", (19,), (0.0, 0.22)),  # 83
    ("left forehead", (24,), (0.0, 0.22)),  # 84
)


def keypoint_vertices(mean_shape: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """(85,) template vertex indices of REALY's 85 keypoints on a SynthBFM-like mesh: the 68 iBUG
    landmark vertices, then the EXTRA_KEYPOINTS snapped in (x, y) (the face is a graph over x, y)."""
    xy = mean_shape[landmarks, :2]
    designed = np.array([xy[list(anchors)].mean(axis=0) + np.array(offset) for _, anchors, offset in EXTRA_KEYPOINTS])
    _, extra = cKDTree(mean_shape[:, :2]).query(designed)
    return np.concatenate([np.asarray(landmarks, dtype=np.int64), extra.astype(np.int64)])


def template_rows(faces: np.ndarray, vertex_index: np.ndarray) -> list[list[float]]:
    """REALY's barycentric rows [face_idx (0-based), w0, w1] placing each keypoint exactly on its
    vertex: a face that uses the vertex, with weight 1 on that corner (as REALY's HIFI3D.txt does)."""
    rows = []
    for vertex in vertex_index:
        face, corner = np.argwhere(faces == vertex)[0]
        rows.append([int(face), float(corner == 0), float(corner == 1)])
    return rows


def region_masks(vertices_mm: np.ndarray, labels: np.ndarray, landmarks_mm: np.ndarray) -> dict[str, np.ndarray]:
    """(N,) bool per REALY region on a subject's dense surface (model frame, mm), from the SynthBFM
    region labels. Nose, mouth and cheek are SynthBFM's regions. REALY's forehead holds the eyes and
    brows (its bICP pins iBUG 17-26 and 36-47 to it), so the synthetic forehead is SynthBFM's
    forehead plus the eyes and the skin around them: from FOREHEAD_BELOW_EYES_MM under the lowest eye
    landmark up to the hair band, out to FOREHEAD_BEYOND_BROWS_MM past the brows' ends."""
    codes = cv.REGION_CODES
    masks = {name: labels == codes[name] for name in ("nose", "mouth", "cheek")}
    x, y = vertices_mm[:, 0], vertices_mm[:, 1]
    centre_x = landmarks_mm[[36, 45], 0].mean()
    half_width = np.abs(landmarks_mm[[17, 26], 0] - centre_x).max() + FOREHEAD_BEYOND_BROWS_MM
    band = (y >= landmarks_mm[36:48, 1].min() - FOREHEAD_BELOW_EYES_MM) & (np.abs(x - centre_x) <= half_width)
    masks["forehead"] = band & np.isin(labels, [codes["forehead"], codes["eyes"], codes["skin"]])
    return masks


def cut_region(vertices: np.ndarray, faces: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The triangles whose three vertices are in `mask`, with their vertices re-indexed."""
    keep = faces[mask[faces].all(axis=1)]
    used = np.unique(keep)
    local = np.full(len(vertices), -1, dtype=np.int64)
    local[used] = np.arange(len(used))
    return vertices[used], local[keep]


@dataclass(frozen=True, eq=False)
class SyntheticCase:
    """An in-memory REALY case on a SynthBFM mean face, for tests and speed runs: the ground truth is
    the template's own surface (subdivided `subdivisions` times) in GT units, so a prediction equal to
    `vertices` (any similarity transform of it) scores 0."""

    template: TemplateKeypoints
    subject: RealySubject
    vertices: np.ndarray  # (N, 3) the template mesh (SynthBFM mean shape, model units)
    faces: np.ndarray  # (F, 3)
    region_labels: np.ndarray  # (N,) SynthBFM region codes of the template vertices


def synthetic_case(resolution: int = 40, *, scale: float = 9.0, subdivisions: int = 0, seed: int = 0) -> SyntheticCase:
    """A `SyntheticCase` from a SynthBFM model of `resolution` (GT units: mm / `scale`)."""
    from facehd.synth.bfm import make_synth_bfm

    fields = make_synth_bfm(resolution, seed)
    mean = fields["meanshape"].reshape(-1, 3).astype(np.float64)
    faces = (fields["tri"] - 1).astype(np.int64)
    landmarks = (fields["keypoints"].ravel() - 1).astype(np.int64)
    labels = fields["region"].ravel().astype(np.int64)
    keypoints = keypoint_vertices(mean, landmarks)
    surface, dense_faces, dense_labels = mean * cv.MM_PER_MODEL_UNIT, faces, labels
    for _ in range(subdivisions):
        surface, dense_faces, edges = synthetic.subdivide_midpoint(surface, dense_faces)
        dense_labels = np.concatenate([dense_labels, dense_labels[edges].min(axis=1)])
    masks = region_masks(surface, dense_labels, surface[landmarks])
    regions = {}
    for name in REGIONS:
        vertices, region_faces = cut_region(surface / scale, dense_faces, masks[name])
        merged, merged_faces = merge_gt_vertices(vertices, region_faces)
        regions[name] = RegionMesh(name, merged, merged_faces)
    rows = np.array(template_rows(faces, keypoints))
    weights = np.column_stack([rows[:, 1], rows[:, 2], 1.0 - rows[:, 1] - rows[:, 2]])
    template = TemplateKeypoints(rows[:, 0].astype(np.int64), weights, faces, len(mean), "SynthBFM template")
    subject = RealySubject(1, surface[keypoints] / scale, regions, scale)
    return SyntheticCase(template, subject, mean, faces, labels)


@dataclass(frozen=True)
class SyntheticRealy:
    """Where the parts of a synthetic REALY benchmark live: the REALY data layout at `root`
    (REALY_HIFI3D_keypoints/, REALY_scan_region/, metrical_scale.txt), the template and predictions."""

    root: Path

    @property
    def template_keypoints(self) -> Path:
        """template/SynthBFM.txt (REALY's JSON barycentric rows), beside template/SynthBFM.obj."""
        return self.root / "template" / f"{TEMPLATE_NAME}.txt"

    @property
    def template_mesh(self) -> Path:
        return self.root / "template" / f"{TEMPLATE_NAME}.obj"

    @property
    def model(self) -> Path:
        return self.root / "template" / "SynthBFM.mat"

    def predictions(self, method: str) -> Path:
        """predictions/<method>/<id>.obj (frontal) and <id>_<k>.obj, k = 1..4 (side)."""
        return self.root / "predictions" / method

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"


def synthetic_realy_parameters(*, n_subjects: int = DEFAULT_SUBJECTS, side_views: int = SIDE_VIEWS,
                               resolution: int = synthetic.DEFAULT_RESOLUTION, seed: int = synthetic.DEFAULT_SEED,
                               methods: tuple[str, ...] = synthetic.REFERENCE_METHODS) -> dict:
    """Everything the generated files depend on; its hash is the cache key."""
    from facehd.synth import bfm

    return {
        "generator": "benchmarks.synthetic_realy", "version": SYNTH_REALY_VERSION,
        "subjects_version": synthetic.SYNTH_VERSION, "synth_bfm_version": bfm.GENERATOR_VERSION,
        "n_subjects": n_subjects, "side_views": side_views, "resolution": resolution, "seed": seed,
        "methods": list(methods), "scale_range": list(METRICAL_SCALE_RANGE),
        "frontal_noise": vars(FRONTAL_NOISE), "side_noise": vars(SIDE_NOISE),
        "extra_keypoints": [list(map(str, k)) for k in EXTRA_KEYPOINTS],
        "forehead_mm": [FOREHEAD_BELOW_EYES_MM, FOREHEAD_BEYOND_BROWS_MM],
    }


def _key(parameters: dict) -> str:
    return hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()[:16]


def _cached_key(root: Path) -> str | None:
    try:
        return json.loads((root / "manifest.json").read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_obj(path: Path, vertices: np.ndarray, faces: np.ndarray, units: str) -> None:
    from facehd.io import Mesh, save_mesh

    save_mesh(path, Mesh(vertices, faces, metadata={"units": units}), precision=10)


def _write_subject(layout: SyntheticRealy, model, index: int, seed: int, scale: float, keypoints: np.ndarray,
                   methods: tuple[str, ...], side_views: int) -> None:
    subject = synthetic.make_subject(model, index, seed)
    gt = subject.scan_vertices_mm / scale  # REALY's GT units: mm = units x metrical scale
    units = f"mm/{scale:.6g}"
    _write_obj(layout.root / "REALY_HIFI3D_keypoints" / f"{index}.obj", gt[keypoints], np.zeros((0, 3)), units)
    masks = region_masks(subject.scan_vertices_mm, subject.scan_region, subject.scan_landmarks_mm)
    for name in REGIONS:
        vertices, faces = cut_region(gt, subject.scan_faces, masks[name])
        _write_obj(layout.root / "REALY_scan_region" / str(index) / f"{name}.obj", vertices, faces, units)
    for j, method in enumerate(methods):
        views = [(None, FRONTAL_NOISE)] + [(k, SIDE_NOISE) for k in range(1, side_views + 1)]
        for view, noise in views:
            rng = np.random.default_rng([seed, index, 3, j, 0 if view is None else view])
            vertices, faces = synthetic.predict_reference(model, subject, method, rng, noise=noise)
            stem = str(index) if view is None else f"{index}_{view}"
            _write_obj(layout.predictions(method) / f"{stem}.obj", vertices, faces, "model")


def _generate(root: Path, parameters: dict) -> None:
    from facehd.morphable import load_morphable_model
    from facehd.synth.bfm import write_synth_bfm

    layout = SyntheticRealy(root)
    write_synth_bfm(layout.model, resolution=parameters["resolution"], seed=parameters["seed"])
    model = load_morphable_model(layout.model)
    mean = model.mean_shape.detach().cpu().double().numpy()
    faces = model.faces.cpu().numpy().astype(np.int64)
    keypoints = keypoint_vertices(mean, model.keypoints.cpu().numpy())
    _write_obj(layout.template_mesh, mean, faces, "model")
    with atomic_open(layout.template_keypoints, "w") as fh:
        json.dump(template_rows(faces, keypoints), fh)
    rng = np.random.default_rng([parameters["seed"], 4])
    scales = rng.uniform(*METRICAL_SCALE_RANGE, parameters["n_subjects"])
    with atomic_open(root / "metrical_scale.txt", "w") as fh:  # REALY's own form: line k = subject k
        fh.writelines(f"{float(s)!r}\n" for s in scales)
    for index, scale in enumerate(scales, 1):
        _write_subject(layout, model, index, parameters["seed"], float(scale), keypoints,
                       tuple(parameters["methods"]), parameters["side_views"])
    with atomic_open(layout.manifest, "w") as fh:  # written last: its presence means complete
        json.dump({"key": _key(parameters), "parameters": parameters}, fh, indent=2)


def _check_replaceable(root: Path) -> None:
    try:
        generator = json.loads((root / "manifest.json").read_text())["parameters"]["generator"]
    except (OSError, ValueError, KeyError, TypeError):
        generator = None
    if generator != "benchmarks.synthetic_realy" and any(root.iterdir()):
        raise InputError(f"{root}: exists and is not a synthetic REALY cache (no manifest.json from "
                         "benchmarks.synthetic_realy); refusing to replace it, choose another cache directory")


def default_root() -> Path:
    """<$FACEHD_CACHE or ~/.cache/facehd>/synthetic-realy-v1."""
    return synthetic.default_cache_root() / f"synthetic-realy-v{SYNTH_REALY_VERSION}"


def ensure_synthetic_realy(cache_dir: str | Path | None = None, *, n_subjects: int = DEFAULT_SUBJECTS,
                           side_views: int = SIDE_VIEWS, resolution: int = synthetic.DEFAULT_RESOLUTION,
                           seed: int = synthetic.DEFAULT_SEED,
                           methods: tuple[str, ...] = synthetic.REFERENCE_METHODS) -> SyntheticRealy:
    """Generate the synthetic REALY benchmark once and return its layout.

    Default directory: `default_root()`. A manifest key hashed from `synthetic_realy_parameters`
    decides whether the cache is current; generation happens in a temporary sibling directory that is
    renamed into place, so an interrupted run leaves nothing that looks finished. Deterministic.
    """
    if n_subjects < 1 or side_views < 0:
        raise InputError(f"need n_subjects >= 1 and side_views >= 0, got {n_subjects} and {side_views}")
    root = Path(cache_dir) if cache_dir is not None else default_root()
    parameters = synthetic_realy_parameters(n_subjects=n_subjects, side_views=side_views, resolution=resolution,
                                            seed=seed, methods=tuple(methods))
    key = _key(parameters)
    if _cached_key(root) == key:
        return SyntheticRealy(root)
    if root.exists():
        _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".part", dir=root.parent))
    try:
        _generate(work, parameters)
        if root.exists():
            if _cached_key(root) == key:  # another process finished first
                return SyntheticRealy(root)
            _check_replaceable(root)
            stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent))
            os.replace(root, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(work, root)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return SyntheticRealy(root)

