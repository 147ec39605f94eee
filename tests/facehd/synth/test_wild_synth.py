import json

import numpy as np
import open3d as o3d
import pytest
import torch
from click.testing import CliRunner
from helpers import assert_close
from torch.utils.data import DataLoader

from facehd import conventions as cv
from facehd.cli import main
from facehd.errors import FileFormatError
from facehd.morphable import compute_shape, load_morphable_model, reconstruct, split_coeffs, y_up_to_rows
from facehd.preview import camera_rays
from facehd.synth import write_synth_bfm
from facehd.synth.wild import (
    BATCH,
    GENERATOR_JSON,
    OCCLUDER_PROBABILITY,
    PITCH_DEG,
    ROLL_DEG,
    TRUTH_DIR,
    YAW_DEG,
    _context,
    _form_faces,
    generate_wild,
    image_rngs,
    occluders,
    rasterize,
    read_truth,
    render_wild,
    sample_coeffs,
    truth_path,
)
from facehd.wild import WildImages, list_names, read_landmarks, read_sample, template5_from_model

RES = 40  # small SynthBFM grid: ~1.6k vertices
SIZE = 160  # image side of the generated test sets
N_IMAGES = 10


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_synth_bfm(tmp_path_factory.mktemp("model") / "BFM_model_front.mat", RES, seed=0)


@pytest.fixture(scope="module")
def model(model_path):
    return load_morphable_model(model_path)


@pytest.fixture(scope="module")
def wild(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("wild")
    generate_wild(root, N_IMAGES, model=model, seed=5, image_size=SIZE)
    return root


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _yaw_deg(coeffs: np.ndarray) -> float:
    return float(np.degrees(coeffs[cv.COEFF_SLICES["angle"]][1]))


# --- rendering -----------------------------------------------------------------------------------


def test_rasterizer_sees_what_ray_casting_sees(model):
    """The z-buffer rasterizer against open3d ray casting through the same pixel centres."""
    ctx = _context(model, seed=0, image_size=SIZE, occluder_probability=0.0)
    coeffs = np.stack([sample_coeffs(image_rngs(0, i)[0], SIZE) for i in range(16)])
    faces = _form_faces(ctx, coeffs)
    with torch.no_grad():
        vertices = reconstruct(model, torch.as_tensor(coeffs).float(), image_size=SIZE).vertices.numpy()
    agree = total = 0
    for b in range(4):
        scene = o3d.t.geometry.RaycastingScene()
        scene.add_triangles(o3d.core.Tensor(vertices[b]), o3d.core.Tensor(ctx.faces.astype(np.uint32)))
        hits = scene.cast_rays(o3d.core.Tensor(camera_rays(SIZE)))
        expected = hits["primitive_ids"].numpy().astype(np.int64)
        expected[expected == o3d.t.geometry.RaycastingScene.INVALID_ID] = -1
        raster = rasterize(faces.points[b], faces.depth[b], ctx.faces, SIZE)
        agree += (raster.face == expected).sum()
        total += expected.size
        hit = expected >= 0
        assert hit.sum() > 0.05 * SIZE * SIZE
        # the depth buffer is the ray's length along the camera axis
        t_hit = hits["t_hit"].numpy()[hit] * np.abs(camera_rays(SIZE)[..., 5][hit])
        assert_close(raster.depth[hit & (raster.face == expected)], t_hit[(raster.face == expected)[hit]], atol=1e-3)
    assert agree / total > 0.999


def test_landmarks_are_the_projected_truth(wild, model):
    for name in list_names(wild)[:4]:
        truth = read_truth(truth_path(wild, name))
        coeffs = torch.as_tensor(truth.coeffs)[None].float()
        with torch.no_grad():
            rec = reconstruct(model, coeffs, image_size=SIZE)
        assert_close(read_landmarks(wild / "landmarks" / f"{name}.txt"), y_up_to_rows(rec.landmarks, SIZE)[0],
                     atol=2e-3)
        parts = split_coeffs(coeffs)
        assert_close(truth.shape, compute_shape(model, parts.id, parts.exp)[0], atol=1e-5)
        assert truth.image_size == SIZE and truth.focal == pytest.approx(cv.FOCAL * SIZE / 224)
        assert truth.shape.shape == (model.n_vertices, 3)


def test_faces_are_lit_but_neither_black_nor_saturated(wild):
    for name in list_names(wild):
        sample = read_sample(wild, name)
        face = sample.image[sample.mask].astype(float) / 255.0
        assert len(face) > 200, name
        assert 0.15 < face.mean() < 0.85, name
        assert (face.max(axis=1) >= 254 / 255).mean() < 0.05, name
        assert (face.max(axis=1) <= 8 / 255).mean() < 0.05, name


def test_poses_and_framing_vary(wild):
    coeffs = np.stack([sample_coeffs(image_rngs(9, i)[0], SIZE) for i in range(300)])
    angles = np.degrees(coeffs[:, cv.COEFF_SLICES["angle"]])
    for column, limit in enumerate((PITCH_DEG, YAW_DEG, ROLL_DEG)):
        assert np.abs(angles[:, column]).max() <= limit
        assert angles[:, column].std() > 0.45 * limit  # uniform: std = limit / sqrt(3) = 0.58 limit
    trans = coeffs[:, cv.COEFF_SLICES["trans"]]
    depth = cv.CAMERA_DISTANCE - trans[:, 2]
    focal = cv.FOCAL * SIZE / 224
    centre_pixels = focal * trans[:, :2] / depth[:, None]
    assert centre_pixels.std(axis=0).min() > 0.04 * SIZE
    assert depth.max() / depth.min() > 1.5
    yaws = [_yaw_deg(read_truth(truth_path(wild, n)).coeffs) for n in list_names(wild)]
    assert max(yaws) - min(yaws) > 40.0


# --- masks, occluders and alignment ------------------------------------------------------------


def test_occluders_only_remove_face_pixels(model):
    clean, = render_wild(model, [3], seed=2, image_size=SIZE, occluder_probability=0.0)
    covered, = render_wild(model, [3], seed=2, image_size=SIZE, occluder_probability=1.0)
    assert not clean.truth.occluded and covered.truth.occluded
    assert not (covered.sample.mask & ~clean.sample.mask).any()
    assert covered.sample.mask.sum() < clean.sample.mask.sum()
    # the face, background and noise are the same draws: unoccluded face pixels are equal
    keep = covered.sample.mask
    np.testing.assert_array_equal(covered.sample.image[keep], clean.sample.image[keep])
    assert_close(covered.truth.coeffs, clean.truth.coeffs)
    assert covered.truth.landmarks_visible.sum() <= clean.truth.landmarks_visible.sum()


def test_about_thirty_percent_of_images_are_occluded():
    landmarks = np.random.default_rng(0).uniform(40, 120, (68, 2))
    drawn = [occluders(image_rngs(1, i)[2], SIZE, landmarks) is not None for i in range(400)]
    assert abs(np.mean(drawn) - OCCLUDER_PROBABILITY) < 0.07


def test_crop_landmarks_land_on_the_crop_face_mask(wild, model):
    data = WildImages(wild, template5_from_model(model))
    on_face = total = 0
    for index, name in enumerate(data.names):
        truth = read_truth(truth_path(wild, name))
        item = data[index]
        assert_close(item["transform"], truth.crop_transform, atol=1e-3)
        inner = np.arange(17, 68)  # brows, nose, eyes, mouth: inside the face region
        visible = inner[truth.landmarks_visible[inner]]
        cols, rows = np.round(item["landmarks"][visible].numpy()).astype(int).T
        ok = (cols >= 0) & (cols < 224) & (rows >= 0) & (rows < 224)
        on_face += int(item["mask"][0, rows[ok], cols[ok]].sum())
        total += len(visible)
    assert total > 200
    assert on_face / total > 0.95


def test_generated_folder_loads_with_dataloader_workers(wild, model):
    data = WildImages(wild, template5_from_model(model))
    assert len(data) == N_IMAGES and data.names[0] == "000000"
    batch = next(iter(DataLoader(data, batch_size=4, num_workers=2)))
    assert batch["image"].shape == (4, 3, 224, 224)
    assert batch["landmarks"].shape == (4, 68, 2) and batch["mask"].shape == (4, 1, 224, 224)
    info = json.loads((wild / TRUTH_DIR / GENERATOR_JSON).read_text())
    assert info["images"] == N_IMAGES and info["seed"] == 5 and info["model_vertices"] == model.n_vertices


# --- determinism and the command line ------------------------------------------------------------


def test_same_seed_same_files_and_prefixes_agree(tmp_path, model, wild):
    generate_wild(tmp_path / "again", N_IMAGES, model=model, seed=5, image_size=SIZE)
    assert _files(tmp_path / "again") == _files(wild)
    generate_wild(tmp_path / "prefix", 3, model=model, seed=5, image_size=SIZE)
    prefix = _files(tmp_path / "prefix")
    full = _files(wild)
    for path in prefix:
        if path.startswith(("images", "landmarks", "masks")) or path.endswith(".npz"):
            assert prefix[path] == full[path], path
    generate_wild(tmp_path / "other", 2, model=model, seed=6, image_size=SIZE)
    assert (tmp_path / "other" / "images" / "000000.png").read_bytes() != full["images/000000.png"]


def test_worker_processes_write_the_same_files(tmp_path, model):
    n_images = BATCH + 2  # two batches, one per worker
    generate_wild(tmp_path / "one", n_images, model=model, seed=5, image_size=SIZE)
    generate_wild(tmp_path / "two", n_images, model=model, seed=5, image_size=SIZE, workers=2)
    assert _files(tmp_path / "two") == _files(tmp_path / "one")


def test_truth_errors_name_the_file(tmp_path):
    path = tmp_path / "x.npz"
    path.write_bytes(b"garbage")
    with pytest.raises(FileFormatError, match="x.npz"):
        read_truth(path)
    np.savez(path, coeffs=np.zeros(257))
    with pytest.raises(FileFormatError, match="missing key"):
        read_truth(path)


def test_cli_writes_a_loadable_folder(tmp_path, model_path, model):
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["synth", "wild", "--out", str(out), "--images", "3", "--seed", "1",
                                       "--model", str(model_path), "--image-size", "96", "--format", "jpg"])
    assert result.exit_code == 0, result.output
    assert "wrote 3 images" in result.output
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.jpg", "000001.jpg", "000002.jpg"]
    assert (out / "list.txt").read_text().split() == ["000000", "000001", "000002"]
    assert len(WildImages(out, template5_from_model(model))) == 3
    bad = CliRunner().invoke(main, ["synth", "wild", "--out", str(out), "--images", "0"])
    assert bad.exit_code != 0
