"""Stanford PLY reading (ASCII, binary little and big endian) and writing."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facehd.errors import InputError, MeshFormatError
from facehd.fsutil import atomic_open
from facehd.io.mesh import (
    _METADATA_KEY,
    Mesh,
    _build_mesh,
    _colors_to_unit,
    _fan_corners,
    _fan_triangles,
    _metadata_lines,
    _parse_numbers,
    _read_texture,
    _resolve_texture,
    _texture_image,
    _write_png,
)

_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip
_FORMATS = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}
_UV_NAMES = (("s", "t"), ("u", "v"), ("texture_u", "texture_v"), ("texture_s", "texture_t"))
_COLOR_NAMES = (("red", "green", "blue"), ("r", "g", "b"), ("diffuse_red", "diffuse_green", "diffuse_blue"))
_FACE_LISTS = ("vertex_indices", "vertex_index")
_END_HEADER = re.compile(rb"[\r\n]end_header[ \t]*(?:\r\n|\n|\r|$)")
# MeshLab's convention for naming the texture image in a header comment.
_TEXTURE_COMMENT = "TextureFile"


@dataclass
class _Property:
    name: str
    dtype: str  # numpy type code without byte order, e.g. "f4"
    count_dtype: str | None = None  # list length type; None for a scalar property


@dataclass
class _Element:
    name: str
    count: int
    properties: list[_Property] = field(default_factory=list)


@dataclass
class _Header:
    endian: str | None  # "<" or ">"; None for ASCII
    elements: list[_Element]
    comments: list[str]
    data_offset: int


# A parsed element: scalar property -> (n,) array; list property -> (flat values, lengths).
_Columns = dict[str, "np.ndarray | tuple[np.ndarray, np.ndarray]"]


def read_ply(path: str | Path, *, load_texture: bool = False) -> Mesh:
    """Read a PLY mesh or point cloud (ASCII or binary, either byte order) into a `Mesh`.

    Uses the ``vertex`` element's x y z, optional nx ny nz, red green blue (uchar scaled by
    1/255; float taken as [0, 1], or 0..255 when any exceeds 1) and s t / u v / texture_u
    texture_v, and the ``face`` element's ``vertex_indices`` (or ``vertex_index``) lists, fan
    triangulated as (0, 1, 2), (0, 2, 3), ... Other elements and properties are skipped. Header
    comments ``comment key value`` become metadata; ``comment TextureFile name`` sets the
    texture. No face element gives a point cloud with (0, 3) faces.
    """
    path = Path(path)
    data = path.read_bytes()
    if not data.strip():
        raise MeshFormatError(path, "empty file")
    header = _parse_header(path, data)
    if header.endian is None:
        columns = _read_ascii_body(path, data, header)
    else:
        columns = _read_binary_body(path, data, header)
    return _assemble(path, header, columns, load_texture)


def write_ply(
    path: str | Path,
    mesh: Mesh,
    *,
    binary: bool = True,
    double: bool = False,
    write_texture: bool = True,
) -> None:
    """Write ``mesh`` as PLY, atomically: binary little endian by default, else ASCII.

    Positions, normals and UVs (as ``s t``) are stored as float, or double with ``double``;
    colours as uchar; faces as ``list uchar int vertex_indices``. Metadata becomes
    ``comment key value`` header lines. A texture (array or existing ``texture_path``) is
    written beside as ``<stem>.png`` and named by a ``comment TextureFile`` line.
    """
    path = Path(path)
    if mesh.n_vertices >= 2**31:
        raise InputError(f"{path}: too many vertices for int32 PLY face indices")
    ftype, fcode = ("double", "f8") if double else ("float", "f4")
    comments = [f"comment {key} {value}".rstrip() for key, value in _metadata_lines(mesh)]
    image = _texture_image(mesh) if write_texture else None
    if image is not None:
        png = path.with_suffix(".png")
        _write_png(png, image)
        comments.append(f"comment {_TEXTURE_COMMENT} {png.name}")

    columns: list[tuple[str, str, str, np.ndarray]] = []  # (ply type, name, numpy code, values)
    names = ["x", "y", "z"]
    columns += [(ftype, n, fcode, mesh.vertices[:, i]) for i, n in enumerate(names)]
    if mesh.normals is not None:
        columns += [(ftype, n, fcode, mesh.normals[:, i]) for i, n in enumerate(("nx", "ny", "nz"))]
    if mesh.colors is not None:
        rgb = np.round(mesh.colors * 255.0).astype(np.uint8)
        columns += [("uchar", n, "u1", rgb[:, i]) for i, n in enumerate(_COLOR_NAMES[0])]
    if mesh.uvs is not None:
        columns += [(ftype, n, fcode, mesh.uvs[:, i]) for i, n in enumerate(_UV_NAMES[0])]

    lines = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0", *comments]
    lines.append(f"element vertex {mesh.n_vertices}")
    lines += [f"property {ptype} {name}" for ptype, name, _, _ in columns]
    lines.append(f"element face {mesh.n_faces}")
    lines.append("property list uchar int vertex_indices")
    lines.append("end_header")
    header = ("\n".join(lines) + "\n").encode("utf-8")

    with atomic_open(path, "wb") as fh:
        fh.write(header)
        if binary:
            vertex = np.empty(mesh.n_vertices, dtype=[(n, "<" + c) for _, n, c, _ in columns])
            for _, name, _, values in columns:
                vertex[name] = values
            face = np.empty(mesh.n_faces, dtype=[("n", "u1"), ("i", "<i4", (3,))])
            face["n"] = 3
            face["i"] = mesh.faces
            fh.write(vertex.tobytes())
            fh.write(face.tobytes())
        else:
            fh.write(_ascii_vertex_rows(columns, double).encode("ascii"))
            fh.write("".join(f"3 {a} {b} {c}\n" for a, b, c in mesh.faces.tolist()).encode())


# --- header -----------------------------------------------------------------------------------


def _parse_header(path: Path, data: bytes) -> _Header:
    if not data.startswith(b"ply"):
        raise MeshFormatError(path, "not a PLY file (missing 'ply' magic line)")
    # The first line that is exactly end_header (a comment may mention the word).
    end = _END_HEADER.search(data)
    if end is None:
        raise MeshFormatError(path, "header has no end_header line (truncated or not a PLY file)")
    offset = end.end()
    endian = ""
    elements: list[_Element] = []
    comments: list[str] = []
    for raw in data[: end.start()].decode("utf-8", errors="replace").splitlines()[1:]:
        parts = raw.split()
        if not parts or parts[0] == "obj_info":
            continue
        if parts[0] == "comment":
            comments.append(raw.strip()[len("comment") :].strip())
        elif parts[0] == "format":
            if len(parts) != 3 or parts[1] not in _FORMATS or not parts[2].startswith("1"):
                raise MeshFormatError(path, f"unsupported PLY format {' '.join(parts[1:])!r}")
            endian = _FORMATS[parts[1]]
        elif parts[0] == "element" and len(parts) == 3:
            try:
                count = int(parts[2])
            except ValueError:
                count = -1
            if count < 0:
                raise MeshFormatError(path, f"malformed header line {raw.strip()!r}")
            elements.append(_Element(parts[1], count))
        elif parts[0] == "property" and elements:
            elements[-1].properties.append(_parse_property(path, parts, raw))
        else:
            raise MeshFormatError(path, f"malformed header line {raw.strip()!r}")
    if endian == "":
        raise MeshFormatError(path, "header has no format line")
    return _Header(endian, elements, comments, offset)


def _parse_property(path: Path, parts: list[str], raw: str) -> _Property:
    if len(parts) == 5 and parts[1] == "list":
        types = parts[2:4]
    elif len(parts) == 3:
        types = parts[1:2]
    else:
        raise MeshFormatError(path, f"malformed header line {raw.strip()!r}")
    for t in types:
        if t not in _TYPES:
            raise MeshFormatError(path, f"unsupported property type {t!r} in {raw.strip()!r}")
    if len(types) == 2:
        return _Property(parts[4], _TYPES[types[1]], _TYPES[types[0]])
    return _Property(parts[2], _TYPES[types[0]])


# --- binary body ------------------------------------------------------------------------------


def _read_binary_body(path: Path, data: bytes, header: _Header) -> dict[str, _Columns]:
    offset = header.data_offset
    out: dict[str, _Columns] = {}
    for element in header.elements:
        columns, offset = _read_binary_element(path, data, offset, element, header.endian)
        out.setdefault(element.name, columns)
    return out


def _read_binary_element(path: Path, data: bytes, offset: int, element: _Element, endian: str) -> tuple[_Columns, int]:
    """Parse one element's records with a structured dtype; lists need a uniform length.

    List properties are read in bulk assuming every record has the first record's list
    lengths; if any record disagrees the element is re-read record by record.
    """
    n = element.count
    if n == 0:
        return {p.name: _empty_column(p) for p in element.properties}, offset
    lengths = _first_record_lengths(path, data, offset, element, endian)
    fields = []
    for i, p in enumerate(element.properties):
        if p.count_dtype is not None:
            fields.append((f"n{i}", endian + p.count_dtype))
            fields.append((f"p{i}", endian + p.dtype, (lengths[i],)))
        else:
            fields.append((f"p{i}", endian + p.dtype))
    dtype = np.dtype(fields)
    if offset + n * dtype.itemsize <= len(data):
        table = np.frombuffer(data, dtype=dtype, count=n, offset=offset)
        uniform = all(
            (table[f"n{i}"] == lengths[i]).all() for i, p in enumerate(element.properties) if p.count_dtype is not None
        )
        if uniform:
            columns: _Columns = {}
            for i, p in enumerate(element.properties):
                values = table[f"p{i}"]
                if p.count_dtype is not None:
                    columns[p.name] = (values.reshape(-1), np.full(n, lengths[i], dtype=np.int64))
                else:
                    columns[p.name] = values
            return columns, offset + n * dtype.itemsize
    if all(p.count_dtype is None for p in element.properties):
        have = (len(data) - offset) // dtype.itemsize
        raise MeshFormatError(
            path,
            f"truncated: element '{element.name}' needs {n} records of {dtype.itemsize} bytes "
            f"but the file holds only {have}",
        )
    return _read_binary_element_slow(path, data, offset, element, endian)


def _first_record_lengths(path: Path, data: bytes, offset: int, element: _Element, endian: str) -> dict[int, int]:
    """List lengths of an element's first record, by property position."""
    lengths = {}
    for i, p in enumerate(element.properties):
        if p.count_dtype is None:
            offset += np.dtype(p.dtype).itemsize
            continue
        count = _unpack(path, data, offset, endian + p.count_dtype, element)
        if count < 0:
            raise MeshFormatError(path, f"negative list length {count} in element '{element.name}'")
        lengths[i] = int(count)
        offset += np.dtype(p.count_dtype).itemsize + int(count) * np.dtype(p.dtype).itemsize
        if offset > len(data):
            raise MeshFormatError(path, f"truncated: binary data ends inside element '{element.name}'")
    return lengths


def _read_binary_element_slow(
    path: Path, data: bytes, offset: int, element: _Element, endian: str
) -> tuple[_Columns, int]:
    """Record-by-record parse for list properties whose lengths vary."""
    scalars: dict[str, list] = {p.name: [] for p in element.properties if p.count_dtype is None}
    lists: dict[str, tuple[list, list]] = {p.name: ([], []) for p in element.properties if p.count_dtype is not None}
    steps = []
    for p in element.properties:
        size = np.dtype(p.dtype).itemsize
        code = _struct_code(p.dtype)
        if p.count_dtype is None:
            steps.append((p.name, None, 0, struct.Struct(endian + code), size))
        else:
            count_size = np.dtype(p.count_dtype).itemsize
            count = struct.Struct(endian + _struct_code(p.count_dtype))
            steps.append((p.name, count, count_size, code, size))
    try:
        for _ in range(element.count):
            for name, count, count_size, code, size in steps:
                if count is None:
                    scalars[name].append(code.unpack_from(data, offset)[0])
                    offset += size
                else:
                    k = count.unpack_from(data, offset)[0]
                    if k < 0:
                        raise MeshFormatError(path, f"negative list length {k} in element '{element.name}'")
                    offset += count_size
                    values, lengths = lists[name]
                    values.extend(struct.unpack_from(f"{endian}{k}{code}", data, offset))
                    lengths.append(k)
                    offset += k * size
    except struct.error:
        raise MeshFormatError(path, f"truncated: binary data ends inside element '{element.name}'") from None
    props = {p.name: p for p in element.properties}
    columns: _Columns = {name: np.array(v, dtype=props[name].dtype) for name, v in scalars.items()}
    for name, (values, lengths) in lists.items():
        columns[name] = (np.array(values, dtype=props[name].dtype), np.array(lengths, dtype=np.int64))
    return columns, offset


def _struct_code(code: str) -> str:
    return {"i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I", "f4": "f", "f8": "d"}[code]


def _unpack(path: Path, data: bytes, offset: int, code: str, element: _Element):
    size = np.dtype(code).itemsize
    if offset + size > len(data):
        raise MeshFormatError(path, f"truncated: binary data ends inside element '{element.name}'")
    return np.frombuffer(data, dtype=code, count=1, offset=offset)[0]


def _empty_column(p: _Property):
    if p.count_dtype is None:
        return np.zeros(0, dtype=p.dtype)
    return np.zeros(0, dtype=p.dtype), np.zeros(0, dtype=np.int64)


# --- ASCII body -------------------------------------------------------------------------------


def _read_ascii_body(path: Path, data: bytes, header: _Header) -> dict[str, _Columns]:
    tokens = data[header.data_offset :].decode("ascii", errors="replace").split()
    pos = 0
    out: dict[str, _Columns] = {}
    for element in header.elements:
        columns, pos = _read_ascii_element(path, tokens, pos, element)
        out.setdefault(element.name, columns)
    return out


def _read_ascii_element(path: Path, tokens: list[str], pos: int, element: _Element) -> tuple[_Columns, int]:
    """Parse one element from the token stream; uniform records are parsed in bulk."""
    n = element.count
    if n == 0:
        return {p.name: _empty_column(p) for p in element.properties}, pos
    # Record length from the first record's list lengths; valid for all records if uniform.
    width, cursor, lengths = 0, pos, {}
    for i, p in enumerate(element.properties):
        if p.count_dtype is None:
            width += 1
            cursor += 1
            continue
        k = _ascii_int(path, tokens, cursor, element)
        lengths[i] = k
        width += 1 + k
        cursor += 1 + k
    if pos + n * width <= len(tokens):
        table = _ascii_numbers(path, tokens[pos : pos + n * width], element).reshape(n, width)
        col, columns, uniform = 0, {}, True
        for i, p in enumerate(element.properties):
            if p.count_dtype is None:
                columns[p.name] = _typed(path, table[:, col], p, element)
                col += 1
                continue
            if not (table[:, col] == lengths[i]).all():
                uniform = False
                break
            values = _typed(path, table[:, col + 1 : col + 1 + lengths[i]].reshape(-1), p, element)
            columns[p.name] = (values, np.full(n, lengths[i], dtype=np.int64))
            col += 1 + lengths[i]
        if uniform:
            return columns, pos + n * width
    if not lengths:
        raise _ascii_truncated(path, element, (len(tokens) - pos) // max(width, 1))
    return _read_ascii_element_slow(path, tokens, pos, element)


def _read_ascii_element_slow(path: Path, tokens: list[str], pos: int, element: _Element) -> tuple[_Columns, int]:
    scalars: dict[str, list] = {p.name: [] for p in element.properties if p.count_dtype is None}
    lists: dict[str, tuple[list, list]] = {p.name: ([], []) for p in element.properties if p.count_dtype is not None}
    for record in range(element.count):
        for p in element.properties:
            if pos >= len(tokens):
                raise _ascii_truncated(path, element, record)
            if p.count_dtype is None:
                scalars[p.name].append(tokens[pos])
                pos += 1
                continue
            k = _ascii_int(path, tokens, pos, element)
            if pos + 1 + k > len(tokens):
                raise _ascii_truncated(path, element, record)
            values, lengths = lists[p.name]
            values.extend(tokens[pos + 1 : pos + 1 + k])
            lengths.append(k)
            pos += 1 + k
    props = {p.name: p for p in element.properties}
    columns: _Columns = {
        n: _typed(path, _ascii_numbers(path, v, element), props[n], element) for n, v in scalars.items()
    }
    for name, (values, lengths) in lists.items():
        values = _typed(path, _ascii_numbers(path, values, element), props[name], element)
        columns[name] = (values, np.array(lengths, dtype=np.int64))
    return columns, pos


def _typed(path: Path, values: np.ndarray, p: _Property, element: _Element) -> np.ndarray:
    """ASCII numbers (parsed as float64) in their declared type, so ASCII and binary agree."""
    if np.dtype(p.dtype).kind == "f":
        with np.errstate(over="ignore"):  # too large for float32: inf, reported as non-finite
            return values.astype(p.dtype)
    if values.size and not (np.isfinite(values).all() and (values == np.round(values)).all()):
        raise MeshFormatError(path, f"non-integer value for integer property '{p.name}' of element '{element.name}'")
    info = np.iinfo(p.dtype)
    if values.size and (values.min() < info.min or values.max() > info.max):
        raise MeshFormatError(path, f"value out of range for {p.dtype} property '{p.name}' of element '{element.name}'")
    return values.astype(p.dtype)


def _ascii_numbers(path: Path, tokens: list[str], element: _Element) -> np.ndarray:
    numbers = _parse_numbers(" ".join(tokens))
    if numbers is None or numbers.size != len(tokens):
        bad = next((t for t in tokens if not _is_number(t)), "?")
        raise MeshFormatError(path, f"non-numeric value {bad!r} in element '{element.name}'")
    return numbers


def _ascii_int(path: Path, tokens: list[str], pos: int, element: _Element) -> int:
    if pos >= len(tokens):
        raise _ascii_truncated(path, element, None)
    try:
        k = int(tokens[pos])
    except ValueError:
        raise MeshFormatError(path, f"non-numeric list length {tokens[pos]!r} in element '{element.name}'") from None
    if k < 0:
        raise MeshFormatError(path, f"negative list length {k} in element '{element.name}'")
    return k


def _ascii_truncated(path: Path, element: _Element, found: int | None) -> MeshFormatError:
    got = "" if found is None else f", found {found}"
    return MeshFormatError(path, f"truncated: header declares {element.count} '{element.name}' records{got}")


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


# --- mesh assembly ----------------------------------------------------------------------------


def _assemble(path: Path, header: _Header, elements: dict[str, _Columns], load_texture) -> Mesh:
    vertex = elements.get("vertex")
    if vertex is None:
        raise MeshFormatError(path, "no vertices found (no 'vertex' element)")
    xyz = _scalar_columns(path, vertex, ("x", "y", "z"))
    if xyz is None:
        raise MeshFormatError(path, "vertex element has no x, y, z properties")
    normals = _scalar_columns(path, vertex, ("nx", "ny", "nz"))
    uvs = next((c for c in (_scalar_columns(path, vertex, n) for n in _UV_NAMES) if c is not None), None)
    colors = None
    for names in _COLOR_NAMES:
        if all(n in vertex and not isinstance(vertex[n], tuple) for n in names):
            colors = _unit_colors([vertex[n] for n in names])
            break

    faces = np.zeros((0, 3), dtype=np.int64)
    if "face" in elements:
        faces = _face_triangles(path, elements["face"])

    metadata, texture_path = {}, None
    for comment in header.comments:
        key, _, value = comment.partition(" ")
        key, value = key.rstrip(":"), value.strip()
        if key == _TEXTURE_COMMENT:
            texture_path = _resolve_texture(path.parent, value)
        elif _METADATA_KEY.match(key):
            metadata[key] = value
    return _build_mesh(
        path,
        vertices=xyz,
        faces=faces,
        uvs=uvs,
        normals=normals,
        colors=colors,
        texture_path=texture_path,
        texture=_read_texture(texture_path) if load_texture and texture_path else None,
        metadata=metadata,
    )


def _scalar_columns(path: Path, columns: _Columns, names) -> np.ndarray | None:
    if not all(n in columns for n in names):
        return None
    if any(isinstance(columns[n], tuple) for n in names):
        raise MeshFormatError(path, f"vertex properties {' '.join(names)} must not be lists")
    return np.stack([np.asarray(columns[n], dtype=np.float64) for n in names], axis=1)


def _unit_colors(channels: list[np.ndarray]) -> np.ndarray:
    """Colours in [0, 1]: integer channels are scaled by their type's maximum."""
    rgb = np.stack(channels, axis=1)
    if rgb.dtype.kind in "iu":
        return np.clip(rgb / np.iinfo(rgb.dtype).max, 0.0, 1.0)
    return _colors_to_unit(rgb)


def _face_triangles(path: Path, face: _Columns) -> np.ndarray:
    """Triangles (T, 3) int64 from the face element's index lists, fan triangulated."""
    name = next((n for n in _FACE_LISTS if n in face), None)
    if name is None:
        name = next((n for n, c in face.items() if isinstance(c, tuple)), None)
    if name is None or not isinstance(face[name], tuple):
        raise MeshFormatError(path, "face element has no vertex_indices list property")
    values, lengths = face[name]
    if values.dtype.kind == "f":
        # ASCII values are parsed as floats; indices must still be whole numbers.
        if values.size and not np.all(values == np.round(values)):
            raise MeshFormatError(path, "non-integer vertex index in face element")
    values = values.astype(np.int64)
    if lengths.size and lengths.min() < 3:
        bad = int(np.flatnonzero(lengths < 3)[0])
        raise MeshFormatError(path, f"face {bad} has fewer than 3 vertices ({int(lengths[bad])} given)")
    if lengths.size and (lengths == lengths[0]).all():
        return _fan_triangles(values.reshape(lengths.size, int(lengths[0])))
    return values[_fan_corners(np.cumsum(lengths) - lengths, lengths)]


# --- writing ----------------------------------------------------------------------------------


def _ascii_vertex_rows(columns: list[tuple[str, str, str, np.ndarray]], double: bool) -> str:
    # %.9g reads back as the same float32, %.17g as the same float64.
    float_format = "%.17g" if double else "%.9g"
    fmt = " ".join("%d" if code == "u1" else float_format for _, _, code, _ in columns) + "\n"
    values = [
        (v if code == "u1" else v.astype(np.float32 if code == "f4" else np.float64)).tolist()
        for _, _, code, v in columns
    ]
    return "".join(fmt % row for row in zip(*values, strict=True))
