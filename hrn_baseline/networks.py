"""HRN's networks: the coefficient regressor, the pix2pix ResNet generators that predict the
deformation and displacement maps, and the PatchGAN discriminator (DESIGN.md section 3)."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from facehd import conventions as cv
from facehd.errors import FileFormatError, InputError
from hrn_baseline.checkpoints import torch_load

# --- base model (Deep3DFaceRecon `ReconNetWrapper`) -------------------------------------------
# Output sizes of the seven 1x1 conv heads, in coefficient order: id, exp, tex, angle, gamma,
# (tx, ty), tz. Deep3DFaceRecon splits the translation into two heads; the order concatenates
# to the 257-vector of DESIGN section 3.
HEAD_SIZES = (cv.N_ID, cv.N_EXP, cv.N_TEX, cv.N_ANGLE, cv.N_GAMMA, 2, 1)

# torchvision constructors and the width of their pooled features
BACKBONES = {
    "resnet18": (torchvision.models.resnet18, 512),
    "resnet34": (torchvision.models.resnet34, 512),
    "resnet50": (torchvision.models.resnet50, 2048),
    "resnet101": (torchvision.models.resnet101, 2048),
    "resnet152": (torchvision.models.resnet152, 2048),
}

# --- pix2pix generator and discriminator (HRN `pix2pix/networks.py`, `Pix2PixOptions`) --------
GENERATOR_FILTERS = 64  # ngf
GENERATOR_BLOCKS = 9  # netG = resnet_9blocks
GENERATOR_DOWNSAMPLINGS = 2
DROPOUT_P = 0.5  # pix2pix ResnetBlock dropout
DISCRIMINATOR_FILTERS = 64  # ndf
DISCRIMINATOR_LAYERS = 3  # n_layers_D ("basic" 70x70 PatchGAN)
DISCRIMINATOR_KERNEL = 4
DISCRIMINATOR_PADDING = 1
LEAKY_SLOPE = 0.2
INIT_GAIN = 0.02  # pix2pix init_gain: N(0, 0.02) weights
AFFINE_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm)  # weights N(1, gain) when affine

# --- hierarchical representation (DESIGN section 3) -------------------------------------------
DETAIL_OUTPUT_SCALE = 0.1  # HRN: mid_net(x) * 0.1 * alpha, high_net(x) * 0.1 * beta
MID_INPUT_CHANNELS = 6  # position map + texture map at 64^2
HIGH_INPUT_CHANNELS = 9  # position map + re-sampled texture map + upsampled deformation map at 256^2


# ----------------------------------------------------------------------------------------------
# weights


def load_weights(module: nn.Module, path: str | Path, *, what: str,
                 ignore_prefixes: Iterable[str] = ()) -> None:
    """Load a state dict saved with `torch.save` from ``path`` into ``module`` (strict).

    A `{"state_dict": ...}` wrapper and DataParallel's `module.` key prefix are accepted; keys that
    start with one of ``ignore_prefixes`` are dropped. Raises `FileFormatError` naming the file,
    ``what`` it should hold and the keys that do not match.
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(path, f"no such weights file (expected {what})")
    state = torch_load(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise FileFormatError(path, f"does not hold a state dict of tensors (expected {what})")
    ignore = tuple(ignore_prefixes)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not (ignore and k.startswith(ignore))}

    own = module.state_dict()
    for key in own:  # checkpoints from old PyTorch versions lack this unused BatchNorm counter
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, own[key])
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
                parts.append(f"{len(keys)} {label} keys ({', '.join(keys[:5])}{more})")
        raise FileFormatError(path, f"keys do not match {what}: " + "; ".join(parts))
    module.load_state_dict(state)


def init_weights(net: nn.Module, init_type: str = "normal", gain: float = INIT_GAIN,
                 generator: torch.Generator | None = None) -> nn.Module:
    """pix2pix's initialisation, in place: conv / linear weights by ``init_type`` (normal:
    N(0, gain)), their biases 0; affine norm layers' weights N(1, gain), biases 0. Returns ``net``."""
    def init(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            if init_type == "normal":
                nn.init.normal_(m.weight, 0.0, gain, generator=generator)
            elif init_type == "xavier":
                nn.init.xavier_normal_(m.weight, gain=gain, generator=generator)
            elif init_type == "kaiming":
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in", generator=generator)
            elif init_type == "orthogonal":
                nn.init.orthogonal_(m.weight, gain=gain, generator=generator)
            else:
                raise InputError(f"unknown init_type {init_type!r}; use normal, xavier, kaiming or orthogonal")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, AFFINE_NORMS) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, gain, generator=generator)
            nn.init.zeros_(m.bias)

    net.apply(init)
    return net


def _check_images(x: torch.Tensor, channels: int, name: str) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise InputError(f"{name} has shape {tuple(x.shape)}, expected (B, {channels}, H, W)")


# ----------------------------------------------------------------------------------------------
# base model


class BaseRegressor(nn.Module):
    """Deep3DFaceRecon's coefficient regressor: (B, 3, H, W) RGB in [0, 1] -> (B, 257).

    A torchvision ResNet (no ImageNet normalisation, as Deep3DFaceRecon; 224^2 is the trained
    size, any size works thanks to the global pooling) whose pooled features feed seven
    zero-initialised 1x1 conv heads, so the network predicts the mean face at initialisation.
    Module names match Deep3DFaceRecon's `net_recon` (`backbone.*`, `final_layers.k.*`), so its
    checkpoints load with `load_weights`. ``backbone_weights`` optionally names a backbone state
    dict (for example torchvision's ImageNet ResNet-50, whose `fc.*` keys are ignored).
    """

    def __init__(self, backbone: str = "resnet50", backbone_weights: str | Path | None = None):
        super().__init__()
        if backbone not in BACKBONES:
            raise InputError(f"unknown backbone {backbone!r}; use one of {', '.join(BACKBONES)}")
        make, features = BACKBONES[backbone]
        self.backbone = make(weights=None)
        self.backbone.fc = nn.Identity()  # the heads replace the classifier
        if backbone_weights is not None:
            load_weights(self.backbone, backbone_weights, what=f"a torchvision {backbone} state dict",
                         ignore_prefixes=("fc.",))
        self.final_layers = nn.ModuleList(nn.Conv2d(features, size, kernel_size=1) for size in HEAD_SIZES)
        for head in self.final_layers:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, 3, "images")
        features = self.backbone(images)[:, :, None, None]
        return torch.cat([head(features) for head in self.final_layers], dim=1).flatten(1)


# ----------------------------------------------------------------------------------------------
# pix2pix generator


def norm_layer(norm: str):
    """pix2pix's `get_norm_layer`: a constructor taking the channel count."""
    if norm == "instance":
        return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    if norm == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
    if norm == "none":
        return lambda channels: nn.Identity()
    raise InputError(f"unknown norm {norm!r}; use instance, batch or none")


class ResnetBlock(nn.Module):
    """Residual block: x + (pad, conv3, norm, ReLU, [dropout], pad, conv3, norm)(x)."""

    def __init__(self, dim: int, norm: str = "instance", use_dropout: bool = False, padding: str = "reflect"):
        super().__init__()
        pads = {"reflect": nn.ReflectionPad2d, "replicate": nn.ReplicationPad2d, "zero": nn.ZeroPad2d}
        if padding not in pads:
            raise InputError(f"unknown padding {padding!r}; use reflect, replicate or zero")
        make_norm, bias = norm_layer(norm), norm != "batch"
        layers = [pads[padding](1), nn.Conv2d(dim, dim, 3, bias=bias), make_norm(dim), nn.ReLU(True)]
        if use_dropout:
            layers.append(nn.Dropout(DROPOUT_P))
        layers += [pads[padding](1), nn.Conv2d(dim, dim, 3, bias=bias), make_norm(dim)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """pix2pix ResNet generator: (B, in, H, W) -> (B, out, H, W) in (-1, 1); H, W divisible by 4.

    c7s1-ngf, two stride-2 downsamplings, ``n_blocks`` residual blocks, two ConvTranspose2d
    upsamplings, c7s1-out, tanh. Convolutions carry a bias unless a BatchNorm follows them
    (pix2pix's rule). Weights are initialised with `init_weights` (N(0, 0.02)), as `define_G` does.
    """

    def __init__(self, in_channels: int, out_channels: int, ngf: int = GENERATOR_FILTERS,
                 n_blocks: int = GENERATOR_BLOCKS, norm: str = "instance", use_dropout: bool = False,
                 padding: str = "reflect"):
        super().__init__()
        make_norm, bias = norm_layer(norm), norm != "batch"
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7, bias=bias), make_norm(ngf), nn.ReLU(True)]
        for i in range(GENERATOR_DOWNSAMPLINGS):
            c = ngf * 2**i
            layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=bias), make_norm(2 * c), nn.ReLU(True)]
        c = ngf * 2**GENERATOR_DOWNSAMPLINGS
        layers += [ResnetBlock(c, norm, use_dropout, padding) for _ in range(n_blocks)]
        for i in range(GENERATOR_DOWNSAMPLINGS):
            c = ngf * 2 ** (GENERATOR_DOWNSAMPLINGS - i)
            layers += [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
                       make_norm(c // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# ----------------------------------------------------------------------------------------------
# detail networks


class _DetailNet(nn.Module):
    """A generator whose tanh output is scaled by 0.1 * a learnable scalar and the valid mask."""

    def __init__(self, in_channels: int, out_channels: int, ngf: int, n_blocks: int, norm: str,
                 use_dropout: bool):
        super().__init__()
        self.generator = ResnetGenerator(in_channels, out_channels, ngf, n_blocks, norm, use_dropout)
        self.in_channels = in_channels

    def _scaled(self, inputs: torch.Tensor, valid_mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        _check_images(inputs, self.in_channels, "inputs")
        _check_images(valid_mask, 1, "valid_mask")
        if valid_mask.shape[-2:] != inputs.shape[-2:]:
            raise InputError(f"valid_mask is {tuple(valid_mask.shape[-2:])}, the maps are {tuple(inputs.shape[-2:])}")
        # the generator already ends in tanh: this is HRN's `mid_net(x) * 0.1 * alpha * mask`
        return self.generator(inputs) * (DETAIL_OUTPUT_SCALE * scale) * valid_mask


class MidDetailNet(_DetailNet):
    """Mid-frequency net: position + texture maps (B, 3, 64, 64) each -> deformation map
    (B, 3, 64, 64) = tanh(G(.)) * 0.1 * alpha * valid_mask, in model units.

    ``alpha`` is a learnable scalar initialised at 0.01 (a parameter of this module, so the
    optimiser of the net trains it, as HRN's does). HRN feeds the texture map scaled to [-1, 1]
    and the 256^2 valid mask bilinearly downsampled to 64^2; both are the caller's job.
    ``use_dropout`` defaults to True because HRN's `Pix2PixOptions` leaves `no_dropout` False, so
    its generators train with dropout 0.5 in every residual block (off in `eval()`).
    """

    def __init__(self, ngf: int = GENERATOR_FILTERS, n_blocks: int = GENERATOR_BLOCKS, norm: str = "instance",
                 use_dropout: bool = True):
        super().__init__(MID_INPUT_CHANNELS, 3, ngf, n_blocks, norm, use_dropout)
        self.alpha = nn.Parameter(torch.tensor(cv.DETAIL_SCALE_INIT))

    def forward(self, position_map: torch.Tensor, texture_map: torch.Tensor,
                valid_mask: torch.Tensor) -> torch.Tensor:
        return self._scaled(torch.cat([position_map, texture_map], dim=1), valid_mask, self.alpha)


class HighDetailNet(_DetailNet):
    """High-frequency net: position map, re-sampled texture map and deformation map -> displacement
    map (B, 1, 256, 256) = tanh(G(.)) * 0.1 * beta * valid_mask, in model units along the normal.

    The deformation map may come at its own 64^2 size: it is bilinearly upsampled to the position
    map's size, as HRN does. ``beta`` is a learnable scalar initialised at 0.01; see `MidDetailNet`
    for ``use_dropout``.
    """

    def __init__(self, ngf: int = GENERATOR_FILTERS, n_blocks: int = GENERATOR_BLOCKS, norm: str = "instance",
                 use_dropout: bool = True):
        super().__init__(HIGH_INPUT_CHANNELS, 1, ngf, n_blocks, norm, use_dropout)
        self.beta = nn.Parameter(torch.tensor(cv.DETAIL_SCALE_INIT))

    def forward(self, position_map: torch.Tensor, texture_map: torch.Tensor, deformation_map: torch.Tensor,
                valid_mask: torch.Tensor) -> torch.Tensor:
        _check_images(deformation_map, 3, "deformation_map")
        size = position_map.shape[-2:]
        if deformation_map.shape[-2:] != size:
            deformation_map = F.interpolate(deformation_map, size=size, mode="bilinear", align_corners=False)
        inputs = torch.cat([position_map, texture_map, deformation_map], dim=1)
        return self._scaled(inputs, valid_mask, self.beta)


# ----------------------------------------------------------------------------------------------
# discriminator


class PatchDiscriminator(nn.Module):
    """pix2pix PatchGAN: (B, in, H, W) -> (B, 1, h, w) logits, one per overlapping patch.

    A stride-2 conv without norm, ``n_layers - 1`` stride-2 convs with norm, a stride-1 conv with
    norm (each followed by LeakyReLU 0.2; filters ndf * min(2^k, 8)), and a final stride-1
    conv to one channel; kernel 4, padding 1. ``norm`` defaults to "batch", pix2pix's default
    (HRN's `Pix2PixOptions` would give "instance"). No sigmoid: the LSGAN losses take logits.
    Weights are initialised with `init_weights` (N(0, 0.02), norm weights N(1, 0.02)).
    """

    def __init__(self, in_channels: int, ndf: int = DISCRIMINATOR_FILTERS, n_layers: int = DISCRIMINATOR_LAYERS,
                 norm: str = "batch"):
        super().__init__()
        make_norm, bias = norm_layer(norm), norm != "batch"
        k, p = DISCRIMINATOR_KERNEL, DISCRIMINATOR_PADDING
        layers = [nn.Conv2d(in_channels, ndf, k, stride=2, padding=p), nn.LeakyReLU(LEAKY_SLOPE, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, k, stride=stride, padding=p, bias=bias),
                       make_norm(ndf * mult), nn.LeakyReLU(LEAKY_SLOPE, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, k, stride=1, padding=p))
        self.model = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
