"""VRML 1.0 / 2.0 (.wrl) reading of IndexedFaceSet meshes, e.g. MICC Florence ground-truth scans."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facehd.errors import MeshFormatError
from facehd.io.mesh import (
    Mesh,
    _build_mesh,
    _colors_to_unit,
    _fan_corners,
    _gather_rows,
    _parse_numbers,
    _read_texture,
    _resolve_texture,
    _split_corner_attribute,
)

# Every pattern starts with a literal word: Python's re then scans for it in C, while a leading
# \b or optional group makes it try each position of a 10 MB scan (about 100x slower).
_COMMENT = re.compile(r"#[^\n\r]*")
# Each list pattern captures the bracket contents; its `open` twin finds lists that never close.
_COORD = re.compile(r"Coordinate3?\s*\{\s*point\s*\[([^\]]*)\]")
_COORD_OPEN = re.compile(r"Coordinate3?\s*\{\s*point\s*\[")
_TEXCOORD = re.compile(r"TextureCoordinate2?\s*\{\s*point\s*\[([^\]]*)\]")
_COLOR = re.compile(r"Color\s*\{\s*color\s*\[([^\]]*)\]")
_DEF_BEFORE = re.compile(r"DEF\s+([^\s{}\[\]]+)\s+$")
_COORD_INDEX = re.compile(r"coordIndex\s*\[([^\]]*)\]")
_COORD_INDEX_OPEN = re.compile(r"coordIndex\s*\[")
# texCoordIndex (VRML 2.0) and textureCoordIndex (1.0); coordIndex has a lower-case c.
_TEX_INDEX = re.compile(r"CoordIndex\s*\[([^\]]*)\]")
_COLOR_INDEX = re.compile(r"colorIndex\s*\[([^\]]*)\]")
_PER_FACE_COLOR = re.compile(r"colorPerVertex\s+FALSE")
_USE = {
    "coord": re.compile(r"coord\s+USE\s+([^\s{}\[\]]+)"),
    "texCoord": re.compile(r"texCoord\s+USE\s+([^\s{}\[\]]+)"),
    "color": re.compile(r"color\s+USE\s+([^\s{}\[\]]+)"),
}
# A face set's fields lie between its keyword and the next geometry node.
_GEOMETRY = ("IndexedFaceSet", "IndexedLineSet", "PointSet")
_TEXTURE_URLS = (
    re.compile(r'ImageTexture\s*\{[^}]*?url\s*\[?\s*"([^"]+)"'),
    re.compile(r'Texture2\s*\{[^}]*?filename\s*"([^"]+)"'),
)


@dataclass
class _Block:
    """One numeric list node (point or color list) and where its rows land in the mesh."""

    start: int
    name: str | None
    content: str
    rows: np.ndarray | None = None  # parsed lazily: only blocks some face set uses
    offset: int = -1  # first row in the concatenated mesh arrays; -1 while unused


@dataclass
class _FaceSet:
    coord: _Block
    tri_v: np.ndarray  # (T, 3) rows of `coord`
    texcoord: _Block | None = None
    tri_vt: np.ndarray | None = None
    colors: np.ndarray | None = None  # per row of `coord`


@dataclass
class _Blocks:
    items: list[_Block] = field(default_factory=list)

    def named(self, name: str) -> _Block | None:
        return next((b for b in reversed(self.items) if b.name == name), None)

    def inside(self, start: int, end: int) -> _Block | None:
        return next((b for b in self.items if start <= b.start < end), None)

    def before(self, pos: int) -> _Block | None:
        return next((b for b in reversed(self.items) if b.start < pos), None)


def read_wrl(path: str | Path, *, load_texture: bool = False) -> Mesh:
    """Read the IndexedFaceSet geometry of a VRML 1.0 or 2.0 file into a `Mesh`.

    Reads ``Coordinate { point [...] }`` (VRML 2.0) or ``Coordinate3`` (VRML 1.0) with
    ``coordIndex`` -1-terminated polygons (fan triangulated as (0, 1, 2), (0, 2, 3), ...;
    polygons of fewer than 3 corners are dropped), optional ``TextureCoordinate`` +
    ``texCoordIndex`` (or ``TextureCoordinate2`` + ``textureCoordIndex``) and per-vertex
    ``Color``. Several shapes are concatenated, each coordinate list once; DEF/USE of
    coordinate nodes is followed. Per-corner UVs split vertices as in `read_obj`
    (``mesh.source_vertex`` then indexes the concatenated point lists). UVs and colours are
    kept only when every face set has them. A file without face sets gives a point cloud.
    """
    path = Path(path)
    raw = path.read_bytes().decode("utf-8", errors="replace")
    if not raw.strip():
        raise MeshFormatError(path, "empty file")
    text = _COMMENT.sub(" ", raw)
    for complete, opening, what in (
        (_COORD, _COORD_OPEN, "point"),
        (_COORD_INDEX, _COORD_INDEX_OPEN, "coordIndex"),
    ):
        if len(opening.findall(text)) != len(complete.findall(text)):
            raise MeshFormatError(path, f"unterminated {what} list (truncated file?)")

    coords = _blocks(_COORD, text)
    texcoords = _blocks(_TEXCOORD, text)
    colors = _blocks(_COLOR, text)
    vrml1 = "Coordinate3" in text
    face_sets = []
    geometry = sorted(
        (m.start(), kind) for kind in _GEOMETRY for m in re.finditer(kind, text) if _starts_word(text, m.start())
    )
    for (start, kind), (end, _) in itertools.pairwise([*geometry, (len(text), "")]):
        if kind == "IndexedFaceSet":
            face_sets.append(_face_set(path, text, start, end, coords, texcoords, colors, vrml1))
    if not coords.items:
        raise MeshFormatError(path, "missing 'point' list: no Coordinate node found")
    if not face_sets:
        # A point cloud: every point list, no faces.
        for block in coords.items:
            _rows(path, block, 3, "point")
            _place(block, coords)
    return _assemble(path, text, coords, texcoords, face_sets, load_texture)


def _blocks(pattern: re.Pattern, text: str) -> _Blocks:
    """The list nodes a pattern finds, with the name a preceding ``DEF name`` gives them."""
    blocks = []
    for m in pattern.finditer(text):
        if _starts_word(text, m.start()):  # `Coordinate` inside `TextureCoordinate` is not one
            name = _DEF_BEFORE.search(text, max(0, m.start() - 256), m.start())
            blocks.append(_Block(m.start(), name.group(1) if name else None, m.group(1)))
    return _Blocks(blocks)


def _starts_word(text: str, pos: int) -> bool:
    return pos == 0 or not (text[pos - 1].isalnum() or text[pos - 1] == "_")


def _face_set(
    path: Path,
    text: str,
    start: int,
    end: int,
    coords: _Blocks,
    texcoords: _Blocks,
    colors: _Blocks,
    vrml1: bool,
) -> _FaceSet:
    """Parse one IndexedFaceSet whose fields lie in ``text[start:end]``."""
    chunk = text[start:end]
    coord = _node(chunk, start, end, coords, "coord", vrml1)
    if coord is None:
        raise MeshFormatError(path, "missing 'point' list: IndexedFaceSet has no Coordinate")
    points = _rows(path, coord, 3, "point")
    index_match = _COORD_INDEX.search(chunk)
    if index_match is None:
        raise MeshFormatError(path, "IndexedFaceSet has no coordIndex list")
    index = _indices(path, index_match.group(1), "coordIndex")
    corners = _polygon_corners(index)
    tri_v = index[corners]
    _check_range(path, tri_v, len(points), "coordIndex", "points")
    out = _FaceSet(coord, tri_v)

    texcoord = _node(chunk, start, end, texcoords, "texCoord", vrml1)
    if texcoord is not None:
        uv = _rows(path, texcoord, 2, "TextureCoordinate point")
        tex_match = _TEX_INDEX.search(chunk)
        tex_index = index if tex_match is None else _indices(path, tex_match.group(1), "texCoordIndex")
        if tex_index.shape != index.shape or not np.array_equal(tex_index < 0, index < 0):
            raise MeshFormatError(path, "texCoordIndex does not match the coordIndex polygons")
        out.texcoord, out.tri_vt = texcoord, tex_index[corners]
        _check_range(path, out.tri_vt, len(uv), "texCoordIndex", "texture coordinates")

    color = None if _PER_FACE_COLOR.search(chunk) else _node(chunk, start, end, colors, "color", False)
    if color is not None:
        rgb = _rows(path, color, 3, "Color")
        color_match = _COLOR_INDEX.search(chunk)
        if color_match is None:
            if len(rgb) >= len(points):
                out.colors = rgb[: len(points)]
        else:
            color_index = _indices(path, color_match.group(1), "colorIndex")
            if color_index.shape == index.shape:
                tri_c = color_index[corners]
                _check_range(path, tri_c, len(rgb), "colorIndex", "colours")
                per_point = np.zeros((len(points), 3))
                per_point[tri_v.ravel()] = rgb[tri_c.ravel()]
                out.colors = per_point
    return out


def _node(chunk: str, start: int, end: int, blocks: _Blocks, field_name: str, vrml1: bool):
    """The node a face set uses: its own or a USEd DEF (VRML 2.0), the latest before it (1.0)."""
    if vrml1:
        # VRML 1.0 nodes are state: the face set uses the last one that precedes it.
        return blocks.before(start)
    own = blocks.inside(start, end)
    if own is not None:
        return own
    use = _USE[field_name].search(chunk)
    return None if use is None else blocks.named(use.group(1))


def _rows(path: Path, block: _Block, width: int, what: str) -> np.ndarray:
    if block.rows is None:
        content = block.content.replace(",", " ")
        numbers = _parse_numbers(content)
        if numbers is None:
            bad = next((t for t in content.split() if not _is_number(t)), "?")
            raise MeshFormatError(path, f"non-numeric value {bad!r} in {what} list")
        if numbers.size % width:
            raise MeshFormatError(path, f"{what} list has {numbers.size} numbers, not a multiple of {width}")
        block.rows = numbers.reshape(-1, width)
    return block.rows


def _indices(path: Path, content: str, what: str) -> np.ndarray:
    numbers = _parse_numbers(content.replace(",", " "), np.int64)
    if numbers is None:
        bad = next((t for t in content.replace(",", " ").split() if not t.lstrip("-").isdigit()), "?")
        raise MeshFormatError(path, f"non-integer value {bad!r} in {what} list")
    if numbers.size and numbers.min() < -1:
        raise MeshFormatError(path, f"invalid negative index {numbers.min()} in {what} list")
    return numbers


def _polygon_corners(index: np.ndarray) -> np.ndarray:
    """(T, 3) positions into a -1-terminated polygon index list (last -1 optional)."""
    ends = np.flatnonzero(index == -1)
    if index.size and index[-1] != -1:
        ends = np.append(ends, index.size)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    return _fan_corners(starts, ends - starts)


def _check_range(path: Path, tri: np.ndarray, n: int, what: str, rows: str) -> None:
    bad = (tri < 0) | (tri >= n)
    if bad.any():
        raise MeshFormatError(
            path,
            f"{what} index out of range: {int(bad.sum())} corners use an index outside "
            f"[0, {n}), e.g. {int(tri[bad][0])}, but the list has {n} {rows}",
        )


def _place(block: _Block, blocks: _Blocks) -> None:
    """Give ``block`` its rows' offset in the concatenated arrays on first use."""
    if block.offset < 0:
        used = [b for b in blocks.items if b.offset >= 0]
        block.offset = sum(len(b.rows) for b in used)


def _assemble(path, text, coords, texcoords, face_sets, load_texture) -> Mesh:
    for fs in face_sets:
        _place(fs.coord, coords)
        if fs.texcoord is not None:
            _place(fs.texcoord, texcoords)
    used = sorted((b for b in coords.items if b.offset >= 0), key=lambda b: b.offset)
    vertices = np.concatenate([b.rows for b in used])
    faces = np.concatenate([fs.tri_v + fs.coord.offset for fs in face_sets] or [np.zeros((0, 3), dtype=np.int64)])

    colors = None
    if face_sets and all(fs.colors is not None for fs in face_sets):
        colors = np.zeros_like(vertices)
        for fs in face_sets:
            colors[fs.coord.offset : fs.coord.offset + len(fs.coord.rows)] = fs.colors
        colors = _colors_to_unit(colors)

    uvs, source = None, None
    if face_sets and all(fs.tri_vt is not None for fs in face_sets):
        uv_table = np.concatenate(
            [b.rows for b in sorted((b for b in texcoords.items if b.offset >= 0), key=lambda b: b.offset)]
        )
        tri_vt = np.concatenate([fs.tri_vt + fs.texcoord.offset for fs in face_sets])
        faces, uv_of_vertex, source = _split_corner_attribute(faces, tri_vt, len(vertices))
        uvs = _gather_rows(uv_table, uv_of_vertex)
        if source is not None:
            vertices = vertices[source]
            colors = None if colors is None else colors[source]

    texture_path = None
    for pattern in _TEXTURE_URLS:
        for match in pattern.finditer(text):
            texture_path = texture_path or _resolve_texture(path.parent, match.group(1))
    return _build_mesh(
        path,
        vertices=vertices,
        faces=faces.astype(np.int64),
        uvs=uvs,
        colors=colors,
        texture_path=texture_path,
        texture=_read_texture(texture_path) if load_texture and texture_path else None,
        source_vertex=source,
    )


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True
