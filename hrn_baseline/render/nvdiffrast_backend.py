"""The nvdiffrast rasterizer (CUDA only), returning the same `Fragments` as the PyTorch back end:
image row 0 at the top, -1 for the background, barycentrics of faces[f, 0], faces[f, 1], faces[f, 2]."""

from __future__ import annotations

import importlib
import sys

import torch

from facehd.errors import InputError
from hrn_baseline.environment import nvdiffrast_status
from hrn_baseline.render.base import (
    Fragments,
    Rasterizer,
    check_mesh,
    check_texture_args,
    image_size,
    sample_texture,
)

AVAILABLE = "available"
# nvdiffrast stores triangle id + 1 as a float32; ids above 2^24 use a biased bit pattern
# (nvdiffrast common.h `triidx_to_float`).
_EXACT_FLOAT_IDS = 1 << 24
_LARGE_ID_BIAS = 0x4A800000


class BackendUnavailableError(InputError):
    """A renderer back end was asked for but cannot run here; the message says what is missing."""


def import_nvdiffrast():
    """The ``nvdiffrast.torch`` module, or `BackendUnavailableError` saying what is missing."""
    status = nvdiffrast_status()
    if status != AVAILABLE:
        raise BackendUnavailableError(f"the nvdiffrast back end cannot run here: nvdiffrast is {status}; "
                                      "the 'torch' back end runs anywhere")
    return importlib.import_module("nvdiffrast.torch")


def load_nvdiffrast_plugin(dr) -> None:
    """Build (first use: about 20 s) and load nvdiffrast's CUDA plugin.

    nvdiffrast 0.3 compiles its plugin with ``torch.utils.cpp_extension.load`` and then imports it
    by name, which needs the build folder on ``sys.path``; PyTorch's loader (2.11 and 2.14 seen here)
    imports the module from its file without putting the folder there, so the import fails right
    after a successful build ("No module named 'nvdiffrast_plugin_...'"). The folder is added here
    and the import retried. A failed build becomes `BackendUnavailableError`.
    """
    import torch.utils.cpp_extension  # here: on a machine without CUDA its import warns

    get_plugin = dr.ops._get_plugin
    try:
        try:
            get_plugin()
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("nvdiffrast_plugin"):
                raise
            folder = torch.utils.cpp_extension._get_build_directory(exc.name, False)
            if folder not in sys.path:
                sys.path.append(folder)
            importlib.invalidate_caches()
            get_plugin()
    except (RuntimeError, OSError, ImportError) as exc:  # no nvcc, a compiler error, a broken build
        raise BackendUnavailableError(f"nvdiffrast could not build or load its CUDA plugin ({exc}); "
                                      "the 'torch' back end runs anywhere") from exc


class NvdiffrastRasterizer(Rasterizer):
    """nvdiffrast's CUDA rasterizer (``dr.RasterizeCudaContext``), no OpenGL needed.

    nvdiffrast's ``rast_out`` is (u, v, z / w, triangle id + 1) per pixel with u, v the
    perspective-correct barycentrics of ``tri[:, 0]`` and ``tri[:, 1]`` (``tri[:, 2]`` gets
    1 - u - v; see its interpolate kernel), and its row 0 is the bottom of the image (OpenGL's
    y up). Here the rows are flipped so row 0 is the top, as in the PyTorch back end. Positions
    must be CUDA tensors; they are rasterized in float32 and results come back in the input
    dtype. Gradients reach the positions through u, v (nvdiffrast's rasterize backward), none
    through visibility; `depth` is clip w interpolated by ``dr.interpolate``.
    """

    name = "nvdiffrast"

    def __init__(self):
        self._dr = import_nvdiffrast()
        self._contexts: dict[torch.device, object] = {}

    def _plugin(self):
        load_nvdiffrast_plugin(self._dr)  # a dictionary lookup once built: nvdiffrast caches the plugin
        return self._dr

    def _context(self, device: torch.device):
        if device not in self._contexts:
            self._plugin()
            self._contexts[device] = self._dr.RasterizeCudaContext(device=device)
        return self._contexts[device]

    def rasterize(self, vertices_clip: torch.Tensor, faces: torch.Tensor, size) -> Fragments:
        h, w = image_size(size)
        check_mesh(vertices_clip, faces)
        if vertices_clip.device.type != "cuda":
            raise InputError(f"the nvdiffrast back end needs CUDA tensors, got positions on "
                             f"{vertices_clip.device}; move them with .cuda() or use the 'torch' back end")
        pos = vertices_clip.float().contiguous()
        tri = faces.to(device=pos.device, dtype=torch.int32).contiguous()
        rast, _ = self._dr.rasterize(self._context(pos.device), pos, tri, resolution=[h, w], grad_db=False)
        depth, _ = self._dr.interpolate(pos[..., 3:].contiguous(), rast, tri)

        top = rast.flip(1)  # OpenGL's bottom row first -> top row first
        face_index = _decode_triangle_ids(top[..., 3].detach()) - 1
        mask = face_index >= 0
        u, v = top[..., 0], top[..., 1]
        bary = torch.stack([u, v, 1 - u - v], dim=-1) * mask[..., None]
        return Fragments(face_index=face_index, bary=bary.to(vertices_clip.dtype),
                         depth=depth.flip(1)[..., 0].to(vertices_clip.dtype), mask=mask, raw=rast)

    def interpolate(self, attrs: torch.Tensor, fragments: Fragments, faces: torch.Tensor) -> torch.Tensor:
        if fragments.raw is None:  # fragments of another back end
            return super().interpolate(attrs, fragments, faces)
        b = fragments.face_index.shape[0]
        if attrs.ndim == 3 and attrs.shape[0] != b:
            raise InputError(f"attributes must be (B, N, C) with B = {b}, or (N, C); got {tuple(attrs.shape)}")
        tri = faces.to(device=attrs.device, dtype=torch.int32).contiguous()
        out, _ = self._dr.interpolate(attrs.float().contiguous(), fragments.raw, tri)
        return out.flip(1).to(attrs.dtype)

    def texture(self, tex: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
        if tex.device.type != "cuda":
            return sample_texture(tex, uv)
        check_texture_args(tex, uv)
        tex_hwc = tex.permute(0, 2, 3, 1).float().contiguous()  # a batch of 1 broadcasts
        # nvdiffrast's v runs down the texture's rows from its first row; the project's v runs up
        uv_dr = torch.stack([uv[..., 0], 1 - uv[..., 1]], dim=-1).float().contiguous()
        out = self._plugin().texture(tex_hwc, uv_dr, filter_mode="linear", boundary_mode="clamp")
        return out.to(tex.dtype)


def _decode_triangle_ids(ids: torch.Tensor) -> torch.Tensor:
    """nvdiffrast's float32 triangle ids (+1) -> int64 (its `float_to_triidx`)."""
    large = ids.view(torch.int32).long() - _LARGE_ID_BIAS
    return torch.where(ids <= _EXACT_FLOAT_IDS, ids.long(), large)
