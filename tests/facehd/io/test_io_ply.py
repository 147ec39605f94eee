"""Tests of the PLY reader (ASCII, binary little / big endian) and writer."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close
from PIL import Image

from facehd.io import Mesh, read_ply, write_ply

QUAD_VERTICES = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [2, 2, 0]], dtype=float)


def ply_file(tmp_path, header: list[str], body: bytes | str, fmt: str = "ascii", name="m.ply"):
    """Write a PLY file from header lines (between format and end_header) and a body."""
    text = "\n".join(["ply", f"format {fmt} 1.0", *header, "end_header"]) + "\n"
    path = tmp_path / name
    path.write_bytes(text.encode() + (body.encode() if isinstance(body, str) else body))
    return path


def binary_faces(faces: list[list[int]], endian: str = "<", count="u1", index="i4") -> bytes:
    """Variable-length face lists packed record by record (a naive reference packer)."""
    out = b""
    for face in faces:
        out += np.array([len(face)], dtype=endian + count).tobytes()
        out += np.array(face, dtype=endian + index).tobytes()
    return out


def random_mesh(seed: int = 0) -> Mesh:
    rng = np.random.default_rng(seed)
    n = 20
    return Mesh(
        vertices=rng.standard_normal((n, 3)) * 100,
        faces=np.array([rng.permutation(n)[:3] for _ in range(30)]),
        uvs=rng.random((n, 2)),
        normals=rng.standard_normal((n, 3)),
        colors=rng.integers(0, 256, (n, 3)) / 255.0,
        metadata={"units": "mm", "scanner": "synthetic v1"},
    )


class TestRoundTrip:
    @pytest.mark.parametrize("binary", [True, False])
    def test_float32_precision(self, tmp_path, binary):
        mesh = random_mesh()
        write_ply(tmp_path / "m.ply", mesh, binary=binary)
        back = read_ply(tmp_path / "m.ply")
        for name in ("vertices", "uvs", "normals"):
            expected = getattr(mesh, name).astype(np.float32).astype(np.float64)
            assert np.array_equal(getattr(back, name), expected), name
        assert np.array_equal(back.faces, mesh.faces)
        assert np.array_equal(back.colors, mesh.colors)
        assert back.metadata == mesh.metadata

    @pytest.mark.parametrize("binary", [True, False])
    def test_double_is_exact(self, tmp_path, binary):
        mesh = random_mesh(1)
        write_ply(tmp_path / "m.ply", mesh, binary=binary, double=True)
        back = read_ply(tmp_path / "m.ply")
        assert np.array_equal(back.vertices, mesh.vertices)
        assert np.array_equal(back.normals, mesh.normals)
        assert np.array_equal(back.uvs, mesh.uvs)

    def test_header_layout(self, tmp_path):
        write_ply(tmp_path / "m.ply", random_mesh())
        header = (tmp_path / "m.ply").read_bytes().split(b"end_header")[0].decode()
        assert "format binary_little_endian 1.0" in header
        assert "comment units mm" in header
        assert "property uchar red" in header
        assert "property list uchar int vertex_indices" in header

    def test_point_cloud(self, tmp_path):
        write_ply(tmp_path / "p.ply", Mesh(QUAD_VERTICES, []))
        back = read_ply(tmp_path / "p.ply")
        assert back.faces.shape == (0, 3)
        assert np.array_equal(back.vertices, QUAD_VERTICES)

    def test_texture_comment(self, tmp_path):
        mesh = random_mesh()
        mesh.texture = np.full((4, 8, 3), 7, dtype=np.uint8)
        write_ply(tmp_path / "scan.ply", mesh)
        assert b"comment TextureFile scan.png" in (tmp_path / "scan.ply").read_bytes()
        back = read_ply(tmp_path / "scan.ply", load_texture=True)
        assert np.array_equal(back.texture, mesh.texture)
        assert "TextureFile" not in back.metadata


class TestRead:
    def test_ascii_quads_and_triangles(self, tmp_path):
        body = "".join(" ".join(map(str, v)) + "\n" for v in QUAD_VERTICES) + "4 0 1 2 3\n3 1 2 4\n"
        path = ply_file(
            tmp_path,
            ["element vertex 5", "property float x", "property float y", "property float z",
             "element face 2", "property list uchar int vertex_indices"],
            body,
        )  # fmt: skip
        mesh = read_ply(path)
        assert mesh.faces.tolist() == [[0, 1, 2], [0, 2, 3], [1, 2, 4]]
        assert np.array_equal(mesh.vertices, QUAD_VERTICES)

    @pytest.mark.parametrize("endian, fmt", [("<", "binary_little_endian"), (">", "binary_big_endian")])
    @pytest.mark.parametrize("faces", [[[0, 1, 2, 3], [1, 2, 4, 3]], [[0, 1, 2, 3], [1, 2, 4]]])
    def test_binary_byte_orders_and_mixed_lists(self, tmp_path, endian, fmt, faces):
        vertex = QUAD_VERTICES.astype(endian + "f8").tobytes()
        path = ply_file(
            tmp_path,
            ["element vertex 5", "property double x", "property double y", "property double z",
             "element face 2", "property list uint ushort vertex_index"],
            vertex + binary_faces(faces, endian, "u4", "u2"),
            fmt,
        )  # fmt: skip
        expected = [[f[0], f[i], f[i + 1]] for f in faces for i in range(1, len(f) - 1)]
        assert read_ply(path).faces.tolist() == expected

    def test_unknown_elements_and_properties_are_skipped(self, tmp_path):
        # Vertex: x, an unknown list, y, an unknown int, z, colours; then an unknown element with
        # a list before the faces, and an unknown list after the face indices.
        vertex = b""
        rng = np.random.default_rng(5)
        colors = rng.integers(0, 256, (5, 3)).astype(np.uint8)
        for v, c in zip(QUAD_VERTICES, colors, strict=True):
            vertex += np.array([v[0]], "<f4").tobytes() + binary_faces([[7, 8]], "<", "u1", "i2")
            vertex += np.array([v[1]], "<f4").tobytes() + np.array([99], "<i4").tobytes()
            vertex += np.array([v[2]], "<f4").tobytes() + c.tobytes()
        edges = binary_faces([[0, 1], [1, 2, 3]], "<", "u1", "i4")
        faces = b""
        for face in ([0, 1, 2], [0, 2, 3]):
            faces += binary_faces([face]) + np.array([0.5], "<f8").tobytes()
            faces += binary_faces([[1, 2]], "<", "u1", "f4")
        path = ply_file(
            tmp_path,
            ["comment made by hand", "obj_info ignored",
             "element vertex 5", "property float x", "property list uchar short junk",
             "property float y", "property int flags", "property float z",
             "property uchar red", "property uchar green", "property uchar blue",
             "element edge 2", "property list uchar int vertex_indices",
             "element face 2", "property list uchar int vertex_indices", "property double quality",
             "property list uchar float texcoord"],
            vertex + edges + faces,
            "binary_little_endian",
        )  # fmt: skip
        mesh = read_ply(path)
        assert np.array_equal(mesh.vertices, QUAD_VERTICES)
        assert mesh.faces.tolist() == [[0, 1, 2], [0, 2, 3]]
        assert np.array_equal(mesh.colors, colors / 255.0)
        assert mesh.metadata == {"made": "by hand"}

    def test_varying_list_in_vertex_element_keeps_colour_types(self, tmp_path):
        body = b""
        for i, (v, junk) in enumerate(zip(QUAD_VERTICES, ([1], [1, 2], [], [3], [4, 5, 6]), strict=True)):
            body += v.astype("<f4").tobytes() + bytes([255 * (i % 2), 0, 51])
            body += binary_faces([junk], "<", "u1", "i4")
        path = ply_file(
            tmp_path,
            ["element vertex 5", "property float x", "property float y", "property float z",
             "property uchar red", "property uchar green", "property uchar blue",
             "property list uchar int junk"],
            body,
            "binary_little_endian",
        )  # fmt: skip
        mesh = read_ply(path)
        assert np.array_equal(mesh.vertices, QUAD_VERTICES)
        assert_close(mesh.colors, [[i % 2, 0, 0.2] for i in range(5)])

    def test_unknown_elements_ascii(self, tmp_path):
        body = (
            "".join(f"{v[0]} 2 7 8 {v[1]} {v[2]} 0.5\n" for v in QUAD_VERTICES)
            + "3 0 1 2\n1 2\n4 0 1 2 3 1\n3 1 2 4 0\n"
        )
        path = ply_file(
            tmp_path,
            ["element vertex 5", "property float x", "property list uchar int junk",
             "property float y", "property float z", "property float confidence",
             "element material 2", "property list uchar int ids",
             "element face 2", "property list uchar int vertex_indices", "property uchar flags"],
            body,
        )  # fmt: skip
        mesh = read_ply(path)
        assert mesh.faces.tolist() == [[0, 1, 2], [0, 2, 3], [1, 2, 4]]
        assert np.array_equal(mesh.vertices, QUAD_VERTICES)

    @pytest.mark.parametrize("u, v", [("s", "t"), ("u", "v"), ("texture_u", "texture_v")])
    def test_uv_property_names(self, tmp_path, u, v):
        body = "".join(f"{x} {y} {z} {x / 2} {y / 4}\n" for x, y, z in QUAD_VERTICES)
        path = ply_file(
            tmp_path,
            ["element vertex 5", "property float x", "property float y", "property float z",
             f"property float {u}", f"property float {v}"],
            body,
        )  # fmt: skip
        assert_close(read_ply(path).uvs, QUAD_VERTICES[:, :2] / [2, 4])

    def test_float_and_uchar_colours(self, tmp_path):
        rows = ["0 0 0 0.5 1 0 255 0 51", "1 0 0 0 0 0.25 0 0 0", "0 1 0 1 1 1 1 1 1"]
        props = ["element vertex 3"] + [f"property float {a}" for a in "xyz"]
        floats = props + [f"property float {c}" for c in ("red", "green", "blue")]
        floats += [f"property uchar {c}" for c in ("r", "g", "b")]
        mesh = read_ply(ply_file(tmp_path, floats, "\n".join(rows) + "\n"))
        assert mesh.colors.tolist() == [[0.5, 1, 0], [0, 0, 0.25], [1, 1, 1]]
        uchars = props + [f"property float {c}" for c in ("q", "w", "e")]
        uchars += [f"property uchar {c}" for c in ("red", "green", "blue")]
        mesh = read_ply(ply_file(tmp_path, uchars, "\n".join(rows) + "\n", name="u.ply"))
        assert_close(mesh.colors, [[1, 0, 0.2], [0, 0, 0], [1 / 255] * 3])

    def test_crlf_header(self, tmp_path):
        text = "ply\r\nformat binary_little_endian 1.0\r\nelement vertex 1\r\nproperty float x\r\n"
        text += "property float y\r\nproperty float z\r\nend_header\r\n"
        path = tmp_path / "m.ply"
        path.write_bytes(text.encode() + np.array([13.0, 10.0, 1.0], "<f4").tobytes())
        assert read_ply(path).vertices.tolist() == [[13, 10, 1]]

    def test_texture_file_comment_resolves_beside(self, tmp_path):
        Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "tex.png")
        path = ply_file(
            tmp_path,
            ["comment TextureFile tex.png", "comment units: mm", "element vertex 1",
             "property float x", "property float y", "property float z"],
            "0 0 0\n",
        )  # fmt: skip
        mesh = read_ply(path)
        assert mesh.texture_path == tmp_path / "tex.png"
        assert mesh.metadata == {"units": "mm"}
