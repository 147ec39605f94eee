"""Speed of the rasterizers on a BFM-sized mesh: `python -m benchmarks.speed_render` (the PyTorch
back end on the CPU); `--device cuda` times it on a GPU, and `--backend nvdiffrast` the nvdiffrast
back end (a CUDA machine with nvdiffrast installed)."""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from facehd import conventions as cv
from hrn_baseline.render import TorchRasterizer, camera_to_clip, get_rasterizer, visibility_open3d, visibility_scatter
from hrn_baseline.render.backends import BACKENDS
from hrn_baseline.render.torch_backend import open3d_available

# BFM09 has 35,709 vertices and 70,789 triangles; a 189 x 189 grid has 35,721 and 70,688.
GRID = 189
HALF_WIDTH = 0.95  # model units: the face spans most of the 2.2-unit field of view at z_cam = 10
N_ATTRS = 3


def face_sized_mesh(grid: int = GRID, half_width: float = HALF_WIDTH, *, dtype=torch.float32, device=None):
    """A grid warped into a face-sized bump (a forehead-to-chin dome with a nose), in the camera frame.

    Returns (1, N, 3) camera-frame vertices (z = distance from the camera) and (F, 3) faces.
    """
    t = torch.linspace(-half_width, half_width, grid, dtype=dtype, device=device)
    y, x = torch.meshgrid(t, t, indexing="ij")
    dome = 0.6 * torch.exp(-(x**2 + 0.6 * y**2) / 0.4)
    nose = 0.2 * torch.exp(-(x**2 / 0.01 + (y + 0.1) ** 2 / 0.08))
    z = dome + nose
    vertices = torch.stack([x, y, cv.CAMERA_DISTANCE - z], dim=-1).reshape(1, -1, 3)
    idx = torch.arange(grid * grid, device=device).reshape(grid, grid)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    faces = torch.cat([torch.stack([a, b, d], -1).reshape(-1, 3), torch.stack([a, d, c], -1).reshape(-1, 3)])
    return vertices, faces


def _time_ms(fn, repeats: int, setup=None, sync=lambda: None) -> tuple[float, float, float]:
    """(mean wall, min wall, mean CPU) milliseconds of ``fn(setup())`` over ``repeats`` calls
    after a warm-up; ``setup`` runs untimed before each call, and ``sync`` waits for queued GPU
    work before and after each timed call. CPU time (all threads of this process) is immune to
    other processes competing for the cores; wall time is not."""
    setup = setup or (lambda: None)
    fn(setup())
    wall, cpu = [], []
    for _ in range(repeats):
        arg = setup()
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn(arg)
        sync()
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return statistics.fmean(wall), min(wall), statistics.fmean(cpu)


def benchmark(size: int, backend: str, visibility: str | None, repeats: int,
              device: torch.device) -> dict[str, tuple[float, float, float]]:
    """Timings (see `_time_ms`) of one frame: visibility (PyTorch back end), rasterize,
    interpolation, backward."""
    vertices, faces = face_sized_mesh(device=device)
    colours = torch.rand(1, vertices.shape[1], N_ATTRS, generator=torch.Generator().manual_seed(0)).to(device)
    raster = TorchRasterizer(visibility=visibility) if backend == "torch" else get_rasterizer(backend)
    clip = camera_to_clip(vertices, size).requires_grad_(True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward(_=None):
        fragments = raster.rasterize(clip, faces, size)
        return raster.interpolate(colours, fragments, faces)

    timings = {}
    if backend == "torch":
        visible_faces = {"scatter": visibility_scatter, "open3d": visibility_open3d}[visibility]

        def visibility_only(_):
            with torch.no_grad():
                visible_faces(clip, faces, (size, size))

        timings["visibility (no gradients)"] = _time_ms(visibility_only, repeats, sync=sync)
    timings.update({
        "rasterize": _time_ms(lambda _: raster.rasterize(clip, faces, size), repeats, sync=sync),
        f"interpolate {N_ATTRS} attributes (given fragments)": _time_ms(
            lambda frags: raster.interpolate(colours, frags, faces), repeats,
            setup=lambda: raster.rasterize(clip, faces, size), sync=sync),
        f"forward (rasterize + interpolate {N_ATTRS} attributes)": _time_ms(forward, repeats, sync=sync),
        "backward (to clip positions)": _time_ms(lambda image: image.sum().backward(), repeats, setup=forward,
                                                 sync=sync),
    })
    return timings


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="renderer back end (default: torch)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu, or cuda for nvdiffrast)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if args.backend == "nvdiffrast" else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.backend == "nvdiffrast":
        get_rasterizer("nvdiffrast")  # says what is missing, before any timing
    vertices, faces = face_sized_mesh()
    methods = ["scatter"] + (["open3d"] if open3d_available() and device.type == "cpu" else [])  # open3d: CPU rays
    if args.backend != "torch":
        methods = [None]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"mesh: {vertices.shape[1]} vertices, {faces.shape[0]} triangles; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads on {os.cpu_count()} cores (load average {load}){gpu}; "
          f"{args.repeats} runs after a warm-up")
    for size in args.sizes:
        for method in methods:
            title = f"{args.backend} on {device.type}" + (f", visibility={method}" if method else "")
            print(f"\n{size} x {size}, {title:38s} wall mean    wall min    CPU mean")
            for name, (mean, best, cpu) in benchmark(size, args.backend, method, args.repeats, device).items():
                print(f"  {name:46s} {mean:7.1f} ms  {best:7.1f} ms  {cpu:7.1f} ms")


if __name__ == "__main__":
    main()
