"""The FaceHD-100 PyTorch dataset: one item per capture (9 calibrated views, landmarks, scan, and
ground-truth maps when given the derived-products folder), with subject-disjoint splits."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from facehd.batch import inputs_digest
from facehd.capture import (
    CAMERA_NAMES,
    N_VIEWS,
    SUBJECTS_CSV,
    Camera,
    Capture,
    CapturePaths,
    CaptureRef,
    find_captures,
    load_capture,
    read_landmarks7,
    read_subjects,
    scale_pixels,
)
from facehd.conventions import DEFORMATION_MAP_SIZE, DISPLACEMENT_MAP_SIZE, N_LANDMARKS
from facehd.errors import FileFormatError, InputError
from facehd.validate import absent_reason, check_dataset_root

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

ALIGN_JSON = "align.json"
GT_MAPS_DIR = "gt_maps"
# name -> (channels, size) of each ground-truth map in gt_maps/cam<i>.npz (DESIGN section 6).
GT_MAP_SHAPES = {
    "deformation": (3, DEFORMATION_MAP_SIZE),
    "displacement": (1, DISPLACEMENT_MAP_SIZE),
}


def split_subjects(
    subject_ids: Sequence[str],
    fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Assign subjects to train / val / test: a seeded permutation of the sorted ids, cut at the
    rounded cumulative fractions. The same ids, fractions and seed always give the same split;
    every subject is in exactly one split."""
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.shape != (len(SPLITS),) or (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
        raise InputError(f"split fractions must be {len(SPLITS)} non-negative numbers summing to 1, got "
                         f"{fractions.tolist()}")
    ids = sorted(set(subject_ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    cuts = np.round(np.cumsum(fractions) * len(ids)).astype(int)
    bounds = [0, *cuts[:-1].tolist(), len(ids)]
    return {split: sorted(ids[i] for i in order[bounds[k]:bounds[k + 1]]) for k, split in enumerate(SPLITS)}


class FaceHD100(Dataset):
    """FaceHD-100 captures in the layout of `facehd.capture`, one item per subject and expression.

    Args:
        root: dataset root (subjects.csv and <subject>/<expression>/ folders).
        split: None for every capture, or "train" / "val" / "test" (`split_subjects`).
        split_fractions: train, val, test fractions of the subjects.
        split_seed: seed of the subject permutation.
        views: view indices to load (default all 9, in order).
        image_size: resize images to this (width, height) in pixels, or an int for both; K and
            the 68-point landmarks are scaled to match. None keeps the file size.
        derived: the derived-products folder (<derived>/<subject>/<expression>/gt_maps/...), to
            add ``gt_maps`` and ``align`` to each item.
        load_scan: also load the scan's vertices and faces (otherwise only its path is given,
            so DataLoader workers do not read scans unless asked).

    An item is a dict:
        images (V, 3, H, W) float32 RGB in [0, 1]; K (V, 3, 3) pixels; R (V, 3, 3); t (V, 3) mm;
        distortion (V, 5); image_size (V, 2) int64 (width, height); landmarks68 (V, 68, 3)
        x, y pixels and visible (NaN for views without a file); landmarks7 (7, 3) mm;
        subject, expression, gender, ethnicity (str), age (int, years); view_names (list);
        scan (str, the scan.ply path: `facehd.io.load_mesh(item["scan"])` loads it);
        with load_scan, scan_vertices (N, 3) float32 mm and scan_faces (F, 3) int64;
        with derived, gt_maps (dict of (V, C, S, S) maps and masks plus ``present`` (V,) bool;
        zeros where a view has no file) and align (the align.json dict, or None).

    Derived products written by `facehd align` / `facehd gt-maps` record the digest of the scan
    and landmarks they were computed from (`capture_digest`); one whose capture has changed since
    is refused with an error naming the file (rerun the command).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        split: str | None = None,
        split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
        split_seed: int = 0,
        views: Sequence[int] | None = None,
        image_size: int | tuple[int, int] | None = None,
        derived: str | Path | None = None,
        load_scan: bool = False,
    ):
        self.root = Path(root)
        if split is not None and split not in SPLITS:
            raise InputError(f"split must be None or one of {', '.join(SPLITS)}, got {split!r}")
        self.views = _check_views(views)
        self.view_names = [CAMERA_NAMES[i] for i in self.views]
        self.image_size = _check_image_size(image_size)
        self.derived = None if derived is None else Path(derived)
        self.load_scan = load_scan
        check_dataset_root(self.root)
        self.subjects = _subject_rows(self.root)
        refs = find_captures(self.root)
        unknown = sorted({r.subject for r in refs} - set(self.subjects))
        if unknown:
            raise FileFormatError(self.root / SUBJECTS_CSV, f"no row for subject folder(s) {', '.join(unknown)} "
                                                            "(run `facehd validate` on the dataset)")
        self.split = split
        if split is not None:
            keep = set(split_subjects(sorted(self.subjects), split_fractions, split_seed)[split])
            refs = [r for r in refs if r.subject in keep]
        self.captures: list[CaptureRef] = refs

    def __len__(self) -> int:
        return len(self.captures)

    def __getitem__(self, index: int) -> dict:
        capture = load_capture(self.captures[index])
        cameras = [_camera(capture, name) for name in self.view_names]
        images, sizes = zip(*(self._image(capture, v) for v in self.views))
        if len(set(sizes)) > 1:
            raise InputError(f"{capture.paths.directory}: views have different sizes {sorted(set(sizes))}; "
                             "pass image_size to resize them to one size")
        cameras = [c if c.width == w and c.height == h else c.resized(w, h) for c, (w, h) in zip(cameras, sizes)]
        item = {
            "images": torch.stack(images),
            "K": _tensor([c.K for c in cameras]),
            "R": _tensor([c.R for c in cameras]),
            "t": _tensor([c.t for c in cameras]),
            "distortion": _tensor([c.distortion for c in cameras]),
            "image_size": torch.tensor(sizes, dtype=torch.int64),
            "landmarks68": _tensor([self._landmarks68(capture, v, cam) for v, cam in zip(self.views, cameras)]),
            "landmarks7": _tensor(read_landmarks7(capture.paths.landmarks7)),
            "subject": capture.subject,
            "expression": capture.expression,
            **self.subjects[capture.subject],
            "view_names": list(self.view_names),
            "scan": str(capture.paths.scan),
        }
        if self.load_scan:
            mesh = capture.load_scan()
            item["scan_vertices"] = torch.from_numpy(mesh.vertices.astype(np.float32))
            item["scan_faces"] = torch.from_numpy(mesh.faces)
        if self.derived is not None:
            folder = self.derived / capture.subject / capture.expression
            item["gt_maps"] = read_gt_maps(folder, self.view_names, capture=capture.paths)
            item["align"] = read_align(folder, capture=capture.paths)
        return item

    def _image(self, capture: Capture, view: int) -> tuple[torch.Tensor, tuple[int, int]]:
        from PIL import Image

        path = capture.paths.images[view]
        if not path.is_file():
            raise FileFormatError(path, f"view {CAMERA_NAMES[view]}: {absent_reason(path, 'image')}")
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if self.image_size is not None and img.size != self.image_size:
                    img = img.resize(self.image_size, Image.Resampling.BILINEAR)
                array = np.asarray(img, dtype=np.uint8)
        except OSError as exc:
            raise FileFormatError(path, f"cannot decode image: {exc}") from None
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0
        return tensor, (array.shape[1], array.shape[0])

    def _landmarks68(self, capture: Capture, view: int, camera: Camera) -> np.ndarray:
        points = capture.landmarks68(view)
        if points is None:
            return np.full((N_LANDMARKS, 3), np.nan)
        original = capture.cameras[CAMERA_NAMES[view]]
        points[:, :2] = scale_pixels(points[:, :2], camera.width / original.width, camera.height / original.height)
        return points


def _check_views(views: Sequence[int] | None) -> list[int]:
    if views is None:
        return list(range(N_VIEWS))
    views = [int(v) for v in views]
    if not views or len(set(views)) != len(views) or not all(0 <= v < N_VIEWS for v in views):
        raise InputError(f"views must be distinct indices in 0..{N_VIEWS - 1}, got {views}")
    return views


def _check_image_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    width, height = (size, size) if isinstance(size, int) else tuple(size)
    if width <= 0 or height <= 0:
        raise InputError(f"image_size must be positive, got {size}")
    return int(width), int(height)


def _subject_rows(root: Path) -> dict[str, dict]:
    """subject id -> {gender, age, ethnicity} from subjects.csv."""
    path = root / SUBJECTS_CSV
    if not path.is_file():
        raise FileFormatError(path, f"{absent_reason(path, SUBJECTS_CSV)}: the loader needs the subjects table")
    table = read_subjects(path)
    return {
        row.subject_id: {"gender": row.gender, "age": int(row.age), "ethnicity": row.ethnicity}
        for row in table.itertuples(index=False)
    }


def _camera(capture: Capture, name: str) -> Camera:
    if name not in capture.cameras:
        raise FileFormatError(capture.paths.cameras, f"no calibration for {name}")
    return capture.cameras[name]


def _tensor(arrays) -> torch.Tensor:
    return torch.from_numpy(np.asarray(arrays, dtype=np.float32))


# --- derived products --------------------------------------------------------------------------

# The key (npz) and field (align.json "inputs") holding `capture_digest`.
CAPTURE_DIGEST_KEY = "capture_digest"
CAPTURE_DIGEST_PARAMS = {"capture digest": 1}
# (path, size, mtime) of each file -> digest: a training loop hashes each scan once, not every epoch
_DIGESTS: dict[tuple, str] = {}
MAX_CACHED_DIGESTS = 100_000


def capture_digest(paths: CapturePaths) -> str:
    """SHA-256 of the capture files its derived products are computed from (scan.ply and
    landmarks7.txt): `facehd align` and `facehd gt-maps` store it, and the loader refuses a
    product whose capture no longer matches it. Errors name a missing or unreadable file."""
    files = (paths.scan, paths.landmarks7)
    try:
        stats = [os.stat(path) for path in files]
    except OSError:
        return inputs_digest(files, CAPTURE_DIGEST_PARAMS)  # raises, naming the file
    key = tuple((str(path), st.st_size, st.st_mtime_ns) for path, st in zip(files, stats))
    if key not in _DIGESTS:
        if len(_DIGESTS) >= MAX_CACHED_DIGESTS:
            _DIGESTS.clear()
        _DIGESTS[key] = inputs_digest(files, CAPTURE_DIGEST_PARAMS)
    return _DIGESTS[key]


def _check_capture_digest(path: Path, stored, capture: CapturePaths | None, tool: str) -> None:
    """Refuse a derived product whose stored capture digest differs from the capture's files."""
    if capture is None or stored is None:
        return  # no capture to check against, or a product from elsewhere that records none
    if str(stored) != capture_digest(capture):
        raise FileFormatError(path, f"computed from another version of {capture.scan.name} or "
                                    f"{capture.landmarks7.name} in {capture.directory}; rerun `facehd {tool}`")


def read_gt_maps(folder: str | Path, view_names: Sequence[str], *,
                 capture: CapturePaths | None = None) -> dict[str, torch.Tensor]:
    """Ground-truth maps of the given views from ``folder/gt_maps/<view>.npz``.

    Returns deformation (V, 3, 64, 64), displacement (V, 1, 256, 256), their masks
    ``deformation_mask`` (V, 1, 64, 64) and ``displacement_mask`` (V, 1, 256, 256) as float32
    0/1, and ``present`` (V,) bool; a view without a file has zero maps and masks and
    ``present`` False. With ``capture``, a file whose `capture_digest` does not match that
    capture's files is refused. Other keys of the files are ignored.
    """
    folder = Path(folder) / GT_MAPS_DIR
    out = {}
    for name, (channels, size) in GT_MAP_SHAPES.items():
        out[name] = torch.zeros(len(view_names), channels, size, size)
        out[f"{name}_mask"] = torch.zeros(len(view_names), 1, size, size)
    present = torch.zeros(len(view_names), dtype=torch.bool)
    for v, view in enumerate(view_names):
        path = folder / f"{view}.npz"
        if not path.is_file():
            continue
        for key, value in _read_gt_npz(path, capture).items():
            out[key][v] = value
        present[v] = True
    out["present"] = present
    return out


def _read_gt_npz(path: Path, capture: CapturePaths | None = None) -> dict[str, torch.Tensor]:
    try:
        with np.load(path) as npz:
            data = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise FileFormatError(path, f"cannot read ground-truth maps: {exc}") from None
    _check_capture_digest(path, data.get(CAPTURE_DIGEST_KEY), capture, "gt-maps")
    out = {}
    for name, (channels, size) in GT_MAP_SHAPES.items():
        for key, shape in ((name, (channels, size, size)), (f"{name}_mask", (1, size, size))):
            if key not in data:
                raise FileFormatError(path, f"missing key {key!r}")
            array = np.asarray(data[key])
            if array.size != int(np.prod(shape)) or array.shape[-2:] != shape[-2:]:
                raise FileFormatError(path, f"{key} has shape {array.shape}, expected {shape}")
            out[key] = torch.from_numpy(array.reshape(shape).astype(np.float32))
    return out


def read_align(folder: str | Path, *, capture: CapturePaths | None = None) -> dict | None:
    """The capture's align.json (scan -> model similarity and fit quality), or None if absent.
    With ``capture``, one whose `capture_digest` does not match that capture's files is refused."""
    path = Path(folder) / ALIGN_JSON
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FileFormatError(path, f"invalid JSON: {exc}") from None
    inputs = record.get("inputs") if isinstance(record, dict) else None
    stored = inputs.get(CAPTURE_DIGEST_KEY) if isinstance(inputs, dict) else None
    _check_capture_digest(path, stored, capture, "align")
    return record


# --- batching ----------------------------------------------------------------------------------


# Per-capture sizes differ between scans: always lists, so a batch's types never depend on the data.
LIST_KEYS = ("scan_vertices", "scan_faces")


def collate_captures(items: Sequence[dict]) -> dict:
    """Batch dataset items: tensors of equal shape are stacked (B, ...), numbers become tensors,
    nested dicts are collated key by key, and everything else (strings, lists, the scan
    tensors of `LIST_KEYS`, tensors of different shapes, None) is kept as a list of length B."""
    return {
        key: [item[key] for item in items] if key in LIST_KEYS else _collate([item[key] for item in items])
        for key in items[0]
    }


def _collate(values: list):
    first = values[0]
    if isinstance(first, dict):
        return {key: _collate([v[key] for v in values]) for key in first}
    if torch.is_tensor(first) and all(torch.is_tensor(v) and v.shape == first.shape for v in values):
        return torch.stack(values)
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return torch.tensor(values)
    return list(values)
