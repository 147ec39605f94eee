"""The public preprocessing against a naive step-by-step version of Deep3DFaceRecon's `align_img`,
the standard-landmark reader and stand-in, and the way back to the photo (`hrn predict`'s overlay)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io
import torch
from helpers import assert_close
from PIL import Image

from facehd.errors import FileFormatError
from facehd.wild import read_image, read_landmarks
from hrn_baseline.model import load_hrn_morphable
from hrn_baseline.predict import load_model, predict
from hrn_baseline.preprocess import (
    align_image,
    five_points,
    paste_back,
    preprocess,
    read_standard_landmarks,
    standard_landmarks,
    standard_landmarks_from_model,
)


def naive_align(image: Image.Image, landmarks_rows: np.ndarray, lm3d: np.ndarray, target_size: float,
                rescale_factor: float):
    """Deep3DFaceRecon's `align_img` step by step: `extract_5p`, `POS` with its 2n x 8 system,
    `resize_n_crop_img` with numpy's int32 truncations. Returns (crop, landmarks y up, trans_params)."""
    w0, h0 = image.size
    lm = landmarks_rows.copy()
    lm[:, -1] = h0 - 1 - lm[:, -1]

    def extract_5p(points):
        idx = np.array([31, 37, 40, 43, 46, 49, 55]) - 1
        p = np.stack([points[idx[0]], np.mean(points[idx[[1, 2]]], 0), np.mean(points[idx[[3, 4]]], 0),
                      points[idx[5]], points[idx[6]]], axis=0)
        return p[[1, 2, 0, 3, 4]]

    xp, x = extract_5p(lm).T, extract_5p(lm3d).T
    npts = xp.shape[1]
    A = np.zeros([2 * npts, 8])
    A[0:2 * npts - 1:2, 0:3] = x.T
    A[0:2 * npts - 1:2, 3] = 1
    A[1:2 * npts:2, 4:7] = x.T
    A[1:2 * npts:2, 7] = 1
    b = np.reshape(xp.T, [2 * npts, 1])
    k = np.linalg.lstsq(A, b, rcond=None)[0]
    s = (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2
    t = np.stack([k[3], k[7]], axis=0)
    s = rescale_factor / s

    w = (w0 * s).astype(np.int32)
    h = (h0 * s).astype(np.int32)
    left = (w / 2 - target_size / 2 + ((t[0] - w0 / 2) * s).item()).astype(np.int32)
    up = (h / 2 - target_size / 2 + ((h0 / 2 - t[1]) * s).item()).astype(np.int32)
    crop = image.resize((w, h), resample=Image.BICUBIC).crop((left, up, left + target_size, up + target_size))
    new_lm = np.stack([lm[:, 0] - t[0] + w0 / 2, lm[:, 1] - t[1] + h0 / 2], axis=1) * s
    new_lm = new_lm - np.reshape(np.array([(w / 2 - target_size / 2), (h / 2 - target_size / 2)]), [1, 2])
    return crop, new_lm, np.array([w0, h0, s, t[0, 0], t[1, 0]])


@pytest.fixture(scope="module")
def standard68(tiny_wild):
    from hrn_factory import tiny_model_config

    return standard_landmarks_from_model(load_hrn_morphable(tiny_model_config()))


def _photos(tiny_wild):
    """(name, photo, landmarks): a generated image, a wider one, and one whose face sits at the
    top-left corner (the crop box starts at negative coordinates)."""
    image = read_image(tiny_wild / "images" / "000001.png")
    landmarks = read_landmarks(tiny_wild / "landmarks" / "000001.txt")
    wide = np.pad(image, ((0, 10), (40, 7), (0, 0)), mode="edge")
    yield "plain", image, landmarks
    yield "wide", wide, landmarks + [40, 0]
    yield "corner", image[25:, 20:], landmarks - [20, 25]


def test_crops_match_the_naive_public_steps(tiny_wild, standard68):
    boxes = []
    for name, photo, landmarks in _photos(tiny_wild):
        crop, hd = preprocess(photo, landmarks, standard68)
        for ours, size in ((crop, 224), (hd, 512)):
            image, lm_up, params = naive_align(Image.fromarray(photo), landmarks, standard68, float(size),
                                               102.0 * size / 224)
            assert ours.size == size
            np.testing.assert_array_equal(ours.image.permute(1, 2, 0).numpy(),
                                          np.asarray(image, dtype=np.float32) / 255.0, err_msg=f"{name} {size}")
            rows = np.stack([lm_up[:, 0], size - 1 - lm_up[:, 1]], axis=1)
            assert_close(ours.landmarks, rows, atol=1e-3, rtol=0, msg=f"{name} {size}")
            assert_close(ours.trans_params(), params, atol=1e-9, rtol=1e-9, msg=f"{name} {size}")
            boxes.append(ours.box)
    assert min(min(box) for box in boxes) < 0  # truncation toward zero was exercised


def test_five_points_rule():
    points = np.arange(68 * 2, dtype=np.float64).reshape(68, 2) ** 1.5
    expected = [(points[36] + points[39]) / 2, (points[42] + points[45]) / 2, points[30], points[48], points[54]]
    assert_close(five_points(points), np.stack(expected), atol=0, rtol=0)


def test_standard_landmarks_file_and_stand_in(tmp_path, standard68):
    lm = np.random.default_rng(0).normal(size=(68, 3))
    scipy.io.savemat(tmp_path / "similarity_Lm3D_all.mat", {"lm": lm})
    assert_close(read_standard_landmarks(tmp_path / "similarity_Lm3D_all.mat"), lm, atol=0, rtol=0)
    scipy.io.savemat(tmp_path / "bad.mat", {"lm": lm[:5]})
    with pytest.raises(FileFormatError, match=r"bad.mat: field 'lm' has shape \(5, 3\)"):
        read_standard_landmarks(tmp_path / "bad.mat")
    with pytest.raises(FileFormatError, match="no such file"):
        read_standard_landmarks(tmp_path / "missing.mat")
    from hrn_factory import tiny_model_config

    morphable = load_hrn_morphable(tiny_model_config())
    expected = morphable.mean_shape[morphable.keypoints].double().numpy()
    assert_close(standard68, expected, atol=0, rtol=0)
    assert_close(standard_landmarks(morphable), expected, atol=0, rtol=0)  # SynthBFM has no file beside it
    assert_close(standard_landmarks(morphable, tmp_path / "similarity_Lm3D_all.mat"), lm, atol=0, rtol=0)


def test_the_crop_maps_back_onto_the_photo(tiny_wild, standard68):
    """The crop pasted back through `crop_to_image` reproduces the photo, and the landmarks moved
    by the public formula land where the image's geometry puts them but for the formula's
    truncations (under a crop pixel) and its pixel-corner convention (0.5 |s - 1| crop pixels)."""
    for name, photo, landmarks in _photos(tiny_wild):
        crop = align_image(photo, landmarks, standard68)
        back = crop.crop_to_image(crop.landmarks.double().numpy())
        offset = np.abs(back - landmarks).max() * crop.scale  # crop pixels
        assert offset < 1.0 + 0.5 * abs(crop.scale - 1.0), (name, offset)
        assert_close(crop.image_to_crop(back), crop.landmarks, atol=1e-4, msg=name)
        pasted = paste_back(photo, crop, crop.image, torch.ones(1, crop.size, crop.size), alpha=1.0)
        # inside the part of the photo the crop covers (away from its border), the photo comes back
        corners = crop.crop_to_image(np.array([[0.0, 0.0], [crop.size - 1.0, crop.size - 1.0]]))
        x0, y0 = np.maximum(np.ceil(corners[0]).astype(int) + 2, 2)
        x1, y1 = np.minimum(np.floor(corners[1]).astype(int) - 2, [photo.shape[1] - 3, photo.shape[0] - 3])
        error = np.abs(pasted[y0:y1, x0:x1].astype(float) - photo[y0:y1, x0:x1])
        assert error.mean() < 4.0 and np.median(error) <= 2.0, (name, error.mean())
        blank = paste_back(photo, crop, crop.image, torch.zeros(1, crop.size, crop.size))
        np.testing.assert_array_equal(blank, photo)


def test_predict_writes_an_overlay_on_the_photo(tmp_path, tiny_wild, tiny_checkpoint):
    model = load_model(tiny_checkpoint, device="cpu")
    photo_path = tiny_wild / "images" / "000002.png"
    [result] = predict(None, [photo_path], tmp_path, landmarks=tiny_wild / "landmarks", model=model)
    assert result.error is None
    photo = read_image(photo_path)
    with Image.open(tmp_path / "000002" / "overlay.png") as im:
        overlay = np.asarray(im.convert("RGB"))
    assert overlay.shape == photo.shape
    changed = np.abs(overlay.astype(int) - photo).sum(-1) > 0
    assert changed.any()
    # the render lands on the face: the changed pixels surround the photo's nose tip
    coeffs = np.load(tmp_path / "000002" / "coeffs.npz")
    kx, ky, dx, dy = coeffs["crop_transform"]
    nose = read_landmarks(tiny_wild / "landmarks" / "000002.txt")[30]
    rows, cols = np.nonzero(changed)
    assert rows.min() < nose[1] < rows.max() and cols.min() < nose[0] < cols.max()
    predicted = (coeffs["landmarks"] - [dx, dy]) / [kx, ky]
    assert np.isfinite(predicted).all() and predicted.shape == (68, 2)
