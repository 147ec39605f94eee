"""Tests of the VRML (.wrl) reader on small hand-written files."""

from __future__ import annotations

import numpy as np
from PIL import Image

from facehd.io import load_mesh, read_wrl

VRML2_QUADS = """#VRML V2.0 utf8
# exported by a scanner
Transform { children [
  Shape {
    appearance Appearance { material Material { diffuseColor 0.8 0.8 0.8 } }
    geometry IndexedFaceSet {
      creaseAngle 0.5
      coord Coordinate { point [
        0 0 0, 1 0 0,   # first row
        1 1 0,
        0 1 0, 2 2 0,
      ] }
      coordIndex [ 0, 1, 2, 3, -1,
                   1 4 2 -1 ]
    }
  }
] }
"""


def write(tmp_path, text: str, name: str = "scan.wrl"):
    path = tmp_path / name
    path.write_text(text)
    return path


def shape(points: str, index: str, extra: str = "") -> str:
    return (
        f"Shape {{ geometry IndexedFaceSet {{\n coord Coordinate {{ point [ {points} ] }}\n"
        f" coordIndex [ {index} ]\n {extra} }} }}\n"
    )


def test_quads_comments_and_commas(tmp_path):
    mesh = read_wrl(write(tmp_path, VRML2_QUADS))
    assert mesh.vertices.tolist() == [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [2, 2, 0]]
    assert mesh.faces.tolist() == [[0, 1, 2], [0, 2, 3], [1, 4, 2]]
    assert mesh.uvs is None and mesh.colors is None and mesh.source_vertex is None


def test_two_shapes_are_concatenated_with_offsets(tmp_path):
    text = "#VRML V2.0 utf8\n" + shape("0 0 0, 1 0 0, 0 1 0", "0 1 2 -1")
    text += shape("5 5 5,\n6 5 5,\n6 6 5,\n5 6 5", "0,1,2,3,-1,")
    mesh = read_wrl(write(tmp_path, text))
    assert mesh.n_vertices == 7
    assert mesh.vertices[3].tolist() == [5, 5, 5]
    assert mesh.faces.tolist() == [[0, 1, 2], [3, 4, 5], [3, 5, 6]]


def test_last_polygon_without_terminator_and_degenerate_polygons(tmp_path):
    text = shape("0 0 0 1 0 0 1 1 0 0 1 0", "0 1 -1 -1 0 1 2 3")
    assert read_wrl(write(tmp_path, text)).faces.tolist() == [[0, 1, 2], [0, 2, 3]]


def test_texture_coordinates_with_index_split_seams(tmp_path):
    extra = "texCoord TextureCoordinate { point [ 0 0, 1 0, 1 1, 0 1, 0.5 0.5 ] }\ntexCoordIndex [ 0 1 2 -1 4 2 3 -1 ]"
    text = shape("0 0 0, 1 0 0, 1 1 0, 0 1 0", "0 1 2 -1 0 2 3 -1", extra)
    mesh = read_wrl(write(tmp_path, text))
    # Vertex 0 is used with UVs 0 and 4: it is split in two.
    assert mesh.source_vertex.tolist() == [0, 0, 1, 2, 3]
    assert np.array_equal(mesh.source_vertex[mesh.faces], [[0, 1, 2], [0, 2, 3]])
    uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0.5, 0.5]])
    assert np.array_equal(mesh.uvs[mesh.faces], uv[[[0, 1, 2], [4, 2, 3]]])


def test_texture_coordinates_without_index_are_per_vertex(tmp_path):
    extra = "texCoord TextureCoordinate { point [ 0 0, 1 0, 1 1, 0 1 ] }"
    text = shape("0 0 0, 1 0 0, 1 1 0, 0 1 0", "0 1 2 3 -1", extra)
    mesh = read_wrl(write(tmp_path, text))
    assert mesh.source_vertex is None
    assert mesh.uvs.tolist() == [[0, 0], [1, 0], [1, 1], [0, 1]]


def test_per_vertex_colours(tmp_path):
    extra = "color Color { color [ 1 0 0, 0 1 0, 0 0 1 ] }"
    mesh = read_wrl(write(tmp_path, shape("0 0 0, 1 0 0, 0 1 0", "0 1 2 -1", extra)))
    assert mesh.colors.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]


def test_per_face_colours_are_ignored(tmp_path):
    extra = "colorPerVertex FALSE color Color { color [ 1 0 0 ] }"
    mesh = read_wrl(write(tmp_path, shape("0 0 0, 1 0 0, 0 1 0", "0 1 2 -1", extra)))
    assert mesh.colors is None


def test_def_use_shares_coordinates(tmp_path):
    text = (
        "#VRML V2.0 utf8\nShape { geometry IndexedFaceSet {\n"
        " coord DEF pts Coordinate { point [ 0 0 0, 1 0 0, 1 1 0, 0 1 0 ] }\n"
        " coordIndex [ 0 1 2 -1 ] } }\n"
        "Shape { geometry IndexedFaceSet { coord USE pts coordIndex [ 0 2 3 -1 ] } }\n"
    )
    mesh = read_wrl(write(tmp_path, text))
    assert mesh.n_vertices == 4
    assert mesh.faces.tolist() == [[0, 1, 2], [0, 2, 3]]


def test_vrml1_coordinate3(tmp_path):
    text = (
        "#VRML V1.0 ascii\nSeparator {\n Coordinate3 { point [ 0 0 0, 1 0 0, 1 1 0, 0 1 0 ] }\n"
        " TextureCoordinate2 { point [ 0 0, 1 0, 1 1, 0 1 ] }\n"
        " IndexedFaceSet { coordIndex [ 0, 1, 2, 3, -1 ] textureCoordIndex [ 0, 1, 2, 3, -1 ] }\n}\n"
    )
    mesh = load_mesh(write(tmp_path, text, "old.vrml"))
    assert mesh.faces.tolist() == [[0, 1, 2], [0, 2, 3]]
    assert mesh.uvs.tolist() == [[0, 0], [1, 0], [1, 1], [0, 1]]


def test_vrml1_face_sets_use_the_preceding_coordinates(tmp_path):
    text = (
        "#VRML V1.0 ascii\nSeparator { Coordinate3 { point [ 0 0 0, 1 0 0, 0 1 0 ] }\n"
        " IndexedFaceSet { coordIndex [ 0, 1, 2, -1 ] } }\n"
        "Separator { Coordinate3 { point [ 5 5 5, 6 5 5, 5 6 5, 6 6 5 ] }\n"
        " IndexedFaceSet { coordIndex [ 3, 2, 1, -1 ] } }\n"
    )
    mesh = read_wrl(write(tmp_path, text))
    assert mesh.n_vertices == 7
    assert mesh.faces.tolist() == [[0, 1, 2], [6, 5, 4]]


def test_image_texture_url(tmp_path):
    Image.fromarray(np.full((2, 2, 3), 5, np.uint8)).save(tmp_path / "scan.jpg")
    text = VRML2_QUADS.replace("material Material", 'texture ImageTexture { url [ "scan.jpg" ] } material Material')
    mesh = read_wrl(write(tmp_path, text), load_texture=True)
    assert mesh.texture_path == tmp_path / "scan.jpg"
    assert mesh.texture.shape == (2, 2, 3)


def test_point_set_only_is_a_point_cloud(tmp_path):
    text = "#VRML V2.0 utf8\nShape { geometry PointSet { coord Coordinate { point [ 1 2 3 4 5 6 ] } } }"
    mesh = read_wrl(write(tmp_path, text))
    assert mesh.vertices.tolist() == [[1, 2, 3], [4, 5, 6]] and mesh.faces.shape == (0, 3)


def test_large_scan_matches_arrays(tmp_path):
    rng = np.random.default_rng(0)
    points = rng.standard_normal((10_000, 3)).round(6)
    faces = rng.integers(0, 10_000, size=(20_000, 3))
    point_text = ",\n".join(" ".join(f"{x:.6f}" for x in p) for p in points)
    index_text = ", ".join(f"{a}, {b}, {c}, -1" for a, b, c in faces)
    mesh = read_wrl(write(tmp_path, shape(point_text, index_text)))
    assert np.array_equal(mesh.vertices, points)
    assert np.array_equal(mesh.faces, faces)
