import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from facehd.errors import InputError
from hrn_baseline.face_recognition import (
    ARCFACE_TEMPLATE_112,
    FaceRecognizer,
    align_5pt,
    landmarks68_to_5,
)
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

D = torch.float64


def _rand(*shape, seed=0, requires_grad=False):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)
    return x.requires_grad_(requires_grad)


def _grads(fn, *inputs):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    fn(*inputs).backward()
    return [x.grad for x in inputs]


# ----------------------------------------------------------------------------------------------
# photometric


def _photometric_naive(pred, target, mask):
    b, _, h, w = pred.shape
    total = 0.0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                sq = sum((pred[i, c, y, x] - target[i, c, y, x]) ** 2 for c in range(3))
                total = total + torch.sqrt(sq + 1e-6) * mask[i, 0, y, x]
    return total / max(mask.sum(), torch.ones((), dtype=mask.dtype))


def test_photometric_matches_naive_values_and_gradients():
    pred, target = _rand(2, 3, 4, 5, seed=1), _rand(2, 3, 4, 5, seed=2)
    mask = (_rand(2, 1, 4, 5, seed=3) > 0.4).to(D)
    assert_close(photometric_loss(pred, target, mask), _photometric_naive(pred, target, mask), atol=1e-12)
    fast, naive = _grads(photometric_loss, pred, target, mask), _grads(_photometric_naive, pred, target, mask)
    for a, b in zip(fast, naive):
        assert_close(a, b, atol=1e-12)
    assert torch.autograd.gradcheck(lambda p: photometric_loss(p, target, mask), pred.requires_grad_())


def test_photometric_is_normalised_by_the_mask():
    pred = torch.zeros(1, 3, 6, 6, dtype=D)
    target = torch.zeros_like(pred)
    target[:, 0] = 0.3  # the same error everywhere: the loss is that error, whatever the mask size
    for n in (1, 7, 36):
        mask = torch.zeros(1, 1, 6, 6, dtype=D)
        mask.view(-1)[:n] = 1
        assert photometric_loss(pred, target, mask).item() == pytest.approx(math.sqrt(0.09 + 1e-6))
    assert photometric_loss(pred, target, torch.zeros(1, 1, 6, 6, dtype=D)).item() == 0.0
    with pytest.raises(InputError, match="mask"):
        photometric_loss(pred, target, torch.ones(1, 3, 6, 6))


# ----------------------------------------------------------------------------------------------
# landmarks, tv, displacement, maps


def test_landmark_weights_at_the_right_indices():
    w = landmark_weights()
    assert w.shape == (68,)
    assert torch.nonzero(w == 20).flatten().tolist() == [28, 29, 30, 60, 61, 62, 63, 64, 65, 66, 67]
    assert torch.all(w[w != 20] == 1)


def _landmark_naive(pred, target):
    b, n, _ = pred.shape
    total = 0.0
    for i in range(b):
        for k in range(n):
            w = 20.0 if k in (28, 29, 30) or 60 <= k <= 67 else 1.0
            total = total + w * ((pred[i, k, 0] - target[i, k, 0]) ** 2 + (pred[i, k, 1] - target[i, k, 1]) ** 2)
    return total / (b * n)


def test_landmark_loss_matches_naive():
    pred, target = _rand(2, 68, 2, seed=1) * 224, _rand(2, 68, 2, seed=2) * 224
    assert_close(landmark_loss(pred, target), _landmark_naive(pred, target), rtol=1e-12)
    for fast, naive in zip(_grads(landmark_loss, pred, target), _grads(_landmark_naive, pred, target)):
        assert_close(fast, naive, rtol=1e-12)
    one = torch.zeros(1, 68, 2, dtype=D)
    one[0, 29, 1] = 2.0  # a weighted point: 20 * 4 / 68
    assert landmark_loss(one, torch.zeros_like(one)).item() == pytest.approx(80 / 68)


def _tv_naive(x):
    b, c, h, w = x.shape
    vertical = sum((x[i, k, y + 1, z] - x[i, k, y, z]) ** 2
                   for i in range(b) for k in range(c) for y in range(h - 1) for z in range(w))
    horizontal = sum((x[i, k, y, z + 1] - x[i, k, y, z]) ** 2
                     for i in range(b) for k in range(c) for y in range(h) for z in range(w - 1))
    return 2 * (vertical / (b * c * (h - 1) * w) + horizontal / (b * c * h * (w - 1)))


def test_tv_loss_matches_naive():
    x = _rand(2, 3, 4, 5, seed=4)
    assert_close(tv_loss(x), _tv_naive(x), rtol=1e-12)
    assert_close(_grads(tv_loss, x)[0], _grads(_tv_naive, x)[0], atol=1e-14, rtol=1e-12)
    assert torch.autograd.gradcheck(tv_loss, x.requires_grad_())
    assert tv_loss(torch.full((1, 3, 8, 8), 0.7)).item() == 0.0  # constant maps are smooth


def test_displacement_l1_and_map_l1():
    disp = _rand(2, 1, 3, 3, seed=5) - 0.5
    assert displacement_l1(disp).item() == pytest.approx(disp.abs().sum().item() / 18)
    pred, gt = _rand(2, 3, 4, 4, seed=6), _rand(2, 3, 4, 4, seed=7)
    mask = (_rand(2, 1, 4, 4, seed=8) > 0.5).to(D)
    naive = sum(abs(pred[b, c, y, x] - gt[b, c, y, x]) * mask[b, 0, y, x]
                for b in range(2) for c in range(3) for y in range(4) for x in range(4)) / (3 * mask.sum())
    assert_close(map_l1(pred, gt, mask), naive, rtol=1e-12)
    assert_close(map_l1(pred, gt), (pred - gt).abs().mean(), rtol=1e-12)
    assert map_l1(pred, gt, torch.zeros_like(mask)).item() == 0.0


# ----------------------------------------------------------------------------------------------
# contour


def _contour_naive(proj, mask, s=224):
    b, n, _ = proj.shape
    h, w = mask.shape[1:]
    total = 0.0
    for i in range(b):
        for k in range(n):
            x = proj[i, k, 0]
            row = min(max(round(float(proj[i, k, 1].detach())), 0), h - 1)
            cols = [c for c in range(w) if mask[i, row, c]]
            if not cols:
                continue  # rows without mask pixels contribute 0
            lo, hi = min(cols), max(cols)
            d = ((lo - x) / s) * ((hi - x) / s) / (max(abs(lo - x), abs(hi - x)) / s)
            total = total + abs(max(d + 0.01, 0.0) - 0.01)
    return total / (b * n)


def _contour_case():
    mask = torch.zeros(2, 8, 12, dtype=torch.bool)
    mask[0, 1:6, 3:9] = True
    mask[0, 3, 2] = True  # a ragged silhouette
    mask[1, 2:8, 5:11] = True
    g = torch.Generator().manual_seed(9)
    xs = torch.rand(2, 30, generator=g, dtype=D) * 16 - 2
    rows = torch.randint(-1, 9, (2, 30), generator=g).to(D) + 0.3 * torch.rand(2, 30, generator=g, dtype=D) - 0.15
    return torch.stack([xs, rows], -1), mask


def test_contour_loss_matches_naive_values_and_gradients():
    proj, mask = _contour_case()
    assert_close(contour_loss(proj, mask), _contour_naive(proj, mask), rtol=1e-12)
    fast = _grads(lambda p: contour_loss(p, mask), proj)[0]
    naive = _grads(lambda p: _contour_naive(p, mask), proj)[0]
    assert_close(fast, naive, atol=1e-15, rtol=1e-12)
    assert torch.all(fast[..., 1] == 0)  # rows are sampled, not differentiated


def test_contour_loss_gradcheck():
    proj, mask = _contour_case()
    # keep away from the kinks (d = 0, d = -0.01, the midpoint of L and R) for finite differences
    assert torch.autograd.gradcheck(lambda p: contour_loss(p, mask), proj.requires_grad_(), atol=1e-8)


def test_contour_loss_inside_on_and_outside_the_silhouette():
    mask = torch.zeros(1, 10, 224, dtype=torch.bool)
    mask[0, 2:8, 50:150] = True  # L = 50, R = 149

    def term(x, row=4.0):
        return contour_loss(torch.tensor([[[x, row]]], dtype=D), mask).item()

    # deep inside: the constant 0.01 (|relu(d + 0.01) - 0.01| with d < -0.01), without gradient
    assert term(100.0) == pytest.approx(0.01)
    inside = torch.tensor([[[100.0, 4.0]]], dtype=D, requires_grad=True)
    contour_loss(inside, mask).backward()
    assert inside.grad.abs().sum() == 0
    assert term(50.0) == 0.0 and term(149.0) == 0.0  # on the silhouette
    assert term(51.0) == pytest.approx(1 / 224)  # within 2.24 px inside: |d|
    outside = [term(x) for x in (48.0, 40.0, 20.0, 0.0)]
    assert outside[0] == pytest.approx(2 / 224) and all(a < b for a, b in zip(outside, outside[1:]))
    assert term(160.0) == pytest.approx(11 / 224)
    assert term(100.0, row=0.0) == 0.0  # a row without mask pixels


def test_contour_loss_accepts_float_masks():
    proj, mask = _contour_case()
    assert_close(contour_loss(proj, mask.to(D)), contour_loss(proj, mask), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# adversarial and totals


def test_lsgan_losses_for_known_logits():
    ones, zeros = torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)
    assert lsgan_generator_loss(ones).item() == 0.0
    assert lsgan_generator_loss(zeros).item() == 1.0
    assert lsgan_generator_loss(torch.full((4,), 3.0)).item() == 4.0
    assert lsgan_discriminator_loss(ones, zeros).item() == 0.0
    assert lsgan_discriminator_loss(zeros, ones).item() == 1.0  # 0.5 * (1 + 1)
    assert lsgan_discriminator_loss(ones * 0.5, ones * 0.5).item() == 0.25


def test_loss_weights_defaults_and_public_preset():
    w = LossWeights()
    assert (w.photo, w.perceptual, w.landmark, w.tv, w.reg, w.contour, w.adversarial, w.supervised) == (
        1.9, 0.2, 1.6e-4, 5e3, 10.0, 20.0, 0.2, 1.0)
    p = LossWeights.public_code()
    assert (p.photo, p.landmark, p.adversarial) == (1.92, 1.6e-3, 1.0)
    assert (p.perceptual, p.tv, p.reg, p.contour, p.supervised) == (0.2, 5e3, 10.0, 20.0, 1.0)


SELF_NAMES = ["photo_mid", "photo_high", "perceptual_mid", "perceptual_high", "landmark", "tv", "reg",
              "contour", "adv_mid", "adv_high"]


def test_total_self_and_super_losses():
    terms = {name: torch.tensor(float(k + 1)) for k, name in enumerate(SELF_NAMES)}
    total, weighted = total_self_loss(terms)
    expected = 1.9 * (1 + 2) + 0.2 * (3 + 4) + 1.6e-4 * 5 + 5e3 * 6 + 10 * 7 + 20 * 8 + 0.2 * (9 + 10)
    assert total.item() == pytest.approx(expected)
    assert weighted["tv"].item() == pytest.approx(3e4) and set(weighted) == set(SELF_NAMES)
    total_pc, _ = total_self_loss(terms, LossWeights.public_code())
    assert total_pc.item() == pytest.approx(expected + 0.02 * 3 + 1.44e-3 * 5 + 0.8 * 19)
    sup, weighted_sup = total_super_loss({**terms, "mid": torch.tensor(0.5), "high": torch.tensor(0.25)})
    assert sup.item() == pytest.approx(expected + 0.75) and weighted_sup["high"].item() == 0.25
    partial, _ = total_self_loss({"photo_mid": torch.tensor(1.0)})  # e.g. no discriminator yet
    assert partial.item() == pytest.approx(1.9)
    with pytest.raises(InputError, match="photometric"):
        total_self_loss({"photometric": torch.tensor(1.0)})
    with pytest.raises(InputError, match="mid"):
        total_self_loss({"mid": torch.tensor(1.0)})  # supervised terms belong to L_super only


# ----------------------------------------------------------------------------------------------
# alignment and perceptual loss


def _similarity_lstsq(src, dst):
    """Least-squares similarity [[a, -b, tx], [b, a, ty]] mapping src onto dst (numpy)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def _bilinear_zero_pad(img, x, y):
    c, h, w = img.shape
    x0, y0 = math.floor(x), math.floor(y)
    out = np.zeros(c)
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - abs(x - xi)) * (1 - abs(y - yi))
            if 0 <= xi < w and 0 <= yi < h:
                out += weight * img[:, yi, xi]
    return out


def _face_landmarks(scale, angle_deg, shift):
    """Five points = the template under a known similarity (x, row pixels in a 224 image)."""
    t = np.asarray(ARCFACE_TEMPLATE_112) - 56.0
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return scale * t @ rot.T + np.asarray(shift)


def test_align_5pt_matches_naive_warp():
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 40, 50, generator=g, dtype=D)
    lm = np.stack([_face_landmarks(0.35, 12, (24, 20)), _face_landmarks(0.3, -8, (25, 21))])
    lm = lm + np.random.default_rng(0).normal(0, 0.7, lm.shape)  # not an exact similarity
    crops = align_5pt(images, torch.as_tensor(lm), size=112)
    assert crops.shape == (2, 3, 112, 112)
    for b in range(2):
        inverse = np.linalg.inv(np.vstack([_similarity_lstsq(lm[b], ARCFACE_TEMPLATE_112), [0, 0, 1]]))
        for u, v in [(0, 0), (56, 60), (111, 111), (13, 97), (80, 5), (38, 51)]:
            x, y, _ = inverse @ np.array([u, v, 1.0])
            assert_close(crops[b, :, v, u], _bilinear_zero_pad(images[b].numpy(), x, y), atol=1e-10)


def test_align_5pt_puts_the_landmarks_on_the_template():
    lm = np.stack([_face_landmarks(1.6, 10, (110, 118)), _face_landmarks(1.2, -25, (100, 100))])
    yy, xx = torch.meshgrid(torch.arange(224.0), torch.arange(224.0), indexing="ij")
    images = torch.zeros(2, 3, 224, 224)
    for b in range(2):
        for x, y in lm[b]:
            images[b, 1] += torch.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.0**2))
    crops = align_5pt(images, torch.as_tensor(lm, dtype=torch.float32))
    for b in range(2):
        for u, v in ARCFACE_TEMPLATE_112:
            cu, cv = round(u), round(v)
            patch = crops[b, 1, cv - 6:cv + 7, cu - 6:cu + 7]
            py, px = torch.meshgrid(torch.arange(cv - 6.0, cv + 7), torch.arange(cu - 6.0, cu + 7), indexing="ij")
            centre = ((patch * px).sum() / patch.sum(), (patch * py).sum() / patch.sum())
            assert abs(centre[0] - u) < 0.05 and abs(centre[1] - v) < 0.05, (b, u, v, centre)


def test_landmarks68_to_5():
    lm = _rand(2, 68, 2, seed=11)
    five = landmarks68_to_5(lm)
    assert five.shape == (2, 5, 2)
    assert_close(five[:, 0], lm[:, 36:42].mean(1), rtol=1e-12)
    assert_close(five[:, 1], lm[:, 42:48].mean(1), rtol=1e-12)
    assert_close(five[:, 2:], lm[:, [30, 48, 54]], atol=0, rtol=0)
    assert_close(landmarks68_to_5(lm, eyes="corners")[:, 1], (lm[:, 42] + lm[:, 45]) / 2, rtol=1e-12)


def test_perceptual_loss_matches_naive_and_reaches_the_prediction():
    rec = FaceRecognizer.small_random(seed=1)
    target = _rand(2, 3, 224, 224, seed=12).float()
    pred = (target + 0.2 * _rand(2, 3, 224, 224, seed=13).float()).clamp(0, 1).requires_grad_()
    lm = torch.as_tensor(np.stack([_face_landmarks(1.6, 5, (112, 115)), _face_landmarks(1.4, -5, (110, 110))]),
                         dtype=torch.float32)
    loss = perceptual_loss(rec, pred, target, lm)
    naive = sum(1 - F.cosine_similarity(rec(align_5pt(pred[b:b + 1], lm[b:b + 1])),
                                        rec(align_5pt(target[b:b + 1], lm[b:b + 1]))).squeeze() for b in range(2)) / 2
    assert_close(loss, naive, atol=1e-6)
    assert loss.item() > 0
    loss.backward()
    assert pred.grad.abs().sum() > 0
    assert perceptual_loss(rec, target, target, lm).item() == pytest.approx(0.0, abs=1e-6)
