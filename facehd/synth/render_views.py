"""The synthetic FaceHD-100 camera rig (9 calibrated OpenCV cameras in scan millimetres) and its
offscreen pyrender renderer (EGL): studio-lit images, depth, and 68-point landmark visibility."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from facehd.capture import Camera
from facehd.errors import FaceHDError
from facehd.procrustes import Similarity

# pyrender needs a platform before its first import; EGL renders offscreen without a display.
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")


class RenderError(FaceHDError):
    """Offscreen rendering is not available (no EGL / Mesa) or failed."""


# --- the rig ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RigView:
    """Where a camera of the rig sits, seen from the subject: yaw > 0 toward the subject's left
    (model +x), pitch > 0 above the face."""

    yaw_deg: float
    pitch_deg: float


# The supplement's 9-camera rig: frontal, left and right at about 30 and 60 degrees, above, below
# and two upper diagonals; cam<i> is RIG_VIEWS[i] (one per facehd.capture.CAMERA_NAMES).
RIG_VIEWS = (
    RigView(0.0, 0.0),
    RigView(-30.0, 0.0),
    RigView(30.0, 0.0),
    RigView(-60.0, 0.0),
    RigView(60.0, 0.0),
    RigView(0.0, 25.0),
    RigView(0.0, -25.0),
    RigView(-40.0, 20.0),
    RigView(40.0, 20.0),
)
CAMERA_DISTANCE_MM = (650.0, 750.0)  # camera to face centre, drawn per camera
FACE_HEIGHT_MM = 224.0  # SynthBFM's chin-to-hair-band height: the focal length frames this
FACE_FILL = 0.6  # ... to fill this fraction of the image height
FOCAL_JITTER = 0.02  # relative, per camera: lenses are not identical
PRINCIPAL_JITTER = 0.01  # of the image size, per camera
AIM_JITTER_MM = 5.0  # cameras are aimed by hand at the rig centre
ROLL_JITTER_DEG = 1.5
Z_NEAR_MM, Z_FAR_MM = 100.0, 3000.0

# --- studio lighting, in the rig frame (x: subject's left, y: up, z: toward the frontal camera) --
# (direction toward the light, intensity): a key light above the subject's right, a fill light on
# the left and a weak top light, plus ambient; a frontal normal receives about 1.0 in all. Shading
# is diffuse and computed per vertex of the dense true surface (about one vertex per pixel), so the
# wrinkles show; pyrender then rasterizes the shaded colours flat, which on llvmpipe is several
# times faster than its PBR shader.
STUDIO_LIGHTS = (
    ((-0.55, 0.45, 1.0), 0.6),
    ((0.7, 0.1, 1.0), 0.3),
    ((0.0, 1.0, -0.2), 0.2),
)
AMBIENT = 0.3
BACKGROUND_RGB = (70, 80, 96)  # a blue-grey backdrop, far from skin and hair colours
# A landmark is visible when the depth buffer within one pixel of its projection is this close to
# its own depth (the buffer steps by several mm per pixel on steep surfaces), and it faces the camera.
VISIBILITY_DEPTH_MM = 4.0


def _look_at(centre: np.ndarray, target: np.ndarray, roll: float) -> np.ndarray:
    """World-to-camera rotation (OpenCV: x right, y down, z forward) looking from centre to
    target with the world's +y up in the image, rolled by ``roll`` radians."""
    z = target - centre
    z = z / np.linalg.norm(z)
    x = np.cross(np.array([0.0, -1.0, 0.0]), z)
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    c, s = math.cos(roll), math.sin(roll)
    roll_matrix = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return roll_matrix @ np.stack([x, y, z])


def rig_cameras(target_mm: np.ndarray, image_size: int, rng: np.random.Generator) -> list[Camera]:
    """The 9 cameras of the rig in the rig frame (mm), aimed at ``target_mm`` (3,), square images."""
    cameras = []
    for view in RIG_VIEWS:
        yaw, pitch = math.radians(view.yaw_deg), math.radians(view.pitch_deg)
        distance = rng.uniform(*CAMERA_DISTANCE_MM)
        direction = np.array([math.sin(yaw) * math.cos(pitch), math.sin(pitch), math.cos(yaw) * math.cos(pitch)])
        centre = target_mm + distance * direction
        aim = target_mm + rng.normal(0.0, AIM_JITTER_MM, 3)
        R = _look_at(centre, aim, math.radians(rng.normal(0.0, ROLL_JITTER_DEG)))
        focal = FACE_FILL * image_size * distance / FACE_HEIGHT_MM * (1.0 + rng.normal(0.0, FOCAL_JITTER))
        principal = (image_size - 1) / 2.0 + rng.normal(0.0, PRINCIPAL_JITTER * image_size, 2)
        K = np.array([[focal, 0.0, principal[0]], [0.0, focal, principal[1]], [0.0, 0.0, 1.0]])
        cameras.append(Camera(K=K, R=R, t=-R @ centre, width=image_size, height=image_size))
    return cameras


def move_cameras(cameras: list[Camera], rig_to_world: Similarity) -> list[Camera]:
    """The same cameras with the world moved by a rigid ``rig_to_world`` (scale 1):
    x_cam = R x_rig + t = R Rw^T (x_world - tw) + t."""
    Rw, tw = rig_to_world.rotation, rig_to_world.translation
    return [Camera(K=c.K, R=c.R @ Rw.T, t=c.t - c.R @ Rw.T @ tw, width=c.width, height=c.height,
                   distortion=c.distortion) for c in cameras]


def studio_lights(rig_to_world: Similarity) -> list[tuple[np.ndarray, float]]:
    """(unit direction toward the light in world coordinates, intensity) of each studio light."""
    out = []
    for direction, intensity in STUDIO_LIGHTS:
        d = np.asarray(direction, dtype=np.float64)
        out.append((rig_to_world.rotation @ (d / np.linalg.norm(d)), intensity))
    return out


def shade(albedo: np.ndarray, normals: np.ndarray, lights: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """(N, 3) colours in [0, 1] of albedo (N, 3) under ambient plus directional ``lights``
    (Lambertian) at unit normals (N, 3)."""
    irradiance = np.full(len(normals), AMBIENT)
    for direction, intensity in lights:
        irradiance += intensity * np.clip(normals @ direction, 0.0, None)
    return np.clip(albedo * irradiance[:, None], 0.0, 1.0)


# --- rendering -------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class RenderMesh:
    """A mesh to render, in world millimetres: vertices (N, 3), faces (F, 3) counter-clockwise
    seen from outside (back faces are culled), shaded vertex colours (N, 3) in [0, 1]."""

    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray


@dataclass(frozen=True, eq=False)
class View:
    """One rendered view: rgb (H, W, 3) uint8, depth (H, W) float32 camera-frame z in mm (0 where
    the background shows)."""

    rgb: np.ndarray
    depth: np.ndarray


def opengl_pose(camera: Camera) -> np.ndarray:
    """(4, 4) camera-to-world pose in OpenGL's camera axes (looking along -z, y up) of an OpenCV
    world-to-camera calibration (looking along +z, y down): flip the camera's y and z axes."""
    pose = np.eye(4)
    pose[:3, :3] = camera.R.T
    pose[:3, 3] = camera.center_mm
    return pose @ np.diag([1.0, -1.0, -1.0, 1.0])


class ViewRenderer:
    """One pyrender `OffscreenRenderer` reused for every view of every capture (EGL, offscreen).

    Call `close` when done (or use it as a context manager).
    """

    def __init__(self, image_size: int):
        self.image_size = int(image_size)
        try:
            import pyrender

            self._renderer = pyrender.OffscreenRenderer(self.image_size, self.image_size)
        except Exception as exc:  # EGL / Mesa failures surface as many unrelated types
            raise RenderError(
                f"cannot initialise offscreen rendering with PYOPENGL_PLATFORM="
                f"{os.environ.get('PYOPENGL_PLATFORM')!r} ({type(exc).__name__}: {exc}); install the EGL/Mesa "
                "libraries (the set-up script does: libegl1, libgl1-mesa-dri) or set PYOPENGL_PLATFORM=egl"
            ) from exc
        self._pyrender = pyrender

    def __enter__(self) -> ViewRenderer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.delete()
            self._renderer = None

    def render(self, mesh: RenderMesh, cameras: list[Camera]) -> list[View]:
        """Render ``mesh`` from each camera (all of the renderer's image size, no distortion)."""
        pr = self._pyrender
        for camera in cameras:
            if (camera.width, camera.height) != (self.image_size, self.image_size):
                raise RenderError(f"camera is {camera.width}x{camera.height} but the renderer is "
                                  f"{self.image_size}x{self.image_size}")
        primitive = pr.Primitive(positions=mesh.vertices.astype(np.float32), color_0=mesh.colors.astype(np.float32),
                                 indices=mesh.faces.astype(np.uint32),
                                 material=pr.MetallicRoughnessMaterial(baseColorFactor=[1.0, 1.0, 1.0, 1.0]))
        scene = pr.Scene(bg_color=[c / 255.0 for c in BACKGROUND_RGB] + [1.0])
        scene.add(pr.Mesh([primitive]))
        views = []
        for camera in cameras:
            # pyrender's principal point counts from the image edge, OpenCV's from the first pixel centre.
            intrinsics = pr.IntrinsicsCamera(fx=camera.K[0, 0], fy=camera.K[1, 1], cx=camera.K[0, 2] + 0.5,
                                             cy=camera.K[1, 2] + 0.5, znear=Z_NEAR_MM, zfar=Z_FAR_MM)
            node = scene.add(intrinsics, pose=opengl_pose(camera))
            scene.main_camera_node = node
            try:
                rgb, depth = self._renderer.render(scene, flags=pr.RenderFlags.FLAT)
            except Exception as exc:
                raise RenderError(f"pyrender failed to render a view: {type(exc).__name__}: {exc}") from exc
            scene.remove_node(node)
            views.append(View(rgb=np.ascontiguousarray(rgb), depth=np.ascontiguousarray(depth)))
        return views


def landmark_visibility(camera: Camera, depth: np.ndarray, points_mm: np.ndarray,
                        normals: np.ndarray) -> np.ndarray:
    """(P, 3) image landmarks x, y (pixels) and visible (0 / 1) of world points (P, 3) mm.

    A point is visible when it projects inside the image, its surface normal (P, 3) faces the
    camera, and the depth buffer (H, W) mm of this camera's rendering shows the surface at the
    point's depth within one pixel of its projection (not hidden by, e.g., the nose).
    """
    pixels, z = camera.project(points_mm)
    inside = camera.inside_image(pixels) & (z > 0)
    facing = ((camera.center_mm - points_mm) * normals).sum(axis=1) > 0
    visible = np.zeros(len(points_mm), dtype=bool)
    height, width = depth.shape
    for i in np.flatnonzero(inside & facing):
        col, row = (int(round(v)) for v in pixels[i])
        window = depth[max(row - 1, 0):row + 2, max(col - 1, 0):col + 2]
        surface = window[window > 0]
        visible[i] = surface.size > 0 and np.abs(surface - z[i]).min() < VISIBILITY_DEPTH_MM
    return np.concatenate([pixels, visible[:, None].astype(np.float64)], axis=1)
