"""Preview images of a morphable model: the mean face, a profile and random faces with their 68
landmarks, ray-cast on the CPU (open3d) through the project's pinhole camera."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import open3d as o3d
import torch
from PIL import Image, ImageDraw

from facehd import conventions as cv
from facehd.errors import InputError
from facehd.fsutil import atomic_path
from facehd.morphable import MorphableModel, reconstruct

PREVIEW_SIZE = 256  # tile side in pixels; the camera's focal length scales from 224 pixels
BACKGROUND_RGB = (128, 128, 128)
# The camera frames a face at z = 0 to fill 224 pixels; the model's hair band and under-chin reach
# a little beyond, so the preview moves the face back (model units) to show all of it.
PREVIEW_DEPTH_OFFSET = -2.5
# SH lighting (gamma of one colour channel): a weaker ambient term than the default 0.8 DC plus a
# light from the front, slightly above and to the subject's right, so the relief shows.
PREVIEW_GAMMA_RGB = (-0.25, -0.06, 0.25, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0)
PROFILE_YAW = math.radians(75.0)  # turns the face toward the image's right
RANDOM_POSE_STD = 0.12  # radians, yaw and pitch of the random faces
RANDOM_EXP_STD = 0.7  # expression coefficients ~ N(0, this^2)
LANDMARK_RADIUS = 1.5  # pixels at 256^2, scaled with the tile size
LANDMARK7_RADIUS = 3.0
LANDMARK_RGB = (60, 230, 90)
LANDMARK7_RGB = (240, 40, 40)
OCCLUSION_SLACK = 0.01  # model units (1 mm): a landmark this close behind the surface is visible
CAPTION_HEIGHT = 16  # pixels above each tile for its caption
TILES_PER_ROW = 4
_NO_HIT = o3d.t.geometry.RaycastingScene.INVALID_ID


def _camera(size: int) -> tuple[float, float]:
    """Focal length and principal point (pixels) of the project's camera at ``size`` pixels."""
    scale = size / cv.IMAGE_SIZE
    return cv.FOCAL * scale, cv.PRINCIPAL_POINT * scale


def camera_rays(size: int) -> np.ndarray:
    """(size, size, 6) float32 rays (origin, unit direction) through each pixel of the camera on
    +z looking at the origin; pixel (row r, column c) has y-up coordinates (c, size - 1 - r),
    matching `facehd.morphable.project`."""
    focal, centre = _camera(size)
    cols, rows = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))
    y_up = size - 1 - rows
    directions = np.stack([(cols - centre) / focal, (y_up - centre) / focal,
                           -np.ones_like(cols)], axis=-1)
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    origins = np.broadcast_to(np.array([0.0, 0.0, cv.CAMERA_DISTANCE]), directions.shape)
    return np.concatenate([origins, directions], axis=-1).astype(np.float32)


def _scene(vertices: np.ndarray, faces: np.ndarray) -> o3d.t.geometry.RaycastingScene:
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(np.ascontiguousarray(vertices, dtype=np.float32)),
                        o3d.core.Tensor(np.ascontiguousarray(faces, dtype=np.uint32)))
    return scene


def _shade(scene, rays: np.ndarray, faces: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Colour per ray: barycentric interpolation of vertex colours on the first hit, else NaN."""
    hits = scene.cast_rays(o3d.core.Tensor(rays))
    prim = hits["primitive_ids"].numpy()
    bary_uv = hits["primitive_uvs"].numpy()
    out = np.full(prim.shape + (3,), np.nan, dtype=np.float32)
    hit = prim != _NO_HIT
    tri = faces[prim[hit]]
    u, v = bary_uv[hit, 0:1], bary_uv[hit, 1:2]
    out[hit] = (1.0 - u - v) * colors[tri[:, 0]] + u * colors[tri[:, 1]] + v * colors[tri[:, 2]]
    return out


def _visible(scene, points: np.ndarray) -> np.ndarray:
    """(K,) bool: whether each world-space point is the first surface the camera sees along its
    ray (within `OCCLUSION_SLACK`)."""
    origin = np.array([0.0, 0.0, cv.CAMERA_DISTANCE])
    offsets = points - origin
    distance = np.linalg.norm(offsets, axis=1)
    rays = np.concatenate([np.broadcast_to(origin, points.shape), offsets / distance[:, None]], axis=1)
    t_hit = scene.cast_rays(o3d.core.Tensor(rays.astype(np.float32)))["t_hit"].numpy()
    return t_hit >= distance - OCCLUSION_SLACK


def render_faces(model: MorphableModel, coeffs: torch.Tensor, size: int = PREVIEW_SIZE,
                 *, background: tuple[int, int, int] = BACKGROUND_RGB) -> np.ndarray:
    """(B, 257) coefficients -> (B, size, size, 3) uint8 images of the shaded faces.

    Visibility from open3d ray casting (first hit per pixel through the project's camera, focal
    length scaled to ``size``); the colour is `reconstruct`'s per-vertex albedo x SH shading,
    interpolated with the hit's barycentrics. Not differentiable: a preview, not a renderer.
    """
    images, _ = _render(model, coeffs, size, background)
    return images


def _render(model, coeffs, size, background):
    """Images, plus the (B, 68, 2) y-up landmark pixels and (B, 68) landmark visibility."""
    if coeffs.ndim != 2 or coeffs.shape[1] != cv.N_COEFFS:
        raise InputError(f"coefficients have shape {tuple(coeffs.shape)}, expected (B, {cv.N_COEFFS})")
    with torch.no_grad():
        rec = reconstruct(model, coeffs.to(model.mean_shape), image_size=size)
    vertices = rec.vertices.cpu().numpy()
    colors = rec.color.clamp(0.0, 1.0).cpu().numpy()
    faces = model.faces.cpu().numpy()
    keypoints = model.keypoints.cpu().numpy()
    rays = camera_rays(size)
    images, visible = [], []
    for b in range(len(vertices)):
        scene = _scene(vertices[b], faces)
        shaded = _shade(scene, rays, faces, colors[b])
        image = np.where(np.isnan(shaded), np.array(background) / 255.0, shaded)
        images.append(np.round(image * 255.0).astype(np.uint8))
        visible.append(_visible(scene, vertices[b, keypoints]))
    return np.stack(images), (rec.landmarks.cpu().numpy(), np.stack(visible))


def draw_landmarks(image: np.ndarray, landmarks: np.ndarray, visible: np.ndarray | None = None
                   ) -> np.ndarray:
    """(H, W, 3) uint8 image, (68, 2) pixel coordinates with y up -> a copy with the landmarks as
    dots, the 7 alignment landmarks larger and red; landmarks flagged not visible are skipped."""
    size = image.shape[0]
    scale = size / PREVIEW_SIZE
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    highlight = set(cv.LANDMARKS7_IBUG)
    order = [i for i in range(len(landmarks)) if i not in highlight] + sorted(highlight)
    for i in order:
        if visible is not None and not visible[i]:
            continue
        col, row = landmarks[i, 0], size - 1 - landmarks[i, 1]
        radius = (LANDMARK7_RADIUS if i in highlight else LANDMARK_RADIUS) * scale
        colour = LANDMARK7_RGB if i in highlight else LANDMARK_RGB
        draw.ellipse([col - radius, row - radius, col + radius, row + radius], fill=colour)
    return np.asarray(canvas)


def preview_coeffs(n_random: int = 5, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """(2 + n_random, 257) coefficients and captions: the mean face, its profile, then random
    faces (id and texture coefficients ~ N(0, 1), expression ~ N(0, RANDOM_EXP_STD^2), small
    random yaw and pitch), all lit by `PREVIEW_GAMMA_RGB` and moved back by
    `PREVIEW_DEPTH_OFFSET`."""
    rng = np.random.default_rng(seed)
    s = cv.COEFF_SLICES
    coeffs = np.zeros((2 + n_random, cv.N_COEFFS))
    coeffs[:, s["gamma"]] = np.tile(PREVIEW_GAMMA_RGB, 3)
    coeffs[:, s["trans"]] = (0.0, 0.0, PREVIEW_DEPTH_OFFSET)
    coeffs[1, s["angle"]] = (0.0, PROFILE_YAW, 0.0)
    random = coeffs[2:]
    random[:, s["id"]] = rng.standard_normal((n_random, cv.N_ID))
    random[:, s["exp"]] = RANDOM_EXP_STD * rng.standard_normal((n_random, cv.N_EXP))
    random[:, s["tex"]] = rng.standard_normal((n_random, cv.N_TEX))
    random[:, s["angle"]][:, :2] = RANDOM_POSE_STD * rng.standard_normal((n_random, 2))
    captions = ["mean", "mean, profile"] + [f"random {i + 1}" for i in range(n_random)]
    return torch.as_tensor(coeffs), captions


def preview_image(model: MorphableModel, n_random: int = 5, seed: int = 0,
                  size: int = PREVIEW_SIZE) -> np.ndarray:
    """(H, W, 3) uint8 grid of captioned tiles: mean face, profile, ``n_random`` random faces,
    each with its visible landmarks."""
    coeffs, captions = preview_coeffs(n_random, seed)
    images, (landmarks, visible) = _render(model, coeffs, size, BACKGROUND_RGB)
    n_cols = min(TILES_PER_ROW, len(images))
    n_rows = math.ceil(len(images) / n_cols)
    tile_h = size + CAPTION_HEIGHT
    grid = Image.new("RGB", (n_cols * size, n_rows * tile_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k, (image, caption) in enumerate(zip(images, captions)):
        left, top = (k % n_cols) * size, (k // n_cols) * tile_h
        grid.paste(Image.fromarray(draw_landmarks(image, landmarks[k], visible[k])),
                   (left, top + CAPTION_HEIGHT))
        draw.text((left + 4, top + 2), caption, fill=(0, 0, 0))
    return np.asarray(grid)


def write_preview(model: MorphableModel, path: str | Path, n_random: int = 5, seed: int = 0,
                  size: int = PREVIEW_SIZE) -> Path:
    """Write `preview_image` as a PNG at ``path`` (atomically); returns the path."""
    path = Path(path)
    image = preview_image(model, n_random=n_random, seed=seed, size=size)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path
