"""The `hrn` command line: HRN training and prediction, and the multi-view MV-HRN fit (`hrn mv`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from facehd.clitools import reports_errors
from hrn_baseline.environment import environment_report


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """hrn: train and run HRN (hierarchical representation network) models."""


@main.command()
def info():
    """Show library versions, devices and the renderer back ends usable on this machine."""
    report = environment_report()
    width = max(len(k) for k in report)
    for key, value in report.items():
        click.echo(f"{key.ljust(width)}  {value}")


def _echo_log_lines() -> logging.Handler:
    """Show the trainer's log lines (also in OUT/train.log) on stderr, keeping stdout for results."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("hrn_baseline.train")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="YAML config (see configs/hrn_default.yaml and configs/hrn_tiny_cpu.yaml).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder for logs and checkpoints (default: train.out of the config).")
@click.option("--resume", is_flag=True, help="Continue exactly from OUT/checkpoints/last.pt.")
@reports_errors
def train(config_path: Path, out: Path | None, resume: bool):
    """Train HRN: alternating L_self (in-the-wild images) and L_super (in-the-lab images with GT
    maps) iterations, with metrics in OUT/metrics.csv, OUT/metrics.jsonl and OUT/loss_curve.png and
    checkpoints in OUT/checkpoints/. Under `torchrun --nproc_per_node N` it trains with DDP."""
    import os

    from facehd.clitools import progress
    from hrn_baseline.config import load_config
    from hrn_baseline.train import train as run_training

    config = load_config(config_path)
    main_process = os.environ.get("RANK", "0") == "0"
    handler = _echo_log_lines() if main_process else None
    try:
        result = run_training(config, out, resume=resume, progress=progress)
    finally:
        if handler is not None:
            logging.getLogger("hrn_baseline.train").removeHandler(handler)
    if main_process:
        click.echo(f"trained steps {result.start_step}..{result.steps} in {result.seconds:.1f} s; "
                   f"last checkpoint {result.last_checkpoint}; logs in {result.out}")


MODEL_CONFIG_HELP = ("For a public checkpoint: a YAML config whose model section names the morphable model "
                     "(BFM_model_front.mat) and UV file (default: the paper's sizes on SynthBFM).")


@main.command()
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A checkpoint written by `hrn train` (OUT/checkpoints/last.pt), or the public weights "
                   "(Deep3DFaceRecon's epoch_20.pth, HRN's epoch_10.pth).")
@click.option("--config", "model_config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=MODEL_CONFIG_HELP)
@click.option("--standard-landmarks", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Deep3DFaceRecon's similarity_Lm3D_all.mat for the crop (default: the one beside the morphable "
                   "model file, else a stand-in from the model's landmarks).")
@click.option("--images", "images", multiple=True, required=True, type=click.Path(path_type=Path),
              help="An image file or a folder of images; repeat the option for more.")
@click.option("--landmarks", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of <image stem>.txt files with 68 lines 'x y' or 'x y visible' (pixels; facehd's "
                   "landmarks68/cam<i>.txt form): images are aligned to the "
                   "model's crop with them. Without it: <stem>.txt beside each image, else landmarks from the face "
                   "detector (bash scripts/setup.sh --detect; kept in OUT/detected_landmarks); images of the "
                   "model's input size are taken as pre-cropped.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder: one sub-folder per image.")
@click.option("--units", type=click.Choice(["model", "mm"]), default="model", show_default=True,
              help="Units of the meshes, maps and translation (1 model unit = 100 mm).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, or a torch device string.")
@reports_errors
def predict(checkpoint: Path | None, model_config: Path | None, standard_landmarks: Path | None,
            images: tuple[Path, ...], landmarks: Path | None, out: Path, units: str, device: str):
    """Reconstruct faces: per image the coarse, mid and high meshes (OBJ with UVs and texture), the
    deformation and displacement maps (.npy and 16-bit grey PNGs, one per channel, decoding in maps.json), the
    coefficients (.npz) and overlay.png (the render on the photo). Bad images are reported and
    skipped."""
    from facehd.clitools import progress
    from hrn_baseline.checkpoints import read_model_config
    from hrn_baseline.predict import predict as run_prediction

    config = None if model_config is None else read_model_config(model_config)
    results = run_prediction(checkpoint, images, out, landmarks=landmarks, units=units, device=device,
                             progress=progress, model_config=config, standard_landmarks=standard_landmarks)
    failed = [r for r in results if r.error]
    for r in results:
        click.echo(f"{r.name}: {'FAILED ' + r.error if r.error else f'{len(r.files)} files in {out / r.name}'}")
    click.echo(f"{len(results) - len(failed)} of {len(results)} images reconstructed ({units} units)")
    if failed:
        sys.exit(1)


@main.command("export-checkpoint")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="A checkpoint written by `hrn train`, or a public one.")
@click.option("--config", "model_config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=MODEL_CONFIG_HELP)
@click.option("--layout", type=click.Choice(["hrn", "deep3dfacerecon"]), default="hrn", show_default=True,
              help="hrn: net_recon, mid_net, high_net, alpha, beta (HRN's epoch_10.pth); deep3dfacerecon: "
                   "net_recon only (epoch_20.pth).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The .pth to write.")
@reports_errors
def export_checkpoint(checkpoint: Path, model_config: Path | None, layout: str, out: Path):
    """Write a checkpoint's networks in the public layout that Deep3DFaceRecon's and HRN's code
    load (the networks must have the paper's sizes)."""
    from hrn_baseline.checkpoints import export_public, model_from_checkpoint, read_model_config

    config = None if model_config is None else read_model_config(model_config)
    path = export_public(model_from_checkpoint(checkpoint, config), out, kind=layout)
    click.echo(f"wrote {path} ({layout} layout)")


@main.command()
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="A checkpoint written by `hrn train` (OUT/checkpoints/last.pt).")
@click.option("--images", "folders", multiple=True, required=True, type=click.Path(path_type=Path),
              help="A folder in the in-the-wild layout (list.txt, images/, landmarks/, masks/), e.g. from "
                   "`facehd synth wild`, whose _truth/ adds the errors in mm; repeat the option for more.")
@click.option("--aligned", is_flag=True, help="The images are already the model's crops (no 5-point alignment).")
@click.option("--baseline", is_flag=True,
              help="Also evaluate the model as training starts it (zero heads: the mean face, frontal).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the checkpoint's per-image errors to this CSV.")
@click.option("--preview", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG sheet of the first images: input with landmarks, and the renders R1 and R2.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, or a torch device string.")
@reports_errors
def evaluate(checkpoint: Path, folders: tuple[Path, ...], aligned: bool, baseline: bool, out: Path | None,
             preview: Path | None, batch_size: int, device: str):
    """Measure a checkpoint on held-out images: the landmark error against the folders' 68 landmarks
    (pixels of a 224 crop) and, on synthetic folders with ground truth, the point-to-surface errors
    of the mid mesh against the true face (mm; truth -> prediction). Unreadable images are reported
    and skipped (exit status 1)."""
    from facehd.clitools import progress
    from hrn_baseline.evaluate import METRIC_NOTES, PREVIEW_IMAGES, format_table, initial_model, save_preview
    from hrn_baseline.evaluate import evaluate as run_evaluation
    from hrn_baseline.predict import load_model

    model = load_model(checkpoint, device=device)
    evaluations = {}
    if baseline:
        evaluations["initialisation"] = run_evaluation(initial_model(model), folders, aligned=aligned,
                                                       batch_size=batch_size, progress=progress)
    result = evaluations[str(checkpoint)] = run_evaluation(model, folders, aligned=aligned, batch_size=batch_size,
                                                           preview=PREVIEW_IMAGES if preview else 0,
                                                           progress=progress)
    click.echo(format_table(evaluations))
    for key in result.means():
        click.echo(f"  {key}: {METRIC_NOTES[key]}")
    if out is not None:
        click.echo(f"per-image errors: {result.write_csv(out)}")
    if preview is not None and result.preview:
        click.echo(f"preview: {save_preview(result.preview, preview, title=str(checkpoint))}")
    for where, problem in result.failures:
        click.echo(f"FAILED {where}: {problem}")
    if result.failures:
        sys.exit(1)


@main.command("mv")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Start from this model's per-view predictions (a `hrn train` checkpoint or HRN's epoch_10.pth); "
                   "without it the fit starts from the mean face and the landmarks.")
@click.option("--model-config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="YAML whose model section names the morphable model and map sizes (default: SynthBFM, the "
                   "paper's sizes).")
@click.option("--config", "mv_config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="MV-HRN settings (configs/mv_hrn.yaml: loss preset and weights, iterations, learning rate).")
@click.option("--capture", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="One FaceHD-100 capture folder (images/, landmarks68/, cameras.json).")
@click.option("--images", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A folder of images of one person (uncalibrated).")
@click.option("--landmarks", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --images: <image stem>.txt files of 68 lines 'x y' or 'x y visible'.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A FaceHD-100 root: every capture, into OUT/<subject>/<expression>/ (resumable).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--iterations", type=click.IntRange(min=0), default=None, help="Fit iterations [default: config, 50].")
@click.option("--lr", type=click.FloatRange(min=0), default=None, help="Adam learning rate [default: config, 1e-3].")
@click.option("--device", default=None, help="auto, cpu, or a torch device string [default: config, auto].")
@click.option("--uncalibrated", is_flag=True, help="Ignore cameras.json: one free pose per view (as upstream).")
@click.option("--expression", default=None,
              help="Expression of the fused mesh: zero, mean, or a view's name [default: config, zero].")
@click.option("--views", default=None, help="Comma-separated camera names of a capture to use (default: all).")
@click.option("--per-view", is_flag=True, help="Also write each view's own result under views/<name>/.")
@click.option("--no-preview", is_flag=True, help="Skip preview.png.")
@click.option("--units", type=click.Choice(["model", "mm"]), default="model", show_default=True,
              help="Units of the meshes, maps and translations (1 model unit = 100 mm).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --root: captures fitted in parallel (processes).")
@click.option("--shard", default=None, metavar="K/N", help="With --root: only captures K, K+N, ... (0 <= K < N).")
@click.option("--force", is_flag=True, help="With --root: refit captures whose results are up to date.")
@reports_errors
def mv(checkpoint, model_config, mv_config, capture, images, landmarks, root, out, iterations, lr, device,
       uncalibrated, expression, views, per_view, no_preview, units, workers, shard, force):
    """MV-HRN: fit the views of one person jointly (shared identity and deformation map; per view
    expression, texture, lighting, pose and displacement map) and write one fused result in the
    canonical pose (OUT/fused: coarse, mid and high OBJ with texture, maps, coefficients), the
    preview sheet and mv.json. Views that cannot be used are reported and skipped; a capture needs
    two usable views."""
    from facehd.clitools import progress
    from hrn_baseline.mv import load_mv_config
    from hrn_baseline.mv_run import run_mv

    sources = [name for name, value in (("--capture", capture), ("--images", images), ("--root", root)) if value]
    if len(sources) != 1:
        raise click.UsageError("give exactly one of --capture, --images or --root")
    config = load_mv_config(mv_config, iterations=iterations, lr=lr, device=device, expression=expression,
                            calibrated=False if uncalibrated else None)
    code = run_mv(config, out, checkpoint=checkpoint, model_config=model_config, capture=capture, images=images,
                  landmarks=landmarks, root=root, views=views, per_view=per_view, preview=not no_preview, units=units,
                  workers=workers, shard=shard, force=force, progress=progress, echo=click.echo)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
