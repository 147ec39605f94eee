"""SynthBFM: a procedural face morphable model written in the `BFM_model_front.mat` layout, so the
loader that reads the real BFM09 model reads it too (DESIGN.md sections 3 and 7)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.io
from scipy.spatial import cKDTree

from facehd import conventions as cv
from facehd.errors import InputError
from facehd.fsutil import atomic_path

GENERATOR_NAME = "facehd.synth.bfm"
GENERATOR_VERSION = 1
# Grid of about R x R vertices: 180 gives 32,580 vertices and 64,440 faces, the size class of the
# real BFM front model (35,709 / 70,789), generated in one to two seconds.
DEFAULT_RESOLUTION = 180
MIN_RESOLUTION = 16  # below this the eyes and lips are narrower than one grid cell
POINT_BUF_WIDTH = 8  # faces listed per vertex in `point_buf`, as in BFM09

# All lengths below are model units (1 unit = 100 mm); x to the subject's left, y up, z forward.

# --- head outline: a half-shell over a UV grid, (u, v) -> (theta, y) ------------------------
Y_BOTTOM = -1.12  # bottom border, under the chin
Y_TOP = 1.12  # top border, inside the hair band
THETA_MAX = np.radians(80.0)  # half-angle of the shell; the border faces sideways, not backwards
OUTLINE_HALF_WIDTH = 0.74  # widest half-width: face width 2 * 0.74 * sin(80 deg) ~ 146 mm
OUTLINE_CENTRE_Y = 0.2  # the outline is an egg, widest at the temples / cheekbones
OUTLINE_HALF_HEIGHT = 1.42  # of the ellipse the outline follows; narrows to ~50 mm under the chin
SHELL_DEPTH = 0.62  # depth of the shell from its side border to the midline
SHELL_DEPTH_BOTTOM = 0.35  # the lower face is shallower, so the chin is not a wedge

# --- profile (z offsets along the midline) ---------------------------------------------------
FOREHEAD_START_Y = 0.62  # above this the forehead slopes back
FOREHEAD_SLOPE = 0.55  # quadratic recession coefficient of the forehead
JAW_START_Y = -0.55  # below this the lower face recedes slightly
JAW_RECESS = 0.08
UNDER_CHIN_Y = -0.98  # below the chin the surface turns back toward the neck
UNDER_CHIN_RECESS = 9.0

# --- landmark design (the features are placed from these; iBUG 68 order) ----------------------
EYE_CENTRE_X = 0.305  # intercanthal distance ~32 mm, eye width ~29 mm
EYE_Y = 0.30
EYE_HALF_WIDTH = 0.145
EYE_UPPER_HEIGHT = 0.048  # upper lid above the corner line
EYE_LOWER_HEIGHT = 0.034  # lower lid below it
LID_LANDMARK_T = 0.4  # lid landmarks at 40% of the half-width from the eye centre
BROW_Y = 0.45  # brow end height
BROW_ARCH = 0.065
BROW_CENTRE_X = 0.30
BROW_HALF_LENGTH = 0.21
NASION_Y = 0.30
NOSE_TIP_Y = -0.06
SUBNASALE_Y = -0.20
NOSTRIL_HALF_WIDTH = 0.095
NOSTRIL_LANDMARK_RISE = 0.03  # iBUG 31 / 35 sit this much above the subnasale
MOUTH_Y = -0.49  # the mouth line
MOUTH_HALF_WIDTH = 0.25  # mouth width ~50 mm
UPPER_LIP_HEIGHT = 0.065
LOWER_LIP_HEIGHT = 0.085
INNER_LIP_GAP = 0.01  # inner-lip landmarks above / below the mouth line
CHIN_Y = -0.98
JAW_TOP_Y = 0.26  # iBUG 0 / 16, about at the height of the lower eyelids
JAW_HALF_WIDTH = 0.68

# --- feature relief (heights above the shell) -------------------------------------------------
NOSE_BRIDGE_HEIGHT = 0.07  # at the nasion
NOSE_TIP_HEIGHT = 0.30  # nose protrusion ~30 mm, so its tip is the most forward point
NOSE_BRIDGE_WIDTH = 0.045
NOSE_TIP_WIDTH = 0.085
NOSE_ABOVE_NASION = 0.06  # the bridge fades out over this length above the nasion
NOSE_RIDGE_EXPONENT = 1.6  # the bridge steepens toward the tip
ALA_OFFSET = (0.095, -0.15)  # nostril wings (x, y)
ALA_RADII = (0.045, 0.04)
ALA_HEIGHT = 0.11
SOCKET_RADII = (0.16, 0.10)
SOCKET_DEPTH = 0.10
SOCKET_RAISE = 0.02  # the socket centre sits a little above the eye line, under the brow
EYEBALL_RADII = (0.12, 0.055)
EYEBALL_HEIGHT = 0.05  # the eyeball and lids bulge inside the socket
BROW_RIDGE_RADII = (0.17, 0.055)
BROW_RIDGE_HEIGHT = 0.045
BROW_RIDGE_RAISE = 0.03  # ridge centre above the brow ends
CHEEKBONE_OFFSET = (0.44, 0.08)
CHEEKBONE_RADII = (0.14, 0.10)
CHEEKBONE_HEIGHT = 0.05
CHEEK_OFFSET = (0.33, -0.28)
CHEEK_RADII = (0.15, 0.15)
CHEEK_HEIGHT = 0.03
MUZZLE_CENTRE_Y = -0.40  # the teeth push the mouth area forward
MUZZLE_RADII = (0.32, 0.26)
MUZZLE_HEIGHT = 0.07
LIP_HEIGHT = 0.045  # lip protrusion above the muzzle
MOUTH_LINE_DEPTH = 0.03
MOUTH_LINE_WIDTH = 0.012  # the groove between the lips, about one grid cell at the default size
MENTOLABIAL_Y = -0.68  # the fold between lower lip and chin
MENTOLABIAL_RADII = (0.16, 0.04)
MENTOLABIAL_DEPTH = 0.025
CHIN_BUMP_Y = -0.85
CHIN_BUMP_RADII = (0.16, 0.10)
CHIN_BUMP_HEIGHT = 0.07
HAIR_BAND_Y = 0.96  # above this the surface is the hair band (cap / hairline)
HAIR_BAND_HEIGHT = 0.02  # hair stands slightly proud of the forehead
HAIR_BAND_BLEND = 0.03  # the hairline blends over this height

# --- regions and masks ---------------------------------------------------------------------------
EYE_REGION_RADII = (0.20, 0.105)
NOSE_REGION_HALF_WIDTH = (0.06, 0.16)  # at the nasion and at the nostrils
MOUTH_REGION_RADII = (0.36, 0.17)
NOSE_REGION_MARGIN_Y = (0.05, 0.02)  # above the nasion, below the subnasale
FOREHEAD_BOTTOM_Y = 0.55  # the forehead starts above the brows
FOREHEAD_HALF_WIDTH = 0.58
CHEEK_REGION_Y = (-0.62, 0.22)
CHEEK_REGION_X = (0.14, 0.62)
FRONT_BORDER_U = 0.07  # columns this close to the side border are outside the front region
FRONT_BORDER_V = 0.03  # rows this close to the bottom border likewise

# --- bases -----------------------------------------------------------------------------------
ID_STD_FIRST = 0.045  # RMS displacement of the first identity component at 1 sigma (4.5 mm)
ID_STD_DECAY = 0.9  # sigma_k = first * k^-decay
ID_MAX_FREQ = 7  # cosine fields cos(pi m u) cos(pi n v) with m, n < this
ID_ASYM_PENALTY = 2.5  # asymmetric fields come after symmetric ones of similar frequency
# Identity varies most in the middle of the face and least at the border (x, y radii, model units)
ID_ENVELOPE_RADII = (0.55, 0.8)
ID_ENVELOPE_CENTRE_Y = -0.1
ID_ENVELOPE_FLOOR = 0.3  # relative variation at the border
MIX_BLOCK = 8  # the seed rotates bases within blocks of this many of similar frequency
EXP_TAIL_STD = (0.01, 0.004)  # peak displacement of the first / last localized bump (1 sigma)
EXP_TAIL_RADIUS = (0.07, 0.16)  # radius range of the localized bumps
EXP_TAIL_AXIS_WEIGHTS = (0.6, 0.6, 1.0)  # bumps move mostly along z, the way skin bulges
JAW_HINGE_YZ = (0.15, -0.45)  # the jaw rotates about an x axis behind the cheeks
JAW_LINE_SLOPE = 1.2  # the jaw's upper boundary rises from the mouth corners toward the hinge
JAW_EDGE_AT_LIPS = 0.005  # width of that boundary at the lips (sharp: the lips part)
JAW_EDGE_SPREAD = 1.0  # it widens by this much per unit of distance beyond the mouth corners
JAW_LATERAL_REACH = 0.78  # jaw motion fades to 0 at this |x|
TEX_STD_FIRST = 24.0  # colour units at 1 sigma for the first texture component
TEX_STD_DECAY = 0.7
TEX_STD_RANGE = 2.0  # mean +- this many sigma along any one component stays in 0..255
TEX_MAX_FREQ = 7
TEX_CHROMA_PENALTY = 6.0  # colour-cast fields come after brightness fields of similar frequency

# --- mean colours (0..255) -------------------------------------------------------------------
SKIN_RGB = (196.0, 150.0, 125.0)
BLUSH_RGB = (10.0, -8.0, -6.0)  # added on the cheeks
BLUSH_OFFSET = (0.33, -0.20)
BLUSH_RADII = (0.12, 0.10)
LIP_RGB = (168.0, 88.0, 86.0)
MOUTH_INTERIOR_RGB = (64.0, 28.0, 30.0)  # the lip line; stretches into the open mouth
BROW_RGB = (78.0, 58.0, 46.0)
SCLERA_RGB = (232.0, 226.0, 218.0)
IRIS_RGB = (88.0, 64.0, 46.0)
PUPIL_RGB = (22.0, 18.0, 18.0)
LASH_RGB = (60.0, 45.0, 40.0)
NOSTRIL_RGB = (92.0, 56.0, 50.0)
HAIR_RGB = (52.0, 40.0, 32.0)
BROW_THICKNESS = 0.022  # half-thickness of the brow stroke at its middle
IRIS_RADIUS = 0.055
PUPIL_RADIUS = 0.02
LASH_WIDTH = 0.008
NOSTRIL_RADII = (0.035, 0.018)
NOSTRIL_OFFSET = (0.05, -0.175)
EDGE_SOFTNESS = 0.008  # colour edges blend over this width


# ----------------------------------------------------------------------------------------------
# small helpers


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _gauss(x, y, centre, radii) -> np.ndarray:
    """Elliptical Gaussian with the given standard deviations (used for the dense mean shape)."""
    return np.exp(-0.5 * (((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2))


def _bump(x, y, centre, radii) -> np.ndarray:
    """Compact smooth bump (1 - r^2)^3, exactly zero outside the ellipse: localized bases stay
    localized and compress well in the file."""
    r2 = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
    return np.clip(1.0 - r2, 0.0, None) ** 3


def _soft_inside(signed_distance: np.ndarray, width: float = EDGE_SOFTNESS) -> np.ndarray:
    """1 inside (distance > 0), 0 outside, blended over ``width``."""
    return _smoothstep(signed_distance / width + 0.5)


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) points, 2-vectors a, b -> (N,) distance to the segment ab and (N,) parameter t."""
    ab = b - a
    t = np.clip(((p - a) @ ab) / (ab @ ab), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[:, None] * ab), axis=1), t


# ----------------------------------------------------------------------------------------------
# grid and mean shape


def _grid(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """UVs (N, 2) and counter-clockwise faces (F, 3) of the vertex grid, rows bottom to top.

    The column count is odd so a vertex column lies on the midline, and the quad diagonals are
    mirrored across it, so the mesh is left-right symmetric.
    """
    n_u = resolution | 1
    n_v = resolution
    uu, vv = np.meshgrid(np.linspace(0.0, 1.0, n_u), np.linspace(0.0, 1.0, n_v))
    uv = np.stack([uu.ravel(), vv.ravel()], axis=1)
    idx = np.arange(n_u * n_v).reshape(n_v, n_u)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, 1:], idx[1:, :-1]  # quad corners, CCW
    right = (np.arange(n_u - 1) >= n_u // 2)[None, :]
    # right half splits quads along a-c, left half along b-d (its mirror image)
    t1 = np.where(right[..., None], np.stack([a, b, c], -1), np.stack([a, b, d], -1))
    t2 = np.where(right[..., None], np.stack([a, c, d], -1), np.stack([b, c, d], -1))
    faces = np.stack([t1, t2], axis=2).reshape(-1, 3)
    return uv, faces


def _outline_half_width(y: np.ndarray) -> np.ndarray:
    rel = (y - OUTLINE_CENTRE_Y) / OUTLINE_HALF_HEIGHT
    return OUTLINE_HALF_WIDTH * np.sqrt(np.clip(1.0 - rel**2, 0.0, None))


def _shell(uv: np.ndarray) -> np.ndarray:
    """(N, 2) UVs -> (N, 3) points of the bare half-head shell (no features)."""
    theta = (uv[:, 0] - 0.5) * 2.0 * THETA_MAX
    y = Y_BOTTOM + uv[:, 1] * (Y_TOP - Y_BOTTOM)
    half_width = _outline_half_width(y)
    lower = _smoothstep((NOSE_TIP_Y - y) / (NOSE_TIP_Y - Y_BOTTOM))
    depth = SHELL_DEPTH + (SHELL_DEPTH_BOTTOM - SHELL_DEPTH) * lower
    x = half_width * np.sin(theta)
    z = depth * np.cos(theta) + _profile(y)
    return np.stack([x, y, z], axis=1)


def _profile(y: np.ndarray) -> np.ndarray:
    """Midline-independent z offsets: sloping forehead, receding jaw, underside of the chin."""
    forehead = -FOREHEAD_SLOPE * np.clip(y - FOREHEAD_START_Y, 0.0, None) ** 2
    jaw = -JAW_RECESS * np.clip(JAW_START_Y - y, 0.0, None) ** 2
    under = -UNDER_CHIN_RECESS * np.clip(UNDER_CHIN_Y - y, 0.0, None) ** 2
    return forehead + jaw + under


def _nose_relief(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bridge rising from the nasion to the tip, a rounded underside down to the subnasale, and
    the nostril wings."""
    t = np.clip((NASION_Y - y) / (NASION_Y - NOSE_TIP_Y), 0.0, 1.0)
    ridge = NOSE_BRIDGE_HEIGHT + (NOSE_TIP_HEIGHT - NOSE_BRIDGE_HEIGHT) * t**NOSE_RIDGE_EXPONENT
    above = NOSE_BRIDGE_HEIGHT * np.exp(-(((y - NASION_Y) / NOSE_ABOVE_NASION) ** 2))
    s = np.clip((NOSE_TIP_Y - y) / (NOSE_TIP_Y - SUBNASALE_Y), 0.0, 1.0)
    underside = NOSE_TIP_HEIGHT * np.sqrt(np.clip(1.0 - s**2, 0.0, None))
    height = np.where(y > NASION_Y, above, np.where(y > NOSE_TIP_Y, ridge, underside))
    height = np.where(y < SUBNASALE_Y, 0.0, height)
    width = NOSE_BRIDGE_WIDTH + (NOSE_TIP_WIDTH - NOSE_BRIDGE_WIDTH) * np.maximum(t, s > 0)
    nose = height * np.exp(-0.5 * (x / width) ** 2)
    alae = sum(ALA_HEIGHT * _gauss(x, y, (side * ALA_OFFSET[0], ALA_OFFSET[1]), ALA_RADII)
               for side in (-1.0, 1.0))
    return np.maximum(nose, alae)


def _lip_profile_x(x: np.ndarray) -> np.ndarray:
    """1 at the middle of the mouth, 0 beyond its corners."""
    return np.clip(1.0 - (x / MOUTH_HALF_WIDTH) ** 2, 0.0, None) ** 0.5


def _mouth_relief(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    muzzle = MUZZLE_HEIGHT * _gauss(x, y, (0.0, MUZZLE_CENTRE_Y), MUZZLE_RADII)
    lx = _lip_profile_x(x)
    upper_c = MOUTH_Y + 0.5 * UPPER_LIP_HEIGHT
    lower_c = MOUTH_Y - 0.5 * LOWER_LIP_HEIGHT
    upper = np.exp(-0.5 * ((y - upper_c) / (0.5 * UPPER_LIP_HEIGHT)) ** 2)
    lower = np.exp(-0.5 * ((y - lower_c) / (0.5 * LOWER_LIP_HEIGHT)) ** 2)
    lips = LIP_HEIGHT * lx * (upper + lower)
    groove = MOUTH_LINE_DEPTH * lx * np.exp(-0.5 * ((y - MOUTH_Y) / MOUTH_LINE_WIDTH) ** 2)
    fold = MENTOLABIAL_DEPTH * _gauss(x, y, (0.0, MENTOLABIAL_Y), MENTOLABIAL_RADII)
    chin = CHIN_BUMP_HEIGHT * _gauss(x, y, (0.0, CHIN_BUMP_Y), CHIN_BUMP_RADII)
    return muzzle + lips - groove - fold + chin


def _eye_relief(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    relief = np.zeros_like(x)
    for side in (-1.0, 1.0):
        centre = (side * EYE_CENTRE_X, EYE_Y)
        relief -= SOCKET_DEPTH * _gauss(x, y, (centre[0], EYE_Y + SOCKET_RAISE), SOCKET_RADII)
        relief += EYEBALL_HEIGHT * _gauss(x, y, centre, EYEBALL_RADII)
        relief += BROW_RIDGE_HEIGHT * _gauss(x, y, (side * BROW_CENTRE_X, BROW_Y + BROW_RIDGE_RAISE),
                                             BROW_RIDGE_RADII)
    return relief


def _cheek_relief(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    relief = np.zeros_like(x)
    for side in (-1.0, 1.0):
        relief += CHEEKBONE_HEIGHT * _gauss(x, y, (side * CHEEKBONE_OFFSET[0], CHEEKBONE_OFFSET[1]),
                                            CHEEKBONE_RADII)
        relief += CHEEK_HEIGHT * _gauss(x, y, (side * CHEEK_OFFSET[0], CHEEK_OFFSET[1]), CHEEK_RADII)
    return relief


def _mean_shape(uv: np.ndarray) -> np.ndarray:
    """(N, 2) UVs -> (N, 3) mean shape: the shell plus the facial relief along z."""
    points = _shell(uv)
    x, y = points[:, 0], points[:, 1]
    relief = _nose_relief(x, y) + _mouth_relief(x, y) + _eye_relief(x, y) + _cheek_relief(x, y)
    relief += HAIR_BAND_HEIGHT * _smoothstep((y - HAIR_BAND_Y) / HAIR_BAND_BLEND)
    points[:, 2] += relief
    return points


# ----------------------------------------------------------------------------------------------
# landmarks


def _eye_landmarks(centre_x: float) -> np.ndarray:
    """6 eye points in iBUG order for either eye: the image-left corner, the upper lid left to
    right, the image-right corner, the lower lid right to left."""
    t, w = LID_LANDMARK_T, EYE_HALF_WIDTH
    lid = 1.0 - t**2
    xs = centre_x + w * np.array([-1.0, -t, t, 1.0, t, -t])
    ys = EYE_Y + np.array([0.0, EYE_UPPER_HEIGHT * lid, EYE_UPPER_HEIGHT * lid, 0.0,
                           -EYE_LOWER_HEIGHT * lid, -EYE_LOWER_HEIGHT * lid])
    return np.stack([xs, ys], axis=1)


def _brow_curve(centre_x: float, t: np.ndarray) -> np.ndarray:
    """Points of a brow at parameters t in [0, 1] from its image-left to image-right end."""
    xs = centre_x + BROW_HALF_LENGTH * (2.0 * t - 1.0)
    ys = BROW_Y + BROW_ARCH * np.sin(np.pi * t)
    return np.stack([xs, ys], axis=1)


def landmark_design() -> np.ndarray:
    """(68, 2) designed (x, y) of the iBUG landmarks in model units; x < 0 is the subject's right.

    The mean shape's features are placed from the same constants, so each designed point lies on
    its feature; `keypoints` are the mesh vertices nearest to these points.
    """
    k = np.arange(17)
    jaw_angle = np.pi * k / 16.0
    jaw = np.stack([-JAW_HALF_WIDTH * np.cos(jaw_angle),
                    JAW_TOP_Y - (JAW_TOP_Y - CHIN_Y) * np.sin(jaw_angle)], axis=1)
    brow_t = np.linspace(0.0, 1.0, 5)
    brows = np.concatenate([_brow_curve(-BROW_CENTRE_X, brow_t), _brow_curve(BROW_CENTRE_X, brow_t)])
    bridge = np.stack([np.zeros(4), np.linspace(NASION_Y, NOSE_TIP_Y, 4)], axis=1)
    nostril_x = NOSTRIL_HALF_WIDTH * np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    nostril_y = SUBNASALE_Y + NOSTRIL_LANDMARK_RISE * np.array([1.0, 0.35, 0.0, 0.35, 1.0])
    nose_base = np.stack([nostril_x, nostril_y], axis=1)
    eyes = np.concatenate([_eye_landmarks(-EYE_CENTRE_X), _eye_landmarks(EYE_CENTRE_X)])
    # lips as fractions of the mouth's half-width and the lip heights (a cupid's bow at 51)
    w, up, lo, gap = MOUTH_HALF_WIDTH, UPPER_LIP_HEIGHT, LOWER_LIP_HEIGHT, INNER_LIP_GAP
    outer = np.array([
        [-w, 0.0], [-0.62 * w, 0.8 * up], [-0.25 * w, up], [0.0, 0.9 * up], [0.25 * w, up],
        [0.62 * w, 0.8 * up], [w, 0.0], [0.62 * w, -0.85 * lo], [0.25 * w, -lo], [0.0, -lo],
        [-0.25 * w, -lo], [-0.62 * w, -0.85 * lo],
    ])
    inner = np.array([
        [-0.85 * w, 0.0], [-0.35 * w, gap], [0.0, gap], [0.35 * w, gap], [0.85 * w, 0.0],
        [0.35 * w, -gap], [0.0, -gap], [-0.35 * w, -gap],
    ])
    mouth = np.concatenate([outer, inner]) + np.array([0.0, MOUTH_Y])
    return np.concatenate([jaw, brows, bridge, nose_base, eyes, mouth])


def _keypoints(mean: np.ndarray) -> np.ndarray:
    """(68,) 0-based vertex indices: nearest vertex (in x, y) to each designed landmark, except the
    nose tip, which is by definition the most forward vertex."""
    # the surface is a graph over (x, y), so the nearest vertex in (x, y) is the one on the feature
    _, keypoints = cKDTree(mean[:, :2]).query(landmark_design())
    keypoints[cv.NOSE_TIP_IBUG] = int(np.argmax(mean[:, 2]))
    return keypoints


# ----------------------------------------------------------------------------------------------
# regions, masks, point_buf


def _regions(mean: np.ndarray) -> np.ndarray:
    """(N,) region codes (facehd.conventions.REGION_CODES); later rules override earlier ones."""
    x, y = mean[:, 0], mean[:, 1]
    codes = cv.REGION_CODES
    region = np.full(len(mean), codes["skin"], dtype=np.int32)
    forehead = (y > FOREHEAD_BOTTOM_Y) & (np.abs(x) < FOREHEAD_HALF_WIDTH)
    region[forehead] = codes["forehead"]
    cheek = ((y > CHEEK_REGION_Y[0]) & (y < CHEEK_REGION_Y[1]) & (np.abs(x) > CHEEK_REGION_X[0])
             & (np.abs(x) < CHEEK_REGION_X[1]))
    region[cheek] = codes["cheek"]
    mouth = ((x / MOUTH_REGION_RADII[0]) ** 2 + ((y - MOUTH_Y) / MOUTH_REGION_RADII[1]) ** 2) < 1.0
    region[mouth] = codes["mouth"]
    t = np.clip((NASION_Y - y) / (NASION_Y - SUBNASALE_Y), 0.0, 1.0)
    half_width = NOSE_REGION_HALF_WIDTH[0] + (NOSE_REGION_HALF_WIDTH[1] - NOSE_REGION_HALF_WIDTH[0]) * t
    nose = ((y < NASION_Y + NOSE_REGION_MARGIN_Y[0]) & (y > SUBNASALE_Y - NOSE_REGION_MARGIN_Y[1])
            & (np.abs(x) < half_width))
    region[nose] = codes["nose"]
    for side in (-1.0, 1.0):
        eye = _gauss(x, y, (side * EYE_CENTRE_X, EYE_Y), EYE_REGION_RADII) > np.exp(-0.5)
        region[eye] = codes["eyes"]
    region[y > HAIR_BAND_Y] = codes["hair_band"]
    return region


def _front_vertices(uv: np.ndarray, region: np.ndarray) -> np.ndarray:
    """0-based indices of the front region: all but the hair band and the outer border."""
    inside = ((uv[:, 0] > FRONT_BORDER_U) & (uv[:, 0] < 1.0 - FRONT_BORDER_U)
              & (uv[:, 1] > FRONT_BORDER_V) & (region != cv.REGION_CODES["hair_band"]))
    return np.flatnonzero(inside)


def point_buf_of(faces: np.ndarray, n_vertices: int, width: int = POINT_BUF_WIDTH) -> np.ndarray:
    """(N, width) 0-based faces incident to each vertex, padded with F (BFM's "zero normal").

    A vertex with more than ``width`` incident faces keeps the first ``width`` (never happens on
    the SynthBFM grid, whose vertices have at most 6).
    """
    n_faces = len(faces)
    vertex = faces.ravel()
    face = np.repeat(np.arange(n_faces), 3)
    order = np.argsort(vertex, kind="stable")
    vertex, face = vertex[order], face[order]
    starts = np.searchsorted(vertex, np.arange(n_vertices))
    rank = np.arange(len(vertex)) - starts[vertex]
    keep = rank < width
    buf = np.full((n_vertices, width), n_faces, dtype=np.int64)
    buf[vertex[keep], rank[keep]] = face[keep]
    return buf


# ----------------------------------------------------------------------------------------------
# identity basis


def _cosine_fields(uv: np.ndarray, max_freq: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(K, N) fields cos(pi m u) cos(pi n v) for m, n < max_freq, and their (m, n)."""
    freqs = [(m, n) for m in range(max_freq) for n in range(max_freq)]
    fields = np.stack([np.cos(np.pi * m * uv[:, 0]) * np.cos(np.pi * n * uv[:, 1])
                       for m, n in freqs])
    return fields, freqs


def _orthonormalize(candidates: np.ndarray, prior: np.ndarray | None = None,
                    tol: float = 1e-6) -> np.ndarray:
    """Orthonormal rows spanning, in order, the candidate rows after ``prior`` is projected out
    (what Gram-Schmidt gives), computed as CholeskyQR2 on the small Gram matrix: much faster
    here than a Householder QR of the tall matrix."""
    rows = candidates if prior is None else np.concatenate([prior, candidates])
    n_prior = 0 if prior is None else len(prior)
    gram = rows @ rows.T
    chol = np.linalg.cholesky(gram)
    # chol[i, i]^2 is what is left of row i once the rows before it are projected out
    if not np.all(np.diag(chol) ** 2 > tol**2 * np.diag(gram)):
        raise RuntimeError("SynthBFM basis candidates are linearly dependent")
    q = np.linalg.inv(chol) @ rows
    q = np.linalg.inv(np.linalg.cholesky(q @ q.T)) @ q  # second pass: orthogonal to rounding
    return q[n_prior:]


def _rigid_modes(points: np.ndarray) -> np.ndarray:
    """(6, 3N) infinitesimal translations and rotations of ``points`` (interleaved xyz)."""
    centred = points - points.mean(axis=0)
    modes = []
    for axis in np.eye(3):
        modes.append(np.broadcast_to(axis, points.shape))
        modes.append(np.cross(axis, centred))
    return np.stack([m.reshape(-1) for m in modes])


def _mix_blocks(rows: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotate rows by random orthogonal matrices within blocks of ``MIX_BLOCK`` consecutive rows
    of the same group (symmetric / asymmetric), so the seed changes the bases while keeping their
    frequency order and orthonormality."""
    n = len(rows)
    mixing = np.zeros((n, n))
    for start in range(0, n, MIX_BLOCK):
        block = np.arange(start, min(start + MIX_BLOCK, n))
        for group in np.unique(groups[block]):
            idx = block[groups[block] == group]
            q, r = np.linalg.qr(rng.standard_normal((len(idx), len(idx))))
            mixing[np.ix_(idx, idx)] = q * np.sign(np.diag(r))
    return mixing @ rows


def _identity_basis(uv: np.ndarray, mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(3N, 80) smooth, global identity deformations, orthogonal to rigid motion, scaled so that
    component k has an RMS vertex displacement of sigma_k."""
    fields, freqs = _cosine_fields(uv, ID_MAX_FREQ)
    specs = []  # (sort key, field index, axis, symmetric)
    for j, (m, n) in enumerate(freqs):
        if m == 0 and n == 0:
            continue  # constant fields are translations
        for axis in (2, 1, 0):  # z first: depth carries most of a face's identity
            # x displacement mirrors with an odd-in-x field, y and z with an even one
            sym = (m % 2 == 1) if axis == 0 else (m % 2 == 0)
            specs.append(((np.hypot(m, n) + ID_ASYM_PENALTY * (not sym), 2 - axis), j, axis, sym))
    specs = sorted(specs, key=lambda spec: spec[0])[: cv.N_ID]
    envelope = ID_ENVELOPE_FLOOR + (1.0 - ID_ENVELOPE_FLOOR) * _gauss(
        mean[:, 0], mean[:, 1], (0.0, ID_ENVELOPE_CENTRE_Y), ID_ENVELOPE_RADII)
    candidates = np.zeros((len(specs), len(uv), 3))
    for c, (_, j, axis, _) in enumerate(specs):
        candidates[c, :, axis] = envelope * fields[j]
    rows = _orthonormalize(candidates.reshape(len(specs), -1), prior=_rigid_modes(mean))
    rows = _mix_blocks(rows, np.array([spec[3] for spec in specs]), rng)
    rms_unit = np.sqrt(len(uv))  # an orthonormal row has RMS vertex displacement 1/sqrt(N)
    sigma = ID_STD_FIRST * np.arange(1, cv.N_ID + 1) ** -ID_STD_DECAY
    return (rows * (rms_unit * sigma)[:, None]).T


# ----------------------------------------------------------------------------------------------
# expression basis


def _lower_face_weight(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """1 on the part of the face the jaw carries, 0 above the mouth line; the boundary runs from
    the mouth corners up toward the jaw hinge and softens away from the lips."""
    beyond = np.clip(np.abs(x) - MOUTH_HALF_WIDTH, 0.0, None)
    line = MOUTH_Y + JAW_LINE_SLOPE * beyond
    width = JAW_EDGE_AT_LIPS + JAW_EDGE_SPREAD * beyond  # sharp at the lips, which part
    lateral = np.clip(1.0 - (np.abs(x) / JAW_LATERAL_REACH) ** 2, 0.0, None)
    return _smoothstep((line - y) / width + 0.5) * lateral


def _side_weight(y, above: float, width: float = 0.02) -> np.ndarray:
    """1 above ``above`` (width > 0) or below it (width < 0), blended over |width|."""
    return _smoothstep((y - above) / width + 0.5)


def _semantic_expressions() -> list[tuple[str, float, Callable[[np.ndarray], np.ndarray]]]:
    """(name, 1-sigma peak displacement, field(mean) -> (N, 3)) of the semantic expressions, in
    order of decreasing sigma.

    The fields below are a design table: bump centres and radii in model units, ``s`` = +1 for
    the subject's left (x > 0) and -1 for the right, motion directions unnormalized because
    `_expression_basis` rescales every field to its peak.
    """

    def vec(*components):
        return np.array(components, dtype=np.float64)

    def both(fn):
        return lambda p: fn(p, -1.0) + fn(p, 1.0)

    def jaw_open(p):
        w = _lower_face_weight(p[:, 0], p[:, 1])
        # small rotation about the x axis through the hinge: d = (0, -(z - hz), y - hy)
        hinge_y, hinge_z = JAW_HINGE_YZ
        return w[:, None] * np.stack([0.0 * w, -(p[:, 2] - hinge_z), p[:, 1] - hinge_y], axis=1)

    def smile(p, s):
        corner = _bump(p[:, 0], p[:, 1], (s * MOUTH_HALF_WIDTH, MOUTH_Y), (0.2, 0.17))
        cheek = _bump(p[:, 0], p[:, 1], (s * 0.33, -0.2), (0.2, 0.16))
        return corner[:, None] * vec(s * 0.5, 0.8, -0.1) + cheek[:, None] * vec(0.0, 0.35, 0.15)

    def brow_raise(p, s=None):
        # flat across the brows (both, or one), fading over the forehead and above the eyes
        cx, half = (0.0, 0.55) if s is None else (s * BROW_CENTRE_X, 0.2)
        across = _smoothstep((half + 0.2 - np.abs(p[:, 0] - cx)) / 0.2)
        w = across * _bump(0.0, p[:, 1], (0.0, BROW_Y + 0.1), (1.0, 0.35))
        w = w * _side_weight(p[:, 1], EYE_Y + EYE_UPPER_HEIGHT + 0.03, 0.08)
        return w[:, None] * vec(0.0, 1.0, 0.0)

    def eye_close(p, s):
        w = _bump(p[:, 0], p[:, 1], (s * EYE_CENTRE_X, EYE_Y + 0.03), (EYE_HALF_WIDTH * 1.3, 0.09))
        w = w * _side_weight(p[:, 1], EYE_Y - 0.01, 0.02)
        return w[:, None] * vec(0.0, -1.0, 0.15)

    def lip_pucker(p):
        w = _bump(p[:, 0], p[:, 1], (0.0, MOUTH_Y), (0.36, 0.22))
        return w[:, None] * np.stack([-1.2 * p[:, 0], 0.0 * w, 0.0 * w + 1.0], axis=1)

    def mouth_stretch(p, s):
        w = _bump(p[:, 0], p[:, 1], (s * MOUTH_HALF_WIDTH, MOUTH_Y), (0.2, 0.16))
        return w[:, None] * vec(s, -0.3, -0.2)

    def cheek_puff(p, s):
        w = _bump(p[:, 0], p[:, 1], (s * 0.38, -0.35), (0.22, 0.22))
        return w[:, None] * vec(s * 0.5, 0.0, 1.0)

    def frown(p, s):
        w = _bump(p[:, 0], p[:, 1], (s * 0.15, BROW_Y + 0.03), (0.18, 0.12))
        return w[:, None] * vec(-s * 0.6, -1.0, 0.2)

    def nose_wrinkle(p, s):
        w = _bump(p[:, 0], p[:, 1], (s * 0.1, -0.08), (0.12, 0.15))
        return w[:, None] * vec(0.0, 1.0, 0.2)

    def jaw_sideways(p):
        w = _lower_face_weight(p[:, 0], p[:, 1])
        return w[:, None] * vec(1.0, 0.0, 0.0)

    def lip_corner_depress(p, s):
        w = _bump(p[:, 0], p[:, 1], (s * MOUTH_HALF_WIDTH, MOUTH_Y - 0.02), (0.16, 0.16))
        return w[:, None] * vec(0.0, -1.0, 0.0)

    def upper_lip_raise(p):
        w = _bump(p[:, 0], p[:, 1], (0.0, MOUTH_Y + 0.06), (0.3, 0.12))
        w = w * _side_weight(p[:, 1], MOUTH_Y, 0.015)
        return w[:, None] * vec(0.0, 1.0, 0.3)

    def lower_lip_depress(p):
        w = _bump(p[:, 0], p[:, 1], (0.0, MOUTH_Y - 0.07), (0.3, 0.13))
        w = w * _side_weight(p[:, 1], MOUTH_Y, -0.015)
        return w[:, None] * vec(0.0, -1.0, 0.2)

    def mouth_shift(p):
        w = _bump(p[:, 0], p[:, 1], (0.0, MOUTH_Y), (0.42, 0.25))
        return w[:, None] * vec(1.0, 0.0, 0.0)

    def lips_press(p):
        upper = _bump(p[:, 0], p[:, 1], (0.0, MOUTH_Y), (0.3, 0.1)) * _side_weight(p[:, 1], MOUTH_Y)
        lower = _bump(p[:, 0], p[:, 1], (0.0, MOUTH_Y), (0.3, 0.1)) * _side_weight(p[:, 1], MOUTH_Y, -0.02)
        return upper[:, None] * vec(0.0, -0.5, -1.0) + lower[:, None] * vec(0.0, 0.5, -1.0)

    def squint(p, s):
        w = _bump(p[:, 0], p[:, 1], (s * EYE_CENTRE_X, EYE_Y - 0.06), (0.2, 0.12))
        w = w * _side_weight(p[:, 1], EYE_Y + 0.01, -0.02)
        return w[:, None] * vec(0.0, 1.0, 0.1)

    def nostril_flare(p, s):
        w = _bump(p[:, 0], p[:, 1], (s * ALA_OFFSET[0], ALA_OFFSET[1]), (0.08, 0.08))
        return w[:, None] * vec(s, 0.0, 0.0)

    def chin_raise(p):
        w = _bump(p[:, 0], p[:, 1], (0.0, CHIN_BUMP_Y + 0.05), (0.25, 0.2))
        return w[:, None] * vec(0.0, 0.6, 0.8)

    def one(fn, s):
        return lambda p: fn(p, s)

    return [
        ("jaw_open", 0.08, jaw_open),
        ("smile", 0.05, both(smile)),
        ("brow_raise", 0.04, brow_raise),
        ("eye_close_left", 0.04, one(eye_close, 1.0)),
        ("eye_close_right", 0.04, one(eye_close, -1.0)),
        ("lip_pucker", 0.035, lip_pucker),
        ("mouth_stretch", 0.035, both(mouth_stretch)),
        ("cheek_puff", 0.035, both(cheek_puff)),
        ("frown", 0.03, both(frown)),
        ("nose_wrinkle", 0.025, both(nose_wrinkle)),
        ("smile_left", 0.025, one(smile, 1.0)),
        ("smile_right", 0.025, one(smile, -1.0)),
        ("brow_raise_left", 0.025, one(brow_raise, 1.0)),
        ("brow_raise_right", 0.025, one(brow_raise, -1.0)),
        ("jaw_sideways", 0.025, jaw_sideways),
        ("lip_corner_depress", 0.02, both(lip_corner_depress)),
        ("upper_lip_raise", 0.02, upper_lip_raise),
        ("lower_lip_depress", 0.02, lower_lip_depress),
        ("mouth_shift", 0.02, mouth_shift),
        ("lips_press", 0.018, lips_press),
        ("squint_left", 0.018, one(squint, 1.0)),
        ("squint_right", 0.018, one(squint, -1.0)),
        ("nostril_flare", 0.015, both(nostril_flare)),
        ("chin_raise", 0.015, chin_raise),
    ]


EXPRESSION_NAMES = tuple(name for name, _, _ in _semantic_expressions())


def _expression_basis(mean: np.ndarray, front: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(3N, 64) localized expressions: the semantic ones, then random bumps on the front region.

    Component k is scaled so its largest vertex displacement is sigma_k (its "1 sigma" motion).
    """
    fields, sigmas = [], []
    for _, sigma, field in _semantic_expressions():
        fields.append(field(mean))
        sigmas.append(sigma)
    n_tail = cv.N_EXP - len(fields)
    tail_sigma = np.geomspace(*EXP_TAIL_STD, n_tail)
    centres = mean[rng.choice(front, size=n_tail, replace=False)]
    radii = rng.uniform(*EXP_TAIL_RADIUS, size=n_tail)
    directions = rng.standard_normal((n_tail, 3)) * np.array(EXP_TAIL_AXIS_WEIGHTS)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    for centre, radius, direction, sigma in zip(centres, radii, directions, tail_sigma):
        w = _bump(mean[:, 0], mean[:, 1], centre[:2], (radius, radius))
        fields.append(w[:, None] * direction)
        sigmas.append(sigma)
    basis = []
    for field, sigma in zip(fields, sigmas):
        peak = np.linalg.norm(field, axis=1).max()
        basis.append((field * (sigma / peak)).reshape(-1))
    return np.stack(basis, axis=1)


# ----------------------------------------------------------------------------------------------
# texture


def _eye_opening(x: np.ndarray, y: np.ndarray, centre_x: float) -> np.ndarray:
    """Signed distance-like measure (model units, > 0 inside) of the almond between the lids."""
    t = (x - centre_x) / EYE_HALF_WIDTH
    shape = np.clip(1.0 - t**2, 0.0, None)
    upper = EYE_Y + EYE_UPPER_HEIGHT * shape - y
    lower = y - (EYE_Y - EYE_LOWER_HEIGHT * shape)
    sides = EYE_HALF_WIDTH - np.abs(x - centre_x)
    return np.minimum(np.minimum(upper, lower), sides)


def _mean_texture(mean: np.ndarray) -> np.ndarray:
    """(N, 3) mean colour in 0..255: skin with blush, lips, brows, eyes, nostrils, hair band."""
    x, y = mean[:, 0], mean[:, 1]
    xy = mean[:, :2]
    colour = np.tile(np.array(SKIN_RGB), (len(mean), 1))

    def paint(rgb, weight):
        nonlocal colour
        colour = colour + weight[:, None] * (np.array(rgb) - colour)

    for side in (-1.0, 1.0):
        blush = _gauss(x, y, (side * BLUSH_OFFSET[0], BLUSH_OFFSET[1]), BLUSH_RADII)
        colour += blush[:, None] * np.array(BLUSH_RGB)
    lip_top = MOUTH_Y + UPPER_LIP_HEIGHT * _lip_profile_x(x) ** 0.8
    lip_bottom = MOUTH_Y - LOWER_LIP_HEIGHT * _lip_profile_x(x) ** 0.8
    paint(LIP_RGB, _soft_inside(np.minimum(lip_top - y, y - lip_bottom)))
    line = np.minimum(MOUTH_LINE_WIDTH - np.abs(y - MOUTH_Y), 0.9 * MOUTH_HALF_WIDTH - np.abs(x))
    paint(MOUTH_INTERIOR_RGB, _soft_inside(line, MOUTH_LINE_WIDTH))
    for centre_x in (-BROW_CENTRE_X, BROW_CENTRE_X):
        curve = _brow_curve(centre_x, np.linspace(0.0, 1.0, 9))
        dist = np.full(len(mean), np.inf)
        along = np.zeros(len(mean))
        for i in range(len(curve) - 1):
            d, t = _segment_distance(xy, curve[i], curve[i + 1])
            closer = d < dist
            dist = np.where(closer, d, dist)
            along = np.where(closer, (i + t) / (len(curve) - 1), along)
        # thickest toward the inner end, tapering at the outer end
        inner_end = along if centre_x < 0 else 1.0 - along
        thickness = BROW_THICKNESS * (0.55 + 0.6 * inner_end)
        paint(BROW_RGB, 0.9 * _soft_inside(thickness - dist))
    for side in (-1.0, 1.0):
        cx = side * EYE_CENTRE_X
        opening = _eye_opening(x, y, cx)
        paint(LASH_RGB, _soft_inside(opening + LASH_WIDTH))
        paint(SCLERA_RGB, _soft_inside(opening))
        r = np.hypot(x - cx, y - EYE_Y - 0.005)
        paint(IRIS_RGB, _soft_inside(IRIS_RADIUS - r) * _soft_inside(opening))
        paint(PUPIL_RGB, _soft_inside(PUPIL_RADIUS - r) * _soft_inside(opening))
        nostril = _gauss(x, y, (side * NOSTRIL_OFFSET[0], NOSTRIL_OFFSET[1]), NOSTRIL_RADII)
        paint(NOSTRIL_RGB, _smoothstep(2.0 * nostril - 0.5))
    paint(HAIR_RGB, _smoothstep((y - HAIR_BAND_Y) / 0.03 + 0.5))
    return np.clip(colour, 0.0, 255.0)


def _texture_basis(uv: np.ndarray, mean_tex: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(3N, 80) smooth colour variations, strongest where the mean colour has headroom (skin),
    so mean +- 2 sigma along any one component stays within 0..255."""
    fields, freqs = _cosine_fields(uv, TEX_MAX_FREQ)
    # skin tone (brightness, reddish), red-green, yellow-blue: orthonormal colour directions
    colours = np.linalg.qr(np.array([[0.72, 0.56, 0.42], [0.8, -0.3, -0.5], [0.3, 0.3, -0.9]]).T)[0].T
    headroom = np.minimum(mean_tex, 255.0 - mean_tex)  # (N, 3)
    envelope = headroom / 127.5
    specs = sorted(((np.hypot(m, n) + TEX_CHROMA_PENALTY * (c > 0), c), j, c)
                   for j, (m, n) in enumerate(freqs) for c in range(3))
    specs = specs[: cv.N_TEX]
    candidates = np.stack([(envelope * fields[j][:, None] * colours[c]).reshape(-1)
                           for _, j, c in specs])
    rows = _orthonormalize(candidates)
    rows = _mix_blocks(rows, np.zeros(cv.N_TEX, dtype=int), rng)
    rows *= np.sqrt(len(uv))  # RMS per-vertex colour change 1 before scaling
    sigma = TEX_STD_FIRST * np.arange(1, cv.N_TEX + 1) ** -TEX_STD_DECAY
    largest = np.max(np.abs(rows) / np.maximum(headroom.reshape(1, -1), 1e-6), axis=1)
    sigma = np.minimum.accumulate(np.minimum(sigma, 1.0 / (TEX_STD_RANGE * largest)))
    return (rows * sigma[:, None]).T


# ----------------------------------------------------------------------------------------------
# public API


def make_synth_bfm(resolution: int = DEFAULT_RESOLUTION, seed: int = 0) -> dict[str, np.ndarray]:
    """The raw fields of a SynthBFM model, exactly as `BFM_model_front.mat` stores them.

    Index fields are 1-based; shape fields are in model units (1 unit = 100 mm), premultiplied by
    the standard deviations; colours in 0..255. Deterministic for a (resolution, seed) pair: the
    mean shape and mean colour depend only on the resolution, the bases on the seed too.
    """
    if resolution < MIN_RESOLUTION:
        raise InputError(f"SynthBFM resolution {resolution} is below the minimum {MIN_RESOLUTION}")
    rng = np.random.default_rng(seed)
    uv, faces = _grid(resolution)
    mean = _mean_shape(uv)
    region = _regions(mean)
    front = _front_vertices(uv, region)
    keypoints = _keypoints(mean)
    mean_tex = _mean_texture(mean)
    id_base = _identity_basis(uv, mean, rng)
    exp_base = _expression_basis(mean, front, rng)
    tex_base = _texture_basis(uv, mean_tex, rng)

    local = np.full(len(mean), -1)
    local[front] = np.arange(len(front))
    front_faces = local[faces]
    front_faces = front_faces[(front_faces >= 0).all(axis=1)]
    skin = ~np.isin(region, [cv.REGION_CODES["eyes"], cv.REGION_CODES["hair_band"]])
    info = (f"generator={GENERATOR_NAME} version={GENERATOR_VERSION} seed={seed} "
            f"resolution={resolution}")

    def index(a):  # 1-based, as the file stores every index field
        return (np.asarray(a) + 1).astype(np.int32)

    return {
        "meanshape": mean.reshape(1, -1).astype(np.float32),
        "idBase": id_base.astype(np.float32),
        "exBase": exp_base.astype(np.float32),
        "meantex": mean_tex.reshape(1, -1).astype(np.float32),
        "texBase": tex_base.astype(np.float32),
        "tri": index(faces),
        "point_buf": index(point_buf_of(faces, len(mean))),
        "keypoints": index(keypoints).reshape(1, -1),
        "frontmask2_idx": index(front).reshape(-1, 1),
        "tri_mask2": index(front_faces),
        "skinmask": skin.astype(np.int32).reshape(1, -1),
        "uv": uv.astype(np.float32),
        "region": region.astype(np.int32).reshape(1, -1),
        "region_names": ",".join(cv.REGION_NAMES),
        "synth_info": info,
    }


def write_synth_bfm(path: str | Path, resolution: int = DEFAULT_RESOLUTION, seed: int = 0,
                    *, compress: bool = False) -> Path:
    """Generate SynthBFM and write it to ``path`` (a `.mat` file) atomically; returns the path.

    Uncompressed by default: at the default resolution the file is ~90 MB instead of ~50 MB, but
    it writes in a fraction of a second and loads about five times faster than a compressed one.
    """
    path = Path(path)
    fields = make_synth_bfm(resolution, seed)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        scipy.io.savemat(fh, fields, do_compression=compress)
    return path
