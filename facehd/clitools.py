"""Shared pieces of the command lines: error reporting without tracebacks and progress bars."""

from __future__ import annotations

import functools
import sys

import click

from facehd.errors import FaceHDError

# A progress bar appears only when a pass takes longer than this, so small jobs stay quiet.
PROGRESS_DELAY_S = 1.0


def reports_errors(func):
    """The toolkit's own errors become a one-line message and exit status 1, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except FaceHDError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def progress(iterable, *, total: int | None = None, desc: str = "", unit: str = "it"):
    """A tqdm bar on stderr (never stdout, which carries the results)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, delay=PROGRESS_DELAY_S, leave=False)
