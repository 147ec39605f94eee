"""What the HRN trainer can use on this machine: library versions, devices, renderer back ends."""

from __future__ import annotations

import importlib
import importlib.util
import platform

import torch


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception:  # a broken optional install must not break the report
        return None


def nvdiffrast_status() -> str:
    """'available', or why the nvdiffrast back end cannot be used here."""
    if importlib.util.find_spec("nvdiffrast") is None:
        return "not installed (pip install 'facehd[gpu]' on a CUDA machine)"
    if not torch.cuda.is_available():
        return "installed, but no CUDA device is visible"
    try:
        importlib.import_module("nvdiffrast.torch")
    except Exception as exc:
        return f"installed, but it does not import: {exc}"
    return "available"


def environment_report() -> dict[str, str]:
    """Versions and capabilities relevant to training, as display strings."""
    cuda = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision") or "missing",
        "open3d": _version("open3d") or "missing (needs the system library libusb-1.0)",
        "cpu threads": str(torch.get_num_threads()),
        "cuda": ", ".join(devices) if devices else "no CUDA device",
        "nvdiffrast": nvdiffrast_status(),
    }
