"""`facehd synth flame` and `facehd head-model`: the BFM + FLAME head model's commands."""

from __future__ import annotations

from pathlib import Path

import click

from facehd.clitools import reports_errors


@click.command("flame")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to write generic_model.pkl, head_template.obj and flame_static_embedding.pkl to.")
@click.option("--resolution", type=click.IntRange(min=24), default=None, show_default="generator default (96)",
              help="Vertex columns around the head (even); 32 makes a fast test model.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed; the same seed gives the same files.")
@reports_errors
def synth_flame(out: Path, resolution: int | None, seed: int):
    """Write SynthFLAME, a procedural head model in FLAME 2020's file layout (300 shape and 100
    expression directions, 5 joints, LBS), whose face is SynthBFM's mean face."""
    from facehd.flame import load_flame_folder
    from facehd.synth.flame import DEFAULT_RESOLUTION, write_synth_flame

    folder = write_synth_flame(out, resolution or DEFAULT_RESOLUTION, seed)
    assets = load_flame_folder(folder)
    click.echo(f"wrote {folder}: {assets.model.n_vertices} vertices, {assets.model.n_faces} faces, "
               f"{len(assets.template.uvs)} texture vertices (seed {seed})")
