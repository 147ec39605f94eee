"""Speed of the geometry kernels on face-sized inputs: closest points, similarity ICP, rigid ICP.

Run `python -m benchmarks.speed_kernels`; it makes its own synthetic height-field meshes (mm).
"""

from __future__ import annotations

import time

import numpy as np
from scipy.spatial.transform import Rotation

from facehd.distance import SurfaceIndex
from facehd.icp import MICC_TOL_MM, rigid_icp, similarity_icp
from facehd.procrustes import Similarity

FACE_SIZE_MM = 200.0  # the height field spans [-100, 100] mm in x and y
GRID_80K = 200  # 200 x 200 vertices -> 79,202 triangles, the DESIGN section 10 query size
GRID_35K = 189  # 189 x 189 = 35,721 vertices, about real BFM's 35,709
N_QUERIES = 50_000
N_CLOUD = 100_000
SIMILARITY_MAX_ITER = 50  # keeps the closest-point start to a few seconds
MICC_RADIUS_MM = 95.0  # MICC mask: vertices within 95 mm of the nose tip (DESIGN section 8)
# (centre x, centre y, height, width) in units of the half size: nose, eye sockets, mouth, brow
BUMPS = [(0.0, 0.0, 0.35, 0.18), (-0.4, 0.35, -0.12, 0.15), (0.4, 0.35, -0.12, 0.15),
         (0.0, -0.5, 0.1, 0.2), (0.0, 0.7, 0.08, 0.35)]


def face_mesh(n: int) -> tuple[np.ndarray, np.ndarray]:
    """An n x n vertex face-like height field in mm: (n^2, 3) vertices, (2 (n-1)^2, 3) faces."""
    t = np.linspace(-1.0, 1.0, n)
    x, y = (a.ravel() for a in np.meshgrid(t, t))
    z = sum(h * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * w * w)) for cx, cy, h, w in BUMPS)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    return np.stack([x, y, z], 1) * (FACE_SIZE_MM / 2), faces


def sample_surface(vertices: np.ndarray, faces: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Area-weighted uniform random points on the triangles."""
    tri = vertices[faces]
    area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    pick = rng.choice(len(faces), count, p=area / area.sum())
    u, v = rng.random(count), rng.random(count)
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    t = tri[pick]
    return t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def bench_closest_points(rng: np.random.Generator) -> None:
    vertices, faces = face_mesh(GRID_80K)
    n_near, n_mid = N_QUERIES // 2, N_QUERIES // 4
    # near: a scan's points around the model; mid: tens of mm off a flat-ish surface, the slow case
    # (the search sphere overlaps much of the mesh); far: beyond the face's size.
    sets = {
        "near": sample_surface(vertices, faces, n_near, rng) + rng.normal(0.0, 2.0, (n_near, 3)),
        "mid": rng.uniform(-FACE_SIZE_MM / 2, FACE_SIZE_MM / 2, (n_mid, 3)),
        "far": rng.uniform(-3 * FACE_SIZE_MM, 3 * FACE_SIZE_MM, (N_QUERIES - n_near - n_mid, 3)),
    }
    queries = np.concatenate(list(sets.values()))
    index, build_s = timed(SurfaceIndex, vertices, faces)
    _, all_s = timed(index.closest, queries)
    parts = ", ".join(f"{len(q):,} {name} {timed(index.closest, q)[1]:.3f} s" for name, q in sets.items())
    _, plane_s = timed(index.point_to_plane, sets["near"])
    print(f"closest points, {len(faces):,} triangles: index {build_s:.3f} s; {len(queries):,} queries "
          f"{all_s:.3f} s ({parts}); point-to-plane of the near set {plane_s:.3f} s")


def bench_similarity_icp(rng: np.random.Generator) -> None:
    target, faces = face_mesh(GRID_35K)
    truth = Similarity(1.1, Rotation.from_euler("xyz", [4, -6, 3], degrees=True).as_matrix(), [3.0, -2.0, 4.0])
    src = truth.inverse().apply(target) + rng.normal(0.0, 0.3, target.shape)  # 0.3 mm noise
    nose_tip = src[np.argmax(target[:, 2])]
    mask = np.linalg.norm(src - nose_tip, axis=1) < MICC_RADIUS_MM
    # The protocol's start (same-index vertices), and a start from closest points that needs
    # many small steps: the cost per iteration is what matters there.
    starts = {"same-index start": target, "closest-point start": None}
    for name, corr in starts.items():
        result, seconds = timed(similarity_icp, src, mask, target, faces, init_correspondences=corr,
                                tol=MICC_TOL_MM, max_iter=SIMILARITY_MAX_ITER)
        k = len(result.history)
        print(f"similarity ICP (MICC loop, {name}), {len(src):,} vertices ({int(mask.sum()):,} masked), "
              f"{len(faces):,} triangles: {seconds:.3f} s, {k} iterations ({seconds / k:.3f} s each), "
              f"mean {result.history[-1]:.4f} mm")


def bench_rigid_icp(rng: np.random.Generator) -> None:
    target, faces = face_mesh(GRID_80K)
    pose = Similarity(1.0, Rotation.from_euler("xyz", [3, -5, 2], degrees=True).as_matrix(), [4.0, -3.0, 5.0])
    cloud = pose.inverse().apply(sample_surface(target, faces, N_CLOUD, rng))
    schedule_mm = (10.0, 4.0, 2.0)
    result, seconds = timed(rigid_icp, cloud, target, faces, max_distances=schedule_mm)
    angle = np.degrees(Rotation.from_matrix(result.transform.rotation @ pose.rotation.T).magnitude())
    print(f"rigid point-to-plane ICP, {N_CLOUD:,} points onto {len(target):,} vertices, schedule "
          f"{schedule_mm} mm: {seconds:.3f} s, fitness {result.fitness:.3f}, rotation error {angle:.2e} deg")


def main() -> None:
    rng = np.random.default_rng(0)
    bench_closest_points(rng)
    bench_similarity_icp(rng)
    bench_rigid_icp(rng)


if __name__ == "__main__":
    main()
