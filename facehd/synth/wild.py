"""Synthetic in-the-wild training images: morphable-model faces rendered in random poses, lighting,
backgrounds and occluders, written in the `facehd.wild` folder format with their ground truth."""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from facehd import conventions as cv
from facehd.errors import FileFormatError, InputError
from facehd.fsutil import atomic_open
from facehd.morphable import MorphableModel, load_morphable_model, reconstruct
from facehd.wild import (
    CROP_SIZE,
    RESCALE_FACTOR,
    WildSample,
    crop_transform,
    template5_from_model,
    write_list,
    write_sample,
)

GENERATOR_NAME = "facehd.synth.wild"
GENERATOR_VERSION = 1
DEFAULT_IMAGE_SIZE = 256
TRUTH_DIR = "_truth"
GENERATOR_JSON = "generator.json"
# Faces formed per `reconstruct` call (the bases are read once per batch). Batches always start at
# multiples of this and are padded to it, so image i is the same whatever the number of images.
BATCH = 16

# --- faces: coefficients ~ N(0, std^2), clipped ------------------------------------------------
ID_STD, ID_CLIP = 1.0, 3.0
EXP_STD, EXP_CLIP = 0.7, 2.0  # the preview's expression spread
TEX_STD, TEX_CLIP = 1.0, 2.0  # SynthBFM keeps mean +- 2 sigma of one component in 0..255

# --- pose, uniform in +- these (degrees); angle = (pitch x, yaw y, roll z) ----------------------
PITCH_DEG = 25.0
YAW_DEG = 60.0
ROLL_DEG = 15.0

# --- framing: the face's scale and position in the image ---------------------------------------
# pixels per model unit at the model origin, as a fraction of the image side: a face ~2.2 units
# tall (chin to hair band) then spans ~35-65 % of the image
PIXELS_PER_UNIT_FRACTION = (0.16, 0.30)
CENTRE_OFFSET_FRACTION = 0.12  # the origin's image position moves by up to this much of the side

# --- lighting (SH, Deep3DFaceRecon's basis): sampled as irradiance, converted to gamma ---------
AMBIENT_IRRADIANCE = (0.45, 0.8)  # DC irradiance (the 0.8 default gives 0.71); above 0.8, bright skin clips
DIRECTIONAL_FRACTION = (0.0, 0.5)  # directional term's peak, relative to the ambient term
LIGHT_MIN_FRONT = 0.2  # light directions have z >= this: lit from the camera's side
SECOND_ORDER_FRACTION = 0.05  # second-order coefficients, relative to the ambient term
CHANNEL_TINT = 0.08  # per-channel gain in 1 +- this: warm and cool light
SH_DC = cv.SH_A[0] * cv.SH_C[0]  # basis value of band 0 (pi / sqrt(4 pi))
SH_LINEAR = cv.SH_A[1] * cv.SH_C[1]  # scale of the first-order bands (sqrt(pi))

# --- backgrounds ---------------------------------------------------------------------------------
BACKGROUND_KINDS = ("gradient", "noise", "shapes")
NOISE_GRID = (2, 9)  # low-resolution colour grid upsampled into a smooth noise texture
NOISE_DETAIL = 0.15  # amplitude of a finer second octave
SHAPE_COUNT = (4, 13)
PIXEL_NOISE_STD = (0.0, 3.0 / 255.0)  # sensor-like Gaussian noise on the final image

# --- occluders -------------------------------------------------------------------------------
OCCLUDER_PROBABILITY = 0.3
OCCLUDER_KINDS = ("rectangle", "ellipse", "hand")
SECOND_OCCLUDER_PROBABILITY = 0.2
# iBUG landmarks an occluder is centred near: eyes, nose, mouth, cheeks (jaw points 3 and 13)
OCCLUDER_ANCHORS = (3, 13, 30, 33, 36, 39, 42, 45, 48, 51, 54, 57, 62)
OCCLUDER_JITTER = 0.4  # of the inter-ocular distance
SKIN_TONES = ((0.93, 0.76, 0.65), (0.80, 0.60, 0.47), (0.62, 0.44, 0.32), (0.40, 0.27, 0.20))
ELLIPSE_POINTS = 32

VISIBILITY_SLACK = 0.05  # model units (5 mm): a landmark this close behind the surface is visible
_EMPTY = np.iinfo(np.int64).max
_LOW32 = 0xFFFFFFFF

Progress = Callable[..., Iterable]  # called as progress(iterable, total=n, desc=text), e.g. tqdm


@dataclass
class WildTruth:
    """Ground truth of one generated image (`<out>/_truth/<name>.npz`)."""

    coeffs: np.ndarray  # (257,) float64: id exp tex angle (radians) gamma trans (model units)
    shape: np.ndarray  # (N, 3) float32 model-space shape (id + exp, before pose), model units
    image_size: int  # pixels; the camera: focal FOCAL * size / 224, camera at z = 10
    focal: float  # pixels
    principal_point: float  # pixels, both axes, y up (image row = size - 1 - y)
    camera_distance: float  # model units
    crop_transform: np.ndarray  # (3,) [scale, tx, ty] image -> 224 crop with the model's template
    landmarks_visible: np.ndarray  # (68,) bool: not self-occluded, not occluded, inside the image
    occluded: bool  # whether occluders were drawn


@dataclass
class WildRender:
    """One generated image with its ground truth."""

    sample: WildSample
    truth: WildTruth


@dataclass
class WildSynthResult:
    """What `generate_wild` wrote."""

    root: Path
    names: list[str]
    seconds: float

    @property
    def images_per_second(self) -> float:
        return len(self.names) / self.seconds if self.seconds > 0 else float("inf")


# ----------------------------------------------------------------------------------------------
# random draws


def image_rngs(seed: int, index: int) -> tuple[np.random.Generator, ...]:
    """Independent generators for image ``index``: (face, scene, occluders). Separate streams let
    a test switch occluders on and off without changing the face or the background."""
    return tuple(np.random.default_rng(s) for s in np.random.SeedSequence([seed, index]).spawn(3))


def _clipped_normal(rng: np.random.Generator, std: float, clip: float, n: int) -> np.ndarray:
    return np.clip(std * rng.standard_normal(n), -clip, clip)


def sample_gamma(rng: np.random.Generator) -> np.ndarray:
    """(27,) SH coefficients: an ambient term, one directional light from the camera's side and
    weak second-order terms, sampled as irradiance so the face is neither black nor saturated."""
    ambient = rng.uniform(*AMBIENT_IRRADIANCE)
    direction = rng.standard_normal(3)
    direction[2] = abs(direction[2])
    direction /= np.linalg.norm(direction)
    if direction[2] < LIGHT_MIN_FRONT:
        direction[2] = LIGHT_MIN_FRONT
        direction[:2] *= math.sqrt(1.0 - LIGHT_MIN_FRONT**2) / max(np.linalg.norm(direction[:2]), 1e-12)
    strength = rng.uniform(*DIRECTIONAL_FRACTION) * ambient / SH_LINEAR
    second = SECOND_ORDER_FRACTION * ambient * rng.uniform(-1.0, 1.0, 5)
    tint = 1.0 + rng.uniform(-CHANNEL_TINT, CHANNEL_TINT, 3)
    gamma = np.empty((3, 9))
    for c in range(3):
        # basis order [1, -y, z, -x, xy, -yz, 3z^2-1, -xz, x^2-y^2] (DESIGN.md section 3)
        linear = strength * np.array([-direction[1], direction[2], -direction[0]])
        gamma[c] = tint[c] * np.concatenate([[ambient / SH_DC], linear, second])
        gamma[c, 0] -= cv.SH_INIT_DC  # `sh_shading` adds it back
    return gamma.reshape(-1)


def sample_coeffs(rng: np.random.Generator, image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """(257,) coefficients of one face: identity, expression, texture, pose, lighting and a
    translation that frames the face at a random scale and position in an ``image_size`` image."""
    s = cv.COEFF_SLICES
    coeffs = np.zeros(cv.N_COEFFS)
    coeffs[s["id"]] = _clipped_normal(rng, ID_STD, ID_CLIP, cv.N_ID)
    coeffs[s["exp"]] = _clipped_normal(rng, EXP_STD, EXP_CLIP, cv.N_EXP)
    coeffs[s["tex"]] = _clipped_normal(rng, TEX_STD, TEX_CLIP, cv.N_TEX)
    limits = np.radians([PITCH_DEG, YAW_DEG, ROLL_DEG])
    coeffs[s["angle"]] = rng.uniform(-limits, limits)
    coeffs[s["gamma"]] = sample_gamma(rng)
    focal = cv.FOCAL * image_size / cv.IMAGE_SIZE
    depth = focal / (rng.uniform(*PIXELS_PER_UNIT_FRACTION) * image_size)  # camera to origin
    offset = rng.uniform(-CENTRE_OFFSET_FRACTION, CENTRE_OFFSET_FRACTION, 2) * image_size  # pixels
    coeffs[s["trans"]] = [offset[0] * depth / focal, offset[1] * depth / focal, cv.CAMERA_DISTANCE - depth]
    return coeffs


# ----------------------------------------------------------------------------------------------
# rasterization


@dataclass
class Raster:
    face: np.ndarray  # (S, S) int64 index of the visible triangle, -1 where none
    depth: np.ndarray  # (S, S) float32 camera depth of the visible surface, inf where none


def rasterize(points: np.ndarray, depth: np.ndarray, faces: np.ndarray, size: int) -> Raster:
    """Z-buffer visibility at pixel centres: (N, 2) vertex pixels (x, row), (N,) camera depth,
    (F, 3) faces -> the nearest triangle and its depth per pixel (triangles reaching behind the
    camera are skipped).

    Each triangle enumerates the pixel centres in its bounding box, keeps those inside (edge
    functions), interpolates 1/depth (linear in the image under perspective), and the nearest
    wins per pixel through one scatter-min of (depth bits << 32 | face): positive float32 bit
    patterns order like the floats, and ties go to the lower face index, so the result is exact
    and deterministic. Much faster than building a ray-casting BVH for every face.
    """
    x, y = points[:, 0][faces], points[:, 1][faces]  # (F, 3)
    lo_x = np.maximum(np.ceil(x.min(axis=1)), 0).astype(np.int64)
    hi_x = np.minimum(np.floor(x.max(axis=1)), size - 1).astype(np.int64)
    lo_y = np.maximum(np.ceil(y.min(axis=1)), 0).astype(np.int64)
    hi_y = np.minimum(np.floor(y.max(axis=1)), size - 1).astype(np.int64)
    n_x, n_y = hi_x - lo_x + 1, hi_y - lo_y + 1
    in_front = depth[faces].min(axis=1) > 0  # the depth bit trick needs positive depths
    counts = np.where(in_front, np.maximum(n_x, 0) * np.maximum(n_y, 0), 0)
    tri = np.repeat(np.arange(len(faces)), counts)
    k = np.arange(len(tri)) - np.repeat(np.cumsum(counts) - counts, counts)
    px = lo_x[tri] + k % n_x[tri]
    py = lo_y[tri] + k // n_x[tri]
    weights, inside = _edge_weights(x[tri], y[tri], px, py, faces[tri])
    tri, px, py, weights = tri[inside], px[inside], py[inside], weights[inside]
    inv_depth = (weights / depth[faces[tri]]).sum(axis=1)
    key = (1.0 / inv_depth).astype(np.float32).view(np.int32).astype(np.int64) << 32 | tri
    best = torch.from_numpy(np.full(size * size, _EMPTY, dtype=np.int64))
    best.scatter_reduce_(0, torch.from_numpy(py * size + px), torch.from_numpy(key), "amin")
    best = best.numpy().reshape(size, size)
    hit = best != _EMPTY
    face = np.where(hit, best & _LOW32, -1)
    z = np.where(hit, (best >> 32).astype(np.int32).view(np.float32), np.float32(np.inf))
    return Raster(face=face, depth=z)


def _edge_weights(x: np.ndarray, y: np.ndarray, px: np.ndarray, py: np.ndarray, corners: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(M, 3) triangle corner coordinates and vertex indices, (M,) points -> (M, 3) barycentric
    weights and (M,) inside flags (either winding; degenerate triangles are never inside).

    Each edge function is evaluated from its lower-indexed vertex, so the two triangles sharing an
    edge get exactly opposite values and no pixel centre on the edge falls through a crack.
    """
    weights = []
    for k in range(3):
        i, j = (k + 1) % 3, (k + 2) % 3
        swap = corners[:, i] > corners[:, j]
        ax, bx = np.where(swap, x[:, j], x[:, i]), np.where(swap, x[:, i], x[:, j])
        ay, by = np.where(swap, y[:, j], y[:, i]), np.where(swap, y[:, i], y[:, j])
        edge = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
        weights.append(np.where(swap, -edge, edge))
    w = np.stack(weights, axis=1)
    area = w.sum(axis=1)  # twice the signed area, whatever the point
    inside = (area != 0) & np.all(w * np.sign(area)[:, None] >= 0, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return w / area[:, None], inside


def interpolate(points: np.ndarray, faces: np.ndarray, face: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per-vertex (N, C) values at the pixel centres of a raster's visible triangles -> (S, S, C),
    0 where no triangle is visible (screen-space barycentrics: the triangles are pixel-sized)."""
    rows, cols = np.nonzero(face >= 0)
    tri = faces[face[rows, cols]]
    weights, _ = _edge_weights(points[tri, 0], points[tri, 1], cols.astype(np.float64), rows.astype(np.float64), tri)
    out = np.zeros(face.shape + (values.shape[1],), dtype=np.float32)
    out[rows, cols] = np.einsum("mk,mkc->mc", weights, values[tri])
    return out


# ----------------------------------------------------------------------------------------------
# backgrounds and occluders


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    colours = rng.uniform(0.0, 1.0, (2, 3))
    angle = rng.uniform(0.0, 2.0 * np.pi)
    grid = np.linspace(-1.0, 1.0, size)
    t = np.clip(0.5 + 0.5 * (np.cos(angle) * grid[None, :] + np.sin(angle) * grid[:, None]), 0.0, 1.0)
    return colours[0] + t[..., None] * (colours[1] - colours[0])


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    grid = rng.uniform(0.0, 1.0, (cells, cells, 3)).astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(grid[..., c], mode="F").resize((size, size), Image.BICUBIC))
                     for c in range(3)], axis=-1)


def _random_polygon(rng: np.random.Generator, size: int) -> list[tuple[float, float]]:
    centre = rng.uniform(0, size, 2)
    radius = rng.uniform(0.05, 0.3) * size
    angles = np.sort(rng.uniform(0.0, 2.0 * np.pi, rng.integers(3, 7)))
    return [(float(centre[0] + radius * np.cos(a)), float(centre[1] + radius * np.sin(a))) for a in angles]


def _shapes(rng: np.random.Generator, size: int) -> np.ndarray:
    canvas = Image.fromarray(np.round(_gradient(rng, size) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(*SHAPE_COUNT)):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 2:
            draw.polygon(_random_polygon(rng, size), fill=colour)
            continue
        corners = np.sort(rng.uniform(-0.1, 1.1, (2, 2)) * size, axis=0)
        box = [float(corners[0, 0]), float(corners[0, 1]), float(corners[1, 0]), float(corners[1, 1])]
        (draw.ellipse if kind == 0 else draw.rectangle)(box, fill=colour)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(S, S, 3) float32 in [0, 1]: a colour gradient, smooth colour noise or random shapes."""
    kind = BACKGROUND_KINDS[rng.integers(len(BACKGROUND_KINDS))]
    if kind == "gradient":
        image = _gradient(rng, size)
    elif kind == "noise":
        image = _smooth_noise(rng, size, int(rng.integers(*NOISE_GRID)))
        image = image + NOISE_DETAIL * (_smooth_noise(rng, size, 4 * NOISE_GRID[1]) - 0.5)
    else:
        image = _shapes(rng, size)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _rotated(points: np.ndarray, angle: float, centre: np.ndarray) -> list[tuple[float, float]]:
    c, s = np.cos(angle), np.sin(angle)
    moved = points @ np.array([[c, s], [-s, c]]) + centre
    return [(float(px), float(py)) for px, py in moved]


def _ellipse(radii, angle, centre) -> list[tuple[float, float]]:
    t = np.linspace(0.0, 2.0 * np.pi, ELLIPSE_POINTS, endpoint=False)
    return _rotated(np.stack([radii[0] * np.cos(t), radii[1] * np.sin(t)], axis=1), angle, centre)


Primitive = tuple  # ("polygon", points) or ("line", points, width): drawn on two layers alike


def _hand(rng: np.random.Generator, centre: np.ndarray, unit: float) -> list[Primitive]:
    """A hand-like blob: a palm with four fingers and a thumb, at one random orientation."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    parts: list[Primitive] = [("polygon", _ellipse(np.array([0.45, 0.55]) * unit, angle, centre))]
    width = max(1, int(round(0.22 * unit)))
    for k, length in enumerate(rng.uniform(0.65, 0.95, 4)):
        base = np.array([(-0.3 + 0.2 * k) * unit, -0.4 * unit])
        tip = base + np.array([0.05 * (k - 1.5) * unit, -length * unit])
        parts.append(("line", _rotated(np.stack([base, tip]), angle, centre), width))
    parts.append(("line", _rotated(np.array([[0.35, 0.0], [0.8, -0.35]]) * unit, angle, centre), width))
    return parts


def _occluder_shape(rng: np.random.Generator, kind: str, centre: np.ndarray, unit: float) -> list[Primitive]:
    angle = rng.uniform(0.0, np.pi)
    if kind == "rectangle":
        half = rng.uniform([0.5, 0.15], [1.3, 0.6]) * unit
        corners = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]) * half
        return [("polygon", _rotated(corners, angle, centre))]
    if kind == "ellipse":
        return [("polygon", _ellipse(rng.uniform(0.3, 0.9, 2) * unit, angle, centre))]
    return _hand(rng, centre, unit)


def _draw(draw: ImageDraw.ImageDraw, primitives: list[Primitive], fill) -> None:
    for primitive in primitives:
        if primitive[0] == "polygon":
            draw.polygon(primitive[1], fill=fill)
            continue
        points, width = primitive[1], primitive[2]
        draw.line(points, fill=fill, width=width)
        for px, py in points:  # round finger ends
            draw.ellipse([px - width / 2, py - width / 2, px + width / 2, py + width / 2], fill=fill)


def occluders(rng: np.random.Generator, size: int, landmarks: np.ndarray,
              probability: float = OCCLUDER_PROBABILITY) -> tuple[np.ndarray, np.ndarray] | None:
    """With ``probability``: (S, S) bool coverage and (S, S, 3) float32 colours of one or two
    occluders (rectangles, ellipses, hand-like blobs) placed over facial landmarks (x, row),
    sized by the inter-ocular distance; else None."""
    if rng.random() >= probability:
        return None
    unit = max(float(np.linalg.norm(landmarks[42:48].mean(axis=0) - landmarks[36:42].mean(axis=0))), 2.0)
    coverage = Image.new("L", (size, size), 0)
    colours = Image.new("RGB", (size, size), (0, 0, 0))
    n_occluders = 2 if rng.random() < SECOND_OCCLUDER_PROBABILITY else 1
    for _ in range(n_occluders):
        anchor = landmarks[OCCLUDER_ANCHORS[rng.integers(len(OCCLUDER_ANCHORS))]]
        centre = anchor + rng.uniform(-OCCLUDER_JITTER, OCCLUDER_JITTER, 2) * unit
        kind = OCCLUDER_KINDS[rng.integers(len(OCCLUDER_KINDS))]
        if kind == "hand":
            tone = np.array(SKIN_TONES[rng.integers(len(SKIN_TONES))]) * rng.uniform(0.8, 1.1)
        else:
            tone = rng.uniform(0.0, 1.0, 3)
        primitives = _occluder_shape(rng, kind, centre, unit)
        _draw(ImageDraw.Draw(coverage), primitives, 255)
        _draw(ImageDraw.Draw(colours), primitives, tuple(int(v) for v in np.clip(np.round(tone * 255), 0, 255)))
    return np.asarray(coverage) > 0, np.asarray(colours, dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------------------------
# rendering


def face_region(model: MorphableModel) -> np.ndarray:
    """(F,) bool: triangles whose three vertices are in the model's front region
    (`frontmask2_idx`), which leaves out the hair band and the outer border: the face mask."""
    front = np.zeros(model.n_vertices, dtype=bool)
    front[model.front_vertices.cpu().numpy()] = True
    return front[model.faces.cpu().numpy()].all(axis=1)


@dataclass
class _Context:
    """What every image of a run shares."""

    model: MorphableModel
    faces: np.ndarray  # (F, 3) int64
    keypoints: np.ndarray  # (68,) int64
    region: np.ndarray  # (F,) bool, `face_region`
    template5: np.ndarray  # (5, 2) crop pixels at CROP_SIZE
    seed: int
    image_size: int
    occluder_probability: float


def _context(model: MorphableModel, seed: int, image_size: int, occluder_probability: float) -> _Context:
    if image_size < 32:
        raise InputError(f"image_size must be at least 32 pixels, got {image_size}")
    if not 0.0 <= occluder_probability <= 1.0:
        raise InputError(f"occluder_probability must be in [0, 1], got {occluder_probability}")
    return _Context(model=model, faces=model.faces.cpu().numpy(), keypoints=model.keypoints.cpu().numpy(),
                    region=face_region(model), template5=template5_from_model(model, CROP_SIZE), seed=seed,
                    image_size=image_size, occluder_probability=occluder_probability)


def _landmark_visibility(points: np.ndarray, depth: np.ndarray, raster: Raster, covered: np.ndarray | None
                         ) -> np.ndarray:
    """(68,) bool: the landmark's pixel is inside the image, shows the surface it lies on (not one
    in front of it) and is not under an occluder."""
    size = raster.face.shape[0]
    cols, rows = np.round(points[:, 0]).astype(np.int64), np.round(points[:, 1]).astype(np.int64)
    inside = (cols >= 0) & (cols < size) & (rows >= 0) & (rows < size)
    cols, rows = np.clip(cols, 0, size - 1), np.clip(rows, 0, size - 1)
    visible = inside & (depth <= raster.depth[rows, cols] + VISIBILITY_SLACK)
    if covered is not None:
        visible &= ~covered[rows, cols]
    return visible


@dataclass
class _Faces:
    """A batch of formed faces as numpy arrays (converted once per batch, not per image)."""

    coeffs: np.ndarray  # (B, 257) float64
    points: np.ndarray  # (B, N, 2) float64 pixels (x, row)
    depth: np.ndarray  # (B, N) float64 camera depth
    colours: np.ndarray  # (B, N, 3) float32 shaded albedo in [0, 1]
    shape: np.ndarray  # (B, N, 3) float32 model space


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Form faces on one intra-op thread: the same arithmetic in the main process and in workers
    (so the images do not depend on the worker count), and this small memory-bound work ran about
    4x slower on two threads when the cores were shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _form_faces(ctx: _Context, coeffs: np.ndarray) -> _Faces:
    with torch.no_grad(), _one_torch_thread():
        rec = reconstruct(ctx.model, torch.as_tensor(coeffs).to(ctx.model.mean_shape), image_size=ctx.image_size)
    proj = rec.proj.cpu().numpy().astype(np.float64)
    points = np.stack([proj[..., 0], ctx.image_size - 1 - proj[..., 1]], axis=-1)  # OpenCV (x, row)
    return _Faces(coeffs=coeffs, points=points, depth=rec.vertices_cam[..., 2].cpu().numpy().astype(np.float64),
                  colours=np.clip(rec.color.cpu().numpy(), 0.0, 1.0).astype(np.float32),
                  shape=rec.shape.cpu().numpy().astype(np.float32))


def _render_one(ctx: _Context, faces: _Faces, b: int, index: int) -> WildRender:
    size = ctx.image_size
    _, scene_rng, occluder_rng = image_rngs(ctx.seed, index)
    points, depth = faces.points[b], faces.depth[b]
    raster = rasterize(points, depth, ctx.faces, size)
    hit = raster.face >= 0
    shaded = interpolate(points, ctx.faces, raster.face, faces.colours[b])
    image = np.where(hit[..., None], shaded, background(scene_rng, size))
    mask = hit & ctx.region[np.maximum(raster.face, 0)]
    landmarks = points[ctx.keypoints]
    occlusion = occluders(occluder_rng, size, landmarks, ctx.occluder_probability)
    covered = None
    if occlusion is not None:
        covered, occluder_colours = occlusion
        image = np.where(covered[..., None], occluder_colours, image)
        mask &= ~covered
    noise_std = scene_rng.uniform(*PIXEL_NOISE_STD)
    image = image + noise_std * scene_rng.standard_normal(image.shape, dtype=np.float32)
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    scale = size / cv.IMAGE_SIZE
    truth = WildTruth(
        coeffs=faces.coeffs[b],
        shape=faces.shape[b],
        image_size=size,
        focal=cv.FOCAL * scale,
        principal_point=cv.PRINCIPAL_POINT * scale,
        camera_distance=cv.CAMERA_DISTANCE,
        crop_transform=crop_transform(landmarks, ctx.template5, CROP_SIZE, RESCALE_FACTOR).as_array(),
        landmarks_visible=_landmark_visibility(landmarks, depth[ctx.keypoints], raster, covered),
        occluded=occlusion is not None,
    )
    sample = WildSample(name=f"{index:06d}", image=pixels, landmarks=landmarks, mask=mask)
    return WildRender(sample, truth)


def _render_batch(ctx: _Context, start: int, wanted: list[int]) -> list[WildRender]:
    """Renders of the images ``wanted`` of the batch starting at ``start`` (a multiple of BATCH);
    the faces of the whole batch are formed, so each image's arithmetic never depends on which
    others were asked for."""
    coeffs = np.stack([sample_coeffs(image_rngs(ctx.seed, i)[0], ctx.image_size) for i in range(start, start + BATCH)])
    faces = _form_faces(ctx, coeffs)
    return [_render_one(ctx, faces, i - start, i) for i in wanted]


def _renders(ctx: _Context, indices: Iterable[int]) -> Iterator[WildRender]:
    """Renders in the order of ``indices``, formed batch by batch."""
    indices = list(indices)
    pos = 0
    while pos < len(indices):
        start = indices[pos] // BATCH * BATCH
        end = pos
        while end < len(indices) and indices[end] // BATCH * BATCH == start:
            end += 1
        yield from _render_batch(ctx, start, indices[pos:end])
        pos = end


def render_wild(model: MorphableModel, indices: Iterable[int], *, seed: int = 0,
                image_size: int = DEFAULT_IMAGE_SIZE, occluder_probability: float = OCCLUDER_PROBABILITY
                ) -> list[WildRender]:
    """Render images ``indices`` of the synthetic set with ``seed``, in memory. Image i depends only
    on (model, seed, i, image_size, occluder_probability); `generate_wild` writes the same images."""
    if any(i < 0 for i in indices):
        raise InputError("image indices must be non-negative")
    return list(_renders(_context(model, seed, image_size, occluder_probability), indices))


# ----------------------------------------------------------------------------------------------
# ground truth on disk


def truth_path(root: str | Path, name: str) -> Path:
    return Path(root) / TRUTH_DIR / f"{name}.npz"


def write_truth(path: str | Path, truth: WildTruth) -> Path:
    """Write one image's ground truth as .npz (atomically)."""
    with atomic_open(path, "wb") as fh:
        np.savez(fh, coeffs=truth.coeffs, shape=truth.shape, image_size=truth.image_size, focal=truth.focal,
                 principal_point=truth.principal_point, camera_distance=truth.camera_distance,
                 crop_transform=truth.crop_transform, landmarks_visible=truth.landmarks_visible,
                 occluded=truth.occluded)
    return Path(path)


def read_truth(path: str | Path) -> WildTruth:
    """One image's ground truth; errors name the file."""
    path = Path(path)
    try:
        with np.load(path) as data:
            fields = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise FileFormatError(path, "missing ground-truth file") from None
    except (OSError, ValueError) as exc:
        raise FileFormatError(path, f"cannot read ground truth: {exc}") from None
    missing = [f for f in WildTruth.__dataclass_fields__ if f not in fields]
    if missing:
        raise FileFormatError(path, f"missing key(s) {', '.join(missing)}")
    if fields["coeffs"].shape != (cv.N_COEFFS,) or fields["shape"].ndim != 2 or fields["shape"].shape[1] != 3:
        raise FileFormatError(path, f"coeffs {fields['coeffs'].shape} / shape {fields['shape'].shape}, "
                                    f"expected ({cv.N_COEFFS},) / (N, 3)")
    return WildTruth(
        coeffs=fields["coeffs"], shape=fields["shape"], image_size=int(fields["image_size"]),
        focal=float(fields["focal"]), principal_point=float(fields["principal_point"]),
        camera_distance=float(fields["camera_distance"]), crop_transform=fields["crop_transform"],
        landmarks_visible=fields["landmarks_visible"].astype(bool), occluded=bool(fields["occluded"]),
    )


# ----------------------------------------------------------------------------------------------
# the generator


def _resolve_model(model: MorphableModel | str | Path | None, resolution: int | None, workdir: Path
                   ) -> tuple[MorphableModel, dict]:
    """The model to render and how generator.json describes it (a file, or SynthBFM's default)."""
    if isinstance(model, MorphableModel):
        return model, {"path": str(model.source) if model.source else None}
    if model is not None:
        return load_morphable_model(model), {"path": str(Path(model).resolve())}
    from facehd.synth.bfm import DEFAULT_RESOLUTION, write_synth_bfm

    resolution = DEFAULT_RESOLUTION if resolution is None else resolution
    path = write_synth_bfm(workdir / "BFM_model_front.mat", resolution, seed=0)
    return load_morphable_model(path), {"synth_bfm": {"resolution": resolution, "seed": 0}}


def _write_render(out: Path, render: WildRender, image_format: str) -> str:
    write_truth(truth_path(out, render.sample.name), render.truth)
    write_sample(out, render.sample, image_format=image_format)
    return render.sample.name


def _batches(n_images: int) -> list[tuple[int, list[int]]]:
    return [(start, list(range(start, min(start + BATCH, n_images)))) for start in range(0, n_images, BATCH)]


_WORKER: tuple[_Context, Path, str] | None = None  # set in each worker process by `_start_worker`


def _start_worker(model: MorphableModel, seed: int, image_size: int, occluder_probability: float, out: Path,
                  image_format: str) -> None:
    global _WORKER
    torch.set_num_threads(1)  # one process per core
    _WORKER = (_context(model, seed, image_size, occluder_probability), out, image_format)


def _worker_batch(batch: tuple[int, list[int]]) -> list[str]:
    ctx, out, image_format = _WORKER
    return [_write_render(out, render, image_format) for render in _render_batch(ctx, *batch)]


def _written_names(ctx: _Context, out: Path, n_images: int, image_format: str, workers: int) -> Iterator[str]:
    """Render and write every image, in index order, in this process or in ``workers`` processes
    (each image depends only on its index, so the files are the same either way)."""
    if workers <= 1:
        for render in _renders(ctx, range(n_images)):
            yield _write_render(out, render, image_format)
        return
    # spawn, not fork: forking a process whose OpenMP runtime has already run can hang the child
    pool = multiprocessing.get_context("spawn").Pool(
        workers, initializer=_start_worker,
        initargs=(ctx.model, ctx.seed, ctx.image_size, ctx.occluder_probability, out, image_format))
    with pool:
        for names in pool.imap(_worker_batch, _batches(n_images)):
            yield from names


def generate_wild(out: str | Path, n_images: int, *, model: MorphableModel | str | Path | None = None,
                  model_resolution: int | None = None, seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE,
                  image_format: str = "png", occluder_probability: float = OCCLUDER_PROBABILITY, workers: int = 1,
                  progress: Progress | None = None) -> WildSynthResult:
    """Write ``n_images`` synthetic in-the-wild images to ``out`` in the `facehd.wild` format, with
    list.txt, per-image ground truth in ``out/_truth/<name>.npz`` and ``out/_truth/generator.json``.

    ``model`` is a loaded model or a .mat path; None generates SynthBFM at ``model_resolution``
    (default: SynthBFM's) with seed 0. The same arguments give the same files whatever ``workers``
    (processes rendering in parallel; with more than one, call this under ``if __name__ ==
    "__main__":``, as for DataLoader workers), and the first k images do not depend on
    ``n_images``. ``progress``, if given, wraps the image iterable (e.g. `facehd.clitools.progress`).
    ``seconds`` in the result counts rendering and writing, not making or loading the model.
    """
    if n_images < 1:
        raise InputError(f"n_images must be at least 1, got {n_images}")
    if image_format not in ("png", "jpg"):
        raise InputError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}")
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="facehd-wild-") as workdir:
        model, model_info = _resolve_model(model, model_resolution, Path(workdir))
    ctx = _context(model, seed, image_size, occluder_probability)
    start = time.perf_counter()
    names: Iterable[str] = _written_names(ctx, out, n_images, image_format, min(workers, len(_batches(n_images))))
    if progress is not None:
        names = progress(names, total=n_images, desc="wild images")
    names = list(names)
    write_list(out, names)
    info = {
        "generator": GENERATOR_NAME, "version": GENERATOR_VERSION, "seed": seed, "images": n_images,
        "image_size": image_size, "image_format": image_format, "occluder_probability": occluder_probability,
        "model": model_info, "model_vertices": model.n_vertices, "crop_size": CROP_SIZE,
        "rescale_factor": RESCALE_FACTOR, "template5": ctx.template5.tolist(),
    }
    with atomic_open(out / TRUTH_DIR / GENERATOR_JSON) as fh:
        json.dump(info, fh, indent=2)
    return WildSynthResult(root=out, names=names, seconds=time.perf_counter() - start)
