"""Synthetic scans with a known truth for the alignment and GT-map tests and benchmark: a small
SynthBFM face, a smooth deformation map and a detail field, the detailed surface built with the
shared truth definition, and a noisy scan of it in millimetres in a random pose.

The truth definition (the one the FaceHD-100 generator writes to `_truth/`): M0 = mean + id + exp,
M1 = M0 + sample_uv_map(deformation, uv), P1 = rasterize(M1), N0 = normalized rasterize(normals of
M0), detailed surface = dense_positions_from_map(P1, N0, displacement) on the valid UV grid.
This module builds it independently of `facehd.detail`, so the tests check that code against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from facehd import conventions as cv
from facehd.capture import write_landmarks7
from facehd.distance import vertex_normals_np
from facehd.io import Mesh, save_mesh
from facehd.morphable import MorphableModel, compute_shape, load_morphable_model, vertex_normals
from facehd.procrustes import Similarity
from facehd.synth.bfm import write_synth_bfm
from facehd.uv import dense_positions_from_map, rasterize_attributes, sample_uv_map, uv_grid_mesh

MM = 1.0 / cv.MM_PER_MODEL_UNIT  # model units per millimetre
DEF_SIZE, DISP_SIZE = cv.DEFORMATION_MAP_SIZE, cv.DISPLACEMENT_MAP_SIZE

DEFORMATION_RMS_MM = 1.5  # mid-frequency shape outside the model's span
DEFORMATION_MAX_FREQ = 4  # cos(pi m u) cos(pi n v), m, n < this
WRINKLE_DEPTH_MM = (0.1, 0.35)
WRINKLE_WIDTH_TEXELS = (0.9, 1.6)  # Gaussian cross-section sigma
WRINKLE_LENGTH_TEXELS = (10.0, 35.0)
WRINKLES = 25
PORE_STD_MM = 0.03
PORE_WIDTH_TEXELS = 0.7
SAMPLE_JITTER = (0.15, 0.85)  # where in its texel cell a scan vertex falls (cell fraction)
LANDMARK_NOISE_MM = 0.5
SCAN_NOISE_MM = 0.07  # along the normal: a noisier, sparser scanner than the generator's default
# (0.04 mm, four vertices per texel), so the fit is tested away from its tuned noise level too
SPIKE_FRACTION = 0.03  # of the hair-band scan vertices
SPIKE_HEIGHT_MM = (3.0, 10.0)
NOSTRIL_HOLE_MM = 6.0  # scan holes around the midpoints of iBUG 31-32 and 34-35


@dataclass
class Truth:
    """A detailed face in model space and its parts (model units)."""

    coeffs: np.ndarray  # (257,)
    deformation: np.ndarray  # (3, 64, 64)
    displacement: np.ndarray  # (1, 256, 256)
    valid: np.ndarray  # (256, 256) bool
    grid: np.ndarray  # (256 * 256, 3) dense vertex per texel (r * W + c), detailed
    faces: np.ndarray  # (M, 3) faces of the valid grid, indices into `grid`


@dataclass
class Scan:
    """A synthetic scan of a Truth: the mesh in mm, its landmarks, and the true transform."""

    mesh: Mesh  # millimetres
    landmarks7_mm: np.ndarray  # (7, 3)
    scan_to_model: Similarity  # x_model = s R x_scan + t
    uv: np.ndarray  # (P, 2) model UV each scan vertex was sampled at


def make_model(folder: Path, resolution: int = 40, seed: int = 0) -> tuple[Path, MorphableModel]:
    path = write_synth_bfm(Path(folder) / f"synthbfm_r{resolution}_s{seed}.mat", resolution, seed)
    return path, load_morphable_model(path, dtype=torch.float64)


def random_coeffs(rng: np.random.Generator, id_sigma: float = 0.7, exp_sigma: float = 0.5) -> np.ndarray:
    coeffs = np.zeros(cv.N_COEFFS)
    coeffs[cv.COEFF_SLICES["id"]] = id_sigma * rng.standard_normal(cv.N_ID)
    coeffs[cv.COEFF_SLICES["exp"]] = exp_sigma * rng.standard_normal(cv.N_EXP)
    return coeffs


def _texel_uv(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(size, size) u and v of the texel centres (row r has v = 1 - (r + 0.5) / size)."""
    centres = (np.arange(size) + 0.5) / size
    u, v = np.meshgrid(centres, 1.0 - centres)
    return u, v


def smooth_deformation(rng: np.random.Generator, rms_mm: float = DEFORMATION_RMS_MM) -> np.ndarray:
    """(3, 64, 64) random low-frequency offsets with the given RMS, model units."""
    u, v = _texel_uv(DEF_SIZE)
    field = np.zeros((3, DEF_SIZE, DEF_SIZE))
    for m in range(DEFORMATION_MAX_FREQ):
        for n in range(DEFORMATION_MAX_FREQ):
            basis = np.cos(np.pi * m * u) * np.cos(np.pi * n * v)
            field += rng.standard_normal(3)[:, None, None] * basis / (1.0 + m + n)
    return field * (rms_mm * MM / np.sqrt(np.mean(field**2)))


def detail_field(rng: np.random.Generator, wrinkles: int = WRINKLES) -> np.ndarray:
    """(1, 256, 256) high-frequency relief in model units: Gaussian-profile wrinkle grooves
    (0.1-0.35 mm deep) and zero-mean pore-scale roughness."""
    rows, cols = np.mgrid[0:DISP_SIZE, 0:DISP_SIZE].astype(np.float64)
    field = np.zeros((DISP_SIZE, DISP_SIZE))
    for _ in range(wrinkles):
        centre = rng.uniform(40, DISP_SIZE - 40, 2)
        angle = rng.uniform(0, np.pi)
        along = (cols - centre[0]) * np.cos(angle) + (rows - centre[1]) * np.sin(angle)
        across = -(cols - centre[0]) * np.sin(angle) + (rows - centre[1]) * np.cos(angle)
        width = rng.uniform(*WRINKLE_WIDTH_TEXELS)
        length = rng.uniform(*WRINKLE_LENGTH_TEXELS)
        depth = rng.uniform(*WRINKLE_DEPTH_MM)
        field -= depth * np.exp(-0.5 * (across / width) ** 2) * np.exp(-0.5 * (along / length) ** 4)
    pores = gaussian_filter(rng.standard_normal((DISP_SIZE, DISP_SIZE)), PORE_WIDTH_TEXELS)
    field += PORE_STD_MM * pores / pores.std()
    return (field * MM)[None]


def detailed_surface(model: MorphableModel, coeffs, deformation, displacement) -> Truth:
    """The shared truth definition, written out step by step."""
    c = torch.as_tensor(coeffs, dtype=torch.float64)[None]
    m0 = compute_shape(model, c[:, cv.COEFF_SLICES["id"]], c[:, cv.COEFF_SLICES["exp"]])[0]
    m1 = m0 + sample_uv_map(torch.as_tensor(deformation, dtype=torch.float64), model.uv)
    p1, valid = rasterize_attributes(m1, model.uv, model.faces, (DISP_SIZE, DISP_SIZE))
    n0, _ = rasterize_attributes(vertex_normals(m0[None], model.faces, model.point_buf)[0], model.uv,
                                 model.faces, (DISP_SIZE, DISP_SIZE))
    disp = torch.as_tensor(displacement, dtype=torch.float64) * valid
    grid = dense_positions_from_map(p1[None], n0[None], disp[None])[0]
    _, faces = uv_grid_mesh(DISP_SIZE, DISP_SIZE, mask=valid)
    return Truth(np.asarray(coeffs, dtype=np.float64), np.asarray(deformation), disp.numpy(), valid.numpy(),
                 grid.numpy(), faces.numpy())


def surface_at_uv(grid: np.ndarray, uv: np.ndarray, size: int = DISP_SIZE) -> np.ndarray:
    """(P, 2) UVs -> (P, 3) points on the dense grid mesh's triangles (tl-bl-br / tl-br-tr split)."""
    x = np.clip(uv[:, 0] * size - 0.5, 0.0, size - 1 - 1e-9)
    y = np.clip((1.0 - uv[:, 1]) * size - 0.5, 0.0, size - 1 - 1e-9)
    c, r = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - c, y - r
    tl, tr = grid[r * size + c], grid[r * size + c + 1]
    bl, br = grid[(r + 1) * size + c], grid[(r + 1) * size + c + 1]
    lower = (fy >= fx)[:, None]
    p_lower = (1 - fy)[:, None] * tl + (fy - fx)[:, None] * bl + fx[:, None] * br
    p_upper = (1 - fx)[:, None] * tl + (fx - fy)[:, None] * tr + fy[:, None] * br
    return np.where(lower, p_lower, p_upper)


def random_pose(rng: np.random.Generator) -> Similarity:
    """scan mm -> model units: any rotation, a translation of ~100 mm, scale 1/100."""
    rotation = Rotation.random(random_state=rng.integers(2**31)).as_matrix()
    return Similarity(MM, rotation, rng.normal(0.0, 1.0, 3))


def region_weight(model: MorphableModel, uv: np.ndarray, names) -> np.ndarray:
    """(P,) 1 where the model's region at these UVs (nearest vertex in UV) is one of `names`."""
    from scipy.spatial import cKDTree

    _, nearest = cKDTree(model.uv.numpy()).query(uv)
    codes = [model.region_names.index(n) for n in names]
    return np.isin(model.region.numpy()[nearest], codes)


def make_scan(model: MorphableModel, truth: Truth, rng: np.random.Generator, *,
              noise_mm: float = SCAN_NOISE_MM, holes: bool = True, spikes: bool = True,
              pose: Similarity | None = None) -> Scan:
    """A scan of the truth's detailed surface as the generator makes one: a sample at a jittered
    place in every cell of the 256 x 256 texel grid, noise along the normal, holes at the eyes
    and nostrils, spikes in the hair band; in millimetres in a random pose."""
    pose = random_pose(rng) if pose is None else pose
    cells = DISP_SIZE - 1
    r, c = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
    rows = (r + rng.uniform(*SAMPLE_JITTER, r.shape)).ravel()
    cols = (c + rng.uniform(*SAMPLE_JITTER, c.shape)).ravel()
    uv = np.stack([(cols + 0.5) / DISP_SIZE, 1.0 - (rows + 0.5) / DISP_SIZE], axis=1)
    points = surface_at_uv(truth.grid, uv)
    idx = np.arange(cells * cells).reshape(cells, cells)
    tl, tr, bl, br = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    faces = np.concatenate([np.stack([tl, bl, br], 1), np.stack([tl, br, tr], 1)])
    normals = vertex_normals_np(points, faces)
    points = points + rng.normal(0.0, noise_mm * MM, len(points))[:, None] * normals
    keep = np.ones(len(uv), bool)
    if holes:
        keep &= ~region_weight(model, uv, ["eyes"])
        keep &= ~_near_nostrils(model, truth, points)
    if spikes:
        hair = region_weight(model, uv, ["hair_band"]) & (rng.random(len(uv)) < SPIKE_FRACTION)
        length = rng.uniform(*SPIKE_HEIGHT_MM, int(hair.sum())) * MM
        points[hair] += length[:, None] * normals[hair]
    faces = faces[keep[faces].all(axis=1)]
    used = np.unique(faces)
    remap = np.full(len(uv), -1)
    remap[used] = np.arange(len(used))
    vertices_mm = pose.inverse().apply(points[used])
    lm_uv = model.uv.numpy()[model.landmarks7.numpy()]
    lm = pose.inverse().apply(surface_at_uv(truth.grid, lm_uv)) + rng.normal(0.0, LANDMARK_NOISE_MM, (7, 3))
    mesh = Mesh(vertices_mm, remap[faces], metadata={"units": "mm"})
    return Scan(mesh, lm, pose, uv[used])


def _near_nostrils(model: MorphableModel, truth: Truth, points: np.ndarray) -> np.ndarray:
    """Scan points within NOSTRIL_HOLE_MM of the nostril openings (in 3D, on the true shape)."""
    c = torch.as_tensor(truth.coeffs)[None]
    shape = compute_shape(model, c[:, cv.COEFF_SLICES["id"]], c[:, cv.COEFF_SLICES["exp"]])[0].numpy()
    kp = shape[model.keypoints.numpy()]
    centres = np.stack([(kp[31] + kp[32]) / 2, (kp[34] + kp[35]) / 2])
    d = np.linalg.norm(points[:, None, :] - centres[None], axis=2).min(axis=1)
    return d < NOSTRIL_HOLE_MM * MM


def make_truth(model: MorphableModel, seed: int, deformation_rms_mm: float = DEFORMATION_RMS_MM) -> Truth:
    """A random face: coefficients, a smooth deformation of the given RMS (0: none) and detail."""
    rng = np.random.default_rng(seed)
    coeffs = random_coeffs(rng)
    deformation = smooth_deformation(rng, deformation_rms_mm) if deformation_rms_mm > 0 else np.zeros((3, 64, 64))
    return detailed_surface(model, coeffs, deformation, detail_field(rng))


def write_capture(root: Path, subject: str, expression: str, model: MorphableModel, model_path: Path,
                  seed: int, truth: Truth | None = None, **scan_options) -> tuple[Truth, Scan]:
    """One capture (scan.ply, landmarks7.txt) and its `_truth/.../truth.npz`, as the generator
    lays them out; `truth` defaults to `make_truth(model, seed)`."""
    truth = make_truth(model, seed) if truth is None else truth
    scan = make_scan(model, truth, np.random.default_rng(seed + 1000), **scan_options)
    folder = Path(root) / subject / expression
    folder.mkdir(parents=True, exist_ok=True)
    save_mesh(folder / "scan.ply", scan.mesh)
    write_landmarks7(folder / "landmarks7.txt", scan.landmarks7_mm)
    truth_dir = Path(root) / "_truth" / subject / expression
    truth_dir.mkdir(parents=True, exist_ok=True)
    np.savez(truth_dir / "truth.npz", coeffs=truth.coeffs, deformation_map=truth.deformation,
             displacement_map=truth.displacement, valid_mask_256=truth.valid, surface_vertices=truth.grid,
             surface_faces=truth.faces, scan_to_model=scan.scan_to_model.as_matrix(),
             model_path=str(model_path))
    return truth, scan
