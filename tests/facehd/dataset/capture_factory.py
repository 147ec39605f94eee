"""Tiny valid FaceHD-100 captures for the dataset tests: a bumpy ellipsoid face patch in mm seen by
9 small cameras, with landmarks that agree with the cameras, and helpers that break one thing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from facehd.capture import (
    CAMERA_NAMES,
    LANDMARKS7_TXT,
    SUBJECT_COLUMNS,
    Camera,
    CaptureRef,
    capture_paths,
    write_cameras,
    write_landmarks7,
    write_landmarks68,
    write_subjects,
)
from facehd.conventions import LANDMARKS7_IBUG, N_LANDMARKS
from facehd.io import Mesh, save_mesh

IMAGE_WIDTH, IMAGE_HEIGHT = 64, 48  # pixels
FOCAL_PX = 100.0  # a 190 mm face at 600 mm is about 32 px tall
CAMERA_DISTANCE_MM = 600.0
AZIMUTHS_DEG = (-35.0, 0.0, 35.0)
ELEVATIONS_DEG = (-15.0, 0.0, 15.0)
SEMI_AXES_MM = (75.0, 95.0, 55.0)  # half width, half height, depth: a face-sized patch
GRID = 24  # scan vertices per side: 576 vertices, 1058 faces
THETA_RANGE = 1.3  # radians either side of the front, around the vertical axis
PHI_RANGE = 1.1  # radians above and below the equator

# (theta, phi) of the 7 alignment landmarks on the surface, in iBUG order 36,39,42,45,33,48,54.
# The subject's right side is world -x, which the frontal camera shows on the image's left.
LANDMARK7_ANGLES = (
    (-0.65, 0.27), (-0.2, 0.27), (0.2, 0.27), (0.65, 0.27), (0.0, -0.2), (-0.33, -0.45), (0.33, -0.45),
)

SUBJECTS = (
    ("S001", "female", 24, "asian"),
    ("S002", "male", 31, "asian"),
    ("S003", "female", 19, "white"),
    ("S004", "male", 27, "black"),
)


def face_surface(theta: np.ndarray, phi: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Points (..., 3) mm on a bumpy ellipsoid facing +z, with a nose bump."""
    theta, phi = np.asarray(theta, float), np.asarray(phi, float)
    radius = 1.0 + 0.03 * np.sin(5 * theta) * np.sin(4 * phi)
    nose = 0.35 * np.exp(-(theta**2 + (phi + 0.05) ** 2) / 0.02)
    a, b, c = (scale * s for s in SEMI_AXES_MM)
    x = a * radius * np.cos(phi) * np.sin(theta)
    y = b * radius * np.sin(phi)
    z = c * (radius + nose) * np.cos(phi) * np.cos(theta)
    return np.stack([x, y, z], axis=-1)


def landmark_angles() -> np.ndarray:
    """(68, 2) (theta, phi) of the 68 landmarks: the 7 alignment points where they belong, the
    rest on a grid over the face."""
    i = np.arange(N_LANDMARKS)
    angles = np.stack([-0.9 + 1.8 * (i % 17) / 16, -0.6 + 0.3 * (i // 17)], axis=1)
    angles[list(LANDMARKS7_IBUG)] = LANDMARK7_ANGLES
    return angles


def scan_mesh(scale: float = 1.0) -> Mesh:
    """The face patch as a GRID x GRID mesh in mm with vertex colours."""
    theta, phi = np.meshgrid(np.linspace(-THETA_RANGE, THETA_RANGE, GRID), np.linspace(PHI_RANGE, -PHI_RANGE, GRID))
    vertices = face_surface(theta, phi, scale).reshape(-1, 3)
    r, c = np.meshgrid(np.arange(GRID - 1), np.arange(GRID - 1), indexing="ij")
    a = (r * GRID + c).ravel()
    faces = np.concatenate([np.stack([a, a + GRID, a + 1], 1), np.stack([a + 1, a + GRID, a + GRID + 1], 1)])
    colors = np.tile([0.8, 0.6, 0.5], (len(vertices), 1))
    return Mesh(vertices, faces, colors=colors, metadata={"units": "mm"})


def look_at_camera(azimuth_deg: float, elevation_deg: float) -> Camera:
    """A camera CAMERA_DISTANCE_MM from the origin looking at it, world y up (OpenCV axes)."""
    az, el = np.radians(azimuth_deg), np.radians(elevation_deg)
    center = CAMERA_DISTANCE_MM * np.array([np.sin(az) * np.cos(el), np.sin(el), np.cos(az) * np.cos(el)])
    forward = -center / np.linalg.norm(center)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    R = np.stack([right, down, forward])
    K = [[FOCAL_PX, 0.0, (IMAGE_WIDTH - 1) / 2], [0.0, FOCAL_PX, (IMAGE_HEIGHT - 1) / 2], [0.0, 0.0, 1.0]]
    return Camera(K=K, R=R, t=-R @ center, width=IMAGE_WIDTH, height=IMAGE_HEIGHT)


def rig_cameras() -> dict[str, Camera]:
    """The 9 cameras: a 3 x 3 grid of azimuths and elevations."""
    views = [(az, el) for el in ELEVATIONS_DEG for az in AZIMUTHS_DEG]
    return {name: look_at_camera(az, el) for name, (az, el) in zip(CAMERA_NAMES, views)}


def render_points(camera: Camera, points_mm: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: a grey gradient with the projected points splatted in skin colour."""
    h, w = camera.height, camera.width
    image = np.empty((h, w, 3), np.uint8)
    image[:] = (40 + 80 * np.arange(h) / h).astype(np.uint8)[:, None, None]
    pixels, depth = camera.project(points_mm)
    ok = (depth > 0) & camera.inside_image(pixels)
    cols, rows = np.round(pixels[ok]).astype(int).T
    image[np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)] = (205, 155, 130)
    return image


def make_capture(
    root: str | Path,
    subject: str = "S001",
    expression: str = "neutral",
    *,
    image_suffix: str = ".jpg",
    with_landmarks68: bool = True,
    scale: float = 1.0,
) -> CaptureRef:
    """Write one valid capture under ``root``; ``scale`` varies the face size between subjects."""
    ref = CaptureRef(Path(root), subject, expression)
    paths = capture_paths(ref.directory)
    mesh = scan_mesh(scale)
    cameras = rig_cameras()
    points68 = face_surface(*landmark_angles().T, scale)
    paths.directory.mkdir(parents=True, exist_ok=True)
    save_mesh(paths.scan, mesh)
    write_cameras(paths.cameras, cameras)
    write_landmarks7(paths.landmarks7, points68[list(LANDMARKS7_IBUG)])
    for i, (name, camera) in enumerate(cameras.items()):
        image_path = paths.directory / "images" / f"{name}{image_suffix}"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_points(camera, mesh.vertices)).save(image_path)
        if with_landmarks68:
            pixels, _ = camera.project(points68)
            write_landmarks68(paths.landmarks68[i], pixels)
    return ref


def make_dataset(
    root: str | Path,
    subjects=SUBJECTS,
    expressions: tuple[str, ...] = ("neutral", "smile"),
    **capture_options,
) -> Path:
    """A valid dataset: subjects.csv and one capture per subject and expression."""
    root = Path(root)
    write_subjects(root / "subjects.csv", [dict(zip(SUBJECT_COLUMNS, s)) for s in subjects])
    for k, (sid, *_rest) in enumerate(subjects):
        for expression in expressions:
            make_capture(root, sid, expression, scale=1.0 + 0.02 * (k % 5), **capture_options)
    return root


def many_subjects(n: int) -> tuple[tuple[str, str, int, str], ...]:
    """``n`` subject rows with ids S001.. and cycling demographics."""
    genders = ("female", "male")
    ethnicities = ("asian", "asian", "asian", "white", "black")
    return tuple((f"S{i + 1:03d}", genders[i % 2], 18 + (i * 7) % 17, ethnicities[i % 5]) for i in range(n))


# --- ways to break a capture --------------------------------------------------------------------


def truncate(path: Path, keep_fraction: float = 0.5) -> None:
    """Cut a file to a fraction of its bytes, as an interrupted copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def write_ascii_ply(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    """A plain ASCII PLY written by hand, so it can hold values `Mesh` refuses (NaN)."""
    lines = ["ply", "format ascii 1.0", f"element vertex {len(vertices)}", "property float x", "property float y",
             "property float z", f"element face {len(faces)}", "property list uchar int vertex_indices", "end_header"]
    lines += [" ".join(f"{v:.6f}" if np.isfinite(v) else "nan" for v in row) for row in vertices]
    lines += [f"3 {a} {b} {c}" for a, b, c in faces]
    path.write_text("\n".join(lines) + "\n")


def put_nans_in_scan(ref: CaptureRef, count: int = 3) -> None:
    mesh = scan_mesh()
    vertices = mesh.vertices.copy()
    vertices[:count, 1] = np.nan
    write_ascii_ply(ref.paths.scan, vertices, mesh.faces)


def scan_in_metres(ref: CaptureRef) -> None:
    mesh = scan_mesh()
    save_mesh(ref.paths.scan, Mesh(mesh.vertices / 1000.0, mesh.faces))


def drop_a_landmark(ref: CaptureRef) -> None:
    path = ref.directory / LANDMARKS7_TXT
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:6]))
