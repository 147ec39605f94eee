"""Synthetic FaceHD-100: subjects, expressions and captures (raw scan, 9 rendered calibrated views,
landmarks) in the FaceHD-100 layout, with the generator's ground truth in a separate `_truth/` tree."""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from facehd import conventions as cv
from facehd.capture import (
    CAMERA_NAMES,
    IMAGES_DIR,
    SUBJECT_ID_PATTERN,
    SUBJECTS_CSV,
    Camera,
    capture_paths,
    write_cameras,
    write_landmarks7,
    write_landmarks68,
    write_subjects,
)
from facehd.distance import vertex_normals_np
from facehd.errors import FaceHDError, InputError
from facehd.fsutil import atomic_open, atomic_path
from facehd.io import Mesh, save_mesh
from facehd.morphable import compute_albedo, load_morphable_model
from facehd.procrustes import Similarity
from facehd.synth.bfm import DEFAULT_RESOLUTION, EXPRESSION_NAMES, write_synth_bfm
from facehd.synth.scan import ScanSource, interpolate_grid, synth_scan, uv_to_texel
from facehd.synth.truth import (
    ModelContext,
    TrueSurface,
    build_model_context,
    capture_coeffs,
    displacement_map,
    expression_coefficients,
    sample_subject_truth,
    scan_holes,
    synth_model_parameters,
    true_surface,
)
from facehd.uv import rasterize_attributes

if TYPE_CHECKING:  # pyrender loads on first use only
    from facehd.synth.render_views import ViewRenderer

GENERATOR_NAME = "facehd.synth.facehd"
GENERATOR_VERSION = 1
TRUTH_DIR = "_truth"  # beside the captures, never inside them
TRUTH_NPZ = "truth.npz"
GENERATOR_JSON = "generator.json"
DEFAULT_IMAGE_SIZE = 512
MIN_IMAGE_SIZE = 32
DEFAULT_MODEL_SEED = 0  # the SynthBFM that `facehd synth model` writes by default
JPEG_QUALITY = 92

# --- demographics (HRN supplement: 95% Asian, 3% white, 2% black; ages mostly 17-35) ----------
ETHNICITY_PROBABILITIES = {"asian": 0.95, "white": 0.03, "black": 0.02}
GENDER_PROBABILITIES = {"female": 0.5, "male": 0.5}
AGE_MEAN_YEARS, AGE_STD_YEARS = 25.0, 4.0
AGE_RANGE_YEARS = (17, 60)
AGE_TAIL_PROBABILITY = 0.04  # a few older participants, uniform over AGE_TAIL_YEARS
AGE_TAIL_YEARS = (35, 60)

# --- expressions: neutral first, then these, then the rest of SynthBFM's named expressions ------
NEUTRAL = "neutral"
PREFERRED_EXPRESSIONS = ("smile", "jaw_open", "brow_raise", "lip_pucker", "cheek_puff", "frown")
MAX_EXPRESSIONS = 1 + len(EXPRESSION_NAMES)

# --- pose: model -> rig (the subject in the camera rig) -> scanner frame (world, mm) -------------
HEAD_JITTER_DEG = 3.0  # std of the head's rotation about each axis inside the rig
HEAD_JITTER_MM = 5.0
SCANNER_MAX_DEG = 25.0  # the scanner's frame is rotated by up to this (random axis) ...
SCANNER_MAX_MM = 100.0  # ... and shifted by up to this along each axis
LANDMARK7_NOISE_MM = 0.5  # manual 3D annotation of the scan

# Independent random streams: np.random.default_rng([seed, stream, ...]).
_STREAM_SUBJECTS, _STREAM_SUBJECT, _STREAM_CAPTURE = 0, 1, 2

Progress = Callable[..., Iterable]  # called as progress(iterable, total=n, desc=text), e.g. tqdm


# ----------------------------------------------------------------------------------------------
# subjects and expressions


@dataclass(frozen=True)
class Subject:
    """One row of subjects.csv (age in years)."""

    subject_id: str
    gender: str
    age: int
    ethnicity: str


def sample_subjects(n: int, rng: np.random.Generator) -> list[Subject]:
    """``n`` subjects S001, S002, ... with demographics drawn like FaceHD-100's: ethnicity 95 / 3 /
    2 % Asian / white / black, genders 50 / 50, age ~ N(25, 4) clipped to 17..60 with a small
    uniform tail of older participants."""
    ethnicities = rng.choice(list(ETHNICITY_PROBABILITIES), size=n, p=list(ETHNICITY_PROBABILITIES.values()))
    genders = rng.choice(list(GENDER_PROBABILITIES), size=n, p=list(GENDER_PROBABILITIES.values()))
    ages = np.where(rng.random(n) < AGE_TAIL_PROBABILITY, rng.uniform(*AGE_TAIL_YEARS, n),
                    rng.normal(AGE_MEAN_YEARS, AGE_STD_YEARS, n))
    ages = np.clip(np.rint(ages), *AGE_RANGE_YEARS).astype(int)
    width = max(3, len(str(n)))
    return [Subject(f"S{i + 1:0{width}d}", str(g), int(a), str(e))
            for i, (g, a, e) in enumerate(zip(genders, ages, ethnicities))]


def expression_names(n: int) -> list[str]:
    """The first ``n`` expression folder names: neutral, then SynthBFM's named expressions (the
    most visible first)."""
    order = [NEUTRAL, *PREFERRED_EXPRESSIONS, *(e for e in EXPRESSION_NAMES if e not in PREFERRED_EXPRESSIONS)]
    if not 1 <= n <= len(order):
        raise InputError(f"the number of expressions must be in 1..{len(order)}, got {n}")
    return order[:n]


# ----------------------------------------------------------------------------------------------
# one capture


@dataclass(eq=False)
class SynthCapture:
    """Everything generated for one capture, before it is written."""

    subject: str
    expression: str
    scan: Mesh  # mm, scanner frame
    cameras: dict[str, Camera]  # world = scan mm
    images: list[np.ndarray]  # (H, W, 3) uint8 per view
    landmarks7_mm: np.ndarray  # (7, 3)
    landmarks68: list[np.ndarray]  # (68, 3) x, y, visible per view
    truth: dict[str, np.ndarray]  # the truth.npz arrays


def _random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    axis = rng.normal(size=3)
    angle = np.radians(rng.uniform(0.0, max_deg))
    return Rotation.from_rotvec(axis / np.linalg.norm(axis) * angle).as_matrix()


def sample_pose(rng: np.random.Generator) -> tuple[Similarity, Similarity]:
    """(model_to_rig, rig_to_world): the head in the rig (mm, small jitter) and the scanner frame
    relative to the rig (a random rigid pose)."""
    head = Rotation.from_rotvec(np.radians(rng.normal(0.0, HEAD_JITTER_DEG, 3))).as_matrix()
    model_to_rig = Similarity(cv.MM_PER_MODEL_UNIT, head, rng.normal(0.0, HEAD_JITTER_MM, 3))
    rig_to_world = Similarity(1.0, _random_rotation(rng, SCANNER_MAX_DEG),
                              rng.uniform(-SCANNER_MAX_MM, SCANNER_MAX_MM, 3))
    return model_to_rig, rig_to_world


def synth_capture(ctx: ModelContext, renderer: ViewRenderer, seed: int, subject_index: int, subject: str,
                  expression_index: int, expression: str) -> SynthCapture:
    """Generate one capture of subject number ``subject_index`` (0-based) in ``expression``.

    Deterministic for (seed, subject_index, expression_index): the subject's identity, texture
    and detail come from the subject's random stream, everything else from the capture's.
    """
    from facehd.synth.render_views import move_cameras, rig_cameras

    subject_truth = sample_subject_truth(ctx, np.random.default_rng([seed, _STREAM_SUBJECT, subject_index]))
    rng = np.random.default_rng([seed, _STREAM_CAPTURE, subject_index, expression_index])
    exp_coeff = expression_coefficients(expression, rng)
    coeffs = capture_coeffs(subject_truth, exp_coeff)
    displacement = displacement_map(ctx, subject_truth, exp_coeff)
    surface = true_surface(ctx.model, coeffs, subject_truth.deformation_map, displacement,
                           raster=ctx.raster, grid_faces=ctx.grid_faces)
    grid_shape = (*surface.valid.shape, 3)
    albedo = _albedo_grid(ctx, subject_truth.tex_coeff)

    model_to_rig, rig_to_world = sample_pose(rng)
    model_to_scan = rig_to_world.compose(model_to_rig)
    target = model_to_rig.apply(ctx.mean_keypoints).mean(axis=0)  # the rig is aimed at the seat, not the face
    cameras = move_cameras(rig_cameras(target, renderer.image_size, rng), rig_to_world)

    source = ScanSource(surface=surface.vertices.reshape(grid_shape), albedo=albedo, mean_xy=ctx.mean_map[..., :2],
                        hair=ctx.region_map == ctx.region_code("hair_band"), valid=surface.valid)
    scan = synth_scan(source, scan_holes(ctx), model_to_scan, rng)

    # the model's keypoints on the true surface: the surface at the keypoint vertices' UVs
    keypoint_rc = uv_to_texel(ctx.model.uv[ctx.model.keypoints].numpy(), *surface.valid.shape)
    keypoints_model = interpolate_grid(source.surface, *keypoint_rc)
    keypoints_mm = model_to_scan.apply(keypoints_model)
    landmarks7 = keypoints_mm[list(cv.LANDMARKS7_IBUG)]
    landmarks7 = landmarks7 + rng.normal(0.0, LANDMARK7_NOISE_MM, landmarks7.shape)

    images, landmarks68 = _render_views(renderer, surface, albedo, model_to_scan, rig_to_world, cameras,
                                        keypoints_mm, keypoint_rc)
    truth = {
        "coeffs": coeffs,
        "deformation_map": subject_truth.deformation_map,
        "displacement_map": displacement,
        "valid_mask_256": surface.valid,
        "surface_vertices": surface.vertices,
        "surface_faces": surface.faces,
        "scan_to_model": model_to_scan.inverse().as_matrix(),
        "landmarks68_model": keypoints_model,
        "model_resolution": np.int64(ctx.resolution),
        "model_seed": np.int64(ctx.seed),
    }
    return SynthCapture(subject=subject, expression=expression, scan=scan, cameras=dict(zip(CAMERA_NAMES, cameras)),
                        images=images, landmarks7_mm=landmarks7, landmarks68=landmarks68, truth=truth)


def _albedo_grid(ctx: ModelContext, tex_coeff: np.ndarray) -> np.ndarray:
    """(H, W, 3) albedo in [0, 1] on the truth's UV grid."""
    model = ctx.model
    albedo = compute_albedo(model, torch.as_tensor(tex_coeff, dtype=torch.float64)[None])[0].clamp(0.0, 1.0)
    albedo_map, _ = rasterize_attributes(albedo, model.uv, model.faces, ctx.valid.shape, ctx.raster)
    return albedo_map.permute(1, 2, 0).numpy()


def _render_views(renderer: ViewRenderer, surface: TrueSurface, albedo: np.ndarray, model_to_scan: Similarity,
                  rig_to_world: Similarity, cameras: list[Camera], keypoints_mm: np.ndarray,
                  keypoint_rc: tuple[np.ndarray, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Render the true surface (its valid texels, in scan mm, shaded under the studio lights) from
    every camera; the images and the 68-point landmarks with visibility per view."""
    from facehd.synth.render_views import RenderMesh, landmark_visibility, shade, studio_lights

    keep = surface.valid.reshape(-1)
    vertices = model_to_scan.apply(surface.vertices[keep])
    faces = (np.cumsum(keep) - 1)[surface.faces]
    normals = vertex_normals_np(vertices, faces)
    colors = shade(albedo.reshape(-1, 3)[keep], normals, studio_lights(rig_to_world))
    views = renderer.render(RenderMesh(vertices, faces, colors), cameras)
    normal_grid = np.zeros((keep.size, 3))
    normal_grid[keep] = normals
    keypoint_normals = interpolate_grid(normal_grid.reshape(*surface.valid.shape, 3), *keypoint_rc)
    landmarks68 = [landmark_visibility(camera, view.depth, keypoints_mm, keypoint_normals)
                   for camera, view in zip(cameras, views)]
    return [view.rgb for view in views], landmarks68


# ----------------------------------------------------------------------------------------------
# writing


def truth_path(out: str | Path, subject: str, expression: str) -> Path:
    """Where the truth of one capture lives: <out>/_truth/<subject>/<expression>/truth.npz."""
    return Path(out) / TRUTH_DIR / subject / expression / TRUTH_NPZ


def read_truth(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a truth.npz (keys: see `_truth/README.md`)."""
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed, but with fixed zip timestamps so equal arrays give equal bytes."""
    with atomic_open(path, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, value in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue(), compresslevel=1)


def _write_jpeg(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="JPEG", quality=JPEG_QUALITY)


def write_capture(out: Path, capture: SynthCapture) -> None:
    """Write one capture's files (each atomically) and its truth under `_truth/`."""
    directory = out / capture.subject / capture.expression
    paths = capture_paths(directory)
    for name, rgb in zip(CAMERA_NAMES, capture.images):
        _write_jpeg(directory / IMAGES_DIR / f"{name}.jpg", rgb)
    write_cameras(paths.cameras, capture.cameras)
    save_mesh(paths.scan, capture.scan)
    write_landmarks7(paths.landmarks7, capture.landmarks7_mm)
    for path, points in zip(paths.landmarks68, capture.landmarks68):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_landmarks68(path, points)
    _write_npz(truth_path(out, capture.subject, capture.expression), capture.truth)


TRUTH_README = """\
# Ground truth of a synthetic FaceHD-100 dataset

Written by `facehd synth facehd` beside the dataset, never inside it: the captures in `../` look
like a real capture set; this tree holds what only the generator knows. `generator.json` records
the generator's settings. One file per capture: `<subject>/<expression>/truth.npz` with

| key | shape, dtype | meaning |
| --- | --- | --- |
| `coeffs` | (257,) float64 | id[0:80], exp[80:144], tex[144:224]; angle, gamma, trans zero |
| `deformation_map` | (3, 64, 64) float32 | mid-frequency xyz offsets in model units (1 unit = 100 mm) |
| `displacement_map` | (1, 256, 256) float32 | high-frequency offset along the coarse normal, model units |
| `valid_mask_256` | (256, 256) bool | texels the model covers |
| `surface_vertices` | (65536, 3) float64 | true detailed surface, model units; vertex r*256+c is texel (r, c) |
| `surface_faces` | (K, 3) int64 | `uv_grid_mesh(256, 256, mask=valid_mask_256)`; invalid texels' vertices are 0 |
| `scan_to_model` | (4, 4) float64 | true similarity scan mm -> model units: x_model = s R x_scan + t |
| `landmarks68_model` | (68, 3) float64 | the 68 model keypoints on the true surface, model units |
| `model_resolution`, `model_seed` | int64 | the SynthBFM used (-1 when unknown) |

The true surface, in model space (`facehd.synth.truth.true_surface`):
M0 = mean + idBase id + exBase exp (SynthBFM loaded in float64: `facehd.synth.truth.load_truth_model
(model_resolution, model_seed)`); M1 = M0 + sample_uv_map(deformation_map, uv);
P1 = rasterize_attributes(M1, uv, faces, (256, 256)); N0 = rasterize_attributes(vertex_normals(M0)),
normalized; valid = the raster mask; vertices = dense_positions_from_map(P1, N0, displacement_map) on
uv_grid_mesh(256, 256, mask=valid). The scan is a noisy resampling of this surface moved by
inverse(scan_to_model), with holes and spikes; the images render it with the cameras of
`cameras.json`.
"""


# ----------------------------------------------------------------------------------------------
# the generator


@dataclass(frozen=True)
class SynthConfig:
    """Settings of one `generate_facehd` run.

    Attributes:
        out: dataset root to create.
        n_subjects: number of subjects (S001, ...).
        n_expressions: expressions per subject, neutral first (1..25).
        seed: the same seed gives the same files.
        image_size: width = height of every view in pixels.
        model_path: a SynthBFM .mat file; None builds SynthBFM(model_resolution, model_seed).
        model_resolution, model_seed: the SynthBFM to build when no file is given.
        workers: processes generating captures in parallel (each with its own renderer).
        overwrite: replace a synthetic dataset already in ``out``.
    """

    out: Path
    n_subjects: int
    n_expressions: int = 2
    seed: int = 0
    image_size: int = DEFAULT_IMAGE_SIZE
    model_path: Path | None = None
    model_resolution: int = DEFAULT_RESOLUTION
    model_seed: int = DEFAULT_MODEL_SEED
    workers: int = 1
    overwrite: bool = False

    def check(self) -> None:
        if self.n_subjects < 1:
            raise InputError(f"the number of subjects must be at least 1, got {self.n_subjects}")
        expression_names(self.n_expressions)
        if self.seed < 0:
            raise InputError(f"the seed must be >= 0, got {self.seed}")
        if self.image_size < MIN_IMAGE_SIZE:
            raise InputError(f"the image size must be at least {MIN_IMAGE_SIZE} px, got {self.image_size}")
        if self.workers < 1:
            raise InputError(f"workers must be at least 1, got {self.workers}")


@dataclass(frozen=True)
class SynthSummary:
    """What `generate_facehd` wrote."""

    out: Path
    subjects: int
    expressions: tuple[str, ...]
    captures: int
    images: int

    def describe(self) -> str:
        return (f"wrote {self.out}: {self.subjects} subjects x {len(self.expressions)} expressions "
                f"({', '.join(self.expressions)}) = {self.captures} captures, {self.images} images; "
                f"ground truth in {self.out / TRUTH_DIR}")


def _is_generated(entry: Path) -> bool:
    """Entries a previous run may have left in the output folder (including atomic temporaries)."""
    name = entry.name
    return (name in (SUBJECTS_CSV, TRUTH_DIR) or (entry.is_dir() and bool(SUBJECT_ID_PATTERN.match(name)))
            or bool(re.match(r"^\..*\.part", name)))


def prepare_output(out: Path, overwrite: bool) -> None:
    """Create ``out``; refuse a non-empty one unless ``overwrite``, which replaces only what the
    generator writes and refuses folders holding anything else."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        raise InputError(f"{out}: not empty; pass --overwrite to replace the synthetic dataset there")
    foreign = [e.name for e in entries if not _is_generated(e)]
    if foreign:
        raise InputError(f"{out}: --overwrite only replaces a synthetic dataset, but the folder also holds "
                         f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}; choose another folder")
    for entry in entries:
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    out.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class _Job:
    """What a worker needs to generate any capture (picklable for worker processes)."""

    model_file: Path
    model_resolution: int
    model_seed: int
    seed: int
    image_size: int
    out: Path
    subjects: tuple[str, ...]
    expressions: tuple[str, ...]


class _CaptureWorker:
    """Generates and writes captures with one model context and one renderer."""

    def __init__(self, job: _Job):
        from facehd.synth.render_views import ViewRenderer

        self.job = job
        model = load_morphable_model(job.model_file, dtype=torch.float64)
        self.ctx = build_model_context(model, job.model_resolution, job.model_seed)
        self.renderer = ViewRenderer(job.image_size)

    def run(self, task: tuple[int, int]) -> None:
        i, j = task
        capture = synth_capture(self.ctx, self.renderer, self.job.seed, i, self.job.subjects[i], j,
                                self.job.expressions[j])
        write_capture(self.job.out, capture)

    def close(self) -> None:
        self.renderer.close()


_WORKER: _CaptureWorker | None = None  # one per worker process


def _init_worker(job: _Job, threads: int) -> None:
    global _WORKER
    torch.set_num_threads(threads)
    _WORKER = _CaptureWorker(job)


def _run_in_worker(task: tuple[int, int]) -> None:
    try:
        _WORKER.run(task)
    except FaceHDError as exc:  # subclasses with custom constructors do not unpickle
        raise FaceHDError(str(exc)) from None


def _run_tasks(job: _Job, tasks: list[tuple[int, int]], workers: int, progress: Progress | None) -> None:
    def wrap(items):
        return progress(items, total=len(tasks), desc="synth facehd") if progress is not None else items

    if workers == 1:
        worker = _CaptureWorker(job)
        try:
            for task in wrap(tasks):
                worker.run(task)
        finally:
            worker.close()
        return
    # spawn, not fork: the parent has used torch's thread pools, which do not survive a fork.
    context = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(job, threads)) as pool:
        futures = [pool.submit(_run_in_worker, task) for task in tasks]
        for future in wrap(as_completed(futures)):
            future.result()


@contextlib.contextmanager
def _model_file(config: SynthConfig) -> Iterator[tuple[Path, int, int]]:
    """(path, resolution, seed) of the SynthBFM file: the given one, or a temporary one built."""
    if config.model_path is not None:
        path = Path(config.model_path)
        if not path.is_file():
            raise InputError(f"{path}: no such model file")
        yield (path, *synth_model_parameters(path))
        return
    with tempfile.TemporaryDirectory(prefix="facehd-synth-") as tmp:
        path = write_synth_bfm(Path(tmp) / "BFM_model_front.mat", config.model_resolution, config.model_seed)
        yield path, config.model_resolution, config.model_seed


def generate_facehd(config: SynthConfig, *, progress: Progress | None = None) -> SynthSummary:
    """Generate a synthetic FaceHD-100 dataset in ``config.out`` (see `SynthConfig`).

    Writes subjects.csv, <subject>/<expression>/ captures in the `facehd.capture` layout and
    `_truth/` (README.md, generator.json, per-capture truth.npz). Every file is written
    atomically; the same config gives the same files. ``progress`` wraps the capture iterable
    (called as ``progress(items, total=n, desc=...)``, e.g. tqdm).
    """
    config.check()
    out = Path(config.out)
    prepare_output(out, config.overwrite)
    subjects = sample_subjects(config.n_subjects, np.random.default_rng([config.seed, _STREAM_SUBJECTS]))
    expressions = tuple(expression_names(config.n_expressions))
    write_subjects(out / SUBJECTS_CSV, [asdict(s) for s in subjects])
    with _model_file(config) as (model_file, resolution, model_seed):
        _write_generator_files(out, config, expressions, resolution, model_seed)
        job = _Job(model_file=model_file, model_resolution=resolution, model_seed=model_seed, seed=config.seed,
                   image_size=config.image_size, out=out, subjects=tuple(s.subject_id for s in subjects),
                   expressions=expressions)
        tasks = [(i, j) for i in range(len(subjects)) for j in range(len(expressions))]
        _run_tasks(job, tasks, min(config.workers, len(tasks)), progress)
    return SynthSummary(out=out, subjects=len(subjects), expressions=expressions, captures=len(tasks),
                        images=len(tasks) * len(CAMERA_NAMES))


def _write_generator_files(out: Path, config: SynthConfig, expressions, resolution: int, model_seed: int) -> None:
    truth = out / TRUTH_DIR
    with atomic_open(truth / "README.md") as fh:
        fh.write(TRUTH_README)
    record = {
        "generator": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "seed": config.seed,
        "subjects": config.n_subjects,
        "expressions": list(expressions),
        "image_size": config.image_size,
        "jpeg_quality": JPEG_QUALITY,
        "model": {"file": None if config.model_path is None else str(config.model_path),
                  "resolution": resolution, "seed": model_seed},
        "units": {"scan": "mm", "cameras": "mm", "truth": "model units (1 unit = 100 mm)"},
    }
    with atomic_open(truth / GENERATOR_JSON) as fh:
        json.dump(record, fh, indent=1)
        fh.write("\n")
