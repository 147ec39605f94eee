"""The public Deep3DFaceRecon / HRN preprocessing of a photo with 68 landmarks: the 224 network crop
and HRN's 512 high-resolution crop, exactly as their `util/preprocess.py` `align_img` makes them.

Steps (Deep3DFaceRecon `load_lm3d`, `extract_5p`, `POS`, `resize_n_crop_img`; HRN `read_data`):

1. Landmarks (x, row) become y-up: y = H - 1 - row.
2. 5 points from 68 (`five_points`): the eye centres as the means of the eye corners (36, 39) and
   (42, 45), the nose tip 30, the mouth corners 48 and 54 (0-based iBUG), in the order left eye,
   right eye, nose, left mouth corner, right mouth corner. The same rule takes the 5 points of the
   standard face's 68 3D landmarks (`similarity_Lm3D_all.mat`, field ``lm``).
3. `fit_scale_translation` (`POS`): a least-squares affine camera x = R1 X + tx, y = R2 X + ty from
   the 3D 5 points to the image's; the scale is (|R1| + |R2|) / 2 (image pixels per model unit), the
   translation (tx, ty) (where the standard face's origin lands, y up). No rotation is used.
4. s = rescale_factor / scale: the whole image is resized to (int(W s), int(H s)) with PIL's
   bicubic filter, and the S x S crop box starts at left = int(w / 2 - S / 2 + (tx - W / 2) s),
   up = int(h / 2 - S / 2 + (H / 2 - ty) s) (`int` truncates toward zero, as numpy's astype; PIL
   pads black outside the resized image). 224 uses rescale factor 102; the 512 crop 102 * 512 / 224.
5. Landmarks move by the public formula ((x - tx + W / 2) s - (w / 2 - S / 2), likewise y), which
   ignores the truncations of step 4 and PIL's pixel-centre convention, so it differs from the
   image's own geometry by up to 1 + 0.5 |s - 1| crop pixels (the public models were trained with
   it); they are returned as crop pixels (x, row), row = S - 1 - y.

`PublicCrop.crop_to_image` maps crop pixels back to the photo through the image's exact geometry
(the resize and the integer crop box), for overlays on the original photo.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
import torch
from PIL import Image

from facehd import conventions as cv
from facehd.errors import FileFormatError, InputError
from facehd.morphable import MorphableModel

CROP_SIZE = 224  # Deep3DFaceRecon's network input
HD_CROP_SIZE = 512  # HRN `read_data(image_res=512)`: the texture crop
RESCALE_FACTOR = 102.0  # Deep3DFaceRecon `align_img`: crop pixels per model unit at 224
STANDARD_LANDMARKS_FILE = "similarity_Lm3D_all.mat"  # Deep3DFaceRecon's BFM folder
STANDARD_LANDMARKS_FIELD = "lm"  # (68, 3) in model units
# Deep3DFaceRecon `extract_5p` / `load_lm3d`: 1-based 31, (37, 40), (43, 46), 49, 55, reordered
NOSE_TIP = 30
EYE_CORNERS = ((36, 39), (42, 45))
MOUTH_CORNERS = (48, 54)
# A face so small in so large a photo that the whole resized image would exceed this many pixels
# is refused (the public code resizes the whole image, and so does this module).
MAX_RESIZED_PIXELS = 150_000_000


def five_points(landmarks68: np.ndarray) -> np.ndarray:
    """(68, D) -> (5, D) float64: left eye, right eye (each the mean of its two corners), nose tip,
    left and right mouth corners (Deep3DFaceRecon `extract_5p`)."""
    points = np.asarray(landmarks68, dtype=np.float64)
    if points.ndim != 2 or points.shape[0] != cv.N_LANDMARKS:
        raise InputError(f"landmarks have shape {points.shape}, expected ({cv.N_LANDMARKS}, D)")
    eyes = [points[list(pair)].mean(axis=0) for pair in EYE_CORNERS]
    return np.stack([*eyes, points[NOSE_TIP], points[MOUTH_CORNERS[0]], points[MOUTH_CORNERS[1]]])


def read_standard_landmarks(path: str | Path) -> np.ndarray:
    """(68, 3) float64 3D landmarks of the standard face from Deep3DFaceRecon's
    `similarity_Lm3D_all.mat` (field ``lm``)."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(path, f"no such file (expected Deep3DFaceRecon's {STANDARD_LANDMARKS_FILE})")
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises several unrelated types for foreign files
        raise FileFormatError(path, f"not a readable .mat file ({exc})") from None
    if STANDARD_LANDMARKS_FIELD not in mat:
        raise FileFormatError(path, f"no field {STANDARD_LANDMARKS_FIELD!r} (expected {STANDARD_LANDMARKS_FILE})")
    lm = np.asarray(mat[STANDARD_LANDMARKS_FIELD], dtype=np.float64)
    if lm.shape != (cv.N_LANDMARKS, 3) or not np.isfinite(lm).all():
        raise FileFormatError(path, f"field {STANDARD_LANDMARKS_FIELD!r} has shape {lm.shape}, expected finite "
                                    f"({cv.N_LANDMARKS}, 3)")
    return lm


def standard_landmarks_from_model(morphable: MorphableModel) -> np.ndarray:
    """(68, 3) float64 stand-in for `similarity_Lm3D_all.mat`: the morphable model's mean-shape
    keypoints in its own frame (the frame whose origin the project's camera centres)."""
    return morphable.mean_shape[morphable.keypoints].detach().cpu().double().numpy()


def standard_landmarks(morphable: MorphableModel, path: str | Path | None = None) -> np.ndarray:
    """(68, 3) standard landmarks: ``path`` if given; else `similarity_Lm3D_all.mat` beside the
    morphable model's file when there is one (Deep3DFaceRecon's BFM folder holds both); else the
    stand-in of `standard_landmarks_from_model`."""
    if path is not None:
        return read_standard_landmarks(path)
    if morphable.source is not None:
        beside = Path(morphable.source).with_name(STANDARD_LANDMARKS_FILE)
        if beside.is_file():
            return read_standard_landmarks(beside)
    return standard_landmarks_from_model(morphable)


def fit_scale_translation(points5: np.ndarray, standard5: np.ndarray) -> tuple[float, np.ndarray]:
    """(5, 2) image points (y up), (5, 3) standard 3D points -> (scale, (2,) translation):
    Deep3DFaceRecon's `POS`, the least-squares affine camera solved as two 4-unknown problems."""
    points5 = np.asarray(points5, dtype=np.float64)
    standard5 = np.asarray(standard5, dtype=np.float64)
    if points5.shape != (5, 2) or standard5.shape != (5, 3):
        raise InputError(f"5 points have shapes {points5.shape} and {standard5.shape}, expected (5, 2) and (5, 3)")
    design = np.concatenate([standard5, np.ones((5, 1))], axis=1)  # (5, 4)
    solution, *_ = np.linalg.lstsq(design, points5, rcond=None)  # (4, 2): [R1; tx] and [R2; ty]
    scale = float((np.linalg.norm(solution[:3, 0]) + np.linalg.norm(solution[:3, 1])) / 2)
    if not np.isfinite(scale) or scale <= 1e-9:
        raise InputError("degenerate 5-point landmarks: their spread is zero")
    return scale, solution[3].copy()


@dataclass(frozen=True)
class PublicCrop:
    """One crop of `align_image`. Pixels are (x, row), row 0 at the top."""

    image: torch.Tensor  # (3, S, S) float32 RGB in [0, 1]
    landmarks: torch.Tensor  # (68, 2) float32 crop pixels (x, row), by the public formula
    size: int  # S
    original_size: tuple[int, int]  # (W, H) of the photo
    scale: float  # s: resized pixels per photo pixel (rescale_factor / POS scale)
    translation: tuple[float, float]  # POS (tx, ty), photo pixels, y up
    resized_size: tuple[int, int]  # (w, h) = (int(W s), int(H s))
    box: tuple[int, int]  # (left, up) of the crop in the resized image

    def trans_params(self) -> np.ndarray:
        """(5,) Deep3DFaceRecon's `trans_params`: [W, H, s, tx, ty]."""
        return np.array([*self.original_size, self.scale, *self.translation], dtype=np.float64)

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """crop pixel = k * photo pixel + d, per axis, through the resize and the crop box."""
        k = np.array(self.resized_size, dtype=np.float64) / np.array(self.original_size, dtype=np.float64)
        d = 0.5 * k - 0.5 - np.array(self.box, dtype=np.float64)  # PIL samples pixel centres
        return k, d

    def image_to_crop(self, points):
        """(..., 2) photo pixels (x, row) -> crop pixels, through the image's exact geometry."""
        k, d = self.affine()
        if torch.is_tensor(points):
            return points * points.new_tensor(k) + points.new_tensor(d)
        return np.asarray(points, dtype=np.float64) * k + d

    def crop_to_image(self, points):
        """(..., 2) crop pixels (x, row) -> photo pixels: the inverse of `image_to_crop`."""
        k, d = self.affine()
        if torch.is_tensor(points):
            return (points - points.new_tensor(d)) / points.new_tensor(k)
        return (np.asarray(points, dtype=np.float64) - d) / k


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise InputError(f"image must be a PIL image or (H, W, 3) uint8, got {array.dtype} {array.shape}")
    return Image.fromarray(array)


def align_image(image, landmarks68: np.ndarray, standard68: np.ndarray, size: int = CROP_SIZE,
                rescale_factor: float = RESCALE_FACTOR) -> PublicCrop:
    """Deep3DFaceRecon's `align_img`: a photo (PIL or (H, W, 3) uint8 RGB), its (68, 2) landmarks
    (x, row) and the (68, 3) standard landmarks -> the ``size`` crop (module docstring, steps 1-5)."""
    pil = _as_pil(image)
    width, height = pil.size
    landmarks = np.asarray(landmarks68, dtype=np.float64)
    if landmarks.shape != (cv.N_LANDMARKS, 2) or not np.isfinite(landmarks).all():
        raise InputError(f"landmarks have shape {landmarks.shape}, expected finite ({cv.N_LANDMARKS}, 2)")
    y_up = np.stack([landmarks[:, 0], height - 1 - landmarks[:, 1]], axis=1)
    pos_scale, t = fit_scale_translation(five_points(y_up), five_points(standard68))
    s = rescale_factor / pos_scale
    w, h = int(width * s), int(height * s)
    if w < 1 or h < 1 or w * h > MAX_RESIZED_PIXELS:
        raise InputError(f"the face's scale puts the {width} x {height} image at {w} x {h} pixels before "
                         f"cropping: give a photo where the face spans a sensible share of the image")
    left = int(w / 2 - size / 2 + (t[0] - width / 2) * s)
    up = int(h / 2 - size / 2 + (height / 2 - t[1]) * s)
    crop = pil.resize((w, h), resample=Image.BICUBIC).crop((left, up, left + size, up + size))
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    moved = (y_up - t + np.array([width / 2, height / 2])) * s - np.array([w / 2 - size / 2, h / 2 - size / 2])
    rows = np.stack([moved[:, 0], size - 1 - moved[:, 1]], axis=1)
    return PublicCrop(image=pixels, landmarks=torch.as_tensor(rows, dtype=torch.float32), size=int(size),
                      original_size=(width, height), scale=float(s), translation=(float(t[0]), float(t[1])),
                      resized_size=(w, h), box=(left, up))


def preprocess(image, landmarks68: np.ndarray, standard68: np.ndarray, size: int = CROP_SIZE,
               hd_size: int = HD_CROP_SIZE) -> tuple[PublicCrop, PublicCrop]:
    """HRN's `read_data`: the network crop (``size``, rescale 102 * size / 224) and the
    high-resolution crop (``hd_size``, rescale 102 * hd_size / 224) of one photo."""
    crop = align_image(image, landmarks68, standard68, size, RESCALE_FACTOR * size / CROP_SIZE)
    hd = align_image(image, landmarks68, standard68, hd_size, RESCALE_FACTOR * hd_size / CROP_SIZE)
    return crop, hd


def identity_crop(image: torch.Tensor) -> PublicCrop:
    """The `PublicCrop` of an image that already is the network crop ((3, S, S) in [0, 1])."""
    size = int(image.shape[-1])
    return PublicCrop(image=image, landmarks=torch.zeros(cv.N_LANDMARKS, 2), size=size, original_size=(size, size),
                      scale=1.0, translation=(size / 2, size / 2), resized_size=(size, size), box=(0, 0))


# ----------------------------------------------------------------------------------------------
# back to the photo

OVERLAY_ALPHA = 0.6  # opacity of the render over the photo


def paste_back(photo: np.ndarray, crop: PublicCrop, render: torch.Tensor, coverage: torch.Tensor,
               alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blend a render of ``crop`` into the photo it came from: (H, W, 3) uint8 photo, (3, S, S)
    render in [0, 1] and its (1, S, S) coverage -> (H, W, 3) uint8, the render sampled bilinearly
    through the crop's exact geometry (`PublicCrop.image_to_crop`) and blended with ``alpha`` x
    coverage; pixels outside the crop keep the photo."""
    photo = np.asarray(photo)
    height, width = photo.shape[:2]
    size = crop.size
    corners = crop.crop_to_image(np.array([[-0.5, -0.5], [size - 0.5, size - 0.5]]))
    x0, y0 = (max(0, int(np.floor(v))) for v in corners[0])
    x1, y1 = min(width, int(np.ceil(corners[1, 0])) + 1), min(height, int(np.ceil(corners[1, 1])) + 1)
    out = photo.astype(np.float32) / 255.0
    if x0 < x1 and y0 < y1:
        xs, ys = np.meshgrid(np.arange(x0, x1, dtype=np.float64), np.arange(y0, y1, dtype=np.float64))
        where = crop.image_to_crop(np.stack([xs, ys], axis=-1))
        grid = torch.from_numpy((2.0 * where + 1.0) / size - 1.0).float()[None]
        layers = torch.cat([render.detach().float().cpu(), coverage.detach().float().cpu()], dim=0)[None]
        sampled = torch.nn.functional.grid_sample(layers, grid, mode="bilinear", padding_mode="zeros",
                                                  align_corners=False)[0].permute(1, 2, 0).numpy()
        weight = alpha * np.clip(sampled[..., 3:], 0.0, 1.0)
        region = out[y0:y1, x0:x1]
        out[y0:y1, x0:x1] = region * (1.0 - weight) + np.clip(sampled[..., :3], 0.0, 1.0) * weight
    return (np.clip(out, 0.0, 1.0) * 255.0).round().astype(np.uint8)
