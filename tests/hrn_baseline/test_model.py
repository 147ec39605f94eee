"""The HRN forward model: shapes, conventions (landmarks on the render, outward detail normals),
gradients to every network, dtype genericity, and its small helpers against naive versions."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from facehd import conventions as cv
from facehd.errors import FileFormatError, InputError
from facehd.morphable import reconstruct, y_up_to_rows
from hrn_baseline.config import ModelConfig
from hrn_baseline.model import (
    HRN,
    HRNOutput,
    fill_border,
    grid_vertex_normals,
    load_hrn_morphable,
    make_discriminators,
    sample_image,
)
from hrn_baseline.render import available_backends

HAS_NVDIFFRAST = "nvdiffrast" in available_backends()
# the smallest useful configuration keeps these tests to seconds on two cores
TINY = dict(image_size=64, mid_map_size=16, high_map_size=32, mid_ngf=4, high_ngf=4, mid_blocks=1,
            high_blocks=1, synth_resolution=24, disc_ndf=4, disc_layers=2)


@pytest.fixture(scope="module")
def morphable():
    return load_hrn_morphable(ModelConfig.small(**TINY))


@pytest.fixture(scope="module")
def model(morphable):
    torch.manual_seed(0)
    return HRN(morphable, ModelConfig.small(**TINY)).eval()


def _images(b: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _light(front: float = 0.3, side: float = -0.2) -> torch.Tensor:
    """(27,) SH coefficients of a light from the front and the side (zero gamma is ambient light,
    under which shading ignores the normals)."""
    gamma = torch.zeros(3, 9)
    gamma[:, 2], gamma[:, 3] = front, side
    return gamma.reshape(-1)


def _set_pose(model: HRN, angle=(0.1, 0.3, 0.05), trans=(0.05, -0.02, 0.3), light: bool = True) -> None:
    """Make the (zero-initialised) regressor predict a fixed, non-trivial pose and light for every image."""
    with torch.no_grad():
        model.regressor.final_layers[4].bias.copy_(_light() if light else torch.zeros(27))
        model.regressor.final_layers[3].bias.copy_(torch.tensor(angle))
        model.regressor.final_layers[5].bias.copy_(torch.tensor(trans[:2]))
        model.regressor.final_layers[6].bias.copy_(torch.tensor(trans[2:]))


def test_output_shapes_and_initial_state(model):
    out = model(_images())
    n = model.mm_mean_shape.shape[0]
    assert out.coeffs.shape == (2, cv.N_COEFFS) and torch.count_nonzero(out.coeffs) == 0
    assert out.position_map.shape == out.texture_map.shape == out.deformation.shape == (2, 3, 16, 16)
    assert out.displacement.shape == (2, 1, 32, 32) and out.texture_map_high.shape == (2, 3, 32, 32)
    assert out.shape_mid.shape == (2, n, 3) and out.landmarks.shape == (2, 68, 2)
    assert out.dense_vertices.shape == (2, 32 * 32, 3) and out.detail_normal_map.shape == (2, 3, 32, 32)
    assert out.render_mid.shape == out.render_high.shape == (2, 3, 64, 64)
    assert out.render_mask.shape == (2, 1, 64, 64) and 0.1 < out.render_mask.mean() < 0.9
    # alpha = beta = 0.01 and the 0.1 output scale keep the detail maps below 1e-3 units (0.1 mm)
    assert out.deformation.abs().max() <= 1e-3 and out.displacement.abs().max() <= 1e-3
    assert 0 <= out.texture_map.min() and out.texture_map.max() <= 1


def test_rejects_wrong_image_sizes(model):
    with pytest.raises(InputError, match="expected"):
        model(torch.rand(1, 3, 32, 32))
    with pytest.raises(InputError, match="face_mask"):
        model(torch.rand(1, 3, 64, 64), torch.ones(1, 1, 32, 32))


def test_forward_is_regressor_then_decode(model):
    images = _images(seed=3)
    with torch.no_grad():
        a = model(images)
        b = model.decode(images, model.regressor(images))
    assert_close(a.render_high, b.render_high, atol=0)


def test_landmarks_follow_the_morphable_model_and_land_on_the_render(model):
    _set_pose(model)
    try:
        with torch.no_grad():
            out = model(_images(1))
            coarse = reconstruct(model.morphable, out.coeffs, image_size=64)
        # M0's keypoints, projected and flipped to rows, are the coarse landmarks
        assert_close(out.landmarks_coarse, y_up_to_rows(coarse.landmarks, 64), atol=1e-5)
        # the deformation moves the keypoints by far less than a pixel at initialisation
        assert (out.landmarks - out.landmarks_coarse).abs().max() < 0.1
        # the nose tip lands on a rendered pixel
        col, row = out.landmarks[0, cv.NOSE_TIP_IBUG].round().long().tolist()
        assert out.render_mask[0, 0, row, col] == 1
    finally:
        _set_pose(model, (0, 0, 0), (0, 0, 0), light=False)


def test_texture_map_unwraps_the_image_through_the_projection(model):
    """A horizontal ramp image unwraps to texels whose value is their projected column."""
    size = 64
    ramp = torch.linspace(0, 1, size).expand(1, 3, size, size).contiguous()
    with torch.no_grad():
        out = model(ramp)
        coarse = y_up_to_rows(out.coarse.proj, size)
    expected = coarse[..., 0] / (size - 1)  # per vertex
    mm = model.morphable
    from facehd.uv import sample_uv_map
    # sample the high texture map back at the vertices: the ramp value of their columns
    sampled = sample_uv_map(out.texture_map_high, mm.uv)[0, :, 0]
    # vertices on the UV chart's border sample half-empty texels; keep those one texel inside
    margin = 1.5 / 32
    interior = ((mm.uv > margin) & (mm.uv < 1 - margin)).all(-1)
    inside = (coarse[0, :, 0] > 1) & (coarse[0, :, 0] < size - 2) & interior
    assert_close(sampled[inside], expected[0][inside], atol=0.03)


def test_detail_normals_point_outward_and_match_the_mid_normals_without_displacement(model):
    with torch.no_grad():
        beta = model.high_net.beta.clone()
        model.high_net.beta.zero_()
        try:
            out = model(_images(1))
        finally:
            model.high_net.beta.copy_(beta)
    rotation = out.coarse.rotation[0]
    mid_normals = out.normals_mid[0] @ rotation  # back to model space
    from facehd.uv import rasterize_attributes
    mm = model.morphable
    mid_map, valid = rasterize_attributes(mid_normals, mm.uv, mm.faces, 32)
    cosine = (F.normalize(mid_map, dim=0) * out.detail_normal_map[0]).sum(0)[valid]
    assert cosine.median() > 0.99 and cosine.min() > 0.5
    assert out.detail_normal_map[0, 2][valid].mean() > 0.5  # the face looks toward +z


def test_displacement_changes_r2_but_not_r1(model):
    _set_pose(model)
    with torch.no_grad():
        beta = model.high_net.beta.clone()
        try:
            base = model(_images(1, seed=5))
            model.high_net.beta.fill_(1.0)  # displacements of up to 0.1 units (10 mm)
            out = model(_images(1, seed=5))
        finally:
            model.high_net.beta.copy_(beta)
            _set_pose(model, (0, 0, 0), (0, 0, 0), light=False)
    assert_close(out.render_mid, base.render_mid, atol=1e-5)
    # without displacement R2 differs from R1 only by grid-mesh versus interpolated normals
    assert (out.render_high - out.render_mid).abs().mean() > 3 * (base.render_high - base.render_mid).abs().mean()


def test_face_mask_limits_the_detail_maps(model):
    images = _images(1)
    with torch.no_grad():
        out = model(images, torch.zeros(1, 1, 64, 64))
    assert torch.count_nonzero(out.valid_high) == 0 and torch.count_nonzero(out.deformation) == 0
    assert torch.count_nonzero(out.displacement) == 0


def test_gradients_reach_every_network(morphable):
    torch.manual_seed(1)
    model = HRN(morphable, ModelConfig.small(**TINY))
    _set_pose(model)
    out = model(_images(2, seed=7))
    loss = (out.render_high - 0.5).abs().mean() + (out.render_mid - 0.5).abs().mean() + 1e-3 * out.landmarks.mean()
    loss.backward()
    assert model.regressor.final_layers[0].weight.grad.abs().sum() > 0  # identity head
    assert model.regressor.final_layers[4].weight.grad.abs().sum() > 0  # lighting head
    assert model.mid_net.alpha.grad.abs() > 0 and model.high_net.beta.grad.abs() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mid_net.generator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.high_net.generator.parameters())


def test_float64_and_float32_agree(morphable):
    torch.manual_seed(2)
    model = HRN(morphable, ModelConfig.small(**TINY)).eval()
    _set_pose(model)
    images = _images(1, seed=9)
    with torch.no_grad():
        single = model(images)
        double = model.double()(images.double())
    assert double.render_high.dtype == torch.float64 and double.shape_mid.dtype == torch.float64
    assert_close(double.landmarks, single.landmarks, atol=1e-3)
    # a few silhouette pixels may flip between precisions; the rest agree
    diff = (double.render_high - single.render_high.double()).abs()
    assert (diff > 1e-3).float().mean() < 0.01


def test_dense_mesh_is_the_used_uv_grid(model):
    uvs, faces, index = model.dense_mesh()
    assert faces.shape == model.grid_faces.shape and int(faces.max()) == len(index) - 1
    rows, cols = index // 32, index % 32
    assert_close(uvs[:, 0], (cols + 0.5) / 32, atol=1e-7)
    assert_close(uvs[:, 1], 1 - (rows + 0.5) / 32, atol=1e-7)


def test_discriminators_score_both_maps():
    d = make_discriminators(ModelConfig.small(**TINY))
    assert d["mid"](torch.rand(2, 3, 16, 16)).shape[:2] == (2, 1)
    assert d["high"](torch.rand(2, 1, 32, 32)).shape[:2] == (2, 1)


# ----------------------------------------------------------------------------------------------
# helpers


def test_sample_image_reads_pixel_centres():
    images = torch.arange(2 * 3 * 5 * 7, dtype=torch.float64).reshape(2, 3, 5, 7)
    pixels = torch.tensor([[3.0, 2.0], [0.0, 4.0], [6.0, 0.0]], dtype=torch.float64)  # (x, row)
    grid = pixels.T.reshape(1, 2, 1, 3).expand(2, -1, -1, -1)
    out = sample_image(images, grid)
    for k, (x, r) in enumerate(pixels.long().tolist()):
        assert_close(out[:, :, 0, k], images[:, :, r, x], atol=1e-9)
    between = torch.tensor([2.5, 1.0], dtype=torch.float64).reshape(1, 2, 1, 1).expand(2, -1, -1, -1)
    halfway = sample_image(images, between)
    assert_close(halfway[:, :, 0, 0], (images[:, :, 1, 2] + images[:, :, 1, 3]) / 2, atol=1e-9)


def test_grid_vertex_normals_match_a_loop():
    torch.manual_seed(0)
    vertices = torch.rand(1, 9, 3, dtype=torch.float64)
    faces = torch.tensor([[0, 1, 4], [0, 4, 3], [1, 2, 5], [1, 5, 4], [3, 4, 7], [3, 7, 6]])
    got = grid_vertex_normals(vertices, faces)[0]
    v = vertices[0]
    for i in range(9):
        total = torch.zeros(3, dtype=torch.float64)
        for f in faces.tolist():
            if i in f:
                a, b, c = (v[k] for k in f)
                total += F.normalize(torch.linalg.cross(a - b, b - c), dim=0)
        expected = F.normalize(total, dim=0) if total.norm() > 0 else total
        assert_close(got[i], expected, atol=1e-12, msg=f"vertex {i}")


def test_fill_border_extends_valid_values_only_outward():
    maps = torch.zeros(1, 1, 5, 5)
    mask = torch.zeros(1, 1, 5, 5)
    maps[0, 0, 2, 2], mask[0, 0, 2, 2] = 3.0, 1.0
    maps[0, 0, 0, 0] = 99.0  # outside the mask: must be ignored
    filled = fill_border(maps, mask, texels=1)
    assert filled[0, 0, 1:4, 1:4].eq(3.0).all()
    assert filled[0, 0, 0, 0] == 0 and filled[0, 0, 4, 4] == 0


def test_morphable_model_needs_uvs(tmp_path, morphable):
    config = ModelConfig.small(**TINY)
    no_uv = dataclasses.replace(morphable, uv=None)
    with pytest.raises(InputError, match="uv_file"):
        HRN(no_uv, config)
    uv = morphable.uv.numpy()
    np.save(tmp_path / "uv.npy", uv[::-1].copy())
    loaded = load_hrn_morphable(dataclasses.replace(config, uv_file=str(tmp_path / "uv.npy")))
    assert_close(loaded.uv, torch.as_tensor(uv[::-1].copy()), atol=0)
    np.save(tmp_path / "bad.npy", uv[:10])
    with pytest.raises(FileFormatError, match="bad.npy"):
        load_hrn_morphable(dataclasses.replace(config, uv_file=str(tmp_path / "bad.npy")))


# ----------------------------------------------------------------------------------------------
# GPU paths against the CPU one (run only where CUDA, and for the second test nvdiffrast, is there)


def _forward_and_grads(model: HRN, images: torch.Tensor) -> tuple[HRNOutput, dict[str, torch.Tensor]]:
    """Outputs, and the gradients of a photometric-style loss on R1 and R2, of the regressor's
    pose, light and identity heads."""
    model.zero_grad()
    out = model(images)
    loss = (out.render_high - 0.5).abs().mean() + (out.render_mid - 0.5).abs().mean()
    loss.backward()
    heads = {"identity": 0, "angles": 3, "light": 4, "xy": 5}
    return out, {name: model.regressor.final_layers[i].weight.grad.flatten().cpu() for name, i in heads.items()}


def _assert_same_model(a: tuple, b: tuple, *, render_atol: float, grad_cosine: float) -> None:
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert_close(out_b.landmarks.cpu(), out_a.landmarks.cpu(), atol=1e-3, msg="landmarks")
    assert_close(out_b.shape_mid.cpu(), out_a.shape_mid.cpu(), atol=1e-4, msg="M1")
    for key in ("render_mid", "render_high"):
        diff = (getattr(out_b, key).cpu() - getattr(out_a, key).cpu()).abs()
        # a few silhouette and edge pixels may go to the neighbouring triangle; the rest agree
        assert (diff > render_atol).float().mean() < 0.01, f"{key}: {(diff > render_atol).float().mean():.3%} differ"
    for name in grads_a:
        cosine = F.cosine_similarity(grads_a[name], grads_b[name], dim=0)
        assert cosine > grad_cosine, f"{name} head gradients differ (cosine {cosine:.4f})"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_and_cpu_give_the_same_model(morphable):
    torch.manual_seed(3)
    config = ModelConfig.small(**TINY, rasterizer="torch")
    cpu_model = HRN(morphable, config).eval()
    _set_pose(cpu_model)
    cuda_model = HRN(morphable, config).eval()
    cuda_model.load_state_dict(cpu_model.state_dict())
    images = _images(2, seed=11)
    _assert_same_model(_forward_and_grads(cpu_model, images), _forward_and_grads(cuda_model.cuda(), images.cuda()),
                       render_atol=1e-3, grad_cosine=0.99)


@pytest.mark.skipif(not HAS_NVDIFFRAST, reason="needs nvdiffrast and a CUDA device")
def test_nvdiffrast_and_torch_renderers_give_the_same_model(morphable):
    torch.manual_seed(4)
    models = {name: HRN(morphable, ModelConfig.small(**TINY, rasterizer=name)).eval().cuda()
              for name in ("torch", "nvdiffrast")}
    _set_pose(models["torch"])
    models["nvdiffrast"].load_state_dict(models["torch"].state_dict())
    assert models["nvdiffrast"].rasterizer_for(torch.device("cuda")).name == "nvdiffrast"
    images = _images(2, seed=12).cuda()
    _assert_same_model(*(_forward_and_grads(models[name], images) for name in ("torch", "nvdiffrast")),
                       render_atol=2e-3, grad_cosine=0.98)
