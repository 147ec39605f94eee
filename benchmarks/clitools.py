"""Pieces shared by the benchmark commands: `--pred NAME=DIR` parsing and per-stage progress bars."""

from __future__ import annotations

import sys
from pathlib import Path

import click


def parse_preds(values: tuple[str, ...]) -> dict[str, Path]:
    """`--pred NAME=DIR` values -> {name: directory}; a malformed or repeated name is a usage error."""
    preds: dict[str, Path] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not name or not directory:
            raise click.BadParameter(f"expected NAME=DIR, got {value!r}", param_hint="--pred")
        if name in preds:
            raise click.BadParameter(f"method name {name!r} given twice", param_hint="--pred")
        preds[name] = Path(directory)
    return preds


class StageProgress:
    """One tqdm bar on stderr per stage (registering, evaluating, ...), made on the stage's first report."""

    def __init__(self, benchmark: str):
        self.benchmark = benchmark
        self.stage = None
        self.bar = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.close()
            from tqdm import tqdm

            self.stage = stage
            self.bar = tqdm(total=total, desc=f"{self.benchmark}: {stage}", file=sys.stderr, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
