"""Rendering result tables as Markdown, LaTeX, CSV or JSON, with a note on the metric below them."""

from __future__ import annotations

import json
import math

import pandas as pd

FORMATS = ("markdown", "latex", "csv", "json")


def _flat_columns(df: pd.DataFrame) -> list[str]:
    if isinstance(df.columns, pd.MultiIndex):
        return [" ".join(str(p) for p in col).strip() for col in df.columns]
    return [str(c) for c in df.columns]


def _cell(value, digits: int) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def format_table(df: pd.DataFrame, fmt: str = "markdown", *, digits: int = 3, note: str = "") -> str:
    """Render ``df`` (index = row labels) in ``fmt``; ``note`` (metric, direction, units) goes
    under a Markdown or LaTeX table and into the JSON object."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; choose from {', '.join(FORMATS)}")
    columns = _flat_columns(df)
    labels = [str(i) for i in df.index]
    index_name = df.index.name or ""
    if fmt == "csv":
        flat = df.copy()
        flat.columns = columns
        return flat.to_csv(float_format=f"%.{max(digits, 6)}g")
    if fmt == "json":
        rows = {label: {c: (None if isinstance(v, float) and math.isnan(v) else v)
                        for c, v in zip(columns, row)} for label, row in zip(labels, df.itertuples(index=False))}
        return json.dumps({"note": note, "rows": rows}, indent=2)
    cells = [[_cell(v, digits) for v in row] for row in df.itertuples(index=False)]
    if fmt == "latex":
        head = " & ".join([index_name] + columns) + r" \\"
        body = "\n".join(" & ".join([label] + row) + r" \\" for label, row in zip(labels, cells))
        spec = "l" + "r" * len(columns)
        out = f"\\begin{{tabular}}{{{spec}}}\n\\toprule\n{head}\n\\midrule\n{body}\n\\bottomrule\n\\end{{tabular}}"
        return out + (f"\n% {note}" if note else "")
    header = [index_name] + columns
    table = [header] + [[label] + row for label, row in zip(labels, cells)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in table]
    rule = "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    lines.insert(1, rule)
    return "\n".join(lines) + (f"\n\n{note}" if note else "")
