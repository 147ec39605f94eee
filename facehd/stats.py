"""Dataset statistics: demographics (the HRN supplement's Figure 1, age by gender), expressions
per subject and per-scan geometry in millimetres, written as CSV, PNG and a Markdown summary."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from facehd.capture import ETHNICITIES, GENDERS, SCAN_PLY, SUBJECTS_CSV, CaptureRef, find_captures, read_subjects
from facehd.errors import FileFormatError
from facehd.fsutil import atomic_open, atomic_path
from facehd.validate import absent_reason, check_dataset_root

AGE_BIN_YEARS = 3
# The supplement describes the ages as mostly 17-35, roughly normal: reported beside the bins.
TYPICAL_AGE_RANGE_YEARS = (17, 35)

DEMOGRAPHICS_CSV = "demographics.csv"
SUBJECTS_SUMMARY_CSV = "subjects_summary.csv"
AGE_BY_GENDER_CSV = "age_by_gender.csv"
EXPRESSIONS_CSV = "expressions.csv"
SCANS_CSV = "scans.csv"
AGE_FIGURE_PNG = "figure1_age_by_gender.png"
EXPRESSIONS_FIGURE_PNG = "expressions_per_subject.png"
STATS_MD = "stats.md"

GENDER_COLOURS = {"female": "#d1495b", "male": "#00798c"}
FIGURE_DPI = 150

SCAN_COLUMNS = ("subject", "expression", "n_vertices", "n_faces", "bbox_x_mm", "bbox_y_mm", "bbox_z_mm",
                "bbox_diagonal_mm", "mean_edge_mm", "error")

Progress = Callable[..., Iterable]  # called as progress(iterable, total=n, desc=text), e.g. tqdm


@dataclass
class DatasetStats:
    """Statistics of one dataset; every table is a pandas DataFrame.

    Attributes:
        root: the dataset root.
        subjects: one row per subject (from subjects.csv and the folders): subject_id, gender,
            age (years), ethnicity, n_expressions, expressions (';'-joined names).
        demographics: attribute (ethnicity / gender / age), value, count, percent of subjects.
        age_by_gender: age bin label ("17-19", years) x gender -> number of subjects.
        expressions: expression name -> number of subjects captured with it.
        scans: one row per capture (`SCAN_COLUMNS`, millimetres), or None when scans were skipped.
        n_captures: number of <subject>/<expression> folders.
    """

    root: Path
    subjects: pd.DataFrame
    demographics: pd.DataFrame
    age_by_gender: pd.DataFrame
    expressions: pd.DataFrame
    scans: pd.DataFrame | None
    n_captures: int


def dataset_stats(root: str | Path, *, load_scans: bool = True, progress: Progress | None = None) -> DatasetStats:
    """Compute the statistics of the dataset at ``root``; scans are read only with ``load_scans``.

    ``progress``, if given, wraps the capture iterable of the scan pass (``progress(refs,
    total=n, desc=...)``, e.g. ``tqdm``). A scan that cannot be read gets a row with its error.
    Raises `InputError` when ``root`` is not a dataset root and `FileFormatError` when its
    subjects.csv is missing or invalid.
    """
    root = Path(root)
    check_dataset_root(root)
    csv_path = root / SUBJECTS_CSV
    if not csv_path.is_file():
        raise FileFormatError(csv_path, f"{absent_reason(csv_path, SUBJECTS_CSV)}: the statistics need the "
                                        "subjects table (`facehd validate` checks the whole dataset)")
    refs = find_captures(root)
    table = read_subjects(csv_path)
    subjects = subjects_summary(table, refs)
    scans = None
    if load_scans:
        items = progress(refs, total=len(refs), desc="scans") if progress is not None else refs
        scans = pd.DataFrame([scan_row(ref) for ref in items], columns=list(SCAN_COLUMNS))
    return DatasetStats(
        root=root,
        subjects=subjects,
        demographics=demographics(table),
        age_by_gender=age_by_gender(table),
        expressions=expression_counts(refs),
        scans=scans,
        n_captures=len(refs),
    )


def subjects_summary(table: pd.DataFrame, refs: list[CaptureRef]) -> pd.DataFrame:
    """subjects.csv rows joined with the expression folders found (subjects in either appear)."""
    by_subject: dict[str, list[str]] = {}
    for ref in refs:
        by_subject.setdefault(ref.subject, []).append(ref.expression)
    folders = pd.DataFrame({
        "subject_id": pd.Series(list(by_subject), dtype=str),
        "n_expressions": pd.Series([len(e) for e in by_subject.values()], dtype=np.int64),
        "expressions": pd.Series([";".join(e) for e in by_subject.values()], dtype=str),
    })
    out = table[["subject_id", "gender", "age", "ethnicity"]].merge(folders, on="subject_id", how="outer")
    out["n_expressions"] = out["n_expressions"].fillna(0).astype(np.int64)
    out["expressions"] = out["expressions"].fillna("")
    out["age"] = out["age"].astype("Int64")  # nullable: folders without a subjects.csv row
    return out.sort_values("subject_id").reset_index(drop=True)


def demographics(table: pd.DataFrame) -> pd.DataFrame:
    """Counts and percentages of subjects by ethnicity and gender (every category, zeros
    included), and the share of ages in the supplement's typical range."""
    n = len(table)
    rows = []
    for attribute, values in (("ethnicity", ETHNICITIES), ("gender", GENDERS)):
        counts = table[attribute].value_counts()
        rows += [(attribute, value, int(counts.get(value, 0))) for value in values]
    lo, hi = TYPICAL_AGE_RANGE_YEARS
    rows.append(("age", f"{lo}-{hi}", int(table["age"].between(lo, hi).sum())))
    out = pd.DataFrame(rows, columns=["attribute", "value", "count"])
    out["percent"] = (100.0 * out["count"] / n).round(1) if n else 0.0
    return out


def age_bins(ages: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Bin edges (years, AGE_BIN_YEARS wide, aligned to multiples of it) and labels "18-20"."""
    lo = int(ages.min()) // AGE_BIN_YEARS * AGE_BIN_YEARS
    hi = (int(ages.max()) // AGE_BIN_YEARS + 1) * AGE_BIN_YEARS
    edges = np.arange(lo, hi + 1, AGE_BIN_YEARS)
    return edges, [f"{a}-{a + AGE_BIN_YEARS - 1}" for a in edges[:-1]]


def age_by_gender(table: pd.DataFrame) -> pd.DataFrame:
    """Number of subjects per age bin (rows, labelled in years) and gender (columns)."""
    if table.empty:
        return pd.DataFrame(columns=list(GENDERS))
    edges, labels = age_bins(table["age"])
    binned = pd.cut(table["age"], edges, right=False, labels=labels)
    counts = pd.crosstab(binned, table["gender"]).reindex(index=labels, columns=list(GENDERS), fill_value=0)
    counts.index.name = "age_years"
    counts.columns.name = None
    return counts


def expression_counts(refs: list[CaptureRef]) -> pd.DataFrame:
    """Number of subjects captured with each expression, most common first."""
    counts = pd.Series([ref.expression for ref in refs], dtype=str).value_counts()
    out = counts.rename_axis("expression").reset_index(name="n_subjects")
    return out.sort_values(["n_subjects", "expression"], ascending=[False, True]).reset_index(drop=True)


def scan_row(ref: CaptureRef) -> dict:
    """Geometry of one capture's scan in mm; NaNs and an ``error`` message when unreadable."""
    from facehd.io import load_mesh

    row = {"subject": ref.subject, "expression": ref.expression, "error": ""}
    if not ref.paths.scan.is_file():
        return {**row, "error": absent_reason(ref.paths.scan, SCAN_PLY)}
    try:
        mesh = load_mesh(ref.paths.scan)
    except Exception as exc:  # statistics go on past a broken scan; `facehd validate` explains it
        return {**row, "error": f"{type(exc).__name__}: {exc}"}
    extent = np.ptp(mesh.vertices, axis=0)
    return {
        **row,
        "n_vertices": mesh.n_vertices,
        "n_faces": mesh.n_faces,
        "bbox_x_mm": extent[0],
        "bbox_y_mm": extent[1],
        "bbox_z_mm": extent[2],
        "bbox_diagonal_mm": float(np.linalg.norm(extent)),
        "mean_edge_mm": mean_edge_length(mesh.vertices, mesh.faces),
    }


def mean_edge_length(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Mean length of the mesh's unique edges (an edge shared by two faces counts once)."""
    if len(faces) == 0:
        return float("nan")
    pairs = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    keys = np.unique(pairs[:, 0] * len(vertices) + pairs[:, 1])
    a, b = keys // len(vertices), keys % len(vertices)
    return float(np.linalg.norm(vertices[a] - vertices[b], axis=1).mean())


# --- output ------------------------------------------------------------------------------------


def write_stats(stats: DatasetStats, out_dir: str | Path) -> list[Path]:
    """Write the CSV tables, the two figures and stats.md into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {
        DEMOGRAPHICS_CSV: (stats.demographics, False),
        SUBJECTS_SUMMARY_CSV: (stats.subjects, False),
        AGE_BY_GENDER_CSV: (stats.age_by_gender, True),
        EXPRESSIONS_CSV: (stats.expressions, False),
    }
    if stats.scans is not None:
        tables[SCANS_CSV] = (stats.scans, False)
    written = []
    for name, (table, index) in tables.items():
        with atomic_open(out_dir / name, newline="") as fh:
            table.to_csv(fh, index=index, float_format="%.4f")
        written.append(out_dir / name)
    written.append(plot_age_by_gender(stats, out_dir / AGE_FIGURE_PNG))
    written.append(plot_expressions_per_subject(stats, out_dir / EXPRESSIONS_FIGURE_PNG))
    with atomic_open(out_dir / STATS_MD) as fh:
        fh.write(stats_markdown(stats))
    written.append(out_dir / STATS_MD)
    return written


def plot_age_by_gender(stats: DatasetStats, path: str | Path) -> Path:
    """The supplement's Figure 1: subjects per age bin, one bar per gender side by side."""
    counts = stats.age_by_gender
    fig, ax = _figure(7.0, 4.0)
    x = np.arange(len(counts.index))
    width = 0.8 / len(GENDERS)
    for k, gender in enumerate(GENDERS):
        values = counts[gender].to_numpy() if gender in counts else np.zeros(len(x))
        bars = ax.bar(x + (k - (len(GENDERS) - 1) / 2) * width, values, width, color=GENDER_COLOURS[gender],
                      label=f"{gender} (n={int(values.sum())})")
        ax.bar_label(bars, labels=[str(int(v)) if v else "" for v in values], fontsize=8, padding=1)
    ax.set_xticks(x, list(counts.index), rotation=45 if len(x) > 10 else 0)
    ax.set_xlabel("age (years)")
    ax.set_ylabel("subjects")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"Age distribution by gender ({len(stats.subjects)} subjects)")
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    ax.margins(y=0.12)
    return _save_figure(fig, path)


def plot_expressions_per_subject(stats: DatasetStats, path: str | Path) -> Path:
    """A small bar chart: how many subjects have 1, 2, ... expressions."""
    per_subject = stats.subjects["n_expressions"].value_counts().sort_index()
    fig, ax = _figure(4.0, 3.0)
    bars = ax.bar([str(n) for n in per_subject.index], per_subject.to_numpy(), color="#66a182")
    ax.bar_label(bars, fontsize=8, padding=1)
    ax.set_xlabel("expressions per subject")
    ax.set_ylabel("subjects")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"Expressions per subject ({stats.n_captures} captures)", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    ax.margins(y=0.15)
    return _save_figure(fig, path)


def _figure(width_in: float, height_in: float):
    """A figure and its axes drawn with Agg, outside pyplot, so no global backend state changes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in))
    return fig, fig.subplots()


def _save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=FIGURE_DPI, format="png")
    return path


def stats_markdown(stats: DatasetStats) -> str:
    """The stats.md summary: overview, demographics, ages, expressions and scan geometry."""
    out = [f"# Dataset statistics: {stats.root}", ""]
    out += [markdown_table(overview(stats), index=False), ""]
    demographics_table = markdown_table(stats.demographics, index=False, float_format=".1f")
    out += ["## Demographics (percent of subjects)", "", demographics_table, ""]
    out += ["## Age by gender", "", f"![age by gender]({AGE_FIGURE_PNG})", ""]
    out += [markdown_table(stats.age_by_gender, index=True), ""]
    out += ["## Expressions", "", f"![expressions per subject]({EXPRESSIONS_FIGURE_PNG})", ""]
    out += [markdown_table(stats.expressions, index=False), ""]
    if stats.scans is not None:
        out += ["## Scans (millimetres)", "", markdown_table(scan_summary(stats.scans), index=True), ""]
        errors = stats.scans[stats.scans["error"] != ""]
        if len(errors):
            out += [f"{len(errors)} scans could not be read:", ""]
            out += [f"- `{r.subject}/{r.expression}/scan.ply`: {r.error}" for r in errors.itertuples()]
            out.append("")
    return "\n".join(out)


def overview(stats: DatasetStats) -> pd.DataFrame:
    """A two-column table of the headline numbers."""
    ages = stats.subjects["age"].dropna().astype(float)
    rows = [
        ("subjects", len(stats.subjects)),
        ("captures (subject x expression)", stats.n_captures),
        ("distinct expressions", len(stats.expressions)),
        ("age mean / median (years)", f"{ages.mean():.1f} / {ages.median():.0f}" if len(ages) else "-"),
        ("age range (years)", f"{int(ages.min())}-{int(ages.max())}" if len(ages) else "-"),
    ]
    return pd.DataFrame(rows, columns=["quantity", "value"])


def scan_summary(scans: pd.DataFrame) -> pd.DataFrame:
    """Mean, min and max of each numeric scan column over the readable scans."""
    numeric = scans[[c for c in SCAN_COLUMNS[2:-1]]].apply(pd.to_numeric, errors="coerce")
    return numeric.agg(["mean", "min", "max"]).T.rename_axis("scan")


def format_summary(stats: DatasetStats) -> str:
    """The plain-text summary the CLI prints: overview, demographics and scan geometry."""
    parts = [overview(stats).to_string(index=False, header=False), "",
             stats.demographics.to_string(index=False)]
    if stats.scans is not None:
        parts += ["", scan_summary(stats.scans).to_string(float_format=lambda v: f"{v:.2f}")]
    return "\n".join(parts)


def markdown_table(table: pd.DataFrame, *, index: bool, float_format: str = ".2f") -> str:
    """A GitHub Markdown table of ``table``."""
    frame = table.reset_index() if index else table
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for row in frame.itertuples(index=False):
        cells = [format(v, float_format) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
