"""The frozen face-recognition feature extractor behind the perceptual loss (ArcFace IResNet or a tiny
random stand-in for tests) and the 5-point similarity alignment of its 112x112 input crops."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from facehd.errors import InputError
from facehd.wild import landmarks68_to_5  # noqa: F401  (re-exported: the perceptual loss aligns on 5 points)
from hrn_baseline.networks import load_weights

# ArcFace's 112x112 five-point template (insightface `arcface_src`, also Deep3DFaceRecon
# `estimate_norm`): left eye, right eye, nose tip, left and right mouth corners, in pixels.
ARCFACE_TEMPLATE_112 = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)
ARCFACE_SIZE = 112
EMBEDDING_SIZE = 512

# arcface_torch `iresnet*`: residual blocks per stage
IRESNET_LAYERS = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}
IRESNET_WIDTHS = (64, 128, 256, 512)
IRESNET_FINAL_SIDE = 7  # a 112^2 input ends as 7x7 after four stride-2 stages
BN_EPS = 1e-5


# ----------------------------------------------------------------------------------------------
# alignment


def similarity_to_template(points: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """(B, K, 2) points, (K, 2) template -> (B, 2, 3) least-squares similarity (scale, rotation,
    translation; no reflection) mapping the points onto the template.

    In 2D this is Umeyama's solution in closed form: with complex numbers z (points) and w
    (template), centred, the scaled rotation is a = sum(conj(z) w) / sum(|z|^2).
    """
    z = points - points.mean(-2, keepdim=True)
    w = template - template.mean(-2, keepdim=True)
    norm = (z**2).sum((-1, -2))
    if bool((norm <= 0).any()):
        raise InputError("the alignment landmarks of an image all coincide")
    p = (z[..., 0] * w[..., 0] + z[..., 1] * w[..., 1]).sum(-1) / norm
    q = (z[..., 0] * w[..., 1] - z[..., 1] * w[..., 0]).sum(-1) / norm
    rot = torch.stack([torch.stack([p, -q], -1), torch.stack([q, p], -1)], -2)  # (B, 2, 2)
    t = template.mean(-2) - (rot @ points.mean(-2)[..., None])[..., 0]
    return torch.cat([rot, t[..., None]], dim=-1)


def _pixel_to_normalized(width: int, height: int, ref: torch.Tensor) -> torch.Tensor:
    """(3, 3) map from pixel coordinates (centres at integers) to grid_sample's [-1, 1] with
    align_corners=True."""
    return ref.new_tensor([[2.0 / (width - 1), 0.0, -1.0], [0.0, 2.0 / (height - 1), -1.0], [0.0, 0.0, 1.0]])


def align_5pt(images: torch.Tensor, landmarks5: torch.Tensor, size: int = ARCFACE_SIZE) -> torch.Tensor:
    """(B, C, H, W) images, (B, 5, 2) landmarks (x, row) in pixels -> (B, C, size, size) crops.

    The similarity that best maps the five points onto ArcFace's template (scaled from 112 to
    ``size``) warps the image, bilinearly with zero padding; pixel centres sit at integer
    coordinates. Differentiable with respect to the images (and the landmarks).
    """
    if images.ndim != 4:
        raise InputError(f"images have shape {tuple(images.shape)}, expected (B, C, H, W)")
    if landmarks5.shape != (images.shape[0], 5, 2):
        raise InputError(f"landmarks5 have shape {tuple(landmarks5.shape)}, expected ({images.shape[0]}, 5, 2)")
    b, c, h, w = images.shape
    landmarks5 = landmarks5.to(images.dtype)
    template = landmarks5.new_tensor(ARCFACE_TEMPLATE_112) * (size / ARCFACE_SIZE)
    forward = similarity_to_template(landmarks5, template)
    bottom = forward.new_tensor([0.0, 0.0, 1.0]).expand(b, 1, 3)
    crop_to_image = torch.linalg.inv(torch.cat([forward, bottom], dim=1))  # (B, 3, 3)
    theta = _pixel_to_normalized(w, h, images) @ crop_to_image @ torch.linalg.inv(
        _pixel_to_normalized(size, size, images))
    grid = F.affine_grid(theta[:, :2], [b, c, size, size], align_corners=True)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


# ----------------------------------------------------------------------------------------------
# ArcFace IResNet (arcface_torch `backbones/iresnet.py`; module names kept so its weights load)


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block: BN, conv3, BN, PReLU, conv3 (stride), BN, + shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=BN_EPS)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes, eps=BN_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """ArcFace's IResNet: (B, 3, 112, 112) in [-1, 1] -> (B, 512) embedding (not normalised)."""

    def __init__(self, layers: tuple[int, int, int, int] = IRESNET_LAYERS["iresnet50"],
                 num_features: int = EMBEDDING_SIZE):
        super().__init__()
        self.conv1 = nn.Conv2d(3, IRESNET_WIDTHS[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(IRESNET_WIDTHS[0], eps=BN_EPS)
        self.prelu = nn.PReLU(IRESNET_WIDTHS[0])
        inplanes = IRESNET_WIDTHS[0]
        for i, (planes, blocks) in enumerate(zip(IRESNET_WIDTHS, layers), start=1):
            stage = [IBasicBlock(inplanes, planes, stride=2)] + [IBasicBlock(planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*stage))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(inplanes, eps=BN_EPS)
        self.dropout = nn.Dropout(0.0)  # kept for the module layout; arcface_torch's default p = 0
        self.fc = nn.Linear(inplanes * IRESNET_FINAL_SIDE**2, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(self.dropout(self.bn2(x).flatten(1))))


def _tiny_net(feature_dim: int, generator: torch.Generator) -> nn.Module:
    """A three-conv random network: enough to give image-dependent features in tests."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.PReLU(8),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.PReLU(16),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.PReLU(32),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 16, feature_dim),
    )
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, generator=generator)
            nn.init.normal_(m.bias, 0.0, 0.1, generator=generator)
    return net


# ----------------------------------------------------------------------------------------------
# the frozen recogniser


class FaceRecognizer(nn.Module):
    """Frozen feature extractor: (B, 3, 112, 112) aligned crops, RGB in [0, 1] -> (B, D) unit vectors.

    Crops are mapped to [-1, 1] (ArcFace's input range) before the network; the network stays in
    eval mode (frozen BatchNorm statistics) and its parameters never require gradients, but
    gradients flow to the input crops.
    """

    def __init__(self, net: nn.Module, input_size: int = ARCFACE_SIZE):
        super().__init__()
        self.net = net
        self.input_size = input_size
        for param in self.net.parameters():
            param.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True) -> FaceRecognizer:
        super().train(mode)
        self.net.eval()  # frozen: BatchNorm must keep the pretrained statistics
        return self

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        s = self.input_size
        if crops.ndim != 4 or crops.shape[1:] != (3, s, s):
            raise InputError(f"crops have shape {tuple(crops.shape)}, expected (B, 3, {s}, {s})")
        return F.normalize(self.net(2.0 * crops - 1.0), dim=-1)

    @classmethod
    def from_file(cls, path: str | Path, arch: str = "iresnet50") -> FaceRecognizer:
        """An ArcFace IResNet with weights from ``path`` (an arcface_torch `backbone.pth` state
        dict, fp16 or fp32). Raises `FileFormatError` naming the file when the keys do not match."""
        if arch not in IRESNET_LAYERS:
            raise InputError(f"unknown arch {arch!r}; use one of {', '.join(IRESNET_LAYERS)}")
        net = IResNet(IRESNET_LAYERS[arch])
        load_weights(net, path, what=f"an ArcFace {arch} backbone state dict (arcface_torch backbone.pth)")
        return cls(net)

    @classmethod
    def small_random(cls, seed: int = 0, feature_dim: int = 64) -> FaceRecognizer:
        """A tiny randomly initialised stand-in with the same interface (tests; no weights needed)."""
        generator = torch.Generator().manual_seed(seed)
        return cls(_tiny_net(feature_dim, generator))
