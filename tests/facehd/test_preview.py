import math

import numpy as np
import pytest
import torch
from helpers import assert_close
from PIL import Image

from facehd import conventions as cv
from facehd.errors import InputError
from facehd.morphable import load_morphable_model, project, reconstruct, to_camera
from facehd.preview import (
    BACKGROUND_RGB,
    CAPTION_HEIGHT,
    LANDMARK7_RGB,
    camera_rays,
    draw_landmarks,
    preview_coeffs,
    render_faces,
    write_preview,
)
from facehd.synth import write_synth_bfm

SIZE = 96  # small tiles keep the ray casting fast


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_synth_bfm(tmp_path_factory.mktemp("preview") / "model.mat", resolution=40)
    return load_morphable_model(path)


def _mean_coeffs(n: int = 1) -> torch.Tensor:
    coeffs, _ = preview_coeffs(0)
    return coeffs[:1].repeat(n, 1)


def test_camera_rays_follow_the_projection():
    size = 64
    rays = camera_rays(size)
    assert rays.shape == (size, size, 6) and rays.dtype == np.float32
    assert_close(rays[..., :3], np.broadcast_to([0.0, 0.0, cv.CAMERA_DISTANCE], (size, size, 3)))
    assert_close(np.linalg.norm(rays[..., 3:], axis=-1), np.ones((size, size)), atol=1e-6)
    # a point 9.5 units along the ray of pixel (row, col) projects back onto (col, size - 1 - row)
    rows, cols = np.array([0, 10, 31, 63]), np.array([5, 40, 32, 63])
    points = rays[rows, cols, :3] + 9.5 * rays[rows, cols, 3:]
    scale = size / cv.IMAGE_SIZE
    pix = project(to_camera(torch.as_tensor(points, dtype=torch.float64)[None]),
                  cv.FOCAL * scale, cv.PRINCIPAL_POINT * scale)[0]
    assert_close(pix, np.stack([cols, size - 1 - rows], axis=1), atol=1e-3)


def test_render_shows_the_face_in_the_centre(model):
    images = render_faces(model, _mean_coeffs(2), size=SIZE)
    assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == np.uint8
    image = images[0]
    assert (image[SIZE // 2, SIZE // 2] != BACKGROUND_RGB).any()
    for corner in (image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]):
        assert tuple(corner) == BACKGROUND_RGB
    face = (image != BACKGROUND_RGB).any(axis=-1)
    assert 0.2 < face.mean() < 0.8
    # left-right symmetric like the mean face (up to the half-pixel of the principal point)
    cols = np.flatnonzero(face.any(axis=0))
    assert abs((cols[0] + cols[-1]) / 2 - (SIZE - 1) / 2) <= 1.0


def test_render_colour_matches_the_vertex_colour_under_it(model):
    coeffs = _mean_coeffs()
    image = render_faces(model, coeffs, size=SIZE)[0].astype(float) / 255.0
    with torch.no_grad():
        rec = reconstruct(model, coeffs.float(), image_size=SIZE)
    # the mid-forehead is smooth and uniformly coloured, so the pixel under a vertex there
    # carries that vertex's colour
    mean = model.mean_shape
    forehead = torch.nonzero(model.region_mask("forehead")).ravel()
    vertex = int(forehead[(mean[forehead, 0].abs() + (mean[forehead, 1] - 0.75).abs()).argmin()])
    col, y_up = rec.proj[0, vertex].tolist()
    pixel = image[int(round(SIZE - 1 - y_up)), int(round(col))]
    assert_close(pixel, rec.color[0, vertex].clamp(0, 1).numpy(), atol=0.03)


def test_render_follows_the_pose(model):
    coeffs = _mean_coeffs(2)
    coeffs[1, cv.COEFF_SLICES["angle"]] = torch.tensor([0.0, math.radians(60), 0.0])
    front, turned = render_faces(model, coeffs, size=SIZE)
    # turning the face to the image's right moves its nose tip to the right
    with torch.no_grad():
        lm = reconstruct(model, coeffs.float(), image_size=SIZE).landmarks
    assert float(lm[1, cv.NOSE_TIP_IBUG, 0]) > float(lm[0, cv.NOSE_TIP_IBUG, 0]) + 5
    assert not np.array_equal(front, turned)


def test_render_rejects_bad_coefficients(model):
    with pytest.raises(InputError):
        render_faces(model, torch.zeros(1, 10), size=SIZE)


def test_draw_landmarks_marks_the_alignment_points():
    image = np.full((SIZE, SIZE, 3), 128, dtype=np.uint8)
    landmarks = np.full((68, 2), 10.0)
    landmarks[cv.LANDMARKS7_IBUG[0]] = (50.0, 60.0)  # y up: row SIZE - 1 - 60
    drawn = draw_landmarks(image, landmarks)
    assert tuple(drawn[SIZE - 1 - 60, 50]) == LANDMARK7_RGB
    hidden = np.ones(68, dtype=bool)
    hidden[cv.LANDMARKS7_IBUG[0]] = False
    assert tuple(draw_landmarks(image, landmarks, hidden)[SIZE - 1 - 60, 50]) == (128, 128, 128)
    assert (image == 128).all()  # the input is left untouched


def test_write_preview_writes_a_png_grid(model, tmp_path):
    path = write_preview(model, tmp_path / "preview.png", n_random=2, seed=3, size=SIZE)
    assert path.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["preview.png"]
    image = np.asarray(Image.open(path).convert("RGB"))
    # mean, profile and two random faces fit on one row
    assert image.shape == (SIZE + CAPTION_HEIGHT, 4 * SIZE, 3)
    for k in range(4):
        tile = image[CAPTION_HEIGHT:, k * SIZE:(k + 1) * SIZE]
        assert (tile[SIZE // 2, SIZE // 2] != BACKGROUND_RGB).any(), k
        assert (tile == LANDMARK7_RGB).all(axis=-1).any(), k
    again = write_preview(model, tmp_path / "again.png", n_random=2, seed=3, size=SIZE)
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB")), image)
