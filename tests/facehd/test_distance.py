import numpy as np
import pytest
import torch
from helpers import assert_close

from facehd.distance import (
    SurfaceIndex,
    closest_points_on_mesh,
    face_normals_np,
    mesh_distance,
    point_to_plane,
    point_to_surface,
    vertex_normals_np,
)
from facehd.errors import InputError
from facehd.morphable import face_normals


def grid_mesh(n: int = 6, *, seed: int = 0, bump: float = 0.15, size: float = 1.0):
    """An n x n vertex sheet over [0, size]^2 with random heights; counter-clockwise seen from +z."""
    rng = np.random.default_rng(seed)
    ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    xy = np.stack([jj.ravel(), ii.ravel()], 1) * size / (n - 1)
    vertices = np.column_stack([xy, bump * size * rng.standard_normal(n * n)])
    faces = []
    for r in range(n - 1):
        for c in range(n - 1):
            a, b, d, e = r * n + c, r * n + c + 1, (r + 1) * n + c, (r + 1) * n + c + 1
            faces += [(a, b, e), (a, e, d)]
    return vertices, np.array(faces)


# --- naive references -----------------------------------------------------------------------------

def naive_closest_on_triangle(p, a, b, c):
    """Ericson, Real-Time Collision Detection 5.1.5, one point and one triangle."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = ab @ ap, ac @ ap
    if d1 <= 0 and d2 <= 0:
        return a
    bp = p - b
    d3, d4 = ab @ bp, ac @ bp
    if d3 >= 0 and d4 <= d3:
        return b
    vc = d1 * d4 - d3 * d2
    if vc <= 0 and d1 >= 0 and d3 <= 0:
        return a + d1 / (d1 - d3) * ab
    cp = p - c
    d5, d6 = ab @ cp, ac @ cp
    if d6 >= 0 and d5 <= d6:
        return c
    vb = d5 * d2 - d1 * d6
    if vb <= 0 and d2 >= 0 and d6 <= 0:
        return a + d2 / (d2 - d6) * ac
    va = d3 * d6 - d5 * d4
    if va <= 0 and d4 - d3 >= 0 and d5 - d6 >= 0:
        return b + (d4 - d3) / ((d4 - d3) + (d5 - d6)) * (c - b)
    denom = 1.0 / (va + vb + vc)
    return a + ab * vb * denom + ac * vc * denom


def naive_closest(points, vertices, faces):
    """Closest point, distance and face by trying every triangle for every point."""
    out_q, out_d, out_f = [], [], []
    for p in points:
        cands = [naive_closest_on_triangle(p, *vertices[f]) for f in faces]
        dist = [np.linalg.norm(p - q) for q in cands]
        k = int(np.argmin(dist))
        out_q.append(cands[k])
        out_d.append(dist[k])
        out_f.append(k)
    return np.array(out_q), np.array(out_d), np.array(out_f)


def naive_vertex_normals(vertices, faces):
    acc = np.zeros_like(vertices)
    for f in faces:
        a, b, c = vertices[f]
        n = np.cross(b - a, c - a)  # length = twice the area: area weighting
        for v in f:
            acc[v] += n
    return acc / np.linalg.norm(acc, axis=1, keepdims=True)


def barycentric_of(q, a, b, c):
    """Weights of q (a point of the triangle's plane) by least squares."""
    m = np.column_stack([b - a, c - a])
    uv = np.linalg.lstsq(m, q - a, rcond=None)[0]
    return np.array([1 - uv.sum(), uv[0], uv[1]])


# --- queries ----------------------------------------------------------------------------------------

def feature_queries(vertices, faces):
    """Points whose closest feature is known: a corner vertex, a border edge, a face interior."""
    corner = vertices[0] + np.array([-0.3, -0.2, 0.05])  # beyond vertex 0, the grid's (0, 0) corner
    # off the middle of the border edge y = 0, x in [0, 0.2], perpendicular to the edge
    along = (vertices[1] - vertices[0]) / np.linalg.norm(vertices[1] - vertices[0])
    offset = np.array([0.0, -0.25, 0.1])
    edge = 0.5 * (vertices[0] + vertices[1]) + offset - (offset @ along) * along
    a, b, c = vertices[faces[7]]
    n = np.cross(b - a, c - a)
    interior = (a + b + c) / 3 + 0.01 * n / np.linalg.norm(n)
    return np.stack([corner, edge, interior])


@pytest.fixture(scope="module")
def mesh():
    return grid_mesh()


@pytest.fixture(scope="module")
def queries(mesh):
    rng = np.random.default_rng(1)
    near = rng.uniform([-0.1, -0.1, -0.3], [1.1, 1.1, 0.3], (40, 3))
    far = rng.normal(0.5, 3.0, (10, 3))
    return np.concatenate([near, far, feature_queries(*mesh)])


def test_closest_points_match_brute_force(mesh, queries):
    vertices, faces = mesh
    hit = closest_points_on_mesh(queries, vertices, faces)
    q, d, _ = naive_closest(queries, vertices, faces)
    # float32 scene only chooses the triangle; the point on it is recomputed in float64
    assert_close(hit.distances, d, atol=1e-6, rtol=0, msg="distances")
    assert_close(hit.points, q, atol=1e-5, rtol=0, msg="closest points")


def test_barycentric_reproduces_the_closest_points(mesh, queries):
    vertices, faces = mesh
    hit = closest_points_on_mesh(queries, vertices, faces)
    tri = vertices[faces[hit.face_index]]
    assert_close(np.einsum("pk,pkd->pd", hit.barycentric, tri), hit.points, atol=1e-12)
    assert_close(hit.barycentric.sum(1), np.ones(len(queries)), atol=1e-12)
    assert (hit.barycentric >= -1e-12).all()
    assert_close(hit.distances, np.linalg.norm(queries - hit.points, axis=1), atol=1e-12)


def test_closest_feature_vertex_edge_interior(mesh):
    vertices, faces = mesh
    corner, edge, interior = feature_queries(vertices, faces)
    hit = closest_points_on_mesh(np.stack([corner, edge, interior]), vertices, faces)
    assert_close(hit.points[0], vertices[0], atol=1e-12, msg="vertex")
    assert np.isclose(hit.barycentric[0], 1.0, atol=1e-12).sum() == 1
    assert_close(hit.points[1], 0.5 * (vertices[0] + vertices[1]), atol=1e-9, msg="edge")
    assert np.isclose(hit.barycentric[1], 0.0, atol=1e-12).sum() == 1
    a, b, c = vertices[faces[7]]
    assert hit.face_index[2] == 7
    assert_close(hit.points[2], (a + b + c) / 3, atol=1e-9, msg="interior")
    assert_close(hit.distances[2], 0.01, atol=1e-9)
    assert (hit.barycentric[2] > 0.3).all()


def test_surface_index_reuses_its_scene(mesh, queries):
    vertices, faces = mesh
    index = SurfaceIndex(vertices, faces)
    first = index.distance(queries)
    assert_close(index.distance(queries[::-1]), first[::-1], atol=0)
    assert_close(point_to_surface(queries, vertices, faces), first, atol=0)


def test_point_to_plane_matches_naive(mesh, queries):
    vertices, faces = mesh
    q, _, f = naive_closest(queries, vertices, faces)
    normals = naive_vertex_normals(vertices, faces)
    expected_vertex, expected_face, interior = [], [], []
    for p, qi, fi in zip(queries, q, f):
        tri = vertices[faces[fi]]
        bary = barycentric_of(qi, *tri)
        n = bary @ normals[faces[fi]]
        expected_vertex.append(abs((p - qi) @ n) / np.linalg.norm(n))
        fn = np.cross(tri[1] - tri[0], tri[2] - tri[0])
        expected_face.append(abs((p - qi) @ fn) / np.linalg.norm(fn))
        interior.append((bary > 1e-6).all())  # the face is unambiguous only inside it
    interior = np.array(interior)
    assert interior.sum() >= 5
    assert_close(point_to_plane(queries, vertices, faces), np.array(expected_vertex), atol=1e-6)
    by_face = point_to_plane(queries, vertices, faces, normals="face")
    assert_close(by_face[interior], np.array(expected_face)[interior], atol=1e-6)
    # given normals are used as they are: flipping them changes nothing under |.|
    assert_close(point_to_plane(queries, vertices, faces, -normals), np.array(expected_vertex), atol=1e-6)
    assert (point_to_plane(queries, vertices, faces) <= point_to_surface(queries, vertices, faces) + 1e-12).all()


def test_normals_match_naive_and_the_torch_convention(mesh):
    vertices, faces = mesh
    assert_close(vertex_normals_np(vertices, faces), naive_vertex_normals(vertices, faces), atol=1e-12)
    expected = face_normals(torch.from_numpy(vertices)[None], torch.from_numpy(faces))[0]
    assert_close(face_normals_np(vertices, faces), expected, atol=1e-12)
    assert (face_normals_np(vertices, faces)[:, 2] > 0).all()  # counter-clockwise seen from +z


# --- mesh to mesh -------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["point_to_surface", "point_to_plane"])
@pytest.mark.parametrize("direction", ["symmetric", "a_to_b", "b_to_a"])
def test_identical_meshes_are_zero(direction, metric):
    vertices, faces = grid_mesh(12, seed=3)
    result = mesh_distance(vertices, faces, vertices, faces, direction=direction, metric=metric)
    assert result.mean < 1e-9  # model units
    # millimetres, far from the origin: float32 closest points alone leave ~5e-5 mm here
    mm = vertices * 100.0 + np.array([1000.0, -2000.0, 500.0])
    result = mesh_distance(mm, faces, mm, faces, direction=direction, metric=metric)
    for d in (result.a_to_b, result.b_to_a):
        if d is not None:
            assert np.max(d) < 1e-5


@pytest.mark.parametrize("metric", ["point_to_surface", "point_to_plane"])
def test_plane_offset_by_d_gives_d(metric):
    vertices, faces = grid_mesh(8, bump=0.0)
    offset = vertices + np.array([0.0, 0.0, 0.037])
    result = mesh_distance(vertices, faces, offset, faces, metric=metric)
    assert_close(result.a_to_b, np.full(len(vertices), 0.037), atol=1e-9)
    assert_close(result.b_to_a, np.full(len(vertices), 0.037), atol=1e-9)
    assert_close(result.mean, 0.037, atol=1e-9)
    assert result.direction == "symmetric" and result.metric == metric


def test_symmetric_is_the_mean_of_both_directions():
    a_v, a_f = grid_mesh(7, seed=4)
    b_v, b_f = grid_mesh(9, seed=5)
    sym = mesh_distance(a_v, a_f, b_v, b_f)
    ab = mesh_distance(a_v, a_f, b_v, b_f, direction="a_to_b")
    ba = mesh_distance(a_v, a_f, b_v, b_f, direction="b_to_a")
    assert ab.b_to_a is None and ba.a_to_b is None
    assert_close(sym.a_to_b, point_to_surface(a_v, b_v, b_f), atol=0)
    assert_close(sym.b_to_a, point_to_surface(b_v, a_v, a_f), atol=0)
    assert_close(sym.mean, 0.5 * (ab.mean + ba.mean), atol=1e-15)
    assert ab.mean != ba.mean  # the two directions really differ here
    assert "symmetric" in sym.describe("GT", "prediction") and "GT -> prediction" in ab.describe("GT", "prediction")


def test_masks_select_the_measured_vertices():
    a_v, a_f = grid_mesh(7, seed=4)
    b_v, b_f = grid_mesh(9, seed=5)
    mask_a = np.arange(len(a_v)) % 3 == 0
    mask_b = np.arange(len(b_v)) < 20
    result = mesh_distance(a_v, a_f, b_v, b_f, mask_a=mask_a, mask_b=mask_b)
    assert np.isnan(result.a_to_b[~mask_a]).all() and np.isnan(result.b_to_a[~mask_b]).all()
    assert_close(result.mean_a_to_b, point_to_surface(a_v[mask_a], b_v, b_f).mean(), atol=1e-15)
    assert_close(result.mean_b_to_a, point_to_surface(b_v[mask_b], a_v, a_f).mean(), atol=1e-15)


@pytest.mark.parametrize("metric", ["point_to_surface", "point_to_plane"])
def test_vertex_order_and_winding_do_not_matter(metric):
    a_v, a_f = grid_mesh(7, seed=4)
    b_v, b_f = grid_mesh(9, seed=5)
    rng = np.random.default_rng(6)
    perm = rng.permutation(len(b_v))  # new vertex k is old vertex perm[k]
    inverse = np.argsort(perm)
    shuffled_faces = inverse[b_f][rng.permutation(len(b_f))][:, ::-1]  # reordered and rewound
    expected = mesh_distance(a_v, a_f, b_v, b_f, direction="a_to_b", metric=metric).a_to_b
    actual = mesh_distance(a_v, a_f, b_v[perm], shuffled_faces, direction="a_to_b", metric=metric).a_to_b
    assert_close(actual, expected, atol=1e-9)


def test_degenerate_triangles_are_skipped():
    vertices, faces = grid_mesh(5, seed=7)
    extra = np.vstack([vertices, [[0.5, 0.5, 5.0]]])  # a far vertex used only by a zero-area triangle
    faces_plus = np.vstack([faces, [[len(vertices), len(vertices), 0]]])
    points = np.array([[0.5, 0.5, 4.9], [0.2, 0.3, 0.1]])
    hit = closest_points_on_mesh(points, extra, faces_plus)
    assert (hit.face_index < len(faces)).all()
    assert_close(hit.distances, naive_closest(points, vertices, faces)[1], atol=1e-6)


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "points, match",
    [
        (np.array([[0.0, np.nan, 0.0]]), "NaN or inf"),
        (np.array([[0.0, np.inf, 0.0]]), "NaN or inf"),
        (np.zeros((0, 3)), "empty"),
        (np.zeros((4, 2)), r"shape \(P, 3\)"),
        (np.zeros(3), r"shape \(P, 3\)"),
    ],
)
def test_bad_points_raise(mesh, points, match):
    with pytest.raises(InputError, match=match):
        point_to_surface(points, *mesh)


def test_bad_meshes_raise(mesh):
    vertices, faces = mesh
    p = vertices[:2]
    with pytest.raises(InputError, match="indices must lie"):
        point_to_surface(p, vertices, faces + 1)
    with pytest.raises(InputError, match="integers"):
        point_to_surface(p, vertices, faces + 0.5)
    with pytest.raises(InputError, match="empty"):
        point_to_surface(p, vertices, np.zeros((0, 3), int))
    with pytest.raises(InputError, match="non-degenerate"):
        point_to_surface(p, vertices, np.array([[0, 0, 1]]))
    with pytest.raises(InputError, match="NaN"):
        point_to_surface(p, np.where(np.arange(len(vertices))[:, None] == 3, np.nan, vertices), faces)
    point_to_surface(p, vertices, faces.astype(float))  # integral floats (.mat files) are accepted


def test_bad_options_raise(mesh):
    vertices, faces = mesh
    with pytest.raises(InputError, match="direction"):
        mesh_distance(vertices, faces, vertices, faces, direction="gt_to_pred")
    with pytest.raises(InputError, match="metric"):
        mesh_distance(vertices, faces, vertices, faces, metric="chamfer")
    with pytest.raises(InputError, match="mask_a"):
        mesh_distance(vertices, faces, vertices, faces, mask_a=np.ones(3, bool))
    with pytest.raises(InputError, match="selects no"):
        mesh_distance(vertices, faces, vertices, faces, mask_b=np.zeros(len(vertices), bool))
    with pytest.raises(InputError, match="normals must be"):
        point_to_plane(vertices, vertices, faces, normals="smooth")
    with pytest.raises(InputError, match="vertex normals"):
        point_to_plane(vertices, vertices, faces, np.ones((2, 3)))
