"""The `facehd` command line: a thin layer over the library (each command calls one function)."""

from __future__ import annotations

from pathlib import Path

import click

from facehd import __version__
from facehd.clitools import reports_errors


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="facehd")
def main():
    """facehd: dataset tools for detailed 3D face reconstruction (HRN, FaceHD-100).

    Everything runs on procedural stand-ins when the licensed assets (BFM, FaceHD-100) are not
    at hand: start with `facehd synth model`.
    """


@main.group()
def synth():
    """Generate procedural stand-ins in the real file formats (no downloads needed)."""


@synth.command("model")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output .mat file in the BFM_model_front.mat layout.")
@click.option("--resolution", type=click.IntRange(min=16), default=None, show_default="generator default",
              help="Grid resolution: about R x R vertices. Small values (30-60) make fast test models.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed; the same seed gives the same model.")
@click.option("--preview", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a PNG of the mean face and random faces and expressions with their 68 landmarks.")
@click.option("--n-random", type=click.IntRange(min=0), default=5, show_default=True,
              help="Random faces in the preview.")
@reports_errors
def synth_model(out: Path, resolution: int | None, seed: int, preview: Path | None, n_random: int):
    """Write SynthBFM, a procedural morphable model with BFM_model_front.mat's fields and units.

    The file loads with the same loader as the real BFM09 model (80 identity, 64 expression and 80
    texture components, 68 iBUG landmarks, 1 model unit = 100 mm), plus per-vertex UVs and region
    labels.
    """
    from facehd.morphable import load_morphable_model
    from facehd.synth.bfm import write_synth_bfm

    kwargs = {} if resolution is None else {"resolution": resolution}
    path = write_synth_bfm(out, seed=seed, **kwargs)
    model = load_morphable_model(path)
    click.echo(f"wrote {path}: {model.n_vertices} vertices, {model.n_faces} faces (seed {seed})")
    if preview is not None:
        from facehd.preview import write_preview

        write_preview(model, preview, n_random=n_random, seed=seed)
        click.echo(f"wrote {preview}")


@main.command("model-info")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@reports_errors
def model_info(path: Path):
    """Check a morphable model file (real BFM09 or SynthBFM) and summarise it."""
    from facehd.morphable import describe_model, load_morphable_model

    click.echo(describe_model(load_morphable_model(path)))


def _register_commands() -> None:
    from facehd.cli_dataset import stats, validate

    main.add_command(validate)
    main.add_command(stats)


_register_commands()

if __name__ == "__main__":
    main()
