import shutil
import sys
from pathlib import Path

import pytest

# `capture_factory.py` beside the tests is imported as `capture_factory`.
sys.path.insert(0, str(Path(__file__).parent))

from capture_factory import make_dataset  # noqa: E402


@pytest.fixture(scope="session")
def dataset_template(tmp_path_factory) -> Path:
    """A valid 4-subject, 2-expression dataset, made once per session; copy it before changing it."""
    return make_dataset(tmp_path_factory.mktemp("template") / "facehd100")


@pytest.fixture
def dataset(dataset_template, tmp_path) -> Path:
    """A fresh copy of the valid dataset that a test may break."""
    return Path(shutil.copytree(dataset_template, tmp_path / "facehd100"))
