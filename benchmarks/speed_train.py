"""Seconds per HRN training iteration (L_self, L_super, discriminator update) for the small and the
paper-size configuration, at batch 1 on the CPU by default: `python -m benchmarks.speed_train`;
`--device cuda --batch-size 16` times a GPU (the renderer is nvdiffrast there when it is installed,
`--rasterizer torch` forces the PyTorch one)."""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from facehd.synth.wild import generate_wild
from hrn_baseline.config import Config, DataConfig, ModelConfig, TrainConfig
from hrn_baseline.model import load_hrn_morphable
from hrn_baseline.render.backends import BACKENDS
from hrn_baseline.train import Processes, Trainer

# the tests' input factories: a FaceHD-100-layout lab set with GT maps, made from wild images
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "hrn_baseline"))
from hrn_factory import make_lab_set  # noqa: E402

CONFIGS = {"small": ModelConfig.small(), "default": ModelConfig()}
WILD_IMAGES = 4


def _trainer(model: ModelConfig, folder: Path, batch_size: int, device: str) -> Trainer:
    wild = folder / "wild"
    generate_wild(wild, max(WILD_IMAGES, batch_size), model=load_hrn_morphable(model), image_size=model.image_size,
                  seed=0)
    lab_root, lab_derived = make_lab_set(folder / "lab", wild, subjects=max(2, math.ceil(batch_size / 2)))
    config = Config(data=DataConfig(wild=[str(wild)], lab_root=str(lab_root), lab_derived=str(lab_derived),
                                    lab_split=None, lab_views=[0, 4]),
                    model=model, train=TrainConfig(steps=1000, batch_size=batch_size, device=device,
                                                   out=str(folder / "run")))
    return Trainer(config.validate(), folder / "run", Processes())


def _timed(fn, iterations: int, sync) -> float:
    fn()  # warm-up: first-call allocations and lazy initialisation
    times = []
    for _ in range(iterations):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, iterations: int, batch_size: int = 1, device: str = "cpu",
            rasterizer: str = "auto") -> dict[str, float]:
    """Median seconds of each kind of iteration for configuration ``name``."""
    with tempfile.TemporaryDirectory(prefix="hrn-speed-") as tmp:
        trainer = _trainer(replace(CONFIGS[name], rasterizer=rasterizer), Path(tmp), batch_size, device)
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
        wild, lab = trainer.wild.next(), trainer.lab.next()
        fakes = []

        def self_iteration():
            fakes[:] = [trainer._generator_iteration(wild, supervised=False)[1]]

        def super_iteration():
            fakes.append(trainer._generator_iteration(lab, supervised=True)[1])

        return {
            "renderer": trainer.hrn.rasterizer_for(trainer.device).name,
            "L_self": _timed(self_iteration, iterations, sync),
            "L_super": _timed(super_iteration, iterations, sync),
            "discriminators": _timed(lambda: trainer._discriminator_iteration(lab, fakes[-2:]), iterations, sync),
            "step (all three)": _timed(trainer.train_step, iterations, sync),
        }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations after one warm-up")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--rasterizer", choices=["auto", *BACKENDS], default="auto")
    args = parser.parse_args(argv)
    gpu = f", {torch.cuda.get_device_name()}" if args.device != "cpu" and torch.cuda.is_available() else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads{gpu}, device {args.device}, "
          f"batch {args.batch_size}, median of {args.iterations}")
    for name in args.configs:
        m = CONFIGS[name]
        print(f"\n{name}: {m.backbone}, {m.image_size} px, maps {m.mid_map_size} / {m.high_map_size}, "
              f"generators ngf {m.mid_ngf} x {m.mid_blocks} blocks, SynthBFM {m.synth_resolution}")
        timings = measure(name, args.iterations, args.batch_size, args.device, args.rasterizer)
        print(f"  renderer: {timings.pop('renderer')}")
        for kind, seconds in timings.items():
            print(f"  {kind:<18} {seconds:8.3f} s/iteration")


if __name__ == "__main__":
    main()
