"""Tests of the Mesh record, suffix dispatch, shared helpers and a full-size (35k-vertex) mesh."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close

from facehd.errors import InputError, MeshFormatError
from facehd.io import Mesh, load_mesh, read_obj, read_ply, save_mesh, write_obj, write_ply
from facehd.io.mesh import _fan_corners, _fan_triangles, _split_corner_attribute


def grid_mesh(rows: int, cols: int, seed: int = 0) -> Mesh:
    """A bumpy height-field grid with every attribute set; colours are exact multiples of 1/255."""
    rng = np.random.default_rng(seed)
    u, v = np.meshgrid(np.linspace(0, 1, cols), np.linspace(0, 1, rows))
    z = 0.1 * np.sin(6 * u) * np.cos(4 * v) + 1e-3 * rng.standard_normal(u.shape)
    vertices = np.stack([u * 150 - 75, v * 180 - 90, z * 100], axis=-1).reshape(-1, 3)
    idx = np.arange(rows * cols).reshape(rows, cols)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, 1:], idx[1:, :-1]
    faces = np.concatenate([np.stack([a, b, c], -1), np.stack([a, c, d], -1)]).reshape(-1, 3)
    normals = rng.standard_normal(vertices.shape)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    return Mesh(
        vertices=vertices,
        faces=faces,
        uvs=np.stack([u, v], -1).reshape(-1, 2),
        normals=normals,
        colors=rng.integers(0, 256, vertices.shape) / 255.0,
        metadata={"units": "mm"},
    )


def naive_fan(polygons: list[list[int]]) -> np.ndarray:
    return np.array([[p[0], p[i], p[i + 1]] for p in polygons for i in range(1, len(p) - 1)])


class TestMesh:
    def test_coerces_dtypes(self):
        m = Mesh([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]])
        assert m.vertices.dtype == np.float64 and m.faces.dtype == np.int64
        assert m.faces.shape == (1, 3) and m.n_vertices == 3 and m.n_faces == 1

    def test_point_cloud_faces_are_0_by_3(self):
        m = Mesh(np.zeros((4, 3)), [])
        assert m.faces.shape == (0, 3)

    @pytest.mark.parametrize(
        "kwargs, word",
        [
            ({"vertices": np.zeros((3, 2)), "faces": [[0, 1, 2]]}, "shape"),
            ({"vertices": np.zeros((3, 3)), "faces": [[0, 1, 3]]}, "out of range"),
            ({"vertices": np.zeros((3, 3)), "faces": [[0, -1, 2]]}, "out of range"),
            ({"vertices": [[0, 0, np.nan], [0, 0, 0], [np.inf, 0, 0]], "faces": []}, "2 of 3"),
            ({"vertices": np.zeros((3, 3)), "faces": [[0, 1, 2.5]]}, "whole-number"),
            ({"vertices": np.zeros((3, 3)), "faces": [], "uvs": np.zeros((2, 2))}, "uvs"),
            ({"vertices": np.zeros((3, 3)), "faces": [], "colors": np.full((3, 3), 2.0)}, "[0, 1]"),
            ({"vertices": np.zeros((3, 3)), "faces": [], "texture": np.zeros((4, 4), np.uint8)}, "texture"),
            ({"vertices": np.zeros((3, 3)), "faces": [], "metadata": {"two words": "x"}}, "one word"),
            ({"vertices": np.zeros((3, 3)), "faces": [], "metadata": {"k": "a\nb"}}, "single line"),
        ],
    )
    def test_invalid_input_raises(self, kwargs, word):
        with pytest.raises(InputError) as info:
            Mesh(**kwargs)
        assert word in str(info.value)


class TestHelpers:
    def test_fan_triangles_matches_naive(self):
        polys = np.arange(2 * 6).reshape(2, 6)
        assert np.array_equal(_fan_triangles(polys), naive_fan(polys.tolist()))

    def test_fan_corners_mixed_polygons_match_naive(self):
        rng = np.random.default_rng(1)
        lengths = rng.integers(3, 8, size=50)
        starts = np.cumsum(lengths) - lengths
        flat = rng.permutation(int(lengths.sum()))
        polygons = [flat[s : s + n].tolist() for s, n in zip(starts, lengths, strict=True)]
        assert np.array_equal(flat[_fan_corners(starts, lengths)], naive_fan(polygons))

    def test_fan_corners_drops_degenerate_polygons(self):
        corners = _fan_corners(np.array([0, 2, 3]), np.array([2, 1, 4]))
        assert corners.tolist() == [[3, 4, 5], [3, 5, 6]]

    def test_split_keeps_consistent_attributes(self):
        faces = np.array([[0, 1, 2], [0, 2, 3]])
        new_faces, attr, source = _split_corner_attribute(faces, faces + 10, 5)
        assert source is None and new_faces is faces
        assert attr.tolist() == [10, 11, 12, 13, -1]

    def test_split_matches_naive(self):
        rng = np.random.default_rng(2)
        faces = rng.integers(0, 30, size=(40, 3))
        uv_index = rng.integers(0, 3, size=(40, 3))
        new_faces, attr, source = _split_corner_attribute(faces, uv_index, 35)
        # Each corner keeps its source vertex and attribute, and each pair is one vertex.
        assert np.array_equal(source[new_faces], faces)
        assert np.array_equal(attr[new_faces], uv_index)
        pairs = {(int(s), int(a)) for s, a in zip(source, attr, strict=True)}
        assert len(pairs) == len(source)
        assert set(np.flatnonzero(attr < 0)) == {i for i, s in enumerate(source) if s not in faces}


class TestDispatch:
    def test_load_and_save_by_suffix(self, tmp_path):
        mesh = grid_mesh(4, 5)
        for name in ("a.obj", "b.PLY"):
            save_mesh(tmp_path / name, mesh)
            back = load_mesh(tmp_path / name)
            assert np.array_equal(back.faces, mesh.faces)
            assert_close(back.vertices, mesh.vertices, atol=1e-4)

    def test_save_options_reach_writer(self, tmp_path):
        save_mesh(tmp_path / "a.ply", grid_mesh(3, 3), binary=False)
        assert b"format ascii 1.0" in (tmp_path / "a.ply").read_bytes()[:40]

    def test_unknown_suffix(self, tmp_path):
        (tmp_path / "m.stl").write_text("solid")
        with pytest.raises(MeshFormatError, match="m.stl.*unsupported"):
            load_mesh(tmp_path / "m.stl")
        with pytest.raises(InputError, match="m.stl"):
            save_mesh(tmp_path / "m.stl", grid_mesh(3, 3))

    @pytest.mark.parametrize("name", ["missing.obj", "missing.ply", "missing.wrl"])
    def test_missing_file(self, tmp_path, name):
        with pytest.raises(FileNotFoundError, match=name):
            load_mesh(tmp_path / name)

    def test_failed_write_leaves_no_file(self, tmp_path):
        mesh = grid_mesh(3, 3)
        mesh.metadata["bad key"] = "x"  # invalid, caught when writing
        with pytest.raises(InputError):
            write_obj(tmp_path / "a.obj", mesh)
        assert list(tmp_path.iterdir()) == []


def test_full_size_mesh_round_trips(tmp_path):
    """A BFM-sized mesh (35,721 vertices, 70,688 faces) reads back with the same arrays."""
    mesh = grid_mesh(189, 189)
    assert mesh.n_vertices > 35_000 and mesh.n_faces > 70_000
    write_obj(tmp_path / "big.obj", mesh)
    write_ply(tmp_path / "big.ply", mesh, double=True)
    for back in (read_obj(tmp_path / "big.obj"), read_ply(tmp_path / "big.ply")):
        assert np.array_equal(back.vertices, mesh.vertices)
        assert np.array_equal(back.faces, mesh.faces)
        assert np.array_equal(back.uvs, mesh.uvs)
        assert np.array_equal(back.normals, mesh.normals)
        assert np.array_equal(back.colors, mesh.colors)
        assert back.source_vertex is None
        assert back.metadata == {"units": "mm"}
