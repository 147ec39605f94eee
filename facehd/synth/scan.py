"""Raw-scan synthesis for the synthetic FaceHD-100: a jittered resampling of the true surface in
millimetres with scanner noise, holes at the eyes and nostrils and spikes in the hair band."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facehd.distance import vertex_normals_np
from facehd.io import Mesh
from facehd.procrustes import Similarity

# Each scan vertex falls at a random place inside one sub-cell of the true surface's grid (see
# SCAN_SAMPLES_PER_CELL), this far (sub-cell fraction) from its edges: never on an edge, so the
# scan's triangles never collapse.
SAMPLE_JITTER = (0.15, 0.85)
# High-end multi-view and structured-light face scanners: ~0.02-0.05 mm of local noise on skin
# along the surface normal (their quoted 0.1-0.2 mm accuracy is mostly smooth, global error).
SCAN_NOISE_MM = 0.04
# Scan vertices per grid cell of the true surface, per axis: 2 x 2 puts them ~0.45 mm apart where
# the 256 x 256 grid is ~0.9 mm, since real face scans are denser than the displacement map; each
# texel then sees about four independently noisy vertices.
SCAN_SAMPLES_PER_CELL = 2
SPIKE_FRACTION = 0.03  # hair-band vertices that become spikes (hair defeats the scanner)
SPIKE_MM = (3.0, 10.0)  # spike length range
SPIKE_OUTWARD_PROBABILITY = 0.8  # stray hair sticks out more often than it dents in
SCAN_METADATA = {"units": "mm", "source": "facehd synth facehd"}


@dataclass(frozen=True)
class HoleEllipse:
    """An elliptic hole in the scan, in the (x, y) plane of the model's mean shape (model units):
    the mean shape is a graph over (x, y), so this picks the same patch of skin for every face."""

    centre: tuple[float, float]
    radii: tuple[float, float]

    def contains(self, xy: np.ndarray) -> np.ndarray:
        """(P, 2) mean-shape points -> (P,) bool."""
        d = (xy - np.asarray(self.centre)) / np.asarray(self.radii)
        return (d * d).sum(axis=1) < 1.0


@dataclass(frozen=True, eq=False)
class ScanSource:
    """The per-texel grids the scan samples, all (H, W, C) on the truth's UV grid.

    Attributes:
        surface: (H, W, 3) true detailed surface, model units.
        albedo: (H, W, 3) colour in [0, 1].
        mean_xy: (H, W, 2) x, y of the model's mean shape (for the holes).
        hair: (H, W) bool, texels of the hair band (for the spikes).
        valid: (H, W) bool, texels covered by the model.
    """

    surface: np.ndarray
    albedo: np.ndarray
    mean_xy: np.ndarray
    hair: np.ndarray
    valid: np.ndarray


def interpolate_grid(values: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Values (H, W, C) of a UV-grid mesh at continuous texel positions (P,) rows and cols.

    Exact on the triangles of `facehd.uv.uv_grid_mesh` (each cell split along its top-left to
    bottom-right diagonal), so a point interpolated from the true surface's vertices lies on the
    true surface. Positions outside the grid extrapolate from the border cell.
    """
    height, width = values.shape[:2]
    r0 = np.clip(np.floor(rows).astype(np.int64), 0, height - 2)
    c0 = np.clip(np.floor(cols).astype(np.int64), 0, width - 2)
    t = (rows - r0)[:, None]  # down the cell
    s = (cols - c0)[:, None]  # across the cell
    tl, tr = values[r0, c0], values[r0, c0 + 1]
    bl, br = values[r0 + 1, c0], values[r0 + 1, c0 + 1]
    lower = (1.0 - t) * tl + (t - s) * bl + s * br  # triangle tl, bl, br (t >= s)
    upper = (1.0 - s) * tl + t * br + (s - t) * tr  # triangle tl, br, tr (s >= t)
    return np.where(t >= s, lower, upper)


def uv_to_texel(uv: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(P, 2) UVs -> continuous (rows, cols) of an H x W map (texel centres at integers)."""
    return (1.0 - uv[:, 1]) * height - 0.5, uv[:, 0] * width - 0.5


def _cell_samples(valid: np.ndarray, rng: np.random.Generator, per_cell: int = 1):
    """``per_cell`` x ``per_cell`` jittered samples per grid cell (one in each sub-cell): (rows,
    cols) of the samples, the samples whose cell has 4 valid corner texels, and the triangles
    joining neighbouring samples (same winding as the grid)."""
    height, width = valid.shape
    n_rows, n_cols = (height - 1) * per_cell, (width - 1) * per_cell
    sub_r, sub_c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    jitter = rng.uniform(*SAMPLE_JITTER, size=(2, n_rows, n_cols))
    rows = ((sub_r + jitter[0]) / per_cell).ravel()
    cols = ((sub_c + jitter[1]) / per_cell).ravel()
    cell_ok = valid[:-1, :-1] & valid[:-1, 1:] & valid[1:, :-1] & valid[1:, 1:]
    sample_ok = cell_ok[sub_r // per_cell, sub_c // per_cell].ravel()
    index = np.arange(n_rows * n_cols).reshape(n_rows, n_cols)
    tl, tr = index[:-1, :-1].ravel(), index[:-1, 1:].ravel()
    bl, br = index[1:, :-1].ravel(), index[1:, 1:].ravel()
    faces = np.concatenate([np.stack([tl, bl, br], 1), np.stack([tl, br, tr], 1)])
    return rows, cols, sample_ok, faces


def synth_scan(source: ScanSource, holes: list[HoleEllipse], model_to_scan: Similarity,
               rng: np.random.Generator) -> Mesh:
    """A raw scan (millimetres, scanner frame) of the true surface in ``source``.

    Vertices: ``SCAN_SAMPLES_PER_CELL`` squared per cell of the truth's UV grid, one at a random
    place in each sub-cell (denser than the morphable model and the truth's grid, never the truth's
    own vertices), moved to the scanner frame by ``model_to_scan``, with Gaussian noise along the
    normal; a few percent of the hair band's vertices become spikes; vertices inside ``holes`` are
    removed with their triangles.
    """
    rows, cols, keep, faces = _cell_samples(source.valid, rng, SCAN_SAMPLES_PER_CELL)
    points = model_to_scan.apply(interpolate_grid(source.surface, rows, cols))
    normals = vertex_normals_np(points, faces)
    points = points + rng.normal(0.0, SCAN_NOISE_MM, size=len(points))[:, None] * normals
    points = _add_spikes(points, normals, _nearest(source.hair, rows, cols) & keep, rng)
    mean_xy = interpolate_grid(source.mean_xy, rows, cols)
    for hole in holes:
        keep &= ~hole.contains(mean_xy)
    colors = np.clip(interpolate_grid(source.albedo, rows, cols), 0.0, 1.0)
    vertices, faces, colors = _compact(points, faces, colors, keep)
    return Mesh(vertices, faces, colors=colors, metadata=dict(SCAN_METADATA))


def _nearest(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    r = np.clip(np.rint(rows).astype(np.int64), 0, mask.shape[0] - 1)
    c = np.clip(np.rint(cols).astype(np.int64), 0, mask.shape[1] - 1)
    return mask[r, c]


def _add_spikes(points: np.ndarray, normals: np.ndarray, candidates: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    index = np.flatnonzero(candidates)
    count = int(round(SPIKE_FRACTION * len(index)))
    chosen = rng.choice(index, size=count, replace=False)
    length = rng.uniform(*SPIKE_MM, size=count)
    sign = np.where(rng.random(count) < SPIKE_OUTWARD_PROBABILITY, 1.0, -1.0)
    out = points.copy()
    out[chosen] += (sign * length)[:, None] * normals[chosen]
    return out


def _compact(points, faces, colors, keep):
    """Drop the vertices not kept, the triangles touching them and vertices no triangle uses."""
    faces = faces[keep[faces].all(axis=1)]
    used = np.zeros(len(points), dtype=bool)
    used[faces.ravel()] = True
    remap = np.cumsum(used) - 1
    return points[used], remap[faces], colors[used]
