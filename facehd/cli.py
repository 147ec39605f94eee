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


@synth.command("facehd")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Dataset root to create (FaceHD-100 layout; the ground truth goes to OUT/_truth).")
@click.option("--subjects", "n_subjects", type=click.IntRange(min=1), default=10, show_default=True,
              help="Number of subjects (S001, S002, ...).")
@click.option("--expressions", "n_expressions", type=click.IntRange(min=1), default=2, show_default=True,
              help="Expressions per subject: neutral, then smile, jaw_open, brow_raise, ... (at most 25).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Random seed; the same seed gives the same files.")
@click.option("--image-size", type=click.IntRange(min=32), default=512, show_default=True,
              help="Width and height of the 9 rendered views in pixels.")
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A SynthBFM .mat file (from `facehd synth model`) instead of building one.")
@click.option("--model-resolution", type=click.IntRange(min=16), default=None, show_default="generator default",
              help="Resolution of the SynthBFM built when --model is not given.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes generating captures in parallel, each with its own renderer.")
@click.option("--overwrite", is_flag=True, help="Replace a synthetic dataset already in OUT.")
@reports_errors
def synth_facehd(out: Path, n_subjects: int, n_expressions: int, seed: int, image_size: int,
                 model_path: Path | None, model_resolution: int | None, workers: int, overwrite: bool):
    """Write a synthetic FaceHD-100 dataset: per subject and expression a raw scan (mm, random
    pose, noise, holes, hair spikes), 9 calibrated rendered views, 7 scan landmarks and 68-point
    landmarks per view, plus the generator's ground truth in OUT/_truth.

    Demographics follow the real dataset's (95% Asian, 3% white, 2% black; ages mostly 17-35).
    The output passes `facehd validate`.
    """
    from facehd.clitools import progress
    from facehd.synth.facehd import SynthConfig, generate_facehd

    config = SynthConfig(out=out, n_subjects=n_subjects, n_expressions=n_expressions, seed=seed,
                         image_size=image_size, model_path=model_path, workers=workers, overwrite=overwrite,
                         **({} if model_resolution is None else {"model_resolution": model_resolution}))
    summary = generate_facehd(config, progress=lambda items, **kw: progress(items, unit="capture", **kw))
    click.echo(summary.describe())


@synth.command("wild")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to write (in-the-wild format of facehd.wild; the ground truth goes to OUT/_truth).")
@click.option("--images", "n_images", type=click.IntRange(min=1), required=True, help="Number of images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed; the same seed gives the same files.")
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Morphable model .mat (BFM layout) instead of building SynthBFM.")
@click.option("--model-resolution", type=click.IntRange(min=16), default=None, show_default="generator default",
              help="Resolution of the SynthBFM built when --model is not given.")
@click.option("--image-size", type=click.IntRange(min=32), default=256, show_default=True,
              help="Width and height of the images in pixels.")
@click.option("--format", "image_format", type=click.Choice(["png", "jpg"]), default="png", show_default=True,
              help="Image file format.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes rendering in parallel (the files do not depend on it).")
@reports_errors
def synth_wild(out: Path, n_images: int, seed: int, model_path: Path | None, model_resolution: int | None,
               image_size: int, image_format: str, workers: int):
    """Write synthetic in-the-wild training images: random faces of the morphable model in varied
    pose, lighting, backgrounds and occluders, with 68 landmarks, face masks and ground truth."""
    from facehd.clitools import progress
    from facehd.synth.wild import generate_wild

    result = generate_wild(out, n_images, model=model_path, model_resolution=model_resolution, seed=seed,
                           image_size=image_size, image_format=image_format, workers=workers,
                           progress=lambda items, **kw: progress(items, unit="image", **kw))
    click.echo(f"wrote {len(result.names)} images to {out} in {result.seconds:.1f} s "
               f"({result.images_per_second:.1f} images/s); ground truth in {out / '_truth'}")


@main.command("model-info")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@reports_errors
def model_info(path: Path):
    """Check a morphable model file (real BFM09 or SynthBFM) and summarise it."""
    from facehd.morphable import describe_model, load_morphable_model

    click.echo(describe_model(load_morphable_model(path)))


def _capture_batch_options(func):
    """Options shared by the per-capture batch commands (align, gt-maps)."""
    options = [
        # ROOT is checked in `_run_capture_batch`: a bad ROOT is a one-line error with exit status 1.
        click.argument("root", type=click.Path(path_type=Path)),
        click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
                     help="Derived-products root: OUT/<subject>/<expression>/ (never inside ROOT's captures)."),
        click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     default=None, help="Morphable model (BFM_model_front.mat layout) [default: the built-in "
                                        "SynthBFM, as `facehd synth facehd` uses]."),
        click.option("--uv", "uv_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Per-vertex UVs, an (N, 2) .npy, for a model file without a 'uv' field (BFM09's "
                          "BFM_model_front.mat; HRN ships bfm_uvs2.npy). Checked against the model first."),
        click.option("--coeffs", "coeffs_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
                     default=None, help="Coefficient files (257 values; .npz key `coeffs` or Deep3DFaceRecon .mat): "
                                        "DIR/<subject>/<expression>/cam<i>.npz|.mat per image, or one .npz|.mat "
                                        "per capture there (e.g. ROOT/_truth). Without it id and exp are fitted."),
        click.option("--scale", type=click.Choice(["metric", "landmarks"]), default="metric", show_default=True,
                     help="Scan-to-model scale: metric (scan mm, 1 model unit = 100 mm) or the landmark fit's."),
        click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Captures processed in parallel (processes)."),
        click.option("--shard", default=None, metavar="K/N",
                     help="Process only captures K, K+N, K+2N, ... (0 <= K < N) [default: RANK/WORLD_SIZE "
                          "from torchrun when set, else all]."),
        click.option("--force", is_flag=True, help="Recompute captures whose outputs are up to date."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _run_capture_batch(run, root: Path, job, workers: int, shard: str | None, what: str) -> None:
    """Run a dataset function with a progress bar, print failures as they happen and a summary;
    exit status 1 when any capture failed, 128 + 15 when terminated by SIGTERM (after removing the
    run's temporary files). Results go to stdout, the progress bar to stderr."""
    import signal

    from tqdm import tqdm

    from facehd.batch import Terminated, resolve_shard
    from facehd.clitools import progress
    from facehd.validate import check_dataset_root

    def report_failure(result) -> None:
        if result.status == "failed":
            with tqdm.external_write_mode():  # clears the progress bar, so the line stands alone
                click.echo(f"FAILED {result.name}: {result.message}")

    check_dataset_root(root)
    resolved = resolve_shard(shard)
    try:
        report = run(root, job, workers=workers, shard=resolved, on_result=report_failure,
                     progress=lambda items, **kw: progress(items, unit="capture", **kw))
    except Terminated:
        click.echo("terminated (temporary files removed; finished captures are kept)", err=True)
        click.get_current_context().exit(128 + signal.SIGTERM)
    counts = report.counts()
    where = "" if resolved.count == 1 else f" (shard {resolved})"
    click.echo(f"{len(report.results)} captures{where}: {counts['done']} {what}, {counts['skipped']} up to date, "
               f"{counts['failed']} failed")
    if report.failed:
        click.echo("failed: " + ", ".join(r.name for r in report.failed), err=True)
        click.get_current_context().exit(1)


def _align_job(out: Path, model_path: Path | None, uv_path: Path | None, coeffs_dir: Path | None, scale: str,
               force: bool):
    from facehd.align import AlignJob, AlignOptions, ModelSource

    return AlignJob(out=out, model=ModelSource(model_path, uv_path=uv_path), coeffs_dir=coeffs_dir,
                    options=AlignOptions(scale=scale), force=force)


@main.command("align")
@_capture_batch_options
@reports_errors
def align_command(root: Path, out: Path, model_path: Path | None, uv_path: Path | None, coeffs_dir: Path | None,
                  scale: str, workers: int, shard: str | None, force: bool):
    """Align every capture's scan to the morphable model: OUT/<subject>/<expression>/align.json.

    A similarity from the 7 landmark pairs (checked: mirrored, degenerate, too bad, not mm), rigid
    point-to-plane ICP on the scan's face region, and the coarse shape from --coeffs or fitted
    (id and exp). align.json holds the scan mm -> model units transform, ICP fitness and inlier
    RMSE (mm), per-landmark residuals (mm) and the coefficients. Finished captures whose inputs
    are unchanged are skipped; a failing capture is reported (its align.json, if the inputs
    changed since, is removed) and the rest go on (exit status 1). Results are the same bytes on
    every run and for any --workers (each capture runs on one thread).
    """
    from facehd.align import align_dataset

    _run_capture_batch(align_dataset, root, _align_job(out, model_path, uv_path, coeffs_dir, scale, force), workers,
                       shard, "aligned")


@main.command("gt-maps")
@_capture_batch_options
@click.option("--no-preview", is_flag=True, help="Skip the preview PNG.")
@reports_errors
def gt_maps_command(root: Path, out: Path, model_path: Path | None, uv_path: Path | None, coeffs_dir: Path | None,
                    scale: str, workers: int, shard: str | None, force: bool, no_preview: bool):
    """Fit ground-truth detail maps: OUT/<subject>/<expression>/gt_maps/cam<i>.npz and preview.png.

    With the coefficients frozen, the deformation map (3x64x64) and displacement map (1x256x256)
    are fitted so the detailed surface matches the aligned scan with noisy regions masked (TV and
    L1 regularized). Maps are in model space: views with the same coefficients get the same maps.
    Each npz holds the maps, their valid masks, the coefficients and the fit residuals (mm). The
    capture is aligned first when its align.json is missing or stale. A failing capture is
    reported (its maps, if the inputs changed since, are removed) and the rest go on (exit
    status 1). Results are the same bytes on every run and for any --workers.
    """
    from facehd.detail import GTJob, gt_maps_dataset

    job = GTJob(align=_align_job(out, model_path, uv_path, coeffs_dir, scale, force), preview=not no_preview)
    _run_capture_batch(gt_maps_dataset, root, job, workers, shard, "fitted")


def _register_commands() -> None:
    from facehd.cli_dataset import stats, validate
    from facehd.cli_head import synth_flame
    from facehd.cli_landmarks import landmarks

    main.add_command(validate)
    main.add_command(stats)
    main.add_command(landmarks)
    synth.add_command(synth_flame)


_register_commands()

if __name__ == "__main__":
    main()
