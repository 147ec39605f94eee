"""Speed and accuracy of scan alignment and ground-truth detail maps on the synthetic FaceHD-100.

Run `python -m benchmarks.speed_gt_maps [--subjects N] [--expressions E]`: it generates a small
dataset with `facehd synth facehd`'s generator at its default resolution (SynthBFM 180, 256^2 maps),
aligns every capture, fits its maps, and measures them against the generator's truth: seconds per
capture and per view, the detailed surface's RMS distance to the true surface (mm), the
displacement's correlation with the true high-frequency field and the deformation map's with the
true mid-frequency field.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from facehd.align import ModelSource, align_scan, aligned_face_points, model_shape
from facehd.capture import N_VIEWS, find_captures, read_landmarks7
from facehd.detail import compare_with_truth, fit_gt_maps
from facehd.io import load_mesh
from facehd.masks import model_masks

IMAGE_SIZE = 64  # the views are not used here; small images keep generation quick
# The noise-limited reference: the truth's displacement plus white noise of the scanner's sigma
# averaged over the scan vertices that fall on one texel (`texel_noise_mm`), smoothed by the best
# of these Gaussians.
REFERENCE_SIGMAS_TEXELS = (0.5, 0.7, 0.9, 1.1, 1.4, 1.8)


def generate(out: Path, subjects: int, expressions: int, noise_mm: float | None = None) -> Path:
    """A synthetic FaceHD-100 at the generator's defaults; `noise_mm` overrides its scanner noise."""
    import facehd.synth.scan as scan_module
    from facehd.synth.facehd import SynthConfig, generate_facehd

    saved = scan_module.SCAN_NOISE_MM
    if noise_mm is not None:
        scan_module.SCAN_NOISE_MM = noise_mm  # read by synth_scan at call time
    try:
        generate_facehd(SynthConfig(out=out, n_subjects=subjects, n_expressions=expressions, seed=0,
                                    image_size=IMAGE_SIZE, overwrite=True))
    finally:
        scan_module.SCAN_NOISE_MM = saved
    return out


@contextlib.contextmanager
def timer(times: dict, key: str):
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    times[key] = (time.perf_counter() - wall, time.process_time() - cpu)


def texel_noise_mm() -> float:
    """The generator's scanner noise per displacement texel: SCAN_NOISE_MM over the square root of
    the SCAN_SAMPLES_PER_CELL^2 scan vertices that fall on each texel."""
    import facehd.synth.scan as scan_module

    return scan_module.SCAN_NOISE_MM / scan_module.SCAN_SAMPLES_PER_CELL


def noise_limited_correlation(displacement: np.ndarray, valid: np.ndarray, noise_mm: float, seed: int = 0) -> float:
    """Best correlation a Gaussian filter reaches on the true displacement plus white noise of
    `noise_mm` per texel (see `texel_noise_mm`): a reference for the displacement correlation,
    not a bound."""
    d = displacement[0].astype(np.float64) * 100.0
    noisy = d + np.random.default_rng(seed).normal(0.0, noise_mm, d.shape)
    return max(float(np.corrcoef(gaussian_filter(noisy, s)[valid], d[valid])[0, 1]) for s in REFERENCE_SIGMAS_TEXELS)


def run(root: Path, model, use_truth_coeffs: bool) -> list[dict]:
    rows = []
    for ref in find_captures(root):
        truth = dict(np.load(root / "_truth" / ref.subject / ref.expression / "truth.npz"))
        scan = load_mesh(ref.paths.scan).vertices
        landmarks = read_landmarks7(ref.paths.landmarks7)
        times: dict = {}
        with timer(times, "align"):
            coeffs = truth["coeffs"] if use_truth_coeffs else None
            alignment = align_scan(scan, landmarks, model, coeffs=coeffs, coeffs_source="truth")
        with timer(times, "maps"):
            points, labels = aligned_face_points(scan, alignment, model)
            masks = model_masks(model, model_shape(model, alignment.coeffs))
            maps = fit_gt_maps(model, alignment.coeffs, points[labels.keep], masks=masks)
        result = compare_with_truth(model, maps, alignment.scan_to_model, truth)
        rows.append({"capture": f"{ref.subject}/{ref.expression}", "times": times, "result": result,
                     "residual_mm": maps.residual_rms_mm, "truth": truth})
    return rows


def report(title: str, rows: list[dict], noise_mm: float | None) -> None:
    print(f"\n{title}")
    print(f"{'capture':16s} {'align s':>8s} {'maps s':>7s} {'s/view':>7s} {'surface RMS mm':>15s} "
          f"{'p95 mm':>7s} {'corr':>6s} {'corr texel':>10s} {'def corr':>8s} {'residual mm':>11s}"
          + ("" if noise_mm is None else f" {'noise ref':>9s}"))
    for row in rows:
        align_s, maps_s = row["times"]["align"][0], row["times"]["maps"][0]
        r = row["result"]
        line = (f"{row['capture']:16s} {align_s:8.2f} {maps_s:7.2f} {(align_s + maps_s) / N_VIEWS:7.2f} "
                f"{r.surface_rms_mm:15.4f} {r.surface_p95_mm:7.4f} {r.displacement_corr:6.3f} "
                f"{r.displacement_corr_texel:10.3f} {r.deformation_corr:8.3f} {row['residual_mm']:11.4f}")
        if noise_mm is not None:
            truth = row["truth"]
            line += f" {noise_limited_correlation(truth['displacement_map'], truth['valid_mask_256'], noise_mm):9.3f}"
        print(line)
    walls = np.array([[row["times"][k][0] for k in ("align", "maps")] for row in rows])
    cpus = np.array([[row["times"][k][1] for k in ("align", "maps")] for row in rows])
    results = [row["result"] for row in rows]
    print(f"mean: align {walls[:, 0].mean():.2f} s + maps {walls[:, 1].mean():.2f} s per capture "
          f"(CPU {cpus.sum(axis=1).mean():.2f} s): {walls.sum(axis=1).mean() / N_VIEWS:.2f} s per view when one "
          f"fit serves the {N_VIEWS} views, at most {walls[:, 1].max():.2f} s per view with per-image "
          f"coefficient files (one fit each; target <= 10 s per view)")
    print(f"mean: surface RMS {np.mean([r.surface_rms_mm for r in results]):.4f} mm (target <= 0.1), "
          f"displacement corr {np.mean([r.displacement_corr for r in results]):.3f} at the same surface points, "
          f"{np.mean([r.displacement_corr_texel for r in results]):.3f} at the same texels (target >= 0.9); "
          f"deformation corr {np.mean([r.deformation_corr for r in results]):.3f} "
          f"(min {np.min([r.deformation_corr for r in results]):.3f}; target >= 0.6)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=2)
    parser.add_argument("--expressions", type=int, default=2)
    parser.add_argument("--no-clean", action="store_true", help="skip the noise-free reference run")
    args = parser.parse_args()
    import facehd.synth.scan as scan_module

    noise_mm = scan_module.SCAN_NOISE_MM
    per_texel_mm = texel_noise_mm()
    model = ModelSource().load()
    with tempfile.TemporaryDirectory(prefix="facehd-bench-") as tmp:
        start = time.perf_counter()
        root = generate(Path(tmp) / "noisy", args.subjects, args.expressions)
        print(f"generated {args.subjects} x {args.expressions} captures in {time.perf_counter() - start:.1f} s "
              f"(SynthBFM resolution {ModelSource().resolution}, scanner noise {noise_mm} mm per vertex, "
              f"{scan_module.SCAN_SAMPLES_PER_CELL ** 2} vertices per texel: {per_texel_mm:.3f} mm per texel)")
        report("coefficients from the truth (--coeffs ROOT/_truth)", run(root, model, True), per_texel_mm)
        report("coefficients fitted (no --coeffs, the default of facehd gt-maps)", run(root, model, False),
               per_texel_mm)
        if not args.no_clean:
            clean = generate(Path(tmp) / "clean", args.subjects, args.expressions, noise_mm=0.0)
            report("noise-free scans, coefficients from the truth (the method's own limit)",
                   run(clean, model, True), None)


if __name__ == "__main__":
    main()
