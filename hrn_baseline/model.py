"""The HRN forward model (DESIGN.md section 3): coefficients -> coarse mesh M0, deformation map ->
mid mesh M1, displacement map -> detail normals on the dense UV grid, SH shading, renders R1 and R2."""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from facehd import conventions as cv
from facehd.errors import InputError
from facehd.morphable import (
    MorphableModel,
    Reconstruction,
    face_normals,
    load_morphable_model,
    project,
    reconstruct,
    rigid_transform,
    sh_shading,
    split_coeffs,
    to_camera,
    vertex_normals,
    y_up_to_rows,
)
from facehd.uv import (
    UVRaster,
    dense_positions_from_map,
    rasterize_attributes,
    read_uv_file,
    sample_uv_map,
    uv_grid_mesh,
    uv_rasterize,
)
from hrn_baseline.config import ModelConfig
from hrn_baseline.networks import BaseRegressor, HighDetailNet, MidDetailNet, PatchDiscriminator, load_weights
from hrn_baseline.render import Rasterizer, default_rasterizer, get_rasterizer, render_mesh

# Colour maps are extended this many texels past the UV chart's border before the render looks
# them up, so bilinear lookups at the silhouette do not blend the face with the empty (black) texels.
BORDER_FILL_TEXELS = 2


@dataclass
class HRNOutput:
    """Everything `HRN.forward` computes for a batch. Pixels are (x, row), row 0 at the top;
    geometry is in model units (1 unit ~ 100 mm); UV maps are (B, C, H, W) in the `facehd.uv`
    convention. "mid" and "high" are the deformation (Hm = `mid_map_size`) and displacement
    (Hh = `high_map_size`) resolutions."""

    coeffs: torch.Tensor  # (B, 257)
    coarse: Reconstruction  # M0: shape, posed vertices, normals, albedo, colours, projections (y up)
    position_map: torch.Tensor  # (B, 3, Hm, Hm) M0 model-space positions, the mid net's input
    texture_map: torch.Tensor  # (B, 3, Hm, Hm) the image unwrapped into UV through M0, in [0, 1]
    valid_mid: torch.Tensor  # (B, 1, Hm, Hm) in [0, 1]: UV coverage (x the image's face mask)
    deformation: torch.Tensor  # (B, 3, Hm, Hm) model-space offsets
    offsets_mid: torch.Tensor  # (B, N, 3) the deformation map sampled at the vertices' UVs
    shape_mid: torch.Tensor  # (B, N, 3) M1 = M0 shape + offsets_mid, before pose
    vertices_mid_cam: torch.Tensor  # (B, N, 3) M1 in the camera frame
    proj_mid: torch.Tensor  # (B, N, 2) M1 projected, pixels (x, row)
    normals_mid: torch.Tensor  # (B, N, 3) posed vertex normals of M1
    landmarks: torch.Tensor  # (B, 68, 2) M1 keypoints projected, pixels (x, row)
    landmarks_coarse: torch.Tensor  # (B, 68, 2) M0 keypoints projected, pixels (x, row)
    position_map_high: torch.Tensor  # (B, 3, Hh, Hh) M0 positions, the high net's input
    texture_map_high: torch.Tensor  # (B, 3, Hh, Hh) the image re-sampled through M1, in [0, 1]
    valid_high: torch.Tensor  # (B, 1, Hh, Hh)
    displacement: torch.Tensor  # (B, 1, Hh, Hh) offsets along M0's normal (as `facehd.detail`)
    dense_vertices: torch.Tensor  # (B, Hh * Hh, 3) model-space vertices of the dense UV-grid mesh
    detail_normal_map: torch.Tensor  # (B, 3, Hh, Hh) model-space unit normals of the dense mesh
    albedo_map: torch.Tensor  # (B, 3, Hh, Hh) 3DMM albedo in [0, 1]
    render_mid: torch.Tensor  # (B, 3, S, S) R1: M1 shaded with its interpolated vertex normals
    render_high: torch.Tensor  # (B, 3, S, S) R2: M1 shaded with the detail normal map
    render_mask: torch.Tensor  # (B, 1, S, S) 1 where M1 covers the pixel


def load_hrn_morphable(config: ModelConfig, *, dtype: torch.dtype = torch.float32) -> MorphableModel:
    """The morphable model a `ModelConfig` names: its .mat file, or SynthBFM(synth_resolution,
    synth_seed) generated on the fly; `uv_file` supplies UVs for models without them (BFM09)."""
    if config.morphable_model is not None:
        model = load_morphable_model(config.morphable_model, dtype=dtype)
    else:
        from facehd.synth.bfm import write_synth_bfm

        with tempfile.TemporaryDirectory(prefix="hrn-bfm-") as tmp:
            path = write_synth_bfm(Path(tmp) / "BFM_model_front.mat", config.synth_resolution, config.synth_seed)
            model = load_morphable_model(path, dtype=dtype)
    if config.uv_file is not None:
        uv = read_uv_file(config.uv_file, model.n_vertices)
        model = dataclasses.replace(model, uv=torch.as_tensor(uv, dtype=dtype))
    if model.uv is None:
        raise InputError(f"{model.source or 'the morphable model'} has no per-vertex UVs: set model.uv_file to an "
                         "(N, 2) .npy of UVs in [0, 1] (HRN ships one for BFM09)")
    return model


def make_discriminators(config: ModelConfig) -> nn.ModuleDict:
    """The two PatchGANs of the adversarial loss: "mid" on deformation maps (3 channels) and
    "high" on displacement maps (1 channel)."""
    def make(channels: int) -> PatchDiscriminator:
        return PatchDiscriminator(channels, config.disc_ndf, config.disc_layers, config.disc_norm)

    return nn.ModuleDict({"mid": make(3), "high": make(1)})


# ----------------------------------------------------------------------------------------------
# small differentiable helpers


def sample_image(images: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S) images, (B, 2, H, W) pixel positions (x, row; centres at integers) -> (B, C, H, W)
    bilinear samples, 0 outside the image."""
    height, width = images.shape[-2:]
    grid = torch.stack([(2 * pixels[:, 0] + 1) / width - 1, (2 * pixels[:, 1] + 1) / height - 1], dim=-1)
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


def grid_vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(B, V, 3) vertices, (F, 3) faces -> (B, V, 3) unit normals: the normalized sum of the unit
    normals of the faces around each vertex (DESIGN section 3), 0 where no face uses a vertex."""
    fn = face_normals(vertices, faces)
    summed = torch.zeros_like(vertices)
    for k in range(3):
        summed = summed.index_add(1, faces[:, k], fn)
    return F.normalize(summed, dim=-1)


def fill_border(maps: torch.Tensor, mask: torch.Tensor, texels: int = BORDER_FILL_TEXELS) -> torch.Tensor:
    """(B, C, H, W) maps valid where (1, 1, H, W) ``mask`` is 1 -> maps whose empty texels within
    ``texels`` of the valid region hold the mean of their valid neighbours (values inside unchanged)."""
    kernel = maps.new_ones(1, 1, 3, 3)
    filled, known = maps * mask, mask.expand(maps.shape[0], 1, *maps.shape[-2:])
    for _ in range(texels):
        total = F.conv2d(filled.reshape(-1, 1, *maps.shape[-2:]), kernel, padding=1).reshape(maps.shape)
        count = F.conv2d(known, kernel, padding=1)
        grow = (count > 0) & (known == 0)
        filled = torch.where(grow, total / count.clamp_min(1), filled)
        known = torch.where(grow, torch.ones_like(known), known)
    return filled


def project_rows(vertices_cam: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, N, 3) camera-frame points -> (B, N, 2) pixels (x, row) of the project's camera scaled to
    ``image_size`` pixels (`facehd.morphable.project`, then rows counted from the top)."""
    scale = image_size / cv.IMAGE_SIZE
    return y_up_to_rows(project(vertices_cam, cv.FOCAL * scale, cv.PRINCIPAL_POINT * scale), image_size)


def _posed(normals: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    return normals @ rotation.transpose(-1, -2)


def _flat(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H * W, C)."""
    return maps.flatten(2).transpose(1, 2)


def _unflat(values: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H * W, C) -> (B, C, H, W)."""
    return values.transpose(1, 2).reshape(values.shape[0], -1, size, size)


# ----------------------------------------------------------------------------------------------
# the model


class HRN(nn.Module):
    """HRN: the base regressor, the mid (deformation) and high (displacement) detail networks and
    the face formation around them, batched and differentiable; device and dtype follow the module.

    The morphable model is held as non-persistent buffers (not in the state dict: checkpoints name
    the model file in their config instead of copying a licence-restricted model). The detail nets
    see their inputs (position, texture and deformation maps) detached, as conditioning: the coarse
    fit learns from its own renders, not from what the detail nets would like it to be.
    """

    def __init__(self, morphable: MorphableModel, config: ModelConfig | None = None, *,
                 rasterizer: Rasterizer | None = None):
        super().__init__()
        config = config or ModelConfig()
        morphable = morphable.to("cpu")  # built on the CPU like any module; .to(device) moves it
        if morphable.uv is None:
            raise InputError(f"{morphable.source or 'the morphable model'} has no per-vertex UVs (see model.uv_file)")
        self.config = config
        self.image_size = config.image_size
        self.mid_size, self.high_size = config.mid_map_size, config.high_map_size
        self.regressor = BaseRegressor(config.backbone, config.backbone_weights)
        if config.regressor_weights is not None:
            load_weights(self.regressor, config.regressor_weights, what="a Deep3DFaceRecon net_recon state dict")
        self.mid_net = MidDetailNet(config.mid_ngf, config.mid_blocks, config.norm, config.dropout)
        self.high_net = HighDetailNet(config.high_ngf, config.high_blocks, config.norm, config.dropout)
        self._rasterizer = rasterizer
        self._register_morphable(morphable)
        self._register_uv_grid(morphable)

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: ModelConfig, **kwargs) -> HRN:
        return cls(load_hrn_morphable(config), config, **kwargs)

    @classmethod
    def small(cls, morphable: MorphableModel | None = None, **overrides) -> HRN:
        """A CPU-sized HRN (`ModelConfig.small`) for tests and demos."""
        config = ModelConfig.small(**overrides)
        return cls(morphable if morphable is not None else load_hrn_morphable(config), config)

    def _register_morphable(self, morphable: MorphableModel) -> None:
        self._morphable_template = morphable
        self._morphable_tensors = []
        for f in dataclasses.fields(morphable):
            value = getattr(morphable, f.name)
            if torch.is_tensor(value):
                self.register_buffer(f"mm_{f.name}", value.clone(), persistent=False)
                self._morphable_tensors.append(f.name)

    def _register_uv_grid(self, morphable: MorphableModel) -> None:
        """The UV raster of the model at the displacement map's size, its coverage, and the faces
        of the dense UV-grid mesh, wound so that their normals point out of the face."""
        size = self.high_size
        raster = uv_rasterize(morphable.uv, morphable.faces, size)
        self.register_buffer("uv_face_index", raster.face_index, persistent=False)
        self.register_buffer("uv_bary", raster.bary.to(morphable.mean_shape.dtype), persistent=False)
        self.register_buffer("uv_mask", raster.mask, persistent=False)
        coverage = raster.mask.to(morphable.mean_shape.dtype)[None, None]
        self.register_buffer("uv_coverage", coverage, persistent=False)
        _, faces = uv_grid_mesh(size, size, mask=raster.mask)
        faces = self._outward(morphable, raster, faces)
        self.register_buffer("grid_faces", faces, persistent=False)
        used = torch.zeros(size * size, dtype=torch.bool)
        used[faces.reshape(-1)] = True
        self.register_buffer("grid_used", used, persistent=False)

    def _outward(self, morphable: MorphableModel, raster: UVRaster, faces: torch.Tensor) -> torch.Tensor:
        """Flip the grid faces when their normals on the mean shape oppose the model's normals
        (the UV layout may mirror the surface)."""
        mean = morphable.mean_shape[None]
        normals = vertex_normals(mean, morphable.faces, morphable.point_buf)
        maps, _ = rasterize_attributes(torch.cat([mean, normals], -1), morphable.uv, morphable.faces,
                                       self.high_size, raster=raster)
        grid = grid_vertex_normals(_flat(maps[:, :3]), faces)
        agreement = (grid * _flat(maps[:, 3:])).sum()
        return faces[:, [0, 2, 1]] if agreement < 0 else faces

    @property
    def morphable(self) -> MorphableModel:
        """The morphable model on this module's device and dtype."""
        return dataclasses.replace(self._morphable_template,
                                   **{name: getattr(self, f"mm_{name}") for name in self._morphable_tensors})

    @property
    def uv_raster(self) -> UVRaster:
        return UVRaster(self.uv_face_index, self.uv_bary, self.uv_mask, num_vertices=int(self.mm_mean_shape.shape[0]),
                        num_faces=int(self.mm_faces.shape[0]))

    def rasterizer_for(self, device: torch.device) -> Rasterizer:
        if self._rasterizer is not None:
            return self._rasterizer
        if self.config.rasterizer == "auto":
            return default_rasterizer(device)
        return get_rasterizer(self.config.rasterizer)

    def dense_mesh(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The dense UV-grid mesh without unused texels: UVs (K, 2), faces (M, 3) and the grid index
        (r * Hh + c) of each kept vertex (K,), to pick them out of `HRNOutput.dense_vertices`."""
        vertex_index, faces = torch.unique(self.grid_faces, return_inverse=True)
        size = self.high_size
        rows, cols = vertex_index // size, vertex_index % size
        uvs = torch.stack([(cols + 0.5) / size, 1.0 - (rows + 0.5) / size], dim=-1).to(self.uv_bary.dtype)
        return uvs, faces, vertex_index

    # --- forward --------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, face_mask: torch.Tensor | None = None) -> HRNOutput:
        """(B, 3, S, S) RGB in [0, 1] (S = `image_size`), optional (B, 1, S, S) face mask -> `HRNOutput`.

        With a face mask, texels whose image position falls off the mask are invalid for the
        detail maps (HRN's occlusion-aware valid mask); without one the UV coverage is used.
        """
        s = self.image_size
        if images.ndim != 4 or images.shape[1:] != (3, s, s):
            raise InputError(f"images have shape {tuple(images.shape)}, expected (B, 3, {s}, {s})")
        if face_mask is not None and face_mask.shape != (images.shape[0], 1, s, s):
            raise InputError(f"face_mask has shape {tuple(face_mask.shape)}, expected ({images.shape[0]}, 1, {s}, {s})")
        return self.decode(images, self.regressor(images), face_mask)

    def decode(self, images: torch.Tensor, coeffs: torch.Tensor, face_mask: torch.Tensor | None = None
               ) -> HRNOutput:
        """Everything after the regressor, from given (B, 257) coefficients (`forward` = regressor +
        decode); useful to fit coefficients directly or to share them across views."""
        mm, s = self.morphable, self.image_size
        faces, uv = mm.faces, mm.uv
        coarse = reconstruct(mm, coeffs, image_size=s)
        gamma, trans = split_coeffs(coeffs).gamma, split_coeffs(coeffs).trans
        rows0 = y_up_to_rows(coarse.proj, s)

        # M0 in UV at the high size: positions, image positions (texture lookup), albedo, normals
        normals0 = coarse.normals @ coarse.rotation  # back to model space (posed = n R^T)
        m0, _ = rasterize_attributes(torch.cat([coarse.shape, rows0, coarse.albedo, normals0], -1), uv, faces,
                                     self.high_size, raster=self.uv_raster)
        position_high, where0, albedo_map = m0[:, 0:3], m0[:, 3:5].detach(), m0[:, 5:8]
        coverage = self.uv_coverage.to(images.dtype)
        valid_high = coverage.expand(images.shape[0], -1, -1, -1)
        if face_mask is not None:
            valid_high = valid_high * (sample_image(face_mask.to(images.dtype), where0) > 0.5).to(images.dtype)
        texture_high0 = sample_image(images, where0) * coverage

        # mid frequency: HRN downsamples its 256^2 position, texture and valid maps to 64^2
        position_map = self._down(position_high.detach())
        texture_map = self._down(texture_high0)
        valid_mid = self._down(valid_high)
        deformation = self.mid_net(position_map, 2.0 * texture_map - 1.0, valid_mid)
        offsets_mid = sample_uv_map(deformation, uv)
        shape_mid = coarse.shape + offsets_mid
        vertices_mid_cam = to_camera(rigid_transform(shape_mid, coarse.rotation, trans))
        proj_mid = project_rows(vertices_mid_cam, s)
        normals_mid_model = vertex_normals(shape_mid, faces, mm.point_buf)

        # high frequency: the image re-sampled through M1, the displacement on the dense grid
        m1, _ = rasterize_attributes(torch.cat([shape_mid, normals_mid_model, proj_mid], -1), uv, faces,
                                     self.high_size, raster=self.uv_raster)
        texture_map_high = sample_image(images, m1[:, 6:8].detach()) * coverage
        displacement = self.high_net(position_high.detach(), 2.0 * texture_map_high - 1.0, deformation.detach(),
                                     valid_high)
        # the detailed surface of `facehd.detail` (and its GT maps): M1's positions moved along M0's normals
        dense = dense_positions_from_map(m1[:, 0:3], m0[:, 8:11], displacement)
        mid_normals_flat = F.normalize(_flat(m1[:, 3:6]), dim=-1)
        detail = grid_vertex_normals(dense, self.grid_faces)
        detail = torch.where(self.grid_used[None, :, None], detail, mid_normals_flat)

        # shading in UV (HRN renders both levels through UV colour maps), then one render of M1
        colour_mid = sh_shading(_flat(albedo_map), _posed(mid_normals_flat, coarse.rotation), gamma)
        colour_high = sh_shading(_flat(albedo_map), _posed(detail, coarse.rotation), gamma)
        colour_maps = fill_border(_unflat(torch.cat([colour_mid, colour_high], -1), self.high_size), coverage)
        rasterizer = self.rasterizer_for(images.device)
        rendered = render_mesh(vertices_mid_cam, faces, uv, s, rasterizer=rasterizer)
        mask = rendered.mask[:, None].to(images.dtype)
        looked_up = rasterizer.texture(colour_maps, rendered.image).permute(0, 3, 1, 2) * mask

        keypoints = mm.keypoints
        return HRNOutput(
            coeffs=coeffs, coarse=coarse, position_map=position_map, texture_map=texture_map, valid_mid=valid_mid,
            deformation=deformation, offsets_mid=offsets_mid, shape_mid=shape_mid, vertices_mid_cam=vertices_mid_cam,
            proj_mid=proj_mid,
            normals_mid=_posed(normals_mid_model, coarse.rotation), landmarks=proj_mid[:, keypoints],
            landmarks_coarse=rows0[:, keypoints], position_map_high=position_high, texture_map_high=texture_map_high,
            valid_high=valid_high, displacement=displacement, dense_vertices=dense,
            detail_normal_map=_unflat(detail, self.high_size) * coverage, albedo_map=albedo_map,
            render_mid=looked_up[:, 0:3], render_high=looked_up[:, 3:6], render_mask=mask,
        )

    def _down(self, maps: torch.Tensor) -> torch.Tensor:
        """High-size maps -> mid size; antialiased, so each mid texel averages its high texels
        (HRN's plain bilinear resize would sample 2 x 2 of every 4 x 4)."""
        if self.mid_size == self.high_size:
            return maps
        return F.interpolate(maps, size=(self.mid_size, self.mid_size), mode="bilinear", align_corners=False,
                             antialias=True)
