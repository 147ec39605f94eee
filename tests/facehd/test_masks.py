import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.path import Path as PolygonPath

sys.path.insert(0, str(Path(__file__).parent))  # gt_factory.py lives beside the tests

from gt_factory import MM, make_model  # noqa: E402

from facehd import conventions as cv  # noqa: E402
from facehd.masks import (  # noqa: E402
    INNER_LIPS_IBUG,
    LEFT_EYE_IBUG,
    NOISY_REGIONS,
    RIGHT_EYE_IBUG,
    SCAN_LABELS,
    _near_polygon,
    model_masks,
    scan_mask,
    uv_masks,
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model"), resolution=48)[1]


@pytest.fixture(scope="module")
def masks(model):
    return model_masks(model)


def test_polygon_test_matches_a_naive_point_in_polygon():
    rng = np.random.default_rng(0)
    polygon = np.array([[0.0, 0.0], [1.0, 0.2], [1.2, 1.0], [0.3, 0.8], [0.5, 0.4]])  # not convex
    points = rng.uniform(-0.5, 1.7, (4000, 2))
    inside = PolygonPath(polygon).contains_points(points)
    assert np.array_equal(_near_polygon(points, polygon, 0.0), inside)
    # with a margin: inside, or within the margin of an edge (naive distance to every edge)
    margin = 0.1
    a, b = polygon, np.roll(polygon, -1, axis=0)
    d = np.full(len(points), np.inf)
    for p0, p1 in zip(a, b):
        t = np.clip(((points - p0) @ (p1 - p0)) / ((p1 - p0) @ (p1 - p0)), 0, 1)
        d = np.minimum(d, np.linalg.norm(points - (p0 + t[:, None] * (p1 - p0)), axis=1))
    assert np.array_equal(_near_polygon(points, polygon, margin), inside | (d <= margin))


def test_model_masks_cover_the_right_landmarks(model, masks):
    kp = model.keypoints.numpy()
    assert masks.eyes[kp[list(RIGHT_EYE_IBUG + LEFT_EYE_IBUG)]].all()
    assert masks.mouth_interior[kp[list(INNER_LIPS_IBUG)]].all()
    assert masks.nostrils[kp[[32, 34]]].all()  # beside the subnasale, inside the openings
    for name in NOISY_REGIONS:  # the nose tip, chin and forehead centre are clean skin
        assert not getattr(masks, name)[kp[[cv.NOSE_TIP_IBUG, 8, 27]]].any(), name
    assert masks.hair_band.sum() == model.region_mask("hair_band").sum()
    assert np.array_equal(masks.face, masks.front & ~masks.noisy)
    # the eyes are mirror images: about as many vertices on either side
    x = model.mean_shape[:, 0].numpy()
    right, left = (masks.eyes & (x < 0)).sum(), (masks.eyes & (x > 0)).sum()
    assert abs(int(right) - int(left)) <= 0.1 * max(right, left)
    # sizes are physical: the nostril masks are ~2 x (pi 7^2) mm^2 of a ~1 mm^2 / vertex mesh at most
    assert 0 < masks.nostrils.sum() < masks.eyes.sum() < masks.front.sum() / 5


def test_model_without_region_labels_uses_landmarks_only(model, masks):
    bare = dataclasses.replace(model, region=None)
    plain = model_masks(bare)
    assert plain.eyes.sum() < masks.eyes.sum()  # the labelled eye region is larger than the lids
    assert plain.eyes[model.keypoints.numpy()[list(RIGHT_EYE_IBUG)]].all()
    top = model.mean_shape[:, 1].numpy()
    assert np.array_equal(plain.hair_band, top > top.max() - 12.0 * MM)
    assert np.array_equal(plain.nostrils, masks.nostrils)


def test_uv_masks_follow_the_vertex_masks(model, masks):
    maps = uv_masks(model, masks, 256)
    assert set(maps) == {*NOISY_REGIONS, "noisy", "front", "face", "valid"}
    assert all(m.shape == (256, 256) and m.dtype == bool for m in maps.values())
    assert maps["valid"].all()  # SynthBFM's UV layout fills the square
    uv = model.uv.numpy()

    def texel(vertex):
        u, v = uv[vertex]
        return min(int((1 - v) * 256), 255), min(int(u * 256), 255)

    kp = model.keypoints.numpy()
    assert all(maps["eyes"][texel(kp[i])] for i in RIGHT_EYE_IBUG + LEFT_EYE_IBUG)
    assert maps["face"][texel(kp[cv.NOSE_TIP_IBUG])]
    # area fractions agree with the vertex fractions on this near-uniform grid
    for name in ("eyes", "hair_band", "face"):
        assert maps[name].mean() == pytest.approx(getattr(masks, name).mean(), abs=0.04), name


def test_scan_mask_labels_points_by_region(model, masks):
    shape = model.mean_shape.numpy()
    faces = model.faces.numpy()
    normals = _vertex_normals(model)
    kp = model.keypoints.numpy()
    forehead = kp[27]
    points = np.stack([
        shape[forehead],  # clean skin
        shape[kp[37]] + 1.0 * MM * normals[kp[37]],  # on an eyelid, 1 mm off
        shape[kp[32]],  # in a nostril
        shape[kp[62]],  # mouth interior
        shape[np.flatnonzero(masks.hair_band)[0]],
        shape[forehead] + 20.0 * MM * normals[forehead],  # a spike 20 mm out
        shape[np.flatnonzero(~masks.front & ~masks.hair_band)[0]],  # the mesh border
    ])
    result = scan_mask(points, shape, faces, masks)
    expected = ["kept", "eyes", "nostrils", "mouth_interior", "hair_band", "far", "outside_face"]
    assert [SCAN_LABELS[i] for i in result.label] == expected
    assert result.keep.tolist() == [True] + [False] * 6
    assert result.distance[5] == pytest.approx(20.0 * MM, rel=0.05)
    assert result.counts() == {name: int(name in expected) for name in SCAN_LABELS}


def _vertex_normals(model) -> np.ndarray:
    from facehd.morphable import vertex_normals

    return vertex_normals(model.mean_shape[None].to(torch.float64), model.faces, model.point_buf)[0].numpy()
