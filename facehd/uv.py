"""UV-space tools: rasterize a mesh into UV maps, sample maps at vertex UVs, build UV-grid meshes.

Convention (DESIGN.md section 3): texel (r, c) of an H x W map has its centre at
u = (c + 0.5) / W, v = 1 - (r + 0.5) / H; maps are channels-first, (C, H, W) or (B, C, H, W).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from facehd.errors import FileFormatError, InputError

# A texel centre this close to a triangle (in texels) counts as covered, so centres on shared
# edges and vertices are covered despite rounding: float32 UVs at 1024^2 are off by up to ~6e-5
# texels, so a barycentric slack like 1e-7 would drop centres at float32 vertices.
COVER_EPS_TEXELS = 1e-3
# UVs may stray this far outside [0, 1] (float noise, seams padded outward); parts outside the
# map are clipped. Anything further is a bug in the caller's UVs, not a layout choice.
UV_RANGE_SLACK = 1e-2
# Triangles with a smaller doubled area in texel units are degenerate and never cover a texel.
_MIN_AREA_TEXELS = 1e-12
# (triangle, texel) candidates processed at once: keeps the temporaries to a few hundred MB.
_CHUNK_CANDIDATES = 1 << 20


def read_uv_file(path: str | Path, n_vertices: int) -> np.ndarray:
    """Per-vertex UVs for a model file without a `uv` field (BFM09's `BFM_model_front.mat`; HRN
    ships them as `bfm_uvs2.npy`, 35,709 x 2): an (N, 2) .npy -> (N, 2) float64, checked against
    the model's `n_vertices`."""
    path = Path(path)
    try:
        uv = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise FileFormatError(path, f"not a readable .npy file of UVs: {exc}") from None
    if uv.shape != (n_vertices, 2) or not np.issubdtype(uv.dtype, np.number) or not np.isfinite(uv).all():
        raise FileFormatError(path, f"UVs have shape {uv.shape}, expected finite ({n_vertices}, 2) "
                                    f"for a model of {n_vertices} vertices")
    return uv.astype(np.float64)


@dataclass(frozen=True, eq=False)
class UVRaster:
    """Which triangle covers each texel centre of a UV map, and where inside it.

    Depends only on (uvs, faces, size): compute it once with :func:`uv_rasterize` and reuse it.

    Attributes:
        face_index: (H, W) int64, index of the covering face, -1 where no face covers the texel.
        bary: (H, W, 3) barycentric weights of the texel centre in that face (0 where empty);
            non-negative and summing to 1 on covered texels.
        mask: (H, W) bool, True where a face covers the texel.
        num_vertices: N of the mesh it was made from, to check later calls against.
        num_faces: F of that mesh.
    """

    face_index: torch.Tensor
    bary: torch.Tensor
    mask: torch.Tensor
    num_vertices: int
    num_faces: int

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the map."""
        return (int(self.face_index.shape[0]), int(self.face_index.shape[1]))

    def to(self, device=None, dtype: torch.dtype | None = None) -> UVRaster:
        """Return a copy on ``device``; ``dtype`` applies to the barycentric weights only."""
        return UVRaster(
            face_index=self.face_index.to(device=device),
            bary=self.bary.to(device=device, dtype=dtype),
            mask=self.mask.to(device=device),
            num_vertices=self.num_vertices,
            num_faces=self.num_faces,
        )


def uv_rasterize(uvs, faces, size) -> UVRaster:
    """Rasterize a mesh in UV space: the covering face and barycentrics of every texel centre.

    Each triangle only visits the texel centres inside its bounding box (vectorized in chunks),
    so the cost grows with the covered area, not with texels x faces. A face covers a texel
    centre that lies inside it or within ``COVER_EPS_TEXELS`` of it, so centres on shared edges
    and vertices are covered despite rounding. Where several faces cover a centre, faces that
    contain it beat faces that only graze it, then the largest face index wins (deterministic,
    and in UV fold-overs the later face is on top).

    Args:
        uvs: (N, 2) per-vertex UVs in [0, 1]^2 (tensor or array-like).
        faces: (F, 3) integer vertex indices.
        size: (H, W) of the map, or one int for a square map.

    Returns:
        :class:`UVRaster` on the device of ``uvs``; its ``bary`` has the dtype of ``uvs`` when
        that is floating point, else the default dtype.
    """
    uvs, faces = _check_mesh(uvs, faces)
    height, width = _check_size(size)
    device = uvs.device
    out_dtype = uvs.dtype if uvs.is_floating_point() else torch.get_default_dtype()

    # Texel coordinates in float64 so edge tests are exact up to ~1e-16, whatever the input dtype:
    # x is the column and y the row whose texel centre sits at that integer.
    uv64 = uvs.to(torch.float64)
    px = torch.stack([uv64[:, 0] * width - 0.5, (1.0 - uv64[:, 1]) * height - 0.5], dim=-1)
    tri = px[faces]  # (F, 3, 2)

    lo = torch.ceil(tri.amin(dim=1) - COVER_EPS_TEXELS).clamp(min=0).to(torch.int64)
    hi = torch.floor(tri.amax(dim=1) + COVER_EPS_TEXELS).to(torch.int64)
    hi[:, 0].clamp_(max=width - 1)
    hi[:, 1].clamp_(max=height - 1)
    box = (hi - lo + 1).clamp(min=0)  # (F, 2) columns, rows
    counts = box[:, 0] * box[:, 1]
    area = _edge(tri[:, 0], tri[:, 1], tri[:, 2])
    counts[area.abs() <= _MIN_AREA_TEXELS] = 0
    # Lengths of the edges opposite each corner, turning barycentrics into distances in texels.
    edge_len = (tri[:, [2, 0, 1]] - tri[:, [1, 2, 0]]).norm(dim=-1)

    # Priority of a candidate: faces containing the centre outrank faces that only graze it, so
    # a grazing neighbour never replaces the exact interpolant; then the largest index wins.
    num_faces = faces.shape[0]
    best = torch.full((height * width,), -1, dtype=torch.int64, device=device)
    bary_map = torch.zeros(height * width, 3, dtype=torch.float64, device=device)
    for first, last in _chunks(counts):
        texel, face, contains, bary = _covered_candidates(
            tri, area, edge_len, lo, box, counts, first, last, width
        )
        key = face + contains * num_faces
        best.scatter_reduce_(0, texel, key, reduce="amax")
        # Keys are unique per texel, so exactly one candidate writes each texel whose best key
        # changed; texels a later chunk outranks are simply written again.
        keep = best[texel] == key
        bary_map[texel[keep]] = bary[keep]
    face_index = torch.where(best >= num_faces, best - num_faces, best)

    return UVRaster(
        face_index=face_index.view(height, width),
        bary=bary_map.view(height, width, 3).to(out_dtype),
        mask=(best >= 0).view(height, width),
        num_vertices=int(uvs.shape[0]),
        num_faces=int(faces.shape[0]),
    )


def rasterize_attributes(attrs, uvs, faces, size, raster: UVRaster | None = None):
    """Interpolate per-vertex attributes into UV maps (barycentric, empty texels 0).

    A gather and a weighted sum, so it is differentiable w.r.t. ``attrs``. Pass a precomputed
    ``raster`` (from :func:`uv_rasterize` on the same uvs, faces and size) to skip rasterizing.

    Args:
        attrs: (B, N, C) or (N, C) per-vertex attributes.
        uvs: (N, 2) per-vertex UVs in [0, 1]^2.
        faces: (F, 3) integer vertex indices.
        size: (H, W) of the maps, or one int for a square map.
        raster: optional :class:`UVRaster` of this mesh at this size.

    Returns:
        maps: (B, C, H, W), or (C, H, W) for unbatched ``attrs``; dtype and device of ``attrs``.
        mask: (H, W) bool, True on texels covered by the mesh.
    """
    attrs = torch.as_tensor(attrs)
    if attrs.ndim not in (2, 3):
        raise InputError(f"attrs must have shape (B, N, C) or (N, C), got {tuple(attrs.shape)}")
    if not attrs.is_floating_point():
        raise InputError(f"attrs must be floating point, got {attrs.dtype}")
    faces = torch.as_tensor(faces, device=attrs.device)
    if raster is None:
        raster = uv_rasterize(uvs, faces, size)
    else:
        _check_raster(raster, faces, size)
    if attrs.shape[-2] != raster.num_vertices:
        raise InputError(
            f"attrs has {attrs.shape[-2]} vertices but the mesh has {raster.num_vertices}"
        )

    batched = attrs.ndim == 3
    values = attrs if batched else attrs.unsqueeze(0)
    raster = raster.to(device=attrs.device, dtype=attrs.dtype)
    height, width = raster.size
    batch, num_vertices, channels = values.shape
    if raster.num_faces == 0:
        maps = values.new_zeros(batch, channels, height, width)
        return (maps if batched else maps[0]), raster.mask
    corners = faces.to(torch.int64)[raster.face_index.clamp(min=0)]  # (H, W, 3); empty -> face 0
    # Gathering rows of an (N, B*C) matrix is several times faster than gathering along the last
    # axis of (B, C, N), forwards and backwards.
    rows = values.permute(1, 0, 2).reshape(num_vertices, batch * channels)
    per_corner = rows.index_select(0, corners.reshape(-1)).view(height * width, 3, -1)
    maps = raster.bary.view(height * width, 1, 3) @ per_corner  # (H*W, 1, B*C)
    # Empty texels have zero weights already; `where` also keeps NaNs of face 0 out of them.
    maps = torch.where(raster.mask.view(-1, 1, 1), maps, maps.new_zeros(()))
    maps = maps.view(height, width, batch, channels).permute(2, 3, 0, 1).contiguous()
    return (maps if batched else maps[0]), raster.mask


def sample_uv_map(maps: torch.Tensor, uvs: torch.Tensor) -> torch.Tensor:
    """Sample UV maps bilinearly at UV coordinates (texel-centre convention, border padding).

    Sampling exactly at a texel centre returns that texel. Differentiable w.r.t. ``maps`` and
    ``uvs``.

    Args:
        maps: (B, C, H, W) or (C, H, W) UV maps.
        uvs: (N, 2) UVs shared by the batch, or (B, N, 2) per-item UVs.

    Returns:
        (B, N, C), or (N, C) when both inputs are unbatched; dtype of ``maps``.
    """
    if not torch.is_tensor(maps) or maps.ndim not in (3, 4):
        raise InputError(f"maps must be a (B, C, H, W) or (C, H, W) tensor, got {_shape(maps)}")
    uvs = torch.as_tensor(uvs, device=maps.device)
    if uvs.ndim not in (2, 3) or uvs.shape[-1] != 2:
        raise InputError(f"uvs must have shape (N, 2) or (B, N, 2), got {tuple(uvs.shape)}")
    unbatched = maps.ndim == 3 and uvs.ndim == 2
    if maps.ndim == 3:
        maps = maps.unsqueeze(0)
    batch = maps.shape[0]
    if uvs.ndim == 3:
        if batch == 1 and uvs.shape[0] > 1:
            maps = maps.expand(uvs.shape[0], -1, -1, -1)
        elif uvs.shape[0] != batch:
            raise InputError(f"uvs batch {uvs.shape[0]} does not match maps batch {batch}")
    else:
        uvs = uvs.unsqueeze(0).expand(batch, -1, -1)

    uvs = uvs.to(maps.dtype)
    # grid_sample's (x, y) in [-1, 1] span the outer texel edges with align_corners=False;
    # y runs down the rows, so v is flipped.
    grid = torch.stack([2.0 * uvs[..., 0] - 1.0, 1.0 - 2.0 * uvs[..., 1]], dim=-1).unsqueeze(1)
    out = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out.squeeze(2).transpose(1, 2)  # (B, N, C)
    return out[0] if unbatched else out


def uv_grid_mesh(
    height: int,
    width: int,
    *,
    mask=None,
    compact: bool = False,
    dtype: torch.dtype | None = None,
    device=None,
):
    """The dense mesh of a UV map: one vertex per texel centre, two triangles per grid cell.

    Vertex ``r * W + c`` sits at texel (r, c)'s centre. Laid out with x = u and y = v, every
    triangle is counter-clockwise (normal +z), and no triangle wraps from one row to the next:
    a full grid has exactly 2 (H - 1)(W - 1) faces.

    Args:
        height, width: map size H, W (at least 2 each).
        mask: optional (H, W) bool texel mask; a triangle is kept when its 3 vertices are valid
            (so cells with one invalid corner keep their other triangle).
        compact: drop vertices that no kept face uses and renumber the faces.
        dtype, device: of the returned UVs (default dtype, CPU by default).

    Returns:
        uvs: (H * W, 2) UVs, or (K, 2) when ``compact``.
        faces: (M, 3) int64 vertex indices.
        vertex_index: only when ``compact``: (K,) int64 grid index (r * W + c) of each kept vertex.
    """
    height, width = _check_size((height, width))
    if height < 2 or width < 2:
        raise InputError(f"a UV grid mesh needs at least 2 x 2 texels, got {height} x {width}")
    dtype = dtype or torch.get_default_dtype()
    rows = torch.arange(height, dtype=dtype, device=device)
    cols = torch.arange(width, dtype=dtype, device=device)
    v, u = torch.meshgrid(1.0 - (rows + 0.5) / height, (cols + 0.5) / width, indexing="ij")
    uvs = torch.stack([u.reshape(-1), v.reshape(-1)], dim=-1)

    # Cell corners: top-left, top-right, bottom-left, bottom-right (rows grow downwards, v up).
    index = torch.arange(height * width, device=device).view(height, width)
    tl, tr = index[:-1, :-1].reshape(-1), index[:-1, 1:].reshape(-1)
    bl, br = index[1:, :-1].reshape(-1), index[1:, 1:].reshape(-1)
    faces = torch.cat([torch.stack([tl, bl, br], -1), torch.stack([tl, br, tr], -1)])

    if mask is not None:
        mask = torch.as_tensor(mask, device=device)
        if mask.shape != (height, width) or mask.dtype != torch.bool:
            raise InputError(
                f"mask must be a ({height}, {width}) bool array, got {mask.dtype} {_shape(mask)}"
            )
        faces = faces[mask.reshape(-1)[faces].all(dim=1)]
    if not compact:
        return uvs, faces
    vertex_index, faces = torch.unique(faces, return_inverse=True)
    return uvs[vertex_index], faces, vertex_index


def dense_positions_from_map(
    position_map: torch.Tensor,
    normal_map: torch.Tensor,
    displacement_map: torch.Tensor,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """Vertices of the dense UV-grid mesh: coarse position plus displacement along the normal.

    The inputs are the coarse mesh's positions and normals rasterized to the displacement map's
    grid (e.g. with :func:`rasterize_attributes`); vertex ``r * W + c`` matches
    :func:`uv_grid_mesh`. Differentiable w.r.t. every input.

    Args:
        position_map: (B, 3, H, W) coarse positions.
        normal_map: (B, 3, H, W) coarse normals.
        displacement_map: (B, 1, H, W) scalar offsets along the normal.
        normalize: rescale normals to unit length first; barycentric interpolation shortens them.
            Empty texels (zero normals) stay at their position.

    Returns:
        (B, H * W, 3) dense vertex positions.
    """
    if position_map.ndim != 4 or position_map.shape[1] != 3:
        raise InputError(f"position_map must be (B, 3, H, W), got {tuple(position_map.shape)}")
    if normal_map.shape != position_map.shape:
        raise InputError(
            f"normal_map shape {tuple(normal_map.shape)} does not match position_map "
            f"{tuple(position_map.shape)}"
        )
    expected = (position_map.shape[0], 1, *position_map.shape[2:])
    if tuple(displacement_map.shape) != expected:
        raise InputError(
            f"displacement_map must be {expected}, got {tuple(displacement_map.shape)}"
        )
    if normalize:
        normal_map = F.normalize(normal_map, dim=1)
    dense = position_map + displacement_map * normal_map
    return dense.flatten(2).transpose(1, 2)


# --- internals -----------------------------------------------------------------------------


def _edge(a: torch.Tensor, b: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Twice the signed area of (a, b, p); (..., 2) inputs."""
    return (b[..., 0] - a[..., 0]) * (p[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (
        p[..., 0] - a[..., 0]
    )


def _chunks(counts: torch.Tensor):
    """Yield [first, last) face ranges holding about `_CHUNK_CANDIDATES` candidates each."""
    ends = torch.cumsum(counts, 0).cpu()
    first, done = 0, 0
    while first < len(ends):
        last = int(torch.searchsorted(ends, done + _CHUNK_CANDIDATES, right=True))
        last = max(last, first + 1)  # a face bigger than a chunk gets a chunk of its own
        yield first, last
        first, done = last, int(ends[last - 1])


def _covered_candidates(tri, area, edge_len, lo, box, counts, first, last, width):
    """Texel centres in the bounding boxes of faces [first, last) that the faces cover.

    Returns flat texel indices, face indices, whether the face strictly contains the centre
    (int64 0/1) and the (clamped, renormalized) barycentrics.
    """
    face_counts = counts[first:last]
    faces = torch.arange(first, last, device=tri.device).repeat_interleave(face_counts)
    starts = torch.cumsum(face_counts, 0) - face_counts
    local = torch.arange(faces.shape[0], device=tri.device) - starts.repeat_interleave(face_counts)
    box_w = box[faces, 0]
    col = lo[faces, 0] + local % box_w
    row = lo[faces, 1] + local // box_w
    p = torch.stack([col, row], dim=-1).to(tri.dtype)
    a, b, c = tri[faces, 0], tri[faces, 1], tri[faces, 2]
    bary = torch.stack([_edge(b, c, p), _edge(c, a, p), _edge(a, b, p)], dim=-1)
    bary = bary / area[faces, None]
    # bary_i * area / |opposite edge| is the signed distance to that edge in texels.
    distance = bary * (area[faces, None].abs() / edge_len[faces])
    nearest = distance.amin(dim=-1)
    inside = nearest >= -COVER_EPS_TEXELS
    contains = (nearest[inside] >= 0).to(torch.int64)
    # Grazed texels sit slightly outside; clamp so weights stay a convex combination.
    bary = bary[inside].clamp(min=0)
    bary = bary / bary.sum(dim=-1, keepdim=True)
    return (row * width + col)[inside], faces[inside], contains, bary


def _check_mesh(uvs, faces) -> tuple[torch.Tensor, torch.Tensor]:
    uvs = torch.as_tensor(uvs)
    faces = torch.as_tensor(faces, device=uvs.device)
    if uvs.ndim != 2 or uvs.shape[1] != 2:
        raise InputError(f"uvs must have shape (N, 2), got {tuple(uvs.shape)}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise InputError(f"faces must have shape (F, 3), got {tuple(faces.shape)}")
    if faces.is_floating_point() or faces.dtype == torch.bool or faces.is_complex():
        raise InputError(f"faces must hold integer vertex indices, got {faces.dtype}")
    if uvs.numel() and not torch.isfinite(uvs).all():
        raise InputError("uvs contain NaN or infinite values")
    if uvs.numel():
        lo, hi = float(uvs.min()), float(uvs.max())
        if lo < -UV_RANGE_SLACK or hi > 1.0 + UV_RANGE_SLACK:
            raise InputError(
                f"uvs must lie in [0, 1] (up to {UV_RANGE_SLACK}), "
                f"got values in [{lo:.4g}, {hi:.4g}]"
            )
    faces = faces.to(torch.int64)
    if faces.numel():
        lo, hi = int(faces.min()), int(faces.max())
        if lo < 0 or hi >= uvs.shape[0]:
            raise InputError(
                f"faces index vertices {lo}..{hi} but there are {uvs.shape[0]} vertices"
            )
    return uvs, faces


def _check_size(size) -> tuple[int, int]:
    items = size if isinstance(size, (tuple, list, torch.Size)) else (size, size)
    try:
        dims = tuple(operator.index(s) for s in items)
    except TypeError:
        dims = ()
    if len(dims) != 2 or min(dims) < 1:
        raise InputError(f"size must be a positive int or (H, W) of positive ints, got {size!r}")
    return dims


def _check_raster(raster: UVRaster, faces: torch.Tensor, size) -> None:
    if raster.size != _check_size(size):
        raise InputError(f"raster has size {raster.size}, expected {_check_size(size)}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise InputError(f"faces must have shape (F, 3), got {tuple(faces.shape)}")
    if faces.shape[0] != raster.num_faces:
        raise InputError(
            f"faces has {faces.shape[0]} rows but the raster was made from {raster.num_faces}"
        )


def _shape(x) -> str:
    return str(tuple(x.shape)) if hasattr(x, "shape") else type(x).__name__
