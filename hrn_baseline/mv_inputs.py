"""The views of one MV-HRN fit: a FaceHD-100 capture (images, landmarks68/, cameras.json) or a
plain folder of images of one person (with <stem>.txt landmarks, or pre-cropped), each view
cropped by the public preprocessing. Unusable views are skipped with a one-line reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from facehd.capture import CAMERA_NAMES, capture_paths, read_cameras
from facehd.errors import FaceHDError, FileFormatError, InputError
from facehd.landmarks_detect import photo_landmark_folders
from facehd.wild import read_image
from hrn_baseline.mv import MVView
from hrn_baseline.predict import check_landmarks, list_images, read_photo_landmarks
from hrn_baseline.preprocess import CROP_SIZE, RESCALE_FACTOR, align_image

MIN_VIEWS = 2  # a multi-view fit needs at least two readable views


@dataclass
class ViewSet:
    """The readable views, and one line per view that was skipped (naming its file)."""

    views: list[MVView] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def require(self, where: Path, minimum: int = MIN_VIEWS) -> ViewSet:
        if len(self.views) < minimum:
            reasons = "; ".join(self.skipped) if self.skipped else "no images"
            raise InputError(f"{where}: {len(self.views)} readable view(s), at least {minimum} needed ({reasons})")
        return self


def _crop_view(name: str, image_path: Path, photo: np.ndarray, landmarks: np.ndarray, visible: np.ndarray,
               landmarks_path: Path, standard68: np.ndarray, size: int) -> MVView:
    check_landmarks(landmarks, visible, photo.shape[:2], landmarks_path)
    missing = ~np.isfinite(landmarks).all(axis=1)
    try:
        crop = align_image(photo, np.where(missing[:, None], 0.0, landmarks), standard68, size,
                           RESCALE_FACTOR * size / CROP_SIZE)
    except InputError as exc:
        raise FileFormatError(image_path, str(exc)) from None
    k, d = crop.affine()
    crop_landmarks = crop.image_to_crop(np.where(missing[:, None], np.nan, landmarks))
    return MVView(name=name, source=image_path, image=crop.image, landmarks=crop_landmarks,
                  visible=(visible & ~missing).astype(np.float64), crop_k=k, crop_d=d, photo=photo)


def read_capture_views(directory: str | Path, standard68: np.ndarray, size: int, *,
                       views: list[str] | None = None, calibrated: bool = True) -> ViewSet:
    """The views of one capture folder (images/cam<i>, landmarks68/cam<i>.txt, cameras.json);
    ``views`` selects camera names. A camera whose image is missing or unreadable, whose
    landmarks are missing or wrong, or (calibrated) whose image size differs from cameras.json
    is skipped with its reason."""
    paths = capture_paths(directory)
    if calibrated and not paths.cameras.is_file():
        raise FileFormatError(paths.cameras, "missing (a calibrated fit needs cameras.json; use --uncalibrated)")
    cameras = read_cameras(paths.cameras) if calibrated else {}
    names = list(CAMERA_NAMES) if views is None else list(views)
    unknown = [n for n in names if n not in CAMERA_NAMES]
    if unknown:
        raise InputError(f"unknown view(s) {', '.join(unknown)}; the capture's are {', '.join(CAMERA_NAMES)}")
    out = ViewSet()
    for name in names:
        i = CAMERA_NAMES.index(name)
        image_path, landmarks_path = paths.images[i], paths.landmarks68[i]
        try:
            if not image_path.is_file():
                raise FileFormatError(image_path, "missing image")
            photo = read_image(image_path)
            camera = cameras.get(name) if calibrated else None
            if calibrated and camera is None:
                raise FileFormatError(paths.cameras, f"no camera {name!r} for {image_path.name}")
            if camera is not None and (camera.width, camera.height) != (photo.shape[1], photo.shape[0]):
                raise FileFormatError(image_path, f"image is {photo.shape[1]} x {photo.shape[0]} pixels but "
                                                  f"cameras.json says {camera.width} x {camera.height}")
            landmarks, visible = read_photo_landmarks(landmarks_path)
            view = _crop_view(name, image_path, photo, landmarks, visible, landmarks_path, standard68, size)
            view.camera = camera
            out.views.append(view)
        except FaceHDError as exc:
            out.skipped.append(str(exc))
    return out


def read_folder_views(images: str | Path, landmarks: str | Path | None, standard68: np.ndarray, size: int,
                      *, detected_out: str | Path | None = None) -> ViewSet:
    """The images of one folder: with a landmark folder (<stem>.txt, 68 lines 'x y' or 'x y
    visible') each is cropped by the public preprocessing (images may differ in size). Without
    one, and given `detected_out`, a photo's landmarks are its <stem>.txt beside it or else the
    face detector's (`facehd.landmarks_detect`, written under `detected_out`), as `hrn predict`
    finds them; an S x S image is taken as already cropped (landmarks from a <stem>.txt beside
    it if present, else the view has no landmark term)."""
    out = ViewSet()
    paths = list_images([images])
    folders, problems = ({}, {})
    if landmarks is None and detected_out is not None:
        folders, problems = photo_landmark_folders(paths, detected_out, size)
    for path in paths:
        if path in problems:
            out.skipped.append(problems[path])
            continue
        try:
            photo = read_image(path)
            folder = Path(landmarks) if landmarks is not None else folders.get(path)
            if folder is not None and not (landmarks is None and photo.shape[:2] == (size, size)):
                lm_path = folder / f"{path.stem}.txt"
                points, visible = read_photo_landmarks(lm_path)
                out.views.append(_crop_view(path.stem, path, photo, points, visible, lm_path, standard68, size))
                continue
            if photo.shape[:2] != (size, size):
                raise FileFormatError(path, f"image is {photo.shape[1]} x {photo.shape[0]} pixels: give --landmarks "
                                            f"to align it, or pre-cropped {size} x {size} images")
            image = torch.from_numpy(photo.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()
            points, visible = np.zeros((68, 2)), np.zeros(68)
            if folder is not None:  # a crop's own landmarks, in its pixels
                lm_path = folder / f"{path.stem}.txt"
                points, visible = read_photo_landmarks(lm_path)
                check_landmarks(points, visible, photo.shape[:2], lm_path)
                points, visible = np.nan_to_num(points), (visible & np.isfinite(points).all(axis=1)).astype(float)
            out.views.append(MVView(name=path.stem, source=path, image=image, landmarks=points,
                                    visible=visible, photo=photo))
        except FaceHDError as exc:
            out.skipped.append(str(exc))
    return out
