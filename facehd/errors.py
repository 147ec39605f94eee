"""The one exception family of the toolkit: every message names the file and what is wrong."""

from __future__ import annotations

from pathlib import Path


class FaceHDError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class FileFormatError(FaceHDError):
    """A file exists but its content is malformed, truncated or inconsistent."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{problem}")


class ModelFileError(FileFormatError):
    """A morphable-model file (BFM_model_front.mat layout) has missing or inconsistent fields."""


class MeshFormatError(FileFormatError):
    """A mesh file (OBJ, PLY, VRML) cannot be parsed."""


class InputError(FaceHDError):
    """Arguments or arrays given to a function are invalid (wrong shape, NaN, wrong units)."""
