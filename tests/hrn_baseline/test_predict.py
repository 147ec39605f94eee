"""`hrn predict`: the files, their units, the dense high mesh, the 16-bit PNG maps and the errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import assert_close
from PIL import Image

from facehd.errors import FileFormatError, InputError
from facehd.io import load_mesh
from facehd.wild import read_image, read_landmarks
from hrn_baseline.cli import main
from hrn_baseline.predict import (
    decode_png16,
    encode_png16,
    load_model,
    predict,
    read_png16,
    write_png16,
)
from hrn_baseline.preprocess import RESCALE_FACTOR, align_image, standard_landmarks_from_model

LEVELS = ("coarse", "mid", "high")


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, tiny_wild, tiny_checkpoint, model):
    """Two images predicted in model units and in millimetres."""
    out = tmp_path_factory.mktemp("pred")
    images = [tiny_wild / "images" / "000000.png", tiny_wild / "images" / "000001.png"]
    kwargs = dict(landmarks=tiny_wild / "landmarks", model=model)
    results = predict(None, images, out / "model", units="model", **kwargs)
    results_mm = predict(None, images, out / "mm", units="mm", **kwargs)
    assert all(r.error is None for r in results + results_mm)
    return out


def _header(path) -> str:
    return "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))


def test_every_file_is_written_with_its_unit(predicted):
    folder = predicted / "model" / "000000"
    for level in LEVELS:
        for suffix in (".obj", ".mtl", ".png"):
            assert (folder / f"{level}{suffix}").is_file()
        assert "# units: model\n# mm_per_unit: 100\n" in _header(folder / f"{level}.obj")
        mm_header = _header(predicted / "mm" / "000000" / f"{level}.obj")
        assert "# units: mm\n" in mm_header and "per_unit" not in mm_header  # one statement of the unit
    pngs = ["deformation_x.png", "deformation_y.png", "deformation_z.png", "displacement.png"]
    assert all((folder / name).is_file() for name in ["deformation.npy", "displacement.npy", *pngs])
    assert not (folder / "deformation.png").exists()
    sidecar = json.loads((folder / "maps.json").read_text())
    assert sidecar["units"].startswith("model") and "65535" in sidecar["png16_encoding"]
    assert json.loads((predicted / "mm" / "000000" / "maps.json").read_text())["units"] == "mm"
    coeffs = np.load(folder / "coeffs.npz")
    assert coeffs["coeffs"].shape == (257,) and str(coeffs["units"]).startswith("model")
    assert str(np.load(predicted / "mm" / "000000" / "coeffs.npz")["units"]) == "mm"


def test_millimetres_are_model_units_times_100(predicted):
    for level in LEVELS:
        a = load_mesh(predicted / "model" / "000001" / f"{level}.obj")
        b = load_mesh(predicted / "mm" / "000001" / f"{level}.obj")
        assert_close(b.vertices, a.vertices * 100, atol=1e-9, rtol=1e-9, msg=level)
    for name in ("deformation", "displacement"):
        a = np.load(predicted / "model" / "000001" / f"{name}.npy")
        b = np.load(predicted / "mm" / "000001" / f"{name}.npy")
        assert_close(b, a.astype(np.float64) * 100, atol=1e-6, rtol=1e-5, msg=name)
    ca, cb = np.load(predicted / "model" / "000001" / "coeffs.npz"), np.load(predicted / "mm" / "000001" / "coeffs.npz")
    assert_close(cb["trans"], ca["trans"] * 100, atol=1e-9)
    assert_close(cb["coeffs"], ca["coeffs"], atol=0)  # the raw 257-vector keeps the model convention


def test_meshes_match_the_forward_pass(predicted, tiny_wild, model):
    """mid.obj is M1, high.obj the used texels of the dense grid, both with UVs and the texture."""
    image = read_image(tiny_wild / "images" / "000000.png")
    landmarks = read_landmarks(tiny_wild / "landmarks" / "000000.txt")
    crop = align_image(image, landmarks, standard_landmarks_from_model(model.morphable), 64, RESCALE_FACTOR * 64 / 224)
    with torch.no_grad():
        out = model(crop.image[None])
    mid = load_mesh(predicted / "model" / "000000" / "mid.obj", load_texture=True)
    assert_close(mid.vertices, out.shape_mid[0], atol=1e-6)
    np.testing.assert_array_equal(mid.faces, model.morphable.faces.numpy())
    assert mid.uvs is not None and mid.texture.shape == (32, 32, 3)
    high = load_mesh(predicted / "model" / "000000" / "high.obj")
    uvs, faces, index = model.dense_mesh()
    assert high.n_vertices == len(index) and high.n_faces == len(faces) == 2 * 31 * 31
    assert_close(high.vertices, out.dense_vertices[0][index], atol=1e-6)
    assert_close(high.uvs, uvs, atol=1e-7)
    # the winding points the dense mesh's normals out of the face, like the coarse mesh's
    v, f = high.vertices, high.faces
    normals = np.cross(v[f[:, 0]] - v[f[:, 1]], v[f[:, 1]] - v[f[:, 2]])
    assert normals[:, 2].mean() > 0


def _pillow(path):
    with Image.open(path) as im:
        return np.asarray(im)


def _imageio(path):
    return pytest.importorskip("imageio.v3").imread(path)


def _opencv(path):
    cv2 = pytest.importorskip("cv2")
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize("reader", [read_png16, _pillow, _imageio, _opencv])
def test_png_maps_decode_to_the_npy_values_with_common_readers(predicted, reader):
    """maps.json's formula applied to what an ordinary PNG reader returns gives the .npy values."""
    folder = predicted / "mm" / "000001"
    sidecar = json.loads((folder / "maps.json").read_text())
    assert "value = (png / 65535 * 2 - 1) * scale" in sidecar["png16_encoding"]
    for name, channels in (("deformation", ["x", "y", "z"]), ("displacement", ["along the coarse normal"])):
        entry = sidecar["maps"][name]
        assert entry["channels"] == channels and len(entry["png"]) == len(channels)
        values = np.load(folder / entry["npy"]).astype(np.float64)
        assert list(values.shape) == entry["shape"]
        for c, png in enumerate(entry["png"]):
            pixels = reader(folder / png)
            assert pixels.dtype == np.uint16 and pixels.shape == values.shape[1:]
            decoded = (pixels / 65535 * 2 - 1) * entry["scale"]
            assert_close(decoded, values[c], atol=entry["scale"] / 65535 + 1e-9, msg=f"{name} {png}")
            assert np.ptp(pixels) > 256  # the full 16 bits are used, not an 8-bit image scaled up


def test_png16_round_trip_agrees_with_pillow(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
    rgb = rng.integers(0, 65536, (4, 6, 3), dtype=np.uint16)
    write_png16(tmp_path / "grey.png", grey)
    write_png16(tmp_path / "rgb.png", rgb)
    np.testing.assert_array_equal(read_png16(tmp_path / "grey.png"), grey)
    np.testing.assert_array_equal(read_png16(tmp_path / "rgb.png"), rgb)
    with Image.open(tmp_path / "grey.png") as im:  # an independent decoder
        np.testing.assert_array_equal(np.asarray(im).astype(np.uint16), grey)
    with Image.open(tmp_path / "rgb.png") as im:  # Pillow reduces 16-bit RGB to its high bytes
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), (rgb >> 8).astype(np.uint8))
    values = rng.normal(size=(3, 4, 4))
    pixels, scale = encode_png16(values)
    assert_close(decode_png16(pixels, scale), values, atol=scale / 65535)


def test_pre_cropped_images_need_no_landmarks_and_bad_images_are_reported(tmp_path, tiny_wild, model, monkeypatch):
    monkeypatch.setenv("FACEHD_DETECT_PYTHON", str(tmp_path / "no-detector" / "python"))  # as without --detect
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(images / "cropped.png")
    shutil.copy(tiny_wild / "images" / "000002.png", images / "uncropped.png")  # 96 px, no landmarks
    (images / "broken.png").write_bytes(b"not a png")
    results = {r.name: r for r in predict(None, [images], tmp_path / "out", model=model)}
    assert results["cropped"].error is None and (tmp_path / "out" / "cropped" / "high.obj").is_file()
    assert "give --landmarks" in results["uncropped"].error
    assert "broken.png" in results["broken"].error
    assert not (tmp_path / "out" / "uncropped").exists()


def test_landmark_files_with_a_visible_column_are_read(tmp_path, tiny_wild, model):
    """facehd's landmarks68/cam<i>.txt form, "x y visible", gives the crop of the "x y" form; an
    invisible point that the crop does not use may have no position (NaN)."""
    lines = (tiny_wild / "landmarks" / "000000.txt").read_text().splitlines()
    folder = tmp_path / "landmarks"
    folder.mkdir()
    (folder / "000000.txt").write_text("\n".join(["nan nan 0"] + [f"{line} 1" for line in lines[1:]]) + "\n")
    image = tiny_wild / "images" / "000000.png"
    three = predict(None, [image], tmp_path / "three", landmarks=folder, model=model)
    two = predict(None, [image], tmp_path / "two", landmarks=tiny_wild / "landmarks", model=model)
    assert three[0].error is None and two[0].error is None
    a, b = np.load(tmp_path / "three" / "000000" / "coeffs.npz"), np.load(tmp_path / "two" / "000000" / "coeffs.npz")
    np.testing.assert_array_equal(a["coeffs"], b["coeffs"])
    np.testing.assert_array_equal(a["crop_transform"], b["crop_transform"])


def _nan_nose(points):
    rows = [f"{x} {y} 1" for x, y in points]
    rows[30] = "nan nan 0"
    return "\n".join(rows) + "\n"


@pytest.mark.parametrize("name, text, problem", [
    ("outside", lambda p: p + [500.0, 20.0], "68 of 68 landmarks lie outside the 96 x 96 image"),
    ("one_point", lambda p: p * 0 + [40.0, 50.0], "all landmarks lie at one point (40.0, 50.0)"),
    ("on_a_line", lambda p: np.column_stack([p[:, 0], 0.5 * p[:, 0] + 10]), "the landmarks lie on a line"),
    ("nan_nose", _nan_nose, "line(s) 31 have no position (NaN)"),
    ("nan_two_columns", lambda p: np.where(np.arange(68)[:, None] == 5, np.nan, p), "non-finite values"),
])
def test_landmarks_that_cannot_be_the_face_are_refused_naming_the_file(tmp_path, tiny_wild, model, name, text,
                                                                      problem):
    points = read_landmarks(tiny_wild / "landmarks" / "000002.txt")
    folder, images = tmp_path / "landmarks", tmp_path / "images"
    folder.mkdir()
    images.mkdir()
    shutil.copy(tiny_wild / "images" / "000002.png", images / f"{name}.png")
    bad = text(points)
    if isinstance(bad, str):
        (folder / f"{name}.txt").write_text(bad)
    else:
        np.savetxt(folder / f"{name}.txt", bad, fmt="%.4f")
    (result,) = predict(None, [images], tmp_path / "out", landmarks=folder, model=model)
    assert result.error is not None and result.error.startswith(f"{folder / name}.txt: ") and problem in result.error
    assert not (tmp_path / "out" / name).exists()


def test_errors_name_what_to_do(tmp_path):
    with pytest.raises(InputError, match="hrn train"):
        load_model(None)
    with pytest.raises(FileFormatError, match="no such checkpoint"):
        load_model(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(FileFormatError, match="not an HRN checkpoint"):
        load_model(tmp_path / "foreign.pt")


class _Opaque:
    """A Python object that weights-only loading refuses to unpickle."""


def test_a_file_that_is_not_a_checkpoint_is_one_line_naming_it(tmp_path, tiny_wild):
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  image_size: 64\n")
    objects = tmp_path / "objects.pt"
    torch.save({"thing": _Opaque()}, objects)
    for path, problem in ((config, "not a PyTorch checkpoint"), (objects, "holds Python objects")):
        with pytest.raises(FileFormatError) as info:
            load_model(path)
        assert str(info.value).startswith(f"{path}: ") and problem in str(info.value)
        assert "\n" not in str(info.value) and "weights_only" not in str(info.value)
    result = CliRunner().invoke(main, ["predict", "--checkpoint", str(config), "--images", str(tiny_wild / "images"),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        f"Error: {config}: not a PyTorch checkpoint (not the zip archive that torch.save writes)"]


def test_cli_predict(tmp_path, tiny_wild, tiny_checkpoint):
    runner = CliRunner()
    result = runner.invoke(main, ["predict", "--checkpoint", str(tiny_checkpoint), "--images",
                                  str(tiny_wild / "images" / "000003.png"), "--landmarks", str(tiny_wild / "landmarks"),
                                  "--out", str(tmp_path / "out"), "--units", "mm"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "1 of 1 images reconstructed (mm units)"
    assert "# units: mm" in _header(tmp_path / "out" / "000003" / "high.obj")
    missing = runner.invoke(main, ["predict", "--images", str(tiny_wild / "images"), "--out", str(tmp_path / "o2")])
    assert missing.exit_code == 1 and "hrn train" in missing.output
