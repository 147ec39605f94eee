"""Tiny HRN training data for the trainer and predictor tests: configs for seconds-long CPU runs
and a FaceHD-100-layout lab set (built from in-the-wild images) with ground-truth maps."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import torch

from facehd.capture import (
    CAMERA_NAMES,
    SUBJECT_COLUMNS,
    Camera,
    capture_paths,
    write_cameras,
    write_landmarks7,
    write_landmarks68,
    write_subjects,
)
from facehd.dataset import GT_MAPS_DIR
from facehd.io import Mesh, save_mesh
from facehd.wild import list_names, read_landmarks
from hrn_baseline.config import Config, DataConfig, LossConfig, ModelConfig, OptimConfig, TrainConfig

# seconds-long runs: a SynthBFM-24 face (~600 vertices), 64-pixel crops, 16 / 32 texel maps
TINY_MODEL = dict(synth_resolution=24, image_size=64, mid_map_size=16, high_map_size=32, mid_ngf=4, high_ngf=4,
                  mid_blocks=1, high_blocks=1, disc_ndf=4, disc_layers=2)
WILD_IMAGES = 12
WILD_SIZE = 96  # pixels of the generated images (the crops are 64)


def tiny_model_config(**overrides) -> ModelConfig:
    return ModelConfig.small(**{**TINY_MODEL, **overrides})


def tiny_config(out: Path, wild: Path, lab: tuple[Path, Path] | None = None, val: Path | None = None,
                **train) -> Config:
    """A valid config for a few-step CPU run on the tiny sets (validating on ``val`` if given)."""
    data = DataConfig(wild=[str(wild)], val=[] if val is None else [str(val)])
    if lab is not None:
        data = dataclasses.replace(data, lab_root=str(lab[0]), lab_derived=str(lab[1]), lab_split=None,
                                   lab_views=[0, 4])
    settings = dict(steps=2, batch_size=2, log_every=1, checkpoint_every=1, seed=0, device="cpu", out=str(out))
    settings.update(train)
    return Config(data=data, model=tiny_model_config(), loss=LossConfig(),
                  optim=OptimConfig(lr_decay_steps=3), train=TrainConfig(**settings)).validate()


def make_lab_set(base: Path, wild: Path, subjects: int = 2) -> tuple[Path, Path]:
    """(root, derived): a FaceHD-100-layout set of ``subjects`` subjects (2: S001, S002) x 1 expression
    whose views are the wild images (with their landmarks), and random smooth ground-truth maps for
    views 0 and 4 (two samples per subject)."""
    lab_subjects = [f"S{i + 1:03d}" for i in range(subjects)]
    root, derived = base / "facehd100", base / "derived"
    rows = [dict(zip(SUBJECT_COLUMNS, (s, "female", 25, "asian"))) for s in lab_subjects]
    write_subjects(root / "subjects.csv", rows)
    names = list_names(wild)
    rng = np.random.default_rng(0)
    k = 0
    for subject in lab_subjects:
        paths = capture_paths(root / subject / "neutral")
        camera = Camera(K=[[100, 0, 48], [0, 100, 48], [0, 0, 1]], R=np.eye(3), t=[0, 0, 600], width=WILD_SIZE,
                        height=WILD_SIZE)
        write_cameras(paths.cameras, {name: camera for name in CAMERA_NAMES})
        write_landmarks7(paths.landmarks7, rng.normal(size=(7, 3)))
        save_mesh(paths.scan, Mesh(rng.normal(size=(4, 3)), np.array([[0, 1, 2], [0, 2, 3]])))
        for view in range(len(CAMERA_NAMES)):
            name = names[k % len(names)]
            k += 1
            image = paths.directory / "images" / f"{CAMERA_NAMES[view]}.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(wild / "images" / f"{name}.png", image)
            landmarks = read_landmarks(wild / "landmarks" / f"{name}.txt")
            write_landmarks68(paths.landmarks68[view], np.hstack([landmarks, np.ones((68, 1))]))
        for view in (0, 4):
            gt = derived / subject / "neutral" / GT_MAPS_DIR / f"{CAMERA_NAMES[view]}.npz"
            gt.parent.mkdir(parents=True, exist_ok=True)
            smooth = torch.nn.functional.interpolate(torch.as_tensor(rng.normal(size=(1, 4, 8, 8))), size=64,
                                                     mode="bilinear").numpy()[0]
            np.savez(gt, deformation=(0.002 * smooth[:3]).astype(np.float32),
                     displacement=np.repeat(np.repeat(0.0005 * smooth[3:], 4, 1), 4, 2).astype(np.float32),
                     deformation_mask=np.ones((1, 64, 64), np.uint8),
                     displacement_mask=np.ones((1, 256, 256), np.uint8))
    return root, derived
