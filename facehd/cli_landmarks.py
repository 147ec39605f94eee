"""The `facehd landmarks` command: 68-point landmark files for photos, from the face detector
(`facehd.landmarks_detect`; register it with ``main.add_command``)."""

from __future__ import annotations

from pathlib import Path

import click

from facehd.clitools import reports_errors


@click.command("landmarks")
@click.option("--images", "images", multiple=True, required=True, type=click.Path(path_type=Path),
              help="An image file or a folder of images (.jpg, .jpeg, .png); repeat the option for more.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the landmark files, one <image stem>.txt per image.")
@click.option("--overwrite", is_flag=True, help="Replace landmark files already in OUT (default: keep them).")
@reports_errors
def landmarks(images: tuple[Path, ...], out: Path, overwrite: bool):
    """Detect 68 landmarks in photos and write OUT/<image stem>.txt: 68 lines "x y" in pixels, iBUG
    order (the landmark files of `hrn predict --landmarks` and of the in-the-wild folders).

    Uses MediaPipe Face Mesh from the detector's own environment (install it with
    `bash scripts/setup.sh --detect`), mapped from its 468 points to iBUG 68; the jaw points are
    fixed surface points, not the silhouette, on turned faces. An image without a face is reported
    and the rest go on (exit status 1)."""
    from facehd.landmarks_detect import image_files, write_detected_landmarks

    results = write_detected_landmarks(image_files(images), out, overwrite=overwrite)
    for r in results:
        line = f"FAILED {r.message}" if r.status == "failed" else f"{r.status} {r.path}"
        click.echo(f"{r.image.stem}: {line}")
    counts = {status: sum(r.status == status for r in results) for status in ("written", "kept", "failed")}
    click.echo(f"{len(results)} images: {counts['written']} written, {counts['kept']} kept (already in {out}), "
               f"{counts['failed']} failed")
    if counts["failed"]:
        raise SystemExit(1)
