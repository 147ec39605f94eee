"""Speed of the synthetic FaceHD-100 generator against its target (issue 3: 10 subjects x 2 expressions
x 9 views at 512 px in at most 2 minutes on 2 cores): `python -m benchmarks.speed_synth`."""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from facehd.synth.facehd import SynthConfig, generate_facehd

TARGET_S = 120.0  # issue 3
DEFAULT_SUBJECTS, DEFAULT_EXPRESSIONS, DEFAULT_IMAGE_SIZE = 10, 2, 512


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (worker processes), all threads."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(n_subjects: int, n_expressions: int, image_size: int, workers: int, model_resolution: int | None) -> dict:
    """Generate one dataset in a temporary folder; wall and CPU seconds and the counts."""
    extra = {} if model_resolution is None else {"model_resolution": model_resolution}
    with tempfile.TemporaryDirectory(prefix="speed-synth-") as tmp:
        config = SynthConfig(out=Path(tmp) / "facehd", n_subjects=n_subjects, n_expressions=n_expressions,
                             image_size=image_size, workers=workers, **extra)
        start, start_cpu = time.perf_counter(), _cpu_seconds()
        summary = generate_facehd(config)
        wall, cpu = time.perf_counter() - start, _cpu_seconds() - start_cpu
    return {"wall_s": wall, "cpu_s": cpu, "captures": summary.captures, "images": summary.images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subjects", type=int, default=DEFAULT_SUBJECTS)
    parser.add_argument("--expressions", type=int, default=DEFAULT_EXPRESSIONS)
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time, in turn")
    parser.add_argument("--model-resolution", type=int, default=None, help="SynthBFM resolution (default: generator's)")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    print(f"synthetic FaceHD-100: {args.subjects} subjects x {args.expressions} expressions x 9 views at "
          f"{args.image_size} px; {os.cpu_count()} CPUs, load average {load:.1f} at start")
    print("(wall time includes building SynthBFM once; CPU time sums all threads and worker processes, so it")
    print(" is what other processes on the machine cannot inflate)")
    for workers in args.workers:
        r = run(args.subjects, args.expressions, args.image_size, workers, args.model_resolution)
        verdict = "PASS" if r["wall_s"] <= TARGET_S else "FAIL"
        print(f"workers {workers}: {r['wall_s']:.1f} s wall ({r['wall_s'] / r['captures']:.2f} s per capture, "
              f"{r['images']} images), {r['cpu_s']:.1f} s CPU; target {TARGET_S:.0f} s wall: {verdict}")


if __name__ == "__main__":  # the worker processes are spawned and re-import this module
    main()
