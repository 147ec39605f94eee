"""Malformed mesh files raise MeshFormatError naming the file and the problem, never a numpy error."""

from __future__ import annotations

import numpy as np
import pytest

from facehd.errors import MeshFormatError
from facehd.io import Mesh, load_mesh, write_obj, write_ply

TRIANGLE = "v 0 0 0\nv 1 0 0\nv 0 1 0\n"
PLY_XYZ = "element vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
PLY_FACE = "element face 1\nproperty list uchar int vertex_indices\n"


def ply(body: str | bytes, header: str = PLY_XYZ + PLY_FACE, fmt: str = "ascii") -> bytes:
    head = f"ply\nformat {fmt} 1.0\n{header}end_header\n".encode()
    return head + (body.encode() if isinstance(body, str) else body)


def binary_triangle(n_bytes_cut: int = 0) -> bytes:
    data = np.zeros((3, 3), "<f4").tobytes() + bytes([3]) + np.array([0, 1, 2], "<i4").tobytes()
    return data[: len(data) - n_bytes_cut]


def wrl(points: str, index: str = "0 1 2 -1") -> str:
    return (
        "#VRML V2.0 utf8\nShape { geometry IndexedFaceSet { coord Coordinate { point [ "
        f"{points} ] }} coordIndex [ {index} ] }} }}\n"
    )


CASES = {
    # name: (file content, words the message must contain)
    "empty.obj": ("", ["empty"]),
    "blank.obj": ("  \n\n", ["empty"]),
    "comments_only.obj": ("# nothing\ng group\n", ["no vertices"]),
    "text_in_vertex.obj": (TRIANGLE + "v 1 x 2\n", ["non-numeric", "vertex 4"]),
    "short_vertex.obj": (TRIANGLE + "v 1 2\n", ["fewer than 3", "vertex 4"]),
    "nan.obj": ("v nan 0 0\nv 1 inf 0\nv 0 1 0\nf 1 2 3\n", ["2 of 3", "non-finite", "NaN"]),
    "index_high.obj": (TRIANGLE + "f 1 2 4\n", ["out of range", "face 1", "4", "defines 3 vertices"]),
    "index_zero.obj": (TRIANGLE + "f 0 1 2\n", ["out of range"]),
    "negative_too_far.obj": (TRIANGLE + "f -1 -2 -4\n", ["out of range"]),
    "uv_index_high.obj": (TRIANGLE + "vt 0 0\nf 1/1 2/1 3/2\n", ["range", "1 texture coordinates"]),
    "normal_index_high.obj": (TRIANGLE + "vn 0 0 1\nf 1//1 2//1 3//2\n", ["normal index out of range", "1 normals"]),
    "two_corner_face.obj": (TRIANGLE + "f 1 2\n", ["fewer than 3", "face 1"]),
    "text_in_face.obj": (TRIANGLE + "f 1 2 three\n", ["non-numeric", "three"]),
    "float_in_face.obj": (TRIANGLE + "f 1 2 3.0\n", ["malformed", "3.0"]),
    "empty.ply": (b"", ["empty"]),
    "not_ply.ply": ("solid cube\nfacet\n", ["not a PLY"]),
    "no_end_header.ply": ("ply\nformat ascii 1.0\nelement vertex 3\n", ["end_header"]),
    "middle_endian.ply": (
        ply("0 0 0\n", fmt="binary_middle_endian"),
        ["unsupported PLY format", "binary_middle_endian"],
    ),
    "no_format.ply": (b"ply\n" + PLY_XYZ.encode() + b"end_header\n", ["format"]),
    "bad_type.ply": (ply("", "element vertex 1\nproperty float128 x\n"), ["unsupported", "float128"]),
    "bad_count.ply": (ply("", "element vertex many\n"), ["malformed header", "many"]),
    "no_vertex.ply": (ply("", "element face 0\n" + PLY_FACE[15:]), ["no vertices"]),
    "zero_vertex.ply": (ply("", PLY_XYZ.replace("3", "0")), ["no vertices"]),
    "no_xyz.ply": (ply("1 2\n", "element vertex 1\nproperty float a\nproperty float b\n"), ["x, y, z"]),
    "ascii_few_vertices.ply": (ply("0 0 0\n1 0 0\n"), ["truncated", "3 'vertex'"]),
    "ascii_few_faces.ply": (ply("0 0 0\n1 0 0\n0 1 0\n3 0 1\n"), ["truncated", "'face'"]),
    "ascii_text.ply": (ply("0 0 0\n1 zero 0\n0 1 0\n3 0 1 2\n"), ["non-numeric", "zero"]),
    "ascii_float_index.ply": (ply("0 0 0\n1 0 0\n0 1 0\n3 0 1 1.5\n"), ["non-integer"]),
    "ascii_index_high.ply": (ply("0 0 0\n1 0 0\n0 1 0\n3 0 1 3\n"), ["out of range"]),
    "ascii_nan.ply": (ply("0 0 nan\n1 0 0\n0 1 0\n3 0 1 2\n"), ["1 of 3", "non-finite"]),
    "ascii_two_corners.ply": (ply("0 0 0\n1 0 0\n0 1 0\n2 0 1\n"), ["fewer than 3"]),
    "binary_short_vertices.ply": (
        ply(binary_triangle(20), fmt="binary_little_endian"),
        ["truncated", "'vertex'"],
    ),
    "binary_short_faces.ply": (
        ply(binary_triangle(3), fmt="binary_little_endian"),
        ["truncated", "'face'"],
    ),
    "binary_no_faces.ply": (ply(binary_triangle(13), fmt="binary_little_endian"), ["truncated"]),
    "empty.wrl": ("", ["empty"]),
    "no_points.wrl": ("#VRML V2.0 utf8\nShape { geometry Box { size 1 1 1 } }\n", ["point"]),
    "face_set_without_coord.wrl": (
        "#VRML V2.0 utf8\nShape { geometry IndexedFaceSet { coordIndex [ 0 1 2 -1 ] } }\n",
        ["missing 'point'"],
    ),
    "unterminated.wrl": (wrl("0 0 0, 1 0 0").split(", 1")[0], ["unterminated", "truncated"]),
    "unterminated_index.wrl": (wrl("0 0 0, 1 0 0, 0 1 0")[:-12], ["unterminated coordIndex"]),
    "text_point.wrl": (wrl("0 0 0, 1 zero 0, 0 1 0"), ["non-numeric", "zero"]),
    "two_coords.wrl": (wrl("0 0 0, 1 0 0, 0 1"), ["multiple of 3"]),
    "index_high.wrl": (wrl("0 0 0, 1 0 0, 0 1 0", "0 1 3 -1"), ["out of range", "3"]),
    "index_text.wrl": (wrl("0 0 0, 1 0 0, 0 1 0", "0 1 two -1"), ["non-integer", "two"]),
    "nan.wrl": (wrl("0 0 0, 1 0 0, 0 nan 0"), ["non-finite"]),
    "no_coord_index.wrl": (
        "#VRML V2.0 utf8\nShape { geometry IndexedFaceSet { coord Coordinate { point [ 0 0 0 ] } } }",
        ["coordIndex"],
    ),
    "bad_tex_index.wrl": (
        wrl("0 0 0, 1 0 0, 0 1 0").replace(
            "coordIndex", "texCoord TextureCoordinate { point [ 0 0 ] } texCoordIndex [ 0 0 -1 ] coordIndex"
        ),
        ["texCoordIndex", "match"],
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_file_message(tmp_path, name):
    content, words = CASES[name]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(MeshFormatError) as info:
        load_mesh(path)
    message = str(info.value)
    assert name in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert info.value.path == path


def fuzz_files(tmp_path) -> list:
    rng = np.random.default_rng(0)
    mesh = Mesh(
        rng.standard_normal((6, 3)),
        [[0, 1, 2], [2, 3, 4], [4, 5, 0]],
        uvs=rng.random((6, 2)),
        colors=rng.random((6, 3)),
    )
    write_obj(tmp_path / "m.obj", mesh)
    write_ply(tmp_path / "b.ply", mesh)
    write_ply(tmp_path / "a.ply", mesh, binary=False)
    (tmp_path / "m.wrl").write_text(
        wrl("0 0 0, 1 0 0, 1 1 0, 0 1 0", "0 1 2 3 -1").replace(
            "coordIndex",
            "texCoord TextureCoordinate { point [ 0 0, 1 0, 1 1 ] } texCoordIndex [ 0 1 2 0 -1 ] coordIndex",
        )
    )
    return [tmp_path / n for n in ("m.obj", "b.ply", "a.ply", "m.wrl")]


def test_truncated_or_corrupted_files_never_escape_as_other_errors(tmp_path):
    """Cut or flip bytes of valid files: each read returns a Mesh or raises MeshFormatError."""
    rng = np.random.default_rng(1)
    for source in fuzz_files(tmp_path):
        data = source.read_bytes()
        for trial in range(60):
            broken = bytearray(data[: rng.integers(0, len(data))] if trial % 2 else data)
            if trial % 2 == 0:
                for pos in rng.integers(0, len(broken), size=3):
                    broken[pos] = int(rng.integers(0, 256))
            path = tmp_path / f"fuzz{source.suffix}"
            path.write_bytes(bytes(broken))
            try:
                mesh = load_mesh(path)
            except MeshFormatError as exc:
                assert "fuzz" in str(exc)
            else:
                assert isinstance(mesh, Mesh)
