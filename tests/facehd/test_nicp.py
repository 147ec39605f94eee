import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as sla
from helpers import assert_close
from scipy.spatial import Delaunay

from facehd.errors import InputError
from facehd.nicp import MeshClosestPoints, mesh_edges, nonrigid_icp

BUMP_MM = 12.0  # height of the smooth bump the tests register onto


def grid(n: int, size: float = 100.0):
    """An n x n vertex sheet of side ``size`` (mm) in the z = 0 plane, two triangles per cell."""
    ii, jj = np.meshgrid(np.linspace(0, size, n), np.linspace(0, size, n), indexing="ij")
    vertices = np.stack([jj.ravel(), ii.ravel(), np.zeros(n * n)], axis=1)
    r, c = (a.ravel() for a in np.meshgrid(np.arange(n - 1), np.arange(n - 1), indexing="ij"))
    a = r * n + c
    faces = np.concatenate([np.stack([a, a + 1, a + n + 1], 1), np.stack([a, a + n + 1, a + n], 1)])
    return vertices, faces


def bumped(vertices: np.ndarray, size: float = 100.0) -> np.ndarray:
    """The vertices with a smooth Gaussian bump added along z."""
    centre = size / 2
    radius2 = (vertices[:, 0] - centre) ** 2 + (vertices[:, 1] - centre) ** 2
    out = vertices.copy()
    out[:, 2] += BUMP_MM * np.exp(-radius2 / (2 * (size / 5) ** 2))
    return out


def curved_grid(n: int):
    """A grid on a gently curved cap, so no plane holds all vertices."""
    vertices, faces = grid(n)
    vertices[:, 2] = 0.002 * ((vertices[:, 0] - 50) ** 2 + (vertices[:, 1] - 50) ** 2)
    return vertices, faces


def point_to_surface(points, vertices, faces):
    closest, _ = MeshClosestPoints(vertices, faces)(points)
    return np.linalg.norm(closest - points, axis=1)


# ---- naive references ------------------------------------------------------------------------------


def naive_closest_on_triangle(p, a, b, c):
    """Closest point by cases: the plane projection if it falls inside, else the best of the three edges."""
    normal = np.cross(b - a, c - a)
    normal = normal / np.linalg.norm(normal)
    q = p - np.dot(p - a, normal) * normal
    inside = all(np.dot(np.cross(y - x, q - x), normal) >= 0 for x, y in ((a, b), (b, c), (c, a)))
    if inside:
        return q
    best = None
    for x, y in ((a, b), (b, c), (c, a)):
        t = np.clip(np.dot(p - x, y - x) / np.dot(y - x, y - x), 0.0, 1.0)
        candidate = x + t * (y - x)
        if best is None or np.linalg.norm(p - candidate) < np.linalg.norm(p - best):
            best = candidate
    return best


def naive_amberg_solve(vertices, faces, targets, weights, alpha, gamma, damping, landmark_index, landmark_points, beta):
    """One solve of Amberg's cost, built row by row as a dense least-squares problem."""
    n = len(vertices)
    edges = sorted({tuple(sorted((int(f[i]), int(f[(i + 1) % 3])))) for f in faces for i in range(3)})
    g = [1.0, 1.0, 1.0, gamma]
    rows, rhs = [], []
    for i, j in edges:  # alpha (M kron G) X = 0
        for k in range(4):
            row = np.zeros(4 * n)
            row[4 * i + k], row[4 * j + k] = -alpha * g[k], alpha * g[k]
            rows.append(row)
            rhs.append(np.zeros(3))
    for i in range(n):  # W D X = W U
        row = np.zeros(4 * n)
        row[4 * i : 4 * i + 4] = weights[i] * np.append(vertices[i], 1.0)
        rows.append(row)
        rhs.append(weights[i] * targets[i])
    for i, point in zip(landmark_index, landmark_points):  # beta D_L X = beta U_L
        row = np.zeros(4 * n)
        row[4 * i : 4 * i + 4] = beta * np.append(vertices[i], 1.0)
        rows.append(row)
        rhs.append(beta * point)
    identity = np.tile(np.eye(4, 3), (n, 1))
    for r in range(4 * n):  # sqrt(damping) (X - X_identity) = 0
        row = np.zeros(4 * n)
        row[r] = np.sqrt(damping)
        rows.append(row)
        rhs.append(np.sqrt(damping) * identity[r])
    solution, *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    return solution.reshape(n, 4, 3)


def sparse_amberg_solve(vertices, faces, targets, alpha, gamma, damping=0.0):
    """The same system written with the paper's matrices, solved by SuperLU."""
    n = len(vertices)
    edges = mesh_edges(faces)
    count = len(edges)
    incidence = sp.coo_matrix(
        (np.r_[-np.ones(count), np.ones(count)], (np.r_[np.arange(count), np.arange(count)], edges.T.ravel())),
        shape=(count, n),
    )
    stiffness = alpha * sp.kron(incidence, sp.diags([1.0, 1.0, 1.0, gamma]))
    homogeneous = np.c_[vertices, np.ones(n)]
    data = sp.coo_matrix((homogeneous.ravel(), (np.repeat(np.arange(n), 4), np.arange(4 * n))), shape=(n, 4 * n))
    proximal = np.sqrt(damping) * sp.identity(4 * n)
    system = sp.vstack([stiffness, data, proximal]).tocsr()
    rhs = np.vstack([np.zeros((4 * count, 3)), targets, np.sqrt(damping) * np.tile(np.eye(4, 3), (n, 1))])
    return sla.spsolve((system.T @ system).tocsc(), system.T @ rhs).reshape(n, 4, 3)


# ---- tests -----------------------------------------------------------------------------------------


def test_mesh_edges_are_the_unique_undirected_edges():
    faces = np.array([[0, 1, 2], [2, 1, 3], [3, 3, 4]])  # the last one is degenerate
    naive = sorted({tuple(sorted((int(f[i]), int(f[(i + 1) % 3])))) for f in faces for i in range(3)} - {(3, 3)})
    assert mesh_edges(faces).tolist() == [list(e) for e in naive]
    assert mesh_edges(np.zeros((0, 3), dtype=int)).shape == (0, 2)


def test_mesh_closest_points_match_the_naive_per_triangle_search():
    rng = np.random.default_rng(0)
    vertices, faces = curved_grid(5)
    vertices = vertices + rng.normal(0, 2.0, vertices.shape)
    queries = rng.uniform([-20, -20, -30], [120, 120, 60], (40, 3))
    points, normals = MeshClosestPoints(vertices, faces)(queries)
    for q, point in zip(queries, points):
        candidates = [naive_closest_on_triangle(q, *vertices[f]) for f in faces]
        best = min(np.linalg.norm(q - c) for c in candidates)
        assert np.linalg.norm(q - point) == pytest.approx(best, abs=1e-9)
    assert_close(np.linalg.norm(normals, axis=1), np.ones(len(queries)), atol=1e-12)


def test_one_solve_matches_the_dense_naive_least_squares():
    # a non-planar 6-vertex mesh (octahedron) with uneven weights, two landmarks on one vertex, gamma != 1
    vertices = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1.0]]) * 1.5 + 0.2
    faces = np.array([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    rng = np.random.default_rng(1)
    targets = vertices + rng.normal(0, 0.3, vertices.shape)
    weights = rng.uniform(0.3, 1.0, 6)
    landmark_index, landmark_points = np.array([4, 4, 1]), rng.normal(0, 1.0, (3, 3))
    settings = dict(alpha=0.9, gamma=0.7, damping=0.05, beta=1.3)
    result = nonrigid_icp(
        vertices,
        faces,
        targets,
        stiffness=[settings["alpha"]],
        gamma=settings["gamma"],
        damping=settings["damping"],
        landmark_pairs=(landmark_index, landmark_points),
        landmark_weights=[settings["beta"]],
        vertex_weights=weights,
        max_inner_iterations=1,
        normalize=False,
    )
    expected = naive_amberg_solve(
        vertices, faces, targets, weights, landmark_index=landmark_index, landmark_points=landmark_points, **settings
    )
    assert_close(result.affines, expected, atol=1e-8, rtol=0)
    assert_close(result.vertices, np.einsum("ni,nij->nj", np.c_[vertices, np.ones(6)], expected), atol=1e-8, rtol=0)
    assert len(result.history) == 1


def test_sparse_solver_matches_superlu_on_an_irregular_mesh():
    rng = np.random.default_rng(2)
    flat = rng.uniform(0, 1, (700, 2))
    faces = Delaunay(flat).simplices
    vertices = np.c_[flat, 0.3 * np.sin(3 * flat[:, 0]) * np.cos(2 * flat[:, 1])]
    targets = vertices + rng.normal(0, 0.05, vertices.shape)
    result = nonrigid_icp(
        vertices, faces, targets, stiffness=[0.7], gamma=1.4, damping=0.0, max_inner_iterations=1, normalize=False
    )
    assert_close(result.affines, sparse_amberg_solve(vertices, faces, targets, alpha=0.7, gamma=1.4), atol=1e-8)


def test_disconnected_pieces_and_unused_vertices_are_solved():
    first, faces = curved_grid(6)
    second = first + [0.0, 0.0, 40.0]
    lonely = np.array([[50.0, 50.0, -30.0]])  # in no face: only its data term and the damping hold it
    vertices = np.concatenate([first, second, lonely])
    faces = np.concatenate([faces, faces + len(first)])
    targets = bumped(vertices)
    result = nonrigid_icp(
        vertices, faces, targets, stiffness=[2.0], damping=1e-3, max_inner_iterations=1, normalize=False
    )
    expected = sparse_amberg_solve(vertices, faces, targets, alpha=2.0, gamma=1.0, damping=1e-3)
    assert_close(result.affines, expected, atol=1e-8)


def test_fixed_targets_register_a_bump_in_few_solves():
    vertices, faces = grid(12)
    target = bumped(vertices)
    initial = np.linalg.norm(target - vertices, axis=1).mean()
    result = nonrigid_icp(vertices, faces, target, stiffness=(50, 20, 5, 2, 0.8, 0.2))
    residual = np.linalg.norm(result.vertices - target, axis=1).mean()
    assert residual < 0.05 * initial
    steps = [record.step for record in result.history]
    assert sorted(set(steps)) == [0, 1, 2, 3, 4, 5] and len(steps) <= 12  # the re-solve only undoes damping


@pytest.mark.parametrize("mode", ["mesh", "callable", "incremental"])
def test_surface_targets_register_a_bump(mode):
    vertices, faces = grid(12)
    target_vertices = bumped(vertices)
    surface = MeshClosestPoints(target_vertices, faces)
    calls = []

    def closest(points):
        calls.append(len(points))
        return surface(points)

    target = (target_vertices, faces) if mode == "mesh" else closest
    result = nonrigid_icp(
        vertices, faces, target, stiffness=(50, 20, 5, 2, 0.8, 0.2), incremental=mode == "incremental"
    )
    initial = point_to_surface(vertices, target_vertices, faces).mean()
    assert point_to_surface(result.vertices, target_vertices, faces).mean() < 0.05 * initial
    assert np.all(np.isfinite(result.vertices))
    if mode == "callable":
        assert len(calls) >= len(result.history) and set(calls) == {len(vertices)}
    homogeneous = np.c_[vertices, np.ones(len(vertices))]
    assert_close(np.einsum("ni,nij->nj", homogeneous, result.affines), result.vertices, atol=1e-9)


def test_very_high_stiffness_gives_one_global_affine():
    vertices, faces = curved_grid(10)
    target = bumped(vertices)
    result = nonrigid_icp(vertices, faces, target, stiffness=[1e3])
    spread = np.abs(result.affines - result.affines.mean(axis=0)).max(axis=0)
    assert spread[:3].max() < 1e-6 and spread[3].max() < 1e-4  # linear part, translation (mm)
    # ... and that affine is the least-squares affine fit of the targets
    homogeneous = np.c_[vertices, np.ones(len(vertices))]
    best, *_ = np.linalg.lstsq(homogeneous, target, rcond=None)
    assert_close(result.vertices, homogeneous @ best, atol=1e-4, rtol=0)


def test_landmarks_pull_their_vertices_to_the_landmark_targets():
    vertices, faces = grid(12)
    index = np.array([15, 70, 128])
    goals = vertices[index] + np.array([[0, 0, 6.0], [0, 0, -5.0], [3.0, -2.0, 4.0]])
    free = nonrigid_icp(vertices, faces, vertices, stiffness=(5, 2))
    pulled = nonrigid_icp(
        vertices, faces, vertices, stiffness=(5, 2), landmark_pairs=(index, goals), landmark_weights=(50, 50)
    )
    assert_close(free.vertices, vertices, atol=1e-6)
    assert np.linalg.norm(pulled.vertices[index] - goals, axis=1).max() < 0.1
    assert np.linalg.norm(free.vertices[index] - goals, axis=1).min() > 4.0


@pytest.mark.parametrize("mode", ["fixed", "mesh"])
def test_identical_source_and_target_give_the_identity(mode):
    vertices, faces = curved_grid(8)
    target = vertices if mode == "fixed" else (vertices, faces)
    result = nonrigid_icp(vertices, faces, target)
    assert_close(result.vertices, vertices, atol=1e-8, rtol=0)  # mm, on a 100 mm sheet
    assert_close(result.affines, np.tile(np.eye(4, 3), (len(vertices), 1, 1)), atol=1e-8, rtol=0)


@pytest.mark.parametrize("mode", ["fixed", "mesh"])
def test_vertex_order_does_not_matter(mode):
    vertices, faces = grid(11)
    target = bumped(vertices)
    perm = np.random.default_rng(3).permutation(len(vertices))
    inverse = np.argsort(perm)
    stiffness = (20, 2, 0.5)
    if mode == "fixed":
        plain = nonrigid_icp(vertices, faces, target, stiffness=stiffness)
        permuted = nonrigid_icp(vertices[perm], inverse[faces], target[perm], stiffness=stiffness)
    else:
        plain = nonrigid_icp(vertices, faces, (target, faces), stiffness=stiffness)
        permuted = nonrigid_icp(vertices[perm], inverse[faces], (target, faces), stiffness=stiffness)
    assert_close(permuted.vertices, plain.vertices[perm], atol=1e-8)
    assert_close(permuted.affines, plain.affines[perm], atol=1e-8)


def test_results_do_not_depend_on_units():
    vertices, faces = grid(10)
    target = bumped(vertices)
    in_mm = nonrigid_icp(vertices, faces, target, stiffness=(10, 1))
    in_m = nonrigid_icp(vertices / 1000, faces, target / 1000, stiffness=(10, 1))
    assert_close(in_m.vertices * 1000, in_mm.vertices, atol=1e-7)
    assert_close(in_m.affines[:, :3], in_mm.affines[:, :3], atol=1e-9)


def test_far_correspondences_are_rejected():
    vertices, faces = grid(10)
    target = bumped(vertices)
    outliers = np.arange(0, 100, 9)
    spoiled = target.copy()
    spoiled[outliers] += [0, 0, 80.0]
    rejected = nonrigid_icp(vertices, faces, spoiled, stiffness=(10, 1), max_distance=30.0)
    weights = np.ones(len(vertices))
    weights[outliers] = 0.0
    ignored = nonrigid_icp(vertices, faces, target, stiffness=(10, 1), vertex_weights=weights)
    assert_close(rejected.vertices, ignored.vertices, atol=1e-9)
    assert {record.n_matched for record in rejected.history} == {len(vertices) - len(outliers)}


def test_flipped_normals_and_missing_points_are_rejected():
    vertices, faces = grid(10)
    target = bumped(vertices)
    flipped, missing = np.arange(0, 100, 7), np.arange(3, 100, 11)

    def closest(points):
        normals = np.tile([0.0, 0.0, 1.0], (len(points), 1))
        normals[flipped] *= -1
        found = target.copy()
        found[missing] = np.nan
        return found, normals

    result = nonrigid_icp(vertices, faces, closest, stiffness=(10, 1), normal_angle_max=60.0)
    weights = np.ones(len(vertices))
    weights[flipped] = weights[missing] = 0.0
    expected = nonrigid_icp(vertices, faces, target, stiffness=(10, 1), vertex_weights=weights)
    assert_close(result.vertices, expected.vertices, atol=1e-9)
    assert result.history[0].n_matched == int(weights.sum())


def test_invalid_inputs_are_rejected_with_the_problem_named():
    vertices, faces = grid(4)
    target = bumped(vertices)
    nan_vertices = vertices.copy()
    nan_vertices[3, 1] = np.nan
    cases = [
        (dict(src_vertices=nan_vertices), "NaN"),
        (dict(src_vertices=vertices[:, :2]), r"shape \(P, 3\)"),
        (dict(src_faces=faces + 1), r"\[0, 16\)"),
        (dict(src_faces=faces + 0.5), "integer"),
        (dict(src_faces=np.zeros((0, 3), dtype=int)), "empty"),
        (dict(src_faces=np.array([[1, 1, 1]])), "no edges"),
        (dict(target=target[:5]), "one per source vertex"),
        (dict(target=np.full_like(target, np.inf)), "NaN or inf"),
        (dict(landmark_pairs=(np.array([0, 1]), target[:3])), "2 source indices but 3 target points"),
        (dict(landmark_pairs=(np.array([0, 99]), target[:2])), "landmark_pairs"),
        (dict(landmark_pairs=(np.array([0]), target[:1]), landmark_weights=(1.0, 2.0)), "landmark_weights"),
        (dict(landmark_weights=(1.0,)), "without landmark_pairs"),
        (dict(stiffness=[]), "stiffness"),
        (dict(stiffness=[5.0, -1.0]), "stiffness"),
        (dict(vertex_weights=np.full(16, 2.0)), r"\[0, 1\]"),
        (dict(vertex_weights=np.ones(5)), "vertex_weights"),
        (dict(max_distance=-1.0), "max_distance"),
        (dict(normal_angle_max=30.0), "normals"),
        (dict(gamma=0.0), "gamma"),
        (dict(max_inner_iterations=0), "max_inner_iterations"),
        (dict(target=lambda p: p), "pair"),
        (dict(target=lambda p: (p[:3], None)), "shape"),
    ]
    for change, message in cases:
        arguments = dict(src_vertices=vertices, src_faces=faces, target=target)
        arguments.update(change)
        positional = [arguments.pop(name) for name in ("src_vertices", "src_faces", "target")]
        with pytest.raises(InputError, match=message):
            nonrigid_icp(*positional, **arguments)


def test_an_undetermined_system_is_reported():
    # a flat sheet leaves the normal row of the linear part free: without damping there is no unique solution
    vertices, faces = grid(4)
    with pytest.raises(InputError, match="not positive definite"):
        nonrigid_icp(vertices, faces, vertices, stiffness=[1.0], damping=0.0)


def naive_menpo3d_schedule(vertices, faces, targets, stiffness, landmark_index, landmark_points, betas, eps):
    """menpo3d's non_rigid_icp loop with fixed targets, step by step, in the unit-diagonal frame:
    each solve's affines act on the current vertices; a step ends once ||X - X_prev||_F / sqrt(X.size)
    < eps, X_prev the previous solve's affines (zero before the first, carried across steps)."""
    centre, scale = vertices.mean(axis=0), 1.0 / np.linalg.norm(np.ptp(vertices, axis=0))
    current = (vertices - centre) * scale
    u, lm = (targets - centre) * scale, (landmark_points - centre) * scale
    previous, solves = np.zeros((len(vertices), 4, 3)), []
    for alpha, beta in zip(stiffness, betas):
        count = 0
        while True:
            x = naive_amberg_solve(current, faces, u, np.ones(len(current)), alpha, 1.0, 0.0,
                                   landmark_index, lm, beta)
            current = np.einsum("ni,nij->nj", np.c_[current, np.ones(len(current))], x)
            count += 1
            change = np.linalg.norm(x - previous) / np.sqrt(x.size)
            previous = x
            if change < eps:
                break
        solves.append(count)
    return current / scale + centre, solves


def test_menpo3d_stop_rule_matches_a_naive_loop():
    vertices, faces = curved_grid(6)
    targets = bumped(vertices)
    landmark_index, landmark_points = np.array([0, 14, 35]), bumped(vertices)[[0, 14, 35]] + [0.0, 0.0, 2.0]
    stiffness, betas, eps = [50.0, 5.0, 0.8], [5.0, 0.5, 0.0], 1e-3
    expected, solves = naive_menpo3d_schedule(vertices, faces, targets, stiffness, landmark_index, landmark_points,
                                              betas, eps)
    result = nonrigid_icp(vertices, faces, targets, stiffness=stiffness, landmark_weights=betas,
                          landmark_pairs=(landmark_index, landmark_points), incremental=True, stop="affine_change",
                          tol=eps, damping=0.0, max_inner_iterations=1000)
    assert [sum(1 for h in result.history if h.step == s) for s in range(3)] == solves
    assert max(solves) > 1
    assert_close(result.vertices, expected, atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="incremental"):
        nonrigid_icp(vertices, faces, targets, stop="affine_change")
    with pytest.raises(InputError, match="stop must be"):
        nonrigid_icp(vertices, faces, targets, stop="sometimes")
