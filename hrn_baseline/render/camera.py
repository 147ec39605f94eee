"""The project's camera for rasterizers (DESIGN.md section 3): its OpenGL projection matrix, and
`render_mesh`, which renders camera-frame vertices so pixels line up with `facehd.morphable.project`."""

from __future__ import annotations

from typing import NamedTuple

import torch

from facehd import conventions as cv
from facehd.errors import InputError
from hrn_baseline.render.backends import default_rasterizer
from hrn_baseline.render.base import Fragments, Rasterizer, image_size


class Rendered(NamedTuple):
    """What `render_mesh` returns; unpacks as ``image, mask, fragments``."""

    image: torch.Tensor  # (B, H, W, C) interpolated attributes, 0 on the background, row 0 on top
    mask: torch.Tensor  # (B, H, W) bool
    fragments: Fragments


def camera_intrinsics(size, focal: float | None = None, center=None) -> tuple[float, float, float]:
    """(focal, cx, cy) in pixels for an (H, W) image; defaults scale the 224-pixel convention.

    ``center`` is one value for both axes or an (x, y) pair, in projected pixel coordinates
    (y up), like `facehd.morphable.project`.
    """
    h, w = image_size(size)
    scale = w / cv.IMAGE_SIZE
    focal = cv.FOCAL * scale if focal is None else float(focal)
    if center is None:
        cx, cy = cv.PRINCIPAL_POINT * w / cv.IMAGE_SIZE, cv.PRINCIPAL_POINT * h / cv.IMAGE_SIZE
    elif isinstance(center, (int, float)):
        cx = cy = float(center)
    else:
        cx, cy = (float(c) for c in center)
    return focal, cx, cy


def perspective_projection(size=cv.IMAGE_SIZE, focal: float | None = None, center=None, *,
                           near: float = cv.Z_NEAR, far: float = cv.Z_FAR,
                           dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """(4, 4) OpenGL projection matrix of the project's pinhole camera, for column vectors.

    It maps view space (camera looking down -z, so view z = z - 10 for the project's camera at
    z = 10 and z_view = -z_cam) to clip space, with w = -z_view = z_cam. Normalized device
    coordinates are x_ndc = 2 (x_pix + 0.5) / W - 1 with x_pix = f x / z_cam + cx the projected
    pixel coordinate of `facehd.morphable.project` (likewise y, up), so a point projected to
    integer (x, y) lands on the centre of pixel (row H - 1 - y, column x), which is where the
    landmark convention puts it. (Deep3DFaceRecon's nvdiffrast matrix omits the half-pixel
    term, shifting its renders half a pixel from its own landmarks.) Depth maps [near, far]
    to NDC z in [-1, 1]. With the defaults the vertical field of view is 2 atan(112 / 1015) =
    12.594 degrees.
    """
    h, w = image_size(size)
    f, cx, cy = camera_intrinsics((h, w), focal, center)
    if not 0 < near < far:
        raise InputError(f"need 0 < near < far, got near {near}, far {far}")
    m = torch.zeros(4, 4, dtype=dtype or torch.get_default_dtype(), device=device)
    m[0, 0] = 2 * f / w
    m[0, 2] = 1 - 2 * (cx + 0.5) / w
    m[1, 1] = 2 * f / h
    m[1, 2] = 1 - 2 * (cy + 0.5) / h
    m[2, 2] = -(far + near) / (far - near)
    m[2, 3] = -2 * far * near / (far - near)
    m[3, 2] = -1
    return m


def camera_to_clip(vertices_cam: torch.Tensor, size=cv.IMAGE_SIZE, focal: float | None = None, center=None, *,
                   near: float = cv.Z_NEAR, far: float = cv.Z_FAR) -> torch.Tensor:
    """(B, N, 3) camera-frame points (`facehd.morphable.to_camera`: z = distance in front of
    the camera) -> (B, N, 4) clip-space positions through `perspective_projection`."""
    if vertices_cam.ndim != 3 or vertices_cam.shape[-1] != 3:
        raise InputError(f"camera-frame vertices must be (B, N, 3), got {tuple(vertices_cam.shape)}")
    proj = perspective_projection(size, focal, center, near=near, far=far,
                                  dtype=vertices_cam.dtype, device=vertices_cam.device)
    view = torch.cat([vertices_cam[..., :2], -vertices_cam[..., 2:], torch.ones_like(vertices_cam[..., :1])], -1)
    return view @ proj.T


def render_mesh(vertices_cam: torch.Tensor, faces: torch.Tensor, attrs: torch.Tensor, size=cv.IMAGE_SIZE,
                focal: float | None = None, center=None, *, rasterizer: Rasterizer | None = None) -> Rendered:
    """Render per-vertex attributes of meshes seen by the project's camera.

    Args:
        vertices_cam: (B, N, 3) camera-frame vertices (`Reconstruction.vertices_cam`).
        faces: (F, 3) int64.
        attrs: (B, N, C) or (N, C) per-vertex attributes (colours, normals, UVs, ...).
        size: int or (H, W); ``focal`` and ``center`` default to the 224-pixel convention
            (f = 1015, c = 112) scaled to the width, as in `facehd.morphable.reconstruct`.
        rasterizer: a back end; None picks `default_rasterizer` for the vertices' device.

    Returns:
        `Rendered` (image (B, H, W, C), mask (B, H, W), fragments), row 0 at the top of the
        image: a vertex projected to (x, y) by `facehd.morphable.project` appears at row
        H - 1 - y, column x. ``fragments.depth`` is z_cam (larger = farther).
    """
    if rasterizer is None:
        rasterizer = default_rasterizer(vertices_cam.device)
    clip = camera_to_clip(vertices_cam, size, focal, center)
    faces = faces.to(vertices_cam.device)
    fragments = rasterizer.rasterize(clip, faces, size)
    image = rasterizer.interpolate(attrs, fragments, faces)
    return Rendered(image=image, mask=fragments.mask, fragments=fragments)
