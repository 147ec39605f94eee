"""MV-HRN: the calibrated camera, the fast kernels against facehd's, shared variables, the fit's
accuracy with more views, determinism and the fused result."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from mv_factory import SIZE, render_truth, rig, tiny_model  # noqa: E402

from facehd import conventions as cv  # noqa: E402
from facehd.morphable import compute_shape, vertex_normals  # noqa: E402
from facehd.procrustes import fit_similarity  # noqa: E402
from facehd.uv import rasterize_attributes, sample_uv_map  # noqa: E402
from hrn_baseline.fuse import MIN_TOTAL_WEIGHT, blend, fuse  # noqa: E402
from hrn_baseline.losses import photometric_loss  # noqa: E402
from hrn_baseline.model import grid_vertex_normals, project_rows  # noqa: E402
from hrn_baseline.mv import (  # noqa: E402
    MVConfig,
    _raster_tables,
    crop_camera_matrix,
    fit_multiview,
    grid_normals,
    initial_state,
    load_mv_config,
    model_vertex_normals,
    mv_losses,
    render_views,
    triangulate,
    tv_std_loss,
    uv_gather,
)

FAST = dict(iterations=2, rigid_iterations=20, landmark_iterations=60)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    diff = (actual - expected).detach().abs()
    worst = int(diff.argmax())
    assert float(diff.max()) <= atol, f"largest difference {float(diff.max()):.3g} at flat index {worst}"


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def truth(model):
    return render_truth(model, rig())


# ----------------------------------------------------------------------------------------------
# geometry


def test_crop_camera_matrix_projects_like_the_camera_and_crop(truth):
    """A world point projected by the OpenCV camera and the crop affine lands where the project's
    pinhole puts C (R X + t)."""
    views, _ = truth
    view = dataclasses.replace(views[3], crop_k=np.array([0.8, 0.7]), crop_d=np.array([5.0, -3.0]))
    points = np.random.default_rng(0).normal(0, 50, (10, 3))
    pixels, _ = view.camera.project(points)
    expected = pixels * view.crop_k + view.crop_d
    cam = view.camera.to_camera(points)
    ours = project_rows(torch.as_tensor(cam @ crop_camera_matrix(view, SIZE).T)[None], SIZE)[0].numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-9)


def test_triangulate_recovers_points_seen_twice(truth):
    views, _ = truth
    cameras = [v.camera for v in views[:3]]
    points = np.random.default_rng(1).normal(0, 40, (5, 3))
    seen = [np.array([1, 1, 0, 1, 1]), np.array([1, 0, 0, 1, 1]), np.array([1, 1, 0, 0, 1])]
    found, ok = triangulate(cameras, [c.project(points)[0] for c in cameras], seen)
    np.testing.assert_array_equal(ok, [True, True, False, True, True])
    np.testing.assert_allclose(found[ok], points[ok], atol=1e-6)


def test_calibrated_render_matches_the_landmarks_it_was_made_from(model, truth):
    """The true state's keypoints project onto the rendered views' landmarks (the cameras tie the
    head pose to every view)."""
    views, state = truth
    out = render_views(model, torch.stack([v.image for v in views]), state)
    assert_close(out.landmarks.double(), torch.as_tensor(np.stack([v.landmarks for v in views])), atol=1e-4)
    assert (out.render_mask.flatten(1).sum(1) > 50).all()


# ----------------------------------------------------------------------------------------------
# fast kernels against facehd's


def test_fast_normals_and_uv_gather_match_facehd_values_and_gradients(model):
    mm = model.morphable
    torch.manual_seed(0)
    shape = (mm.mean_shape + 0.01 * torch.randn(2, *mm.mean_shape.shape)).requires_grad_(True)
    weights = torch.randn(2, *mm.mean_shape.shape)

    def both(fast, slow):
        a = fast(shape)
        (ga,) = torch.autograd.grad((a * weights).sum(), shape)
        b = slow(shape)
        (gb,) = torch.autograd.grad((b * weights).sum(), shape)
        assert_close(a, b)
        assert_close(ga, gb, atol=1e-3)

    both(lambda v: model_vertex_normals(v, mm.faces, mm.point_buf), lambda v: vertex_normals(v, mm.faces, mm.point_buf))
    both(lambda v: grid_normals(v, mm.faces), lambda v: grid_vertex_normals(v, mm.faces))
    corners, bary, mask, _ = _raster_tables(model)
    fast = uv_gather(shape, corners, bary, mask, model.high_size)
    slow, _ = rasterize_attributes(shape, mm.uv, mm.faces, model.high_size, raster=model.uv_raster)
    assert_close(fast, slow)


def test_tv_std_loss_is_hrns_formula():
    x = torch.randn(2, 3, 5, 6)
    dv, dh = (x[:, :, 1:] - x[:, :, :-1]) ** 2, (x[..., 1:] - x[..., :-1]) ** 2
    naive = 2 * (((dv - dv.mean()) ** 2).sum() + ((dh - dh.mean()) ** 2).sum()) / 2
    assert_close(tv_std_loss(x), naive)


# ----------------------------------------------------------------------------------------------
# the fit


def test_shared_variables_are_one_tensor_with_gradients_from_every_view(model, truth):
    views, _ = truth
    views = views[:3]
    state = initial_state(model, views, calibrated=True, from_checkpoint=False)
    state.deformation = state.deformation + 0.001  # away from 0, where the TV terms' gradients vanish
    for v in state.variables():
        v.requires_grad_(True)
    assert state.id.shape == (1, cv.N_ID) and state.deformation.shape == (1, 3, model.mid_size, model.mid_size)
    images = torch.stack([v.image for v in views])
    for i in range(len(views)):
        out = render_views(model, images, state)
        loss = mv_losses(state, out, images, torch.as_tensor(np.stack([v.landmarks for v in views])).float(),
                         torch.as_tensor(np.stack([v.visible for v in views])).float(), MVConfig().weights)
        assert set(loss) >= {"photo_high", "landmark", "deformation_tv", "displacement_tv"}
        # the photo and landmark terms of view i alone
        single = photometric_loss(out.render_high[i:i + 1], images[i:i + 1], out.render_mask[i:i + 1].detach()) \
            + (out.landmarks[i] - torch.as_tensor(views[i].landmarks).float()).pow(2).mean()
        id_grad, deformation_grad, exp_grad = torch.autograd.grad(single, [state.id, state.deformation, state.exp])
        assert id_grad.abs().sum() > 0 and deformation_grad.abs().sum() > 0, f"no gradient from view {i}"
        others = [j for j in range(len(views)) if j != i]
        assert exp_grad[others].abs().sum() == 0 and exp_grad[i].abs().sum() > 0


def test_start_from_a_model_takes_the_mean_of_its_per_view_ids_and_deformation_maps(model, truth):
    """As upstream: the shared id and deformation are the means of the network's per-view ones;
    the per-view variables are the network's (here random, untrained weights)."""
    views, _ = truth
    views = views[:3]
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(torch.stack([v.image for v in views]))
    state = initial_state(model, views, calibrated=False, from_checkpoint=True)
    assert_close(state.id[0], out.coeffs[:, :cv.N_ID].mean(0))
    assert_close(state.deformation[0], out.deformation.mean(0))
    assert_close(state.exp, out.coeffs[:, cv.COEFF_SLICES["exp"]])
    assert_close(state.displacement, out.displacement)
    calibrated = initial_state(model, views, calibrated=True, from_checkpoint=True)
    assert calibrated.angle is None and calibrated.head_angle.shape == (1, 3)


def _mid_error(model, state, true_state) -> float:
    """RMS distance (model units) of the fitted M1 to the true one after a similarity alignment."""
    mm = model.morphable

    def mid(s, exp):
        return (compute_shape(mm, s.id, exp[None]) + sample_uv_map(s.deformation, mm.uv))[0].double().numpy()

    fitted, target = mid(state, state.exp.mean(0)), mid(true_state, true_state.exp[0])
    aligned = fit_similarity(fitted, target).apply(fitted)
    return float(np.sqrt(((aligned - target) ** 2).sum(1).mean()))


def test_more_views_reconstruct_the_face_better(model):
    """The accuracy claim in small: 5 calibrated views give at most 0.8 x the median error of the
    same views fitted one at a time."""
    views, true_state = render_truth(model, rig((0, 1, 2, 5, 6)), seed=3)
    config = MVConfig(iterations=3, landmark_iterations=150)
    single = [_mid_error(model, fit_multiview(model, [v], config).state, true_state) for v in views]
    joint = _mid_error(model, fit_multiview(model, views, config).state, true_state)
    assert joint <= 0.8 * np.median(single), (joint, single)


def test_uncalibrated_fit_finds_each_views_pose(model, truth, tmp_path):
    """Without cameras (views cropped by the public preprocessing, one pose each), the landmark
    start finds every view's pose, the side views' too."""
    from mv_factory import write_capture

    from hrn_baseline.mv_inputs import read_capture_views
    from hrn_baseline.preprocess import standard_landmarks

    views, _ = truth
    write_capture(tmp_path / "S001" / "neutral", views)
    cropped = read_capture_views(tmp_path / "S001" / "neutral", standard_landmarks(model.morphable), SIZE,
                                 views=["cam0", "cam3", "cam4"], calibrated=False).views
    fit = fit_multiview(model, cropped, MVConfig(calibrated=False, iterations=1))
    assert not fit.state.calibrated and fit.state.angle.shape == (3, 3)
    yaw = np.degrees(fit.state.angle[:, 1].numpy())
    # the rig's cam3 / cam4 sit at 60 degrees to the subject's right / left: the head turns the other way
    assert abs(yaw[0]) < 10 and 50 < yaw[1] < 70 and -70 < yaw[2] < -50, yaw
    error = fit.render.landmarks.double().numpy() - np.stack([v.landmarks for v in cropped])
    visible = np.stack([v.visible for v in cropped]) > 0
    assert np.sqrt((error**2).sum(-1)[visible].mean()) < 2.0  # pixels of a 64-pixel crop


def test_fused_output_is_deterministic_for_a_seed(model, truth):
    views, _ = truth
    a = fuse(model, fit_multiview(model, views[:3], MVConfig(seed=5, **FAST)))
    b = fuse(model, fit_multiview(model, views[:3], MVConfig(seed=5, **FAST)))
    for name in ("displacement", "texture", "mid", "dense", "weights"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ----------------------------------------------------------------------------------------------
# fusion


def test_blend_weights_by_visibility_and_leaves_unseen_texels_zero():
    maps = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 3.0)])
    weights = torch.tensor([[[1.0, 0.0], [0.25, 0.0]], [[1.0, 1.0], [0.75, MIN_TOTAL_WEIGHT / 4]]])
    fused, valid, normalized = blend(maps, weights)
    np.testing.assert_allclose(fused[0].numpy(), [[2.0, 3.0], [2.5, 0.0]])
    np.testing.assert_array_equal(valid.numpy(), [[True, True], [True, False]])
    np.testing.assert_allclose(normalized.sum(0).numpy(), [[1, 1], [1, 0]])


def test_fused_maps_come_from_the_views_that_see_each_texel(model, truth):
    """Each view gets its own constant displacement: the fused map is a convex blend of them,
    lateral views dominate their own side, and the fused mesh uses the chosen expression."""
    views, state = truth
    views = views[:3]  # frontal, and the rig's -30 and +30 degree cameras
    state = dataclasses.replace(initial_state(model, views, calibrated=True, from_checkpoint=False),
                                displacement=torch.tensor([1.0, 2.0, 3.0]).reshape(3, 1, 1, 1).expand(
                                    3, 1, model.high_size, model.high_size).clone() * 1e-3)
    state.exp = torch.randn(3, cv.N_EXP) * 0.1
    images = torch.stack([v.image for v in views])
    from hrn_baseline.mv import MVFit

    fit = MVFit(state=state, render=render_views(model, images, state), views=views, losses={}, history=[])
    fused = fuse(model, fit, "cam1")
    d = fused.displacement[0][fused.valid] * 1e3
    assert fused.valid.any() and (d >= 1 - 1e-4).all() and (d <= 3 + 1e-4).all()
    assert (fused.displacement[0][~fused.valid] == 0).all()
    assert torch.equal(fused.exp, state.exp[1])
    # the texels seen by one view only carry that view's value
    only = [(fused.weights[i] > 0.999) & fused.valid for i in range(3)]
    for i in range(3):
        if only[i].any():
            assert_close(fused.displacement[0][only[i]] * 1e3, torch.full_like(d[:1], i + 1.0).expand(
                int(only[i].sum())), atol=1e-3)
    assert sum(int(o.sum()) for o in only) > 0


def test_config_file_overrides_and_errors(tmp_path):
    path = tmp_path / "mv.yaml"
    path.write_text("loss: {preset: public_code, weights: {landmark: 0.5}}\nfit: {iterations: 7}\n")
    config = load_mv_config(path, lr=0.01)
    assert (config.iterations, config.lr, config.weights.landmark, config.weights.photo_high) == (7, 0.01, 0.5, 1.92)
    path.write_text("fit: {iterations: -1}\n")
    with pytest.raises(Exception, match="iterations"):
        load_mv_config(path)
    path.write_text("loss: {weights: {photo: 1}}\n")
    with pytest.raises(Exception, match="unknown loss weight"):
        load_mv_config(path)
    default = load_mv_config(Path(__file__).parents[2] / "configs" / "mv_hrn.yaml")
    assert default == MVConfig()

