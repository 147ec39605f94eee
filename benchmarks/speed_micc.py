"""Speed of the MICC evaluation on the synthetic benchmark: generation, cold registration, then the
protocol over the whole set (53 subjects x 3 settings, both directions) per reference method.

Run: `python -m benchmarks.speed_micc [--subjects 53] [--workers 1,2] [--cache DIR]`.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

BUDGET_S = 60.0  # issue 5: the whole synthetic set, registration cached, within a minute on 2 cores


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished worker processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class _Clock:
    """Wall and CPU seconds of the last `run`: on a shared machine the CPU time is the steadier figure."""

    def run(self, fn):
        start, cpu = time.perf_counter(), _cpu_seconds()
        value = fn()
        self.wall, self.cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        return value

    def __str__(self) -> str:
        return f"{self.wall:6.1f} s wall, {self.cpu:6.1f} s CPU"


def main(argv: list[str] | None = None) -> None:
    from benchmarks import micc, synthetic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=synthetic.MICC_N_SUBJECTS)
    parser.add_argument("--workers", default="1,2", help="comma-separated process counts to time")
    parser.add_argument("--cache", type=Path, default=None, help="keep the benchmark here (default: a temp dir)")
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]

    clock = _Clock()
    with tempfile.TemporaryDirectory(prefix="speed_micc_") as tmp:
        root = args.cache or Path(tmp)
        print(f"synthetic MICC: {args.subjects} subjects x 3 settings x 2 frontal scans; {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}")
        where = clock.run(lambda: synthetic.ensure_synthetic_micc(root / "synthetic", n_subjects=args.subjects,
                                                                  workers=max(counts)))
        layout = synthetic.SyntheticMicc(where)
        print(f"  generate benchmark (workers={max(counts)}, skipped if cached): {clock}")
        template = micc.load_template(layout.template)
        gt = micc.find_ground_truth(layout.gt_dir)
        scans = [s for name in gt.scans for s in gt.scans[name]]
        print(f"  template: {template.n_vertices} vertices, {len(template.faces)} faces; {len(scans)} scans")

        registration = root / f"registration-{time.time_ns()}"  # always cold here
        results = clock.run(lambda: micc.register_scans(scans, template, cache_dir=registration, workers=max(counts)))
        failed = sum(isinstance(r, str) for r in results)
        print(f"  register ground truth, cold cache (workers={max(counts)}): {clock} "
              f"({clock.wall / len(scans):.2f} s per scan, {failed} failed)")
        clock.run(lambda: micc.register_scans(scans, template, cache_dir=registration))
        print(f"  register ground truth, warm cache: {clock}")

        methods = {m: layout.predictions(m) for m in synthetic.REFERENCE_METHODS}
        for workers in counts:
            wall = cpu = 0.0
            for method, directory in methods.items():
                result = clock.run(lambda d=directory, m=method, w=workers: micc.evaluate_micc(
                    layout.gt_dir, {m: d}, template, cache_dir=registration, workers=w))
                wall, cpu = wall + clock.wall, cpu + clock.cpu
                pairs = sum(len(s.scan_scores_mm) for s in result.scores)
                verdict = "within" if clock.wall <= BUDGET_S else "OVER"
                print(f"  evaluate {method:14s} workers={workers}: {clock} for {pairs} GT/prediction pairs, "
                      f"both directions ({1e3 * clock.wall / max(pairs, 1):.0f} ms per pair; {verdict} the "
                      f"{BUDGET_S:.0f} s budget)")
            print(f"  evaluate all three methods, workers={workers}: {wall:6.1f} s wall, {cpu:6.1f} s CPU")
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
