"""Wavefront OBJ reading and writing: positions, vertex colours, UVs, normals and an MTL texture."""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facehd.errors import MeshFormatError
from facehd.fsutil import atomic_open
from facehd.io.mesh import (
    Mesh,
    _build_mesh,
    _colors_to_unit,
    _fan_corners,
    _fan_triangles,
    _gather_rows,
    _metadata_lines,
    _parse_numbers,
    _read_texture,
    _resolve_texture,
    _split_corner_attribute,
    _texture_image,
    _write_png,
)

# Header comments of the form `# key: value` before the first data line are mesh metadata.
_HEADER_METADATA = re.compile(r"^#\s*([A-Za-z_][\w.-]*)\s*:\s*(.*?)\s*$")
# Deleting the digits and signs of a face's corners leaves their slash skeletons, e.g. "// // //".
_DELETE_NUMBERS = str.maketrans("", "", "0123456789+-")
_MATERIAL_NAME = "material0"


@dataclass
class _ObjLines:
    """The data lines of an OBJ file grouped by keyword, each line keyword first."""

    v: list[str] = field(default_factory=list)
    vt: list[str] = field(default_factory=list)
    vn: list[str] = field(default_factory=list)
    f: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    mtllibs: list[str] = field(default_factory=list)
    materials_used: list[str] = field(default_factory=list)
    # All lines, for the ordered pass that negative (relative) face indices need.
    all_lines: list[str] = field(default_factory=list)


def read_obj(path: str | Path, *, load_texture: bool = False) -> Mesh:
    """Read a Wavefront OBJ file into a triangle `Mesh`.

    Faces may use the forms ``i``, ``i/j``, ``i//k`` and ``i/j/k`` with positive or negative
    (relative) indices; polygons are fan triangulated as (0, 1, 2), (0, 2, 3), ... UVs and
    normals are kept only when every face corner has one; normal indices in a file with no ``vn``
    lines are ignored (an exporter's habit), any other index out of range is an error. OBJ
    stores UVs per face corner: when a vertex is used with several UVs it is split into one
    vertex per UV and ``mesh.source_vertex`` maps the vertices back to the file's ``v`` lines.
    Disagreeing corner normals are averaged per vertex instead (they never split vertices).
    ``v x y z r g b`` lines give vertex colours (taken as 0..255 when any exceeds 1). The texture
    is the ``map_Kd`` of the first used material in the ``mtllib`` files; a missing MTL or image
    means no texture. With ``load_texture`` the image is read into ``mesh.texture``.
    """
    path = Path(path)
    text = path.read_bytes().decode("utf-8", errors="replace")
    if not text.strip():
        raise MeshFormatError(path, "empty file")
    lines = _group_lines(text)
    if not lines.v:
        raise MeshFormatError(path, "no vertices found (no 'v' lines)")

    v_table = _float_rows(path, lines.v, "vertex", 3)
    vertices = v_table[:, :3]
    colors = _colors_to_unit(v_table[:, 3:6]) if v_table.shape[1] >= 6 else None
    vt = _float_rows(path, lines.vt, "texture coordinate", 2)[:, :2] if lines.vt else None
    vn = _float_rows(path, lines.vn, "normal", 3)[:, :3] if lines.vn else None
    tri_v, tri_vt, tri_vn = _parse_faces(path, lines, len(lines.v), len(lines.vt), len(lines.vn))

    faces, uvs, normals, source = tri_v, None, None, None
    if tri_vt is not None:
        faces, vt_of_vertex, source = _split_corner_attribute(tri_v, tri_vt, len(vertices))
        uvs = _gather_rows(vt, vt_of_vertex)
        if source is not None:
            vertices = vertices[source]
            colors = None if colors is None else colors[source]
    if tri_vn is not None:
        normals = _vertex_normals(faces, tri_vn, vn, len(vertices))

    texture_path = _find_texture(path, lines)
    return _build_mesh(
        path,
        vertices=vertices,
        faces=faces,
        uvs=uvs,
        normals=normals,
        colors=colors,
        texture_path=texture_path,
        texture=_read_texture(texture_path) if load_texture and texture_path else None,
        source_vertex=source,
        metadata=lines.metadata,
    )


def write_obj(path: str | Path, mesh: Mesh, *, write_texture: bool = True, precision: int | None = None) -> None:
    """Write ``mesh`` as a Wavefront OBJ file, atomically.

    Vertex colours go on the ``v`` lines, per-vertex UVs and normals as ``vt`` / ``vn`` with the
    same indices, so faces read ``f a/a/a``, ``f a/a``, ``f a//a`` or ``f a``. Metadata becomes
    ``# key: value`` header lines. If the mesh has a texture (array or existing
    ``texture_path``) and ``write_texture`` is set, ``<stem>.png`` and ``<stem>.mtl`` (with
    ``map_Kd``) are written beside the OBJ. By default floats are written with Python's shortest
    exact representation, so a round trip is lossless; ``precision`` (significant digits, e.g.
    9 for float32 exactness) gives smaller files.
    """
    path = Path(path)
    header = ["# written by facehd"]
    header += [f"# {key}: {value}" for key, value in _metadata_lines(mesh)]
    image = _texture_image(mesh) if write_texture else None
    if image is not None:
        png, mtl = path.with_suffix(".png"), path.with_suffix(".mtl")
        _write_png(png, image)
        with atomic_open(mtl, "w", newline="\n") as fh:
            fh.write(f"newmtl {_MATERIAL_NAME}\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nmap_Kd {png.name}\n")
        header.append(f"mtllib {mtl.name}")

    number = "%r" if precision is None else f"%.{int(precision)}g"
    table = mesh.vertices if mesh.colors is None else np.hstack([mesh.vertices, mesh.colors])
    blocks = ["\n".join(header) + "\n", _float_lines("v", table, number)]
    if mesh.uvs is not None:
        blocks.append(_float_lines("vt", mesh.uvs, number))
    if mesh.normals is not None:
        blocks.append(_float_lines("vn", mesh.normals, number))
    if image is not None:
        blocks.append(f"usemtl {_MATERIAL_NAME}\n")
    corner = {
        (False, False): "%d",
        (True, False): "%d/%d",
        (False, True): "%d//%d",
        (True, True): "%d/%d/%d",
    }[(mesh.uvs is not None, mesh.normals is not None)]
    repeat = corner.count("%")
    indices = np.repeat(mesh.faces + 1, repeat, axis=1)
    blocks.append(("f " + " ".join([corner] * 3) + "\n") * mesh.n_faces % tuple(indices.ravel().tolist()))
    with atomic_open(path, "w", newline="\n") as fh:
        fh.writelines(blocks)


# --- reading ----------------------------------------------------------------------------------


def _group_lines(text: str) -> _ObjLines:
    """Sort the lines by keyword; everything but v/vt/vn/f/mtllib/usemtl is ignored.

    Dispatching on the first two characters keeps the loop cheap; a file where a data line does
    not start at column 0 (indented, or an unusual separator) is regrouped token by token.
    """
    if "\\" in text:
        # A trailing backslash continues a line (OBJ spec).
        text = text.replace("\\\r\n", " ").replace("\\\n", " ")
    out = _ObjLines(all_lines=text.splitlines())
    groups = {"v ": out.v, "v\t": out.v, "vt": out.vt, "vn": out.vn, "f ": out.f, "f\t": out.f}
    get = groups.get
    others = []
    for line in out.all_lines:
        group = get(line[:2])
        if group is None:
            others.append(line)
        else:
            group.append(line)
    for line in out.all_lines:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        match = _HEADER_METADATA.match(stripped)
        if match:
            out.metadata[match.group(1)] = match.group(2)
    for line in others:
        parts = line.split(None, 1)
        if not parts:
            continue
        if parts[0] in ("v", "vt", "vn", "f"):
            return _group_lines_ordered(out)
        if parts[0] == "mtllib" and len(parts) == 2:
            out.mtllibs.append(parts[1].strip())
        elif parts[0] == "usemtl" and len(parts) == 2:
            out.materials_used.append(parts[1].strip())
    return out


def _group_lines_ordered(out: _ObjLines) -> _ObjLines:
    """Token-by-token grouping that also tolerates indented lines."""
    groups = {"v": [], "vt": [], "vn": [], "f": []}
    for line in out.all_lines:
        parts = line.split(None, 1)
        if parts and parts[0] in groups:
            groups[parts[0]].append(f"{parts[0]} {parts[1] if len(parts) == 2 else ''}")
    out.v, out.vt, out.vn, out.f = groups["v"], groups["vt"], groups["vn"], groups["f"]
    return out


def _face_blocks(lines: list[str]) -> list[tuple[int, int, int, int]]:
    """(first face row, #v, #vt, #vn) each time faces follow other data lines, in file order."""
    counts = {"v": 0, "vt": 0, "vn": 0, "f": 0}
    blocks = []
    previous = ""
    for line in lines:
        parts = line.split(None, 1)
        if not parts or parts[0] not in counts:
            continue
        key = parts[0]
        if key == "f" and previous != "f":
            blocks.append((counts["f"], counts["v"], counts["vt"], counts["vn"]))
        counts[key] += 1
        previous = key
    return blocks


def _float_rows(path: Path, rows: list[str], what: str, min_cols: int) -> np.ndarray:
    """Parse `keyword n1 n2 ...` lines into an (n, k) float64 array, k the smallest count."""
    k = len(rows[0].split()) - 1
    if k >= min_cols:
        table = _loadtxt("\n".join(rows), range(1, k + 1), np.float64)
        if table is not None and table.shape[0] == len(rows):
            return table
    return _float_rows_slow(path, rows, what, min_cols)


def _loadtxt(text: str, usecols, dtype) -> np.ndarray | None:
    """numpy's C text parser (several times faster than fromstring); None if any row is bad."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.loadtxt(io.StringIO(text), dtype=dtype, usecols=usecols, ndmin=2)
    except ValueError:
        return None


def _float_rows_slow(path: Path, rows: list[str], what: str, min_cols: int) -> np.ndarray:
    """Line-by-line parse that tolerates trailing comments and names the first bad line."""
    parsed = []
    for i, row in enumerate(rows):
        tokens = row.split("#", 1)[0].split()[1:]
        if len(tokens) < min_cols:
            raise MeshFormatError(path, f"{what} {i + 1} has fewer than {min_cols} numbers: {row.strip()!r}")
        try:
            parsed.append([float(t) for t in tokens])
        except ValueError:
            raise MeshFormatError(path, f"non-numeric value in {what} {i + 1}: {row.strip()!r}") from None
    k = min(map(len, parsed))
    return np.array([p[:k] for p in parsed], dtype=np.float64)


def _parse_faces(
    path: Path, lines: _ObjLines, nv: int, nvt: int, nvn: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Triangle corner indices (T, 3), 0-based, for vertices, UVs (or None) and normals (or None)."""
    if not lines.f:
        return np.zeros((0, 3), dtype=np.int64), None, None
    parsed = _parse_faces_bulk(lines.f)
    corners, lengths = parsed if parsed is not None else _parse_faces_slow(path, lines.f)
    corners = _resolve_indices(path, corners, lengths, lines.all_lines, (nv, nvt, nvn))
    if (lengths == lengths[0]).all():
        tris = _fan_triangles(corners.reshape(lengths.size, int(lengths[0]), 3))
    else:
        tris = corners[_fan_corners(np.cumsum(lengths) - lengths, lengths)]
    v, vt, vn = tris[..., 0], tris[..., 1], tris[..., 2]
    return v, (vt if (vt >= 0).all() else None), (vn if (vn >= 0).all() else None)


def _parse_faces_bulk(rows: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """Parse faces whose corners all have the first corner's form in bulk; None if they do not.

    Returns (corners (K, 3), corners per face (F,)): 1-based or negative (v, vt, vn) indices with
    0 for a missing field. Every corner's slash skeleton must equal the first corner's and the
    integers must number exactly corners x fields, so no mixture of forms can slip through.
    """
    body = [row[2:] for row in rows]  # without the "f " keyword
    lengths = np.fromiter(map(len, map(str.split, body)), dtype=np.int64, count=len(body))
    if lengths.min() < 3:
        return None  # the slow parser reports the face
    first = body[0].split()[0]
    text = "\n".join(body)
    n_corners = int(lengths.sum())
    if "//" in first:
        if text.count("//") != n_corners:
            return None  # some corners are not i//k, which would look like i/j once replaced
        text = text.replace("//", "/")  # i//k: two numbers, vertex and normal
        layout = [0, 2]
    else:
        layout = [0, 1, 2][: first.count("/") + 1]
    skeleton = "/" * (len(layout) - 1)
    found = text.translate(_DELETE_NUMBERS).split()
    if skeleton:
        if len(found) != n_corners or found.count(skeleton) != n_corners:
            return None
    elif found:
        return None
    numbers = _parse_numbers(text.replace("/", " "), np.int64)
    if numbers is None or numbers.size != n_corners * len(layout):
        return None
    corners = np.zeros((n_corners, 3), dtype=np.int64)
    corners[:, layout] = numbers.reshape(n_corners, len(layout))
    return corners, lengths


def _parse_faces_slow(path: Path, rows: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-face parse for mixed polygons and forms: (corners (K, 3), corners per face (F,))."""
    corners: list[tuple[int, int, int]] = []
    lengths = []
    for i, row in enumerate(rows):
        tokens = row.split("#", 1)[0].split()[1:]
        if len(tokens) < 3:
            raise MeshFormatError(path, f"face {i + 1} has fewer than 3 vertices: {row.strip()!r}")
        for token in tokens:
            parts = token.split("/")
            try:
                if len(parts) > 3 or not parts[0]:
                    raise ValueError
                corners.append(tuple(int(p) if p else 0 for p in (parts + ["", ""])[:3]))
            except ValueError:
                raise MeshFormatError(path, f"non-numeric or malformed index {token!r} in face {i + 1}") from None
        lengths.append(len(tokens))
    try:
        return np.array(corners, dtype=np.int64), np.array(lengths, dtype=np.int64)
    except OverflowError:
        raise MeshFormatError(path, "face index out of range: an index exceeds 64 bits") from None


def _resolve_indices(
    path: Path,
    corners: np.ndarray,
    lengths: np.ndarray,
    all_lines: list[str],
    totals: tuple[int, int, int],
) -> np.ndarray:
    """Make (K, 3) OBJ indices 0-based; missing fields (0 in the file) become -1."""
    out = corners - 1
    negative = corners < 0
    if negative.any():
        # A relative index counts back from the elements defined before its face line.
        blocks = _face_blocks(all_lines)
        starts = np.array([b[0] for b in blocks], dtype=np.int64)
        defined = np.array([b[1:] for b in blocks], dtype=np.int64)
        block_of_face = np.searchsorted(starts, np.arange(lengths.size), side="right") - 1
        defined_at_corner = np.repeat(defined[block_of_face], lengths, axis=0)
        out = np.where(negative, corners + defined_at_corner, out)
    names = ("vertex", "texture coordinate", "normal")
    plurals = ("vertices", "texture coordinates", "normals")
    for col, (name, plural, total) in enumerate(zip(names, plurals, totals, strict=True)):
        if col == 2 and total == 0:
            # Exporters (REALY's HIFI3D.obj among them) write `f v/vt/vn` with no `vn` lines: the
            # normal indices point at nothing and nothing needs them, so they are not read.
            out[:, 2] = -1
            continue
        present = corners[:, col] != 0
        bad = present & ((out[:, col] < 0) | (out[:, col] >= total))
        if col == 0:
            bad |= ~present  # a 0 vertex index is invalid; OBJ indices start at 1
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            face = int(np.searchsorted(np.cumsum(lengths), k, side="right")) + 1
            raise MeshFormatError(
                path,
                f"{name} index out of range: face {face} uses index {corners[k, col]} but the "
                f"file defines {total} {plural} ({int(bad.sum())} bad indices in all)",
            )
    out[corners == 0] = -1
    return out


def _vertex_normals(faces: np.ndarray, tri_vn: np.ndarray, vn: np.ndarray, n_vertices: int) -> np.ndarray:
    """Per-vertex normals from per-corner ones; disagreeing corners are averaged."""
    vn_of_vertex = np.full(n_vertices, -1, dtype=np.int64)
    vn_of_vertex[faces.ravel()] = tri_vn.ravel()
    if np.array_equal(vn_of_vertex[faces], tri_vn):
        return _gather_rows(vn, vn_of_vertex)
    summed = np.stack(
        [np.bincount(faces.ravel(), vn[tri_vn.ravel(), d], minlength=n_vertices) for d in range(3)],
        axis=1,
    )
    norm = np.linalg.norm(summed, axis=1, keepdims=True)
    return np.divide(summed, norm, out=np.zeros_like(summed), where=norm > 0)


def _find_texture(path: Path, lines: _ObjLines) -> Path | None:
    """The ``map_Kd`` image of the first used material that has one, else of any material."""
    textures: dict[str, Path] = {}
    for lib in lines.mtllibs:
        mtl = _resolve_texture(path.parent, lib)
        if mtl is None and len(lib.split()) > 1:
            # Several libraries on one line (names with spaces are handled above).
            for name in lib.split():
                found = _resolve_texture(path.parent, name)
                if found is not None:
                    textures.update(_read_mtl(found))
        elif mtl is not None:
            textures.update(_read_mtl(mtl))
    for name in lines.materials_used:
        if name in textures:
            return textures[name]
    return next(iter(textures.values()), None)


def _read_mtl(mtl: Path) -> dict[str, Path]:
    """Material name -> existing ``map_Kd`` image path, from one MTL file."""
    textures: dict[str, Path] = {}
    material = ""
    for line in mtl.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) < 2:
            continue
        if parts[0] == "newmtl":
            material = parts[1].strip()
        elif parts[0].lower() == "map_kd" and material not in textures:
            # Options such as `-s 1 1 1` may precede the file name, which may contain spaces.
            found = _resolve_texture(mtl.parent, parts[1]) or _resolve_texture(mtl.parent, parts[1].split()[-1])
            if found is not None:
                textures[material] = found
    return textures


# --- writing ----------------------------------------------------------------------------------


def _float_lines(keyword: str, table: np.ndarray, number: str) -> str:
    """One `keyword x y ...` line per row; %r is the shortest string that reads back exactly."""
    line = keyword + (" " + number) * table.shape[1] + "\n"
    return line * table.shape[0] % tuple(table.ravel().tolist())
