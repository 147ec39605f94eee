import shutil

import numpy as np
import pytest
import torch
from capture_factory import make_capture, make_dataset, many_subjects
from helpers import assert_close
from torch.utils.data import DataLoader

from facehd.capture import LANDMARKS7_TXT, CaptureRef
from facehd.conventions import LANDMARKS7_IBUG
from facehd.dataset import FaceHD100, collate_captures, read_gt_maps, split_subjects
from facehd.errors import FileFormatError, InputError


def test_item_has_every_field_with_its_shape(dataset):
    ds = FaceHD100(dataset)
    assert len(ds) == 8
    item = ds[0]
    assert item["images"].shape == (9, 3, 48, 64) and item["images"].dtype == torch.float32
    assert 0.0 <= item["images"].min() and item["images"].max() <= 1.0 and item["images"].std() > 0.05
    assert item["K"].shape == (9, 3, 3) and item["R"].shape == (9, 3, 3) and item["t"].shape == (9, 3)
    assert item["image_size"].tolist() == [[64, 48]] * 9
    assert item["landmarks68"].shape == (9, 68, 3) and item["landmarks7"].shape == (7, 3)
    assert (item["subject"], item["expression"]) == ("S001", "neutral")
    assert (item["gender"], item["age"], item["ethnicity"]) == ("female", 24, "asian")
    assert item["view_names"] == [f"cam{i}" for i in range(9)]
    assert item["scan"].endswith("S001/neutral/scan.ply") and "scan_vertices" not in item
    assert "gt_maps" not in item


def test_cameras_and_landmarks_agree_in_the_item(dataset):
    """landmarks7 projected with the item's K, R, t land on the 68-point files' same indices."""
    item = FaceHD100(dataset)[3]
    cam = item["landmarks7"].double() @ item["R"].double().transpose(1, 2) + item["t"].double()[:, None]
    pixels = cam[..., :2] / cam[..., 2:] @ item["K"].double()[:, :2, :2].transpose(1, 2) + item["K"].double()[
        :, None, :2, 2]
    assert_close(pixels, item["landmarks68"][:, list(LANDMARKS7_IBUG), :2], atol=2e-3)


def test_view_subset_and_resize_scale_k_and_landmarks(dataset):
    full = FaceHD100(dataset)[1]
    ds = FaceHD100(dataset, views=[4, 0], image_size=(32, 24))
    item = ds[1]
    assert item["view_names"] == ["cam4", "cam0"] and item["images"].shape == (2, 3, 24, 32)
    assert item["image_size"].tolist() == [[32, 24], [32, 24]]
    assert_close(item["R"], full["R"][[4, 0]])
    # half size: focal halves, the principal point (31.5, 23.5) maps to (15.5, 11.5)
    assert_close(item["K"][0], [[50, 0, 15.5], [0, 50, 11.5], [0, 0, 1]])
    assert_close(item["landmarks68"][..., :2], (full["landmarks68"][[4, 0], :, :2] + 0.5) * 0.5 - 0.5, atol=1e-5)
    with pytest.raises(InputError):
        FaceHD100(dataset, views=[9])
    with pytest.raises(InputError):
        FaceHD100(dataset, views=[1, 1])


def test_missing_68_point_files_give_nans_and_load_scan_gives_vertices(tmp_path):
    root = make_dataset(tmp_path / "ds", expressions=("neutral",), with_landmarks68=False)
    item = FaceHD100(root, load_scan=True)[0]
    assert torch.isnan(item["landmarks68"]).all()
    assert item["scan_vertices"].shape == (576, 3) and item["scan_faces"].shape == (1058, 3)
    assert item["scan_vertices"].abs().max() > 50  # millimetres


def test_splits_are_disjoint_deterministic_and_cover_every_subject(tmp_path):
    ids = [f"S{i:03d}" for i in range(1, 101)]
    split = split_subjects(ids, (0.8, 0.1, 0.1), seed=0)
    assert [len(split[s]) for s in ("train", "val", "test")] == [80, 10, 10]
    sets = [set(v) for v in split.values()]
    assert set.union(*sets) == set(ids) and sum(len(s) for s in sets) == 100
    assert split_subjects(list(reversed(ids)), seed=0) == split  # order of the input does not matter
    assert split_subjects(ids, seed=1) != split
    with pytest.raises(InputError):
        split_subjects(ids, (0.8, 0.3, 0.1))

    root = make_dataset(tmp_path / "ds", subjects=many_subjects(10), expressions=("neutral", "smile"))
    parts = {s: FaceHD100(root, split=s, split_seed=3) for s in ("train", "val", "test")}
    subjects = {s: {r.subject for r in ds.captures} for s, ds in parts.items()}
    assert not (subjects["train"] & subjects["val"]) and not (subjects["train"] & subjects["test"])
    assert not (subjects["val"] & subjects["test"])
    assert sum(len(ds) for ds in parts.values()) == 20  # both expressions of a subject stay together
    assert [len(subjects[s]) for s in ("train", "val", "test")] == [8, 1, 1]


def test_dataloader_with_two_workers_and_collate(dataset):
    ds = FaceHD100(dataset, views=[0, 4, 8], load_scan=True)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_captures)
    batches = list(loader)
    assert [len(b["subject"]) for b in batches] == [3, 3, 2]
    batch = batches[0]
    assert batch["images"].shape == (3, 3, 3, 48, 64) and batch["K"].shape == (3, 3, 3, 3)
    assert batch["age"].tolist() == [24, 24, 31] and batch["subject"] == ["S001", "S001", "S002"]
    assert batch["view_names"][0] == ["cam0", "cam4", "cam8"]
    assert isinstance(batch["scan_vertices"], list) and batch["scan_vertices"][0].shape == (576, 3)
    assert_close(batch["images"][1], ds[1]["images"])


def write_fake_gt(folder, view: str, value: float, mask_shape=(64, 64)):
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(
        folder / f"{view}.npz",
        deformation=np.full((3, 64, 64), value, np.float32),
        displacement=np.full((1, 256, 256), -value, np.float32),
        deformation_mask=np.ones(mask_shape, bool),
        displacement_mask=np.ones((1, 256, 256), np.uint8),
        coeffs=np.zeros(257),  # extra keys are ignored
    )


def test_gt_maps_from_the_derived_folder(dataset, tmp_path):
    derived = tmp_path / "derived"
    write_fake_gt(derived / "S001" / "neutral" / "gt_maps", "cam2", 0.25)
    (derived / "S001" / "neutral" / "align.json").write_text('{"scale": 0.01}')
    item = FaceHD100(dataset, views=[1, 2], derived=derived)[0]
    maps = item["gt_maps"]
    assert maps["present"].tolist() == [False, True]
    assert maps["deformation"].shape == (2, 3, 64, 64) and maps["displacement"].shape == (2, 1, 256, 256)
    assert maps["deformation_mask"].shape == (2, 1, 64, 64)
    assert maps["deformation"][1].eq(0.25).all() and maps["displacement"][1].eq(-0.25).all()
    assert maps["deformation"][0].eq(0).all() and maps["deformation_mask"][0].eq(0).all()
    assert maps["displacement_mask"][1].eq(1).all()
    assert item["align"] == {"scale": 0.01}
    assert FaceHD100(dataset, derived=derived)[1]["align"] is None

    write_fake_gt(tmp_path / "bad" / "gt_maps", "cam0", 1.0, mask_shape=(32, 32))
    with pytest.raises(FileFormatError, match="cam0.npz: deformation_mask has shape"):
        read_gt_maps(tmp_path / "bad", ["cam0"])


def test_loader_names_the_file_it_cannot_use(dataset):
    make_capture(dataset, "S077", "neutral")
    with pytest.raises(FileFormatError, match="subjects.csv: no row for subject folder.*S077"):
        FaceHD100(dataset)
    shutil.rmtree(dataset / "S077")
    ds = FaceHD100(dataset, views=[0])
    ref = CaptureRef(dataset, "S001", "neutral")
    (ref.directory / LANDMARKS7_TXT).write_text("1 2 3\n")
    with pytest.raises(FileFormatError, match="landmarks7.txt: 1 landmarks, expected 7"):
        ds[0]


def test_loader_says_what_is_wrong_with_the_root_and_names_a_symlink_loop(dataset):
    with pytest.raises(InputError, match=f"S001: a subject folder, not a dataset root.*give its parent, {dataset}$"):
        FaceHD100(dataset / "S001")
    image = CaptureRef(dataset, "S001", "neutral").paths.images[0]
    image.unlink()
    image.symlink_to(image.name)
    with pytest.raises(FileFormatError, match=r"cam0.jpg: view cam0: image is a symlink loop"):
        FaceHD100(dataset, views=[0])[0]
    (dataset / "subjects.csv").unlink()
    with pytest.raises(FileFormatError, match="subjects.csv: missing subjects.csv: the loader needs the subjects"):
        FaceHD100(dataset)
