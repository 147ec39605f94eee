"""Shared test helpers: one `assert_close` that says how large the worst difference is and where."""

from __future__ import annotations

import numpy as np
import torch


def assert_close(actual, expected, *, atol: float = 1e-6, rtol: float = 1e-5, msg: str = "") -> None:
    """Assert two arrays / tensors are close, reporting the largest difference and its index."""
    a = actual.detach().cpu().double().numpy() if torch.is_tensor(actual) else np.asarray(actual, dtype=float)
    e = expected.detach().cpu().double().numpy() if torch.is_tensor(expected) else np.asarray(expected, dtype=float)
    assert a.shape == e.shape, f"{msg} shape {a.shape} != expected {e.shape}"
    diff = np.abs(a - e)
    tol = atol + rtol * np.abs(e)
    bad = ~(diff <= tol)
    if bad.any():
        idx = np.unravel_index(np.argmax(np.where(bad, diff - tol, -np.inf)), a.shape)
        raise AssertionError(
            f"{msg} {int(bad.sum())} of {a.size} values differ; worst at {tuple(int(i) for i in idx)}: "
            f"actual {a[idx]!r} expected {e[idx]!r} (|diff| {diff[idx]:.3g}, tol {tol[idx]:.3g})"
        )
