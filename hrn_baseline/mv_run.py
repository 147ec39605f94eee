"""`hrn mv` without the command line: load the model, fit one capture or folder of views, fuse,
and write the results into a folder that appears whole (written under a temporary name, then
renamed); and the resumable batch over a FaceHD-100 root (`facehd.batch`)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from facehd.align import capture_name, dataset_captures
from facehd.batch import BatchReport, ItemResult, Progress, Shard, inputs_digest, run_item, run_resumable
from facehd.capture import CaptureRef, capture_paths
from facehd.errors import FileFormatError, InputError
from facehd.fsutil import atomic_open, owner_tag, remove_stale_folders
from hrn_baseline.config import ModelConfig
from hrn_baseline.fuse import fit_coefficients, fuse, view_result, write_preview, write_result
from hrn_baseline.model import HRN, load_hrn_morphable
from hrn_baseline.mv import FUSED_EXPRESSIONS, MVConfig, fit_multiview
from hrn_baseline.mv_inputs import MIN_VIEWS, ViewSet, read_capture_views, read_folder_views
from hrn_baseline.preprocess import standard_landmarks

RESULT_JSON = "mv.json"  # written last into each result folder: its presence means the folder is whole
FORMAT_VERSION = 1
FUSED_DIR = "fused"
VIEWS_DIR = "views"
# without a checkpoint only the face model is used: the networks are built as small as they go
NO_NETWORKS = dict(backbone="resnet18", mid_ngf=1, mid_blocks=1, high_ngf=1, high_blocks=1, disc_ndf=1, disc_layers=1)


@dataclass(frozen=True)
class MVJob:
    """Everything a fit needs besides its input (picklable for worker processes)."""

    out: Path
    config: MVConfig = MVConfig()
    checkpoint: Path | None = None
    model_config: Path | None = None  # a YAML whose model section names the morphable model and sizes
    units: str = "model"
    per_view: bool = False
    preview: bool = True
    views: tuple[str, ...] | None = None  # camera names of a capture to use (default: all)
    force: bool = False

    def params(self) -> dict:
        """What the results depend on besides the input files (for the resume digest)."""
        checkpoint = None
        if self.checkpoint is not None:
            stat = Path(self.checkpoint).stat()
            checkpoint = [str(Path(self.checkpoint).resolve()), stat.st_size, stat.st_mtime_ns]
        return {"tool": "hrn mv", "version": FORMAT_VERSION, "config": dataclasses.asdict(self.config),
                "checkpoint": checkpoint, "model_config": str(self.model_config), "units": self.units,
                "per_view": self.per_view, "preview": self.preview, "views": self.views}


@functools.cache
def load_mv_model(checkpoint: Path | None, model_config: Path | None, device: str = "auto") -> HRN:
    """The HRN of a checkpoint (`hrn_baseline.predict.load_model`), or without one the face model
    alone (the model config's morphable model, default SynthBFM, at the paper's map sizes)."""
    from hrn_baseline.checkpoints import read_model_config
    from hrn_baseline.predict import load_model
    from hrn_baseline.train import resolve_device

    config = None if model_config is None else read_model_config(model_config)
    if checkpoint is not None:
        return load_model(checkpoint, device, config)
    config = dataclasses.replace(config or ModelConfig(), **NO_NETWORKS)
    return HRN(load_hrn_morphable(config), config).to(resolve_device(device)).eval()


def reconstruct_views(model: HRN, views: ViewSet, out: str | Path, job: MVJob, *, source: str,
                      progress: Progress | None = None) -> list[Path]:
    """Fit ``views`` and write ``out``/fused/ (and views/<name>/ with ``job.per_view``), preview.png
    and mv.json, into a temporary folder renamed to ``out`` at the end."""
    names = [v.name for v in views.views]
    if job.config.expression not in (*FUSED_EXPRESSIONS, *names):
        raise InputError(f"--expression {job.config.expression!r} is not zero, mean or one of the views "
                         f"({', '.join(names)})")
    fit = fit_multiview(model, views.views, job.config, from_checkpoint=job.checkpoint is not None, progress=progress)
    fused = fuse(model, fit, job.config.expression)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # named as `facehd.fsutil.owned_temporary_folder` names its folders, so a killed run's is found
    tmp = Path(tempfile.mkdtemp(prefix=f"{temporary_prefix(out)}{owner_tag()}-", dir=out.parent))
    try:
        coeffs = fit_coefficients(fit, job.units)
        files = write_result(tmp / FUSED_DIR, model, fused, units=job.units, source=source, coeffs=coeffs)
        if job.per_view:
            for i, view in enumerate(fit.views):
                files += write_result(tmp / VIEWS_DIR / view.name, model, view_result(model, fit, i), units=job.units,
                                      source=str(view.source))
        if job.preview:
            files.append(write_preview(tmp / "preview.png", model, fit, fused))
        summary = {"source": source, "views": [v.name for v in fit.views], "skipped_views": views.skipped,
                   "calibrated": fit.state.calibrated, "expression": fused.expression, "units": job.units,
                   "iterations": job.config.iterations, "final_losses": fit.losses,
                   "fused_valid_texels": int(fused.valid.sum())}
        with atomic_open(tmp / RESULT_JSON) as fh:
            json.dump(summary, fh, indent=2)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / f.relative_to(tmp) for f in files] + [out / RESULT_JSON]


def temporary_prefix(out: Path) -> str:
    """The name prefix of the temporary folder a result folder ``out`` is written in."""
    return f".{out.name}.part-"


def mv_capture(directory: str | Path, job: MVJob, *, out: str | Path | None = None, device: str = "auto",
               progress: Progress | None = None) -> tuple[list[Path], list[str]]:
    """Fit one capture folder into ``out`` (default ``job.out``): (files, skipped-view lines)."""
    model = load_mv_model(job.checkpoint, job.model_config, device)
    standard68 = standard_landmarks(model.morphable)
    directory = Path(directory)
    views = read_capture_views(directory, standard68, model.image_size, views=list(job.views) if job.views else None,
                               calibrated=job.config.calibrated).require(directory)
    files = reconstruct_views(model, views, out or job.out, job, source=str(directory), progress=progress)
    return files, views.skipped


def mv_images(images: str | Path, job: MVJob, *, landmarks: str | Path | None = None, device: str = "auto",
              progress: Progress | None = None) -> tuple[list[Path], list[str]]:
    """Fit a folder of images of one person (uncalibrated) into ``job.out``."""
    model = load_mv_model(job.checkpoint, job.model_config, device)
    images = Path(images)
    if not images.is_dir():
        raise FileFormatError(images, "no such image folder")
    if landmarks is not None and not Path(landmarks).is_dir():
        raise FileFormatError(Path(landmarks), "no such landmark folder (<image stem>.txt per image)")
    views = read_folder_views(images, landmarks, standard_landmarks(model.morphable), model.image_size,
                              detected_out=job.out)
    views.require(images)
    if job.checkpoint is None and not any(view.visible.any() for view in views.views):
        raise InputError(f"{images}: no view has landmarks, and without a checkpoint the fit starts from them: "
                         "give --landmarks DIR, <stem>.txt files beside the images, or a checkpoint")
    uncalibrated = dataclasses.replace(job, config=dataclasses.replace(job.config, calibrated=False))
    return reconstruct_views(model, views, job.out, uncalibrated, source=str(images), progress=progress), views.skipped


# ----------------------------------------------------------------------------------------------
# the batch over a FaceHD-100 root


def result_folder(ref: CaptureRef, out: str | Path) -> Path:
    return Path(out) / ref.subject / ref.expression


def _digest(ref: CaptureRef, job: MVJob) -> str:
    paths = capture_paths(ref.directory)
    files = [paths.cameras if paths.cameras.is_file() else None]
    files += [p if p.is_file() else None for p in (*paths.images, *paths.landmarks68)]
    return inputs_digest(files, job.params())


def mv_up_to_date(ref: CaptureRef, job: MVJob) -> bool:
    """Whether the capture's results were written from the current inputs and settings."""
    if job.force:
        return False
    try:
        summary = json.loads((result_folder(ref, job.out) / RESULT_JSON).read_text())
        return summary.get("inputs_digest") == _digest(ref, job)
    except (OSError, ValueError, FileFormatError):
        return False


def _fit_capture(ref: CaptureRef, job: MVJob, device: str) -> str:
    folder = result_folder(ref, job.out)
    digest = _digest(ref, job)
    mv_capture(ref.directory, job, out=folder, device=device)
    summary_path = folder / RESULT_JSON
    summary = json.loads(summary_path.read_text())
    summary["inputs_digest"] = digest
    with atomic_open(summary_path) as fh:
        json.dump(summary, fh, indent=2)
    return "done"


def mv_task(job: MVJob, ref: CaptureRef, device: str = "auto") -> ItemResult:
    """One capture as a batch item (module level, so worker processes can run it)."""
    return run_item(capture_name(ref), lambda: _fit_capture(ref, job, device))


def mv_dataset(root: str | Path, job: MVJob, *, workers: int = 1, shard: Shard | None = None, device: str = "auto",
               progress: Progress | None = None, on_result=None) -> BatchReport:
    """Fit every capture of a FaceHD-100 root (this shard of them) into OUT/<subject>/<expression>/;
    up-to-date captures are skipped, a failing capture is reported and the rest go on."""
    refs = (shard or Shard()).select(dataset_captures(root, job.out))
    for ref in refs:  # what runs killed before renaming their result folder left behind
        folder = result_folder(ref, job.out)
        remove_stale_folders(folder.parent, temporary_prefix(folder))
    return run_resumable(refs, name=capture_name, up_to_date=functools.partial(mv_up_to_date, job=job),
                         task=functools.partial(_task_with_device, device), prepare=lambda: contextlib.nullcontext(job),
                         workers=workers, progress=progress, on_result=on_result, desc="hrn mv")


def _task_with_device(device: str, job: MVJob, ref: CaptureRef) -> ItemResult:
    return mv_task(job, ref, device)


__all__ = ["MIN_VIEWS", "MVJob", "load_mv_model", "mv_capture", "mv_dataset", "mv_images", "reconstruct_views"]


def run_mv(config: MVConfig, out: Path, *, checkpoint: Path | None = None, model_config: Path | None = None,
           capture: Path | None = None, images: Path | None = None, landmarks: Path | None = None,
           root: Path | None = None, views: str | None = None, per_view: bool = False, preview: bool = True,
           units: str = "model", workers: int = 1, shard: str | None = None, force: bool = False,
           progress: Progress | None = None, echo=print) -> int:
    """What `hrn mv` does, printing through ``echo``; returns the exit status (1 when a capture
    failed)."""
    from facehd.batch import resolve_shard

    names = tuple(v.strip() for v in views.split(",") if v.strip()) if views else None
    job = MVJob(out=Path(out), config=config, checkpoint=checkpoint, model_config=model_config, units=units,
                per_view=per_view, preview=preview, views=names, force=force)
    device = config.device
    if root is not None:
        resolved = resolve_shard(shard)

        def report(result: ItemResult) -> None:
            if result.status == "failed":
                echo(f"FAILED {result.name}: {result.message}")

        result = mv_dataset(root, job, workers=workers, shard=resolved, device=device, progress=progress,
                            on_result=report)
        counts = result.counts()
        where = "" if resolved.count == 1 else f" (shard {resolved})"
        echo(f"{len(result.results)} captures{where}: {counts['done']} fitted, {counts['skipped']} up to date, "
             f"{counts['failed']} failed")
        return 1 if result.failed else 0
    fit_progress = None if progress is None else (lambda items, **kw: progress(items, **kw))
    if capture is not None:
        files, skipped = mv_capture(capture, job, device=device, progress=fit_progress)
    else:
        files, skipped = mv_images(images, job, landmarks=landmarks, device=device, progress=fit_progress)
    for line in skipped:
        echo(f"skipped view: {line}")
    echo(f"{len(files)} files in {job.out} (fused result in {job.out / FUSED_DIR}, {units} units)")
    return 0
