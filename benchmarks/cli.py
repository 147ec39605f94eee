"""The `facehd-bench` command line: benchmark evaluators and the published results they compare to."""

from __future__ import annotations

import io
import json

import click
import pandas as pd

from benchmarks.published import MICC_SOURCE, REALY_PUBLISHED, REALY_SOURCE, micc_published_table, realy_published_table
from benchmarks.tables import FORMATS, format_table


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """facehd-bench: face reconstruction benchmarks (MICC Florence, REALY) with Table-1-style output."""


@main.command()
@click.argument("benchmark", type=click.Choice(["micc", "realy", "all"]), default="all")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="markdown", show_default=True)
def published(benchmark: str, fmt: str):
    """Print the published results that evaluated methods are compared against.

    Markdown and LaTeX print one titled table each; JSON prints one object keyed by table; CSV
    prints one long table with a `table` column.
    """
    tables = []  # (key, title, frame, note)
    if benchmark in ("micc", "all"):
        tables.append(("micc", "MICC Florence: mean / std of the distance in mm per setting",
                       micc_published_table(), f"Source: {MICC_SOURCE}."))
    if benchmark in ("realy", "all"):
        for track in REALY_PUBLISHED:
            tables.append((f"realy_{track}", f"REALY, {track} track: mean error in mm per region",
                           realy_published_table(track), f"Source: {REALY_SOURCE}."))
    if fmt == "json":
        objects = {key: json.loads(format_table(df, "json", note=note)) for key, _, df, note in tables}
        click.echo(json.dumps(objects, indent=2))
    elif fmt == "csv":
        long = [format_table(df, "csv") for _, _, df, _ in tables]
        frames = [pd.read_csv(io.StringIO(text)).assign(table=key) for text, (key, *_) in zip(long, tables)]
        merged = pd.concat(frames, ignore_index=True)
        click.echo(merged[["table"] + [c for c in merged.columns if c != "table"]].to_csv(index=False), nl=False)
    else:
        click.echo("\n\n".join(f"{title}\n\n{format_table(df, fmt, note=note)}" for _, title, df, note in tables))


def _register_commands() -> None:
    from benchmarks.cli_micc import micc_command
    from benchmarks.cli_realy import realy_command

    main.add_command(micc_command)
    main.add_command(realy_command)


_register_commands()

if __name__ == "__main__":
    main()
