"""Choosing a rasterizer back end: which ones run here, and one instance of each on request."""

from __future__ import annotations

import functools

import torch

from facehd.errors import InputError
from hrn_baseline.environment import nvdiffrast_status
from hrn_baseline.render.base import Rasterizer
from hrn_baseline.render.nvdiffrast_backend import AVAILABLE, NvdiffrastRasterizer
from hrn_baseline.render.torch_backend import TorchRasterizer

BACKENDS = ("torch", "nvdiffrast")


def available_backends() -> tuple[str, ...]:
    """Names of the back ends usable on this machine: "torch" always, "nvdiffrast" with CUDA."""
    return tuple(name for name in BACKENDS if name == "torch" or nvdiffrast_status() == AVAILABLE)


@functools.cache
def get_rasterizer(name: str = "auto", visibility: str = "scatter") -> Rasterizer:
    """A (shared) rasterizer by name: "torch", "nvdiffrast", or "auto" (nvdiffrast when it can
    run here, else torch). ``visibility`` configures the torch back end (`TorchRasterizer`).

    Raises `BackendUnavailableError` (an `InputError`) naming what is missing: "nvdiffrast is
    not installed (pip install 'facehd[gpu]' on a CUDA machine)", or "nvdiffrast is installed,
    but no CUDA device is visible", or the import error.
    """
    if name == "auto":
        name = "nvdiffrast" if "nvdiffrast" in available_backends() else "torch"
    if name == "torch":
        return TorchRasterizer(visibility=visibility)
    if name == "nvdiffrast":
        return NvdiffrastRasterizer()
    raise InputError(f"unknown rasterizer back end {name!r}; choose from auto, {', '.join(BACKENDS)}")


def default_rasterizer(device: torch.device | str | None = None) -> Rasterizer:
    """The back end for tensors on ``device``: nvdiffrast for CUDA tensors where it can run,
    else the torch back end (which runs on any device)."""
    on_cuda = device is not None and torch.device(device).type == "cuda"
    return get_rasterizer("nvdiffrast" if on_cuda and "nvdiffrast" in available_backends() else "torch")
