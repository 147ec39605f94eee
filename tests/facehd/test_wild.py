import numpy as np
import pytest
import torch
from helpers import assert_close
from PIL import Image
from torch.utils.data import DataLoader

from facehd import conventions as cv
from facehd.errors import FileFormatError, InputError
from facehd.morphable import load_morphable_model, reconstruct, y_up_to_rows
from facehd.synth import write_synth_bfm
from facehd.wild import (
    RESCALE_FACTOR,
    TEMPLATE_PIXELS_PER_UNIT,
    CropTransform,
    WildImages,
    WildSample,
    align_to_crop,
    crop_transform,
    estimate_scale_translation,
    landmarks68_to_5,
    list_names,
    read_landmarks,
    read_sample,
    rows_to_y_up,
    template5_from_model,
    warp_image,
    warp_mask,
    write_list,
    write_sample,
)

RES = 40  # small SynthBFM grid


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_synth_bfm(tmp_path_factory.mktemp("model") / "BFM_model_front.mat", RES, seed=0)
    return load_morphable_model(path, dtype=torch.float64)


@pytest.fixture(scope="module")
def template(model):
    return template5_from_model(model)


def _face_landmarks(model, size=224) -> np.ndarray:
    """(68, 2) pixels (x, row) of the model's mean face seen by the project's camera."""
    with torch.no_grad():
        rec = reconstruct(model, torch.zeros(1, cv.N_COEFFS, dtype=torch.float64), image_size=size)
    return y_up_to_rows(rec.landmarks, size)[0].numpy()


def _sample(name: str, height: int, width: int, seed: int = 0) -> WildSample:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    landmarks = rng.uniform(0, min(height, width), (68, 2))
    mask = np.zeros((height, width), dtype=bool)
    mask[height // 4: 3 * height // 4, width // 3: 2 * width // 3] = True
    return WildSample(name=name, image=image, landmarks=landmarks, mask=mask)


def _folder(root, samples, image_format="png"):
    for sample in samples:
        write_sample(root, sample, image_format=image_format)
    return root


# --- folder format -----------------------------------------------------------------------------


def test_png_round_trip_keeps_pixels_landmarks_and_mask(tmp_path):
    sample = _sample("b", 40, 56)
    path = write_sample(tmp_path, sample)
    assert path == tmp_path / "images" / "b.png"
    assert (tmp_path / "landmarks" / "b.txt").read_text().count("\n") == 68
    back = read_sample(tmp_path, "b")
    assert back.name == "b"
    np.testing.assert_array_equal(back.image, sample.image)
    np.testing.assert_array_equal(back.mask, sample.mask)
    assert_close(back.landmarks, sample.landmarks, atol=1e-4)
    mask_file = Image.open(tmp_path / "masks" / "b.png")
    assert mask_file.mode == "L" and mask_file.size == (56, 40)


def test_jpg_round_trip_is_close(tmp_path):
    sample = _sample("a", 32, 32)
    sample.image = np.full_like(sample.image, 120)
    write_sample(tmp_path, sample, image_format="jpg")
    back = read_sample(tmp_path, "a")
    assert np.abs(back.image.astype(int) - 120).max() <= 2


def test_names_are_sorted_images_or_the_list_file(tmp_path):
    _folder(tmp_path, [_sample(n, 16, 16) for n in ("c", "a", "b")])
    assert list_names(tmp_path) == ["a", "b", "c"]
    (tmp_path / "list.txt").write_text("# training split\nc\n\nb.png\n")
    assert list_names(tmp_path) == ["c", "b"]
    write_list(tmp_path, ["b", "a"])
    assert list_names(tmp_path) == ["b", "a"]


def _expect_error(path, *words):
    """Context: a FileFormatError whose message names ``path`` and says each of ``words``."""

    class Check:
        def __enter__(self):
            self.raises = pytest.raises(FileFormatError)
            self.info = self.raises.__enter__()

        def __exit__(self, *exc):
            handled = self.raises.__exit__(*exc)
            message = str(self.info.value)
            assert str(path) in message, message
            for word in words:
                assert word in message, message
            return handled

    return Check()


def test_wrong_landmark_count_names_the_file(tmp_path):
    _folder(tmp_path, [_sample("a", 16, 16)])
    path = tmp_path / "landmarks" / "a.txt"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:67]))
    with _expect_error(path, "67", "68"):
        read_sample(tmp_path, "a")


def test_bad_landmark_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "lm.txt"
    path.write_text("1 2\n" * 10 + "1 2 3\n" + "1 2\n" * 57)
    with _expect_error(path, "line 11"):
        read_landmarks(path)
    path.write_text("1 2\n" * 67 + "nan 2\n")
    with _expect_error(path, "NaN"):
        read_landmarks(path)


def test_mask_size_mismatch_names_the_mask(tmp_path):
    _folder(tmp_path, [_sample("a", 16, 20)])
    path = tmp_path / "masks" / "a.png"
    Image.new("L", (16, 16), 255).save(path)
    with _expect_error(path, "16 x 16", "20 x 16"):
        read_sample(tmp_path, "a")


def test_undecodable_image_names_the_image(tmp_path):
    _folder(tmp_path, [_sample("a", 16, 16)])
    path = tmp_path / "images" / "a.png"
    path.write_bytes(b"not a png at all")
    with _expect_error(path, "cannot decode"):
        read_sample(tmp_path, "a")


def test_missing_and_ambiguous_files_are_reported_by_name(tmp_path, template):
    _folder(tmp_path, [_sample("a", 16, 16), _sample("b", 16, 16)])
    (tmp_path / "masks" / "b.png").unlink()
    with _expect_error(tmp_path / "masks" / "b.png", "missing"):
        WildImages(tmp_path, template)
    write_sample(tmp_path, _sample("b", 16, 16), image_format="jpg")  # b.png and b.jpg
    with _expect_error(tmp_path / "images", "several images"):
        read_sample(tmp_path, "b")
    with _expect_error(tmp_path / "images" / "zz.png", "missing image"):
        read_sample(tmp_path, "zz")
    with _expect_error(tmp_path / "nowhere", "no images/"):
        list_names(tmp_path / "nowhere")


# --- 5-point alignment ---------------------------------------------------------------------------


def test_five_points_are_eye_centres_nose_tip_and_mouth_corners():
    lm = np.arange(136, dtype=float).reshape(68, 2)
    five = landmarks68_to_5(lm)
    assert_close(five, np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]]))
    corners = landmarks68_to_5(lm, eyes="corners")
    assert_close(corners[:2], np.stack([(lm[36] + lm[39]) / 2, (lm[42] + lm[45]) / 2]))
    assert landmarks68_to_5(np.zeros((4, 68, 3))).shape == (4, 5, 3)


def test_known_scale_and_translation_are_recovered():
    rng = np.random.default_rng(1)
    template = rng.uniform(60, 160, (5, 2))
    for s, t in ((0.37, (-12.0, 40.5)), (2.5, (130.0, -7.25))):
        lm5 = (template - np.array(t)) / s  # template = s * lm5 + t
        s_hat, tx, ty = estimate_scale_translation(lm5, template)
        assert_close(np.array([s_hat, tx, ty]), np.array([s, *t]), atol=1e-9, rtol=1e-9)


def test_scale_ignores_in_plane_rotation():
    rng = np.random.default_rng(2)
    template = rng.uniform(60, 160, (5, 2))
    angle = np.radians(15.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    lm5 = 0.5 * (template - template.mean(0)) @ rotation.T + np.array([300.0, 200.0])
    s, _, _ = estimate_scale_translation(lm5, template)
    assert s == pytest.approx(2.0, rel=1e-9)


def test_degenerate_landmarks_are_refused():
    with pytest.raises(InputError, match="degenerate"):
        estimate_scale_translation(np.ones((5, 2)), np.random.default_rng(0).uniform(size=(5, 2)))
    with pytest.raises(InputError, match="shape"):
        estimate_scale_translation(np.ones((4, 2)), np.ones((5, 2)))


def test_crop_puts_the_five_points_on_the_template_rescaled_as_deep3d():
    rng = np.random.default_rng(3)
    lm_template = rng.uniform(50, 170, (68, 2))
    template5 = landmarks68_to_5(lm_template)
    s, t = 0.8, np.array([-30.0, 25.0])
    lm_image = (lm_template - t) / s
    exact = crop_transform(lm_image, template5, rescale_factor=TEMPLATE_PIXELS_PER_UNIT)
    assert_close(exact.apply(lm_image), lm_template, atol=1e-9)
    # Deep3DFaceRecon's 102 pixels per unit: the template grows by 102 / 101.5 about the origin
    origin = np.array([112.0, 111.0])
    default = crop_transform(lm_image, template5)
    assert_close(default.apply(lm_image), origin + RESCALE_FACTOR / 101.5 * (lm_template - origin), atol=1e-9)
    assert_close(default.invert(default.apply(lm_image)), lm_image, atol=1e-9)


def _blob_image(centres: np.ndarray, sigma: float, height: int, width: int) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width].astype(float)
    image = np.zeros((height, width))
    for x, y in centres:
        image += np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * sigma**2))
    return np.clip(image, 0, 1)


def _centroid(channel: np.ndarray, centre: np.ndarray, radius: int) -> np.ndarray:
    x0, y0 = np.round(centre).astype(int)
    window = channel[y0 - radius: y0 + radius + 1, x0 - radius: x0 + radius + 1].astype(float)
    window = np.clip(window - 0.02, 0, None)  # drop the far tails and the filter's ringing
    rows, cols = np.mgrid[y0 - radius: y0 + radius + 1, x0 - radius: x0 + radius + 1]
    return np.array([(window * cols).sum(), (window * rows).sum()]) / window.sum()


@pytest.mark.parametrize("scale", [0.55, 1.0, 1.8])
@pytest.mark.parametrize("dtype", ["uint8", "float"])
def test_warped_pixels_are_where_the_transformed_landmarks_are(scale, dtype):
    transform = CropTransform(scale=scale, tx=13.3, ty=-7.6, size=224)
    crop_points = np.array([[40.0, 50.0], [180.0, 45.5], [112.2, 111.7], [60.4, 170.0], [175.0, 180.9]])
    image_points = transform.invert(crop_points)
    sigma_crop = 3.0
    height, width = int(240 / scale), int(260 / scale)
    image = _blob_image(image_points, sigma_crop / scale, height, width)
    image = np.repeat(image[..., None], 3, axis=2)
    if dtype == "uint8":
        image = np.round(image * 255).astype(np.uint8)
    crop = warp_image(image, transform)
    assert crop.shape == (3, 224, 224) and crop.dtype == torch.float32
    for expected in crop_points:
        assert_close(_centroid(crop[1].numpy(), expected, 8), expected, atol=0.05)


def test_crop_mask_is_the_transformed_mask():
    transform = CropTransform(scale=1.6, tx=-40.0, ty=-20.0, size=224)
    mask = np.zeros((200, 180), dtype=bool)
    mask[60:121, 50:101] = True  # pixel centres x 50..100, rows 60..120
    crop = warp_mask(mask, transform)[0].numpy()
    rows, cols = np.mgrid[0:224, 0:224]
    x, y = (cols - transform.tx) / transform.scale, (rows - transform.ty) / transform.scale
    inside = (x > 49.5 + 0.4) & (x < 100.5 - 0.4) & (y > 59.5 + 0.4) & (y < 120.5 - 0.4)
    outside = (x < 49.5 - 0.4) | (x > 100.5 + 0.4) | (y < 59.5 - 0.4) | (y > 120.5 + 0.4)
    assert crop[inside].all() and not crop[outside].any()


def test_align_to_crop_returns_consistent_parts(template, model):
    lm = _face_landmarks(model, size=300) * 1.1 + np.array([20.0, -5.0])
    image = np.zeros((330, 340, 3), dtype=np.uint8)
    crop_image, crop_lm, crop_mask, transform = align_to_crop(image, lm, np.ones((330, 340)), template)
    assert crop_image.shape == (3, 224, 224) and crop_mask.shape == (1, 224, 224)
    assert crop_lm.shape == (68, 2) and crop_lm.dtype == torch.float32
    assert_close(crop_lm, transform.apply(lm), atol=1e-4)
    # the mean face lands on the template (up to 2D vs 3D eye averaging and the 102 / 101.5 rescale)
    assert_close(landmarks68_to_5(crop_lm.numpy()), template, atol=1.5)
    assert align_to_crop(image, lm, None, template).mask is None


def test_rows_to_y_up_matches_the_projection_convention(model):
    with torch.no_grad():
        rec = reconstruct(model, torch.zeros(1, cv.N_COEFFS, dtype=torch.float64))
    rows = y_up_to_rows(rec.landmarks[0])
    assert_close(rows_to_y_up(rows), rec.landmarks[0])
    assert_close(rows_to_y_up(np.array([[5.0, 0.0]])), np.array([[5.0, 223.0]]))


def test_template_is_the_projected_mean_face(model, template):
    assert template.shape == (5, 2)
    assert template[0, 0] < template[2, 0] < template[1, 0]  # eyes either side of the nose
    assert template[3, 0] < template[4, 0]
    assert template[:2, 1].max() < template[2, 1] < template[3:, 1].min()  # rows grow downward
    assert_close(template, landmarks68_to_5(_face_landmarks(model)), atol=0.5)


# --- dataset -----------------------------------------------------------------------------------


def test_dataset_items_and_dataloader_workers(tmp_path, model, template):
    lm = _face_landmarks(model, size=256)
    samples = []
    for k, (size, shift) in enumerate(((256, 0.0), (300, 20.0), (280, -10.0))):
        sample = _sample(f"img{k}", size, size, seed=k)
        sample.landmarks = lm + shift
        samples.append(sample)
    _folder(tmp_path, samples)
    data = WildImages(tmp_path, template)
    assert len(data) == 3
    item = data[1]
    assert item["name"] == "img1"
    assert item["image"].shape == (3, 224, 224) and 0.0 <= item["image"].min() <= item["image"].max() <= 1.0
    assert item["mask"].shape == (1, 224, 224) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["landmarks"].shape == (68, 2)
    assert_close(item["landmarks"], torch.as_tensor(lm + 20.0) * item["transform"][0] + item["transform"][1:],
                 atol=1e-3)
    batches = list(DataLoader(data, batch_size=2, num_workers=2))
    assert [b["image"].shape[0] for b in batches] == [2, 1]
    assert batches[0]["name"] == ["img0", "img1"]
    assert_close(batches[0]["landmarks"][1], item["landmarks"])


def test_aligned_folders_are_used_as_stored(tmp_path):
    sample = _sample("x", 224, 224)
    _folder(tmp_path, [sample])
    item = WildImages(tmp_path, aligned=True)[0]
    assert_close(item["image"], torch.from_numpy(sample.image).permute(2, 0, 1) / 255.0)
    assert_close(item["landmarks"], sample.landmarks, atol=1e-4)
    assert_close(item["transform"], torch.tensor([1.0, 0.0, 0.0]))
    _folder(tmp_path, [_sample("y", 100, 100)])
    with _expect_error(tmp_path / "images" / "y.png", "224 x 224"):
        WildImages(tmp_path, aligned=True)[1]
    with pytest.raises(InputError, match="template5"):
        WildImages(tmp_path)
