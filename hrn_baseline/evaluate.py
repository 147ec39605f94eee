"""`hrn evaluate`: a model's errors on folders of in-the-wild images (`facehd.wild` format).

Every image gives its landmark error against the folder's 68 landmarks. Folders written by
`facehd synth wild` also hold each face's true shape and pose (``_truth/``); there the mid mesh M1
is compared with the truth by point-to-surface distance (truth front-region vertices -> the
predicted mesh's triangles), in three ways: posed, before pose, and before pose after a similarity
alignment. The trainer runs the same evaluation on ``data.val`` (see `hrn_baseline.train`).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from facehd import conventions as cv
from facehd.distance import point_to_surface
from facehd.errors import FaceHDError, FileFormatError, InputError
from facehd.fsutil import atomic_open, atomic_path
from facehd.morphable import rotation_matrix
from facehd.procrustes import fit_similarity
from facehd.synth.wild import TRUTH_DIR, WildTruth, read_truth, truth_path
from facehd.wild import WildImages, template5_from_model
from hrn_baseline.model import HRN, HRNOutput

METRICS = ("landmark_px", "posed_mm", "shape_mm", "aligned_shape_mm")
METRIC_NOTES = {
    "landmark_px": "mean distance of the 68 projected landmarks to the folder's, in pixels of a 224 crop",
    "posed_mm": "truth -> prediction point-to-surface, each face turned by its own head rotation (camera "
                "translation and scale left out: the 5-point crop changes them)",
    "shape_mm": "truth -> prediction point-to-surface before pose (identity and expression)",
    "aligned_shape_mm": "as shape_mm after a similarity alignment of the prediction's front region onto "
                        "the truth's (removes the scale that perspective leaves ambiguous)",
}
DEFAULT_BATCH_SIZE = 32
PREVIEW_IMAGES = 4  # rows of a preview sheet
PREVIEW_COLUMNS = ("input; landmarks: folder (green), model (red)", "R1: mid mesh (deformation)",
                   "R2: detail normals (displacement)")

Progress = Callable[..., Iterable]


@dataclass
class ImageErrors:
    """One image's errors; the truth errors are None for folders without synthetic ground truth."""

    folder: str
    name: str
    landmark_px: float
    posed_mm: float | None = None
    shape_mm: float | None = None
    aligned_shape_mm: float | None = None


@dataclass
class PreviewImage:
    """What a preview sheet shows of one image: the input crop, the two renders pasted onto it,
    and the folder's and the model's landmarks (crop pixels, x and row)."""

    name: str
    image: np.ndarray  # (S, S, 3) float in [0, 1]
    render_mid: np.ndarray  # (S, S, 3) R1 over the input
    render_high: np.ndarray  # (S, S, 3) R2 over the input
    landmarks: np.ndarray  # (68, 2) the folder's
    predicted: np.ndarray  # (68, 2) the model's (M1's keypoints)


@dataclass
class Evaluation:
    """Per-image errors of one evaluation, the images that could not be evaluated, and the first
    images' renders when a preview was asked for."""

    rows: list[ImageErrors] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (folder/name or folder, problem)
    preview: list[PreviewImage] = field(default_factory=list)

    def means(self) -> dict[str, float]:
        """The mean of each metric over the images that have it (metrics no image has are left out)."""
        return {k: float(np.mean(v)) for k, v in self.values().items() if v}

    def values(self) -> dict[str, list[float]]:
        return {k: [getattr(r, k) for r in self.rows if getattr(r, k) is not None] for k in METRICS}

    def write_csv(self, path: str | Path) -> Path:
        """One row per image (folder, name and the four metrics; empty where a folder has no truth)."""
        with atomic_open(path, newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["folder", "name", *METRICS])
            for r in self.rows:
                writer.writerow([r.folder, r.name, *("" if getattr(r, k) is None else f"{getattr(r, k):.6g}"
                                                     for k in METRICS)])
        return Path(path)


# ----------------------------------------------------------------------------------------------
# the distances


def truth_errors(predicted: np.ndarray, predicted_rotation: np.ndarray, truth: WildTruth, front: np.ndarray,
                 faces: np.ndarray) -> tuple[float, float, float]:
    """(posed, shape, aligned shape) mean point-to-surface distances in mm from the truth's ``front``
    vertices to the predicted mesh (``predicted`` (N, 3) model units before pose, ``faces`` (F, 3),
    ``predicted_rotation`` (3, 3) its head rotation, applied as vertices @ R^T like the truth's)."""
    shape = truth.shape.astype(np.float64)
    angle = cv.COEFF_SLICES["angle"]
    truth_rotation = rotation_matrix(torch.from_numpy(truth.coeffs[angle])[None].double())[0].numpy()
    posed = point_to_surface((shape @ truth_rotation.T)[front], predicted @ predicted_rotation.T, faces)
    direct = point_to_surface(shape[front], predicted, faces)
    moved = fit_similarity(predicted[front], shape[front]).apply(predicted)
    aligned = point_to_surface(shape[front], moved, faces)
    return tuple(float(d.mean()) * cv.MM_PER_MODEL_UNIT for d in (posed, direct, aligned))


# ----------------------------------------------------------------------------------------------
# evaluation


def evaluate(model: HRN, folders: Sequence[str | Path], *, aligned: bool = False,
             batch_size: int = DEFAULT_BATCH_SIZE, shard: tuple[int, int] = (0, 1), preview: int = 0,
             progress: Progress | None = None) -> Evaluation:
    """Evaluate ``model`` (left in the train / eval mode it came in) on in-the-wild ``folders``.

    ``aligned``: the images are already the model's crops (as `data.wild_aligned`). ``shard`` (k, n)
    evaluates images k, k + n, ... of each folder (the trainer's processes split the work).
    ``preview``: keep the renders of the first that many images for `save_preview`. An
    image or truth file that cannot be read is listed in ``failures`` and the rest go on; a truth
    shape of another morphable model raises `FileFormatError` (every image would fail). The global
    random state is not touched, so a run that validates resumes bit for bit.
    """
    if not folders:
        raise InputError("no image folder to evaluate")
    if batch_size < 1:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    morphable, size = model.morphable, model.image_size
    template5 = None if aligned else template5_from_model(morphable, size)
    front = morphable.front_vertices.cpu().numpy()
    faces = morphable.faces.cpu().numpy()
    device = next(model.parameters()).device
    result = Evaluation()
    was_training = model.training
    model.eval()
    try:
        for folder in map(Path, folders):
            try:
                data = WildImages(folder, template5, aligned=aligned, size=size)
            except FaceHDError as exc:
                result.failures.append((str(folder), str(exc)))
                continue
            with_truth = (folder / TRUTH_DIR).is_dir()
            indices = list(range(shard[0], len(data), shard[1]))
            batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
            if progress is not None:
                batches = progress(batches, total=len(batches), desc=f"evaluate {folder.name}", unit="batch")
            for chunk in batches:
                items, truths = [], []
                for i in chunk:
                    name = data.names[i]
                    try:
                        item = data[i]
                        truth = read_truth(truth_path(folder, name)) if with_truth else None
                    except FaceHDError as exc:
                        result.failures.append((f"{folder}/{name}", str(exc)))
                        continue
                    if truth is not None and truth.shape.shape[0] != morphable.n_vertices:
                        raise FileFormatError(truth_path(folder, name),
                                              f"the true shape has {truth.shape.shape[0]} vertices, the model "
                                              f"{morphable.n_vertices}: the folder was made with another "
                                              "morphable model")
                    items.append(item)
                    truths.append(truth)
                if items:
                    rows, out = _evaluate_batch(model, items, truths, folder, front, faces, device)
                    result.rows += rows
                    result.preview += _preview_images(items, out, preview - len(result.preview))
    finally:
        model.train(was_training)
    return result


def _evaluate_batch(model: HRN, items: list[dict], truths: list[WildTruth | None], folder: Path,
                    front: np.ndarray, faces: np.ndarray, device: torch.device
                    ) -> tuple[list[ImageErrors], HRNOutput]:
    batch = torch.utils.data.default_collate(items)
    with torch.no_grad():
        out = model(batch["image"].to(device), batch["mask"].to(device))
    unit = cv.IMAGE_SIZE / model.image_size
    landmark_px = ((out.landmarks.cpu() - batch["landmarks"]).norm(dim=-1).mean(-1) * unit).tolist()
    rotations = rotation_matrix(out.coeffs[:, cv.COEFF_SLICES["angle"]].double()).cpu().numpy()
    shapes = out.shape_mid.double().cpu().numpy()
    rows = []
    for b, (name, truth) in enumerate(zip(batch["name"], truths)):
        row = ImageErrors(folder=str(folder), name=name, landmark_px=float(landmark_px[b]))
        if truth is not None and not np.isfinite(shapes[b]).all():  # a diverged model: say so, go on
            row.posed_mm = row.shape_mm = row.aligned_shape_mm = float("nan")
        elif truth is not None:
            row.posed_mm, row.shape_mm, row.aligned_shape_mm = truth_errors(shapes[b], rotations[b], truth, front,
                                                                            faces)
        rows.append(row)
    return rows, out


def _preview_images(items: list[dict], out: HRNOutput, count: int) -> list[PreviewImage]:
    def pasted(render: torch.Tensor, b: int) -> np.ndarray:
        mask = out.render_mask[b].cpu()
        return (render[b].cpu() * mask + items[b]["image"] * (1 - mask)).clamp(0, 1).permute(1, 2, 0).numpy()

    return [PreviewImage(name=items[b]["name"], image=items[b]["image"].permute(1, 2, 0).numpy(),
                         render_mid=pasted(out.render_mid, b), render_high=pasted(out.render_high, b),
                         landmarks=np.asarray(items[b]["landmarks"]), predicted=out.landmarks[b].cpu().numpy())
            for b in range(min(max(count, 0), len(items)))]


def save_preview(images: Sequence[PreviewImage], path: str | Path, title: str | None = None) -> Path:
    """A PNG sheet, one row per image: the input with both landmark sets, R1 and R2 over the input."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    if not images:
        raise InputError("no image to preview")
    fig, axes = plt.subplots(len(images), 3, figsize=(9, 3 * len(images)), squeeze=False)
    try:
        for row, item in zip(axes, images):
            for ax, picture in zip(row, (item.image, item.render_mid, item.render_high)):
                ax.imshow(picture, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
            size = item.image.shape[0]
            marker = max(2.0, 6.0 * size / cv.IMAGE_SIZE)
            row[0].scatter(*item.landmarks.T, s=marker, c="lime", linewidths=0)
            row[0].scatter(*item.predicted.T, s=marker, c="red", linewidths=0)
            row[0].set_xlim(-0.5, size - 0.5)
            row[0].set_ylim(size - 0.5, -0.5)
            row[0].set_ylabel(item.name, fontsize=8)
        for ax, label in zip(axes[0], PREVIEW_COLUMNS):
            ax.set_title(label, fontsize=8)
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def _label_and_unit(metric: str) -> tuple[str, str]:
    """'aligned_shape_mm' -> ('aligned shape', 'mm')."""
    label, unit = metric.rsplit("_", 1)
    return label.replace("_", " "), unit


def metric_heading(metric: str) -> str:
    """A table heading: 'aligned_shape_mm' -> 'aligned shape (mm)'."""
    return "{} ({})".format(*_label_and_unit(metric))


def format_means(means: dict[str, float], count: int | None = None) -> str:
    """One line, e.g. 'landmark 6.86 px, posed 7.31 mm, shape 2.67 mm, aligned shape 2.40 mm'."""
    parts = []
    for key in METRICS:
        if key in means:
            label, unit = _label_and_unit(key)
            parts.append(f"{label} {means[key]:.3f} {unit}")
    text = ", ".join(parts) if parts else "no metric"
    return f"{text} ({count} images)" if count is not None else text


def initial_model(like: HRN) -> HRN:
    """A new HRN of ``like``'s configuration, morphable model and device, as training starts it
    (seeded, without touching the global random state): zero heads, so the mean face, frontal, on
    a random backbone (or on the pretrained weights the configuration names)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = HRN(like.morphable, like.config)
    return model.to(next(like.parameters()).device).eval()


def format_table(evaluations: dict[str, Evaluation]) -> str:
    """A text table: one row per evaluated model (its label), the image count and each metric's mean."""
    means = {label: e.means() for label, e in evaluations.items()}
    present = [k for k in METRICS if any(k in m for m in means.values())]
    headers = ["model", "images", *map(metric_heading, present)]
    body = [[label, str(len(e.rows)), *(f"{means[label][k]:.3f}" if k in means[label] else "-" for k in present)]
            for label, e in evaluations.items()]
    widths = [max(len(r[i]) for r in [headers, *body]) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [headers, *body]]
    return "\n".join(lines)
