"""UV rasterization, sampling and UV-grid meshes, each checked against a naive loop version."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_close

from facehd.errors import InputError
from facehd.uv import (
    COVER_EPS_TEXELS,
    UVRaster,
    dense_positions_from_map,
    rasterize_attributes,
    sample_uv_map,
    uv_grid_mesh,
    uv_rasterize,
)

DTYPES = [torch.float32, torch.float64]

# --- input factories ---------------------------------------------------------------------------


def jittered_square_mesh(n: int = 4, seed: int = 0, dtype=torch.float64):
    """An n x n vertex grid spanning exactly [0, 1]^2, interior vertices jittered; 2 (n-1)^2 faces.

    Faces are written out here rather than taken from `uv_grid_mesh`, which is under test.
    """
    rng = np.random.default_rng(seed)
    ticks = np.linspace(0.0, 1.0, n)
    u, v = np.meshgrid(ticks, ticks[::-1])
    uvs = np.stack([u.ravel(), v.ravel()], axis=-1)
    interior = np.zeros((n, n), bool)
    interior[1:-1, 1:-1] = True
    uvs[interior.ravel()] += rng.uniform(-0.3, 0.3, (int(interior.sum()), 2)) / (n - 1)
    faces = []
    for r in range(n - 1):
        for c in range(n - 1):
            a, b, d, e = r * n + c, r * n + c + 1, (r + 1) * n + c, (r + 1) * n + c + 1
            faces += [(a, d, e), (a, e, b)] if (r + c) % 2 else [(a, d, b), (b, d, e)]
    return torch.tensor(uvs, dtype=dtype), torch.tensor(faces)


def random_triangles(num_faces: int = 20, seed: int = 1, dtype=torch.float64):
    """Independent random triangles in [0, 1]^2: partial coverage and many overlaps."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.1, 0.9, (num_faces, 1, 2))
    uvs = np.clip(centres + rng.uniform(-0.25, 0.25, (num_faces, 3, 2)), 0.0, 1.0).reshape(-1, 2)
    faces = np.arange(3 * num_faces).reshape(num_faces, 3)
    return torch.tensor(uvs, dtype=dtype), torch.tensor(faces)


MESHES = {"jittered_square": jittered_square_mesh, "random_triangles": random_triangles}

# --- naive references --------------------------------------------------------------------------


def naive_rasterize(uvs, faces, height, width):
    """Every texel centre against every face, with the documented priority.

    A face covers a centre within COVER_EPS_TEXELS of it; faces containing the centre come
    before faces that only graze it, then the last face wins.
    """
    uv = uvs.double().numpy()
    pts = np.stack([uv[:, 0] * width - 0.5, (1.0 - uv[:, 1]) * height - 0.5], axis=-1)
    face_index = np.full((height, width), -1)
    bary = np.zeros((height, width, 3))
    for r in range(height):
        for c in range(width):
            best = (-1, -1)
            for f, (i, j, k) in enumerate(faces.tolist()):
                a, b, d = pts[i], pts[j], pts[k]
                m = np.array([b - a, d - a]).T
                if abs(np.linalg.det(m)) < 1e-12:
                    continue
                w1, w2 = np.linalg.solve(m, np.array([c, r]) - a)
                w = np.array([1.0 - w1 - w2, w1, w2])
                heights = [_distance_to_line(p, q, o) for p, q, o in ((b, d, a), (d, a, b), (a, b, d))]
                nearest = np.min(w * np.array(heights))
                if nearest >= -COVER_EPS_TEXELS and (nearest >= 0, f) > best:
                    best = (nearest >= 0, f)
                    w = np.clip(w, 0.0, None)
                    face_index[r, c], bary[r, c] = f, w / w.sum()
    return face_index, bary


def _distance_to_line(p, q, o):
    """Distance from o to the line through p and q."""
    return abs((q - p)[0] * (o - p)[1] - (q - p)[1] * (o - p)[0]) / np.linalg.norm(q - p)


def naive_rasterize_attributes(attrs, faces, face_index, bary):
    """Per texel: sum of the three corner attributes weighted by the barycentrics."""
    height, width = face_index.shape
    zero = attrs.new_zeros(attrs.shape[0], attrs.shape[2])
    texels = []
    for r in range(height):
        for c in range(width):
            f = face_index[r, c]
            if f < 0:
                texels.append(zero)
                continue
            w = torch.as_tensor(bary[r, c], dtype=attrs.dtype)
            texels.append(sum(w[k] * attrs[:, int(faces[f, k])] for k in range(3)))
    return torch.stack(texels, dim=-1).view(attrs.shape[0], attrs.shape[2], height, width)


def naive_sample(maps, uvs):
    """Bilinear interpolation between the four nearest texel centres, clamped at the border."""
    batch, _, height, width = maps.shape
    out = []
    for b in range(batch):
        rows = []
        for u, v in uvs[b]:
            x = (u * width - 0.5).clamp(0, width - 1)
            y = ((1 - v) * height - 0.5).clamp(0, height - 1)
            x0, y0 = min(int(x), width - 2), min(int(y), height - 2)
            fx, fy = x - x0, y - y0
            m = maps[b]
            rows.append(
                (1 - fx) * (1 - fy) * m[:, y0, x0]
                + fx * (1 - fy) * m[:, y0, x0 + 1]
                + (1 - fx) * fy * m[:, y0 + 1, x0]
                + fx * fy * m[:, y0 + 1, x0 + 1]
            )
        out.append(torch.stack(rows))
    return torch.stack(out)


def texel_centres(height, width, dtype=torch.float64):
    """(H, W, 2) UVs of the texel centres."""
    rows = torch.arange(height, dtype=dtype)
    cols = torch.arange(width, dtype=dtype)
    v, u = torch.meshgrid(1 - (rows + 0.5) / height, (cols + 0.5) / width, indexing="ij")
    return torch.stack([u, v], dim=-1)


# --- uv_rasterize --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_uv_rasterize_matches_naive(mesh, size, dtype):
    uvs, faces = MESHES[mesh](dtype=dtype)
    raster = uv_rasterize(uvs, faces, size)
    face_index, bary = naive_rasterize(uvs, faces, *size)
    assert raster.face_index.dtype == torch.int64 and raster.bary.dtype == dtype
    assert raster.size == size
    assert_close(raster.face_index, face_index, atol=0, rtol=0, msg="face_index")
    assert_close(raster.bary, bary, atol=1e-9 if dtype == torch.float64 else 1e-6, msg="bary")
    assert_close(raster.mask, face_index >= 0, atol=0, rtol=0, msg="mask")
    if mesh == "random_triangles":  # the case must exercise empty texels and overlaps
        assert 0 < int(raster.mask.sum()) < size[0] * size[1]


def test_full_square_is_covered_everywhere():
    uvs, faces = jittered_square_mesh(n=5, seed=3)
    assert bool(uv_rasterize(uvs, faces, (16, 16)).mask.all())
    # Two triangles whose shared diagonal runs through texel centres (u = v at c = 15 - r).
    square = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    one_hot = torch.eye(4, dtype=torch.float64)
    maps, mask = rasterize_attributes(one_hot, square, torch.tensor([[0, 1, 2], [0, 2, 3]]), 16)
    assert bool(mask.all())
    # Whichever face wins on the diagonal, the corners off the diagonal get no weight there.
    diagonal = torch.arange(16)
    assert_close(maps[[1, 3]][:, diagonal, 15 - diagonal], torch.zeros(2, 16), atol=1e-12)
    assert_close(maps.sum(0), torch.ones(16, 16), atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grid_vertices_on_texel_centres_are_covered(dtype):
    # A UV-grid mesh at the map's own resolution puts every vertex exactly on a texel centre;
    # rounding of float32 UVs must not drop the outermost row and column.
    uvs, faces = uv_grid_mesh(9, 13, dtype=dtype)
    maps, mask = rasterize_attributes(uvs, uvs, faces, (9, 13))
    assert bool(mask.all())
    assert_close(maps, texel_centres(9, 13).permute(2, 0, 1), atol=1e-6)


def test_overlapping_faces_resolve_to_largest_index():
    outer = [[0.1, 0.1], [0.9, 0.1], [0.5, 0.9]]
    inner = [[0.3, 0.25], [0.7, 0.25], [0.5, 0.6]]
    uvs = torch.tensor(outer + inner)
    inner_mask = uv_rasterize(uvs, torch.tensor([[3, 4, 5]]), 32).mask
    outer_mask = uv_rasterize(uvs, torch.tensor([[0, 1, 2]]), 32).mask
    assert inner_mask.any() and (outer_mask & ~inner_mask).any() and not (inner_mask & ~outer_mask).any()

    on_top = uv_rasterize(uvs, torch.tensor([[0, 1, 2], [3, 4, 5]]), 32).face_index
    assert (on_top[inner_mask] == 1).all() and (on_top[outer_mask & ~inner_mask] == 0).all()
    hidden = uv_rasterize(uvs, torch.tensor([[3, 4, 5], [0, 1, 2]]), 32).face_index
    assert (hidden[outer_mask] == 1).all()


def test_empty_mesh_gives_empty_maps():
    no_faces = torch.zeros(0, 3, dtype=torch.int64)
    raster = uv_rasterize(torch.rand(3, 2), no_faces, (4, 6))
    assert not raster.mask.any() and (raster.face_index == -1).all()
    maps, mask = rasterize_attributes(torch.ones(2, 3, 5), torch.rand(3, 2), no_faces, (4, 6))
    assert maps.shape == (2, 5, 4, 6) and not maps.any() and not mask.any()


def test_uv_raster_to_and_numpy_inputs():
    uvs, faces = jittered_square_mesh()
    raster = uv_rasterize(uvs.numpy(), faces.numpy().astype(np.int32), (8, 8))
    assert isinstance(raster, UVRaster) and raster.bary.dtype == torch.float64
    moved = raster.to(torch.device("cpu"), dtype=torch.float32)
    assert moved.bary.dtype == torch.float32 and moved.face_index.dtype == torch.int64
    assert moved.num_vertices == uvs.shape[0] and moved.num_faces == faces.shape[0]
    assert torch.equal(moved.face_index, raster.face_index)


# --- rasterize_attributes ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_rasterize_attributes_matches_naive_values_and_grads(mesh, dtype):
    uvs, faces = MESHES[mesh](dtype=dtype)
    size = (10, 14)
    gen = torch.Generator().manual_seed(0)
    attrs = torch.randn(2, uvs.shape[0], 3, generator=gen, dtype=dtype)
    weights = torch.randn(2, 3, *size, generator=gen, dtype=dtype)

    fast_in = attrs.clone().requires_grad_()
    maps, mask = rasterize_attributes(fast_in, uvs, faces, size)
    (maps * weights).sum().backward()

    face_index, bary = naive_rasterize(uvs, faces, *size)
    naive_in = attrs.clone().requires_grad_()
    expected = naive_rasterize_attributes(naive_in, faces, face_index, bary)
    (expected * weights).sum().backward()

    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert maps.dtype == dtype and maps.shape == (2, 3, *size)
    assert_close(maps, expected, atol=tol, msg="maps")
    assert_close(fast_in.grad, naive_in.grad, atol=tol, msg="grad")
    assert_close(mask, face_index >= 0, atol=0, rtol=0, msg="mask")
    assert (maps[:, :, ~mask] == 0).all()


def test_rasterize_attributes_gradcheck():
    uvs, faces = random_triangles(num_faces=6)
    attrs = torch.randn(2, uvs.shape[0], 2, dtype=torch.float64, requires_grad=True)
    raster = uv_rasterize(uvs, faces, 6)
    assert torch.autograd.gradcheck(
        lambda a: rasterize_attributes(a, uvs, faces, 6, raster=raster)[0], (attrs,)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_attribute_is_reproduced_at_texel_centres(dtype):
    uvs, faces = jittered_square_mesh(n=6, seed=5, dtype=dtype)
    coeffs = torch.tensor([2.5, -1.25, 0.75], dtype=dtype)
    attr = (uvs @ coeffs[:2] + coeffs[2]).unsqueeze(-1)
    maps, mask = rasterize_attributes(attr, uvs, faces, (16, 24))
    expected = texel_centres(16, 24, dtype) @ coeffs[:2] + coeffs[2]
    assert maps.shape == (1, 16, 24) and bool(mask.all())
    assert_close(maps[0], expected, atol=1e-12 if dtype == torch.float64 else 2e-6)


def test_rasterize_attributes_reuses_raster_and_unbatched_matches_batched():
    uvs, faces = jittered_square_mesh(n=5)
    attrs = torch.randn(3, uvs.shape[0], 4, dtype=torch.float64)
    raster = uv_rasterize(uvs, faces, (8, 12))
    batched, mask = rasterize_attributes(attrs, uvs, faces, (8, 12), raster=raster)
    again, _ = rasterize_attributes(attrs, uvs, faces, (8, 12))
    single, single_mask = rasterize_attributes(attrs[1], uvs, faces, (8, 12), raster=raster)
    assert torch.equal(batched, again) and torch.equal(mask, single_mask)
    assert single.shape == (4, 8, 12)
    assert_close(single, batched[1], atol=0, rtol=0)
    # A float64 raster serves float32 attributes, in their dtype.
    maps32, _ = rasterize_attributes(attrs.float(), uvs, faces, (8, 12), raster=raster)
    assert maps32.dtype == torch.float32
    assert_close(maps32, batched, atol=1e-5)


# --- sample_uv_map -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_uv_map_matches_naive_values_and_grads(dtype):
    gen = torch.Generator().manual_seed(2)
    maps = torch.randn(2, 3, 7, 9, generator=gen, dtype=dtype)
    # Include points outside the texel-centre range, where border padding applies.
    uvs = torch.rand(2, 25, 2, generator=gen, dtype=dtype) * 1.1 - 0.05
    weights = torch.randn(2, 25, 3, generator=gen, dtype=dtype)

    fast_maps, fast_uvs = maps.clone().requires_grad_(), uvs.clone().requires_grad_()
    out = sample_uv_map(fast_maps, fast_uvs)
    (out * weights).sum().backward()
    naive_maps, naive_uvs = maps.clone().requires_grad_(), uvs.clone().requires_grad_()
    expected = naive_sample(naive_maps, naive_uvs)
    (expected * weights).sum().backward()

    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.shape == (2, 25, 3) and out.dtype == dtype
    assert_close(out, expected, atol=tol, msg="values")
    assert_close(fast_maps.grad, naive_maps.grad, atol=tol, msg="map grad")
    assert_close(fast_uvs.grad, naive_uvs.grad, atol=100 * tol, msg="uv grad")


def test_sample_uv_map_gradcheck():
    gen = torch.Generator().manual_seed(3)
    maps = torch.randn(1, 2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    uvs = (torch.rand(8, 2, generator=gen, dtype=torch.float64) * 0.6 + 0.2).requires_grad_()
    assert torch.autograd.gradcheck(sample_uv_map, (maps, uvs))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_uv_map_round_trip_at_texel_centres(dtype):
    maps = torch.randn(2, 3, 16, 12, dtype=dtype)
    centres = texel_centres(16, 12, dtype).reshape(-1, 2)
    out = sample_uv_map(maps, centres)
    assert_close(out, maps.flatten(2).transpose(1, 2), atol=1e-12 if dtype == torch.float64 else 1e-5)


def test_sample_uv_map_batching_rules():
    maps = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    uvs = torch.rand(5, 2, dtype=torch.float64)
    shared = sample_uv_map(maps, uvs)
    per_item = sample_uv_map(maps, uvs.expand(3, -1, -1))
    assert_close(shared, per_item, atol=0, rtol=0)
    assert sample_uv_map(maps[0], uvs).shape == (5, 2)
    assert_close(sample_uv_map(maps[:1], uvs.expand(3, -1, -1)), shared[:1].expand(3, -1, -1))


def test_rasterize_then_sample_recovers_linear_attribute():
    uvs, faces = jittered_square_mesh(n=6, seed=7)
    attr = (uvs @ torch.tensor([1.5, 0.5, -2.0, 3.0], dtype=torch.float64).view(2, 2)) + 0.25
    maps, _ = rasterize_attributes(attr, uvs, faces, 32)
    # Inside the texel-centre range bilinear sampling of a linear field is exact.
    inner = ((uvs > 0.5 / 32) & (uvs < 1 - 0.5 / 32)).all(dim=1)
    assert_close(sample_uv_map(maps, uvs[inner]), attr[inner], atol=1e-12)


# --- uv_grid_mesh ------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(2, 2), (5, 7), (16, 3)])
def test_uv_grid_mesh_layout_winding_and_no_wrap(height, width):
    uvs, faces = uv_grid_mesh(height, width, dtype=torch.float64)
    assert uvs.shape == (height * width, 2) and faces.dtype == torch.int64
    assert faces.shape == (2 * (height - 1) * (width - 1), 3)
    assert_close(uvs, texel_centres(height, width).reshape(-1, 2), atol=0, rtol=0)

    corners = uvs[faces]  # (M, 3, 2) with x = u, y = v
    e1, e2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    normal_z = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    assert (normal_z > 0).all(), "every triangle must be counter-clockwise in (u, v)"
    # Each triangle has half a cell's area, so none is degenerate or stretched across rows.
    assert_close(normal_z, torch.full_like(normal_z, 1.0 / (height * width)), atol=1e-15)
    diagonal = math.hypot(1.0 / width, 1.0 / height)
    edges = (corners - corners.roll(1, dims=1)).norm(dim=-1)
    assert edges.max() <= diagonal + 1e-12, "a triangle wraps across rows or columns"
    rows, cols = faces // width, faces % width
    assert (rows.amax(1) - rows.amin(1) <= 1).all() and (cols.amax(1) - cols.amin(1) <= 1).all()
    assert len({tuple(sorted(f)) for f in faces.tolist()}) == len(faces)


def test_uv_grid_mesh_mask_and_compact():
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[0, 4] = False  # a corner only one triangle uses: its cell keeps the other triangle
    mask[3, :] = False  # drops the whole last row of cells
    uvs, faces = uv_grid_mesh(4, 5, mask=mask)
    assert uvs.shape == (20, 2)
    assert faces.shape == (2 * 2 * 4 - 1, 3)
    assert mask.view(-1)[faces].all()

    sub_uvs, sub_faces, kept = uv_grid_mesh(4, 5, mask=mask, compact=True)
    assert_close(kept, mask.view(-1).nonzero().view(-1), atol=0, rtol=0)
    assert_close(sub_uvs, uvs[kept], atol=0, rtol=0)
    assert_close(kept[sub_faces], faces, atol=0, rtol=0)

    _, none = uv_grid_mesh(3, 3, mask=torch.zeros(3, 3, dtype=torch.bool))
    assert none.shape == (0, 3)


# --- dense_positions_from_map ------------------------------------------------------------------


def test_dense_positions_from_map_values_and_grads():
    gen = torch.Generator().manual_seed(4)
    pos = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    normals = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    disp = torch.randn(2, 1, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    dense = dense_positions_from_map(pos, normals, disp)
    assert dense.shape == (2, 20, 3)
    r, c = 2, 3
    unit = normals[1, :, r, c] / normals[1, :, r, c].norm()
    assert_close(dense[1, r * 5 + c], pos[1, :, r, c] + disp[1, 0, r, c] * unit, atol=1e-12)
    raw = dense_positions_from_map(pos, normals, disp, normalize=False)
    assert_close(raw[0, 7], pos[0, :, 1, 2] + disp[0, 0, 1, 2] * normals[0, :, 1, 2], atol=1e-12)
    assert torch.autograd.gradcheck(dense_positions_from_map, (pos, normals, disp))
    # Empty texels (zero normal) stay where they are instead of turning NaN.
    empty = dense_positions_from_map(pos, torch.zeros_like(normals), disp)
    assert_close(empty, pos.flatten(2).transpose(1, 2))


def test_dense_positions_match_uv_grid_vertex_order():
    # Displacing a flat plane z = 0 along +z by d(r, c) must put vertex r * W + c at (u, v, d).
    uvs, _ = uv_grid_mesh(3, 4, dtype=torch.float64)
    pos = torch.cat([uvs.T.reshape(2, 3, 4), torch.zeros(1, 3, 4, dtype=torch.float64)])[None]
    normals = torch.zeros_like(pos)
    normals[:, 2] = 2.0
    disp = torch.arange(12, dtype=torch.float64).view(1, 1, 3, 4)
    dense = dense_positions_from_map(pos, normals, disp)
    assert_close(dense[0], torch.cat([uvs, torch.arange(12.0).view(12, 1)], dim=1), atol=0)


# --- invalid inputs ----------------------------------------------------------------------------

_UVS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
_FACES = torch.tensor([[0, 1, 2]])


@pytest.mark.parametrize(
    "uvs, faces, size, match",
    [
        (_UVS * 3.0, _FACES, 8, r"\[0, 1\]"),
        (_UVS - 0.5, _FACES, 8, r"\[0, 1\]"),
        (torch.tensor([[0.0, float("nan")], [1.0, 0.0], [0.0, 1.0]]), _FACES, 8, "NaN"),
        (_UVS[:, :1], _FACES, 8, r"uvs must have shape \(N, 2\)"),
        (_UVS, _FACES[:, :2], 8, r"faces must have shape \(F, 3\)"),
        (_UVS, torch.tensor([[0, 1, 3]]), 8, "3 vertices"),
        (_UVS, torch.tensor([[0, -1, 2]]), 8, "3 vertices"),
        (_UVS, _FACES.float(), 8, "integer"),
        (_UVS, _FACES, (0, 8), "size"),
        (_UVS, _FACES, (8, 8, 8), "size"),
        (_UVS, _FACES, 2.5, "size"),
    ],
)
def test_uv_rasterize_rejects_invalid_inputs(uvs, faces, size, match):
    with pytest.raises(InputError, match=match):
        uv_rasterize(uvs, faces, size)


def test_uv_rasterize_tolerates_tiny_range_excursions():
    uvs = torch.tensor([[-1e-4, 0.0], [1.0 + 1e-4, 0.0], [0.0, 1.0]])
    assert uv_rasterize(uvs, _FACES, 8).mask.any()


def test_other_functions_reject_invalid_inputs():
    raster = uv_rasterize(_UVS, _FACES, 8)
    with pytest.raises(InputError, match=r"\(B, N, C\)"):
        rasterize_attributes(torch.zeros(3), _UVS, _FACES, 8)
    with pytest.raises(InputError, match="4 vertices"):
        rasterize_attributes(torch.zeros(4, 1), _UVS, _FACES, 8, raster=raster)
    with pytest.raises(InputError, match="raster has size"):
        rasterize_attributes(torch.zeros(3, 1), _UVS, _FACES, 16, raster=raster)
    with pytest.raises(InputError, match="raster was made from"):
        rasterize_attributes(torch.zeros(3, 1), _UVS, _FACES.repeat(2, 1), 8, raster=raster)
    with pytest.raises(InputError, match="floating point"):
        rasterize_attributes(torch.zeros(3, 1, dtype=torch.int64), _UVS, _FACES, 8)
    with pytest.raises(InputError, match="maps must be"):
        sample_uv_map(torch.zeros(8, 8), _UVS)
    with pytest.raises(InputError, match="uvs must have shape"):
        sample_uv_map(torch.zeros(1, 1, 8, 8), torch.zeros(3, 3))
    with pytest.raises(InputError, match="batch"):
        sample_uv_map(torch.zeros(2, 1, 8, 8), torch.zeros(3, 4, 2))
    with pytest.raises(InputError, match="at least 2 x 2"):
        uv_grid_mesh(1, 5)
    with pytest.raises(InputError, match="mask"):
        uv_grid_mesh(3, 3, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(InputError, match="displacement_map"):
        dense_positions_from_map(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4))
