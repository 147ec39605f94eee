"""Ground truth of a synthetic FaceHD-100 capture: coefficients, the mid-frequency deformation map,
the high-frequency displacement map, and the true detailed surface they define (one definition,
shared with the consumers of `_truth/`)."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
import torch
from scipy.ndimage import gaussian_filter

from facehd import conventions as cv
from facehd.errors import InputError
from facehd.morphable import MorphableModel, compute_shape, load_morphable_model, vertex_normals
from facehd.synth.bfm import EXPRESSION_NAMES, write_synth_bfm
from facehd.synth.scan import HoleEllipse
from facehd.uv import (
    UVRaster,
    dense_positions_from_map,
    rasterize_attributes,
    sample_uv_map,
    uv_grid_mesh,
    uv_rasterize,
)

MID_SIZE = cv.DEFORMATION_MAP_SIZE  # 64: the deformation map is 3 x 64 x 64
HIGH_SIZE = cv.DISPLACEMENT_MAP_SIZE  # 256: the displacement map (and the true surface grid) 1 x 256 x 256
MM = 1.0 / cv.MM_PER_MODEL_UNIT  # one millimetre in model units

# --- coefficients (in units of each basis' standard deviation: the bases are premultiplied) ------
ID_COEFF_STD = 1.0
TEX_COEFF_STD = 0.7
TEX_COEFF_CLIP = 2.0  # SynthBFM keeps colours in 0..255 up to 2 sigma along any one component
EXP_NOISE_STD = 0.1  # every capture carries a little involuntary expression
EXP_STRENGTH = (1.5, 2.5)  # coefficient of the named expression's component

# --- mid frequency: smooth bumps in UV, narrower than any SynthBFM identity component ---------
# (its identity fields are cosines of at most 6 half-periods across UV), so outside the 3DMM span.
MID_BUMPS = 20
MID_SIGMA_UV = (0.035, 0.08)  # ~6-15 mm on the face
MID_DIRECTION_WEIGHTS = (0.5, 0.5, 1.0)  # mostly in depth, the way soft tissue differs
MID_PEAK_MM = (1.0, 2.0)  # the largest offset of a subject's field

# --- high frequency (mm): wrinkle bands and pores, a displacement along the coarse normal --------
FOREHEAD_MM = (0.15, 0.3)  # per-subject amplitude range of the horizontal forehead lines
FOREHEAD_PERIOD = (0.08, 0.12)  # model units between lines (8-12 mm)
FOREHEAD_CURVE = (0.2, 0.5)  # the lines rise toward the temples: y + curve x^2
FOREHEAD_BROW_GAP = 0.07  # lines start this far above the highest brow landmark
FOREHEAD_HAIR_GAP = 0.04  # and stop this far below the hair band
FOREHEAD_HALF_WIDTH = 0.42
FOREHEAD_EDGE = 0.06  # soft edges of the forehead window
CROWS_FEET_MM = (0.1, 0.2)
CROWS_FEET_RADIUS = (0.07, 0.03)  # radial band (centre, width) around the outer eye corner
CROWS_FEET_SPREAD = 0.9  # radians either side of horizontal
CROWS_FEET_SPACING = (0.35, 0.5)  # radians between lines
NASOLABIAL_MM = (0.15, 0.28)
NASOLABIAL_WIDTH = 0.012  # groove half-width (~1.2 mm)
NASOLABIAL_TOP = (0.03, 0.02)  # (outward, up) offset from the nostril-wing landmark
NASOLABIAL_BOTTOM = (0.035, -0.07)  # (outward, down) offset from the mouth corner
# Pores themselves (0.05-0.25 mm wide) are far below a texel of the 256 x 256 map (~0.9 mm): what
# the map holds of them is the skin's micro-relief averaged over a texel, a few hundredths of a
# millimetre, and only as fine as the map resolves (finer content would alias).
PORE_MM = 0.02  # standard deviation of the pore-scale roughness
PORE_SMOOTH_TEXELS = 1.0
# Expressions deepen their wrinkles: gain = 1 + WRINKLE_GAIN_PER_SIGMA * sum of the positive
# coefficients (sigmas) of the listed expression components.
WRINKLE_GAIN_PER_SIGMA = 0.25
WRINKLE_EXPRESSIONS = {
    "forehead": ("brow_raise", "brow_raise_left", "brow_raise_right", "frown"),
    "crows_feet": ("smile", "smile_left", "smile_right", "squint_left", "squint_right"),
    "nasolabial": ("smile", "smile_left", "smile_right", "upper_lip_raise"),
}

# --- scan holes, around the model's landmarks (model units) ------------------------------------
# The eyeball fails between the corners (the canthi stay, on the hole's rim, where annotators
# click them); above and below, the lashes and lid rims fail with it.
EYE_HOLE_LID_MARGIN = 0.015
EYE_LID_APEX = 1.25  # the lid landmarks sit off the lid's apex, which is this much further out
NOSTRIL_HOLE_RADII = (0.04, 0.028)  # a nostril opening is about 8 x 5 mm
IBUG_RIGHT_EYE, IBUG_LEFT_EYE = slice(36, 42), slice(42, 48)
IBUG_BROWS = slice(17, 27)
IBUG_NOSTRILS = ((31, 32, 33), (33, 34, 35))  # subject's right, left
IBUG_OUTER_EYE_CORNERS = (36, 45)
IBUG_NOSE_WINGS = (31, 35)
IBUG_MOUTH_CORNERS = (48, 54)


# ----------------------------------------------------------------------------------------------
# the model


def load_truth_model(resolution: int, seed: int = 0) -> MorphableModel:
    """SynthBFM(resolution, seed) exactly as the generator uses it: written as a .mat file and
    loaded back in float64 (recentred mean, float32-stored bases), so truth rebuilt from
    ``model_resolution`` and ``model_seed`` matches the generator's to the last bit."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_synth_bfm(Path(tmp) / "BFM_model_front.mat", resolution, seed)
        return load_morphable_model(path, dtype=torch.float64)


def synth_model_parameters(path: str | Path) -> tuple[int, int]:
    """(resolution, seed) of a SynthBFM file from its ``synth_info`` field; (-1, -1) if absent."""
    info = scipy.io.loadmat(str(path), variable_names=["synth_info"]).get("synth_info")
    text = "" if info is None else "".join(str(v) for v in np.asarray(info).reshape(-1))
    found = {key: re.search(rf"\b{key}=(\d+)", text) for key in ("resolution", "seed")}
    return tuple(int(m.group(1)) if m else -1 for m in found.values())


@dataclass(frozen=True, eq=False)
class ModelContext:
    """What every capture needs from the model, computed once: the model (float64), its UV raster
    at the truth's grid size, the grid mesh's faces, and per-texel maps of the mean shape."""

    model: MorphableModel
    raster: UVRaster
    grid_faces: np.ndarray  # (K, 3) faces of the truth's UV-grid mesh
    valid: np.ndarray  # (H, W) texels the model covers
    mean_map: np.ndarray  # (H, W, 3) mean shape per texel, model units
    region_map: np.ndarray  # (H, W) region code per texel (-1: empty)
    mean_keypoints: np.ndarray  # (68, 3) mean-shape landmarks
    resolution: int  # SynthBFM parameters, -1 when unknown
    seed: int

    def region_code(self, name: str) -> int:
        return self.model.region_names.index(name)


def build_model_context(model: MorphableModel, resolution: int = -1, seed: int = -1) -> ModelContext:
    """Check that ``model`` carries UVs and region labels (SynthBFM does, BFM09 does not) and
    precompute its `ModelContext`."""
    where = model.source or "the morphable model"
    if model.uv is None or model.region is None:
        raise InputError(f"{where}: the synthetic FaceHD-100 needs per-vertex UVs and region labels "
                         "(a SynthBFM file from `facehd synth model`; BFM09 has neither)")
    missing = [n for n in ("eyes", "hair_band") if n not in model.region_names]
    if missing:
        raise InputError(f"{where}: no region(s) {', '.join(missing)} among {', '.join(model.region_names)}")
    model = model.to(dtype=torch.float64)
    raster = uv_rasterize(model.uv, model.faces, HIGH_SIZE)
    valid = raster.mask.numpy()
    _, faces = uv_grid_mesh(HIGH_SIZE, HIGH_SIZE, mask=raster.mask)
    mean_map, _ = rasterize_attributes(model.mean_shape, model.uv, model.faces, HIGH_SIZE, raster)
    corner = raster.bary.argmax(dim=-1, keepdim=True)
    nearest = model.faces[raster.face_index.clamp(min=0)].gather(-1, corner)[..., 0]
    region_map = np.where(valid, model.region[nearest].numpy(), -1)
    return ModelContext(
        model=model, raster=raster, grid_faces=faces.numpy(), valid=valid,
        mean_map=mean_map.permute(1, 2, 0).numpy(), region_map=region_map,
        mean_keypoints=model.mean_shape[model.keypoints].numpy(), resolution=resolution, seed=seed,
    )


def scan_holes(ctx: ModelContext) -> list[HoleEllipse]:
    """Where scanners lose the surface: the eye openings (with lashes) and the nostrils."""
    kp = ctx.mean_keypoints[:, :2]
    holes = []
    for eye in (IBUG_RIGHT_EYE, IBUG_LEFT_EYE):
        pts = kp[eye]
        centre = 0.5 * (pts[0] + pts[3])  # between the corners
        half_width = 0.5 * abs(pts[3, 0] - pts[0, 0])
        half_height = EYE_LID_APEX * np.abs(pts[:, 1] - centre[1]).max() + EYE_HOLE_LID_MARGIN
        holes.append(HoleEllipse(tuple(centre), (half_width, half_height)))
    for nostril in IBUG_NOSTRILS:
        holes.append(HoleEllipse(tuple(kp[list(nostril)].mean(axis=0)), NOSTRIL_HOLE_RADII))
    return holes


# ----------------------------------------------------------------------------------------------
# coefficients and detail fields


@dataclass(frozen=True, eq=False)
class SubjectTruth:
    """What stays fixed across a subject's captures: identity and texture coefficients, the
    deformation map and the wrinkle / pore layers the expressions modulate."""

    id_coeff: np.ndarray  # (80,)
    tex_coeff: np.ndarray  # (80,)
    deformation_map: np.ndarray  # (3, 64, 64) float32, model units
    detail_layers: dict[str, np.ndarray]  # name -> (H, W) displacement, model units


def sample_subject_truth(ctx: ModelContext, rng: np.random.Generator) -> SubjectTruth:
    """Draw one subject's identity, texture, mid-frequency deformation and detail layers."""
    id_coeff = rng.normal(0.0, ID_COEFF_STD, cv.N_ID)
    tex_coeff = np.clip(rng.normal(0.0, TEX_COEFF_STD, cv.N_TEX), -TEX_COEFF_CLIP, TEX_COEFF_CLIP)
    return SubjectTruth(id_coeff, tex_coeff, deformation_map(ctx, rng), detail_layers(ctx, rng))


def expression_coefficients(expression: str, rng: np.random.Generator) -> np.ndarray:
    """(64,) expression coefficients of a capture: small noise on every component, plus the named
    SynthBFM expression component (its first columns follow `EXPRESSION_NAMES`) unless neutral."""
    exp = rng.normal(0.0, EXP_NOISE_STD, cv.N_EXP)
    if expression != "neutral":
        exp[EXPRESSION_NAMES.index(expression)] = rng.uniform(*EXP_STRENGTH)
    return exp


def _texel_uv(size: int) -> np.ndarray:
    """(size, size, 2) UV of each texel centre (row 0 at v = 1)."""
    centres = (np.arange(size) + 0.5) / size
    u, v = np.meshgrid(centres, 1.0 - centres)
    return np.stack([u, v], axis=-1)


def deformation_map(ctx: ModelContext, rng: np.random.Generator) -> np.ndarray:
    """(3, 64, 64) float32 smooth random field of model-space offsets (a sum of Gaussian bumps in
    UV centred on the face), scaled so its largest offset is 1-2 mm."""
    uv = _texel_uv(MID_SIZE)
    front_uv = ctx.model.uv[ctx.model.front_vertices].numpy()
    centres = front_uv[rng.choice(len(front_uv), size=MID_BUMPS, replace=False)]
    sigmas = rng.uniform(*MID_SIGMA_UV, size=MID_BUMPS)
    directions = rng.normal(size=(MID_BUMPS, 3)) * np.asarray(MID_DIRECTION_WEIGHTS)
    amplitudes = rng.normal(size=MID_BUMPS)
    field = np.zeros((MID_SIZE, MID_SIZE, 3))
    for centre, sigma, direction, amplitude in zip(centres, sigmas, directions, amplitudes):
        bump = np.exp(-0.5 * ((uv - centre) ** 2).sum(axis=-1) / sigma**2)
        field += amplitude * bump[..., None] * direction
    peak = rng.uniform(*MID_PEAK_MM) * MM
    field *= peak / np.linalg.norm(field, axis=-1).max()
    return field.transpose(2, 0, 1).astype(np.float32)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def detail_layers(ctx: ModelContext, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A subject's high-frequency layers, (H, W) each in model units: forehead lines, crow's feet,
    nasolabial folds (expression-dependent, see `displacement_map`) and pores."""
    x, y = ctx.mean_map[..., 0], ctx.mean_map[..., 1]
    kp = ctx.mean_keypoints
    return {
        "forehead": _forehead_lines(ctx, x, y, rng),
        "crows_feet": sum(_crows_feet(x, y, kp[i, :2], rng) for i in IBUG_OUTER_EYE_CORNERS),
        "nasolabial": sum(_nasolabial_fold(x, y, kp[w, :2], kp[m, :2], rng)
                          for w, m in zip(IBUG_NOSE_WINGS, IBUG_MOUTH_CORNERS)),
        "pores": _pores(ctx, rng),
    }


def _forehead_lines(ctx: ModelContext, x, y, rng) -> np.ndarray:
    hair = ctx.region_map == ctx.region_code("hair_band")
    low = ctx.mean_keypoints[IBUG_BROWS, 1].max() + FOREHEAD_BROW_GAP
    high = (y[hair].min() if hair.any() else y.max()) - FOREHEAD_HAIR_GAP
    window = (_smoothstep((y - low) / FOREHEAD_EDGE) * _smoothstep((high - y) / FOREHEAD_EDGE)
              * _smoothstep((FOREHEAD_HALF_WIDTH - np.abs(x)) / FOREHEAD_EDGE))
    period = rng.uniform(*FOREHEAD_PERIOD)
    curve = rng.uniform(*FOREHEAD_CURVE)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    amplitude = rng.uniform(*FOREHEAD_MM) * MM
    return amplitude * window * np.sin(2.0 * np.pi * (y + curve * x * x) / period + phase)


def _crows_feet(x, y, corner, rng) -> np.ndarray:
    """Lines fanning out from an outer eye corner, on the temple side only."""
    outward = np.sign(corner[0]) * (x - corner[0])
    up = y - corner[1]
    radius, angle = np.hypot(outward, up), np.arctan2(up, outward)
    centre, width = CROWS_FEET_RADIUS
    window = (_smoothstep(outward / 0.01) * np.exp(-(((radius - centre) / width) ** 2))
              * _smoothstep((CROWS_FEET_SPREAD - np.abs(angle)) / 0.2))
    spacing = rng.uniform(*CROWS_FEET_SPACING)
    amplitude = rng.uniform(*CROWS_FEET_MM) * MM
    return amplitude * window * np.sin(2.0 * np.pi * angle / spacing + rng.uniform(0.0, 2.0 * np.pi))


def _nasolabial_fold(x, y, wing, mouth_corner, rng) -> np.ndarray:
    """A groove from beside the nostril wing to below and outside the mouth corner."""
    side = np.sign(wing[0])
    top = wing + np.array([side * NASOLABIAL_TOP[0], NASOLABIAL_TOP[1]])
    bottom = mouth_corner + np.array([side * NASOLABIAL_BOTTOM[0], NASOLABIAL_BOTTOM[1]])
    p = np.stack([x, y], axis=-1) - top
    ab = bottom - top
    t = np.clip((p @ ab) / (ab @ ab), 0.0, 1.0)
    distance = np.linalg.norm(p - t[..., None] * ab, axis=-1)
    amplitude = rng.uniform(*NASOLABIAL_MM) * MM
    return -amplitude * np.exp(-((distance / NASOLABIAL_WIDTH) ** 2)) * np.sin(np.pi * t)


def _pores(ctx: ModelContext, rng) -> np.ndarray:
    noise = gaussian_filter(rng.standard_normal(ctx.valid.shape), PORE_SMOOTH_TEXELS)
    noise *= PORE_MM * MM / noise.std()
    return np.where(ctx.region_map == ctx.region_code("eyes"), 0.0, noise)  # the eyeball is smooth


def displacement_map(ctx: ModelContext, subject: SubjectTruth, exp_coeff: np.ndarray) -> np.ndarray:
    """(1, 256, 256) float32 displacement of one capture: the subject's layers, wrinkles deepened
    by the expressions that fold them, zero outside the model's UV footprint."""
    total = np.zeros(ctx.valid.shape)
    for name, layer in subject.detail_layers.items():
        related = [EXPRESSION_NAMES.index(e) for e in WRINKLE_EXPRESSIONS.get(name, ())]
        gain = 1.0 + WRINKLE_GAIN_PER_SIGMA * np.clip(exp_coeff[related], 0.0, None).sum()
        total += gain * layer
    return np.where(ctx.valid, total, 0.0)[None].astype(np.float32)


def capture_coeffs(subject: SubjectTruth, exp_coeff: np.ndarray) -> np.ndarray:
    """(257,) float64 coefficients: id, exp, tex; angle, gamma and trans zero (model space)."""
    coeffs = np.zeros(cv.N_COEFFS)
    coeffs[cv.COEFF_SLICES["id"]] = subject.id_coeff
    coeffs[cv.COEFF_SLICES["exp"]] = exp_coeff
    coeffs[cv.COEFF_SLICES["tex"]] = subject.tex_coeff
    return coeffs


# ----------------------------------------------------------------------------------------------
# the true surface


@dataclass(frozen=True, eq=False)
class TrueSurface:
    """The true detailed surface of a capture in model space, on the H x W UV grid.

    vertices (H*W, 3) float64 (vertex r*W + c at texel (r, c); invalid texels 0), faces (K, 3)
    int64 (`uv_grid_mesh` with the valid mask), valid (H, W) bool, coarse (N, 3) float64: M0, the
    id + exp shape on the model's own mesh.
    """

    vertices: np.ndarray
    faces: np.ndarray
    valid: np.ndarray
    coarse: np.ndarray


def true_surface(model: MorphableModel, coeffs, deformation_map, displacement_map, *,
                 raster: UVRaster | None = None, grid_faces=None) -> TrueSurface:
    """THE definition of a synthetic capture's true surface (model space, the model's dtype):

    M0 = mean + idBase id + exBase exp; M1 = M0 + sample_uv_map(deformation_map, uv);
    P1 = rasterize_attributes(M1) and N0 = rasterize_attributes(vertex_normals(M0)) at the
    displacement map's size (valid = the raster mask); vertices =
    dense_positions_from_map(P1, N0, displacement_map) (N0 normalized), faces =
    uv_grid_mesh(H, W, mask=valid). ``raster`` and ``grid_faces`` may pass precomputed values.
    """
    dtype = model.mean_shape.dtype
    c = torch.as_tensor(np.asarray(coeffs), dtype=dtype)[None]
    m0 = compute_shape(model, c[:, cv.COEFF_SLICES["id"]], c[:, cv.COEFF_SLICES["exp"]])
    deformation = torch.as_tensor(np.asarray(deformation_map), dtype=dtype)
    m1 = m0 + sample_uv_map(deformation, model.uv)
    displacement = torch.as_tensor(np.asarray(displacement_map), dtype=dtype)
    size = tuple(displacement.shape[-2:])
    p1, valid = rasterize_attributes(m1, model.uv, model.faces, size, raster)
    n0, _ = rasterize_attributes(vertex_normals(m0, model.faces, model.point_buf), model.uv, model.faces, size, raster)
    vertices = dense_positions_from_map(p1, n0, displacement[None])[0]
    if grid_faces is None:
        _, grid_faces = uv_grid_mesh(*size, mask=valid)
    return TrueSurface(vertices=vertices.numpy(), faces=np.asarray(grid_faces, dtype=np.int64),
                       valid=valid.numpy(), coarse=m0[0].numpy())
