"""Figures for benchmark results: a per-vertex error heat map on a mesh (frontal view) and a bar
chart of a results table. Plain matplotlib on the Agg canvas, written atomically as PNG."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.collections import PolyCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from facehd.distance import as_faces, as_points
from facehd.errors import InputError
from facehd.fsutil import atomic_path

HEATMAP_CMAP = "inferno"
NO_DATA_RGBA = (0.82, 0.82, 0.82, 1.0)  # faces outside the measured region
HEATMAP_VMAX_PERCENTILE = 99.0  # the colour scale ignores the worst 1% so one spike does not flatten it
PUBLISHED_GREYS = ("0.45", "0.55", "0.65", "0.75", "0.85")
EVALUATED_CMAP = "tab10"
DPI = 120


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return path


def plot_error_heatmap(vertices, faces, errors_mm, path: str | Path, title: str, *,
                       vmax_mm: float | None = None) -> Path:
    """Draw a mesh seen from the front (+z looks at the viewer, y up) coloured by per-vertex error.

    vertices (N, 3) in any units (only the shape is drawn), faces (F, 3), errors_mm (N,) with NaN
    where nothing was measured (drawn grey). Faces are painted back to front by mean depth and
    coloured by the mean error of their corners; the colour bar is in mm, up to `vmax_mm`
    (default: the 99th percentile). Returns the PNG path.
    """
    v = as_points(vertices, "heat-map vertices")
    f = as_faces(faces, len(v), "heat-map faces")
    err = np.asarray(errors_mm, dtype=np.float64).reshape(-1)
    if err.shape != (len(v),):
        raise InputError(f"errors_mm: expected {len(v)} per-vertex values, got {err.shape}")
    finite = err[np.isfinite(err)]
    if vmax_mm is None:
        vmax_mm = float(np.percentile(finite, HEATMAP_VMAX_PERCENTILE)) if finite.size else 1.0
    norm = Normalize(vmin=0.0, vmax=max(vmax_mm, 1e-9))
    order = np.argsort(v[f, 2].mean(axis=1))  # painter's algorithm: far faces first
    face_err = err[f].mean(axis=1)[order]
    fig = Figure(figsize=(5.0, 6.0))
    ax = fig.add_subplot()
    cmap = fig.colorbar(ScalarMappable(norm=norm, cmap=HEATMAP_CMAP), ax=ax, label="error (mm)", shrink=0.8).cmap
    colours = np.where(np.isfinite(face_err)[:, None], cmap(norm(np.nan_to_num(face_err))), NO_DATA_RGBA)
    # edges painted in the face colour hide the hairline seams antialiasing leaves between polygons
    ax.add_collection(PolyCollection(v[f[order]][:, :, :2], facecolors=colours, edgecolors=colours, linewidths=0.3))
    ax.set_xlim(v[:, 0].min(), v[:, 0].max())
    ax.set_ylim(v[:, 1].min(), v[:, 1].max())
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _means_and_errors(df: pd.DataFrame) -> tuple[list[str], pd.DataFrame, pd.DataFrame | None]:
    """Groups (settings or regions), their means and stds from a (group, stat) or flat table."""
    if isinstance(df.columns, pd.MultiIndex):
        groups = list(dict.fromkeys(df.columns.get_level_values(0)))
        stats = set(df.columns.get_level_values(1))
        if "mean" not in stats:
            raise InputError(f"table columns have no 'mean' statistic (found {sorted(stats)})")
        means = pd.DataFrame({g: df[(g, "mean")] for g in groups})
        stds = pd.DataFrame({g: df[(g, "std")] for g in groups}) if "std" in stats else None
        return groups, means.astype(float), None if stds is None else stds.astype(float)
    return [str(c) for c in df.columns], df.astype(float).set_axis([str(c) for c in df.columns], axis=1), None


def plot_table_bars(df: pd.DataFrame, path: str | Path, title: str, *, published_rows: Iterable[str] = (),
                    ylabel: str = "distance (mm)") -> Path:
    """Grouped bar chart of a results table: one group per setting / region, one bar per row.

    df: rows = methods; columns either (group, stat) with stat "mean" (and "std", drawn as error
    bars) or flat columns of means. Rows named in `published_rows` are drawn in greys, the
    others in colour. Returns the PNG path.
    """
    groups, means, stds = _means_and_errors(df)
    published = set(published_rows)
    rows = [str(r) for r in df.index]
    width = 0.8 / max(len(rows), 1)
    fig = Figure(figsize=(max(6.0, 1.2 * len(groups) * max(len(rows), 3) * 0.35), 4.5))
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    colours = colormaps[EVALUATED_CMAP]
    n_pub = n_eval = 0
    for i, row in enumerate(rows):
        if row in published:
            colour = PUBLISHED_GREYS[n_pub % len(PUBLISHED_GREYS)]
            n_pub += 1
        else:
            colour = colours(n_eval % colours.N)
            n_eval += 1
        yerr = None if stds is None else stds.iloc[i].to_numpy()
        ax.bar(x - 0.4 + width * (i + 0.5), means.iloc[i].to_numpy(), width, yerr=yerr, capsize=2,
               color=colour, label=row + (" (published)" if row in published else ""),
               error_kw={"elinewidth": 0.8})
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return _save(fig, path)
