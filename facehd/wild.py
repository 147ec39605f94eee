"""The in-the-wild training-image folder (image, 68 landmarks, face mask per name), its 5-point
alignment to the 224 x 224 crop of Deep3DFaceRecon and HRN, and a torch Dataset over it.

Folder format (pixel coordinates are OpenCV's: x right, y down, origin at the centre of the
top-left pixel, so pixel (row r, column c) is the point (c, r))::

    <root>/images/<name>.jpg|.jpeg|.png   RGB (grey and RGBA are converted; EXIF orientation ignored)
    <root>/landmarks/<name>.txt           68 lines "x y", iBUG order, pixels
    <root>/masks/<name>.png               face / skin mask, 8-bit, same size as the image, nonzero = face
    <root>/list.txt                       optional: names, one per line (default: every image, sorted)

Alignment (`align_to_crop`), with the 5 points of `landmarks68_to_5` (eye centres, nose tip,
mouth corners) and a template T (5, 2) in crop pixels (`template5_from_model`):

1. POS-style least squares in the image: lm5_i ~ A (T_i - mean T) + b, A 2 x 2, b 2-vector.
2. a = largest singular value of A (image pixels per template pixel). Deep3DFaceRecon's `POS`
   fits a 3D template and averages the two row norms; with a 2D template the largest singular
   value plays that role: the 2 x 2 block of any scaled 3D rotation has it equal to the scale.
3. The map onto the template, `estimate_scale_translation`: T ~ s p + t, s = 1 / a,
   t = mean T - b / a.
4. Deep3DFaceRecon rescales so that one model unit spans `rescale_factor` = 102 crop pixels (at
   224; `align_img`), while the template was projected at FOCAL / CAMERA_DISTANCE = 101.5 pixels
   per unit: with rho = rescale_factor / 101.5 and o the crop pixel of the model origin
   ((112, 111) at 224), crop = o + rho (s p + t - o) = k p + d, k = rho s, d = o + rho (t - o).
5. The crop pixel q samples the image at (q - d) / k (bicubic, antialiased when shrinking, black
   outside the image); the mask is warped bilinearly and thresholded at one half; landmarks map
   with the same k, d. Unlike `align_img` there is no rounding of the resized size or the crop box.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from facehd import conventions as cv
from facehd.errors import FileFormatError, InputError
from facehd.fsutil import atomic_open, atomic_path
from facehd.morphable import MorphableModel, project, to_camera, y_up_to_rows

IMAGE_DIR = "images"
LANDMARK_DIR = "landmarks"
MASK_DIR = "masks"
LIST_FILE = "list.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MASK_SUFFIX = ".png"
LANDMARK_SUFFIX = ".txt"
LANDMARK_DECIMALS = 4  # 1e-4 pixel: far below any annotation's precision

CROP_SIZE = cv.IMAGE_SIZE  # 224, the network input of Deep3DFaceRecon and HRN
RESCALE_FACTOR = 102.0  # Deep3DFaceRecon align_img: crop pixels per model unit at 224
TEMPLATE_PIXELS_PER_UNIT = cv.FOCAL / cv.CAMERA_DISTANCE  # 101.5: the camera at z = 0, 224 pixels

# iBUG indices of the 5 points (image-left eye first, as Deep3DFaceRecon's `extract_5p` orders them)
EYE_RINGS = (tuple(range(36, 42)), tuple(range(42, 48)))
EYE_CORNERS = ((36, 39), (42, 45))  # Deep3DFaceRecon `extract_5p` averages the corners only
MOUTH_CORNERS = (48, 54)
MASK_THRESHOLD = 128  # of the bilinearly warped 0 / 255 mask
# Source pixels kept around the crop window for the resampling filter (bicubic reaches 2 pixels;
# further when shrinking, where PIL widens the filter by the shrink factor).
FILTER_SUPPORT = 2


# ----------------------------------------------------------------------------------------------
# folder format


@dataclass
class WildSample:
    """One image of the folder, as stored (original pixels, not aligned)."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    landmarks: np.ndarray  # (68, 2) float64 pixels (x, row), OpenCV convention
    mask: np.ndarray  # (H, W) bool, True on the face


def image_path(root: str | Path, name: str) -> Path:
    """The image file of ``name``: exactly one of images/<name>.jpg, .jpeg or .png."""
    folder = Path(root) / IMAGE_DIR
    found: list[Path] = []
    for suffix in _suffix_variants():
        path = folder / f"{name}{suffix}"
        # a case-insensitive file system finds name.jpg and name.JPG as one file
        if path.is_file() and not any(path.samefile(other) for other in found):
            found.append(path)
    if not found:
        raise FileFormatError(folder / f"{name}.png", f"missing image of {name!r} "
                                                       f"(looked for {', '.join(IMAGE_SUFFIXES)})")
    if len(found) > 1:
        raise FileFormatError(found[0], f"several images named {name!r}: {', '.join(p.name for p in found)}")
    return found[0]


def landmark_path(root: str | Path, name: str) -> Path:
    return Path(root) / LANDMARK_DIR / f"{name}{LANDMARK_SUFFIX}"


def mask_path(root: str | Path, name: str) -> Path:
    return Path(root) / MASK_DIR / f"{name}{MASK_SUFFIX}"


def _suffix_variants() -> list[str]:
    # upper-case suffixes are common on camera files; is_file() is case-sensitive on Linux
    return list(dict.fromkeys([s for suffix in IMAGE_SUFFIXES for s in (suffix, suffix.upper())]))


def list_names(root: str | Path) -> list[str]:
    """Names in the folder: the lines of list.txt (blank lines and '#' comments skipped, an
    image suffix dropped) if it exists, else the stems of every image, sorted."""
    root = Path(root)
    if not (root / IMAGE_DIR).is_dir():
        raise FileFormatError(root, f"not an in-the-wild image folder: no {IMAGE_DIR}/ directory")
    listing = root / LIST_FILE
    if listing.is_file():
        try:
            lines = listing.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise FileFormatError(listing, f"not a readable text file: {exc}") from None
        names = [_strip_suffix(line.strip()) for line in lines if line.strip() and not line.startswith("#")]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise FileFormatError(listing, f"names listed more than once: {', '.join(duplicates[:5])}")
        return names
    stems = [p.stem for p in (root / IMAGE_DIR).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(set(stems))


def _strip_suffix(name: str) -> str:
    path = Path(name)
    return path.stem if path.suffix.lower() in IMAGE_SUFFIXES else name


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of a JPEG or PNG file, as stored (EXIF orientation ignored)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise FileFormatError(path, "missing image") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise FileFormatError(path, f"cannot decode image: {exc}") from None


def read_landmarks(path: str | Path) -> np.ndarray:
    """(68, 2) float64 pixels (x, row) from 68 lines of "x y"."""
    path = Path(path)
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise FileFormatError(path, "missing landmark file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FileFormatError(path, f"not a readable text file: {exc}") from None
    if len(lines) != cv.N_LANDMARKS:
        raise FileFormatError(path, f"{len(lines)} landmark lines, expected {cv.N_LANDMARKS} lines of \"x y\"")
    points = np.empty((cv.N_LANDMARKS, 2))
    for i, line in enumerate(lines):
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError
            points[i] = [float(f) for f in fields]
        except ValueError:
            raise FileFormatError(path, f"landmark line {i + 1} is {line.strip()!r}, expected two numbers "
                                        "\"x y\"") from None
    if not np.isfinite(points).all():
        raise FileFormatError(path, "landmarks hold NaN or infinite values")
    return points


def read_mask(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) bool face mask (nonzero pixels; any channel for RGB), checked against the image's
    (H, W) ``shape`` when given."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            if image.mode in ("RGB", "RGBA"):
                mask = np.asarray(image.convert("RGB")).any(axis=-1)
            elif image.mode in ("L", "1", "P", "I", "I;16"):
                mask = np.asarray(image) != 0
            else:
                raise FileFormatError(path, f"mask has mode {image.mode}, expected 8-bit grey")
    except FileNotFoundError:
        raise FileFormatError(path, "missing mask") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise FileFormatError(path, f"cannot decode mask: {exc}") from None
    if shape is not None and mask.shape != tuple(shape):
        raise FileFormatError(path, f"mask is {mask.shape[1]} x {mask.shape[0]} pixels but its image is "
                                    f"{shape[1]} x {shape[0]}")
    return mask


def read_sample(root: str | Path, name: str) -> WildSample:
    """Image, landmarks and mask of ``name``; errors name the offending file."""
    image = read_image(image_path(root, name))
    landmarks = read_landmarks(landmark_path(root, name))
    mask = read_mask(mask_path(root, name), image.shape[:2])
    return WildSample(name=name, image=image, landmarks=landmarks, mask=mask)


def write_landmarks(path: str | Path, landmarks: np.ndarray) -> Path:
    """Write (68, 2) pixels (x, row) as 68 lines "x y" (atomically)."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (cv.N_LANDMARKS, 2) or not np.isfinite(landmarks).all():
        raise InputError(f"landmarks must be finite with shape ({cv.N_LANDMARKS}, 2), got {landmarks.shape}")
    with atomic_open(path) as fh:
        fh.writelines(f"{x:.{LANDMARK_DECIMALS}f} {y:.{LANDMARK_DECIMALS}f}\n" for x, y in landmarks)
    return Path(path)


def write_sample(root: str | Path, sample: WildSample, *, image_format: str = "png",
                 jpeg_quality: int = 95) -> Path:
    """Write a sample's image (``png`` or ``jpg``), landmarks and mask under ``root``, each
    atomically, the image last (an image without its landmarks is never listed); returns the
    image path."""
    root = Path(root)
    height, width = sample.image.shape[:2]
    if sample.image.dtype != np.uint8 or sample.image.shape != (height, width, 3):
        raise InputError(f"image must be (H, W, 3) uint8, got {sample.image.shape} {sample.image.dtype}")
    if sample.mask.shape != (height, width):
        raise InputError(f"mask has shape {sample.mask.shape}, expected {(height, width)}")
    if image_format not in ("png", "jpg"):
        raise InputError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    write_landmarks(landmark_path(root, sample.name), sample.landmarks)
    with atomic_path(mask_path(root, sample.name)) as tmp:
        Image.fromarray((np.asarray(sample.mask) != 0).astype(np.uint8) * 255).save(tmp, format="PNG", compress_level=1)
    path = root / IMAGE_DIR / f"{sample.name}.{image_format}"
    with atomic_path(path) as tmp:
        if image_format == "png":
            Image.fromarray(sample.image).save(tmp, format="PNG", compress_level=1)
        else:
            Image.fromarray(sample.image).save(tmp, format="JPEG", quality=jpeg_quality)
    return path


def write_list(root: str | Path, names: Sequence[str]) -> Path:
    """Write list.txt (atomically): the names, one per line."""
    path = Path(root) / LIST_FILE
    with atomic_open(path) as fh:
        fh.writelines(f"{name}\n" for name in names)
    return path


# ----------------------------------------------------------------------------------------------
# 5-point alignment


def landmarks68_to_5(landmarks68, eyes: str = "ring"):
    """(..., 68, D) -> (..., 5, D): image-left eye centre, image-right eye centre, nose tip (30),
    mouth corners (48, 54). ``eyes="ring"`` averages the six points of each eye (36-41, 42-47);
    ``"corners"`` the two corners (36, 39 and 42, 45), as Deep3DFaceRecon's `extract_5p` does.

    Takes and returns a numpy array (float64) or a torch tensor (differentiable, dtype kept)."""
    is_tensor = torch.is_tensor(landmarks68)
    points = landmarks68 if is_tensor else np.asarray(landmarks68, dtype=np.float64)
    if points.ndim < 2 or points.shape[-2] != cv.N_LANDMARKS:
        raise InputError(f"landmarks have shape {tuple(points.shape)}, expected (..., {cv.N_LANDMARKS}, D)")
    if eyes not in ("ring", "corners"):
        raise InputError(f"eyes must be 'ring' or 'corners', got {eyes!r}")
    groups = EYE_RINGS if eyes == "ring" else EYE_CORNERS
    eye_centres = [points[..., list(group), :].mean(-2) for group in groups]
    singles = [points[..., i, :] for i in (cv.NOSE_TIP_IBUG, *MOUTH_CORNERS)]
    return (torch.stack if is_tensor else np.stack)([*eye_centres, *singles], -2)


def template5_from_model(model: MorphableModel, size: int = CROP_SIZE, eyes: str = "ring") -> np.ndarray:
    """(5, 2) crop pixels (x, row) of the standard 5-point template: the 5 points of the model's
    mean-shape keypoints (in 3D, no pose, no translation), projected by the project's camera with
    its focal length scaled to ``size`` (Deep3DFaceRecon's `lm3D`, projected)."""
    points = model.mean_shape[model.keypoints].detach().cpu().double().numpy()  # (68, 3) model units
    points5 = torch.as_tensor(landmarks68_to_5(points, eyes))[None]
    scale = size / cv.IMAGE_SIZE
    pixels = project(to_camera(points5), cv.FOCAL * scale, cv.PRINCIPAL_POINT * scale)
    return y_up_to_rows(pixels, size)[0].numpy()


def _origin_pixel(size: int) -> np.ndarray:
    """Crop pixel (x, row) of the model origin seen by the project's camera at ``size`` pixels."""
    centre = cv.PRINCIPAL_POINT * size / cv.IMAGE_SIZE
    return np.array([centre, size - 1 - centre])


def _check_points(points, n: int, what: str) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.shape != (n, 2):
        raise InputError(f"{what} have shape {points.shape}, expected ({n}, 2)")
    if not np.isfinite(points).all():
        raise InputError(f"{what} hold NaN or infinite values")
    return points


def estimate_scale_translation(lm5: np.ndarray, template5: np.ndarray) -> tuple[float, float, float]:
    """(5, 2) image points, (5, 2) template points -> (s, tx, ty) mapping the points onto the
    template: template ~ s * lm5 + (tx, ty).

    Fitted like Deep3DFaceRecon's `POS`, in the image: lm5 ~ A (template - mean) + b by least
    squares, then s = 1 / (largest singular value of A), t = mean template - s b (module
    docstring, steps 1-3). Exact when the points are a scaled and shifted template.
    """
    lm5 = _check_points(lm5, 5, "5-point landmarks")
    template5 = _check_points(template5, 5, "template points")
    centre = template5.mean(axis=0)
    design = np.concatenate([template5 - centre, np.ones((5, 1))], axis=1)  # (5, 3)
    solution, *_ = np.linalg.lstsq(design, lm5, rcond=None)  # (3, 2): A^T stacked on b
    linear, offset = solution[:2].T, solution[2]
    image_per_template = float(np.linalg.svd(linear, compute_uv=False)[0])
    if not np.isfinite(image_per_template) or image_per_template <= 1e-9:
        raise InputError("degenerate 5-point landmarks: their spread is zero")
    s = 1.0 / image_per_template
    tx, ty = centre - s * offset
    return s, float(tx), float(ty)


@dataclass(frozen=True)
class CropTransform:
    """Image pixels -> crop pixels (both OpenCV (x, row)): crop = scale * p + (tx, ty)."""

    scale: float  # crop pixels per image pixel
    tx: float
    ty: float
    size: int  # crop side in pixels

    def apply(self, points):
        """(..., 2) image pixels (array or tensor) -> crop pixels."""
        return points * self.scale + _like(points, (self.tx, self.ty))

    def invert(self, points):
        """(..., 2) crop pixels (array or tensor) -> image pixels."""
        return (points - _like(points, (self.tx, self.ty))) / self.scale

    def as_array(self) -> np.ndarray:
        """(3,) float64 [scale, tx, ty]."""
        return np.array([self.scale, self.tx, self.ty])


def _like(points, values):
    if torch.is_tensor(points):
        return points.new_tensor(values)
    return np.asarray(values, dtype=np.float64)


def crop_transform(landmarks68: np.ndarray, template5: np.ndarray, size: int = CROP_SIZE,
                   rescale_factor: float = RESCALE_FACTOR) -> CropTransform:
    """The image -> crop map of `align_to_crop` (module docstring, steps 1-4). ``template5`` is in
    crop pixels at ``size``; ``rescale_factor`` is crop pixels per model unit at 224 pixels, scaled
    with ``size`` (102 as in Deep3DFaceRecon; `TEMPLATE_PIXELS_PER_UNIT` puts the 5 points exactly
    on the template)."""
    landmarks68 = _check_points(landmarks68, cv.N_LANDMARKS, "landmarks")
    s, tx, ty = estimate_scale_translation(landmarks68_to_5(landmarks68), template5)
    rho = rescale_factor / TEMPLATE_PIXELS_PER_UNIT
    origin = _origin_pixel(size)
    shift = origin + rho * (np.array([tx, ty]) - origin)
    return CropTransform(scale=rho * s, tx=float(shift[0]), ty=float(shift[1]), size=int(size))


def _warp(image: Image.Image, transform: CropTransform, resample: int) -> Image.Image:
    """Resample a PIL image into the crop: crop pixel q samples image point (q - t) / scale.

    PIL's `resize(box=...)` works in pixel-edge coordinates (pixel i spans [i, i + 1)), so the
    crop's box in the image starts at the edge coordinate (0 - t) / scale + 0.5 - 0.5 / scale. The
    window around it is cut first because the box may leave the image, where `crop` pads black.
    """
    k, size = transform.scale, transform.size
    left_edge = 0.5 - (transform.tx + 0.5) / k
    top_edge = 0.5 - (transform.ty + 0.5) / k
    span = size / k
    margin = math.ceil(FILTER_SUPPORT * max(1.0, 1.0 / k)) + 1
    left, top = math.floor(left_edge) - margin, math.floor(top_edge) - margin
    right, bottom = math.ceil(left_edge + span) + margin, math.ceil(top_edge + span) + margin
    window = image.crop((left, top, right, bottom))
    box = (left_edge - left, top_edge - top, left_edge - left + span, top_edge - top + span)
    return window.resize((size, size), resample=resample, box=box)


def _to_pil_channels(image) -> tuple[list[Image.Image], float]:
    """An RGB image (PIL, (H, W, 3) uint8 or float in [0, 1]) as PIL images to warp, and the
    divisor that brings their values to [0, 1]."""
    if isinstance(image, Image.Image):
        return [image.convert("RGB")], 255.0
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise InputError(f"image must be (H, W, 3), got shape {array.shape}")
    if array.dtype == np.uint8:
        return [Image.fromarray(array)], 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"image must be uint8 or float in [0, 1], got {array.dtype}")
    return [Image.fromarray(np.ascontiguousarray(array[..., c], dtype=np.float32), mode="F") for c in range(3)], 1.0


class AlignedCrop(NamedTuple):
    """What `align_to_crop` returns; unpacks as (image, landmarks, mask, transform)."""

    image: torch.Tensor  # (3, S, S) float32 in [0, 1]
    landmarks: torch.Tensor  # (68, 2) float32 crop pixels (x, row), y down
    mask: torch.Tensor | None  # (1, S, S) float32, 1 on the face
    transform: CropTransform


def warp_image(image, transform: CropTransform) -> torch.Tensor:
    """An RGB image (PIL, (H, W, 3) uint8 or float in [0, 1]) -> (3, S, S) float32 crop in [0, 1]."""
    channels, divisor = _to_pil_channels(image)
    warped = [np.asarray(_warp(c, transform, Image.BICUBIC), dtype=np.float32) for c in channels]
    pixels = warped[0] if len(warped) == 1 else np.stack(warped, axis=-1)
    return torch.from_numpy(np.clip(pixels / divisor, 0.0, 1.0)).permute(2, 0, 1).contiguous()


def warp_mask(mask, transform: CropTransform) -> torch.Tensor:
    """An (H, W) mask (nonzero = face) -> (1, S, S) float32 crop mask in {0, 1}."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"mask must be (H, W), got shape {mask.shape}")
    grey = Image.fromarray((mask != 0).astype(np.uint8) * 255)
    warped = np.asarray(_warp(grey, transform, Image.BILINEAR)) >= MASK_THRESHOLD
    return torch.from_numpy(warped.astype(np.float32))[None]


def align_to_crop(image, landmarks68: np.ndarray, mask, template5: np.ndarray, size: int = CROP_SIZE,
                  rescale_factor: float = RESCALE_FACTOR) -> AlignedCrop:
    """Deep3DFaceRecon's `align_img` as a scale + translation: the image (PIL, (H, W, 3) uint8 or
    float in [0, 1]), its (68, 2) landmarks (x, row) and (H, W) mask (or None) -> the S x S crop
    in which the 5 points sit on ``template5`` rescaled to ``rescale_factor`` (module docstring)."""
    transform = crop_transform(landmarks68, template5, size, rescale_factor)
    if transform.scale <= 0 or not np.isfinite(transform.scale):
        raise InputError(f"degenerate alignment: scale {transform.scale}")
    landmarks = torch.as_tensor(transform.apply(np.asarray(landmarks68, dtype=np.float64)), dtype=torch.float32)
    crop_mask = None if mask is None else warp_mask(mask, transform)
    return AlignedCrop(warp_image(image, transform), landmarks, crop_mask, transform)


def rows_to_y_up(points, size: int = CROP_SIZE):
    """(..., 2) pixels (x, row), y down -> the project's y-up pixels (x, size - 1 - row), as
    `facehd.morphable.project` gives them. Its own inverse; tensors and arrays alike."""
    if torch.is_tensor(points):
        return y_up_to_rows(points, size)
    return y_up_to_rows(torch.as_tensor(np.asarray(points)), size).numpy()


# ----------------------------------------------------------------------------------------------
# dataset


class WildImages(Dataset):
    """In-the-wild training images as S x S crops, aligned on the fly by their 5 points.

    Each item is a dict: ``image`` (3, S, S) float32 in [0, 1]; ``landmarks`` (68, 2) float32
    crop pixels (x, row), y down (`rows_to_y_up` gives the project's y-up pixels); ``mask``
    (1, S, S) float32 in {0, 1}; ``name``; ``transform`` (3,) float32 [scale, tx, ty] of the
    image -> crop map (crop = scale * p + t). With ``aligned=True`` the images must already be
    S x S crops and are used as stored (identity transform); no template is needed then.
    """

    def __init__(self, root: str | Path, template5: np.ndarray | None = None, *, aligned: bool = False,
                 size: int = CROP_SIZE, rescale_factor: float = RESCALE_FACTOR,
                 names: Sequence[str] | None = None):
        self.root = Path(root)
        self.size = int(size)
        self.aligned = aligned
        self.rescale_factor = float(rescale_factor)
        if not aligned and template5 is None:
            raise InputError("WildImages needs template5 (facehd.wild.template5_from_model) unless aligned=True")
        self.template5 = None if template5 is None else _check_points(
            template5.detach().cpu().numpy() if torch.is_tensor(template5) else template5, 5, "template points")
        self.names = list(list_names(self.root) if names is None else names)
        self._check_files()

    def _check_files(self) -> None:
        """Every listed name has its image, landmarks and mask (cheap stat calls, so a missing file
        is reported now, not in a DataLoader worker mid-epoch)."""
        for name in self.names:
            image_path(self.root, name)
            for path, what in ((landmark_path(self.root, name), "landmark file"), (mask_path(self.root, name), "mask")):
                if not path.is_file():
                    raise FileFormatError(path, f"missing {what} of image {name!r}")

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        sample = read_sample(self.root, self.names[index])
        if self.aligned:
            crop = self._as_stored(sample)
        else:
            crop = align_to_crop(sample.image, sample.landmarks, sample.mask, self.template5, self.size,
                                 self.rescale_factor)
        return {
            "image": crop.image,
            "landmarks": crop.landmarks,
            "mask": crop.mask,
            "name": sample.name,
            "transform": torch.as_tensor(crop.transform.as_array(), dtype=torch.float32),
        }

    def _as_stored(self, sample: WildSample) -> AlignedCrop:
        if sample.image.shape[:2] != (self.size, self.size):
            raise FileFormatError(image_path(self.root, sample.name),
                                  f"image is {sample.image.shape[1]} x {sample.image.shape[0]}, expected a "
                                  f"{self.size} x {self.size} crop (aligned=True)")
        image = torch.from_numpy(sample.image.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()
        mask = torch.from_numpy(sample.mask.astype(np.float32))[None]
        landmarks = torch.as_tensor(sample.landmarks, dtype=torch.float32)
        return AlignedCrop(image, landmarks, mask, CropTransform(1.0, 0.0, 0.0, self.size))
