"""The `hrn train` configuration: YAML files <-> dataclasses, with the paper's defaults, a small
CPU size and the loss-weight presets (supplement, public code)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from facehd import conventions as cv
from facehd.errors import FileFormatError, InputError

LOSS_PRESETS = ("supplement", "public_code")
LR_POLICIES = ("step", "constant")
NORMS = ("instance", "batch", "none")
RASTERIZERS = ("auto", "torch", "nvdiffrast")
KEEP_LAST_CHECKPOINTS = 3  # step_*.pt files kept besides last.pt and best.pt (137 MB each at the paper's size)

# --- optimisation (HRN `options/train_options.py`, `models/networks.py` get_scheduler) ---------
LEARNING_RATE = 1e-4  # Adam, the regressor and the detail nets
ADAM_BETAS = (0.9, 0.999)  # torch defaults, as HRN (it passes only lr)
LR_DECAY_EPOCHS = 10  # lr_policy "step": StepLR every 10 epochs ...
LR_DECAY_GAMMA = 0.2  # ... multiplying by 0.2
EPOCHS = 20  # n_epochs
BATCH_SIZE = 32
# --- discriminators (pix2pix defaults, DESIGN section 3) ----------------------------------------
DISC_LEARNING_RATE = 2e-4
DISC_BETAS = (0.5, 0.999)
# --- Deep3DFaceRecon base-model regularisers (`facerecon_model.py` w_reg, w_id, w_exp, w_tex,
# w_gamma): HRN trains on top of a pretrained, frozen base; when the regressor trains here too,
# these keep its coefficients plausible.
COEFF_REG_WEIGHT = 3e-4
COEFF_REG_ID, COEFF_REG_EXP, COEFF_REG_TEX = 1.0, 0.8, 1.7e-2
GAMMA_REG_WEIGHT = 10.0


@dataclass
class DataConfig:
    """Where the training images are. Paths are relative to the config file."""

    wild: list[str] = field(default_factory=list)  # in-the-wild folders (`facehd.wild` format): L_self
    wild_aligned: bool = False  # the wild images are already image_size crops (no 5-point alignment)
    lab_root: str | None = None  # FaceHD-100 root (in-the-lab captures): L_super
    lab_derived: str | None = None  # its derived-products folder (<subject>/<expression>/gt_maps/cam<i>.npz)
    lab_split: str | None = "train"  # subject split of the lab captures (None: all)
    lab_views: list[int] | None = None  # camera indices to use (None: all nine)
    num_workers: int = 0  # DataLoader worker processes per rank (each uses one thread)
    val: list[str] = field(default_factory=list)  # held-out in-the-wild folders evaluated during training


@dataclass
class ModelConfig:
    """Sizes of the HRN networks; the defaults are the paper's (DESIGN section 3)."""

    morphable_model: str | None = None  # a BFM_model_front.mat; None: SynthBFM(synth_resolution, synth_seed)
    uv_file: str | None = None  # (N, 2) per-vertex UVs (.npy) for models without a `uv` field (BFM09)
    synth_resolution: int = 180
    synth_seed: int = 0
    image_size: int = cv.IMAGE_SIZE  # network input and render size, pixels
    backbone: str = "resnet50"
    backbone_weights: str | None = None  # torchvision backbone state dict (e.g. ImageNet ResNet-50)
    regressor_weights: str | None = None  # a Deep3DFaceRecon `net_recon` state dict
    init_from: str | None = None  # weights to start from: a checkpoint, epoch_20.pth or epoch_10.pth
    freeze_regressor: bool = False  # HRN trains its detail nets on a pretrained, frozen base model
    mid_map_size: int = cv.DEFORMATION_MAP_SIZE  # deformation map side, texels
    high_map_size: int = cv.DISPLACEMENT_MAP_SIZE  # displacement map side, texels
    mid_ngf: int = 64
    mid_blocks: int = 9
    high_ngf: int = 64
    high_blocks: int = 9
    norm: str = "instance"
    dropout: bool = True  # HRN's Pix2PixOptions leave dropout on
    disc_ndf: int = 64
    disc_layers: int = 3
    disc_norm: str = "batch"
    rasterizer: str = "auto"  # auto | torch | nvdiffrast

    @classmethod
    def small(cls, **overrides) -> ModelConfig:
        """A CPU-sized model for tests and demos: ResNet-18, ngf 8, two blocks, 32 / 64 texel maps,
        112-pixel images, SynthBFM at resolution 32 (about a thousand vertices)."""
        values = dict(synth_resolution=32, image_size=112, backbone="resnet18", mid_map_size=32,
                      high_map_size=64, mid_ngf=8, mid_blocks=2, high_ngf=8, high_blocks=2, disc_ndf=8,
                      disc_layers=2)
        values.update(overrides)
        return cls(**values)


@dataclass
class LossConfig:
    """The loss weights: a preset plus per-term overrides (names of `losses.LossWeights`)."""

    preset: str = "supplement"  # supplement (HRN supplement Sec. 3.2) | public_code
    weights: dict[str, float] = field(default_factory=dict)  # e.g. {landmark: 1.6e-3}
    coeff_reg: float = COEFF_REG_WEIGHT  # used only while the regressor trains
    gamma_reg: float = GAMMA_REG_WEIGHT  # likewise
    recognizer_weights: str | None = None  # ArcFace backbone.pth; None: a small random stand-in
    recognizer_arch: str = "iresnet50"

    def loss_weights(self):
        """The `LossWeights` of the preset with the overrides applied."""
        from hrn_baseline.losses import LossWeights

        base = LossWeights.public_code() if self.preset == "public_code" else LossWeights()
        return dataclasses.replace(base, **self.weights)


@dataclass
class OptimConfig:
    """Adam for the generator side and for the discriminators, and the step schedule."""

    lr: float = LEARNING_RATE
    betas: list[float] = field(default_factory=lambda: list(ADAM_BETAS))
    disc_lr: float = DISC_LEARNING_RATE
    disc_betas: list[float] = field(default_factory=lambda: list(DISC_BETAS))
    weight_decay: float = 0.0
    lr_policy: str = "step"  # step | constant
    lr_decay_epochs: float = LR_DECAY_EPOCHS  # an epoch = one pass over the in-the-wild images
    lr_decay_steps: int | None = None  # overrides lr_decay_epochs when set
    lr_gamma: float = LR_DECAY_GAMMA


@dataclass
class TrainConfig:
    """Length, batching, logging, checkpoints, seed and device of a run."""

    epochs: float = EPOCHS
    steps: int | None = None  # overrides epochs; one step = one L_self (+ one L_super) iteration
    batch_size: int = BATCH_SIZE  # per process
    checkpoint_every: int = 1000
    log_every: int = 50
    val_every: int | None = None  # evaluate data.val every N steps (None: at each checkpoint)
    seed: int = 0
    device: str = "auto"  # auto (the accelerator if any, else cpu) or a torch device string
    threads: int | None = None  # CPU threads per process; None: the cores available / processes on this machine
    keep_last: int | None = KEEP_LAST_CHECKPOINTS  # step checkpoints kept (None: all)
    best_metric: str = "landmark_px"  # data.val metric whose lowest value is kept as checkpoints/best.pt
    deterministic: bool = False  # torch.use_deterministic_algorithms: bitwise resume (CPU only)
    out: str | None = None  # output folder; `hrn train --out` overrides it


@dataclass
class Config:
    """A whole `hrn train` configuration (one YAML file, one section per field)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, where: str | Path | None = None) -> Config:
        """Check values that the types cannot; raise `FileFormatError` naming ``where``."""
        def bad(problem: str):
            return FileFormatError(where, problem) if where else InputError(problem)

        for key, value, allowed, ok in self._ranges():
            if not ok(value):
                raise bad(f"{key} is {value!r}; allowed: {allowed}")
        from hrn_baseline.losses import LossWeights

        unknown = sorted(set(self.loss.weights) - {f.name for f in dataclasses.fields(LossWeights)})
        if unknown:
            known = ", ".join(f.name for f in dataclasses.fields(LossWeights))
            raise bad(f"loss.weights has unknown term(s) {', '.join(unknown)}; known: {known}")
        for name in ("betas", "disc_betas"):
            if len(getattr(self.optim, name)) != 2:
                raise bad(f"optim.{name} must hold two numbers")
        if not self.data.wild:
            raise bad("data.wild lists no in-the-wild image folder (L_self needs at least one)")
        if (self.data.lab_root is None) != (self.data.lab_derived is None):
            raise bad("data.lab_root and data.lab_derived go together (images and their GT maps)")
        return self

    def _ranges(self) -> list[tuple[str, object, str, typing.Callable[[object], bool]]]:
        """(key, value, allowed values in words, check) of every number and choice with a range."""
        d, m, lo, o, t = self.data, self.model, self.loss, self.optim, self.train

        def positive(v):
            return math.isfinite(v) and v > 0

        def non_negative(v):
            return math.isfinite(v) and v >= 0

        def at_least(n):
            return lambda v: v >= n

        def optional(check):
            return lambda v: v is None or check(v)

        def one_of(choices):
            return lambda v: v in choices

        def beta(v):
            return math.isfinite(v) and 0 <= v < 1

        from facehd.capture import N_VIEWS
        from hrn_baseline.evaluate import METRICS
        from hrn_baseline.networks import BACKBONES

        rules = [
            ("data.num_workers", d.num_workers, "an integer >= 0", at_least(0)),
            *((f"data.lab_views[{i}]", v, f"a camera index 0..{N_VIEWS - 1}", lambda v: 0 <= v < N_VIEWS)
              for i, v in enumerate(d.lab_views or ())),
            ("model.synth_resolution", m.synth_resolution, "an integer >= 8", at_least(8)),
            ("model.image_size", m.image_size, "an integer >= 32", at_least(32)),
            ("model.backbone", m.backbone, " | ".join(BACKBONES), one_of(BACKBONES)),
            *((f"model.{k}", getattr(m, k), "a positive multiple of 4", lambda v: v >= 4 and v % 4 == 0)
              for k in ("mid_map_size", "high_map_size")),
            *((f"model.{k}", getattr(m, k), "an integer >= 1", at_least(1))
              for k in ("mid_ngf", "mid_blocks", "high_ngf", "high_blocks", "disc_ndf", "disc_layers")),
            *((f"model.{k}", getattr(m, k), " | ".join(NORMS), one_of(NORMS)) for k in ("norm", "disc_norm")),
            ("model.rasterizer", m.rasterizer, " | ".join(RASTERIZERS), one_of(RASTERIZERS)),
            ("loss.preset", lo.preset, " | ".join(LOSS_PRESETS), one_of(LOSS_PRESETS)),
            *((f"loss.weights.{k}", v, "a number >= 0", non_negative) for k, v in lo.weights.items()),
            ("loss.coeff_reg", lo.coeff_reg, "a number >= 0", non_negative),
            ("loss.gamma_reg", lo.gamma_reg, "a number >= 0", non_negative),
            ("optim.lr", o.lr, "a number > 0", positive),
            ("optim.disc_lr", o.disc_lr, "a number > 0", positive),
            *((f"optim.{k}[{i}]", v, "a number in [0, 1)", beta)
              for k in ("betas", "disc_betas") for i, v in enumerate(getattr(o, k))),
            ("optim.weight_decay", o.weight_decay, "a number >= 0", non_negative),
            ("optim.lr_policy", o.lr_policy, " | ".join(LR_POLICIES), one_of(LR_POLICIES)),
            ("optim.lr_decay_epochs", o.lr_decay_epochs, "a number > 0", positive),
            ("optim.lr_decay_steps", o.lr_decay_steps, "an integer >= 1, or null (use lr_decay_epochs)",
             optional(at_least(1))),
            ("optim.lr_gamma", o.lr_gamma, "a number in (0, 1]", lambda v: positive(v) and v <= 1),
            ("train.epochs", t.epochs, "a number > 0", positive),
            ("train.steps", t.steps, "an integer >= 1, or null (use train.epochs)", optional(at_least(1))),
            *((f"train.{k}", getattr(t, k), "an integer >= 1", at_least(1))
              for k in ("batch_size", "checkpoint_every", "log_every")),
            ("train.val_every", t.val_every, "an integer >= 1, or null (at each checkpoint)", optional(at_least(1))),
            ("train.seed", t.seed, "an integer >= 0", at_least(0)),
            ("train.threads", t.threads, "an integer >= 1, or null (the cores available / processes)",
             optional(at_least(1))),
            ("train.keep_last", t.keep_last, "an integer >= 1, or null (keep every checkpoint)",
             optional(at_least(1))),
            ("train.best_metric", t.best_metric, " | ".join(METRICS), one_of(METRICS)),
        ]
        return rules

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict, where: str | Path | None = None, base_dir: str | Path | None = None
                  ) -> Config:
        """Build from a nested dict (missing keys take the defaults); unknown keys and wrong types
        raise `FileFormatError` naming ``where``. Relative paths resolve against ``base_dir``."""
        config = _build(cls, data or {}, "", where)
        if base_dir is not None:
            _resolve_paths(config, Path(base_dir))
        return config.validate(where)


def load_config(path: str | Path) -> Config:
    """Read a YAML config; relative paths in it are relative to the file's folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileFormatError(path, "no such config file") from None
    except yaml.YAMLError as exc:
        raise FileFormatError(path, _yaml_problem(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FileFormatError(path, f"not a readable YAML file: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise FileFormatError(path, "a config must be a mapping with sections data, model, loss, optim, train")
    return Config.from_dict(data or {}, where=path, base_dir=path.parent)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line message (with a source excerpt and caret) as one line, 1-based."""
    mark = getattr(exc, "problem_mark", None)
    problem = " ".join(str(getattr(exc, "problem", None) or "").split()) or "unparsable text"
    context = " ".join(str(getattr(exc, "context", None) or "").split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"invalid YAML{where}: {problem}" + (f" ({context})" if context else "")


# ----------------------------------------------------------------------------------------------
# dict -> dataclass with checks


def _build(cls, data, prefix: str, where):
    if not isinstance(data, dict):
        raise FileFormatError(where, f"{prefix or 'the config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise FileFormatError(where, f"unknown key(s) {', '.join(prefix + k for k in unknown)}; "
                                     f"{prefix or 'top level'} takes {', '.join(sorted(names))}")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{prefix}{name}.", where)
        else:
            values[name] = _coerce(value, hint, prefix + name, where)
    return cls(**values)


def _coerce(value, hint, name: str, where):
    """``value`` checked against a simple type hint (str, int, float, bool, list[..], dict, X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, name, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise FileFormatError(where, f"{name} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{name}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise FileFormatError(where, f"{name} must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{name}.{k}", where) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise FileFormatError(where, f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FileFormatError(where, f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FileFormatError(where, f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise FileFormatError(where, f"{name} must be a string, got {value!r}")
        return str(value)
    raise FileFormatError(where, f"{name}: unsupported value {value!r}")


PATH_FIELDS = {
    "data": ("wild", "lab_root", "lab_derived", "val"),
    "model": ("morphable_model", "uv_file", "backbone_weights", "regressor_weights", "init_from"),
    "loss": ("recognizer_weights",),
    "train": ("out",),
}


def _resolve_paths(config: Config, base: Path) -> None:
    """Make relative paths absolute against ``base`` (the config file's folder), in place."""
    def resolve(p: str) -> str:
        path = Path(p).expanduser()
        return str(path) if path.is_absolute() else str((base / path).resolve())

    for section, names in PATH_FIELDS.items():
        part = getattr(config, section)
        for name in names:
            value = getattr(part, name)
            if isinstance(value, list):
                setattr(part, name, [resolve(v) for v in value])
            elif value is not None:
                setattr(part, name, resolve(value))
