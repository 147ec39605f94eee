"""`facehd-bench micc`: the MICC Florence table (HRN supplement Table 1) for one or more predictions,
or for the reference methods on the embedded synthetic benchmark when no data is given."""

from __future__ import annotations

import json
from pathlib import Path

import click

from benchmarks.clitools import StageProgress, parse_preds
from benchmarks.micc import DIRECTIONS, METRICS, PROTOCOLS, UNITS, MiccOptions, run_micc
from benchmarks.tables import FORMATS, format_table
from facehd.errors import FaceHDError
from facehd.fsutil import atomic_open

TITLE = "MICC Florence (HRN supplement Table 1): mean / std of the distance in mm per setting"


@click.command("micc", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--gt", "gt_dir", type=click.Path(file_okay=False, path_type=Path),
              help="MICC Florence root holding subject_XX/ folders with frontal1 / frontal2 scans.")
@click.option("--pred", "preds", multiple=True, metavar="NAME=DIR",
              help="A method's predictions: DIR/subject_XX/{Indoor-Cooperative,PTZ-Indoor,PTZ-Outdoor}.obj "
                   "on the template topology. Repeatable.")
@click.option("--landmarks", "landmarks_dir", type=click.Path(file_okay=False, path_type=Path),
              help="A landmark tree mirroring --gt, e.g. GANFit's released MICC landmarks: "
                   "DIR/subject_XX/Model/frontalN/obj/<timestamp>.ljson (menpo LJSON, 68 iBUG points in mm).")
@click.option("--template", type=click.Path(dir_okay=False, path_type=Path),
              help="The predictions' template: BFM-layout model .mat, or a mesh with --template-keypoints.")
@click.option("--template-keypoints", type=click.Path(dir_okay=False, path_type=Path),
              help="68 0-based keypoint vertex indices (.txt / .npy) for a mesh template, or to override the model's.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="markdown", show_default=True)
@click.option("--per-subject", type=click.Path(dir_okay=False, path_type=Path),
              help="Write one CSV row per (method, subject, setting).")
@click.option("--direction", type=click.Choice(DIRECTIONS), default="symmetric", show_default=True)
@click.option("--metric", type=click.Choice(METRICS), default="point_to_surface", show_default=True)
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="released", show_default=True,
              help="released: GANFit's released evaluation rule for rule (comparable with the published rows); "
                   "robust: facehd's loop (Umeyama similarity, best iterate, at most 100 iterations).")
@click.option("--units", type=click.Choice(UNITS), default="auto", show_default=True,
              help="Prediction units: auto refuses a prediction whose size betrays mm vs model units.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write error heat maps and a bar chart of the table here.")
@click.option("--cache", "cache_root", type=click.Path(file_okay=False, path_type=Path),
              help="Cache root for registrations and the synthetic benchmark "
                   "[default: $FACEHD_CACHE or ~/.cache/facehd].")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Processes.")
@click.option("--synthetic-subjects", type=click.IntRange(min=1), default=None,
              help="Subjects in the synthetic default [default: 53, as MICC].")
@click.option("--synthetic-resolution", type=click.IntRange(min=16), default=None,
              help="SynthBFM grid rows of the synthetic default's template [default: 48, 2,352 vertices].")
@click.option("--no-published", is_flag=True, help="Leave the published rows out of the table.")
def micc_command(gt_dir, preds, landmarks_dir, template, template_keypoints, fmt, per_subject, direction, metric,
                 protocol, units, plots_dir, cache_root, workers, synthetic_subjects, synthetic_resolution,
                 no_published):
    """Evaluate reconstructions on MICC Florence and print Table 1 beside the published rows.

    With no --gt / --pred / --template, runs the embedded synthetic benchmark (generated once,
    cached) with three reference methods: mean-face, landmark-3dmm and truth-noise.
    """
    progress = StageProgress("MICC")
    try:
        result = run_micc(gt_dir, parse_preds(preds), template, template_keypoints=template_keypoints,
                          options=MiccOptions(direction=direction, metric=metric, units=units, protocol=protocol),
                          cache_root=cache_root, workers=workers, progress=progress,
                          synthetic_subjects=synthetic_subjects, synthetic_resolution=synthetic_resolution,
                          landmarks_dir=landmarks_dir)
    except FaceHDError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        progress.close()
    published = not no_published
    table, note = result.table(published=published), result.note(published=published)
    absent, warnings = result.not_evaluated(), result.warnings()
    if fmt == "csv":  # stdout stays machine-readable; the note goes to stderr
        click.echo(format_table(table, "csv"), nl=False)
        click.echo(note + "".join(f"\n  {line}" for line in absent + warnings), err=True)
    elif fmt == "json":
        data = json.loads(format_table(table, "json", note=note))
        data["not_evaluated"] = absent
        data["warnings"] = warnings
        click.echo(json.dumps(data, indent=2))
    elif fmt == "latex":  # every line of the note and list is a LaTeX comment
        comments = note.splitlines() + (["Not evaluated:"] + [f"  {line}" for line in absent] if absent else []) \
            + (["Warnings:"] + [f"  {line}" for line in warnings] if warnings else [])
        click.echo(format_table(table, "latex") + "".join(f"\n% {line}" for line in comments))
    else:
        lines = [format_table(table, fmt, note=note)]
        if absent:
            lines += ["", "Not evaluated:"] + [f"  {line}" for line in absent]
        if warnings:
            lines += ["", "Warnings (scores kept; check these):"] + [f"  {line}" for line in warnings]
        click.echo(TITLE + "\n\n" + "\n".join(lines))
    if per_subject is not None:
        with atomic_open(per_subject, "w", newline="") as fh:
            result.per_subject_frame().to_csv(fh, index=False, float_format="%.6g")
        click.echo(f"per-subject scores: {per_subject}", err=True)
    if plots_dir is not None:
        written = result.write_plots(plots_dir)
        click.echo(f"plots: {len(written)} files in {plots_dir}", err=True)
