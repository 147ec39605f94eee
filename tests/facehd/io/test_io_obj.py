"""Tests of the Wavefront OBJ reader and writer."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from facehd.io import Mesh, read_obj, write_obj
from facehd.io.obj import _group_lines, _parse_faces_bulk, _parse_faces_slow

SQUARE = "v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\n"


def write(tmp_path, text: str, name: str = "m.obj"):
    path = tmp_path / name
    path.write_text(text)
    return path


def small_mesh(seed: int = 0, **attributes) -> Mesh:
    rng = np.random.default_rng(seed)
    n = 12
    vertices = rng.standard_normal((n, 3)) * 40
    faces = np.array([rng.permutation(n)[:3] for _ in range(15)])
    extra = {
        "uvs": rng.random((n, 2)),
        "normals": rng.standard_normal((n, 3)),
        "colors": rng.random((n, 3)),
    }
    return Mesh(vertices, faces, **{k: extra[k] for k in attributes if attributes[k]})


class TestRoundTrip:
    @pytest.mark.parametrize(
        "uvs, normals, colors",
        [(False, False, False), (True, False, False), (False, True, False), (True, True, True)],
    )
    def test_attributes_are_exact(self, tmp_path, uvs, normals, colors):
        mesh = small_mesh(uvs=uvs, normals=normals, colors=colors)
        mesh.metadata = {"units": "mm", "subject": "F0001 neutral"}
        write_obj(tmp_path / "m.obj", mesh)
        back = read_obj(tmp_path / "m.obj")
        assert np.array_equal(back.vertices, mesh.vertices)
        assert np.array_equal(back.faces, mesh.faces)
        for name in ("uvs", "normals", "colors"):
            expected = getattr(mesh, name)
            got = getattr(back, name)
            assert (got is None) == (expected is None), name
            if expected is not None:
                assert np.array_equal(got, expected), name
        assert back.metadata == mesh.metadata
        assert back.source_vertex is None

    def test_precision_option_keeps_float32_values(self, tmp_path):
        # Nine significant digits identify a float32 exactly.
        mesh = small_mesh(uvs=True)
        mesh.vertices = mesh.vertices.astype(np.float32).astype(np.float64)
        mesh.uvs = mesh.uvs.astype(np.float32).astype(np.float64)
        write_obj(tmp_path / "m.obj", mesh, precision=9)
        back = read_obj(tmp_path / "m.obj")
        assert np.array_equal(back.vertices.astype(np.float32), mesh.vertices)
        assert np.array_equal(back.uvs.astype(np.float32), mesh.uvs)

    def test_face_forms_written(self, tmp_path):
        write_obj(tmp_path / "a.obj", small_mesh(uvs=True, normals=True))
        write_obj(tmp_path / "b.obj", small_mesh(normals=True))
        assert "/" in (tmp_path / "a.obj").read_text().split("\nf ")[1].split()[0]
        assert "//" in (tmp_path / "b.obj").read_text().split("\nf ")[1]

    def test_texture_written_beside_and_read_back(self, tmp_path):
        mesh = small_mesh(uvs=True)
        mesh.texture = np.random.default_rng(3).integers(0, 256, (8, 16, 3), dtype=np.uint8)
        write_obj(tmp_path / "face.obj", mesh)
        assert "map_Kd face.png" in (tmp_path / "face.mtl").read_text()
        back = read_obj(tmp_path / "face.obj", load_texture=True)
        assert back.texture_path == tmp_path / "face.png"
        assert np.array_equal(back.texture, mesh.texture)
        assert read_obj(tmp_path / "face.obj").texture is None  # loaded only on request

    def test_texture_path_is_copied_as_png(self, tmp_path):
        image = np.full((4, 4, 3), 200, dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / "skin.png")
        mesh = small_mesh(uvs=True)
        mesh.texture_path = tmp_path / "skin.png"
        write_obj(tmp_path / "out" / "m.obj", mesh)
        back = read_obj(tmp_path / "out" / "m.obj", load_texture=True)
        assert np.array_equal(back.texture, image)


class TestFaces:
    def test_quad_split_order(self, tmp_path):
        mesh = read_obj(write(tmp_path, SQUARE + "f 1 2 3 4\n"))
        assert mesh.faces.tolist() == [[0, 1, 2], [0, 2, 3]]

    def test_ngon_fan_and_mixed_polygons(self, tmp_path):
        text = SQUARE + "v 2 2 0\nf 1 2 3\nf 1 2 3 4 5\nf 2 3 4 5\n"
        mesh = read_obj(write(tmp_path, text))
        assert mesh.faces.tolist() == [
            [0, 1, 2],
            [0, 1, 2], [0, 2, 3], [0, 3, 4],
            [1, 2, 3], [1, 3, 4],
        ]  # fmt: skip

    def test_negative_indices_count_back_from_current_vertex(self, tmp_path):
        text = SQUARE + "f -4 -3 -2\nv 5 5 5\nv 6 6 6\nf -1 -2 -3 -6\n"
        mesh = read_obj(write(tmp_path, text))
        assert mesh.faces.tolist() == [[0, 1, 2], [5, 4, 3], [5, 3, 0]]

    def test_negative_texture_indices(self, tmp_path):
        text = SQUARE + "vt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\nf -4/-4 -3/-3 -2/-2 -1/-1\n"
        mesh = read_obj(write(tmp_path, text))
        assert mesh.uvs.tolist() == [[0, 0], [1, 0], [1, 1], [0, 1]]

    def test_vertex_normal_form(self, tmp_path):
        text = SQUARE + "vn 0 0 1\nvn 0 0 -1\nf 1//1 2//1 3//2\nf 1//1 3//2 4//2\n"
        mesh = read_obj(write(tmp_path, text))
        assert mesh.faces.tolist() == [[0, 1, 2], [0, 2, 3]]
        assert mesh.uvs is None
        assert mesh.normals.tolist() == [[0, 0, 1], [0, 0, 1], [0, 0, -1], [0, 0, -1]]

    def test_normal_indices_without_normals_are_ignored(self, tmp_path):
        # REALY's data/HIFI3D.obj: `mtllib`, quads `f v/vt/vn` whose normal indices run past the
        # vertices, and not one `vn` line
        text = (
            "mtllib test.mtl\n" + SQUARE + "v 2 0 0\nv 2 1 0\nvt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\n"
            + "f 1/1/81541 2/2/81542 3/3/81543 4/4/81544\nf 2/2/81545 5/1/81546 6/4/81547 3/3/81548\n"
        )  # fmt: skip
        mesh = read_obj(write(tmp_path, text))
        assert mesh.faces.tolist() == [[0, 1, 2], [0, 2, 3], [1, 4, 5], [1, 5, 2]]
        assert mesh.normals is None
        assert mesh.uvs.tolist()[:4] == [[0, 0], [1, 0], [1, 1], [0, 1]]

    def test_normal_indices_are_read_when_the_normals_exist(self, tmp_path):
        text = SQUARE + "vt 0 0\nvn 0 0 1\nvn 0 0 -1\nf 1/1/1 2/1/1 3/1/2\nf 1/1/1 3/1/2 4/1/2\n"
        mesh = read_obj(write(tmp_path, text))
        assert mesh.normals.tolist() == [[0, 0, 1], [0, 0, 1], [0, 0, -1], [0, 0, -1]]

    def test_disagreeing_corner_normals_are_averaged(self, tmp_path):
        text = SQUARE + "vn 1 0 0\nvn 0 1 0\nf 1//1 2//1 3//1\nf 1//2 3//2 4//2\n"
        mesh = read_obj(write(tmp_path, text))
        r = np.sqrt(0.5)
        assert np.allclose(mesh.normals, [[r, r, 0], [1, 0, 0], [r, r, 0], [0, 1, 0]])
        assert mesh.n_vertices == 4

    def test_full_form_with_ignored_statements(self, tmp_path):
        text = (
            "# comment\nmtllib missing.mtl\no head\ng face\ns 1\n" + SQUARE.replace("\n", " \n")
            + "vt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\nvn 0 0 1\nusemtl skin\n"
            + "f 1/1/1 2/2/1 3/3/1\nf\t1/1/1  3/3/1 4/4/1 \n"
        )  # fmt: skip
        mesh = read_obj(write(tmp_path, text))
        assert mesh.faces.tolist() == [[0, 1, 2], [0, 2, 3]]
        assert mesh.uvs.tolist() == [[0, 0], [1, 0], [1, 1], [0, 1]]
        assert mesh.texture_path is None

    def test_uvs_dropped_when_some_corners_lack_them(self, tmp_path):
        text = SQUARE + "vt 0 0\nvt 1 0\nvt 1 1\nf 1/1 2/2 3/3\nf 1 3 4\n"
        mesh = read_obj(write(tmp_path, text))
        assert mesh.uvs is None and mesh.faces.tolist() == [[0, 1, 2], [0, 2, 3]]

    def test_bulk_parser_matches_slow_parser(self):
        rng = np.random.default_rng(4)
        for form in ("{0}", "{0}/{1}", "{0}//{2}", "{0}/{1}/{2}"):
            for max_corners in (3, 4, 7):
                rows = []
                for n in rng.integers(3, max_corners + 1, size=30):
                    idx = rng.integers(-50, 50, size=(n, 3))
                    idx[idx == 0] = 7
                    rows.append("f " + " ".join(form.format(*c) for c in idx))
                bulk = _parse_faces_bulk(rows)
                assert bulk is not None, form
                slow = _parse_faces_slow(None, rows)
                assert np.array_equal(bulk[0], slow[0]) and np.array_equal(bulk[1], slow[1])

    @pytest.mark.parametrize(
        "rows",
        [
            ["f 1/2/3 4/5/6 7/8/9", "f 1//3 4//6 7//9"],  # mixed forms
            ["f 1//3 4//6 7//9", "f 1/2 4/5 7/8"],  # i/j must not pass for i//k
            ["f 1/2 3/4 5/6", "f 1/2/3 4 5/6"],  # forms mixed inside a face
            ["f 1/2 3/4 5/6", "f 1/2 3/ /4"],  # missing fields
            ["f 1 2 3 4", "f 1 2", "f 1 2 3"],  # too few corners: the slow parser reports it
            ["f 1 2 3 # note"],
            ["f 1 2 3.0"],
        ],
    )
    def test_bulk_parser_refuses_mixtures(self, rows):
        assert _parse_faces_bulk(rows) is None


class TestVertexSplit:
    def test_uv_seam_splits_vertices(self, tmp_path):
        # Vertices 1 and 3 (1-based) are used with different UVs by the two triangles.
        text = SQUARE + ("vt 0 0\nvt 0.5 0\nvt 0.5 0.5\nvt 0 0.5\nvt 0.9 0\nvt 0.9 0.9\nf 1/1 2/2 3/3\nf 1/5 3/6 4/4\n")
        mesh = read_obj(write(tmp_path, text))
        assert mesh.n_vertices == 6
        assert mesh.source_vertex.tolist() == [0, 0, 1, 2, 2, 3]
        original = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=float)
        assert np.array_equal(mesh.vertices, original[mesh.source_vertex])
        assert np.array_equal(mesh.source_vertex[mesh.faces], [[0, 1, 2], [0, 2, 3]])
        vt = np.array([[0, 0], [0.5, 0], [0.5, 0.5], [0, 0.5], [0.9, 0], [0.9, 0.9]])
        assert np.array_equal(mesh.uvs[mesh.faces], vt[[[0, 1, 2], [4, 5, 3]]])

    def test_split_keeps_colours_and_unused_vertices(self, tmp_path):
        text = (
            "v 0 0 0 1 0 0\nv 1 0 0 0 1 0\nv 1 1 0 0 0 1\nv 9 9 9 1 1 1\n"
            "vt 0 0\nvt 1 0\nvt 1 1\nvt 0.5 0.5\nf 1/1 2/2 3/3\nf 1/4 3/3 2/2\n"
        )
        mesh = read_obj(write(tmp_path, text))
        assert mesh.source_vertex.tolist() == [0, 0, 1, 2, 3]
        assert mesh.colors.tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]
        assert mesh.uvs[4].tolist() == [0, 0]  # unused vertex: no UV in the file


class TestVertices:
    def test_colours_0_255_are_scaled(self, tmp_path):
        mesh = read_obj(write(tmp_path, "v 0 0 0 255 0 51\nv 1 0 0 0 255 0\nv 0 1 0 0 0 0\nf 1 2 3\n"))
        assert np.allclose(mesh.colors[0], [1, 0, 0.2])

    def test_w_component_is_ignored(self, tmp_path):
        mesh = read_obj(write(tmp_path, "v 1 2 3 1\nv 4 5 6 1\nv 7 8 9 1\nf 1 2 3\n"))
        assert mesh.vertices.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]] and mesh.colors is None

    def test_point_cloud(self, tmp_path):
        mesh = read_obj(write(tmp_path, SQUARE))
        assert mesh.faces.shape == (0, 3) and mesh.n_vertices == 4

    def test_indented_continued_and_commented_lines(self, tmp_path):
        text = "  v 0 0 0\nv 1 0 \\\n 0\nv 1 1 0 # corner\nv 0 1 0\n\tf 1 2 3 4\n"
        mesh = read_obj(write(tmp_path, text))
        assert mesh.vertices.tolist() == [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]]
        assert mesh.faces.tolist() == [[0, 1, 2], [0, 2, 3]]

    def test_header_metadata_only_before_data(self):
        lines = _group_lines("# units: mm\n# note without colon\nv 0 0 0\n# later: ignored\n")
        assert lines.metadata == {"units": "mm"}

    def test_crlf_line_endings(self, tmp_path):
        path = tmp_path / "m.obj"
        path.write_bytes((SQUARE + "f 1 2 3 4\n").replace("\n", "\r\n").encode())
        assert read_obj(path).faces.tolist() == [[0, 1, 2], [0, 2, 3]]


class TestMaterial:
    def test_used_material_texture(self, tmp_path):
        Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "a.png")
        Image.fromarray(np.full((2, 2, 3), 9, np.uint8)).save(tmp_path / "b.png")
        (tmp_path / "m.mtl").write_text("newmtl first\nmap_Kd a.png\nnewmtl second\nmap_Kd -s 1 1 1 b.png\n")
        mesh = read_obj(write(tmp_path, "mtllib m.mtl\n" + SQUARE + "usemtl second\nf 1 2 3\n"))
        assert mesh.texture_path == tmp_path / "b.png"

    def test_missing_image_means_no_texture(self, tmp_path):
        (tmp_path / "m.mtl").write_text("newmtl skin\nmap_Kd gone.png\n")
        mesh = read_obj(write(tmp_path, "mtllib m.mtl\n" + SQUARE + "usemtl skin\nf 1 2 3\n"))
        assert mesh.texture_path is None and mesh.texture is None
