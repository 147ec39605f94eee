"""Noisy-region masks for scan fitting: model-side eyes, nostrils, mouth interior and hair band (per
vertex and in UV), and the scan-side removal of the points that fall in them after alignment."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from facehd import conventions as cv
from facehd.distance import SurfaceIndex, as_points
from facehd.errors import InputError
from facehd.morphable import MorphableModel
from facehd.uv import UVRaster, rasterize_attributes, uv_rasterize

MM = 1.0 / cv.MM_PER_MODEL_UNIT  # model units per millimetre

# iBUG landmark groups (0-based) that outline the noisy regions.
RIGHT_EYE_IBUG = tuple(range(36, 42))
LEFT_EYE_IBUG = tuple(range(42, 48))
INNER_LIPS_IBUG = tuple(range(60, 68))
# The nostril openings sit under the nose around iBUG 32 / 34, between the ala bases (31 / 35) and
# the subnasale (33): their centres are the mean of each side's three points seen from the front
# (x-y; in 3D the mean of points on the nose's underside and the lip floats in the air).
NOSTRIL_SIDES_IBUG = ((31, 32, 33), (33, 34, 35))

# Sizes, millimetres (converted with MM). Scanners fail on the eyes (specular, moving), inside the
# nostrils (occluded) and in the hair (no surface), and a little around each, hence the margins.
EYE_MARGIN_MM = 4.0  # beyond the eyelid landmark polygon: lashes and the lid creases
NOSTRIL_RADIUS_MM = 7.0  # around each nostril centre, seen from the front
MOUTH_MARGIN_MM = 1.0  # beyond the inner-lip polygon
# A model without a labelled hair band: the top of the mesh down this far is hair / cap border.
HAIR_BAND_DEPTH_MM = 12.0
# Scan points farther than this from the aligned coarse model are spikes, background or body; the
# coarse model misses the mid-frequency shape by a few millimetres at most.
SCAN_MAX_DISTANCE_MM = 8.0
# A texel (or a scan point) belongs to a mask when the barycentric blend of its triangle's vertex
# masks is at least this.
MASK_THRESHOLD = 0.5

NOISY_REGIONS = ("eyes", "nostrils", "mouth_interior", "hair_band")
# Scan point labels, in precedence order after "kept": the first that applies is recorded.
SCAN_LABELS = ("kept", "far", *NOISY_REGIONS, "outside_face")


@dataclass(frozen=True, eq=False)
class ModelMasks:
    """Per-vertex (N,) bool masks of a morphable model.

    The noisy regions (eyes, nostrils, mouth interior, hair band) are where scans are unreliable;
    `face` is the model's front region without them: where fitted detail maps are trusted.
    """

    eyes: np.ndarray
    nostrils: np.ndarray
    mouth_interior: np.ndarray
    hair_band: np.ndarray
    front: np.ndarray  # the model's front region (`frontmask2_idx`)

    @property
    def noisy(self) -> np.ndarray:
        return self.eyes | self.nostrils | self.mouth_interior | self.hair_band

    @property
    def face(self) -> np.ndarray:
        return self.front & ~self.noisy

    def as_dict(self) -> dict[str, np.ndarray]:
        """name -> (N,) bool for the noisy regions, `noisy`, `front` and `face`."""
        out = {name: getattr(self, name) for name in NOISY_REGIONS}
        return {**out, "noisy": self.noisy, "front": self.front, "face": self.face}


def model_masks(model: MorphableModel, shape=None) -> ModelMasks:
    """The model's region masks, drawn around its landmarks on `shape` (N, 3) (default the mean).

    Eyes: inside the eyelid polygons (iBUG 36-41, 42-47, seen from the front, x-y) or within
    EYE_MARGIN_MM of them, plus the model's labelled `eyes` region when it has labels. Nostrils:
    within NOSTRIL_RADIUS_MM of each nostril centre. Mouth interior: inside the inner-lip polygon
    (iBUG 60-67) or within MOUTH_MARGIN_MM. Hair band: the labelled `hair_band` region, or else the
    top HAIR_BAND_DEPTH_MM of the mesh. Works on any BFM-layout model; region labels only add.
    """
    vertices = _shape_array(model, shape)
    keypoints = vertices[model.keypoints.cpu().numpy()]
    xy = vertices[:, :2]
    eyes = _near_polygon(xy, keypoints[list(RIGHT_EYE_IBUG), :2], EYE_MARGIN_MM * MM)
    eyes |= _near_polygon(xy, keypoints[list(LEFT_EYE_IBUG), :2], EYE_MARGIN_MM * MM)
    nostrils = np.zeros(len(vertices), bool)
    for side in NOSTRIL_SIDES_IBUG:
        centre = keypoints[list(side), :2].mean(axis=0)
        nostrils |= np.linalg.norm(xy - centre, axis=1) < NOSTRIL_RADIUS_MM * MM
    mouth = _near_polygon(xy, keypoints[list(INNER_LIPS_IBUG), :2], MOUTH_MARGIN_MM * MM)
    labels = model.region is not None
    if labels and "eyes" in model.region_names:
        eyes |= model.region_mask("eyes").cpu().numpy()
    if labels and "hair_band" in model.region_names:
        hair = model.region_mask("hair_band").cpu().numpy()
    else:
        hair = vertices[:, 1] > vertices[:, 1].max() - HAIR_BAND_DEPTH_MM * MM
    front = np.zeros(len(vertices), bool)
    front[model.front_vertices.cpu().numpy()] = True
    return ModelMasks(eyes, nostrils, mouth, hair, front)


def uv_masks(model: MorphableModel, masks: ModelMasks, size: int, raster: UVRaster | None = None
             ) -> dict[str, np.ndarray]:
    """The masks of `ModelMasks.as_dict` rasterized in UV: name -> (size, size) bool, plus
    `valid` (the texels the model's UV layout covers). A texel is in a mask when the
    blend of its triangle's vertex masks is at least MASK_THRESHOLD. `raster`:
    the model's `uv_rasterize` at this size, when already at hand."""
    if model.uv is None:
        raise InputError(f"{model.source or 'this model'} has no per-vertex UVs, so no UV masks")
    named = masks.as_dict()
    stacked = torch.as_tensor(np.stack(list(named.values()), axis=1), dtype=torch.float64)
    raster = uv_rasterize(model.uv.double(), model.faces, (size, size)) if raster is None else raster
    maps, valid = rasterize_attributes(stacked, model.uv.double(), model.faces, (size, size), raster=raster)
    out = {name: (maps[k] >= MASK_THRESHOLD).numpy() & valid.numpy() for k, name in enumerate(named)}
    out["valid"] = valid.numpy()
    return out


@dataclass(frozen=True, eq=False)
class ScanMask:
    """Which scan points a fit may use, and why the others are left out."""

    keep: np.ndarray  # (P,) bool
    label: np.ndarray  # (P,) int8 index into SCAN_LABELS (0 = kept)
    distance: np.ndarray  # (P,) distance to the aligned coarse model surface, model units

    def counts(self) -> dict[str, int]:
        """label -> number of scan points, every label listed."""
        found = np.bincount(self.label, minlength=len(SCAN_LABELS))
        return {name: int(n) for name, n in zip(SCAN_LABELS, found)}


def scan_mask(points, vertices, faces, masks: ModelMasks, *, max_distance: float = SCAN_MAX_DISTANCE_MM * MM,
              index: SurfaceIndex | None = None) -> ScanMask:
    """Label aligned scan points (P, 3) (model units) by the model region they fall on.

    Each point takes the masks of its closest point on the coarse mesh `vertices` (N, 3) /
    `faces` (F, 3) (barycentric blend of the vertex masks, at least MASK_THRESHOLD counts);
    points farther than `max_distance` (model units) are `far`, points whose closest surface point
    lies outside the front region are `outside_face` (scan borders, neck, ears). Pass a prebuilt `index` of
    the same mesh to save rebuilding it.
    """
    points = as_points(points, "scan points")
    index = SurfaceIndex(vertices, faces) if index is None else index
    hit = index.closest(points)
    corners = index.faces[hit.face_index]  # (P, 3)

    def blend(vertex_mask: np.ndarray) -> np.ndarray:
        return np.einsum("pk,pk->p", hit.barycentric, vertex_mask[corners].astype(np.float64)) >= MASK_THRESHOLD

    label = np.zeros(len(points), np.int8)
    rules = [("far", hit.distances > max_distance)]
    rules += [(name, blend(getattr(masks, name))) for name in NOISY_REGIONS]
    rules += [("outside_face", ~blend(masks.front))]
    for name, hit_rule in reversed(rules):  # earlier rules win, so they are written last
        label[hit_rule] = SCAN_LABELS.index(name)
    return ScanMask(label == 0, label, hit.distances)


# --- geometry helpers --------------------------------------------------------------------------


def _shape_array(model: MorphableModel, shape) -> np.ndarray:
    if shape is None:
        shape = model.mean_shape
    if torch.is_tensor(shape):
        shape = shape.detach().cpu().double().numpy()
    return as_points(np.asarray(shape).reshape(-1, 3), "model shape", rows=model.n_vertices)


def _near_polygon(points: np.ndarray, polygon: np.ndarray, margin: float) -> np.ndarray:
    """(P, 2) points inside the closed polygon (K, 2) or within `margin` of its edges."""
    a, b = polygon, np.roll(polygon, -1, axis=0)
    # even-odd rule: count edges crossed by a ray towards +x
    crosses = ((a[:, 1] > points[:, None, 1]) != (b[:, 1] > points[:, None, 1]))
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = a[:, 0] + (points[:, None, 1] - a[:, 1]) * (b[:, 0] - a[:, 0]) / (b[:, 1] - a[:, 1])
    inside = (crosses & (points[:, None, 0] < x_at)).sum(axis=1) % 2 == 1
    edge = b - a
    t = np.clip(np.einsum("pkd,kd->pk", points[:, None, :] - a, edge) / np.maximum((edge**2).sum(1), 1e-300), 0, 1)
    nearest = a + t[..., None] * edge
    distance = np.linalg.norm(points[:, None, :] - nearest, axis=2).min(axis=1)
    return inside | (distance <= margin)
