"""68 iBUG landmarks for photos without landmark files, from MediaPipe Face Mesh (468 points)
run offline in the detector's own environment (`bash scripts/setup.sh --detect`).

mediapipe 0.10.21 ships its Face Mesh models inside the wheel (later releases download them) but
pins numpy < 2, so it cannot live in facehd's environment: `detect_landmarks` starts the worker
`facehd/mediapipe_landmarks.py` with the detector environment's Python and maps the 468 points it
returns to iBUG 68 with `MEDIAPIPE_TO_IBUG68`.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facehd import conventions as cv
from facehd.errors import FaceHDError, FileFormatError, InputError

# MediaPipe Face Mesh index(es) of each iBUG point, in iBUG order (0-based here; iBUG numbers them
# 1..68); two indices are averaged. After the mp2dlib table of the MP2D project. Left and right are
# the subject's, as in iBUG: point 36 (the right eye's outer corner) is MediaPipe 33 and lies on the
# image's left in a frontal photo, like the right jaw end (0), the right brow (17-21), the right
# mouth corner (48). MediaPipe's 468 are the same as its 478 without the 10 iris points.
# Jaw caveat: MediaPipe's jaw points are fixed surface vertices, while iBUG annotates the
# view-dependent silhouette, so on turned faces the far contour differs from an iBUG annotation.
MEDIAPIPE_TO_IBUG68: tuple[tuple[int, ...], ...] = (
    # jaw 0-16, the subject's right ear to the left ear
    (127,), (234,), (93,), (132, 58), (58, 172), (136,), (150,), (176,), (152,), (400,), (379,),
    (365,), (397, 288), (361,), (323,), (454,), (356,),
    # right brow 17-21 (outer to inner), left brow 22-26 (inner to outer)
    (70,), (63,), (105,), (66,), (107,),
    (336,), (296,), (334,), (293,), (300,),
    # nose bridge 27-30 (top to tip), nostrils 31-35 (right to left)
    (168, 6), (197, 195), (5,), (4,),
    (75,), (97,), (2,), (326,), (305,),
    # right eye 36-41 (outer corner, upper lid, inner corner, lower lid), left eye 42-47 (inner corner first)
    (33,), (160,), (158,), (133,), (153,), (144,),
    (362,), (385,), (387,), (263,), (373,), (380,),
    # outer lips 48-59 from the right corner over the upper lip; inner lips 60-67 likewise
    (61,), (39,), (37,), (0,), (267,), (269,), (291,), (321,), (314,), (17,), (84,), (91,),
    (78,), (82,), (13,), (312,), (308,), (317,), (14,), (87,),
)
MEDIAPIPE_POINTS = 468  # Face Mesh without iris refinement

DETECT_VENV = ".venv-detect"  # beside the source tree, made by `bash scripts/setup.sh --detect`
DETECT_PYTHON_VARIABLE = "FACEHD_DETECT_PYTHON"  # overrides the detector environment's Python
INSTALL_HINT = "install the face detector (bash scripts/setup.sh --detect) or give 68-point landmark files"
WORKER = Path(__file__).with_name("mediapipe_landmarks.py")
# Seconds the worker may take: importing mediapipe (~5 s) plus generous time per image.
STARTUP_TIMEOUT_S = 120.0
PER_IMAGE_TIMEOUT_S = 10.0


class DetectorMissing(InputError):
    """The detector's environment is not installed."""

    def __init__(self, python: Path):
        super().__init__(f"no face detector ({python} not found): {INSTALL_HINT}")


@dataclass
class Detection:
    """The detector's answer for one image: 68 points (pixels, x right, y down, iBUG order) or why not."""

    image: Path
    landmarks: np.ndarray | None  # (68, 2) float64
    error: str | None = None
    seconds: float = 0.0  # decoding and detection in the worker


def mediapipe_to_ibug68(points):
    """(..., 468 or 478, D) MediaPipe Face Mesh points -> (..., 68, D) iBUG points by
    `MEDIAPIPE_TO_IBUG68` (pairs averaged)."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim < 2 or points.shape[-2] < MEDIAPIPE_POINTS:
        raise InputError(f"MediaPipe points have shape {points.shape}, expected (..., {MEDIAPIPE_POINTS}, D)")
    return np.stack([points[..., list(group), :].mean(axis=-2) for group in MEDIAPIPE_TO_IBUG68], axis=-2)


def detector_python() -> Path:
    """The detector environment's Python: $FACEHD_DETECT_PYTHON, else .venv-detect beside the source tree."""
    given = os.environ.get(DETECT_PYTHON_VARIABLE)
    if given:
        return Path(given)
    return Path(__file__).resolve().parents[1] / DETECT_VENV / "bin" / "python"


def detector_available() -> bool:
    python = detector_python()
    return python.is_file() and os.access(python, os.X_OK)


def detect_landmarks(images: Sequence[str | Path], python: str | Path | None = None) -> list[Detection]:
    """Run the detector on every image (one worker process for all) -> one `Detection` each, in
    order. Raises `DetectorMissing` without the detector environment, `FaceHDError` when the
    worker itself fails."""
    images = [Path(p) for p in images]
    python = Path(python) if python is not None else detector_python()
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise DetectorMissing(python)
    if not images:
        return []
    if any("\n" in str(p) for p in images):
        raise InputError("image paths must not contain line breaks")
    env = {**os.environ, "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)  # the worker must not see facehd's environment
    timeout = STARTUP_TIMEOUT_S + PER_IMAGE_TIMEOUT_S * len(images)
    try:
        done = subprocess.run([str(python), str(WORKER)], input="".join(f"{p.resolve()}\n" for p in images),
                              capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise FaceHDError(f"the face detector ({python}) took longer than {timeout:.0f} s") from None
    except OSError as exc:
        raise FaceHDError(f"the face detector ({python}) cannot start: {exc.strerror or exc}") from None
    replies = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not replies or replies[-1] != {"done": True} or len(replies) != len(images) + 1:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        last = lines[-1].strip() if lines else f"exit status {done.returncode}"
        raise FaceHDError(f"the face detector ({python}) failed: {last}")
    detections = []
    for path, reply in zip(images, replies[:-1]):
        if "error" in reply:
            detections.append(Detection(path, None, reply["error"], reply.get("seconds", 0.0)))
            continue
        landmarks = mediapipe_to_ibug68(reply["points"])
        if landmarks.shape != (cv.N_LANDMARKS, 2) or not np.isfinite(landmarks).all():
            detections.append(Detection(path, None, "the detector returned no usable points"))
            continue
        detections.append(Detection(path, landmarks, None, reply.get("seconds", 0.0)))
    return detections


# ----------------------------------------------------------------------------------------------
# landmark files


@dataclass
class LandmarkFile:
    """What `write_detected_landmarks` did for one image: ``written``, ``kept`` (the file was there)
    or ``failed`` (``message`` says why)."""

    image: Path
    path: Path
    status: str
    message: str = ""


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Image files from files and folders (a folder contributes its .jpg / .jpeg / .png, sorted)."""
    from facehd.wild import IMAGE_SUFFIXES

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


def write_detected_landmarks(images: Sequence[str | Path], out: str | Path, *, overwrite: bool = False,
                             python: str | Path | None = None) -> list[LandmarkFile]:
    """Detect the 68 landmarks of each image and write ``out/<image stem>.txt`` (68 lines "x y",
    pixels, iBUG order: the format of `facehd.wild.write_landmarks`, atomically). Existing files
    are kept unless ``overwrite``. An image without a face is reported and the rest go on."""
    from facehd.wild import LANDMARK_SUFFIX, write_landmarks

    images = [Path(p) for p in images]
    stems = [p.stem for p in images]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise InputError(f"several images share the name(s) {', '.join(duplicates)}: outputs go to OUT/<name>.txt")
    results = [LandmarkFile(p, Path(out) / f"{p.stem}{LANDMARK_SUFFIX}", "written") for p in images]
    todo = [r for r in results if overwrite or not r.path.exists()]
    for r in results:
        if r not in todo:
            r.status = "kept"
    for r, found in zip(todo, detect_landmarks([r.image for r in todo], python)):
        if found.landmarks is None:
            r.status, r.message = "failed", f"{r.image}: {found.error}"
        else:
            write_landmarks(r.path, found.landmarks)
    return results


DETECTED_DIR = "detected_landmarks"  # under `hrn predict`'s OUT


def photo_landmark_folders(images: Sequence[Path], out: str | Path, crop_size: int,
                           python: str | Path | None = None) -> tuple[dict[Path, Path | None], dict[Path, str]]:
    """Where `hrn predict` without --landmarks finds each image's landmarks: ({image: folder
    holding <stem>.txt, or None for a pre-cropped crop_size x crop_size image}, {image: why it has
    none}). A <stem>.txt beside the image is used first; otherwise an image that is not a crop is
    given to the detector, whose landmarks go to ``out/detected_landmarks/<stem>.txt``."""
    from PIL import Image

    folders: dict[Path, Path | None] = {}
    problems: dict[Path, str] = {}
    wanted = []
    for path in images:
        if (path.parent / f"{path.stem}.txt").is_file():
            folders[path] = path.parent
            continue
        try:
            with Image.open(path) as image:
                size = image.size
        except (OSError, ValueError, SyntaxError):
            size = (crop_size, crop_size)  # not decodable: reading it for the crop reports why
        if size == (crop_size, crop_size):
            folders[path] = None
        else:
            wanted.append(path)
    if not wanted:
        return folders, problems
    python = Path(python) if python is not None else detector_python()
    if not (python.is_file() and os.access(python, os.X_OK)):
        for path in wanted:
            problems[path] = (f"{path}: no landmarks (no {path.stem}.txt beside it, no --landmarks, and no face "
                              f"detector): give --landmarks DIR, or {INSTALL_HINT}")
        return folders, problems
    target = Path(out) / DETECTED_DIR
    try:
        written = write_detected_landmarks(wanted, target, overwrite=True, python=python)
    except FaceHDError as exc:
        return folders, {**problems, **{path: f"{path}: {exc}" for path in wanted}}
    for result in written:
        if result.status == "failed":
            problems[result.image] = result.message
        else:
            folders[result.image] = target
    return folders, problems
