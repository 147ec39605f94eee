"""One fused MV-HRN result per capture, in the canonical pose: the shared identity and
deformation map, a chosen expression, and displacement and texture maps blended in UV from the
per-view maps by each texel's visibility and viewing angle; and the files `hrn mv` writes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from facehd import conventions as cv
from facehd.errors import InputError
from facehd.fsutil import atomic_open, atomic_path
from facehd.io import Mesh, save_mesh
from facehd.morphable import compute_shape, vertex_normals
from facehd.uv import dense_positions_from_map, rasterize_attributes, sample_uv_map
from hrn_baseline.model import HRN, grid_vertex_normals, project_rows
from hrn_baseline.mv import MVFit, MVState, render_views
from hrn_baseline.predict import DEFORMATION_CHANNELS, PNG16_ENCODING, encode_png16, write_png16

# --- the fusion weights ------------------------------------------------------------------------
# A texel counts as visible in a view when it projects inside the image and its depth is within
# this of the depth buffer there (model units: 3 mm; the buffer holds the mid mesh at the nearest
# pixel centre, which on a slope may lie a few mm from the texel's own depth).
VISIBILITY_DEPTH_TOLERANCE = 0.03
# weight of a visible texel = cos(angle between its normal and the direction to the camera)^POWER:
# views that see a texel head-on resolve it best; grazing views count for little.
VIEW_COS_POWER = 2
# texels whose summed weight is below this (seen by no view, or only at > ~84 degrees) stay 0
MIN_TOTAL_WEIGHT = 1e-2
# --- the preview's shaded renders of the fused mesh: yaw of the three views, and a grey light ---
PREVIEW_YAWS_DEG = (-40.0, 0.0, 40.0)
PREVIEW_LIGHT = (-0.3, -0.25, 0.45)  # SH bands 0 (ambient), 1 (-y) and 2 (z): light from the front, above
UNITS = ("model", "mm")


@dataclass
class Fused:
    """The fused result (model space, canonical pose; model units unless stated)."""

    id: torch.Tensor  # (80,)
    exp: torch.Tensor  # (64,)
    expression: str  # "zero", "mean" or the view whose expression was taken
    deformation: torch.Tensor  # (3, Hm, Hm)
    displacement: torch.Tensor  # (1, Hh, Hh), 0 where `valid` is 0
    texture: torch.Tensor  # (3, Hh, Hh) RGB in [0, 1], 0 where `valid` is 0
    valid: torch.Tensor  # (Hh, Hh) bool: texels at least one view sees
    weights: torch.Tensor  # (N, Hh, Hh) the per-view blending weights, normalized where valid
    coarse: torch.Tensor  # (V, 3) M0 = mean + id + exp
    mid: torch.Tensor  # (V, 3) M1 = M0 + the deformation
    dense: torch.Tensor  # (Hh * Hh, 3) the detailed surface on the UV grid
    view_names: list[str]
    tex: torch.Tensor | None = None  # (80,) texture coefficients: the views' mean, or the view's


def view_weights(model: HRN, state: MVState, render) -> torch.Tensor:
    """(N, Hh, Hh) weight of each view for each texel: visible x max(0, cos)^`VIEW_COS_POWER`,
    cos between the detailed surface's normal and the direction to the view's camera; 0 where
    the texel is hidden (behind the depth buffer), off the image or outside the UV chart."""
    size, s = model.high_size, model.image_size
    with torch.no_grad():
        a, b, _ = state.cameras()
        dense = render.dense_vertices
        cam = dense @ a.transpose(-1, -2) + b[:, None]
        pixels = project_rows(cam, s).round().long()
        inside = (pixels >= 0).all(-1) & (pixels < s).all(-1)
        col, row = pixels[..., 0].clamp(0, s - 1), pixels[..., 1].clamp(0, s - 1)
        n = dense.shape[0]
        depth = render.depth[torch.arange(n, device=dense.device)[:, None], row, col]
        visible = inside & (depth > 0) & ((cam[..., 2] - depth).abs() < VISIBILITY_DEPTH_TOLERANCE)
        normals = grid_vertex_normals(dense, model.grid_faces)
        towards = F.normalize(state.camera_centres()[:, None] - dense, dim=-1)
        cos = (normals * towards).sum(-1).clamp_min(0.0)
        weights = visible * cos**VIEW_COS_POWER * model.grid_used[None]
    return weights.reshape(n, size, size)


def blend(maps: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, C, H, W) per-view maps, (N, H, W) weights -> the weighted mean (C, H, W) (0 where the
    summed weight is below `MIN_TOTAL_WEIGHT`), that mask (H, W) and the normalized weights."""
    total = weights.sum(0)
    valid = total >= MIN_TOTAL_WEIGHT
    normalized = torch.where(valid, weights / total.clamp_min(MIN_TOTAL_WEIGHT), torch.zeros_like(weights))
    return (maps * normalized[:, None]).sum(0), valid, normalized


def _expression(state: MVState, names: list[str], expression: str) -> torch.Tensor:
    if expression == "zero":
        return torch.zeros_like(state.exp[0])
    if expression == "mean":
        return state.exp.mean(0)
    if expression in names:
        return state.exp[names.index(expression)]
    raise InputError(f"expression {expression!r} is not zero, mean or one of the views ({', '.join(names)})")


def surface(model: HRN, id_coeff: torch.Tensor, exp: torch.Tensor, deformation: torch.Tensor,
            displacement: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(80,), (64,), (3, Hm, Hm), (1, Hh, Hh) -> coarse (V, 3), mid (V, 3) and the dense detailed
    surface (Hh * Hh, 3) in model space (`facehd.detail`'s definition: M1 moved along M0's normals)."""
    mm = model.morphable
    coarse = compute_shape(mm, id_coeff[None], exp[None])
    mid = coarse + sample_uv_map(deformation[None], mm.uv)
    normals0 = vertex_normals(coarse, mm.faces, mm.point_buf)
    maps, _ = rasterize_attributes(torch.cat([mid, normals0], -1), mm.uv, mm.faces, model.high_size,
                                   raster=model.uv_raster)
    dense = dense_positions_from_map(maps[:, 0:3], maps[:, 3:6], displacement[None])
    return coarse[0], mid[0], dense[0]


def fuse(model: HRN, fit: MVFit, expression: str = "zero") -> Fused:
    """The fused result of a fit (module docstring); ``expression``: zero (default), mean, or a
    view's name."""
    state, names = fit.state, [v.name for v in fit.views]
    with torch.no_grad():
        weights = view_weights(model, state, fit.render)
        displacement, valid, normalized = blend(state.displacement, weights)
        texture, _, _ = blend(fit.render.texture_map, weights)
        exp = _expression(state, names, expression)
        coarse, mid, dense = surface(model, state.id[0], exp, state.deformation[0], displacement)
    return Fused(id=state.id[0].clone(), exp=exp.clone(), expression=expression,
                 deformation=state.deformation[0].clone(), displacement=displacement, texture=texture, valid=valid,
                 weights=normalized, coarse=coarse, mid=mid, dense=dense, view_names=names,
                 tex=state.tex.mean(0).clone())


def view_result(model: HRN, fit: MVFit, index: int) -> Fused:
    """View ``index``'s own result (its expression, displacement and texture map), in model space."""
    state = fit.state
    with torch.no_grad():
        coarse, mid, dense = surface(model, state.id[0], state.exp[index], state.deformation[0],
                                     state.displacement[index])
        weights = view_weights(model, state, fit.render)[index:index + 1]
        valid = model.grid_used.reshape(model.high_size, model.high_size)
    return Fused(id=state.id[0].clone(), exp=state.exp[index].clone(), expression=fit.views[index].name,
                 deformation=state.deformation[0].clone(), displacement=state.displacement[index].clone(),
                 texture=fit.render.texture_map[index].clone(), valid=valid, weights=weights, coarse=coarse, mid=mid,
                 dense=dense, view_names=[fit.views[index].name], tex=state.tex[index].clone())


# ----------------------------------------------------------------------------------------------
# files


def _unit_factor(units: str) -> float:
    if units not in UNITS:
        raise InputError(f"units must be one of {', '.join(UNITS)}, got {units!r}")
    return cv.MM_PER_MODEL_UNIT if units == "mm" else 1.0


def _unit_label(units: str) -> str:
    return "mm" if units == "mm" else f"model (1 unit = {cv.MM_PER_MODEL_UNIT:g} mm)"


def _save_npy(path: Path, array: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        np.save(tmp, array)
    return path


def _save_png(path: Path, pixels: np.ndarray) -> Path:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
    return path


def write_result(folder: str | Path, model: HRN, result: Fused, *, units: str = "model", source: str = "",
                 coeffs: dict[str, np.ndarray] | None = None) -> list[Path]:
    """Write a fused (or one view's) result as `hrn predict` writes a view: coarse / mid / high
    OBJ with UVs and the texture, deformation and displacement .npy and 16-bit PNGs, the texture
    and valid mask as PNG, maps.json (units, PNG decoding, fusion weights) and coeffs.npz."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    factor, label = _unit_factor(units), _unit_label(units)
    mm = model.morphable
    texture = (result.texture.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()
    faces, uvs = mm.faces.cpu().numpy(), mm.uv.double().cpu().numpy()
    dense_uvs, dense_faces, dense_index = (t.cpu() for t in model.dense_mesh())
    levels = {"coarse": (result.coarse, faces, uvs), "mid": (result.mid, faces, uvs),
              "high": (result.dense[dense_index], dense_faces.numpy(), dense_uvs.double().numpy())}
    files = []
    for level, (verts, level_faces, level_uvs) in levels.items():
        metadata = {"units": "mm"} if units == "mm" else {"units": "model", "mm_per_unit": f"{cv.MM_PER_MODEL_UNIT:g}"}
        metadata.update({"space": "model, canonical pose (x left, y up, z toward the viewer)", "level": level,
                         "expression": result.expression, "views": ",".join(result.view_names), "source": source})
        path = folder / f"{level}.obj"
        save_mesh(path, Mesh(verts.double().cpu().numpy() * factor, level_faces, uvs=level_uvs, texture=texture,
                             metadata=metadata))
        files += [path, path.with_suffix(".mtl"), path.with_suffix(".png")]
    sidecar = {"units": label, "png16_encoding": PNG16_ENCODING, "maps": {},
               "texture": "the views' images re-sampled into UV through the mid mesh, blended by the weights below",
               "weights": (f"per texel and view: visible x max(0, cos)^{VIEW_COS_POWER}, cos between the detailed "
                           "surface's normal and the direction to the view's camera; visible: inside the image and "
                           f"within {VISIBILITY_DEPTH_TOLERANCE * cv.MM_PER_MODEL_UNIT:g} mm of the depth buffer. "
                           "Maps are the weighted means; texels whose summed weight is below "
                           f"{MIN_TOTAL_WEIGHT:g} are 0 and 0 in valid_mask.png"),
               "views": result.view_names, "expression": result.expression}
    for name, value in (("deformation", result.deformation), ("displacement", result.displacement)):
        array = value.double().cpu().numpy() * factor
        files.append(_save_npy(folder / f"{name}.npy", array.astype(np.float32)))
        pixels, scale = encode_png16(array)
        channels = DEFORMATION_CHANNELS if name == "deformation" else ("along the coarse normal",)
        if name == "deformation":
            pngs = [write_png16(folder / f"{name}_{c}.png", pixels[i]) for i, c in enumerate(channels)]
        else:
            pngs = [write_png16(folder / f"{name}.png", pixels[0])]
        sidecar["maps"][name] = {"npy": f"{name}.npy", "png": [p.name for p in pngs], "shape": list(array.shape),
                                 "scale": scale, "channels": list(channels)}
        files += pngs
    files.append(_save_png(folder / "texture.png", texture))
    files.append(_save_png(folder / "valid_mask.png", result.valid.cpu().numpy().astype(np.uint8) * 255))
    files.append(_save_npy(folder / "view_weights.npy", result.weights.cpu().numpy().astype(np.float32)))
    sidecar["maps"]["view_weights"] = {"npy": "view_weights.npy", "shape": list(result.weights.shape),
                                       "order": result.view_names}
    with atomic_open(folder / "maps.json") as fh:
        json.dump(sidecar, fh, indent=2)
    files.append(folder / "maps.json")
    # the 257-vector of `hrn predict` for the canonical pose: id, exp, the views' mean texture, no pose or light
    vector = torch.zeros(cv.N_COEFFS, dtype=torch.float64)
    vector[cv.COEFF_SLICES["id"]], vector[cv.COEFF_SLICES["exp"]] = result.id.double().cpu(), result.exp.double().cpu()
    if result.tex is not None:
        vector[cv.COEFF_SLICES["tex"]] = result.tex.double().cpu()
    arrays = {"coeffs": vector.numpy(), "id": result.id.double().cpu().numpy(),
              "exp": result.exp.double().cpu().numpy(), "expression": np.array(result.expression),
              "units": np.array(label), **(coeffs or {})}
    with atomic_open(folder / "coeffs.npz", "wb") as fh:
        np.savez(fh, **arrays)
    files.append(folder / "coeffs.npz")
    return files


def fit_coefficients(fit: MVFit, units: str = "model") -> dict[str, np.ndarray]:
    """The fit's per-view variables for coeffs.npz (translations in ``units``)."""
    state, factor = fit.state, _unit_factor(units)
    out = {"view_names": np.array([v.name for v in fit.views]), "view_exp": state.exp, "view_tex": state.tex,
           "view_gamma": state.gamma}
    if state.calibrated:
        out.update(head_angle=state.head_angle[0], head_trans=state.head_trans[0] * factor)
        out["head_pose_note"] = np.array("model -> camera rig world: X_mm = 100 (R(head_angle) v + head_trans / "
                                         "(mm per unit)), R = Rz Ry Rx of the angles (radians); cameras.json's world")
    else:
        out.update(view_angle=state.angle, view_trans=state.trans * factor)
    return {k: (v.detach().double().cpu().numpy() if torch.is_tensor(v) else v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# preview


def _shaded_turns(model: HRN, result: Fused) -> torch.Tensor:
    """(3, 3, S, S) the fused detailed mesh with the mean albedo, from `PREVIEW_YAWS_DEG`."""
    n, s = len(PREVIEW_YAWS_DEG), model.image_size
    t = dict(dtype=result.id.dtype, device=result.id.device)
    gamma = torch.zeros(n, 3, 9, **t)
    gamma[:, :, 0], gamma[:, :, 1], gamma[:, :, 2] = PREVIEW_LIGHT
    angle = torch.zeros(n, 3, **t)
    angle[:, 1] = torch.tensor(np.radians(PREVIEW_YAWS_DEG), **t)
    state = MVState(id=result.id[None], deformation=result.deformation[None], exp=result.exp.expand(n, -1),
                    tex=torch.zeros(n, cv.N_TEX, **t), gamma=gamma.reshape(n, -1),
                    displacement=result.displacement.expand(n, -1, -1, -1), angle=angle, trans=torch.zeros(n, 3, **t))
    with torch.no_grad():
        out = render_views(model, torch.zeros(n, 3, s, s, **t), state)
    background = torch.full_like(out.render_high, 0.2)
    return torch.where(out.render_mask > 0, out.render_high, background)


def write_preview(path: str | Path, model: HRN, fit: MVFit, result: Fused) -> Path:
    """A PNG sheet: the views (crops, landmarks green, the fit's landmarks red), the fit's renders
    over them, and the fused mesh shaded from three angles."""
    from PIL import Image, ImageDraw

    s = model.image_size
    crops = torch.stack([v.image for v in fit.views]).to(fit.render.render_high)
    mask = fit.render.render_mask
    overlay = crops * (1 - mask) + fit.render.render_high.clamp(0, 1) * mask
    turns = _shaded_turns(model, result)
    columns = max(len(fit.views), len(PREVIEW_YAWS_DEG))
    sheet = Image.new("RGB", (columns * s, 3 * s), (40, 40, 40))

    def paste(image: torch.Tensor, col: int, row: int) -> None:
        pixels = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()
        sheet.paste(Image.fromarray(pixels), (col * s, row * s))

    draw = ImageDraw.Draw(sheet)
    radius = max(1.0, s / 200)
    for i, view in enumerate(fit.views):
        paste(crops[i], i, 0)
        paste(overlay[i], i, 1)
        fitted = fit.render.landmarks[i].detach().cpu().numpy()
        for (x, y), seen in zip(view.landmarks, view.visible):
            if seen and np.isfinite(x):
                draw.ellipse((i * s + x - radius, y - radius, i * s + x + radius, y + radius), fill=(0, 255, 0))
        for x, y in fitted:
            draw.ellipse((i * s + x - radius, y - radius, i * s + x + radius, y + radius), fill=(255, 0, 0))
        draw.text((i * s + 3, 3), view.name, fill=(255, 255, 0))
    for j in range(len(PREVIEW_YAWS_DEG)):
        paste(turns[j], j, 2)
    draw.text((3, 2 * s + 3), f"fused ({result.expression} expression)", fill=(255, 255, 0))
    path = Path(path)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


__all__ = ["Fused", "blend", "fit_coefficients", "fuse", "surface", "view_result", "view_weights", "write_preview",
           "write_result"]
