"""Tiny MV-HRN inputs for the tests: a SynthBFM-24 face with random identity, deformation and
displacement, rendered by the MV-HRN forward model through cameras of the synthetic FaceHD-100 rig,
in memory (`MVView`s) or written as a FaceHD-100 capture folder."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from facehd import conventions as cv
from facehd.capture import CAMERA_NAMES, capture_paths, write_cameras, write_landmarks68
from facehd.synth.render_views import rig_cameras
from hrn_baseline.model import HRN, load_hrn_morphable
from hrn_baseline.mv import MVState, MVView, crop_camera_matrix, render_views

SIZE = 64  # photo and crop size: the tiny model's input
TINY = dict(synth_resolution=24, image_size=SIZE, mid_map_size=16, high_map_size=32, mid_ngf=4, high_ngf=4,
            mid_blocks=1, high_blocks=1, disc_ndf=4, disc_layers=2, backbone="resnet18")


@functools.cache
def tiny_model() -> HRN:
    from hrn_baseline.config import ModelConfig

    config = ModelConfig.small(**TINY)
    return HRN(load_hrn_morphable(config), config).eval()


def true_state(model: HRN, cameras, seed: int = 0) -> MVState:
    """A random face (id 1 sigma, small exp, smooth deformation and displacement) in a calibrated rig."""
    rng = np.random.default_rng(seed)
    n, hm, hh = len(cameras), model.mid_size, model.high_size
    t = dict(dtype=torch.float32)

    def smooth(channels: int, size: int, scale: float) -> torch.Tensor:
        coarse = torch.as_tensor(rng.normal(size=(1, channels, 4, 4)), **t)
        return scale * torch.nn.functional.interpolate(coarse, size=size, mode="bicubic", align_corners=False)

    gamma = torch.zeros(n, 3, 9, **t)
    gamma[:, :, 1], gamma[:, :, 2] = -0.2, 0.3
    views = [MVView(name=f"v{i}", source=Path(f"v{i}"), image=torch.zeros(3, SIZE, SIZE), landmarks=np.zeros((68, 2)),
                    visible=np.ones(68), camera=c) for i, c in enumerate(cameras)]
    mats = torch.as_tensor(np.stack([crop_camera_matrix(v, SIZE) for v in views]), **t)
    return MVState(id=torch.as_tensor(rng.normal(size=(1, cv.N_ID)), **t),
                   deformation=smooth(3, hm, 0.01),
                   exp=torch.as_tensor(0.2 * rng.normal(size=(1, cv.N_EXP)), **t).expand(n, -1).clone(),
                   tex=torch.as_tensor(0.5 * rng.normal(size=(1, cv.N_TEX)), **t).expand(n, -1).clone(),
                   gamma=gamma.reshape(n, -1), displacement=smooth(1, hh, 0.002).expand(n, -1, -1, -1).clone(),
                   head_angle=torch.as_tensor(np.radians(rng.normal(0, 3, (1, 3))), **t),
                   head_trans=torch.as_tensor(rng.normal(0, 0.02, (1, 3)), **t),
                   view_rotation=torch.as_tensor(np.stack([c.R for c in cameras]), **t), view_matrix=mats,
                   view_offset=torch.as_tensor(np.stack([c.t for c in cameras]) / cv.MM_PER_MODEL_UNIT, **t))


def rig(indices=tuple(range(9)), seed: int = 0):
    """Cameras of the synthetic FaceHD-100 rig (mm) aimed at the origin, SIZE x SIZE images."""
    cameras = rig_cameras(np.zeros(3), SIZE, np.random.default_rng(seed))
    return [cameras[i] for i in indices]


def render_truth(model: HRN, cameras, seed: int = 0) -> tuple[list[MVView], MVState]:
    """The views of a random face (uncropped: photo = crop) and its true state."""
    state = true_state(model, cameras, seed)
    with torch.no_grad():
        out = render_views(model, torch.zeros(len(cameras), 3, SIZE, SIZE), state)
        images = out.render_high.clamp(0, 1) * out.render_mask + 0.3 * (1 - out.render_mask)
        mm = model.morphable
        from facehd.morphable import vertex_normals

        normals = vertex_normals(out.shape_mid, mm.faces, mm.point_buf)[:, mm.keypoints]
        towards = state.camera_centres()[:, None] - out.shape_mid[:, mm.keypoints]
        visible = ((normals * towards).sum(-1) > 0).float()
    views = []
    for i, camera in enumerate(cameras):
        photo = (images[i].permute(1, 2, 0) * 255).round().byte().numpy()
        views.append(MVView(name=CAMERA_NAMES[i], source=Path(f"{CAMERA_NAMES[i]}.png"), image=images[i].clone(),
                            landmarks=out.landmarks[i].double().numpy(), visible=visible[i].double().numpy(),
                            camera=camera, photo=photo))
    return views, state


def write_capture(directory: Path, views: list[MVView]) -> Path:
    """A FaceHD-100 capture folder of the views: images/cam<i>.png, landmarks68/, cameras.json."""
    paths = capture_paths(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    for view, path, lm_path in zip(views, paths.images, paths.landmarks68):
        Image.fromarray(view.photo).save(path.with_suffix(".png"))
        write_landmarks68(lm_path, np.concatenate([view.landmarks, view.visible[:, None]], axis=1))
    write_cameras(paths.cameras, {name: v.camera for name, v in zip(CAMERA_NAMES, views)})
    return directory


def replace_views(views: list[MVView], **changes) -> list[MVView]:
    return [dataclasses.replace(v, **changes) for v in views]
