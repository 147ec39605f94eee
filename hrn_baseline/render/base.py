"""The rasterizer interface shared by the back ends: `Fragments`, `Rasterizer`, and the clip-space
barycentrics that make every back end differentiable w.r.t. vertex positions the way nvdiffrast is."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from facehd.errors import InputError

BACKGROUND = -1  # face_index of pixels that no triangle covers


@dataclass(frozen=True, eq=False)
class Fragments:
    """What a rasterizer found at every pixel centre. Images are row-major, row 0 at the top.

    Pixel (row r, column c) has its centre at projected coordinates x = c, y = H - 1 - r (y up),
    the landmark convention of `facehd.morphable.project`; in normalized device coordinates
    (NDC) that is x = (2c + 1) / W - 1, y = 1 - (2r + 1) / H.

    Attributes:
        face_index: (B, H, W) int64 index of the nearest triangle, -1 on the background.
        bary: (B, H, W, 3) perspective-correct barycentric weights of the triangle's vertices
            ``faces[f, 0], faces[f, 1], faces[f, 2]``; differentiable w.r.t. the clip-space
            vertex positions; 0 on the background.
        depth: (B, H, W) clip-space w at the pixel, the distance along the optical axis
            (z_cam of `facehd.morphable.to_camera` for the project's camera, larger = farther);
            differentiable; 0 on the background.
        mask: (B, H, W) bool, True where a triangle covers the pixel centre.
        raw: a back end's own buffer for its fast paths (nvdiffrast's ``rast_out``), or None.
    """

    face_index: torch.Tensor
    bary: torch.Tensor
    depth: torch.Tensor
    mask: torch.Tensor
    raw: torch.Tensor | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the image."""
        return (int(self.face_index.shape[1]), int(self.face_index.shape[2]))


class Rasterizer(abc.ABC):
    """A rasterizer back end: visibility without gradients, barycentrics with gradients.

    Back ends only implement `rasterize`; `interpolate` and `texture` have pure-PyTorch
    implementations here that work on the fragments of any back end (a back end may override
    them with faster kernels that compute the same thing).
    """

    name: str = "abstract"

    @abc.abstractmethod
    def rasterize(self, vertices_clip: torch.Tensor, faces: torch.Tensor, size) -> Fragments:
        """Rasterize triangles given in clip space.

        Args:
            vertices_clip: (B, N, 4) homogeneous clip-space positions (x, y, z, w), OpenGL
                convention: visible points have -w <= x, y, z <= w; NDC y points up.
            faces: (F, 3) int64 vertex indices.
            size: (H, W) of the image, or one int for a square image.
        """

    def interpolate(self, attrs: torch.Tensor, fragments: Fragments, faces: torch.Tensor) -> torch.Tensor:
        """(B, N, C) or (N, C) per-vertex attributes -> (B, H, W, C) interpolated, 0 on the background.

        Differentiable w.r.t. ``attrs`` and, through the barycentrics, the vertex positions.
        """
        return interpolate_attributes(attrs, fragments, faces)

    def texture(self, tex: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
        """Bilinear texture lookup: (B or 1, C, Ht, Wt) texture, (B, H, W, 2) UVs -> (B, H, W, C).

        UVs follow the project's convention (`facehd.uv`): texel (r, c) has its centre at
        u = (c + 0.5) / Wt, v = 1 - (r + 0.5) / Ht; outside [0, 1] the border texels repeat.
        Background pixels sample wherever their UVs point: multiply by ``fragments.mask``.
        """
        return sample_texture(tex, uv)


# ----------------------------------------------------------------------------------------------
# helpers shared by the back ends


def image_size(size) -> tuple[int, int]:
    """An int or an (H, W) pair -> (H, W), checked to be positive."""
    h, w = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if h <= 0 or w <= 0:
        raise InputError(f"image size must be positive, got {size!r}")
    return h, w


def check_mesh(vertices_clip: torch.Tensor, faces: torch.Tensor) -> None:
    """Raise `InputError` unless the inputs are (B, N, 4) floating positions and (F, 3) indices into them."""
    if vertices_clip.ndim != 3 or vertices_clip.shape[-1] != 4 or not vertices_clip.is_floating_point():
        raise InputError(f"clip-space vertices must be a floating (B, N, 4) tensor, got "
                         f"{tuple(vertices_clip.shape)} {vertices_clip.dtype}")
    if faces.ndim != 2 or faces.shape[-1] != 3 or faces.is_floating_point():
        raise InputError(f"faces must be an integer (F, 3) tensor, got {tuple(faces.shape)} {faces.dtype}")
    n = vertices_clip.shape[1]
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= n):
        raise InputError(f"faces index vertices in [{int(faces.min())}, {int(faces.max())}], "
                         f"but there are {n} vertices")


def pixel_centres_ndc(rows: torch.Tensor, cols: torch.Tensor, size: tuple[int, int], dtype) -> tuple:
    """NDC (x, y) of the centres of pixels (row, col); row 0 is the top of the image."""
    h, w = size
    x = (2 * cols.to(dtype) + 1) / w - 1
    y = 1 - (2 * rows.to(dtype) + 1) / h
    return x, y


def face_corners(face_index: torch.Tensor, faces: torch.Tensor, n_vertices: int) -> list[torch.Tensor]:
    """(B, H, W) face indices -> three (B * H * W,) rows of each pixel's triangle corners in the
    flattened (B * N) vertex array; background pixels point at vertex 0 of their batch item."""
    b = face_index.shape[0]
    f = face_index.clamp(min=0).reshape(b, -1)
    item = (torch.arange(b, device=f.device) * n_vertices)[:, None]
    return [(faces[:, k].index_select(0, f.reshape(-1)).reshape(b, -1) + item).reshape(-1) for k in range(3)]


def clip_barycentrics(vertices_clip: torch.Tensor, faces: torch.Tensor, face_index: torch.Tensor):
    """Differentiable barycentrics and depth of the triangles named by ``face_index``.

    nvdiffrast's formula (its forward pixel shader and its backward kernel), in PyTorch: with
    the pixel centre f = (fx, fy) in NDC and p_i' = (x_i - fx w_i, y_i - fy w_i), the edge
    functions a_0 = p_1' x p_2', a_1 = p_2' x p_0', a_2 = p_0' x p_1' equal w_0 w_1 w_2
    lambda_i / w_i up to a common factor, where lambda_i are the screen-space barycentrics of f;
    so b_i = a_i / sum(a) = (lambda_i / w_i) / sum_j (lambda_j / w_j) are the perspective-correct
    barycentrics. As in nvdiffrast, the forward values are clamped into the triangle (b >= 0,
    b_0 + b_1 <= 1, which only moves pixels on edges by rounding) while the gradient is that of
    the unclamped formula, and nothing flows through the choice of triangle (silhouettes).

    Args:
        vertices_clip: (B, N, 4); faces: (F, 3); face_index: (B, H, W) int64, -1 = background.

    Returns:
        bary (B, H, W, 3) and depth (B, H, W) = interpolated w, both 0 on the background.
    """
    b, h, w = face_index.shape
    corners = face_corners(face_index, faces, vertices_clip.shape[1])
    flat = vertices_clip.reshape(-1, 4)
    p = [flat.index_select(0, c).unbind(-1) for c in corners]  # per corner (x, y, z, w), each (B*H*W,)
    rows = torch.arange(h, device=face_index.device).repeat_interleave(w).repeat(b)
    cols = torch.arange(w, device=face_index.device).repeat(b * h)
    fx, fy = pixel_centres_ndc(rows, cols, (h, w), vertices_clip.dtype)
    px = [q[0] - fx * q[3] for q in p]
    py = [q[1] - fy * q[3] for q in p]
    a = [px[1] * py[2] - py[1] * px[2], px[2] * py[0] - py[2] * px[0], px[0] * py[1] - py[0] * px[1]]
    total = a[0] + a[1] + a[2]
    # a hit triangle has non-zero area; the guard only keeps a degenerate one from making NaNs
    total = torch.where(total == 0, torch.ones_like(total), total)
    inside = (face_index >= 0).reshape(-1).to(vertices_clip.dtype)
    exact = torch.stack([a[0] / total, a[1] / total, a[2] / total], dim=-1) * inside[:, None]
    bary = exact + (_clamp_into_triangle(exact) * inside[:, None] - exact).detach()
    depth = bary[:, 0] * p[0][3] + bary[:, 1] * p[1][3] + bary[:, 2] * p[2][3]
    return bary.reshape(b, h, w, 3), depth.reshape(b, h, w)


def _clamp_into_triangle(bary: torch.Tensor) -> torch.Tensor:
    """nvdiffrast's clamp: b_0, b_1 into [0, 1], their sum to at most 1, b_2 = 1 - b_0 - b_1."""
    b0, b1 = bary[:, 0].clamp(0, 1), bary[:, 1].clamp(0, 1)
    scale = 1 / (b0 + b1).clamp(min=1)
    b0, b1 = b0 * scale, b1 * scale
    return torch.stack([b0, b1, 1 - b0 - b1], dim=-1)


def interpolate_attributes(attrs: torch.Tensor, fragments: Fragments, faces: torch.Tensor) -> torch.Tensor:
    """(B, N, C) or (N, C) attributes -> (B, H, W, C) barycentric interpolation, 0 on the background."""
    b, h, w = fragments.face_index.shape
    if attrs.ndim == 2:
        attrs = attrs.expand(b, *attrs.shape)
    if attrs.ndim != 3 or attrs.shape[0] != b:
        raise InputError(f"attributes must be (B, N, C) with B = {b}, or (N, C); got {tuple(attrs.shape)}")
    n, c = attrs.shape[1:]
    corners = face_corners(fragments.face_index, faces, n)
    flat = attrs.reshape(-1, c)
    weights = fragments.bary.reshape(-1, 3).to(attrs.dtype)  # 0 on the background
    out = sum(flat.index_select(0, corner) * weights[:, k, None] for k, corner in enumerate(corners))
    return out.reshape(b, h, w, c)


def check_texture_args(tex: torch.Tensor, uv: torch.Tensor) -> None:
    """Raise `InputError` unless ``tex`` is (B or 1, C, Ht, Wt) and ``uv`` is (B, H, W, 2)."""
    if tex.ndim != 4 or uv.ndim != 4 or uv.shape[-1] != 2:
        raise InputError(f"texture must be (B, C, Ht, Wt) and uv (B, H, W, 2); got {tuple(tex.shape)} "
                         f"and {tuple(uv.shape)}")
    if tex.shape[0] not in (1, uv.shape[0]):
        raise InputError(f"texture batch {tex.shape[0]} does not match the uv batch {uv.shape[0]}")


def sample_texture(tex: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup with `grid_sample`; see `Rasterizer.texture` for the conventions."""
    check_texture_args(tex, uv)
    tex = tex.expand(uv.shape[0], *tex.shape[1:])
    # grid_sample's (-1, -1) is the top-left corner of the first texel (align_corners=False), and
    # its y runs down the rows, while v runs up: row (1 - v) Ht
    grid = torch.stack([2 * uv[..., 0] - 1, 1 - 2 * uv[..., 1]], dim=-1).to(tex.dtype)
    out = F.grid_sample(tex, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.permute(0, 2, 3, 1)
