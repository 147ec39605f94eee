"""`hrn predict`: images (+ 68 landmarks) -> coarse, mid and high meshes (OBJ with UVs and texture),
deformation and displacement maps (.npy and 16-bit grey PNGs), coefficients (.npz) and an overlay of the
render on the photo, in model units or mm. Photos are cropped by the public preprocessing
(`hrn_baseline.preprocess`)."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from facehd import conventions as cv
from facehd.capture import read_landmarks68
from facehd.errors import FaceHDError, FileFormatError, InputError
from facehd.fsutil import atomic_open, atomic_path
from facehd.io import Mesh, save_mesh
from facehd.landmarks_detect import photo_landmark_folders
from facehd.morphable import split_coeffs
from facehd.wild import IMAGE_SUFFIXES, read_image
from hrn_baseline.checkpoints import model_from_checkpoint
from hrn_baseline.config import ModelConfig
from hrn_baseline.model import HRN, HRNOutput
from hrn_baseline.preprocess import (
    CROP_SIZE,
    EYE_CORNERS,
    MOUTH_CORNERS,
    NOSE_TIP,
    RESCALE_FACTOR,
    PublicCrop,
    align_image,
    identity_crop,
    paste_back,
)
from hrn_baseline.preprocess import standard_landmarks as find_standard_landmarks
from hrn_baseline.train import resolve_device

UNITS = ("model", "mm")
PNG16_MAX = 65535
LANDMARK_SUFFIX = ".txt"
MESH_LEVELS = ("coarse", "mid", "high")
# how the 16-bit PNGs store signed values (also written to maps.json beside them)
PNG16_ENCODING = ("one 16-bit greyscale PNG per channel, read as uint16 by Pillow (np.asarray(Image.open(f))), "
                  "OpenCV (cv2.imread(f, cv2.IMREAD_UNCHANGED)) and imageio (imageio.v3.imread(f)); "
                  "value = (png / 65535 * 2 - 1) * scale, png = round((value / scale + 1) / 2 * 65535)")
DEFORMATION_CHANNELS = ("x", "y", "z")
# --- what the 68 landmarks of a face in its photo look like (else the file or the image is wrong) ---
MIN_LANDMARKS_INSIDE = 0.5  # fraction of the (visible) landmarks inside the image
MIN_LANDMARK_SPREAD_PX = 2.0  # RMS distance of the points from their mean; less: all at one point
MIN_LANDMARK_ASPECT = 0.05  # spread across / along the points' main axis; less: (nearly) on a line
# the points the crop is computed from (`preprocess.five_points`); the others may be invisible and NaN
ALIGNMENT_POINTS = (*EYE_CORNERS[0], *EYE_CORNERS[1], NOSE_TIP, *MOUTH_CORNERS)
TEXTURE_NOTE = "the input image re-sampled into UV through the mid mesh (HRN's texture map)"

Progress = Callable[..., Iterable]


@dataclass
class Prediction:
    """The outcome for one input image: the files written, or why it failed."""

    name: str
    source: Path
    files: list[Path] = field(default_factory=list)
    error: str | None = None


@dataclass
class _Input:
    name: str
    source: Path
    image: torch.Tensor  # (3, S, S) in [0, 1]
    landmarks: np.ndarray | None  # (68, 2) crop pixels (x, row), when given
    crop: PublicCrop  # the photo -> crop geometry
    photo: np.ndarray  # (H, W, 3) uint8, the image as read


# ----------------------------------------------------------------------------------------------
# model


def load_model(checkpoint: str | Path | None, device: str = "auto", model_config: ModelConfig | None = None) -> HRN:
    """The HRN of a checkpoint, in eval mode on ``device``: a `hrn train` checkpoint (which names its
    morphable model), or Deep3DFaceRecon's / HRN's public weights loaded into ``model_config``
    (`hrn_baseline.checkpoints.model_from_checkpoint`)."""
    if checkpoint is None:
        raise InputError("no checkpoint given: train one first, e.g. `hrn train --config configs/hrn_tiny_cpu.yaml "
                         "--out runs/tiny`, then pass --checkpoint runs/tiny/checkpoints/last.pt (or HRN's "
                         "epoch_10.pth)")
    return model_from_checkpoint(checkpoint, model_config).to(resolve_device(device)).eval()


# ----------------------------------------------------------------------------------------------
# inputs


def list_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files from files and folders (a folder contributes its .jpg / .jpeg / .png, sorted)."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise FileFormatError(path, "no such image file or folder")
    if not found:
        raise InputError(f"no images (.jpg, .jpeg, .png) in {', '.join(map(str, paths))}")
    return found


def prepare_input(path: Path, landmarks_dir: Path | None, standard68: np.ndarray, size: int) -> _Input:
    """Read one image; with landmarks, crop it by the public preprocessing (`standard68`: the
    (68, 3) standard landmarks, rescale 102 at 224), else it must already be an S x S crop."""
    image = read_image(path)
    if landmarks_dir is None:
        if image.shape[:2] != (size, size):
            raise FileFormatError(path, f"image is {image.shape[1]} x {image.shape[0]} pixels: give --landmarks to "
                                        f"align it, or a pre-cropped {size} x {size} image")
        tensor = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()
        return _Input(path.stem, path, tensor, None, identity_crop(tensor), image)
    landmarks_path = landmarks_dir / f"{path.stem}{LANDMARK_SUFFIX}"
    landmarks, visible = read_photo_landmarks(landmarks_path)
    check_landmarks(landmarks, visible, image.shape[:2], landmarks_path)
    missing = ~np.isfinite(landmarks).all(axis=1)  # invisible points without a position: not used by the crop
    try:
        crop = align_image(image, np.where(missing[:, None], 0.0, landmarks), standard68, size,
                           RESCALE_FACTOR * size / CROP_SIZE)
    except InputError as exc:
        raise FileFormatError(path, str(exc)) from None
    crop_landmarks = crop.landmarks.double().numpy()
    crop_landmarks[missing] = np.nan
    return _Input(path.stem, path, crop.image, crop_landmarks, crop, image)


def read_photo_landmarks(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(68, 2) pixels (x, row) and (68,) visible flags of a landmark file: 68 rows "x y", or
    "x y visible" as facehd's landmarks68/cam<i>.txt (invisible points may be NaN there)."""
    if not path.is_file():
        raise FileFormatError(path, "missing landmark file (68 lines 'x y' or 'x y visible')")
    try:
        rows = read_landmarks68(path)
    except OSError as exc:
        raise FileFormatError(path, f"not readable: {exc.strerror or exc}") from None
    return rows[:, :2], rows[:, 2] > 0


def check_landmarks(points: np.ndarray, visible: np.ndarray, image_shape: tuple[int, int], path: Path) -> None:
    """Refuse landmarks that cannot be a face in this image: points the crop needs without a
    position, all at one point, on a line, or mostly outside the (H, W) image."""
    finite = np.isfinite(points).all(axis=1)
    lacking = [i for i in ALIGNMENT_POINTS if not finite[i]]
    if lacking:
        raise FileFormatError(path, f"line(s) {', '.join(str(i + 1) for i in lacking)} have no position (NaN): the "
                                    "crop needs the eye corners, nose tip and mouth corners")
    known = points[finite]
    centred = known - known.mean(axis=0)
    spread = np.linalg.svd(centred, compute_uv=False) / np.sqrt(len(known))  # RMS along the two main axes
    if spread[0] < MIN_LANDMARK_SPREAD_PX:
        x, y = known.mean(axis=0)
        raise FileFormatError(path, f"all landmarks lie at one point ({x:.1f}, {y:.1f}): not a face's 68 points")
    if spread[1] < MIN_LANDMARK_ASPECT * spread[0]:
        raise FileFormatError(path, f"the landmarks lie on a line ({spread[1]:.2g} px across, {spread[0]:.3g} px "
                                    "along): not a face's 68 points")
    height, width = image_shape
    use = finite & visible if (finite & visible).any() else finite
    x, y = points[use, 0], points[use, 1]
    inside = (x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)
    if inside.mean() < MIN_LANDMARKS_INSIDE:
        raise FileFormatError(path, f"{int((~inside).sum())} of {len(inside)} landmarks lie outside the {width} x "
                                    f"{height} image (x {x.min():.0f}..{x.max():.0f}, y {y.min():.0f}..{y.max():.0f}): "
                                    "landmarks of another image, or of another size?")


# ----------------------------------------------------------------------------------------------
# 16-bit PNG (Pillow writes no 16-bit RGB)


def write_png16(path: str | Path, pixels: np.ndarray) -> Path:
    """Write (H, W) or (H, W, 3) uint16 pixels as a 16-bit grey or RGB PNG, atomically."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint16 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise InputError(f"16-bit PNG pixels must be uint16 (H, W) or (H, W, 3), got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape[:2]
    colour_type = 0 if pixels.ndim == 2 else 2
    rows = pixels.astype(">u2").reshape(height, -1).view(np.uint8)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1)  # filter type 0 on each row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    payload = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) \
        + chunk(b"IEND", b"")
    with atomic_open(path, "wb") as fh:
        fh.write(payload)
    return Path(path)


def read_png16(path: str | Path) -> np.ndarray:
    """Read a 16-bit grey or RGB PNG as written by `write_png16` (filter type 0 rows) -> uint16."""
    path = Path(path)
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise FileFormatError(path, "not a PNG file")
    pos, header, idat = 8, None, b""
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    if header is None or header[2] != 16 or header[3] not in (0, 2):
        raise FileFormatError(path, "not a 16-bit grey or RGB PNG")
    width, height, channels = header[0], header[1], 1 if header[3] == 0 else 3
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + 2 * width * channels)
    if raw[:, 0].any():
        raise FileFormatError(path, "uses PNG row filters other than 0: read it with a full PNG decoder")
    pixels = raw[:, 1:].copy().view(">u2").astype(np.uint16)
    return pixels.reshape(height, width) if channels == 1 else pixels.reshape(height, width, 3)


def encode_png16(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Signed values -> (uint16 pixels, scale) by `PNG16_ENCODING`; scale = max |value| (1 if all 0)."""
    scale = float(np.abs(values).max()) if values.size else 0.0
    scale = scale if scale > 0 else 1.0
    pixels = np.round((values / scale + 1.0) / 2.0 * PNG16_MAX)
    return np.clip(pixels, 0, PNG16_MAX).astype(np.uint16), scale


def decode_png16(pixels: np.ndarray, scale: float) -> np.ndarray:
    """Inverse of `encode_png16` (to within scale / 65535)."""
    return (pixels.astype(np.float64) / PNG16_MAX * 2.0 - 1.0) * scale


# ----------------------------------------------------------------------------------------------
# exports


def _unit_factor(units: str) -> float:
    if units not in UNITS:
        raise InputError(f"units must be one of {', '.join(UNITS)}, got {units!r}")
    return cv.MM_PER_MODEL_UNIT if units == "mm" else 1.0


def _unit_label(units: str) -> str:
    return "mm" if units == "mm" else f"model (1 unit = {cv.MM_PER_MODEL_UNIT:g} mm)"


def export_one(folder: Path, model: HRN, out: HRNOutput, b: int, item: _Input, units: str) -> list[Path]:
    """Write item ``b`` of a forward pass: meshes, maps, coefficients and maps.json."""
    factor, label = _unit_factor(units), _unit_label(units)
    texture = (out.texture_map_high[b].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()
    mm = model.morphable
    faces, uvs = mm.faces.cpu().numpy(), mm.uv.double().cpu().numpy()
    dense_uvs, dense_faces, dense_index = (t.cpu() for t in model.dense_mesh())
    vertices = {
        "coarse": (out.coarse.shape[b], faces, uvs),
        "mid": (out.shape_mid[b], faces, uvs),
        "high": (out.dense_vertices[b][dense_index], dense_faces.numpy(), dense_uvs.double().numpy()),
    }
    files = []
    for level, (verts, level_faces, level_uvs) in vertices.items():
        # one statement of the unit: mm, or model units with their size in mm
        metadata = {"units": "mm"} if units == "mm" else {"units": "model", "mm_per_unit": f"{cv.MM_PER_MODEL_UNIT:g}"}
        metadata.update({"space": "model (shape before pose; x left, y up, z toward the camera)", "level": level,
                         "source": str(item.source)})
        mesh = Mesh(verts.double().cpu().numpy() * factor, level_faces, uvs=level_uvs, texture=texture,
                    metadata=metadata)
        path = folder / f"{level}.obj"
        save_mesh(path, mesh)
        files += [path, path.with_suffix(".mtl"), path.with_suffix(".png")]

    maps = {"deformation": out.deformation[b], "displacement": out.displacement[b]}
    sidecar = {"units": label, "png16_encoding": PNG16_ENCODING, "maps": {}}
    for name, value in maps.items():
        array = value.double().cpu().numpy() * factor
        npy = folder / f"{name}.npy"
        with atomic_path(npy) as tmp:
            np.save(tmp, array.astype(np.float32))
        pixels, scale = encode_png16(array)
        channels = DEFORMATION_CHANNELS if name == "deformation" else ("along the coarse normal",)
        # grey PNGs, one per channel: common readers reduce 16-bit RGB to 8 bits (Pillow does), not 16-bit grey
        if name == "deformation":
            pngs = [write_png16(folder / f"{name}_{c}.png", pixels[i]) for i, c in enumerate(channels)]
            (folder / f"{name}.png").unlink(missing_ok=True)  # an earlier version's 16-bit RGB file
        else:
            pngs = [write_png16(folder / f"{name}.png", pixels[0])]
        sidecar["maps"][name] = {"npy": npy.name, "png": [png.name for png in pngs], "shape": list(array.shape),
                                 "scale": scale, "channels": list(channels)}
        files += [npy, *pngs]
    sidecar["texture"] = TEXTURE_NOTE
    with atomic_open(folder / "maps.json") as fh:
        json.dump(sidecar, fh, indent=2)
    files.append(folder / "maps.json")
    files.append(_write_coeffs(folder / "coeffs.npz", out, b, item, units, factor))
    files.append(write_overlay(folder / "overlay.png", out, b, item))
    return files


def write_overlay(path: Path, out: HRNOutput, b: int, item: _Input) -> Path:
    """The render R1 blended into the original photo (`preprocess.paste_back`), with the predicted
    landmarks mapped back as dots."""
    from PIL import Image, ImageDraw

    pixels = paste_back(item.photo, item.crop, out.render_mid[b], out.render_mask[b])
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    radius = max(1.0, max(image.size) / 300)
    for x, row in item.crop.crop_to_image(out.landmarks[b].detach().double().cpu().numpy()):
        draw.ellipse((x - radius, row - radius, x + radius, row + radius), fill=(0, 255, 0))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def _write_coeffs(path: Path, out: HRNOutput, b: int, item: _Input, units: str, factor: float) -> Path:
    coeffs = out.coeffs[b:b + 1].detach().double().cpu()
    c = split_coeffs(coeffs)
    arrays = {
        "coeffs": coeffs[0].numpy(),  # the raw 257-vector, DESIGN section 3 (its translation in model units)
        "id": c.id[0].numpy(), "exp": c.exp[0].numpy(), "tex": c.tex[0].numpy(), "angle": c.angle[0].numpy(),
        "gamma": c.gamma[0].numpy(), "trans": c.trans[0].numpy() * factor,
        "units": np.array(_unit_label(units)),
        "landmarks": out.landmarks[b].detach().double().cpu().numpy(),  # predicted, crop pixels (x, row)
        # image -> crop pixels: crop = (kx, ky) * p + (dx, dy), the exact geometry of the resize and crop box
        "crop_transform": np.concatenate(item.crop.affine()),
        "trans_params": item.crop.trans_params(),  # Deep3DFaceRecon's [W, H, s, tx, ty]
        "image_size": np.array(out.render_mask.shape[-1]),
        "source": np.array(str(item.source)),
    }
    with atomic_open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


# ----------------------------------------------------------------------------------------------
# entry point


def predict(checkpoint: str | Path | None, images: Sequence[str | Path], out: str | Path, *,
            landmarks: str | Path | None = None, units: str = "model", device: str = "auto", batch_size: int = 8,
            progress: Progress | None = None, model: HRN | None = None, model_config: ModelConfig | None = None,
            standard_landmarks: str | Path | None = None) -> list[Prediction]:
    """Reconstruct every image and write ``out/<image stem>/``: coarse.obj, mid.obj, high.obj (each
    with .mtl and texture .png), deformation / displacement .npy and 16-bit .png, maps.json (units
    and PNG scaling), coeffs.npz and overlay.png. A bad image is reported in its `Prediction` and
    skipped. ``model`` overrides the checkpoint (an already loaded HRN); ``model_config`` is for
    public checkpoints; ``standard_landmarks`` names `similarity_Lm3D_all.mat` (default:
    `preprocess.standard_landmarks`)."""
    _unit_factor(units)
    model = model if model is not None else load_model(checkpoint, device, model_config)
    model.eval()
    standard68 = find_standard_landmarks(model.morphable, standard_landmarks)
    landmarks_dir = None if landmarks is None else Path(landmarks)
    if landmarks_dir is not None and not landmarks_dir.is_dir():
        raise FileFormatError(landmarks_dir, "no such landmark folder (<image stem>.txt: 68 lines 'x y' or "
                                            "'x y visible')")
    paths = list_images(images)
    results = [Prediction(p.stem, p) for p in paths]
    duplicates = sorted({p.stem for p in paths if sum(q.stem == p.stem for q in paths) > 1})
    if duplicates:
        raise InputError(f"several images share the name(s) {', '.join(duplicates)}: outputs go to OUT/<name>/")
    # without --landmarks: <stem>.txt beside a photo, else the face detector (pre-cropped images need none)
    folders, problems = ({}, {}) if landmarks_dir else photo_landmark_folders(paths, out, model.image_size)
    chunks = [list(range(i, min(i + batch_size, len(paths)))) for i in range(0, len(paths), batch_size)]
    if progress is not None:
        chunks = progress(chunks, total=len(chunks), desc="hrn predict", unit="batch")
    device_ = next(model.parameters()).device
    for chunk in chunks:
        inputs = []
        for i in chunk:
            try:
                if paths[i] in problems:
                    raise InputError(problems[paths[i]])
                inputs.append((i, prepare_input(paths[i], folders.get(paths[i], landmarks_dir), standard68,
                                                model.image_size)))
            except FaceHDError as exc:
                results[i].error = str(exc)
        if not inputs:
            continue
        with torch.no_grad():
            output = model(torch.stack([item.image for _, item in inputs]).to(device_))
        for b, (i, item) in enumerate(inputs):
            try:
                results[i].files = export_one(Path(out) / item.name, model, output, b, item, units)
            except FaceHDError as exc:
                results[i].error = str(exc)
    return results
