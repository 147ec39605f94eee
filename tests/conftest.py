import sys
from pathlib import Path

# `tests/helpers.py` is imported as `helpers` by the test modules.
sys.path.insert(0, str(Path(__file__).parent))

import pytest


@pytest.fixture(autouse=True)
def progress_bars_always_shown(monkeypatch):
    """Show every progress bar at once, as a slow or busy machine does.

    Bars appear only after a delay, so on a fast machine they stay hidden and a test that parses a
    command's combined output passes by luck. With no delay they always appear (on stderr), and
    tests must read results from stdout or files.
    """
    import facehd.clitools

    monkeypatch.setattr(facehd.clitools, "PROGRESS_DELAY_S", 0.0)
