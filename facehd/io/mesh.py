"""The `Mesh` record shared by every mesh reader and writer, and suffix-based `load_mesh` /
`save_mesh`."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facehd.errors import FileFormatError, InputError, MeshFormatError
from facehd.fsutil import atomic_path

READ_SUFFIXES = (".obj", ".ply", ".wrl", ".vrml")
WRITE_SUFFIXES = (".obj", ".ply")

# Metadata travels in header comments (`# key: value` in OBJ, `comment key value` in PLY), so a
# key must be one word and a value one line.
_METADATA_KEY = re.compile(r"^[A-Za-z_][\w.-]*$")


@dataclass(eq=False)
class Mesh:
    """A triangle mesh with optional per-vertex attributes.

    Attributes:
        vertices: (N, 3) float64 positions, in the units named by ``metadata["units"]`` if given.
        faces: (F, 3) int64 vertex indices, 0-based; (0, 3) for a point cloud.
        uvs: optional (N, 2) float64 per-vertex texture coordinates (u right, v up). Files that
            store UVs per face corner (OBJ, VRML) are converted on read: a vertex used with
            several UVs is split into one vertex per distinct UV, and ``source_vertex`` says
            which file vertex each mesh vertex came from.
        normals: optional (N, 3) float64 per-vertex normals (not renormalised).
        colors: optional (N, 3) float64 per-vertex RGB in [0, 1].
        texture_path: optional path of the texture image; readers set it only if the file exists.
        texture: optional (H, W, 3) uint8 RGB texture image, loaded on request or set by the user.
        source_vertex: optional (N,) int64 index of each vertex in the file it was read from;
            present only when reading split vertices, None otherwise.
        metadata: free key -> value strings carried in file header comments, e.g.
            ``{"units": "mm"}``.

    The constructor coerces arrays to the dtypes above and calls `validate`.
    """

    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray | None = None
    normals: np.ndarray | None = None
    colors: np.ndarray | None = None
    texture_path: Path | None = None
    texture: np.ndarray | None = None
    source_vertex: np.ndarray | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vertices = _as_array(self.vertices, np.float64, "vertices")
        self.faces = _as_index_array(self.faces, "faces")
        if self.faces.size == 0:
            self.faces = self.faces.reshape(0, 3)
        self.uvs = _as_optional(self.uvs, np.float64, "uvs")
        self.normals = _as_optional(self.normals, np.float64, "normals")
        self.colors = _as_optional(self.colors, np.float64, "colors")
        if self.source_vertex is not None:
            self.source_vertex = _as_index_array(self.source_vertex, "source_vertex")
        if self.texture is not None:
            self.texture = np.ascontiguousarray(self.texture)
        if self.texture_path is not None:
            self.texture_path = Path(self.texture_path)
        self.metadata = dict(self.metadata)
        self.validate()

    def __repr__(self) -> str:
        # The generated repr would print every array; a summary is what a log needs.
        names = ("uvs", "normals", "colors", "texture", "source_vertex")
        present = [name for name in names if getattr(self, name) is not None]
        extra = "".join(f", {name}" for name in present)
        return f"Mesh({self.n_vertices} vertices, {self.n_faces} faces{extra}, metadata={self.metadata})"

    @property
    def n_vertices(self) -> int:
        return int(self.vertices.shape[0])

    @property
    def n_faces(self) -> int:
        return int(self.faces.shape[0])

    def validate(self) -> None:
        """Check shapes, dtypes, finiteness and face index range; raise `InputError` if wrong."""
        v = self.vertices
        if v.ndim != 2 or v.shape[1] != 3:
            raise InputError(f"mesh vertices must have shape (N, 3), got {v.shape}")
        _check_finite(v, "vertices", "coordinates")
        n = v.shape[0]
        f = self.faces
        if f.ndim != 2 or f.shape[1] != 3:
            raise InputError(f"mesh faces must have shape (F, 3), got {f.shape}")
        if f.dtype != np.int64:
            raise InputError(f"mesh faces must be int64, got {f.dtype}")
        if f.size:
            bad = (f < 0) | (f >= n)
            if bad.any():
                face, corner = np.argwhere(bad)[0]
                raise InputError(
                    f"face index out of range: {int(bad.sum())} indices outside [0, {n}), e.g. "
                    f"face {face} refers to vertex {f[face, corner]} but the mesh has {n} vertices"
                )
        for name, width in (("uvs", 2), ("normals", 3), ("colors", 3)):
            a = getattr(self, name)
            if a is None:
                continue
            if a.shape != (n, width):
                raise InputError(f"mesh {name} must have shape ({n}, {width}), got {a.shape}")
            _check_finite(a, name, "values")
        if self.colors is not None and self.colors.size:
            lo, hi = self.colors.min(), self.colors.max()
            if lo < 0.0 or hi > 1.0:
                raise InputError(f"mesh colors must lie in [0, 1], got range [{lo:g}, {hi:g}]")
        if self.source_vertex is not None and self.source_vertex.shape != (n,):
            raise InputError(f"mesh source_vertex must have shape ({n},), got {self.source_vertex.shape}")
        t = self.texture
        if t is not None and (t.ndim != 3 or t.shape[2] != 3 or t.dtype != np.uint8):
            raise InputError(f"mesh texture must be an (H, W, 3) uint8 image, got {t.shape} {t.dtype}")
        for key, value in self.metadata.items():
            if not isinstance(key, str) or not _METADATA_KEY.match(key):
                raise InputError(f"mesh metadata key {key!r} must be one word (letters, digits, _.-)")
            if "\n" in str(value) or "\r" in str(value):
                raise InputError(f"mesh metadata value for {key!r} must be a single line")


def load_mesh(path: str | Path, *, load_texture: bool = False) -> Mesh:
    """Read an OBJ, PLY or VRML (.wrl / .vrml) mesh, choosing the reader by suffix.

    With ``load_texture`` the texture image the file refers to (if any) is read into
    ``mesh.texture``; otherwise only ``mesh.texture_path`` is set.
    """
    from facehd.io.obj import read_obj
    from facehd.io.ply import read_ply
    from facehd.io.wrl import read_wrl

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".obj":
        return read_obj(path, load_texture=load_texture)
    if suffix == ".ply":
        return read_ply(path, load_texture=load_texture)
    if suffix in (".wrl", ".vrml"):
        return read_wrl(path, load_texture=load_texture)
    raise MeshFormatError(path, f"unsupported mesh suffix {path.suffix!r} (expected one of {READ_SUFFIXES})")


def save_mesh(path: str | Path, mesh: Mesh, **options) -> None:
    """Write ``mesh`` as OBJ or PLY, choosing the writer by suffix; options go to the writer."""
    from facehd.io.obj import write_obj
    from facehd.io.ply import write_ply

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".obj":
        write_obj(path, mesh, **options)
    elif suffix == ".ply":
        write_ply(path, mesh, **options)
    else:
        raise InputError(f"{path}: cannot write mesh suffix {path.suffix!r} (expected one of {WRITE_SUFFIXES})")


# --- helpers shared by the readers and writers (not public API) -------------------------------


def _as_array(a, dtype, name: str) -> np.ndarray:
    try:
        return np.ascontiguousarray(a, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise InputError(f"mesh {name} cannot be converted to {np.dtype(dtype)}: {exc}") from None


def _as_optional(a, dtype, name: str) -> np.ndarray | None:
    return None if a is None else _as_array(a, dtype, name)


def _as_index_array(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype.kind == "f":
        # Indices stored as floats are accepted only when they are whole numbers.
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise InputError(f"mesh {name} must hold whole-number indices")
    elif arr.size and arr.dtype.kind not in "iu":
        raise InputError(f"mesh {name} must be an integer array, got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _check_finite(a: np.ndarray, name: str, what: str) -> None:
    ok = np.isfinite(a).all(axis=1) if a.ndim == 2 else np.isfinite(a)
    if not ok.all():
        bad = np.flatnonzero(~ok)
        raise InputError(
            f"{bad.size} of {a.shape[0]} mesh {name} have non-finite {what} (NaN or inf), first at index {bad[0]}"
        )


def _build_mesh(path: Path, **fields) -> Mesh:
    """Construct a Mesh from parsed file content, reporting problems against the file."""
    if len(fields["vertices"]) == 0:
        raise MeshFormatError(path, "no vertices found (empty mesh)")
    try:
        return Mesh(**fields)
    except InputError as exc:
        raise MeshFormatError(path, str(exc)) from None


def _parse_numbers(text: str, dtype=np.float64) -> np.ndarray | None:
    """Parse whitespace-separated numbers in bulk; None if any token is not a number of `dtype`."""
    with warnings.catch_warnings():
        # numpy < 2.3 only warns (and truncates) on unparsable text; make that an error too.
        warnings.simplefilter("error", DeprecationWarning)
        try:
            return np.fromstring(text, dtype=dtype, sep=" ")
        except (ValueError, DeprecationWarning):
            return None


def _colors_to_unit(colors: np.ndarray) -> np.ndarray:
    """Map stored colours to [0, 1]: values above 1 are taken as 0..255 (some exporters do so)."""
    colors = np.asarray(colors, dtype=np.float64)
    if colors.size and colors.max() > 1.0:
        colors = colors / 255.0
    return colors


def _fan_corners(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Triangle corners of polygons stored back to back in a flat corner array.

    Polygon p occupies flat positions ``starts[p] .. starts[p] + lengths[p] - 1``; it is fan
    triangulated as (0, 1, 2), (0, 2, 3), ... Returns (T, 3) positions into the flat array, so
    callers can index vertex, UV and colour indices alike. Polygons with fewer than 3 corners
    produce no triangle.
    """
    starts = np.asarray(starts, dtype=np.int64)
    n_tri = np.maximum(np.asarray(lengths, dtype=np.int64) - 2, 0)
    total = int(n_tri.sum())
    poly = np.repeat(np.arange(starts.size), n_tri)
    first_tri = np.cumsum(n_tri) - n_tri
    k = np.arange(total, dtype=np.int64) - first_tri[poly]
    a = starts[poly]
    return np.stack([a, a + 1 + k, a + 2 + k], axis=1)


def _fan_triangles(polys: np.ndarray) -> np.ndarray:
    """Fan-triangulate an (F, C, ...) array of same-size polygons into (F * (C - 2), 3, ...)."""
    c = polys.shape[1]
    if c == 3:
        return polys
    fan = np.array([(0, i, i + 1) for i in range(1, c - 1)], dtype=np.int64)
    return polys[:, fan].reshape((-1, 3) + polys.shape[2:])


def _split_corner_attribute(
    faces: np.ndarray, corner_index: np.ndarray, n_vertices: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Turn a per-corner attribute index into a per-vertex one, splitting vertices if needed.

    ``faces`` and ``corner_index`` are (T, 3): the vertex and the attribute row (e.g. a UV) of
    each triangle corner. When every vertex always uses the same attribute row (the usual case),
    vertices are kept and the result is ``(faces, attr_of_vertex, None)``. Otherwise each distinct
    (vertex, attribute) pair becomes a vertex, ordered by source vertex, and the result is
    ``(new_faces, attr_of_vertex, source_vertex)``. Vertices used by no face keep attribute
    row -1, which callers fill with zeros.
    """
    attr = np.full(n_vertices, -1, dtype=np.int64)
    attr[faces.ravel()] = corner_index.ravel()
    if np.array_equal(attr[faces], corner_index):
        return faces, attr, None
    n_attr = int(corner_index.max()) + 2
    used = np.zeros(n_vertices, dtype=bool)
    used[faces.ravel()] = True
    unused = np.flatnonzero(~used)
    # One int64 key per (vertex, attribute) pair; unused vertices come along with attribute -1.
    keys = np.concatenate([faces.ravel() * n_attr + corner_index.ravel() + 1, unused * n_attr])
    unique, inverse = np.unique(keys, return_inverse=True)
    new_faces = inverse[: faces.size].reshape(faces.shape).astype(np.int64)
    return new_faces, unique % n_attr - 1, unique // n_attr


def _gather_rows(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``table[index]`` with zero rows where ``index`` is -1 (vertices no face uses)."""
    out = table[np.maximum(index, 0)]
    out[index < 0] = 0.0
    return out


def _read_texture(path: Path) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 RGB array."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise
    except Exception as exc:  # Pillow raises many types for unreadable images
        raise FileFormatError(path, f"cannot read texture image: {exc}") from None


def _resolve_texture(base_dir: Path, name: str) -> Path | None:
    """The texture file a mesh file refers to, relative to ``base_dir``; None if it is missing."""
    name = name.strip().strip('"').replace("\\", "/")
    if not name:
        return None
    candidate = Path(name) if Path(name).is_absolute() else base_dir / name
    if candidate.is_file():
        return candidate
    # Exporters sometimes store an absolute path from another machine: try the bare file name.
    fallback = base_dir / Path(name).name
    return fallback if fallback.is_file() else None


def _texture_image(mesh: Mesh) -> np.ndarray | None:
    """The mesh's texture as an array: the loaded one, else read from ``texture_path``."""
    if mesh.texture is not None:
        return mesh.texture
    if mesh.texture_path is not None and Path(mesh.texture_path).is_file():
        return _read_texture(Path(mesh.texture_path))
    return None


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def _metadata_lines(mesh: Mesh) -> list[tuple[str, str]]:
    """Metadata as (key, value) pairs ready for header comments."""
    mesh.validate()
    return [(k, str(v)) for k, v in mesh.metadata.items()]
