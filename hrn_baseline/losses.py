"""HRN's training losses (DESIGN.md section 4), their default weights and the weighted totals
L_self and L_super."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from facehd import conventions as cv
from facehd.errors import InputError
from hrn_baseline.face_recognition import ARCFACE_SIZE, align_5pt

# Deep3DFaceRecon / HRN `photo_loss`: the epsilon under the square root keeps the gradient finite
# where the rendered and input colours agree exactly.
PHOTO_EPS = 1e-6
# Deep3DFaceRecon / HRN `landmark_loss`: weight 20 on the nose (0-based 28-30) and the inner lips
# (60-67), 1 elsewhere.
LANDMARK_HIGH_WEIGHT = 20.0
LANDMARK_HIGH_INDICES = (28, 29, 30, *range(60, 68))
# HRN `TVLoss` returns 2 * (mean squared vertical + mean squared horizontal difference).
TV_FACTOR = 2.0
# HRN `contour_aware_loss`: distances in units of the 224-pixel image width, 0.01 margin.
CONTOUR_MARGIN = 0.01
CONTOUR_NORMALIZER = cv.IMAGE_SIZE
# pix2pix `backward_D`: the discriminator loss is halved to slow D relative to G.
LSGAN_D_FACTOR = 0.5


def _check(x: torch.Tensor, shape: tuple, name: str) -> None:
    """Check ``x`` has ``shape`` where None matches any size."""
    if x.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, x.shape)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise InputError(f"{name} has shape {tuple(x.shape)}, expected ({want})")


# ----------------------------------------------------------------------------------------------
# image losses


def photometric_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = PHOTO_EPS
                     ) -> torch.Tensor:
    """(B, 3, H, W) rendered and input images, (B, 1, H, W) mask -> scalar.

    sum over pixels of sqrt(sum_rgb (pred - target)^2 + eps) * mask, divided by the mask sum; the
    divisor is at least 1 (as in the public code), so an empty mask gives 0, not NaN.
    """
    _check(pred, (None, 3, None, None), "pred")
    _check(target, tuple(pred.shape), "target")
    _check(mask, (pred.shape[0], 1, *pred.shape[2:]), "mask")
    per_pixel = torch.sqrt(((pred - target) ** 2).sum(dim=1, keepdim=True) + eps) * mask
    return per_pixel.sum() / mask.sum().clamp_min(1.0)


def perceptual_loss(recognizer: Callable[[torch.Tensor], torch.Tensor], pred_img: torch.Tensor,
                    target_img: torch.Tensor, landmarks5: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 - cos(features(pred crop), features(target crop)) -> scalar.

    pred_img, target_img: (B, 3, H, W) RGB in [0, 1]; landmarks5: (B, 5, 2) pixel (x, row)
    coordinates of the five points in the target image, which align both images the same way
    (`align_5pt`). ``recognizer`` maps (B, 3, s, s) crops in [0, 1] to (B, D) features, s being its
    `input_size` (112 if it has none), for example a `FaceRecognizer`.
    """
    _check(pred_img, (None, 3, None, None), "pred_img")
    _check(target_img, tuple(pred_img.shape), "target_img")
    size = getattr(recognizer, "input_size", ARCFACE_SIZE)
    feat_pred = F.normalize(recognizer(align_5pt(pred_img, landmarks5, size)), dim=-1)
    feat_target = F.normalize(recognizer(align_5pt(target_img, landmarks5, size)), dim=-1)
    return (1.0 - (feat_pred * feat_target).sum(-1)).mean()


# ----------------------------------------------------------------------------------------------
# geometry losses


def landmark_weights(n_points: int = cv.N_LANDMARKS, *, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """(n_points,) weights of the landmark loss: 20 at iBUG 28-30 and 60-67, else 1."""
    w = torch.ones(n_points, dtype=dtype, device=device)
    w[[i for i in LANDMARK_HIGH_INDICES if i < n_points]] = LANDMARK_HIGH_WEIGHT
    return w


def landmark_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 68, 2) predicted and detected landmarks in pixels -> scalar
    sum_{b,i} w_i ||pred - target||^2 / (B * 68), with `landmark_weights` by default."""
    _check(pred, (None, None, 2), "pred")
    _check(target, tuple(pred.shape), "target")
    if weights is None:
        weights = landmark_weights(pred.shape[1], dtype=pred.dtype, device=pred.device)
    squared = ((pred - target) ** 2).sum(-1) * weights
    return squared.sum() / (pred.shape[0] * pred.shape[1])


def tv_loss(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) deformation map -> scalar total variation, HRN's `TVLoss` formula:
    2 * (mean of squared vertical differences + mean of squared horizontal differences).

    The squared form is what the public code uses and what the weight 5e3 was tuned with.
    """
    _check(maps, (None, None, None, None), "maps")
    dv = maps[:, :, 1:, :] - maps[:, :, :-1, :]
    dh = maps[:, :, :, 1:] - maps[:, :, :, :-1]
    return TV_FACTOR * ((dv**2).mean() + (dh**2).mean())


def displacement_l1(displacement: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) displacement map -> scalar mean |displacement| (HRN's regulariser)."""
    return displacement.abs().mean()


def silhouette_columns(face_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, H, W) mask -> (B, H) leftmost and rightmost mask column of each row (int64) and
    whether the row holds any mask pixel (bool). Float masks are thresholded at 0.5."""
    _check(face_mask, (None, None, None), "face_mask")
    mask = face_mask > 0.5 if face_mask.is_floating_point() else face_mask.bool()
    width = mask.shape[-1]
    cols = torch.arange(width, device=mask.device)
    left = torch.where(mask, cols, width).amin(dim=-1)
    right = torch.where(mask, cols, -1).amax(dim=-1)
    return left, right, mask.any(dim=-1)


def contour_loss(proj_vertices: torch.Tensor, face_mask: torch.Tensor,
                 image_size: int = CONTOUR_NORMALIZER) -> torch.Tensor:
    """(B, N, 2) projected vertices (x, row) in pixels, (B, H, W) face mask -> scalar.

    For each image row, L and R are the leftmost and rightmost mask columns. A vertex samples the
    row nearest to it (rounded, clamped to the image) and scores
    d = ((L - x) / s) ((R - x) / s) / (max(|L - x|, |R - x|) / s), s = ``image_size``,
    which is its signed horizontal distance to the nearer silhouette column in units of s:
    positive outside [L, R], negative inside. The term is |relu(d + 0.01) - 0.01|, averaged over
    all B * N vertices: outside it is the distance d (pulling the vertex in); within 0.01 s
    (2.24 px) inside it is |d| (pulling it onto the contour); deeper inside it is the constant
    0.01 (no gradient). Vertices on rows without mask pixels score 0.

    The public code differs in three details: its row is the ceil of the y-up coordinate (the
    floor of the row), its L is the first mask column + 1, and an empty row counts as L = 0,
    R = W - 1 (the whole row inside). Convert `reconstruct`'s y-up projections with `y_up_to_rows`.
    """
    _check(proj_vertices, (None, None, 2), "proj_vertices")
    _check(face_mask, (proj_vertices.shape[0], None, None), "face_mask")
    left, right, has_mask = silhouette_columns(face_mask)
    rows = proj_vertices[..., 1].detach().round().long().clamp(0, face_mask.shape[1] - 1)  # (B, N)
    x = proj_vertices[..., 0]
    to_left = (left.gather(1, rows).to(x.dtype) - x) / image_size
    to_right = (right.gather(1, rows).to(x.dtype) - x) / image_size
    # L = R = x makes both factors 0; the clamp keeps 0 / 0 out of the graph
    farther = torch.maximum(to_left.abs(), to_right.abs()).clamp_min(torch.finfo(x.dtype).eps)
    d = torch.where(has_mask.gather(1, rows), to_left * to_right / farther, torch.zeros_like(x))
    return (F.relu(d + CONTOUR_MARGIN) - CONTOUR_MARGIN).abs().mean()


# ----------------------------------------------------------------------------------------------
# adversarial and supervised losses


def lsgan_generator_loss(logits: torch.Tensor) -> torch.Tensor:
    """Discriminator logits on generated maps (any shape) -> scalar mean (logits - 1)^2."""
    return ((logits - 1.0) ** 2).mean()


def lsgan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Logits on real (ground-truth) and generated maps -> scalar
    0.5 * (mean (real - 1)^2 + mean fake^2); pass detached fakes when updating D."""
    return LSGAN_D_FACTOR * (((real_logits - 1.0) ** 2).mean() + (fake_logits**2).mean())


def map_l1(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, H, W) predicted and ground-truth detail maps, optional (B, 1, H, W) valid mask ->
    scalar mean |pred - gt| over the valid texels and channels (all of them without a mask; the
    divisor is at least 1, so an empty mask gives 0)."""
    _check(pred, (None, None, None, None), "pred")
    _check(gt, tuple(pred.shape), "gt")
    diff = (pred - gt).abs()
    if mask is None:
        return diff.mean()
    _check(mask, (pred.shape[0], 1, *pred.shape[2:]), "mask")
    weights = mask.expand_as(diff)
    return (diff * weights).sum() / weights.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------------------------
# weights and totals


@dataclass(frozen=True)
class LossWeights:
    """The lambdas of L_self and L_super; defaults from the HRN supplement, Sec. 3.2."""

    photo: float = 1.9  # l1, on each of the two renders (mid, high)
    perceptual: float = 0.2  # l2, on each of the two renders
    landmark: float = 1.6e-4  # l3
    tv: float = 5e3  # l4, total variation of the deformation map
    reg: float = 10.0  # l5, L1 of the displacement map
    contour: float = 20.0  # l6
    adversarial: float = 0.2  # l7, on each of the two discriminators (mid, high)
    supervised: float = 1.0  # l8, L1 to the ground-truth deformation and displacement maps

    @classmethod
    def public_code(cls) -> LossWeights:
        """The public HRN code's defaults where they differ: w_color 1.92, w_lm 1.6e-3, w_adv 1.0."""
        return cls(photo=1.92, landmark=1.6e-3, adversarial=1.0)


# term name -> the LossWeights field that weighs it
SELF_TERMS = {
    "photo_mid": "photo", "photo_high": "photo",
    "perceptual_mid": "perceptual", "perceptual_high": "perceptual",
    "landmark": "landmark", "tv": "tv", "reg": "reg", "contour": "contour",
    "adv_mid": "adversarial", "adv_high": "adversarial",
}
SUPER_TERMS = {**SELF_TERMS, "mid": "supervised", "high": "supervised"}


def _weighted_total(terms: Mapping[str, torch.Tensor], table: Mapping[str, str], weights: LossWeights
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    unknown = sorted(set(terms) - set(table))
    if unknown:
        raise InputError(f"unknown loss terms {', '.join(unknown)}; known: {', '.join(table)}")
    if not terms:
        raise InputError("no loss terms given")
    weighted = {name: getattr(weights, table[name]) * value for name, value in terms.items()}
    return sum(weighted.values()), weighted


def total_self_loss(terms: Mapping[str, torch.Tensor], weights: LossWeights | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_self = l1 (photo_mid + photo_high) + l2 (perceptual_mid + perceptual_high) + l3 landmark
    + l4 tv + l5 reg + l6 contour + l7 (adv_mid + adv_high).

    ``terms`` maps those names (a subset is fine, e.g. without the adversarial terms) to unweighted
    scalar losses; returns the total and the dict of weighted terms. Unknown names raise InputError.
    """
    return _weighted_total(terms, SELF_TERMS, weights or LossWeights())


def total_super_loss(terms: Mapping[str, torch.Tensor], weights: LossWeights | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_super = L_self + l8 (mid + high): ``terms`` as for `total_self_loss` plus "mid" and "high",
    the `map_l1` losses to the ground-truth deformation and displacement maps."""
    return _weighted_total(terms, SUPER_TERMS, weights or LossWeights())
