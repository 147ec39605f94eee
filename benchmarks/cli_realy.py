"""`facehd-bench realy`: REALY's per-region table for one or more methods' predictions, or for the
reference methods on the embedded synthetic REALY set when no data is given."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from benchmarks.clitools import StageProgress, parse_preds
from benchmarks.realy import run_realy, write_plots, write_run
from benchmarks.tables import FORMATS, format_table
from facehd.errors import FaceHDError


def _report_problems(run) -> None:
    for method, names in run.skipped.items():
        for name in names:
            click.echo(f"{method}: skipped {name} (not named <id>.obj or <id>_<k>.obj)", err=True)
    for method, failures in run.failures.items():
        for failure in failures:
            click.echo(f"{method}: {failure.name} ({failure.track}) not evaluated: {failure.message}", err=True)


@click.command("realy", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--realy", "realy_dir", type=click.Path(file_okay=False, path_type=Path),
              help="REALY data: REALY_HIFI3D_keypoints/, REALY_scan_region/ and metrical_scale.txt.")
@click.option("--pred", "preds", multiple=True, metavar="NAME=DIR",
              help="A method's predictions: DIR/<id>.obj (frontal) and DIR/<id>_<k>.obj (side), or any names "
                   "under DIR/frontal/ and DIR/side/, on the template topology. Repeatable.")
@click.option("--template-keypoints", type=click.Path(dir_okay=False, path_type=Path),
              help="The template's 85 barycentric keypoints (REALY's data/<topology>.txt; <topology>.obj "
                   "beside it is used to check the predictions' topology).")
@click.option("--template-mask", type=click.Path(dir_okay=False, path_type=Path),
              help="REALY's optional 0/1 vertex mask of the template: bICP measures only on masked triangles.")
@click.option("--track", type=click.Choice(["frontal", "side", "both"]), default="both", show_default=True)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="markdown", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write <method>/<track>/REALY_error.txt (full precision) and realy_predictions.csv here.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write bar charts of the tables and error heat maps of one prediction per method here.")
@click.option("--cache", "cache_root", type=click.Path(file_okay=False, path_type=Path),
              help="Cache root for the synthetic benchmark [default: $FACEHD_CACHE or ~/.cache/facehd].")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Processes.")
@click.option("--synthetic-subjects", type=click.IntRange(min=1), default=None,
              help="Subjects in the synthetic default [default: 3].")
@click.option("--no-published", is_flag=True, help="Leave the published rows out of the tables.")
def realy_command(realy_dir, preds, template_keypoints, template_mask, track, fmt, out_dir, plots_dir, cache_root,
                  workers, synthetic_subjects, no_published):
    """Evaluate reconstructions on REALY (nose, mouth, forehead, cheek) beside the published rows.

    With no --realy, runs the embedded synthetic REALY set (generated once, cached) with the
    reference methods mean-face, landmark-3dmm and truth-noise, or with --pred folders on it.
    """
    progress = StageProgress("REALY")
    try:
        run = run_realy(realy_dir, parse_preds(preds), template_keypoints, template_mask=template_mask,
                        track=track, cache_root=cache_root, workers=workers, progress=progress,
                        synthetic_subjects=synthetic_subjects)
    except FaceHDError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        progress.close()
    _report_problems(run)
    published = not no_published
    tables = {t: (run.table(t, published=published), run.note(t, published=published)) for t in run.tracks}
    if fmt == "json":
        click.echo(json.dumps({t: json.loads(format_table(df, "json", note=note)) for t, (df, note) in tables.items()},
                              indent=2))
    elif fmt == "csv":  # one machine-readable table per track, the notes on stderr
        for t, (df, note) in tables.items():
            click.echo(f"# track: {t}")
            click.echo(format_table(df, "csv"), nl=False)
            click.echo(note, err=True)
    else:
        blocks = []
        for t, (df, note) in tables.items():
            title = f"REALY, {t} track: error per region in mm (mean / median / std over predictions)"
            blocks.append(("% " if fmt == "latex" else "") + title + "\n\n" + format_table(df, fmt, note=note))
        click.echo("\n\n".join(blocks))
    try:
        if out_dir is not None:
            written = write_run(run, out_dir)
            click.echo(f"results: {len(written)} files in {out_dir}", err=True)
        if plots_dir is not None:
            written = write_plots(run, plots_dir)
            click.echo(f"plots: {len(written)} files in {plots_dir}", err=True)
    except FaceHDError as exc:
        raise click.ClickException(str(exc)) from exc
    if any(run.failures.values()):
        sys.exit(1)
