"""Exact closest points and distances from points to triangle meshes (point-to-surface and
point-to-plane), the directional / symmetric mesh-to-mesh distance, and numpy mesh normals."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import open3d as o3d

from facehd.errors import InputError

DIRECTIONS = ("symmetric", "a_to_b", "b_to_a")
METRICS = ("point_to_surface", "point_to_plane")
PLANE_NORMALS = ("vertex", "face")

# A triangle whose doubled area is below this fraction of its longest edge squared has no
# interior worth indexing (a sliver or repeated vertex); its edges belong to its neighbours.
DEGENERATE_AREA_RTOL = 1e-12
# An interpolated vertex normal shorter than this (opposite normals cancelling) is replaced by the
# face normal, which is always defined on the non-degenerate faces we index.
MIN_NORMAL_LENGTH = 1e-8
# exact=True closest points: centroids measured per query before falling back to a radius search,
# and the relative slack on the bound (the float32 choice's distance is itself rounded).
EXACT_NEIGHBOURS = 16
EXACT_NEIGHBOURS_GROWTH = 4
EXACT_BOUND_RTOL = 1e-9
# The float32 search's triangle may be farther than the float64 closest one by at most twice its
# float32 distance error: rounding of coordinates of magnitude R (from the centre) to a few ulps
# each. This many ulps of R is taken per distance (a margin over the 1-2 a distance costs).
CHOICE_ULPS = 8


# --- input checks -------------------------------------------------------------------------------

def as_points(array, name: str = "points", *, rows: int | None = None) -> np.ndarray:
    """Validate and convert to a contiguous float64 (P, 3) array; P >= 1, all values finite.

    `rows` demands an exact P (for arrays paired with another, e.g. per-vertex normals).
    """
    try:
        pts = np.ascontiguousarray(array, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: cannot convert to a float array ({exc})") from exc
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise InputError(f"{name}: expected shape (P, 3), got {pts.shape}")
    if pts.shape[0] == 0:
        raise InputError(f"{name}: empty array, expected at least one point")
    if rows is not None and pts.shape[0] != rows:
        raise InputError(f"{name}: expected {rows} rows, got {pts.shape[0]}")
    bad = ~np.isfinite(pts).all(axis=1)
    if bad.any():
        raise InputError(f"{name}: {int(bad.sum())} rows contain NaN or inf (first at row {int(np.argmax(bad))})")
    return pts


def as_faces(array, n_vertices: int, name: str = "faces") -> np.ndarray:
    """Validate and convert triangle indices to int64 (F, 3), F >= 1, each in [0, n_vertices)."""
    faces = np.asarray(array)
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise InputError(f"{name}: expected shape (F, 3), got {faces.shape}")
    if faces.shape[0] == 0:
        raise InputError(f"{name}: empty array, expected at least one triangle")
    if not np.issubdtype(faces.dtype, np.integer):
        # Index arrays read from .mat files arrive as floats; accept them only if integral.
        if not np.issubdtype(faces.dtype, np.floating) or not np.all(np.isfinite(faces)) \
                or np.any(faces != np.round(faces)):
            raise InputError(f"{name}: triangle indices must be integers, got dtype {faces.dtype}")
    faces = faces.astype(np.int64)
    lo, hi = int(faces.min()), int(faces.max())
    if lo < 0 or hi >= n_vertices:
        raise InputError(f"{name}: indices must lie in [0, {n_vertices}), found range [{lo}, {hi}]")
    return np.ascontiguousarray(faces)


def as_mask(mask, n: int, name: str = "mask") -> np.ndarray:
    """Validate a boolean (n,) vertex selection that selects at least one vertex."""
    m = np.asarray(mask)
    if m.shape != (n,) or m.dtype != bool:
        raise InputError(f"{name}: expected a boolean array of shape ({n},), got {m.dtype} {m.shape}")
    if not m.any():
        raise InputError(f"{name}: selects no vertices")
    return m


# --- normals --------------------------------------------------------------------------------------

def _face_cross(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F, 3) cross products (v1 - v0) x (v2 - v0): direction = normal, length = 2 x area."""
    v0, v1, v2 = (vertices[faces[:, k]] for k in range(3))
    return np.cross(v1 - v0, v2 - v0)


def _normalize(vectors: np.ndarray) -> np.ndarray:
    """Unit rows; rows of zero length stay zero."""
    length = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(length > 0, length, 1.0)


def face_normals_np(vertices, faces) -> np.ndarray:
    """(N, 3), (F, 3) -> (F, 3) unit face normals, counter-clockwise winding (the same direction as
    `facehd.morphable.face_normals`); zero for degenerate faces."""
    vertices = as_points(vertices, "vertices")
    faces = as_faces(faces, len(vertices))
    return _normalize(_face_cross(vertices, faces))


def vertex_normals_np(vertices, faces) -> np.ndarray:
    """(N, 3), (F, 3) -> (N, 3) unit vertex normals, the area-weighted mean of the incident face
    normals; zero for vertices no face uses."""
    vertices = as_points(vertices, "vertices")
    faces = as_faces(faces, len(vertices))
    return _vertex_normals(vertices, faces)


def _vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    cross = _face_cross(vertices, faces)  # length 2 x area, so summing weights by area
    acc = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(acc, faces[:, k], cross)
    return _normalize(acc)


# --- closest points -------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ClosestPoints:
    """Closest surface points of P query points on a mesh, float64.

    `barycentric` weights the vertices `faces[face_index]` (w0, w1, w2), so
    `points = sum_k barycentric[:, k, None] * vertices[faces[face_index, k]]`.
    """

    points: np.ndarray  # (P, 3) closest points on the surface
    distances: np.ndarray  # (P,) Euclidean distance from each query to its closest point
    face_index: np.ndarray  # (P,) int64 index into the mesh's faces
    barycentric: np.ndarray  # (P, 3) weights of the face's three vertices, summing to 1


def _closest_on_triangles(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Barycentric (P, 3) of the exact closest point to each p on triangle (a, b, c), float64.

    Ericson, Real-Time Collision Detection, 5.1.5, vectorised: the first Voronoi region whose test
    passes wins, in the book's order (vertex a, b, edge ab, vertex c, edge ac, edge bc, interior).
    """
    ab, ac, ap, bp, cp = b - a, c - a, p - a, p - b, p - c

    def dot(u, v):
        return np.einsum("ij,ij->i", u, v)

    d1, d2, d3, d4, d5, d6 = dot(ab, ap), dot(ac, ap), dot(ab, bp), dot(ac, bp), dot(ab, cp), dot(ac, cp)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2

    def ratio(num, den):
        # den is ~0 only in rows whose region test fails, so their value is never selected
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            return num / np.where(den != 0, den, 1.0)

    t_ab, t_ac = ratio(d1, d1 - d3), ratio(d2, d2 - d6)
    t_bc = ratio(d4 - d3, (d4 - d3) + (d5 - d6))
    denom = va + vb + vc
    v_in, w_in = ratio(vb, denom), ratio(vc, denom)
    zero, one = np.zeros_like(d1), np.ones_like(d1)
    regions = [
        (d1 <= 0) & (d2 <= 0),
        (d3 >= 0) & (d4 <= d3),
        (vc <= 0) & (d1 >= 0) & (d3 <= 0),
        (d6 >= 0) & (d5 <= d6),
        (vb <= 0) & (d2 >= 0) & (d6 <= 0),
        (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0),
    ]
    w1 = np.select(regions, [zero, one, t_ab, zero, zero, 1 - t_bc], v_in)
    w2 = np.select(regions, [zero, zero, zero, one, t_ac, t_bc], w_in)
    w0 = np.select(regions, [one, zero, 1 - t_ab, zero, 1 - t_ac, zero], 1 - v_in - w_in)
    return np.stack([w0, w1, w2], axis=1)


class SurfaceIndex:
    """A triangle mesh indexed once for repeated exact closest-point queries (ICP loops).

    open3d's `RaycastingScene` finds the closest triangle in float32 (coordinates are recentred on
    the mesh first, so precision is relative to the mesh size, ~1e-6 of it); the closest point on
    that triangle is then recomputed exactly in float64. A query lying on the surface (for example
    a vertex of an identical mesh) therefore gets distance 0 to float64 precision, and any other
    distance is exact up to a possible near-tie between triangles decided in float32.
    Degenerate (zero-area) triangles are left out of the index: their edges are their
    neighbours'. Vertices (N, 3), faces (F, 3); any winding. A query costs more the larger its
    distance is compared with the triangles' size (tens of mm off an 80k-triangle face: ~10x a
    query within a few mm; see `benchmarks/speed_kernels.py`).
    """

    def __init__(self, vertices, faces):
        self.vertices = as_points(vertices, "vertices")
        self.faces = as_faces(faces, len(self.vertices))
        cross = _face_cross(self.vertices, self.faces)
        tri = self.vertices[self.faces]
        longest = np.max(np.sum((tri - np.roll(tri, 1, axis=1)) ** 2, axis=2), axis=1)
        keep = np.linalg.norm(cross, axis=1) > DEGENERATE_AREA_RTOL * longest
        if not keep.any():
            raise InputError(f"mesh has no non-degenerate triangles (all {len(self.faces)} have zero area)")
        self._indexed_faces = np.nonzero(keep)[0]  # scene primitive id -> face index
        self._face_normals = _normalize(cross)
        self._vertex_normals: np.ndarray | None = None
        self._centroid_groups = None  # for exact=True: see _centroid_groups
        # Recentring keeps float32 rounding relative to the mesh's size, not its distance from 0.
        self._center = 0.5 * (self.vertices.min(axis=0) + self.vertices.max(axis=0))
        self._scene = o3d.t.geometry.RaycastingScene()
        self._scene.add_triangles(
            o3d.core.Tensor((self.vertices - self._center).astype(np.float32)),
            o3d.core.Tensor(self.faces[keep].astype(np.uint32)),
        )

    def closest(self, points, *, exact: bool = False) -> ClosestPoints:
        """(P, 3) query points -> their exact closest points on the surface.

        exact=True also chooses the triangle in float64 (`_refine`): every triangle that could be
        closer than the float32 choice is measured in float64 and the closest wins, so near-ties
        between triangles are decided to double precision (slower; for stop tests that compare
        means to 1e-3 mm).
        """
        p = as_points(points, "query points")
        query = o3d.core.Tensor((p - self._center).astype(np.float32))
        hit = self._scene.compute_closest_points(query)
        face_index = self._indexed_faces[hit["primitive_ids"].numpy().astype(np.int64)]
        bary, closest = self._on_faces(p, face_index)
        distances = np.linalg.norm(p - closest, axis=1)
        if exact:
            face_index, bary, closest, distances = self._refine(p, face_index, bary, closest, distances)
        return ClosestPoints(closest, distances, face_index, bary)

    def choice_slack(self, points) -> float:
        """How much farther than the float64 closest triangle the float32 search's choice can be,
        per query point, in the mesh's units: `closest(points).distances` - this <= the
        exact distances <= `closest(points).distances`. A caller comparing means to a tolerance
        needs `closest(exact=True)` only when the comparison falls within this slack."""
        p = as_points(points, "query points")
        reach = float(np.abs(self.vertices - self._center).max()) + float(np.abs(p - self._center).max(initial=0.0))
        return 2.0 * CHOICE_ULPS * float(np.finfo(np.float32).eps) * reach

    def _on_faces(self, p: np.ndarray, face_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tri = self.vertices[self.faces[face_index]]  # (P, 3 corners, 3)
        bary = _closest_on_triangles(p, tri[:, 0], tri[:, 1], tri[:, 2])
        return bary, np.einsum("pk,pkd->pd", bary, tri)

    def _refine(self, p, face_index, bary, closest, distances):
        """The float64 closest triangle: a triangle whose centroid c lies farther than d + r from
        p (d the current distance, r its centroid-to-corner radius) cannot be closer. Triangles are
        grouped by radius (a factor of two per group, so a few large ones do not widen every
        search); per group the nearest centroids are visited, EXACT_NEIGHBOURS first and more for
        the queries whose bound those do not reach, and the triangles the bound admits measured."""
        if self._centroid_groups is None:
            self._centroid_groups = _centroid_groups(self.vertices, self.faces[self._indexed_faces])
        face_index, bary, closest, distances = (a.copy() for a in (face_index, bary, closest, distances))

        radii, groups = self._centroid_groups

        def consider(rows, candidates, centroid_distance) -> None:
            keep = centroid_distance - radii[candidates] <= distances[rows] * (1 + EXACT_BOUND_RTOL)
            rows, candidates = rows[keep], candidates[keep]
            if not len(rows):
                return
            faces = self._indexed_faces[candidates]
            b, q = self._on_faces(p[rows], faces)
            d = np.linalg.norm(p[rows] - q, axis=1)
            order = np.lexsort((d, rows))  # per row, its closest candidate first
            rows_sorted, first = np.unique(rows[order], return_index=True)
            pick = order[first]
            better = d[pick] < distances[rows_sorted]
            r, pick = rows_sorted[better], pick[better]
            face_index[r], bary[r], closest[r], distances[r] = faces[pick], b[pick], q[pick], d[pick]

        for tree, members, radius in groups:
            todo, k, n = np.arange(len(p)), EXACT_NEIGHBOURS, len(members)
            while len(todo):  # widen the neighbourhood of the queries it does not yet cover
                k = min(k, n)
                centroid_distance, near = tree.query(p[todo], k=k)
                centroid_distance, near = centroid_distance.reshape(len(todo), k), near.reshape(len(todo), k)
                consider(np.repeat(todo, k), members[near.reshape(-1)], centroid_distance.reshape(-1))
                if k == n:
                    break
                todo = todo[centroid_distance[:, -1] <= distances[todo] * (1 + EXACT_BOUND_RTOL) + radius]
                k *= EXACT_NEIGHBOURS_GROWTH
        return face_index, bary, closest, distances

    def distance(self, points) -> np.ndarray:
        """(P, 3) -> (P,) point-to-surface distances (exact closest point on the triangles)."""
        return self.closest(points).distances

    def point_to_plane(self, points, *, normals: str = "vertex", vertex_normals=None) -> np.ndarray:
        """(P, 3) -> (P,) true point-to-plane distances |(p - q) . n|, q the closest surface point.

        normals="vertex": n is the vertex normals interpolated at q with its barycentric weights,
        normalised (area-weighted normals of this mesh unless `vertex_normals` (N, 3) is given); a
        smooth plane, so it never exceeds the point-to-surface distance and is below it where the
        surface curves. normals="face": n is the normal of q's triangle; equal to the
        point-to-surface distance wherever q is inside a triangle, smaller where q is on an edge.
        """
        if normals not in PLANE_NORMALS:
            raise InputError(f"normals must be one of {PLANE_NORMALS}, got {normals!r}")
        p = as_points(points, "query points")
        hit = self.closest(p)
        n = self._face_normals[hit.face_index]
        if normals == "vertex":
            vn = self._vertex_normals_or(vertex_normals)[self.faces[hit.face_index]]
            interp = np.einsum("pk,pkd->pd", hit.barycentric, vn)
            length = np.linalg.norm(interp, axis=1, keepdims=True)
            n = np.where(length > MIN_NORMAL_LENGTH, interp / np.maximum(length, MIN_NORMAL_LENGTH), n)
        return np.abs(np.einsum("pd,pd->p", p - hit.points, n))

    def _vertex_normals_or(self, given) -> np.ndarray:
        if given is not None:
            return as_points(given, "vertex normals", rows=len(self.vertices))
        if self._vertex_normals is None:
            self._vertex_normals = _vertex_normals(self.vertices, self.faces)
        return self._vertex_normals


def _centroid_groups(vertices: np.ndarray, faces: np.ndarray):
    """(radii (F,), [(KD-tree of the group's centroids, its members (indices into `faces`), its
    largest radius)]): a triangle's radius is its largest centroid-to-corner distance; the groups
    double in radius from the median one."""
    from scipy.spatial import cKDTree

    tri = vertices[faces]
    centroids = tri.mean(axis=1)
    radii = np.sqrt(np.max(np.sum((tri - centroids[:, None]) ** 2, axis=2), axis=1))
    median = float(np.median(radii))
    level = np.ceil(np.log2(np.maximum(radii / median, 1.0))).astype(np.int64)
    groups = []
    for value in np.unique(level):
        members = np.nonzero(level == value)[0]
        groups.append((cKDTree(centroids[members]), members, float(radii[members].max())))
    return radii, groups


def closest_points_on_mesh(points, vertices, faces) -> ClosestPoints:
    """(P, 3) query points, mesh (N, 3) / (F, 3) -> exact closest surface points (float64).

    Builds a `SurfaceIndex` each call; keep one when querying the same mesh repeatedly.
    """
    return SurfaceIndex(vertices, faces).closest(points)


def point_to_surface(src_points, tgt_vertices, tgt_faces) -> np.ndarray:
    """(P, 3) points -> (P,) distance to the closest point on the target's triangles."""
    return SurfaceIndex(tgt_vertices, tgt_faces).distance(src_points)


def point_to_plane(src_points, tgt_vertices, tgt_faces, tgt_vertex_normals=None, *,
                   normals: str = "vertex") -> np.ndarray:
    """(P, 3) points -> (P,) true point-to-plane distance |(p - q) . n| at the closest surface point q.

    See `SurfaceIndex.point_to_plane` for the choice of n ("vertex": interpolated vertex normals,
    `tgt_vertex_normals` (N, 3) or area-weighted ones; "face": the triangle's normal).
    """
    index = SurfaceIndex(tgt_vertices, tgt_faces)
    return index.point_to_plane(src_points, normals=normals, vertex_normals=tgt_vertex_normals)


# --- mesh-to-mesh ---------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class DistanceResult:
    """Per-vertex and mean distances between meshes a and b, in the meshes' units.

    `a_to_b` (N_a,) holds, for each vertex of a, its distance to b's surface (NaN outside
    `mask_a`, None when that direction was not asked for); `b_to_a` likewise. `mean` is the headline:
    the directional mean, or for "symmetric" the mean of the two directional means.
    """

    direction: str  # "symmetric", "a_to_b" or "b_to_a"
    metric: str  # "point_to_surface" or "point_to_plane"
    mean: float
    a_to_b: np.ndarray | None = None
    b_to_a: np.ndarray | None = None
    mean_a_to_b: float | None = None
    mean_b_to_a: float | None = None

    def describe(self, a: str = "a", b: str = "b") -> str:
        """One line naming the metric and direction, e.g. describe("GT", "prediction")."""
        if self.direction == "symmetric":
            how = f"symmetric (mean of {a} -> {b} {self.mean_a_to_b:.6g} and {b} -> {a} {self.mean_b_to_a:.6g})"
        else:
            how = f"{a} -> {b}" if self.direction == "a_to_b" else f"{b} -> {a}"
        return f"{self.metric.replace('_', '-')} distance, {how}: {self.mean:.6g}"


def _directional(src: np.ndarray, mask: np.ndarray | None, index: SurfaceIndex, metric: str) -> np.ndarray:
    out = np.full(len(src), np.nan)
    sel = slice(None) if mask is None else mask
    if metric == "point_to_plane":
        out[sel] = index.point_to_plane(src[sel])
    else:
        out[sel] = index.distance(src[sel])
    return out


def mesh_distance(a_vertices, a_faces, b_vertices, b_faces, *, direction: str = "symmetric",
                  metric: str = "point_to_surface", mask_a=None, mask_b=None) -> DistanceResult:
    """Distances between meshes a (N_a, 3) / (F_a, 3) and b (N_b, 3) / (F_b, 3).

    "a_to_b": each vertex of a to b's surface (for example GT -> prediction, with a = GT);
    "b_to_a": the reverse; "symmetric": both, mean = mean of the two directional means.
    `mask_a` (N_a,) bool selects which vertices of a are measured when a is the source; the target
    surface is always the whole mesh. `mask_b` likewise. point_to_plane uses interpolated
    area-weighted vertex normals of the target (see `SurfaceIndex.point_to_plane`).
    """
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if metric not in METRICS:
        raise InputError(f"metric must be one of {METRICS}, got {metric!r}")
    a = as_points(a_vertices, "a_vertices")
    b = as_points(b_vertices, "b_vertices")
    a_faces = as_faces(a_faces, len(a), "a_faces")
    b_faces = as_faces(b_faces, len(b), "b_faces")
    mask_a = None if mask_a is None else as_mask(mask_a, len(a), "mask_a")
    mask_b = None if mask_b is None else as_mask(mask_b, len(b), "mask_b")
    a_to_b = b_to_a = None
    if direction in ("symmetric", "a_to_b"):
        a_to_b = _directional(a, mask_a, SurfaceIndex(b, b_faces), metric)
    if direction in ("symmetric", "b_to_a"):
        b_to_a = _directional(b, mask_b, SurfaceIndex(a, a_faces), metric)
    mean_ab = None if a_to_b is None else float(np.nanmean(a_to_b))
    mean_ba = None if b_to_a is None else float(np.nanmean(b_to_a))
    present = [m for m in (mean_ab, mean_ba) if m is not None]
    return DistanceResult(direction, metric, float(np.mean(present)), a_to_b, b_to_a, mean_ab, mean_ba)
