"""The dataset commands of the `facehd` CLI, `validate` and `stats`: thin wrappers over
`facehd.validate` and `facehd.stats` (register them with ``main.add_command``)."""

from __future__ import annotations

from pathlib import Path

import click

from facehd.clitools import progress, reports_errors


def _progress(iterable, *, total: int, desc: str):
    return progress(iterable, total=total, desc=desc, unit="capture")


def _report_path(ctx, param, value: Path | None) -> Path | None:
    from facehd.validate import REPORT_SUFFIXES

    if value is not None and value.suffix.lower() not in REPORT_SUFFIXES:
        raise click.BadParameter(f"must end in one of {', '.join(REPORT_SUFFIXES)}, got {value.name!r}")
    return value


# ROOT is checked by the library, so a missing folder is a one-line error with exit status 1 like any
# other bad input (click's own check exits 2).
@click.command("validate")
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None, callback=_report_path,
              help="Also write the report to this file: Markdown (.md) or HTML (.html).")
@click.option("--strict", is_flag=True, help="Fail on warnings too, not only on errors.")
@click.pass_context
@reports_errors
def validate(ctx: click.Context, root: Path, report: Path | None, strict: bool):
    """Check every capture of a FaceHD-100-style dataset at ROOT.

    Checks images (present, decodable, sized as calibrated), cameras (orthonormal R, sane K),
    the scan (readable, finite, non-degenerate, in millimetres), the 7 scan landmarks (in
    millimetres, inside the scan, not a mirror image, projecting into every view), the optional
    68-point files, and subjects.csv against the folders. Prints a summary and one line per
    problem naming the file; exits 0 only when everything passed.
    """
    from facehd.validate import validate_dataset

    result = validate_dataset(root, strict=strict, progress=_progress)
    click.echo(result.summary())
    for line in result.lines():
        click.echo(line)
    if report is not None:
        click.echo(f"wrote {result.write(report)}")
    ctx.exit(0 if result.ok else 1)


@click.command("stats")
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the CSV tables, the figures and stats.md.")
@click.option("--no-scans", is_flag=True, help="Skip loading the scans (no scans.csv; much faster).")
@reports_errors
def stats(root: Path, out: Path, no_scans: bool):
    """Dataset statistics of ROOT: demographics, age by gender, expressions, scan geometry.

    Writes demographics.csv, subjects_summary.csv, age_by_gender.csv, expressions.csv,
    scans.csv (vertices, faces, bounding box and mean edge length in mm), the age-by-gender
    figure (the HRN supplement's Figure 1), a bar chart of expressions per subject, and
    stats.md; prints a summary.
    """
    from facehd.stats import dataset_stats, format_summary, write_stats

    result = dataset_stats(root, load_scans=not no_scans, progress=_progress)
    written = write_stats(result, out)
    click.echo(format_summary(result))
    click.echo("")
    for path in written:
        click.echo(f"wrote {path}")
