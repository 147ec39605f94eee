"""Videos for the synthetic MICC stand-in: each subject's true surface rendered as one short video per
MICC setting (cooperative: near-frontal, evenly lit; PTZ indoor: head turns; PTZ outdoor: hard light,
low resolution), written as H.264 MP4 with the 68 landmarks of every frame beside it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from facehd import conventions as cv
from facehd.distance import vertex_normals_np
from facehd.errors import InputError
from facehd.fsutil import atomic_open

if TYPE_CHECKING:
    from benchmarks.synthetic import SyntheticSubject
    from facehd.morphable import MorphableModel

VIDEO_DIR = "Video"  # MICC Florence: subject_XX/Video/<setting>.mjpg
VIDEO_SUFFIX = ".mp4"
LANDMARKS_SUFFIX = "_landmarks.npy"  # <video stem>_landmarks.npy: (frames, 68, 2) pixels (x, row), NaN: no face
FRAMES_PER_VIDEO = 12
FPS = 6
TEX_STD, TEX_CLIP = 1.0, 2.0  # albedo coefficients ~ N(0, 1) clipped, as facehd.synth.wild
# x264 quality: visually lossless at these sizes, as a decent camera's stream (the real MICC videos
# are MJPEG, also lossy)
X264_CRF = 18


@dataclass(frozen=True)
class FrameSetting:
    """How one MICC setting is filmed. Head pose over the video: yaw(t) = yaw_deg sin(2 pi t / T +
    phase), pitch(t) = pitch_deg sin(4 pi t / T + phase'), T the video length; light: ambient +
    one directional light (direction toward the light in the camera frame: x right, y up, z toward
    the camera), Lambertian, so a strong light leaves the turned-away side dark."""

    size: int  # frame side, pixels (square frames)
    face_fraction: float  # pixels per model unit at the head's origin, as a fraction of the side
    yaw_deg: float
    pitch_deg: float
    ambient: float
    directional: float
    light_direction: tuple[float, float, float]
    pixel_noise: float  # standard deviation of the sensor noise, in [0, 1] colour units
    jitter_fraction: float  # the head's image position wanders by up to this much of the side


# A face is ~2.2 model units tall (chin to hair band), so face_fraction 0.3 fills ~65 % of the side.
MICC_FRAME_SETTINGS = {
    "Indoor-Cooperative": FrameSetting(size=224, face_fraction=0.30, yaw_deg=8.0, pitch_deg=4.0, ambient=0.85,
                                       directional=0.15, light_direction=(0.0, 0.3, 1.0), pixel_noise=1.0 / 255,
                                       jitter_fraction=0.02),
    "PTZ-Indoor": FrameSetting(size=192, face_fraction=0.24, yaw_deg=50.0, pitch_deg=10.0, ambient=0.65,
                               directional=0.35, light_direction=(0.0, 1.0, 0.6), pixel_noise=2.0 / 255,
                               jitter_fraction=0.06),
    "PTZ-Outdoor": FrameSetting(size=112, face_fraction=0.26, yaw_deg=25.0, pitch_deg=6.0, ambient=0.25,
                                directional=0.95, light_direction=(0.8, 0.7, 0.45), pixel_noise=3.0 / 255,
                                jitter_fraction=0.05),
}


def frames_parameters() -> dict:
    """Everything the videos depend on (part of the synthetic benchmark's cache key)."""
    return {"frames_per_video": FRAMES_PER_VIDEO, "fps": FPS, "tex": [TEX_STD, TEX_CLIP], "crf": X264_CRF,
            "settings": {k: vars(v) for k, v in MICC_FRAME_SETTINGS.items()}}


def video_path(subject_dir: Path, setting: str) -> Path:
    return Path(subject_dir) / VIDEO_DIR / f"{setting}{VIDEO_SUFFIX}"


def landmarks_path(video: Path) -> Path:
    return video.with_name(video.stem + LANDMARKS_SUFFIX)


# ----------------------------------------------------------------------------------------------
# rendering


@dataclass(frozen=True)
class Video:
    frames: np.ndarray  # (T, S, S, 3) uint8
    landmarks: np.ndarray  # (T, 68, 2) pixels (x, row) of the model's keypoints on the true surface
    yaw_deg: np.ndarray  # (T,) the head's yaw in each frame (for tests and inspection)


def _rotation(pitch: float, yaw: float, roll: float) -> np.ndarray:
    """R = Rz Ry Rx, as `facehd.morphable.rotation_matrix` (radians)."""
    cx, sx, cy, sy, cz, sz = np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw), np.cos(roll), np.sin(roll)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _dense_surface(model: MorphableModel, subject: SyntheticSubject) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The subject's true surface as the scan has it (model frame, model units) with the albedo
    interpolated onto it: (vertices (M, 3), faces (G, 3), albedo per unit tex coefficient basis)."""
    from benchmarks.synthetic import subdivide_midpoint

    faces = model.faces.cpu().numpy().astype(np.int64)
    mean = model.mean_shape.detach().cpu().numpy().astype(np.float64)
    edges_list = []
    vertices, dense_faces = mean, faces
    while len(vertices) < len(subject.scan_vertices_mm):
        vertices, dense_faces, edges = subdivide_midpoint(vertices, dense_faces)
        edges_list.append(edges)
    if not np.array_equal(dense_faces, subject.scan_faces):
        raise InputError("the subject's scan is not a subdivision of this model's mesh")
    return subject.scan_vertices_mm / cv.MM_PER_MODEL_UNIT, dense_faces, edges_list


def _albedo(model: MorphableModel, rng: np.random.Generator, edges_list) -> np.ndarray:
    tex = np.clip(TEX_STD * rng.standard_normal(cv.N_TEX), -TEX_CLIP, TEX_CLIP)
    base = model.tex_base.detach().cpu().numpy().astype(np.float64)
    mean = model.mean_tex.detach().cpu().numpy().astype(np.float64).reshape(-1)
    albedo = np.clip((base @ tex + mean).reshape(-1, 3) / 255.0, 0.0, 1.0)
    for edges in edges_list:
        albedo = np.concatenate([albedo, albedo[edges].mean(axis=1)])
    return albedo


def render_video(model: MorphableModel, subject: SyntheticSubject, setting: str, rng: np.random.Generator, *,
                 n_frames: int = FRAMES_PER_VIDEO) -> Video:
    """The frames of one setting's video of ``subject`` and the 68 landmarks in each frame.

    The true surface (shape, mid-frequency field and fine detail, as the scan) with a random albedo
    of the model's texture basis turns its head along the setting's path in front of a static
    background (`facehd.synth.wild.background`), seen by the project's pinhole camera (focal 1015 at
    224 pixels, scaled to the frame); the landmarks are the projected keypoint vertices.
    """
    import torch

    from facehd.synth.wild import background, interpolate, rasterize

    spec = MICC_FRAME_SETTINGS[setting]
    size = spec.size
    vertices, faces, edges_list = _dense_surface(model, subject)
    albedo = _albedo(model, rng, edges_list)
    normals = vertex_normals_np(vertices, faces)
    keypoints = model.keypoints.cpu().numpy()
    light = np.asarray(spec.light_direction, dtype=np.float64)
    light /= np.linalg.norm(light)
    focal = cv.FOCAL * size / cv.IMAGE_SIZE
    centre = cv.PRINCIPAL_POINT * size / cv.IMAGE_SIZE
    depth = focal / (spec.face_fraction * size)  # camera to the head's origin, model units
    backdrop = background(rng, size)
    phases = rng.uniform(0.0, 2 * np.pi, 4)
    t = np.arange(n_frames) / n_frames
    yaw = np.radians(spec.yaw_deg) * np.sin(2 * np.pi * t + phases[0])
    pitch = np.radians(spec.pitch_deg) * np.sin(4 * np.pi * t + phases[1])
    wander = spec.jitter_fraction * size * np.stack([np.sin(2 * np.pi * t + phases[2]),
                                                     np.sin(2 * np.pi * t + phases[3])], axis=1)
    frames = np.empty((n_frames, size, size, 3), dtype=np.uint8)
    landmarks = np.empty((n_frames, cv.N_LANDMARKS, 2))
    with torch.no_grad():
        for i in range(n_frames):
            rotation = _rotation(pitch[i], yaw[i], 0.0)
            posed = vertices @ rotation.T
            cam_z = depth - posed[:, 2]  # the head's origin `depth` in front of the camera
            x = focal * (posed[:, 0] + wander[i, 0] * depth / focal) / cam_z + centre
            y = focal * (posed[:, 1] + wander[i, 1] * depth / focal) / cam_z + centre
            points = np.stack([x, size - 1 - y], axis=1)  # (x, row)
            shade = spec.ambient + spec.directional * np.clip((normals @ rotation.T) @ light, 0.0, None)
            colours = (albedo * shade[:, None]).astype(np.float32)
            raster = rasterize(points, cam_z, faces, size)
            image = np.where((raster.face >= 0)[..., None], interpolate(points, faces, raster.face, colours), backdrop)
            image = image + spec.pixel_noise * rng.standard_normal(image.shape)
            frames[i] = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
            landmarks[i] = points[keypoints]
    return Video(frames, landmarks, np.degrees(yaw))


# ----------------------------------------------------------------------------------------------
# files


def write_video(path: str | Path, frames: np.ndarray, fps: int = FPS) -> Path:
    """(T, H, W, 3) uint8 -> an H.264 MP4 (yuv420p; H and W even), written under a temporary name
    and renamed."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.part{path.suffix}")
    try:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps, options={"crf": str(X264_CRF)})
            stream.height, stream.width = frames.shape[1:3]
            stream.pix_fmt = "yuv420p"
            stream.codec_context.thread_count = 1
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
            container.mux(stream.encode(None))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_landmarks(path: str | Path, landmarks: np.ndarray) -> Path:
    """(T, 68, 2) per-frame landmarks as .npy (float64 pixels, x right, row down; NaN: no face)."""
    with atomic_open(path, "wb") as fh:
        np.save(fh, np.asarray(landmarks, dtype=np.float64))
    return Path(path)


def write_subject_videos(subject_dir: str | Path, model: MorphableModel, subject: SyntheticSubject, seed: int,
                         settings=tuple(MICC_FRAME_SETTINGS)) -> list[Path]:
    """subject_XX/Video/<setting>.mp4 and <setting>_landmarks.npy for each setting; deterministic in
    (model, subject, seed) and independent of every other file of the benchmark."""
    written = []
    for k, setting in enumerate(settings):
        rng = np.random.default_rng([seed, subject.index, 3, k])
        video = render_video(model, subject, setting, rng)
        path = write_video(video_path(Path(subject_dir), setting), video.frames)
        written += [path, write_landmarks(landmarks_path(path), video.landmarks)]
    return written
