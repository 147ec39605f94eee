"""Accuracy and speed of the face-landmark detector (`facehd landmarks`, MediaPipe Face Mesh mapped to
iBUG 68) on synthetic in-the-wild renders with known landmarks: `python -m benchmarks.speed_landmarks`.

Errors are in pixels of the 224 x 224 network crop (the public preprocessing's scale, computed from the
true landmarks), per image then averaged; the jaw (iBUG 0-16, where MediaPipe's fixed surface points
and the render's keypoints are different vertices) is reported apart from the inner 51 points. Needs the
detector's environment (`bash scripts/setup.sh --detect`).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facehd.conventions import LANDMARKS7_IBUG
from facehd.landmarks_detect import DetectorMissing, detect_landmarks, detector_available
from facehd.wild import CROP_SIZE, crop_transform, template5_from_model

JAW = slice(0, 17)
INNER = slice(17, 68)
FRONTAL_YAW_DEG = 30.0  # the "near frontal" subset: |yaw| below this
YAW_INDEX = 225  # coefficient vector: angle = (pitch, yaw, roll) at 224..226


@dataclass
class LandmarkErrors:
    """Per-image results: mean error (pixels at 224) over all, jaw and inner points, or NaN when missed."""

    all_px: np.ndarray  # (N,)
    jaw_px: np.ndarray
    inner_px: np.ndarray
    yaw_deg: np.ndarray
    alignment_px: np.ndarray  # (N,) the 7 points the crop is computed from (eye corners, nose tip, mouth corners)
    offsets_px: np.ndarray  # (N, 68, 2) detected - true, crop pixels (NaN when missed)
    mirrored: np.ndarray  # (N,) bool: eyes 36 and 45 in the opposite image order from the truth's
    seconds: np.ndarray  # (N,) decoding and detection in the worker
    wall_s: float  # the whole call, worker start-up (importing mediapipe) included


def synthetic_renders(n_images: int, seed: int, image_size: int, occluders: float, workdir: Path):
    """Write ``n_images`` synthetic renders (PNG) to ``workdir``; (paths, renders, model)."""
    from facehd.synth.wild import _resolve_model, render_wild
    from facehd.wild import write_sample

    model, _ = _resolve_model(None, None, workdir)
    renders = render_wild(model, range(n_images), seed=seed, image_size=image_size, occluder_probability=occluders)
    paths = [write_sample(workdir, r.sample) for r in renders]
    return paths, renders, model


def measure(paths, renders, model) -> LandmarkErrors:
    template5 = template5_from_model(model)
    start = time.perf_counter()
    detections = detect_landmarks(paths)
    wall = time.perf_counter() - start
    n = len(paths)
    errors = {key: np.full(n, np.nan) for key in ("all", "jaw", "inner", "alignment")}
    offsets = np.full((n, 68, 2), np.nan)
    mirrored = np.zeros(n, bool)
    for i, (render, found) in enumerate(zip(renders, detections)):
        if found.landmarks is None:
            continue
        truth = render.sample.landmarks
        to_crop = crop_transform(truth, template5, CROP_SIZE)  # the crop the true landmarks give
        offsets[i] = to_crop.apply(found.landmarks) - to_crop.apply(truth)
        distance = np.linalg.norm(offsets[i], axis=1)
        errors["alignment"][i] = distance[list(LANDMARKS7_IBUG)].mean()
        errors["all"][i], errors["jaw"][i], errors["inner"][i] = (distance.mean(), distance[JAW].mean(),
                                                                  distance[INNER].mean())
        mirrored[i] = (found.landmarks[36, 0] < found.landmarks[45, 0]) != (truth[36, 0] < truth[45, 0])
    yaw = np.degrees([r.truth.coeffs[YAW_INDEX] for r in renders])
    return LandmarkErrors(errors["all"], errors["jaw"], errors["inner"], yaw, errors["alignment"], offsets, mirrored,
                          np.array([d.seconds for d in detections]), wall)


def _summary(name: str, e: LandmarkErrors, keep: np.ndarray) -> str:
    found = keep & np.isfinite(e.all_px)
    if not found.any():
        return f"{name}: {keep.sum()} images, none detected"
    # what is left once each point's mean offset is removed: the synthetic face's landmark design and
    # MediaPipe's differ systematically (brows, jaw, lips), which is not a detection error
    offsets = e.offsets_px[found]
    unbiased = np.linalg.norm(offsets - offsets.mean(axis=0), axis=2).mean()
    return (f"{name}: {found.sum()} of {keep.sum()} detected; mean error at 224: all "
            f"{np.mean(e.all_px[found]):.2f} px (median {np.median(e.all_px[found]):.2f}), inner 51 "
            f"{np.mean(e.inner_px[found]):.2f} px, jaw {np.mean(e.jaw_px[found]):.2f} px, the crop's 7 points "
            f"{np.mean(e.alignment_px[found]):.2f} px; all without each point's mean offset {unbiased:.2f} px; "
            f"mirrored {int(e.mirrored[found].sum())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--occluders", type=float, default=0.0, help="occluder probability of the renders")
    args = parser.parse_args()
    if not detector_available():
        raise SystemExit(str(DetectorMissing(Path(os.environ.get("FACEHD_DETECT_PYTHON", ".venv-detect/bin/python")))))
    with tempfile.TemporaryDirectory(prefix="speed-landmarks-") as tmp:
        paths, renders, model = synthetic_renders(args.images, args.seed, args.image_size, args.occluders, Path(tmp))
        e = measure(paths, renders, model)
    print(f"face detector on {args.images} synthetic renders ({args.image_size} px, seed {args.seed}, occluder "
          f"probability {args.occluders:g}, yaw within +-60 deg); {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(_summary("all poses", e, np.ones(len(paths), bool)))
    print(_summary(f"|yaw| < {FRONTAL_YAW_DEG:g} deg", e, np.abs(e.yaw_deg) < FRONTAL_YAW_DEG))
    print(_summary(f"|yaw| >= {FRONTAL_YAW_DEG:g} deg", e, np.abs(e.yaw_deg) >= FRONTAL_YAW_DEG))
    per_image = np.mean(e.seconds)
    print(f"time: {per_image * 1000:.0f} ms per image (decoding and detection), {e.wall_s:.1f} s for the whole call "
          f"including the worker's start-up ({e.wall_s - e.seconds.sum():.1f} s)")


if __name__ == "__main__":
    main()
