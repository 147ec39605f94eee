"""Named constants of the BFM09 / Deep3DFaceRecon / HRN conventions (DESIGN.md section 3)."""

from __future__ import annotations

import math

# --- coefficient vector (257 values), Deep3DFaceRecon `split_coeff` ---------------------------
N_ID = 80
N_EXP = 64
N_TEX = 80
N_ANGLE = 3
N_GAMMA = 27  # 9 SH bands x 3 colour channels
N_TRANS = 3
N_COEFFS = N_ID + N_EXP + N_TEX + N_ANGLE + N_GAMMA + N_TRANS  # 257

COEFF_SLICES = {
    "id": slice(0, 80),
    "exp": slice(80, 144),
    "tex": slice(144, 224),
    "angle": slice(224, 227),
    "gamma": slice(227, 254),
    "trans": slice(254, 257),
}

# --- units ------------------------------------------------------------------------------------
# BFM shape bases are premultiplied by their standard deviations and divided by 1e5 (micrometres
# to decimetres), so one model unit is about 100 mm.
MM_PER_MODEL_UNIT = 100.0
BFM_SCALE_DIVISOR = 1e5

# --- camera (Deep3DFaceRecon `ParametricFaceModel`) -------------------------------------------
FOCAL = 1015.0
PRINCIPAL_POINT = 112.0
IMAGE_SIZE = 224
CAMERA_DISTANCE = 10.0  # camera on +z looking at the origin: z_cam = 10 - z
FOV_DEG = 2.0 * math.degrees(math.atan(PRINCIPAL_POINT / FOCAL))  # 12.594 deg
Z_NEAR = 5.0
Z_FAR = 15.0

# --- lighting: second-order spherical harmonics ------------------------------------------------
SH_A = (math.pi, 2.0 * math.pi / math.sqrt(3.0), 2.0 * math.pi / math.sqrt(8.0))
SH_C = (
    1.0 / math.sqrt(4.0 * math.pi),
    math.sqrt(3.0) / math.sqrt(4.0 * math.pi),
    3.0 * math.sqrt(5.0) / math.sqrt(12.0 * math.pi),
)
SH_INIT_DC = 0.8  # added to the DC term of each colour channel

# --- landmarks --------------------------------------------------------------------------------
N_LANDMARKS = 68
# iBUG indices of the 7-point set used for scan alignment (eye corners, subnasale, mouth
# corners); the same set as NoW and REALY.
LANDMARKS7_IBUG = (36, 39, 42, 45, 33, 48, 54)
NOSE_TIP_IBUG = 30

# --- hierarchical representation (HRN) --------------------------------------------------------
DEFORMATION_MAP_SIZE = 64
DISPLACEMENT_MAP_SIZE = 256
DETAIL_SCALE_INIT = 0.01  # alpha and beta initial values

# --- region labels of the morphable model (SynthBFM writes them as the optional `region` field)
REGION_NAMES = ("skin", "forehead", "eyes", "nose", "mouth", "cheek", "hair_band")
REGION_CODES = {name: code for code, name in enumerate(REGION_NAMES)}
