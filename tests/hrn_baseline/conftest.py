"""Fixtures of the trainer and predictor tests: a tiny in-the-wild set, a lab set, a checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# `hrn_factory.py` beside the tests is imported as `hrn_factory`.
sys.path.insert(0, str(Path(__file__).parent))

from hrn_factory import WILD_IMAGES, WILD_SIZE, make_lab_set, tiny_config, tiny_model_config  # noqa: E402

from facehd.synth.wild import generate_wild  # noqa: E402
from hrn_baseline.model import load_hrn_morphable  # noqa: E402


@pytest.fixture(scope="session")
def tiny_wild(tmp_path_factory) -> Path:
    """12 synthetic in-the-wild images (96 px) of SynthBFM-24, with `_truth/`."""
    morphable = load_hrn_morphable(tiny_model_config())
    root = tmp_path_factory.mktemp("hrn") / "wild"
    generate_wild(root, WILD_IMAGES, model=morphable, image_size=WILD_SIZE, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_lab(tmp_path_factory, tiny_wild) -> tuple[Path, Path]:
    """(root, derived) of a 2-subject FaceHD-100-layout set with GT maps for views 0 and 4."""
    return make_lab_set(tmp_path_factory.mktemp("lab"), tiny_wild)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_wild) -> Path:
    """A checkpoint of a 2-step run on the tiny wild set."""
    from hrn_baseline.train import train

    out = tmp_path_factory.mktemp("run")
    return train(tiny_config(out, tiny_wild)).last_checkpoint
