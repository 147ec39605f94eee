"""Small synthetic inputs shared by the tests and the speed benchmarks."""

from __future__ import annotations

import numpy as np

from facehd import conventions as cv

GRID = 6  # tiny model: a 6 x 6 vertex sheet


def tiny_fields(seed: int = 0) -> dict:
    """Raw BFM_model_front.mat fields (1-based) of a small random sheet mesh."""
    rng = np.random.default_rng(seed)
    ii, jj = np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="ij")
    verts = np.stack([jj.ravel() * 0.1, ii.ravel() * 0.1, 0.05 * rng.standard_normal(GRID * GRID)], 1)
    verts += 0.3  # off-centre on purpose: the loader recentres
    n = len(verts)
    faces = []
    for r in range(GRID - 1):
        for c in range(GRID - 1):
            a, b, d, e = r * GRID + c, r * GRID + c + 1, (r + 1) * GRID + c, (r + 1) * GRID + c + 1
            faces += [(a, b, e), (a, e, d)]
    faces = np.array(faces)
    nf = len(faces)
    point_buf = np.full((n, 8), nf + 1)
    for v in range(n):
        inc = np.nonzero((faces == v).any(1))[0][:8]
        point_buf[v, : len(inc)] = inc + 1
    front = np.arange(7, 29)  # 0-based vertices of a "front" region
    local = {v: k for k, v in enumerate(front)}
    tri_mask2 = np.array([[local[v] for v in f] for f in faces if all(v in local for v in f)])
    return {
        "meanshape": verts.reshape(1, -1),
        "idBase": 0.01 * rng.standard_normal((3 * n, cv.N_ID)),
        "exBase": 0.01 * rng.standard_normal((3 * n, cv.N_EXP)),
        "meantex": rng.uniform(50, 200, (1, 3 * n)),
        "texBase": rng.standard_normal((3 * n, cv.N_TEX)),
        "tri": faces + 1,
        "point_buf": point_buf,
        "keypoints": (np.arange(cv.N_LANDMARKS) % n + 1).reshape(1, -1),
        "frontmask2_idx": (front + 1).reshape(-1, 1),
        "tri_mask2": tri_mask2 + 1,
        "skinmask": (np.arange(n) % 2).reshape(1, -1),
    }
