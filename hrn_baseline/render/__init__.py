"""Differentiable rasterization for HRN: one interface, a pure-PyTorch and an nvdiffrast back end."""

from hrn_baseline.render.backends import available_backends, default_rasterizer, get_rasterizer
from hrn_baseline.render.base import Fragments, Rasterizer
from hrn_baseline.render.camera import Rendered, camera_to_clip, perspective_projection, render_mesh
from hrn_baseline.render.nvdiffrast_backend import BackendUnavailableError, NvdiffrastRasterizer
from hrn_baseline.render.torch_backend import TorchRasterizer, visibility_open3d, visibility_scatter

__all__ = [
    "BackendUnavailableError",
    "Fragments",
    "NvdiffrastRasterizer",
    "Rasterizer",
    "Rendered",
    "TorchRasterizer",
    "available_backends",
    "camera_to_clip",
    "default_rasterizer",
    "get_rasterizer",
    "perspective_projection",
    "render_mesh",
    "visibility_open3d",
    "visibility_scatter",
]
