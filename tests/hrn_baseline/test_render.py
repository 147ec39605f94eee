import math
import sys

import numpy as np
import pytest
import scipy.io
import torch
from factories import tiny_fields
from helpers import assert_close

from facehd import conventions as cv
from facehd.errors import InputError
from facehd.morphable import load_morphable_model, project, reconstruct
from hrn_baseline.render import (
    BackendUnavailableError,
    TorchRasterizer,
    available_backends,
    camera_to_clip,
    get_rasterizer,
    perspective_projection,
    render_mesh,
    torch_backend,
)
from hrn_baseline.render.base import sample_texture
from hrn_baseline.render.nvdiffrast_backend import load_nvdiffrast_plugin
from hrn_baseline.render.torch_backend import open3d_available

HAS_NVDIFFRAST = "nvdiffrast" in available_backends()
# A pixel centre this close to a triangle edge (in barycentric units), or two surfaces this close
# in NDC depth, is an exact tie that either answer may win.
TIE = 1e-7


# ----------------------------------------------------------------------------------------------
# scenes and the naive reference


def grid_mesh(n: int, half: float = 0.5):
    """(n*n, 2) grid points in [-half, half]^2 and their (2 (n-1)^2, 3) triangles."""
    t = torch.linspace(-half, half, n, dtype=torch.float64)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    idx = torch.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    faces = torch.cat([torch.stack([a, b, d], -1).reshape(-1, 3), torch.stack([a, d, c], -1).reshape(-1, 3)])
    return torch.stack([xx, yy], -1).reshape(-1, 2), faces


def tiny_scene(seed: int = 0):
    """(1, N, 3) camera-frame vertices and faces: a bumpy 4 x 4 sheet plus two tilted triangles
    poking through it and one behind it; 21 triangles in all."""
    g = torch.Generator().manual_seed(seed)
    xy, faces = grid_mesh(4, 0.45)
    xy = xy + 0.03 * torch.randn(xy.shape, generator=g, dtype=torch.float64)
    sheet = torch.cat([xy, 10 + 0.1 * torch.randn(len(xy), 1, generator=g, dtype=torch.float64)], -1)
    extra = torch.tensor([[-0.3, -0.2, 9.7], [0.35, -0.1, 10.3], [0.0, 0.4, 9.9],
                          [-0.2, 0.3, 10.4], [0.3, 0.35, 9.6], [0.1, -0.4, 10.1],
                          [-0.6, -0.6, 10.8], [0.6, -0.5, 10.8], [0.0, 0.7, 10.8]], dtype=torch.float64)
    n = len(sheet)
    extra_faces = torch.tensor([[n, n + 1, n + 2], [n + 3, n + 4, n + 5], [n + 6, n + 7, n + 8]])
    return torch.cat([sheet, extra])[None], torch.cat([faces, extra_faces])


def reference_rasterize(clip: torch.Tensor, faces: torch.Tensor, size, tie_tol: float = TIE):
    """Every pixel centre against every triangle, in float64 numpy: face index, perspective-correct
    barycentrics, depth w, and a mask of pixels with a tie (within ``tie_tol`` of an edge or of
    another surface's depth)."""
    h, w = size
    clip = clip.detach().double().numpy()
    faces = faces.numpy()
    b = clip.shape[0]
    face_index = np.full((b, h, w), -1)
    bary = np.zeros((b, h, w, 3))
    depth = np.zeros((b, h, w))
    tie = np.zeros((b, h, w), dtype=bool)
    for item in range(b):
        for r in range(h):
            for c in range(w):
                centre = np.array([c, r], dtype=float)
                found = []  # (ndc z, face, perspective-correct bary, w, on an edge)
                for f, tri in enumerate(faces):
                    v = clip[item, tri]  # (3, 4)
                    if (v[:, 3] <= 0).any():
                        continue
                    ndc = v[:, :3] / v[:, 3:]
                    pix = np.stack([(ndc[:, 0] + 1) * w / 2 - 0.5, (1 - ndc[:, 1]) * h / 2 - 0.5], -1)
                    m = np.stack([pix[1] - pix[0], pix[2] - pix[0]], -1)
                    if abs(np.linalg.det(m)) < 1e-12:
                        continue
                    l12 = np.linalg.solve(m, centre - pix[0])
                    lam = np.array([1 - l12.sum(), l12[0], l12[1]])
                    if lam.min() < -tie_tol:
                        continue
                    z = lam @ ndc[:, 2]
                    if not -1 <= z <= 1:
                        continue
                    persp = lam / v[:, 3]
                    found.append((z, f, persp / persp.sum(), 1 / persp.sum(), lam.min() < tie_tol))
                if not found:
                    continue
                found.sort(key=lambda hit: hit[0])
                z, f, bc, wd, on_edge = found[0]
                face_index[item, r, c], bary[item, r, c], depth[item, r, c] = f, bc, wd
                tie[item, r, c] = on_edge or (len(found) > 1 and found[1][0] - z < tie_tol)
    return torch.from_numpy(face_index), torch.from_numpy(bary), torch.from_numpy(depth), torch.from_numpy(tie)


def small_focal(size):
    """A focal length that fits a ~1-unit object at z = 10 in ``size`` pixels."""
    return 7.0 * max(size)


# ----------------------------------------------------------------------------------------------
# the torch back end against the naive reference


OPEN3D = pytest.param("open3d", marks=pytest.mark.skipif(not open3d_available(), reason="open3d does not import"))


@pytest.mark.parametrize("visibility", ["scatter", OPEN3D])
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_torch_backend_matches_naive_reference(visibility, dtype, atol):
    size = (24, 32)  # H != W on purpose
    vertices, faces = tiny_scene()
    clip = camera_to_clip(vertices.to(dtype), size, focal=small_focal(size))
    frag = TorchRasterizer(visibility).rasterize(clip, faces, size)
    # open3d intersects in float32, so its ties are looser
    tie_tol = TIE if visibility == "scatter" else 1e-4
    ref_face, ref_bary, ref_depth, tie = reference_rasterize(clip, faces, size, tie_tol)

    clear = ~tie
    assert (ref_face >= 0).sum() > 300 and (ref_face < 0).sum() > 50, "scene should cover part of the image"
    assert tie.sum() < 10
    assert torch.equal(frag.face_index[clear], ref_face[clear])
    assert torch.equal(frag.mask[clear], ref_face[clear] >= 0)
    assert_close(frag.bary[clear], ref_bary[clear], atol=atol, rtol=0, msg="barycentrics")
    assert_close(frag.depth[clear], ref_depth[clear], atol=atol * 10, rtol=atol, msg="depth")
    assert frag.bary.dtype == dtype and frag.depth.dtype == dtype and frag.face_index.dtype == torch.int64


def test_occlusion_keeps_the_nearest_triangle_whatever_the_order():
    size = (16, 16)
    near = [[-0.4, -0.4, 9.5], [0.4, -0.4, 9.5], [0.0, 0.4, 9.5]]
    far = [[-0.5, 0.5, 10.5], [0.0, -0.5, 10.5], [0.5, 0.5, 10.5]]
    vertices = torch.tensor([near + far], dtype=torch.float64)
    clip = camera_to_clip(vertices, size, focal=small_focal(size))
    for faces, near_id in ((torch.tensor([[0, 1, 2], [3, 4, 5]]), 0), (torch.tensor([[3, 4, 5], [0, 1, 2]]), 1)):
        frag = TorchRasterizer().rasterize(clip, faces, size)
        ref_face = reference_rasterize(clip, faces, size)[0]
        both = (ref_face >= 0) & (frag.face_index >= 0)
        assert (frag.face_index == near_id).sum() > 20 and (frag.face_index == 1 - near_id).sum() > 10
        assert torch.equal(frag.face_index[both], ref_face[both])
        # wherever the near triangle covers a pixel, it wins and its depth is 9.5
        near_depth = frag.depth[frag.face_index == near_id]
        assert_close(near_depth, torch.full_like(near_depth, 9.5), atol=1e-9)


def test_background_is_empty():
    size = (16, 16)
    vertices = torch.tensor([[[-0.2, -0.2, 10.0], [0.2, -0.2, 10.0], [0.0, 0.2, 10.0]]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2]])
    image, mask, frag = render_mesh(vertices, faces, torch.ones(3, 2, dtype=torch.float64), size,
                                    focal=small_focal(size))
    assert 0 < mask.sum() < 100
    assert torch.equal(mask, frag.face_index >= 0)
    assert (frag.face_index[~mask] == -1).all()
    assert (frag.bary[~mask] == 0).all() and (frag.depth[~mask] == 0).all() and (image[~mask] == 0).all()
    assert_close(image[mask], torch.ones_like(image[mask]), atol=1e-12)
    assert_close(frag.bary.sum(-1)[mask], torch.ones_like(frag.depth[mask]), atol=1e-12)


def test_triangles_behind_the_camera_or_beyond_far_are_not_drawn():
    size = (8, 8)
    vertices = torch.tensor([[[-1.0, -1.0, 16.0], [1.0, -1.0, 16.0], [0.0, 1.0, 16.0],  # beyond far (15)
                              [-1.0, -1.0, -1.0], [1.0, -1.0, 8.0], [0.0, 1.0, 8.0]]])  # crosses the camera
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    frag = TorchRasterizer().rasterize(camera_to_clip(vertices, size, focal=small_focal(size)), faces, size)
    assert not frag.mask.any()


# ----------------------------------------------------------------------------------------------
# gradients


def test_gradients_match_finite_differences():
    size = (8, 10)
    g = torch.Generator().manual_seed(1)
    vertices = torch.tensor([[[-0.5, -0.4, 10.2], [0.5, -0.5, 9.8], [0.1, 0.5, 10.0], [0.6, 0.45, 10.3]]],
                            dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2], [1, 3, 2]])
    attrs = torch.rand(1, 4, 2, generator=g, dtype=torch.float64)
    raster = TorchRasterizer()

    def render(verts, colours):
        clip = camera_to_clip(verts, size, focal=small_focal(size))
        frag = raster.rasterize(clip, faces, size)
        return raster.interpolate(colours, frag, faces), frag.depth

    assert raster.rasterize(camera_to_clip(vertices, size, focal=small_focal(size)), faces, size).mask.sum() > 30
    torch.autograd.gradcheck(render, (vertices.requires_grad_(True), attrs.requires_grad_(True)), eps=1e-6,
                             atol=1e-6)


def test_gradients_reach_clip_w_and_xy_like_nvdiffrast():
    size = (8, 8)
    vertices = torch.tensor([[[-0.5, -0.4, 10.2], [0.5, -0.5, 9.8], [0.1, 0.5, 10.0]]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2]])
    clip = camera_to_clip(vertices, size, focal=small_focal(size)).requires_grad_(True)
    raster = TorchRasterizer()
    image = raster.interpolate(torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64),
                               raster.rasterize(clip, faces, size), faces)
    image.sum().backward()
    grad = clip.grad[0]
    assert (grad[:, [0, 1, 3]].abs().sum(0) > 0).all()
    assert (grad[:, 2] == 0).all(), "nvdiffrast's barycentrics do not depend on clip z"


# ----------------------------------------------------------------------------------------------
# batches, chunks, dtypes, visibility methods


def test_batch_equals_single_renders():
    size = (20, 20)
    vertices, faces = tiny_scene()
    c, s = math.cos(0.3), math.sin(0.3)
    rot = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64)
    centre = torch.tensor([0, 0, 10.0], dtype=torch.float64)
    second = (vertices - centre) @ rot.T + centre + torch.tensor([0.1, 0, 0.2], dtype=torch.float64)
    batch = torch.cat([vertices, second])
    attrs = torch.rand(2, batch.shape[1], 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kw = {"size": size, "focal": small_focal(size), "rasterizer": TorchRasterizer()}
    image, mask, frag = render_mesh(batch, faces, attrs, **kw)
    for item in range(2):
        one_image, one_mask, one_frag = render_mesh(batch[item:item + 1], faces, attrs[item:item + 1], **kw)
        assert torch.equal(frag.face_index[item], one_frag.face_index[0])
        assert_close(image[item], one_image[0], atol=1e-12)
        assert_close(frag.depth[item], one_frag.depth[0], atol=1e-12)
    assert not torch.equal(frag.face_index[0], frag.face_index[1])


def test_chunked_scatter_equals_one_pass(monkeypatch):
    size = (32, 32)
    vertices, faces = tiny_scene()
    clip = camera_to_clip(vertices, size, focal=small_focal(size))
    whole = torch_backend.visibility_scatter(clip, faces, size)
    monkeypatch.setattr(torch_backend, "CHUNK_CANDIDATES", 7)
    assert torch.equal(torch_backend.visibility_scatter(clip, faces, size), whole)


def test_float32_and_float64_agree():
    size = (32, 32)
    vertices, faces = tiny_scene(seed=3)
    attrs = torch.rand(vertices.shape[1], 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kw = {"size": size, "focal": small_focal(size), "rasterizer": TorchRasterizer()}
    image64, mask64, frag64 = render_mesh(vertices, faces, attrs, **kw)
    image32, mask32, frag32 = render_mesh(vertices.float(), faces, attrs.float(), **kw)
    same = frag64.face_index == frag32.face_index
    assert same.float().mean() > 0.99
    assert image32.dtype == torch.float32
    assert_close(image32[same], image64[same], atol=1e-5)


def bump_scene(grid: int = 40):
    """A face-like dome on a grid in the camera frame (filling most of the project's view), with colours."""
    xy, faces = grid_mesh(grid, 0.95)
    x, y = xy.unbind(-1)
    z = 0.6 * torch.exp(-(x**2 + y**2) / 0.4) + 0.2 * torch.exp(-(x**2 / 0.01 + (y + 0.1) ** 2 / 0.08))
    vertices = torch.cat([xy, (10 - z)[:, None]], -1)[None]
    colours = torch.rand(len(xy), 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    return vertices, faces, colours


@pytest.mark.skipif(not open3d_available(), reason="open3d does not import")
def test_open3d_and_scatter_visibility_agree():
    size = 64
    vertices, faces, colours = bump_scene()
    kw = {"size": size, "focal": cv.FOCAL * size / cv.IMAGE_SIZE}
    img_s, mask_s, frag_s = render_mesh(vertices, faces, colours, rasterizer=TorchRasterizer("scatter"), **kw)
    img_o, mask_o, frag_o = render_mesh(vertices, faces, colours, rasterizer=TorchRasterizer("open3d"), **kw)
    assert mask_s.sum() > 0.5 * size * size
    assert (mask_s != mask_o).sum() <= 2
    differ = frag_s.face_index != frag_o.face_index
    assert differ.sum() <= 0.01 * mask_s.sum()  # pixel centres on shared edges (float32 in open3d)
    both = mask_s & mask_o
    # on a shared edge the two triangles give the same interpolated value
    assert_close(img_s[both], img_o[both], atol=1e-4)


# ----------------------------------------------------------------------------------------------
# the project's camera


def test_projection_matches_the_project_camera():
    size = cv.IMAGE_SIZE
    m = perspective_projection(size, dtype=torch.float64)
    assert_close(m[1, 1], 1 / math.tan(math.radians(cv.FOV_DEG) / 2), atol=1e-12)
    points = torch.tensor([[[0.3, -0.2, 9.6], [-0.5, 0.4, 10.4], [0.0, 0.0, cv.Z_NEAR], [0.1, 0.1, cv.Z_FAR]]],
                          dtype=torch.float64)
    clip = camera_to_clip(points, size)
    ndc = clip[..., :3] / clip[..., 3:]
    pixels = (ndc[..., :2] + 1) * size / 2 - 0.5  # pixel-centre coordinates, y up
    assert_close(pixels, project(points), atol=1e-9)
    assert_close(clip[..., 3], points[..., 2], atol=1e-12)
    assert_close(ndc[0, 2:, 2], torch.tensor([-1.0, 1.0], dtype=torch.float64), atol=1e-12)


def test_render_mesh_puts_each_surface_point_on_its_projected_pixel():
    size = (40, 48)
    vertices, faces, _ = bump_scene(grid=12)
    image, mask, frag = render_mesh(vertices, faces, vertices[0], size, focal=small_focal(size) / 2)
    assert mask.float().mean() > 0.3
    rows, cols = torch.nonzero(mask[0], as_tuple=True)
    projected = project(image[0, rows, cols][None], focal=small_focal(size) / 2,
                        center=torch.tensor([48 * cv.PRINCIPAL_POINT / cv.IMAGE_SIZE,
                                             40 * cv.PRINCIPAL_POINT / cv.IMAGE_SIZE], dtype=torch.float64))[0]
    # the surface point seen at pixel (row, col) projects to x = col, y = H - 1 - row (y up)
    assert_close(projected, torch.stack([cols, size[0] - 1 - rows], -1).double(), atol=1e-8)
    assert_close(frag.depth[mask], image[..., 2][mask], atol=1e-10, msg="depth is z_cam")


def test_image_orientation_row_zero_is_the_top():
    size = (16, 16)
    upper = torch.tensor([[[-0.3, 0.1, 10.0], [0.3, 0.1, 10.0], [0.0, 0.4, 10.0]]], dtype=torch.float64)
    _, mask, _ = render_mesh(upper, torch.tensor([[0, 1, 2]]), torch.ones(3, 1, dtype=torch.float64), size,
                             focal=small_focal(size))
    rows = torch.nonzero(mask[0])[:, 0]
    assert rows.numel() > 0 and rows.max() < size[0] // 2  # y up in the camera = top rows


def write_tiny_model(tmp_path):
    path = tmp_path / "BFM_model_front.mat"
    scipy.io.savemat(path, tiny_fields())
    return load_morphable_model(path, dtype=torch.float64)


def test_tiny_morphable_model_landmarks_land_on_the_rendered_face(tmp_path):
    model = write_tiny_model(tmp_path)
    coeffs = torch.zeros(2, cv.N_COEFFS, dtype=torch.float64)
    coeffs[:, cv.COEFF_SLICES["id"]] = 0.5
    coeffs[1, cv.COEFF_SLICES["angle"]] = torch.tensor([0.1, -0.2, 0.15], dtype=torch.float64)
    coeffs[1, cv.COEFF_SLICES["trans"]] = torch.tensor([0.1, -0.05, 0.2], dtype=torch.float64)
    recon = reconstruct(model, coeffs)
    image, mask, frag = render_mesh(recon.vertices_cam, model.faces, recon.color)

    # landmarks on the mesh boundary sit on the silhouette; interior ones must hit the face
    edges = torch.cat([model.faces[:, [0, 1]], model.faces[:, [1, 2]], model.faces[:, [2, 0]]]).sort(-1).values
    unique, counts = torch.unique(edges, dim=0, return_counts=True)
    boundary = torch.unique(unique[counts == 1])
    interior = ~torch.isin(model.keypoints, boundary)
    assert interior.sum() >= 10
    lm = recon.landmarks[:, interior].round().long()
    rows, cols = cv.IMAGE_SIZE - 1 - lm[..., 1], lm[..., 0]
    for item in range(2):
        assert (frag.face_index[item, rows[item], cols[item]] >= 0).all()
    assert image.shape == (2, cv.IMAGE_SIZE, cv.IMAGE_SIZE, 3) and mask.sum() > 1000


# ----------------------------------------------------------------------------------------------
# textures and back-end selection


def test_texture_samples_texel_centres_and_interpolates_bilinearly():
    tex = torch.arange(2 * 4 * 6, dtype=torch.float64).reshape(1, 2, 4, 6)
    r, c = torch.tensor([0.0, 3.0, 2.0], dtype=torch.float64), torch.tensor([0.0, 5.0, 1.0], dtype=torch.float64)
    uv = torch.stack([(c + 0.5) / 6, 1 - (r + 0.5) / 4], -1).reshape(1, 1, 3, 2).double()
    out = sample_texture(tex, uv.expand(2, 1, 3, 2))
    assert out.shape == (2, 1, 3, 2)
    assert_close(out[0, 0], tex[0, :, r.long(), c.long()].T, atol=1e-12)
    midway = torch.tensor([[[[(1 + 0.5) / 6 + 0.5 / 6, 1 - (2 + 0.5) / 4]]]], dtype=torch.float64)
    assert_close(sample_texture(tex, midway)[0, 0, 0], (tex[0, :, 2, 1] + tex[0, :, 2, 2]) / 2, atol=1e-12)
    assert_close(get_rasterizer("torch").texture(tex, uv), sample_texture(tex, uv), atol=0)


def test_backend_selection_and_errors():
    assert "torch" in available_backends()
    assert isinstance(get_rasterizer("torch"), TorchRasterizer)
    with pytest.raises(InputError, match="unknown rasterizer"):
        get_rasterizer("opengl")
    with pytest.raises(InputError, match="unknown visibility"):
        TorchRasterizer("zbuffer")
    with pytest.raises(InputError, match="faces index vertices"):
        TorchRasterizer().rasterize(torch.zeros(1, 3, 4), torch.tensor([[0, 1, 3]]), 8)
    if not HAS_NVDIFFRAST:
        assert get_rasterizer("auto").name == "torch"
        with pytest.raises(BackendUnavailableError, match="nvdiffrast"):
            get_rasterizer("nvdiffrast")


class _FakeNvdiffrast:
    """``nvdiffrast.torch`` as far as `load_nvdiffrast_plugin` sees it: ``ops._get_plugin`` runs
    ``outcomes`` in turn (an exception is raised, anything else returned)."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.ops = self

    def _get_plugin(self):
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def test_nvdiffrast_plugin_import_after_its_build_finds_the_build_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = "nvdiffrast_plugin_0_3_3_torch2_11"
    missing = ModuleNotFoundError(f"No module named '{name}'", name=name)
    fake = _FakeNvdiffrast(missing, "plugin")
    load_nvdiffrast_plugin(fake)  # built, then imported by name: the retry finds it
    assert not fake.outcomes and str(tmp_path / name) in sys.path
    with pytest.raises(BackendUnavailableError, match="numpy_x"):  # not the plugin: no retry
        load_nvdiffrast_plugin(_FakeNvdiffrast(ModuleNotFoundError("no numpy_x", name="numpy_x")))
    with pytest.raises(BackendUnavailableError, match="could not build.*nvcc not found.*'torch' back end"):
        load_nvdiffrast_plugin(_FakeNvdiffrast(RuntimeError("nvcc not found")))
    with pytest.raises(BackendUnavailableError, match="could not build"):
        load_nvdiffrast_plugin(_FakeNvdiffrast(missing, ImportError("undefined symbol")))


# ----------------------------------------------------------------------------------------------
# nvdiffrast against the torch back end (runs only on a CUDA machine with nvdiffrast)


@pytest.mark.skipif(not HAS_NVDIFFRAST, reason="needs nvdiffrast and a CUDA device")
def test_nvdiffrast_and_torch_backends_agree():
    device = torch.device("cuda")
    size = (96, 128)
    vertices, faces, colours = bump_scene(grid=16)
    vertices, colours, faces = vertices.float().to(device), colours.float().to(device), faces.to(device)
    vertices = torch.cat([vertices, vertices + torch.tensor([0.1, -0.05, 0.3], device=device)])
    uv = torch.rand(2, *size, 2, device=device, generator=torch.Generator(device).manual_seed(0))
    tex = torch.rand(1, 3, 16, 24, device=device, generator=torch.Generator(device).manual_seed(1))
    results = {}
    for name in ("torch", "nvdiffrast"):
        verts = vertices.clone().requires_grad_(True)
        raster = get_rasterizer(name)
        image, mask, frag = render_mesh(verts, faces, colours, size, rasterizer=raster)
        (image * torch.linspace(0, 1, 3, device=device)).sum().backward()
        results[name] = (image.detach(), frag, verts.grad, raster.texture(tex, uv))

    image_t, frag_t, grad_t, tex_t = results["torch"]
    image_n, frag_n, grad_n, tex_n = results["nvdiffrast"]
    assert frag_t.mask.sum() > 0.5 * frag_t.mask.numel()
    # nvdiffrast snaps vertices to 1/16 pixel for coverage, so pixels within ~1/32 pixel of an
    # edge may go to the neighbouring triangle (simulated: 0.6% of pixels, 3 silhouette pixels)
    assert (frag_t.mask != frag_n.mask).sum() <= 0.005 * frag_t.mask.sum()
    same = (frag_t.face_index == frag_n.face_index) & frag_t.mask
    assert same.sum() > 0.97 * frag_t.mask.sum()
    assert_close(frag_n.bary[same], frag_t.bary[same], atol=2e-4, rtol=0, msg="barycentrics")
    assert_close(frag_n.depth[same], frag_t.depth[same], atol=1e-4, rtol=1e-5, msg="depth")
    assert_close(image_n[same], image_t[same], atol=2e-4, rtol=0, msg="images where the triangles agree")
    both = frag_t.mask & frag_n.mask
    # on a flipped edge pixel nvdiffrast clamps slightly negative barycentrics (simulated: 0.005)
    assert_close(image_n[both], image_t[both], atol=0.03, rtol=0, msg="images")
    assert_close(tex_n, tex_t, atol=1e-5, rtol=0, msg="texture")
    cosine = torch.nn.functional.cosine_similarity(grad_t.flatten(), grad_n.flatten(), dim=0)
    assert cosine > 0.98, f"position gradients differ (cosine {cosine:.4f}; simulated 0.9986)"
