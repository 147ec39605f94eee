"""Checkpoints HRN models load from: the toolkit's own (`hrn train`), Deep3DFaceRecon's public
`epoch_20.pth` and HRN's public `epoch_10.pth`, loaded strictly; and the public layout written back.

Public layouts (Deep3DFaceRecon and HRN `models/base_model.py` `save_networks`): a dict holding
``net_recon`` (`backbone.*` = torchvision ResNet-50 without `fc`, `final_layers.0-6` = the 1x1 heads
80 / 64 / 80 / 3 / 27 / 2 / 1), and for HRN also ``mid_net`` and ``high_net`` (pix2pix ResNet
generators, 9 blocks with dropout, so each block's second convolution is `conv_block.6`) and the
scalars ``alpha`` and ``beta`` of shape (1,); optimiser and scheduler states (``opt_NN``,
``sched_NN``) are ignored. HRN's de-retouching network is a separate file and is not used.
"""

from __future__ import annotations

import collections
import dataclasses
import pickle
import re
import zipfile
from pathlib import Path

import torch
import yaml

from facehd.errors import FileFormatError, InputError
from facehd.fsutil import atomic_path
from hrn_baseline import config as config_module
from hrn_baseline.config import ModelConfig

FACEHD = "facehd"  # written by `hrn train`
DEEP3D = "deep3dfacerecon"  # Deep3DFaceRecon `epoch_20.pth`: the base model only
HRN_PUBLIC = "hrn"  # HRN `epoch_10.pth`: base model and both detail nets
PUBLIC_KINDS = (DEEP3D, HRN_PUBLIC)
CHECKPOINT_FORMAT = "hrn-checkpoint"  # `hrn_baseline.train` writes it in every checkpoint

# public name -> prefix of the same network in `HRN.state_dict()`
PUBLIC_NETS = {"net_recon": "regressor.", "mid_net": "mid_net.generator.", "high_net": "high_net.generator."}
# public top-level scalar -> `HRN` parameter
PUBLIC_SCALARS = {"alpha": "mid_net.alpha", "beta": "high_net.beta"}
TRAINING_STATE = re.compile(r"(opt|sched)_\d+")  # optimiser / scheduler states saved beside the nets
# the paper's sizes, the only ones the public weights fit
PUBLIC_ARCHITECTURE = dict(backbone="resnet50", mid_ngf=64, mid_blocks=9, high_ngf=64, high_blocks=9,
                           norm="instance", dropout=True)
MAX_LISTED_KEYS = 3


# ----------------------------------------------------------------------------------------------
# reading


def read_checkpoint(path: str | Path) -> tuple[str, dict]:
    """(kind, contents) of a checkpoint file: `FACEHD`, `DEEP3D` or `HRN_PUBLIC`. Only tensors and
    plain containers are unpickled (``weights_only``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(path, "no such checkpoint (a `hrn train` checkpoint, Deep3DFaceRecon's epoch_20.pth "
                                    "or HRN's epoch_10.pth)")
    # MultiStepLR keeps its milestones in a Counter; the public runs' scheduler states may hold one
    with torch.serialization.safe_globals([collections.Counter]):
        state = torch_load(path)
    return checkpoint_kind(state, path), state


def torch_load(path: Path):
    """`torch.load` on the CPU with ``weights_only``; a file it cannot read is a one-line
    `FileFormatError` naming it (PyTorch's own messages run to a dozen lines)."""
    if not zipfile.is_zipfile(path):
        raise FileFormatError(path, "not a PyTorch checkpoint (not the zip archive that torch.save writes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise FileFormatError(path, "not a checkpoint of tensors: it holds Python objects that are not loaded "
                                    "(unpickling them could run code)") from None
    except Exception as exc:  # torch raises several unrelated types for corrupt or foreign files
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise FileFormatError(path, f"not a readable PyTorch checkpoint ({' '.join(first.split())})") from None


def checkpoint_kind(state, path: str | Path | None = None) -> str:
    """Which kind of checkpoint ``state`` (what `torch.load` returned) is, checking its top level."""
    if not isinstance(state, dict):
        raise FileFormatError(path, f"holds a {type(state).__name__}, not a checkpoint dict")
    if state.get("format") == CHECKPOINT_FORMAT:
        return FACEHD
    if "net_recon" not in state:
        keys = ", ".join(map(str, list(state)[:MAX_LISTED_KEYS]))
        raise FileFormatError(path, f"not an HRN checkpoint: neither `hrn train`'s format nor a public one with "
                                    f"'net_recon' (top-level keys: {keys})")
    detail = [k for k in ("mid_net", "high_net", "alpha", "beta") if k in state]
    unexpected = [str(k) for k in state if k not in (*PUBLIC_NETS, *PUBLIC_SCALARS)
                  and not (isinstance(k, str) and TRAINING_STATE.fullmatch(k))]
    if unexpected:
        raise FileFormatError(path, f"unexpected top-level entry {unexpected[0]!r} in a public checkpoint (expected "
                                    "net_recon, mid_net, high_net, alpha, beta, opt_NN, sched_NN)")
    if not detail:
        return DEEP3D
    missing = [k for k in ("mid_net", "high_net", "alpha", "beta") if k not in state]
    if missing:
        raise FileFormatError(path, f"HRN checkpoint without {', '.join(missing)} (has {', '.join(detail)})")
    return HRN_PUBLIC


# ----------------------------------------------------------------------------------------------
# public layout <-> the model's state dict


def _describe(keys: list[str]) -> str:
    more = f" and {len(keys) - MAX_LISTED_KEYS} more" if len(keys) > MAX_LISTED_KEYS else ""
    return ", ".join(keys[:MAX_LISTED_KEYS]) + more


def _check_net(name: str, weights, expected: dict[str, torch.Size], path) -> None:
    """Strict comparison of one public network's state dict against the model's."""
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise FileFormatError(path, f"{name} is not a state dict of tensors")
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if weights[k].shape != expected[k])
    problems = []
    if missing:
        problems.append(f"missing key{'s' * (len(missing) > 1)} {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected key{'s' * (len(unexpected) > 1)} {_describe(unexpected)}")
    if wrong:
        k = wrong[0]
        problems.append(f"wrong shape of {k} ({tuple(weights[k].shape)} in the file, {tuple(expected[k])} in the "
                        f"model){f' and {len(wrong) - 1} more' if len(wrong) > 1 else ''}")
    if problems:
        raise FileFormatError(path, f"{name} does not match the model: {'; '.join(problems)} (the public weights "
                                    "need the paper's sizes: resnet50, generators of 64 filters and 9 blocks with "
                                    "instance norm and dropout)")


def public_to_state(state: dict, model_state: dict[str, torch.Tensor], path=None) -> dict[str, torch.Tensor]:
    """The entries of ``model_state`` (an `HRN.state_dict()`) that the public checkpoint ``state``
    provides, under the model's names, after a strict check of every public network's keys and
    shapes. A Deep3DFaceRecon checkpoint provides the regressor only."""
    kind = checkpoint_kind(state, path)
    if kind not in PUBLIC_KINDS:
        raise FileFormatError(path, "not a public Deep3DFaceRecon or HRN checkpoint")
    nets = ["net_recon"] + (["mid_net", "high_net"] if kind == HRN_PUBLIC else [])
    mapped = {}
    for name in nets:
        prefix = PUBLIC_NETS[name]
        expected = {k.removeprefix(prefix): v.shape for k, v in model_state.items() if k.startswith(prefix)}
        _check_net(name, state[name], expected, path)
        mapped.update({prefix + k: v for k, v in state[name].items()})
    if kind == HRN_PUBLIC:
        for name, target in PUBLIC_SCALARS.items():
            value = state[name]
            if not torch.is_tensor(value) or value.numel() != 1:
                raise FileFormatError(path, f"{name} is not a one-element tensor")
            mapped[target] = value.reshape(model_state[target].shape)
    return mapped


def state_to_public(model_state: dict[str, torch.Tensor], kind: str = HRN_PUBLIC) -> dict[str, object]:
    """An `HRN.state_dict()` in a public layout (the inverse of `public_to_state`)."""
    if kind not in PUBLIC_KINDS:
        raise InputError(f"unknown public layout {kind!r}; use {' or '.join(PUBLIC_KINDS)}")
    nets = ["net_recon"] + (["mid_net", "high_net"] if kind == HRN_PUBLIC else [])
    public: dict[str, object] = {}
    for name in nets:
        prefix = PUBLIC_NETS[name]
        public[name] = {k.removeprefix(prefix): v.detach().clone() for k, v in model_state.items()
                        if k.startswith(prefix)}
    if kind == HRN_PUBLIC:
        for name, source in PUBLIC_SCALARS.items():
            public[name] = model_state[source].detach().clone().reshape(1)  # HRN saves shape (1,)
    return public


# ----------------------------------------------------------------------------------------------
# models


def is_public_architecture(config: ModelConfig) -> bool:
    """Whether ``config``'s networks have the public checkpoints' sizes."""
    return all(getattr(config, k) == v for k, v in PUBLIC_ARCHITECTURE.items())


def read_model_config(path: str | Path) -> ModelConfig:
    """The ``model`` section of a YAML config (an `hrn train` config or a file with that section
    only; the other sections are ignored). Relative paths are relative to the file's folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileFormatError(path, "no such config file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise FileFormatError(path, f"not a readable YAML file: {' '.join(str(exc).split())}") from None
    if data is not None and not isinstance(data, dict):
        raise FileFormatError(path, "a config must be a mapping with a model section")
    config = config_module._build(ModelConfig, (data or {}).get("model") or {}, "model.", path)
    base = path.parent
    for name in config_module.PATH_FIELDS["model"]:
        value = getattr(config, name)
        if value is not None and not Path(value).expanduser().is_absolute():
            setattr(config, name, str((base / Path(value).expanduser()).resolve()))
    return config


def load_weights_into(model, path: str | Path) -> str:
    """Load any checkpoint's network weights into ``model`` (an `HRN`), strictly; returns its kind.
    Used for `model.init_from`: training state (optimisers, step) is not restored."""
    kind, state = read_checkpoint(path)
    model_state = model.state_dict()
    if kind == FACEHD:
        weights = state.get("model")
        if not isinstance(weights, dict):
            raise FileFormatError(path, "checkpoint without model weights")
        expected = {k: v.shape for k, v in model_state.items()}
        _check_net("model", weights, expected, path)
    else:
        weights = public_to_state(state, model_state, path)
    model.load_state_dict(weights, strict=False)  # `weights` checked above; a Deep3D file has no detail nets
    return kind


def model_from_checkpoint(path: str | Path, model_config: ModelConfig | None = None):
    """The `HRN` of a checkpoint, on the CPU in train mode. A `hrn train` checkpoint names its own
    configuration (``model_config`` is then not allowed); a public one is loaded into
    ``model_config`` (default `ModelConfig()`: the paper's sizes on SynthBFM), which names the
    morphable model the coefficients belong to (BFM_model_front.mat for the public weights)."""
    from hrn_baseline.model import HRN, load_hrn_morphable

    kind, state = read_checkpoint(path)
    if kind == FACEHD:
        if model_config is not None:
            raise InputError(f"{path} is a `hrn train` checkpoint, which carries its own model configuration: "
                             "a model config is only for public checkpoints")
        try:
            config = ModelConfig(**state["config"]["model"])
        except (TypeError, KeyError) as exc:
            raise FileFormatError(path, f"its model config does not match this version of hrn_baseline ({exc})") \
                from None
        model = HRN(load_hrn_morphable(config), config)
        weights = state.get("model")
        if not isinstance(weights, dict):
            raise FileFormatError(path, "checkpoint without model weights")
        _check_net("model", weights, {k: v.shape for k, v in model.state_dict().items()}, path)
        model.load_state_dict(weights)
        return model
    config = model_config if model_config is not None else ModelConfig()
    # the weights come from the file: the model's own initial weights files are not read
    config = dataclasses.replace(config, backbone_weights=None, regressor_weights=None)
    model = HRN(load_hrn_morphable(config), config)
    model.load_state_dict(public_to_state(state, model.state_dict(), path), strict=False)
    return model


def export_public(model, path: str | Path, kind: str = HRN_PUBLIC) -> Path:
    """Write ``model``'s (an `HRN`) networks in a public layout (`HRN_PUBLIC`: Deep3DFaceRecon's
    and HRN's code load it; `DEEP3D`: the regressor only), atomically."""
    if not is_public_architecture(model.config):
        sizes = ", ".join(f"{k} {getattr(model.config, k)!r}" for k in PUBLIC_ARCHITECTURE)
        want = ", ".join(f"{k} {v!r}" for k, v in PUBLIC_ARCHITECTURE.items())
        raise InputError(f"the model's networks ({sizes}) are not the public ones ({want}): the public code could "
                         "not load them")
    public = state_to_public(model.state_dict(), kind)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(public, tmp)
    return path
