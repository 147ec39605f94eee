"""SynthFLAME: a procedural head model written in FLAME's file layout (`generic_model.pkl`,
`head_template.obj`, `flame_static_embedding.pkl`), whose face is SynthBFM's mean face, so the
head-model builder runs with no downloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse

from facehd import flame
from facehd.errors import InputError
from facehd.fsutil import atomic_open
from facehd.synth import bfm as sb

GENERATOR_NAME = "facehd.synth.flame"
GENERATOR_VERSION = 1
DEFAULT_RESOLUTION = 96  # columns around the head: ~6.6k vertices (the real FLAME has 5,023)
MIN_RESOLUTION = 24  # below this the face has too few columns for the 51 landmarks
METRES_PER_UNIT = 0.1  # the shape is designed in SynthBFM's units (100 mm) and written in metres

# All lengths below are SynthBFM model units; x to the subject's left, y up, z forward. The head is
# a surface of revolution-like grid: azimuth theta (0 = front, +pi/2 = subject's left) by height y.
Y_NECK_BOTTOM = -2.0  # the neck cut (FLAME's mesh is open there)
Y_CAP = 1.0  # above this the rows follow an elliptic arc up to the crown
Y_CROWN = sb.OUTLINE_CENTRE_Y + sb.OUTLINE_HALF_HEIGHT  # where SynthBFM's outline closes (1.62)
ROWS_PER_COLUMN = 0.54  # lower rows per column: square-ish cells (height 3 / circumference ~5.6)
CAP_ROWS_PER_COLUMN = 0.18
NECK_HALF_WIDTH = 0.46
NECK_BLEND_Y = (-0.6, 0.6)  # the outline widens from the jaw into the neck from here, over this height
NECK_CENTRE_Z = -0.35  # the neck sits behind the chin
NECK_FRONT_DEPTH = 0.5
NECK_BACK_DEPTH = 0.5
UNDER_CHIN_Y = (-0.95, 0.3)  # below this the face profile blends into the neck, over this height
SKULL_BACK_DEPTH = 1.25  # glabella to the back of the skull ~190 mm with the face's ~0.62
SKULL_BLEND_Y = (-0.1, 1.0)  # the back narrows from the skull into the neck from here, over this height
FRONT_RELIEF_FADE = 0.2  # the facial relief fades to 0 where cos(theta) goes from this to 0
EAR_THETA = np.pi / 2 + 0.12  # ears sit just behind the side of the head
EAR_Y = 0.12  # from about the brow down to the nose base
EAR_RADII = (0.16, 0.32)  # (radians of azimuth, model units of height)
EAR_HEIGHT = 0.13  # ears stand ~13 mm off the head
EYEBALL_RADII = (0.10, 0.035)  # the eye-joint vertices: inside the eye opening
ROOT_WEIGHT_Y = (-1.6, 0.3)  # below this the root joint carries the neck, over this height
JAW_FADE_Y = (-1.05, 0.25)  # the jaw's weight fades into the neck below the chin

# --- bases (model units, converted with the shape) ---------------------------------------------
SHAPE_STD_FIRST = 0.03  # RMS displacement of the first shape component (3 mm)
SHAPE_STD_DECAY = 0.8
SHAPE_MAX_M = 6  # azimuthal frequencies cos/sin(m theta)
SHAPE_MAX_N = 8  # vertical frequencies cos(n pi s)
SHAPE_SPECTRUM_DECAY = 1.5
EXPR_STD_FIRST = 0.03
EXPR_STD_LAST = 0.004
EXPR_RADIUS = (0.08, 0.2)
EXPR_AXIS_WEIGHTS = (0.6, 0.6, 1.0)
POSE_CORRECTIVE_STD = 0.02  # 2 mm per unit of (R - I)
NECK_CORRECTIVE_CENTRE_Y, NECK_CORRECTIVE_RADIUS = -1.3, 0.5
JAW_CORRECTIVE_CENTRE, JAW_CORRECTIVE_RADIUS = (0.0, -1.05), 0.35


def _grid(resolution: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(N, 2) (theta, y) of the vertices, (F, 3) outward-facing faces, rows and columns.

    Rows go from the neck cut up to the crown, which is one pole vertex (the last); columns go
    around from the back (theta = -pi), so column C/2 is the front midline.
    """
    cols = resolution
    lower = max(3, round(ROWS_PER_COLUMN * cols))
    cap = max(2, round(CAP_ROWS_PER_COLUMN * cols))
    ys = np.linspace(Y_NECK_BOTTOM, Y_CAP, lower, endpoint=False)
    arc = np.linspace(0.0, np.pi / 2, cap + 1, endpoint=False)
    ys = np.concatenate([ys, Y_CAP + (Y_CROWN - Y_CAP) * np.sin(arc)])
    rows = len(ys)
    thetas = -np.pi + 2.0 * np.pi * np.arange(cols) / cols
    tt, yy = np.meshgrid(thetas, ys)
    params = np.concatenate([np.stack([tt.ravel(), yy.ravel()], 1), [[0.0, Y_CROWN]]])
    idx = np.arange(rows * cols).reshape(rows, cols)
    nxt = np.roll(idx, -1, axis=1)
    a, b, c, d = idx[:-1], nxt[:-1], nxt[1:], idx[1:]
    quads = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    pole = rows * cols
    top = idx[-1]
    fan = np.stack([top, np.roll(top, -1), np.full(cols, pole)], 1)
    return params, np.concatenate([quads, fan]), rows, cols


def _smoothstep(t):
    return sb._smoothstep(t)


def _cap_closure(y: np.ndarray) -> np.ndarray:
    return np.sqrt(np.clip(1.0 - ((np.maximum(y, Y_CAP) - Y_CAP) / (Y_CROWN - Y_CAP)) ** 2, 0.0, None))


def _neck_mix(y: np.ndarray) -> np.ndarray:
    """0 on the face, 1 on the neck below the chin."""
    return _smoothstep((UNDER_CHIN_Y[0] - y) / UNDER_CHIN_Y[1])


def _half_width(y: np.ndarray) -> np.ndarray:
    s = _smoothstep((NECK_BLEND_Y[0] - y) / NECK_BLEND_Y[1])
    return sb._outline_half_width(y) * (1.0 - s) + NECK_HALF_WIDTH * s


def _front_depth(y: np.ndarray) -> np.ndarray:
    """SynthBFM's shell depth (the same formula), blended into the neck's below the chin."""
    lower = sb._smoothstep((sb.NOSE_TIP_Y - y) / (sb.NOSE_TIP_Y - sb.Y_BOTTOM))
    face = sb.SHELL_DEPTH + (sb.SHELL_DEPTH_BOTTOM - sb.SHELL_DEPTH) * lower
    s = _neck_mix(y)
    return (face * (1.0 - s) + NECK_FRONT_DEPTH * s) * _cap_closure(y)


def _back_depth(y: np.ndarray) -> np.ndarray:
    s = _smoothstep((SKULL_BLEND_Y[0] - y) / SKULL_BLEND_Y[1])
    return (SKULL_BACK_DEPTH * (1.0 - s) + NECK_BACK_DEPTH * s) * _cap_closure(y)


def _centre_z(y: np.ndarray) -> np.ndarray:
    s = _neck_mix(y)
    return sb._profile(y) * (1.0 - s) + NECK_CENTRE_Z * s


def _front_weight(theta: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _smoothstep(np.cos(theta) / FRONT_RELIEF_FADE) * (1.0 - _neck_mix(y))


def _mean_shape(params: np.ndarray) -> np.ndarray:
    """(N, 2) (theta, y) -> (N, 3) model-unit head: SynthBFM's shell and relief on the front half,
    a skull behind, a neck below, ear bumps on the sides."""
    theta, y = params[:, 0], params[:, 1]
    a = _half_width(y)
    depth = np.where(np.cos(theta) >= 0.0, _front_depth(y), _back_depth(y))
    x = a * np.sin(theta)
    z = _centre_z(y) + depth * np.cos(theta)
    relief = sb._nose_relief(x, y) + sb._mouth_relief(x, y) + sb._eye_relief(x, y) + sb._cheek_relief(x, y)
    z = z + _front_weight(theta, y) * relief
    ear = sum(sb._bump(theta, y, (side * EAR_THETA, EAR_Y), EAR_RADII) for side in (-1.0, 1.0))
    x = x + EAR_HEIGHT * ear * np.sin(theta)
    z = z + EAR_HEIGHT * ear * np.cos(theta)
    return np.stack([x, y, z], axis=1)


def _embedding(mean: np.ndarray, faces: np.ndarray, params: np.ndarray) -> flame.LandmarkEmbedding:
    """The 51 inner iBUG landmarks (SynthBFM's design points) as points on front-facing faces: the
    frontmost triangle whose (x, y) projection contains each point."""
    design = sb.landmark_design()[flame.FIRST_STATIC_LANDMARK_IBUG:]
    front = np.flatnonzero((np.cos(params[faces, 0]) > 0.2).all(axis=1))
    tri = mean[faces[front]]  # (K, 3, 3)
    a, b, c = tri[:, 0, :2], tri[:, 1, :2], tri[:, 2, :2]
    face_index, bary = [], []
    for p in design:
        v0, v1, v2 = b - a, c - a, p - a
        den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
        den = np.where(den == 0, np.nan, den)
        w1 = (v2[:, 0] * v1[:, 1] - v1[:, 0] * v2[:, 1]) / den
        w2 = (v0[:, 0] * v2[:, 1] - v2[:, 0] * v0[:, 1]) / den
        w0 = 1.0 - w1 - w2
        inside = np.flatnonzero((w0 >= -1e-9) & (w1 >= -1e-9) & (w2 >= -1e-9))
        if len(inside) == 0:
            raise RuntimeError(f"SynthFLAME landmark {p} is not over the face")
        z = w0[inside] * tri[inside, 0, 2] + w1[inside] * tri[inside, 1, 2] + w2[inside] * tri[inside, 2, 2]
        k = inside[np.argmax(z)]
        face_index.append(front[k])
        bary.append([w0[k], w1[k], w2[k]])
    return flame.LandmarkEmbedding(np.asarray(face_index), np.clip(np.asarray(bary), 0.0, 1.0))


def _ring_mean(params: np.ndarray, rows: int, cols: int, y: float) -> np.ndarray:
    """(N,) regressor row averaging the grid row nearest height ``y`` (its centre, by symmetry)."""
    row_y = params[: rows * cols : cols, 1]
    r = int(np.argmin(np.abs(row_y - y)))
    w = np.zeros(len(params))
    w[r * cols:(r + 1) * cols] = 1.0 / cols
    return w


def _joint_regressor(mean, params, rows, cols) -> np.ndarray:
    """(5, N): root at the neck cut, neck higher up, jaw near SynthBFM's jaw hinge, eyes in the
    eye openings. Every row is a convex combination of vertices, as FLAME's."""
    reg = np.zeros((flame.N_JOINTS, len(mean)))
    reg[0] = _ring_mean(params, rows, cols, Y_NECK_BOTTOM)
    reg[1] = _ring_mean(params, rows, cols, NECK_CORRECTIVE_CENTRE_Y)
    hinge_y, hinge_z = sb.JAW_HINGE_YZ
    ring = np.flatnonzero(_ring_mean(params, rows, cols, hinge_y))
    for side in (-1.0, 1.0):  # the two mirror-image vertices nearest the hinge axis
        candidates = ring[np.sign(mean[ring, 0]) == side]
        reg[2, candidates[np.argmin(np.abs(mean[candidates, 2] - hinge_z))]] = 0.5
    for j, side in ((3, 1.0), (4, -1.0)):
        eye = _eye_mask(mean, params[:, 0], side)
        reg[j, eye] = 1.0 / eye.sum()
    return reg


def _eye_mask(mean, theta, side) -> np.ndarray:
    x, y = mean[:, 0], mean[:, 1]
    inside = ((x - side * sb.EYE_CENTRE_X) / EYEBALL_RADII[0]) ** 2 + ((y - sb.EYE_Y) / EYEBALL_RADII[1]) ** 2 < 1
    return inside & (np.cos(theta) > 0)


def _skinning_weights(mean, params) -> np.ndarray:
    theta, y = params[:, 0], params[:, 1]
    w = np.zeros((len(mean), flame.N_JOINTS))
    w[:, 0] = _smoothstep((ROOT_WEIGHT_Y[0] - y) / ROOT_WEIGHT_Y[1])
    jaw = sb._lower_face_weight(mean[:, 0], y) * _smoothstep(np.cos(theta) / FRONT_RELIEF_FADE)
    jaw *= 1.0 - _smoothstep((JAW_FADE_Y[0] - y) / JAW_FADE_Y[1])
    w[:, 2] = jaw
    w[:, 3] = _eye_mask(mean, theta, 1.0)
    w[:, 4] = _eye_mask(mean, theta, -1.0)
    w[w[:, 3] + w[:, 4] > 0, 2] = 0.0
    w[:, 1] = np.clip(1.0 - w[:, 0] - w[:, 2] - w[:, 3] - w[:, 4], 0.0, None)
    return w / w.sum(axis=1, keepdims=True)


def _shape_basis(mean, params, rng) -> np.ndarray:
    """(N, 3, 300) smooth global shape directions, RMS displacement sigma_k, sigma decreasing."""
    theta, y = params[:, 0], params[:, 1]
    s = (y - Y_NECK_BOTTOM) / (Y_CROWN - Y_NECK_BOTTOM)
    radial = _half_width(y) / sb.OUTLINE_HALF_WIDTH  # azimuthal fields vanish at the pole
    fields, decay = [], []
    for m in range(SHAPE_MAX_M + 1):
        for trig in ((np.cos,) if m == 0 else (np.cos, np.sin)):
            for n in range(SHAPE_MAX_N):
                f = trig(m * theta) * np.cos(np.pi * n * s) * (radial if m else 1.0)
                fields.append(f)
                decay.append((1.0 + m + n) ** -SHAPE_SPECTRUM_DECAY)
    fields = np.stack(fields)  # (K, N)
    mix = rng.standard_normal((flame.N_SHAPE, len(fields), 3)) * np.asarray(decay)[None, :, None]
    dirs = (mix.transpose(0, 2, 1).reshape(-1, len(fields)) @ fields).reshape(flame.N_SHAPE, 3, -1)
    dirs = dirs.transpose(0, 2, 1)  # (300, N, 3)
    dirs /= np.sqrt(np.mean(np.sum(dirs**2, axis=2), axis=1))[:, None, None]
    sigma = SHAPE_STD_FIRST * np.arange(1, flame.N_SHAPE + 1) ** -SHAPE_STD_DECAY
    return np.transpose(dirs * sigma[:, None, None], (1, 2, 0))


def _expression_basis(mean, params, rng) -> np.ndarray:
    """(N, 3, 100): jaw opening about SynthBFM's hinge, then localized bumps on the face."""
    theta, y = params[:, 0], params[:, 1]
    x = mean[:, 0]
    fields = []
    w = sb._lower_face_weight(x, y) * _smoothstep(np.cos(theta) / FRONT_RELIEF_FADE)
    hinge_y, hinge_z = sb.JAW_HINGE_YZ
    fields.append(w[:, None] * np.stack([0.0 * w, -(mean[:, 2] - hinge_z), y - hinge_y], 1))
    face = np.flatnonzero((np.cos(theta) > 0.5) & (y > -1.0) & (y < 0.8))
    n_bumps = flame.N_EXPRESSION - 1
    centres = mean[rng.choice(face, size=n_bumps, replace=len(face) < n_bumps)]
    radii = rng.uniform(*EXPR_RADIUS, size=n_bumps)
    directions = rng.standard_normal((n_bumps, 3)) * np.asarray(EXPR_AXIS_WEIGHTS)
    front = np.cos(theta) > 0
    for centre, radius, direction in zip(centres, radii, directions):
        bump = sb._bump(x, y, centre[:2], (radius, radius)) * front
        fields.append(bump[:, None] * direction)
    sigma = np.geomspace(EXPR_STD_FIRST, EXPR_STD_LAST, flame.N_EXPRESSION)
    out = [f * (s / np.linalg.norm(f, axis=1).max()) for f, s in zip(fields, sigma)]
    return np.stack(out, axis=2)


def _pose_correctives(mean, params, rng) -> np.ndarray:
    """(N, 3, 36): small smooth correctives around the neck (joint 1) and under the chin (jaw);
    the eyes have none."""
    y, z = params[:, 1], mean[:, 2]
    out = np.zeros((len(mean), 3, flame.N_POSE_BASIS))
    neck = sb._bump(0.0 * y, y, (0.0, NECK_CORRECTIVE_CENTRE_Y), (1.0, NECK_CORRECTIVE_RADIUS))
    jaw = sb._bump(y, z, (JAW_CORRECTIVE_CENTRE[1], 0.0), (JAW_CORRECTIVE_RADIUS, 1.0)) * (z > NECK_CENTRE_Z)
    for block, field in ((0, neck), (1, jaw)):
        directions = rng.standard_normal((9, 3))
        out[:, :, 9 * block:9 * block + 9] = POSE_CORRECTIVE_STD * field[:, None, None] * directions.T[None]
    return out


def _uv_layout(params, faces, rows, cols) -> tuple[np.ndarray, np.ndarray]:
    """Cylindrical UVs (u around from the back, v up) with their own indices: the seam column at
    the back and the crown get extra texture vertices, as FLAME's head_template.obj has."""
    n_grid = rows * cols
    theta, y = params[:n_grid, 0], params[:n_grid, 1]
    u = (theta + np.pi) / (2.0 * np.pi)
    v = (y - Y_NECK_BOTTOM) / (Y_CROWN - Y_NECK_BOTTOM)
    seam = np.stack([np.ones(rows), v[::cols]], 1)  # u = 1 copies of column 0
    crown = np.stack([(np.arange(cols) + 0.5) / cols, np.ones(cols)], 1)
    uvs = np.concatenate([np.stack([u, v], 1), seam, crown])
    faces_uv = faces.copy()
    pole = n_grid
    col = faces % cols
    row = faces // cols
    wraps = (col == 0) & (col.max(axis=1, keepdims=True) == cols - 1) & (faces != pole)
    faces_uv[wraps] = n_grid + row[wraps]
    fan = np.flatnonzero((faces == pole).any(axis=1))
    faces_uv[fan, 2] = n_grid + rows + np.arange(len(fan))
    return uvs, faces_uv


def make_synth_flame(resolution: int = DEFAULT_RESOLUTION, seed: int = 0):
    """The raw `generic_model.pkl` dict, the head template and the static embedding of SynthFLAME.

    Same keys, shapes and quirks as FLAME 2020 (shapedirs 300 shape + 100 expression, posedirs of
    4 non-root joints, sparse J_regressor, uint32 kintree_table with the root's parent 2^32 - 1),
    at ``resolution`` columns around the head; metres. Deterministic for (resolution, seed).
    """
    if resolution < MIN_RESOLUTION or resolution % 2:
        raise InputError(f"SynthFLAME resolution must be an even number >= {MIN_RESOLUTION}, got {resolution}")
    rng = np.random.default_rng(seed)
    params, faces, rows, cols = _grid(resolution)
    mean = _mean_shape(params)
    embedding = _embedding(mean, faces, params)
    regressor = _joint_regressor(mean, params, rows, cols)
    weights = _skinning_weights(mean, params)
    shapedirs = np.concatenate([_shape_basis(mean, params, rng), _expression_basis(mean, params, rng)], axis=2)
    posedirs = _pose_correctives(mean, params, rng)
    uvs, faces_uv = _uv_layout(params, faces, rows, cols)
    # FLAME's origin is near the root joint, not at the face: shift so the root joint is at 0
    origin = regressor[0] @ mean
    v_template = (mean - origin) * METRES_PER_UNIT
    data = {
        "v_template": v_template,
        "shapedirs": shapedirs * METRES_PER_UNIT,
        "posedirs": posedirs * METRES_PER_UNIT,
        "J_regressor": scipy.sparse.csc_matrix(regressor),
        "weights": weights,
        "kintree_table": np.array([[2**32 - 1, 0, 1, 1, 1], np.arange(flame.N_JOINTS)], dtype=np.uint32),
        "f": faces.astype(np.uint32),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
        "synth_info": f"generator={GENERATOR_NAME} version={GENERATOR_VERSION} seed={seed} resolution={resolution}",
    }
    template = flame.HeadTemplate(vertices=v_template, uvs=uvs, faces=faces.astype(np.int64), faces_uv=faces_uv)
    return data, template, embedding


def write_synth_flame(folder: str | Path, resolution: int = DEFAULT_RESOLUTION, seed: int = 0) -> Path:
    """Write SynthFLAME's three files into ``folder`` (each atomically); returns the folder."""
    import pickle

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data, template, embedding = make_synth_flame(resolution, seed)
    with atomic_open(folder / flame.MODEL_FILE, "wb") as fh:
        pickle.dump(data, fh, protocol=2)
    flame.write_head_template(folder / flame.TEMPLATE_FILE, template)
    flame.write_static_embedding(folder / flame.EMBEDDING_FILE, embedding)
    return folder
