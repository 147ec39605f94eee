"""`hrn train`: HRN's alternating L_self (in-the-wild) / L_super (in-the-lab) training with PatchGAN
discriminators, CSV / JSONL / PNG logs, atomic checkpoints, exact resume and DDP under torchrun."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from facehd import conventions as cv
from facehd.errors import FileFormatError, InputError
from facehd.fsutil import atomic_open, atomic_path
from facehd.morphable import rigid_transform, split_coeffs, to_camera
from facehd.wild import WildImages, template5_from_model
from hrn_baseline.checkpoints import load_weights_into, torch_load
from hrn_baseline.config import COEFF_REG_EXP, COEFF_REG_ID, COEFF_REG_TEX, Config
from hrn_baseline.data import LabViews, wild_dataset
from hrn_baseline.evaluate import METRICS, PREVIEW_IMAGES, evaluate, format_means, save_preview
from hrn_baseline.face_recognition import FaceRecognizer, landmarks68_to_5
from hrn_baseline.losses import (
    LossWeights,
    contour_loss,
    displacement_l1,
    landmark_loss,
    landmark_weights,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    map_l1,
    perceptual_loss,
    photometric_loss,
    total_self_loss,
    total_super_loss,
    tv_loss,
)
from hrn_baseline.model import HRN, HRNOutput, load_hrn_morphable, make_discriminators, project_rows

LOGGER = logging.getLogger("hrn_baseline.train")
CHECKPOINT_FORMAT = "hrn-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"  # the lowest validation value of train.best_metric
STEP_CHECKPOINT = "step_{:07d}.pt"
METRICS_CSV = "metrics.csv"
METRICS_JSONL = "metrics.jsonl"
LOSS_CURVE_PNG = "loss_curve.png"
TRAIN_LOG = "train.log"
CONFIG_COPY = "config.yaml"
PREVIEW_DIR = "previews"  # previews/step_<step>.png at each validation
MAP_NAMES = ("mid", "high")  # discriminator / map names: deformation ("mid"), displacement ("high")
PLOTTED = ("self/total", "super/total", "disc/total")
VAL_PREFIX = "val/"  # validation metrics in the logs: val/landmark_px, val/posed_mm, ...

Progress = Callable[..., Iterable]  # progress(iterable, total=n, desc=text, unit=text), e.g. tqdm


@dataclass
class TrainResult:
    """What `train` did (rank 0's view)."""

    out: Path
    start_step: int
    steps: int  # the step count reached
    last_checkpoint: Path | None
    last_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # warnings also written to train.log
    threads: int = 0  # CPU threads per process (torch intra-op)
    best: dict | None = None  # {"metric": "val/...", "value": ..., "step": ...} of checkpoints/best.pt


# ----------------------------------------------------------------------------------------------
# processes and devices


@dataclass(frozen=True)
class Processes:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes of the job on this machine

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _processes_from_env() -> Processes:
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; plain runs have none of them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Processes(rank=int(os.environ.get("RANK", "0")), world=world,
                     local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                     local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def cpu_threads(requested: int | None, local_world: int = 1) -> tuple[int, str]:
    """(threads per process, why). ``requested`` (train.threads) wins; else OMP_NUM_THREADS when set
    (torchrun sets it to 1 for several processes); else the cores this process may use divided among
    the job's processes on this machine. torch's own default takes every core for each process,
    which on shared or oversubscribed cores made a step 5-10x slower than one thread."""
    if requested is not None:
        return int(requested), "train.threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world)), f"{cores} core(s) / {local_world} process(es) on this machine"


def _one_thread_worker(_worker_id: int) -> None:
    """DataLoader workers decode and warp images in parallel processes: one thread each (torch and
    the BLAS / OpenMP pools numpy uses), so N workers do not each spin up a pool of all the cores."""
    torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto": the machine's accelerator if there is one, else the CPU. An accelerator without an
    index ("auto", "cuda") gets one per local rank, so that each torchrun process has its own; one
    that is not there is an `InputError`."""
    if name == "auto":
        # a CUDA build names its accelerator even on a machine without a GPU: ask whether it is usable
        usable = hasattr(torch, "accelerator") and torch.accelerator.is_available()
        accelerator = torch.accelerator.current_accelerator() if usable else None
        name = accelerator.type if accelerator is not None else "cpu"
    device = torch.device(name)
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    count = backend.device_count() if hasattr(backend, "device_count") else 0
    if (device.index or 0) >= count:
        raise InputError(f"device {name!r} is not usable here: {count} {device.type} device(s) visible; "
                         "use 'cpu', or 'auto' for the machine's accelerator if it has one")
    return device if device.index is not None else torch.device(device.type, local_rank % count)


# ----------------------------------------------------------------------------------------------
# data order that survives a resume


class BatchStream:
    """Endless batches of a dataset in an order fixed by (seed, epoch), so that a resumed run sees
    exactly the batches the uninterrupted one would have: epoch e is `DistributedSampler`'s shuffle
    for epoch e (this rank's share), cut into full batches; ``position`` counts the batches used."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, procs: Processes, num_workers: int = 0,
                 name: str = "data"):
        self.dataset, self.batch_size, self.seed, self.procs = dataset, batch_size, seed, procs
        self.num_workers, self.name = num_workers, name
        self.epoch, self.position = 0, 0
        self._iterator = None
        if self.batches_per_epoch == 0:
            raise InputError(f"the {name} set has {len(dataset)} samples, fewer than batch_size {batch_size} x "
                             f"{procs.world} process(es)")

    @property
    def batches_per_epoch(self) -> int:
        return (len(self.dataset) // self.procs.world) // self.batch_size

    def _batches(self, epoch: int) -> list[list[int]]:
        sampler = DistributedSampler(self.dataset, num_replicas=self.procs.world, rank=self.procs.rank,
                                     shuffle=True, seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch)
        indices = list(sampler)
        n = len(indices) // self.batch_size
        return [indices[i * self.batch_size:(i + 1) * self.batch_size] for i in range(n)]

    def _start(self) -> None:
        batches = self._batches(self.epoch)[self.position:]
        # a DataLoader draws its workers' base seed from the global RNG unless given a generator;
        # that draw would make a resumed run's dropout differ from the uninterrupted run's
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers, generator=generator,
                            worker_init_fn=_one_thread_worker if self.num_workers else None)
        self._iterator = iter(loader)

    def next(self) -> dict:
        if self._iterator is None:
            self._start()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch, self.position = self.epoch + 1, 0
            self._start()
            batch = next(self._iterator)
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._iterator = None


# ----------------------------------------------------------------------------------------------
# losses of one iteration


def coefficient_regularizer(coeffs: torch.Tensor) -> torch.Tensor:
    """Deep3DFaceRecon's `reg_loss`: (w_id |id|^2 + w_exp |exp|^2 + w_tex |tex|^2) / B."""
    c = split_coeffs(coeffs)
    total = COEFF_REG_ID * (c.id**2).sum() + COEFF_REG_EXP * (c.exp**2).sum() + COEFF_REG_TEX * (c.tex**2).sum()
    return total / coeffs.shape[0]


def gamma_regularizer(coeffs: torch.Tensor) -> torch.Tensor:
    """Deep3DFaceRecon's `gamma_loss`: the variance of the SH lighting across colour channels
    (it prefers white light, leaving colour to the albedo)."""
    gamma = split_coeffs(coeffs).gamma.reshape(-1, 3, 9)
    return ((gamma - gamma.mean(dim=1, keepdim=True)) ** 2).mean()


def deformation_projection(out: HRNOutput) -> torch.Tensor:
    """(B, N, 2) M1's projection with gradients to the deformation map only.

    HRN's contour-aware loss shapes the mid-frequency deformation (its base model is frozen); fed
    to a regressor that trains too, its silhouette pull would bend the identity and pose instead.
    """
    coarse = out.coarse
    shape = coarse.shape.detach() + out.offsets_mid
    trans = split_coeffs(out.coeffs).trans.detach()
    vertices_cam = to_camera(rigid_transform(shape, coarse.rotation.detach(), trans))
    return project_rows(vertices_cam, out.render_mask.shape[-1])


def generator_terms(out: HRNOutput, batch: dict, recognizer: nn.Module, front_vertices: torch.Tensor, *,
                    has_face_mask: bool, discriminators: nn.ModuleDict | None = None) -> dict[str, torch.Tensor]:
    """The unweighted L_self terms of one batch (names of `losses.SELF_TERMS`).

    Landmark distances are measured in 224-pixel units whatever the model's image size, so the
    paper's weight keeps its meaning; the contour term needs a real face mask (in-the-wild data).
    """
    images, mask = batch["image"], batch["mask"]
    size = images.shape[-1]
    photo_mask = out.render_mask * mask
    landmarks5 = landmarks68_to_5(batch["landmarks"])
    unit = cv.IMAGE_SIZE / size
    weights = landmark_weights(dtype=images.dtype, device=images.device) * batch["landmark_weight"]
    terms = {}
    for level, render in (("mid", out.render_mid), ("high", out.render_high)):
        terms[f"photo_{level}"] = photometric_loss(render, images, photo_mask)
        # the recogniser compares whole crops: paste the face onto the input so only the face differs
        composite = render * out.render_mask + images * (1 - out.render_mask)
        terms[f"perceptual_{level}"] = perceptual_loss(recognizer, composite, images, landmarks5)
    terms["landmark"] = landmark_loss(out.landmarks * unit, batch["landmarks"] * unit, weights)
    terms["tv"] = tv_loss(out.deformation)
    terms["reg"] = displacement_l1(out.displacement)
    if has_face_mask:
        # the face mask shows the model's front region (no hair band, no border): contour those vertices
        terms["contour"] = contour_loss(deformation_projection(out)[:, front_vertices], mask[:, 0], image_size=size)
    if discriminators is not None:
        terms["adv_mid"] = lsgan_generator_loss(discriminators["mid"](out.deformation))
        terms["adv_high"] = lsgan_generator_loss(discriminators["high"](out.displacement))
    return terms


def supervised_terms(out: HRNOutput, batch: dict) -> dict[str, torch.Tensor]:
    """L_super's extra terms: L1 to the ground-truth maps on their masks."""
    return {"mid": map_l1(out.deformation, batch["deformation"], batch["deformation_mask"]),
            "high": map_l1(out.displacement, batch["displacement"], batch["displacement_mask"])}


# ----------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """Holds the model, optimisers, data streams and logs of one run; `run` trains."""

    def __init__(self, config: Config, out: Path, procs: Processes, progress: Progress | None = None, *,
                 resume: bool = False):
        self.config, self.out, self.procs, self.progress = config, out, procs, progress
        self.notes: list[str] = []
        self.device = resolve_device(config.train.device, procs.local_rank)
        torch.manual_seed(config.train.seed)  # the same initial weights on every rank
        self.weights: LossWeights = config.loss.loss_weights()
        morphable = load_hrn_morphable(config.model)
        self.hrn = HRN(morphable, config.model).to(self.device)
        if config.model.init_from is not None and not resume:  # a resumed run has its own weights
            load_weights_into(self.hrn, config.model.init_from)
        self.train_regressor = not config.model.freeze_regressor
        self.hrn.regressor.requires_grad_(self.train_regressor)
        self.recognizer = self._recognizer().to(self.device)
        template5 = template5_from_model(morphable, config.model.image_size)
        self._make_streams(template5)
        self.discriminators = make_discriminators(config.model).to(self.device) if self.lab else None
        self.model: nn.Module = self.hrn
        if procs.distributed:
            ids = [self.device.index] if self.device.type != "cpu" else None
            # buffers are not broadcast: they hold the morphable model (~100 MB at BFM size) besides
            # the BatchNorm statistics, which train-mode forwards do not use
            self.model = DistributedDataParallel(self.hrn, device_ids=ids, broadcast_buffers=False)
            if self.discriminators is not None:
                _broadcast_module(self.discriminators)
        self._make_optimizers()
        self.step = 0
        self.best: dict | None = None  # {"metric", "value", "step"} of checkpoints/best.pt
        self._best_unmeasured_noted = False
        self.metrics_log = MetricsLog(out, fresh=not resume) if procs.main else None

    # --- construction -------------------------------------------------------------------------

    def _note(self, text: str) -> None:
        self.notes.append(text)
        LOGGER.warning(text)

    def _recognizer(self) -> FaceRecognizer:
        path = self.config.loss.recognizer_weights
        if path is None:
            self._note("loss.recognizer_weights is null: the perceptual loss uses a small randomly initialised "
                       "stand-in network, not ArcFace (set it to an arcface_torch backbone.pth for real training)")
            return FaceRecognizer.small_random(seed=self.config.train.seed)
        return FaceRecognizer.from_file(path, self.config.loss.recognizer_arch)

    def _make_streams(self, template5: np.ndarray) -> None:
        data, train, size = self.config.data, self.config.train, self.config.model.image_size
        wild = wild_dataset(data.wild, template5, size, data.wild_aligned)
        self.wild = BatchStream(wild, train.batch_size, train.seed, self.procs, data.num_workers, "in-the-wild")
        self.lab = None
        if data.lab_root is not None:
            sizes = (self.config.model.mid_map_size, self.config.model.high_map_size)
            lab = LabViews(data.lab_root, data.lab_derived, template5, size, split=data.lab_split,
                           views=data.lab_views, map_sizes=sizes)
            self.lab = BatchStream(lab, train.batch_size, train.seed + 1, self.procs, data.num_workers, "in-the-lab")
            LOGGER.info("alternating L_self on %d in-the-wild images and L_super on %d in-the-lab views",
                        len(wild), len(lab))
        else:
            LOGGER.info("no in-the-lab data configured: training with L_self only on %d in-the-wild images "
                        "(no supervised or adversarial terms)", len(wild))
        for folder in data.val:  # a wrong path stops the run now, not at the first validation
            val = WildImages(folder, None if data.wild_aligned else template5, aligned=data.wild_aligned, size=size)
            LOGGER.info("validating on %d images of %s every %d steps", len(val), folder, self.val_every)

    def _make_optimizers(self) -> None:
        o = self.config.optim
        params = [p for p in self.hrn.parameters() if p.requires_grad]
        self.opt_g = torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        self.opt_d = None
        if self.discriminators is not None:
            self.opt_d = torch.optim.Adam(self.discriminators.parameters(), lr=o.disc_lr, betas=tuple(o.disc_betas))
        self.schedulers = [self._scheduler(opt) for opt in (self.opt_g, self.opt_d) if opt is not None]

    def _scheduler(self, optimizer):
        o = self.config.optim
        if o.lr_policy == "constant":
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        every = o.lr_decay_steps or max(1, round(o.lr_decay_epochs * self.wild.batches_per_epoch))
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=every, gamma=o.lr_gamma)

    @property
    def val_every(self) -> int:
        return self.config.train.val_every or self.config.train.checkpoint_every

    @property
    def total_steps(self) -> int:
        t = self.config.train
        return t.steps if t.steps is not None else math.ceil(t.epochs * self.wild.batches_per_epoch)

    # --- one step -----------------------------------------------------------------------------

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _generator_iteration(self, batch: dict, supervised: bool) -> tuple[dict[str, torch.Tensor], dict]:
        batch = self._to_device(batch)
        out = self.model(batch["image"], None if supervised else batch["mask"])
        discriminators = self.discriminators
        if discriminators is not None:
            discriminators.requires_grad_(False)  # G's step must not train D
        terms = generator_terms(out, batch, self.recognizer, self.hrn.mm_front_vertices, has_face_mask=not supervised,
                                discriminators=discriminators)
        if supervised:
            terms.update(supervised_terms(out, batch))
        total, weighted = (total_super_loss if supervised else total_self_loss)(terms, self.weights)
        if self.train_regressor:
            weighted["coeff_reg"] = self.config.loss.coeff_reg * coefficient_regularizer(out.coeffs)
            weighted["gamma_reg"] = self.config.loss.gamma_reg * gamma_regularizer(out.coeffs)
            total = total + weighted["coeff_reg"] + weighted["gamma_reg"]
        self.opt_g.zero_grad(set_to_none=True)
        total.backward()
        self.opt_g.step()
        metrics = {"total": total.detach(), **{k: v.detach() for k, v in weighted.items()}}
        fakes = {"mid": out.deformation.detach(), "high": out.displacement.detach()}
        return metrics, fakes

    def _discriminator_iteration(self, lab_batch: dict, fakes: list[dict]) -> dict[str, torch.Tensor]:
        self.discriminators.requires_grad_(True)
        losses = {}
        for name, key in zip(MAP_NAMES, ("deformation", "displacement")):
            real = (lab_batch[key] * lab_batch[f"{key}_mask"]).to(self.device)
            fake = torch.cat([f[name] for f in fakes])
            net = self.discriminators[name]
            losses[name] = lsgan_discriminator_loss(net(real), net(fake))
        total = losses["mid"] + losses["high"]
        self.opt_d.zero_grad(set_to_none=True)
        total.backward()
        if self.procs.distributed:
            _average_gradients(self.discriminators, self.procs.world)
        self.opt_d.step()
        return {"total": total.detach(), **{k: v.detach() for k, v in losses.items()}}

    def train_step(self) -> dict[str, torch.Tensor]:
        """One step: an L_self iteration, then (with lab data) an L_super iteration and a
        discriminator update on both iterations' maps. Returns detached metrics by name."""
        self.hrn.train()
        if not self.train_regressor:
            self.hrn.regressor.eval()  # a frozen base keeps its BatchNorm statistics
        metrics = {}
        self_metrics, fake_self = self._generator_iteration(self.wild.next(), supervised=False)
        metrics.update({f"self/{k}": v for k, v in self_metrics.items()})
        if self.lab is not None:
            lab_batch = self.lab.next()
            super_metrics, fake_super = self._generator_iteration(lab_batch, supervised=True)
            metrics.update({f"super/{k}": v for k, v in super_metrics.items()})
            disc = self._discriminator_iteration(lab_batch, [fake_self, fake_super])
            metrics.update({f"disc/{k}": v for k, v in disc.items()})
        for scheduler in self.schedulers:
            scheduler.step()
        self.step += 1
        return metrics

    # --- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": self.step,
            "config": self.config.to_dict(),
            "model": self.hrn.state_dict(),
            "discriminators": None if self.discriminators is None else self.discriminators.state_dict(),
            "optimizers": {"generator": self.opt_g.state_dict(),
                           "discriminator": None if self.opt_d is None else self.opt_d.state_dict()},
            "schedulers": [s.state_dict() for s in self.schedulers],
            "streams": {"wild": self.wild.state_dict(), "lab": None if self.lab is None else self.lab.state_dict()},
            "rng": _gather_rng_states(self.procs),
            "best": self.best,
        }

    def load_state_dict(self, state: dict, where: Path) -> None:
        saved = state["config"]["model"]
        if saved != dataclasses.asdict(self.config.model):
            changed = sorted(k for k in saved if saved[k] != getattr(self.config.model, k, None))
            raise FileFormatError(where, f"the checkpoint's model section differs from the config's "
                                         f"({', '.join(changed)}): resume with the same model settings")
        if (state["discriminators"] is None) != (self.discriminators is None):
            raise FileFormatError(where, "the checkpoint and the config disagree on in-the-lab data "
                                         "(discriminators): resume with the same data section")
        self.hrn.load_state_dict(state["model"])
        if self.discriminators is not None:
            self.discriminators.load_state_dict(state["discriminators"])
            self.opt_d.load_state_dict(state["optimizers"]["discriminator"])
        self.opt_g.load_state_dict(state["optimizers"]["generator"])
        for scheduler, saved_state in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(saved_state)
        self.wild.load_state_dict(state["streams"]["wild"])
        if self.lab is not None:
            self.lab.load_state_dict(state["streams"]["lab"])
        self.step = int(state["step"])
        self.best = state.get("best")  # absent in checkpoints written before best.pt existed
        rng = state["rng"]
        if len(rng) == self.procs.world:
            _set_rng_state(rng[self.procs.rank])
        else:
            self._note(f"the checkpoint has RNG states of {len(rng)} process(es), this run has {self.procs.world}: "
                       "random streams restart from the seed (the run is no longer bitwise reproducible)")
            _seed_everything(self.config.train.seed + 1000 * self.step + self.procs.rank)

    def save_checkpoint(self, *, best: bool = False) -> Path | None:
        """Write checkpoints/step_<step>.pt and point last.pt (and, when ``best``, best.pt) at it;
        then delete all but the newest ``train.keep_last`` step checkpoints."""
        state = self.state_dict()  # every rank takes part in gathering the RNG states
        if not self.procs.main:
            return None
        folder = self.out / CHECKPOINT_DIR
        path = folder / STEP_CHECKPOINT.format(self.step)
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        with atomic_path(folder / LAST_CHECKPOINT) as tmp:
            _link_or_copy(path, tmp)
        LOGGER.info("step %d: checkpoint %s", self.step, path)
        if best:
            with atomic_path(folder / BEST_CHECKPOINT) as tmp:
                _link_or_copy(path, tmp)
            self._log_best()
        self._prune_checkpoints(folder)
        return path

    def save_best(self) -> None:
        """Write checkpoints/best.pt from the current state (a new best between checkpoints)."""
        state = self.state_dict()
        if self.procs.main:
            with atomic_path(self.out / CHECKPOINT_DIR / BEST_CHECKPOINT) as tmp:
                torch.save(state, tmp)
            self._log_best()

    def _log_best(self) -> None:
        LOGGER.info("step %d: best %s so far (%.4g): %s", self.step, self.best["metric"], self.best["value"],
                    self.out / CHECKPOINT_DIR / BEST_CHECKPOINT)

    def _prune_checkpoints(self, folder: Path) -> None:
        keep = self.config.train.keep_last
        if keep is None:
            return
        steps = sorted(folder.glob(STEP_CHECKPOINT.replace("{:07d}", "[0-9]" * 7)))
        for old in steps[:-keep]:  # last.pt and best.pt are links of their own: their bytes stay
            old.unlink(missing_ok=True)

    def _update_best(self, val: dict[str, float]) -> bool:
        """Whether ``val`` holds a new lowest value of train.best_metric (and record it)."""
        if not val:
            return False
        key = VAL_PREFIX + self.config.train.best_metric
        if key not in val:
            if not self._best_unmeasured_noted:
                self._best_unmeasured_noted = True
                self._note(f"train.best_metric {self.config.train.best_metric} is not measured on data.val "
                           f"(it measures {', '.join(k[len(VAL_PREFIX):] for k in val)}): no best.pt is kept")
            return False
        if self.best is not None and not val[key] < self.best["value"]:
            return False
        self.best = {"metric": key, "value": float(val[key]), "step": self.step}
        return True

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> TrainResult:
        start_step, started = self.step, time.perf_counter()
        steps = range(self.step, self.total_steps)
        if self.progress is not None and self.procs.main:
            steps = self.progress(steps, total=len(steps), desc="hrn train", unit="step")
        cfg = self.config.train
        last_checkpoint, last_metrics, window = None, {}, []
        if self.step == 0 and self.config.data.val and self.total_steps > 0:
            self._log([], 0.0, self.validate())  # the errors at initialisation, as step 0
        step_started = time.perf_counter()
        for _ in steps:
            window.append(self.train_step())
            done = self.step == self.total_steps
            validating = bool(self.config.data.val) and (self.step % self.val_every == 0 or done)
            new_best = False
            if self.step % cfg.log_every == 0 or done or validating:
                val = self.validate() if validating else {}
                new_best = self._update_best(val)
                last_metrics = self._log(window, time.perf_counter() - step_started, val)
                window, step_started = [], time.perf_counter()
            if self.step % cfg.checkpoint_every == 0 or done:
                last_checkpoint = self.save_checkpoint(best=new_best) or last_checkpoint
            elif new_best:
                self.save_best()
        if start_step == self.total_steps:
            LOGGER.info("nothing to do: the run is at step %d of %d", self.step, self.total_steps)
        return TrainResult(out=self.out, start_step=start_step, steps=self.step, last_checkpoint=last_checkpoint,
                           last_metrics=last_metrics, seconds=time.perf_counter() - started, notes=list(self.notes),
                           threads=torch.get_num_threads(), best=self.best)

    def validate(self) -> dict[str, float]:
        """Evaluate the model on ``data.val`` (each process a share of the images): the mean of each
        `hrn_baseline.evaluate` metric as ``val/<metric>``, and (rank 0) a sheet of the first images'
        renders in OUT/previews/step_<step>.png. Unreadable images are logged and skipped."""
        data = self.config.data
        result = evaluate(self.hrn, data.val, aligned=data.wild_aligned, batch_size=self.config.train.batch_size,
                          shard=(self.procs.rank, self.procs.world), preview=PREVIEW_IMAGES if self.procs.main else 0)
        for where, problem in result.failures:
            LOGGER.warning("validation skips %s: %s", where, problem)
        if result.preview:
            save_preview(result.preview, self.out / PREVIEW_DIR / f"step_{self.step:07d}.png",
                         title=f"step {self.step}: held-out images")
        values = result.values()
        totals = torch.tensor([[sum(values[k]), len(values[k])] for k in METRICS], dtype=torch.float64)
        if self.procs.distributed:
            totals = totals.to(self.device)
            dist.all_reduce(totals)
            totals = totals.cpu()
        return {f"{VAL_PREFIX}{k}": float(total / count) for k, (total, count) in zip(METRICS, totals.tolist())
                if count > 0}

    def _log(self, window: list[dict[str, torch.Tensor]], seconds: float,
             val: dict[str, float] | None = None) -> dict[str, float]:
        """Average the window's metrics over steps and processes, add the validation metrics, and
        write them (rank 0). An empty window logs the validation alone (step 0)."""
        row = {"step": self.step, "epoch": self.wild.epoch, "lr": self.opt_g.param_groups[0]["lr"]}
        if window:
            names = sorted(window[0])
            values = torch.stack([torch.stack([m[k].float() for k in names]) for m in window]).mean(0)
            if self.procs.distributed:
                dist.all_reduce(values)
                values /= self.procs.world
            row.update({"seconds_per_step": seconds / len(window), **dict(zip(names, values.tolist()))})
        row.update(val or {})
        if self.metrics_log is not None:
            self.metrics_log.append(row)
            if window:
                LOGGER.info("step %d/%d  self %.4f%s  (%.2f s/step)", self.step, self.total_steps, row["self/total"],
                            f"  super {row['super/total']:.4f}" if "super/total" in row else "",
                            row["seconds_per_step"])
            if val:
                means = {k[len(VAL_PREFIX):]: v for k, v in val.items()}
                LOGGER.info("step %d/%d  validation: %s", self.step, self.total_steps, format_means(means))
        return row


# ----------------------------------------------------------------------------------------------
# logs


class MetricsLog:
    """metrics.csv (one row per log, fixed columns from the first row), metrics.jsonl (every key)
    and loss_curve.png, refreshed at each log."""

    def __init__(self, out: Path, *, fresh: bool = True):
        self.csv_path, self.jsonl_path, self.png_path = out / METRICS_CSV, out / METRICS_JSONL, out / LOSS_CURVE_PNG
        self.rows = [] if fresh else _read_jsonl(self.jsonl_path)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (a resumed run logs them again)."""
        self.rows = [r for r in self.rows if r["step"] <= step]
        self._write()

    def append(self, row: dict) -> None:
        self.rows.append(row)
        self._write()

    def _write(self) -> None:
        with atomic_open(self.jsonl_path) as fh:
            fh.writelines(json.dumps(r) + "\n" for r in self.rows)
        if self.rows:
            columns = list(self.rows[0])
            for row in self.rows[1:]:
                columns += [k for k in row if k not in columns]
            columns.sort(key=lambda k: k.startswith(VAL_PREFIX))  # validation last (stable sort)
            with atomic_open(self.csv_path, newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=columns, restval="")
                writer.writeheader()
                writer.writerows(self.rows)
            plot_loss_curve(self.rows, self.png_path)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise FileFormatError(path, f"not a metrics log (JSON lines): {exc}") from None


def plot_loss_curve(rows: list[dict], path: Path) -> None:
    """Totals of L_self, L_super and the discriminators against the step (log scale), and beside
    them the validation errors when the run has any, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    val_keys = [VAL_PREFIX + k for k in METRICS if any(VAL_PREFIX + k in r for r in rows)]
    fig, axes = plt.subplots(1, 2 if val_keys else 1, figsize=(12 if val_keys else 7, 4), squeeze=False)
    try:
        panels = ((axes[0, 0], PLOTTED, "loss", "log"), *(((axes[0, 1], val_keys, "error", "linear"),)
                                                          if val_keys else ()))
        for ax, keys, label, scale in panels:
            for key in keys:
                points = [(r["step"], r[key]) for r in rows if key in r and r[key] > 0]
                if points:
                    ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=key)
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            ax.set_yscale(scale)
            ax.grid(True, alpha=0.3)
            if ax.lines:
                ax.legend()
        if val_keys:
            axes[0, 1].set_title("validation (px: landmarks at 224; mm: point-to-surface)", fontsize=9)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------------------
# distributed and RNG helpers


def _link_or_copy(source: Path, target: Path) -> None:
    """Make ``target`` hold ``source``'s bytes: a hard link (checkpoints are hundreds of MB), or a
    copy where the file system has no hard links."""
    try:
        target.unlink(missing_ok=True)
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _broadcast_module(module: nn.Module) -> None:
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def _average_gradients(module: nn.Module, world: int) -> None:
    for param in module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= world


def _rng_state() -> dict:
    """This process's random states as tensors and numbers (loadable with weights_only=True)."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss": gauss},
           "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                     "has_gauss": int(has_gauss), "cached": float(cached)},
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(state: dict) -> None:
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_rng_states(procs: Processes) -> list[dict]:
    own = _rng_state()
    if not procs.distributed:
        return [own]
    states = [None] * procs.world
    dist.all_gather_object(states, own)
    return states


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _process_group(procs: Processes, device: torch.device):
    """Join the torchrun job for the duration of training (gloo on the CPU, nccl on CUDA)."""
    if not procs.distributed or dist.is_initialized():
        yield
        return
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _attach_log_file(out: Path) -> logging.Handler:
    handler = logging.FileHandler(out / TRAIN_LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    return handler


# ----------------------------------------------------------------------------------------------
# entry point


def train(config: Config, out: str | Path | None = None, *, resume: bool = False,
          progress: Progress | None = None) -> TrainResult:
    """Train HRN as ``config`` says, writing logs and checkpoints to ``out`` (default
    ``config.train.out``). With ``resume``, continue exactly from ``out/checkpoints/last.pt``.

    Under torchrun every process calls this; only rank 0 writes files and drives ``progress``.
    """
    out = Path(out if out is not None else config.train.out or "")
    if not str(out) or out == Path():
        raise InputError("no output folder: pass --out or set train.out in the config")
    procs = _processes_from_env()
    device = resolve_device(config.train.device, procs.local_rank)
    if config.train.deterministic and device.type == "cuda":
        raise InputError("train.deterministic works on the CPU only: PyTorch has no deterministic CUDA kernel for "
                         "some of HRN's operations (the backward of adaptive average pooling); set it to false "
                         "to train on the GPU")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    checkpoint = out / CHECKPOINT_DIR / LAST_CHECKPOINT
    if resume and not checkpoint.is_file():
        raise FileFormatError(checkpoint, "no checkpoint to resume from (train without --resume first)")
    if not resume and checkpoint.is_file():
        raise InputError(f"{out} already holds a run ({checkpoint}): pass --resume to continue it or choose "
                         "another --out")
    handler = None
    if procs.main:
        out.mkdir(parents=True, exist_ok=True)
        handler = _attach_log_file(out)
        with atomic_open(out / CONFIG_COPY) as fh:
            fh.write(config.to_yaml())
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True)
    threads_before = torch.get_num_threads()
    threads, why = cpu_threads(config.train.threads, procs.local_world)
    torch.set_num_threads(threads)
    LOGGER.info("CPU threads: %d per process (%s)%s", threads, why,
                f"; {config.data.num_workers} data loader worker(s) per process, one thread each"
                if config.data.num_workers else "")
    try:
        with _process_group(procs, device):
            _seed_everything(config.train.seed)
            trainer = Trainer(config, out, procs, progress, resume=resume)
            if resume:
                # on the CPU: the random states must stay there; load_state_dict moves the rest
                state = load_checkpoint(checkpoint)
                trainer.load_state_dict(state, checkpoint)
                if trainer.metrics_log is not None:
                    trainer.metrics_log.truncate_after(trainer.step)
                LOGGER.info("resumed from %s at step %d", checkpoint, trainer.step)
            else:
                _seed_everything(config.train.seed + procs.rank)  # dropout differs between ranks
            LOGGER.info("training %d steps on %s with %d process(es)", trainer.total_steps, trainer.device,
                        procs.world)
            return trainer.run()
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        torch.set_num_threads(threads_before)
        if handler is not None:
            LOGGER.removeHandler(handler)
            handler.close()


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by `train` (on the CPU), checked to be one; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(path, "no such checkpoint (train one with `hrn train --config FILE --out DIR`; "
                                    "checkpoints are DIR/checkpoints/*.pt)")
    state = torch_load(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise FileFormatError(path, "not an HRN checkpoint written by `hrn train`")
    return state
