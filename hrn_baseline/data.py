"""HRN's training samples: in-the-wild crops for L_self (`facehd.wild`) and in-the-lab views with
ground-truth detail maps for L_super (`facehd.dataset.FaceHD100` + `facehd.detail`'s gt_maps)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, Dataset

from facehd import conventions as cv
from facehd.capture import CAMERA_NAMES, N_VIEWS, read_landmarks68
from facehd.dataset import GT_MAPS_DIR, FaceHD100
from facehd.errors import FileFormatError, InputError
from facehd.wild import WildImages, align_to_crop

MAP_KEYS = ("deformation", "displacement")


def wild_dataset(roots: Sequence[str | Path], template5: np.ndarray, size: int, aligned: bool = False) -> Dataset:
    """In-the-wild folders as one dataset of `WildSample`-like dicts: image (3, S, S), landmarks
    (68, 2) crop pixels (x, row), landmark_weight (68,) ones, mask (1, S, S)."""
    if not roots:
        raise InputError("no in-the-wild image folder given")
    parts = [_WithWeights(WildImages(root, template5, aligned=aligned, size=size)) for root in roots]
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


class _WithWeights(Dataset):
    """Adds the per-landmark weights that lab views carry too, so both batch the same way."""

    def __init__(self, inner: WildImages):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict:
        item = self.inner[index]
        return {"image": item["image"], "landmarks": item["landmarks"], "mask": item["mask"],
                "landmark_weight": torch.ones(cv.N_LANDMARKS), "name": item["name"]}


class LabViews(Dataset):
    """One item per (capture, view) of a FaceHD-100 dataset that has ground-truth maps and a
    complete 68-point landmark file, aligned to the S x S crop with the in-the-wild 5-point
    alignment. Items: image (3, S, S); landmarks (68, 2) crop pixels; landmark_weight (68,) the
    file's visibility; mask (1, S, S) ones (there is no face parsing of lab images); deformation
    (3, Hm, Hm), displacement (1, Hh, Hh) and their ``*_mask`` maps resized to the model's sizes;
    name "<subject>/<expression>/<view>".
    """

    def __init__(self, root: str | Path, derived: str | Path, template5: np.ndarray, size: int, *,
                 split: str | None = "train", views: Sequence[int] | None = None,
                 map_sizes: tuple[int, int] = (cv.DEFORMATION_MAP_SIZE, cv.DISPLACEMENT_MAP_SIZE)):
        self.root, self.derived = Path(root), Path(derived)
        self.template5, self.size, self.map_sizes = template5, int(size), tuple(map_sizes)
        views = list(range(N_VIEWS)) if views is None else list(views)
        self._by_view = {v: FaceHD100(root, split=split, views=[v], derived=derived) for v in views}
        self.entries = [(v, i) for v, data in self._by_view.items() for i, ref in enumerate(data.captures)
                        if self._usable(ref, v)]
        if not self.entries:
            raise FileFormatError(self.derived, f"no view of the {split or 'whole'} split of {self.root} has both "
                                                f"{GT_MAPS_DIR}/cam<i>.npz here and complete 68-point landmarks "
                                                "(run `facehd gt-maps`)")

    def _usable(self, ref, view: int) -> bool:
        gt = self.derived / ref.subject / ref.expression / GT_MAPS_DIR / f"{CAMERA_NAMES[view]}.npz"
        landmarks = ref.paths.landmarks68[view]
        return gt.is_file() and landmarks.is_file() and bool(np.isfinite(read_landmarks68(landmarks)[:, :2]).all())

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        view, i = self.entries[index]
        data = self._by_view[view]
        item = data[i]
        landmarks = item["landmarks68"][0].double().numpy()
        image = item["images"][0].permute(1, 2, 0).numpy()
        crop = align_to_crop(image, landmarks[:, :2], None, self.template5, self.size)
        gt = item["gt_maps"]
        out = {"image": crop.image, "landmarks": crop.landmarks,
               "landmark_weight": torch.as_tensor(landmarks[:, 2], dtype=torch.float32),
               "mask": torch.ones(1, self.size, self.size),
               "name": f"{item['subject']}/{item['expression']}/{CAMERA_NAMES[view]}"}
        for key, size in zip(MAP_KEYS, self.map_sizes):
            out[key] = _resize(gt[key][0], size, "bilinear")
            out[f"{key}_mask"] = (_resize(gt[f"{key}_mask"][0], size, "bilinear") > 0.5).float()
        return out


def _resize(maps: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(C, H, W) -> (C, size, size); the GT files are 64^2 / 256^2, the model's maps may differ."""
    if maps.shape[-1] == size and maps.shape[-2] == size:
        return maps
    return F.interpolate(maps[None], size=(size, size), mode=mode, align_corners=False, antialias=True)[0]
