"""Accuracy and speed of MV-HRN (`hrn mv`) on the synthetic FaceHD-100.

Run `python -m benchmarks.speed_mv [--root ROOT] [--captures N] [--threads T]`: without --root it
generates a small dataset with `facehd synth facehd`'s generator (224-pixel views, SynthBFM 180).
For every capture it fits each of the 9 views alone, views 0-2 and all 9 views (calibrated, from
the mean face, the default iterations), and measures the fused mid mesh against the generator's
true surface: the mean point-to-surface distance (mm) after a similarity alignment on the model's
vertices; and the fused displacement map's correlation with the true one beside the best single
view map's of the same fit. It also times the 9-view fit (wall and CPU seconds, torch threads).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from facehd import conventions as cv
from facehd.capture import CAMERA_NAMES, find_captures
from facehd.distance import point_to_surface
from facehd.procrustes import fit_similarity
from facehd.synth.facehd import read_truth, truth_path
from facehd.uv import sample_uv_map
from hrn_baseline.fuse import fuse
from hrn_baseline.model import HRN
from hrn_baseline.mv import MVConfig, fit_multiview
from hrn_baseline.mv_inputs import read_capture_views
from hrn_baseline.mv_run import load_mv_model
from hrn_baseline.preprocess import standard_landmarks

IMAGE_SIZE = 224
VIEW_SETS = {"3 views": ("cam0", "cam1", "cam2"), "9 views": tuple(CAMERA_NAMES)}
MAX_RATIO = 0.8  # 9 views must be at most this times the median single-view error


def generate(out: Path, captures: int) -> Path:
    from facehd.synth.facehd import SynthConfig, generate_facehd

    generate_facehd(SynthConfig(out=out, n_subjects=captures, n_expressions=1, seed=0, image_size=IMAGE_SIZE,
                                overwrite=True))
    return out


def face_vertices(model: HRN) -> np.ndarray:
    """Vertices scored: the face without the hair band (where the model has region labels)."""
    region = getattr(model.morphable, "region", None)
    if region is None:
        return np.arange(model.morphable.n_vertices)
    return np.flatnonzero(region.cpu().numpy() != cv.REGION_CODES["hair_band"])


def true_mid(model: HRN, truth: dict) -> np.ndarray:
    """(V, 3) the true M1 (model units): the true id + exp shape plus the true deformation."""
    from facehd.morphable import compute_shape

    mm = model.morphable
    c = torch.as_tensor(truth["coeffs"], dtype=torch.float64)[None]
    m0 = compute_shape(mm.to(dtype=torch.float64), c[:, cv.COEFF_SLICES["id"]], c[:, cv.COEFF_SLICES["exp"]])
    deformation = torch.as_tensor(truth["deformation_map"], dtype=torch.float64)
    return (m0 + sample_uv_map(deformation, mm.uv.double()))[0].numpy()


def mid_error_mm(model: HRN, mid: np.ndarray, truth: dict, scored: np.ndarray) -> float:
    """Mean distance (mm) of the fused mid mesh's scored vertices, similarity-aligned to the true
    mid mesh by their correspondence, to the true detailed surface."""
    target = true_mid(model, truth)
    transform = fit_similarity(mid[scored], target[scored])
    distances = point_to_surface(transform.apply(mid[scored]), truth["surface_vertices"], truth["surface_faces"])
    return float(np.mean(distances) * cv.MM_PER_MODEL_UNIT)


def correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    x, y = a[mask] - a[mask].mean(), b[mask] - b[mask].mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


@dataclass
class CaptureResult:
    name: str
    single_mm: list[float]
    set_mm: dict[str, float]
    fused_corr: float
    best_view_corr: float
    seconds_wall: float
    seconds_cpu: float


def run_capture(model: HRN, directory: Path, truth: dict, config: MVConfig) -> CaptureResult:
    standard68 = standard_landmarks(model.morphable)
    scored = face_vertices(model)
    views = read_capture_views(directory, standard68, model.image_size).views
    by_name = {v.name: v for v in views}
    single = []
    for view in views:
        fit = fit_multiview(model, [view], config)
        single.append(mid_error_mm(model, fuse(model, fit, "mean").mid.double().numpy(), truth, scored))
    set_mm, fused_corr, best_corr, wall, cpu = {}, 0.0, 0.0, 0.0, 0.0
    for label, names in VIEW_SETS.items():
        chosen = [by_name[n] for n in names if n in by_name]
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        fit = fit_multiview(model, chosen, config)
        fused = fuse(model, fit, "mean")
        if label == "9 views":
            wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
            true_disp = truth["displacement_map"][0]
            mask = fused.valid.cpu().numpy()
            fused_corr = correlation(fused.displacement[0].cpu().numpy(), true_disp, mask)
            best_corr = max(correlation(d[0].cpu().numpy(), true_disp, mask) for d in fit.state.displacement)
        set_mm[label] = mid_error_mm(model, fused.mid.double().numpy(), truth, scored)
    return CaptureResult(directory.relative_to(directory.parents[1]).as_posix(), single, set_mm, fused_corr,
                         best_corr, wall, cpu)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="a synthetic FaceHD-100 root (with _truth/)")
    parser.add_argument("--captures", type=int, default=2, help="captures to generate / use")
    parser.add_argument("--skip", type=int, default=0, help="captures of ROOT to skip first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--iterations", type=int, default=None, help="fit iterations (default: the config's, 50)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = MVConfig(device=args.device, **({"iterations": args.iterations} if args.iterations is not None else {}))
    with contextlib.ExitStack() as stack:
        root = args.root
        if root is None:
            root = generate(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "facehd", args.captures)
        model = load_mv_model(None, None, args.device)
        results = []
        for ref in find_captures(root)[args.skip:args.skip + args.captures]:
            truth = read_truth(truth_path(root, ref.subject, ref.expression))
            results.append(run_capture(model, ref.directory, truth, config))
            r = results[-1]
            print(f"{r.name}: single views {np.median(r.single_mm):.3f} mm median "
                  f"({' '.join(f'{e:.2f}' for e in r.single_mm)}), "
                  + ", ".join(f"{k} {v:.3f} mm" for k, v in r.set_mm.items())
                  + f"; displacement correlation fused {r.fused_corr:.3f}, best view {r.best_view_corr:.3f}; "
                  f"9-view fit {r.seconds_wall:.1f} s wall, {r.seconds_cpu:.1f} s CPU", flush=True)
    single = np.median([np.median(r.single_mm) for r in results])
    nine = np.mean([r.set_mm["9 views"] for r in results])
    three = np.mean([r.set_mm["3 views"] for r in results])
    print(f"\nfused mid mesh to the true surface (mean point-to-surface, mm, similarity-aligned), "
          f"{len(results)} captures, {config.iterations} iterations, torch threads {torch.get_num_threads()}:")
    print(f"  1 view (median over views) {single:.3f}   3 views {three:.3f}   9 views {nine:.3f}   "
          f"ratio 9 / 1 = {nine / single:.2f} (must be <= {MAX_RATIO}: "
          f"{'PASS' if nine <= MAX_RATIO * single else 'FAIL'})")
    print(f"  displacement correlation with the truth: fused {np.mean([r.fused_corr for r in results]):.3f}, "
          f"best single view map {np.mean([r.best_view_corr for r in results]):.3f}")
    print(f"  9 views at {IMAGE_SIZE} px: {np.mean([r.seconds_wall for r in results]):.1f} s wall, "
          f"{np.mean([r.seconds_cpu for r in results]):.1f} s CPU per capture (target <= 60 s on 2 CPU cores)")


if __name__ == "__main__":
    main()
