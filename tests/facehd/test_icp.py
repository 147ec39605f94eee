import numpy as np
import open3d as o3d
import pytest
from helpers import assert_close
from scipy.spatial.transform import Rotation

from facehd.distance import point_to_surface, vertex_normals_np
from facehd.errors import InputError
from facehd.icp import rigid_icp, similarity_icp
from facehd.procrustes import Similarity

# Gaussian bumps (centre x, centre y, height, width) making a face-like height field on [-1, 1]^2:
# a nose, two eye sockets, a mouth ridge and a brow, so no pose slides along the surface.
BUMPS = [(0.0, 0.0, 0.35, 0.18), (-0.4, 0.35, -0.12, 0.15), (0.4, 0.35, -0.12, 0.15),
         (0.0, -0.5, 0.1, 0.2), (0.0, 0.7, 0.08, 0.35)]


def face_surface(n: int):
    """An n x n vertex height-field mesh z = sum of Gaussian bumps over [-1, 1]^2."""
    t = np.linspace(-1.0, 1.0, n)
    x, y = (a.ravel() for a in np.meshgrid(t, t))
    z = sum(h * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * w * w)) for cx, cy, h, w in BUMPS)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    return np.stack([x, y, z], 1), faces


def sample_surface(vertices, faces, count: int, rng):
    """Uniform random points on the triangles (area-weighted)."""
    tri = vertices[faces]
    area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    pick = rng.choice(len(faces), count, p=area / area.sum())
    u, v = rng.random(count), rng.random(count)
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    t = tri[pick]
    return t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])


def rotation_error_deg(a, b) -> float:
    return float(np.degrees(Rotation.from_matrix(a @ b.T).magnitude()))


@pytest.fixture(scope="module")
def surface():
    return face_surface(81)


@pytest.fixture(scope="module")
def pose():
    """The known small pose: ~5 degrees and a translation of a few percent of the 2-unit size."""
    rotation = Rotation.from_rotvec(np.radians(5.0) * np.array([0.3, -0.8, 0.5]) / np.linalg.norm([0.3, -0.8, 0.5]))
    return Similarity(1.0, rotation.as_matrix(), [0.06, -0.04, 0.05])


def test_rigid_icp_recovers_a_small_pose(surface, pose):
    vertices, faces = surface
    samples = sample_surface(vertices, faces, 4000, np.random.default_rng(0))
    src = pose.inverse().apply(samples)  # the source sits off by the inverse pose
    result = rigid_icp(src, vertices, faces, max_distances=(0.3, 0.1, 0.03))
    assert result.transform.scale == 1.0
    assert rotation_error_deg(result.transform.rotation, pose.rotation) < np.degrees(1e-3)
    assert np.linalg.norm(result.transform.translation - pose.translation) < 2e-3  # of a 2-unit surface
    # open3d's inlier RMSE is to the nearest target vertex (spacing 0.025); the surface is closer
    assert result.fitness > 0.99 and result.inlier_rmse < 0.025
    assert point_to_surface(result.transform.apply(src), vertices, faces).mean() < 1e-4
    assert [s.max_distance for s in result.history] == [0.3, 0.1, 0.03]


def test_rigid_icp_keeps_the_init_scale(surface, pose):
    """Source in 'mm' (100 per unit) with a landmark-like init that is slightly off."""
    vertices, faces = surface
    samples = sample_surface(vertices, faces, 3000, np.random.default_rng(1))
    truth = pose.compose(Similarity(0.01, np.eye(3), np.zeros(3)))  # mm -> units, then the pose
    src_mm = truth.inverse().apply(samples)
    nudge = Similarity(1.0, Rotation.from_euler("z", 2.0, degrees=True).as_matrix(), [0.02, 0.0, -0.02])
    init = nudge.compose(truth)
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(src_mm))  # an open3d cloud is accepted
    result = rigid_icp(cloud, vertices, faces, init=init, max_distances=(0.2, 0.05, 0.02))
    assert result.transform.scale == init.scale
    assert_close(result.transform.apply(src_mm), samples, atol=3e-3, rtol=0)
    assert rotation_error_deg(result.transform.rotation, truth.rotation) < 0.1


def test_rigid_icp_with_target_points_and_normals(surface, pose):
    vertices, faces = surface
    samples = sample_surface(vertices, faces, 2000, np.random.default_rng(2))
    src = pose.inverse().apply(samples)
    with_normals = rigid_icp(src, vertices, tgt_normals=vertex_normals_np(vertices, faces), max_distances=(0.3, 0.03))
    estimated = rigid_icp(src, vertices, max_distances=(0.3, 0.03), iterations=(20, 40))
    for result in (with_normals, estimated):
        assert rotation_error_deg(result.transform.rotation, pose.rotation) < 0.1
        assert np.linalg.norm(result.transform.translation - pose.translation) < 5e-3


def test_rigid_icp_rejects_bad_schedules(surface):
    vertices, faces = surface
    with pytest.raises(InputError, match="max_distances"):
        rigid_icp(vertices, vertices, faces, max_distances=(0.1, -1.0))
    with pytest.raises(InputError, match="iterations"):
        rigid_icp(vertices, vertices, faces, max_distances=(0.1, 0.05), iterations=(10,))
    with pytest.raises(InputError, match="source points"):
        rigid_icp(np.zeros((0, 3)), vertices, faces)


# --- similarity ICP (MICC loop) ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_surface():
    return face_surface(31)


def test_similarity_icp_recovers_a_scaled_rotated_copy(small_surface):
    vertices, faces = small_surface
    truth = Similarity(1.3, Rotation.from_euler("xyz", [8, -12, 5], degrees=True).as_matrix(), [0.2, -0.1, 0.3])
    src = truth.inverse().apply(vertices)  # src -> target is `truth`
    mask = np.linalg.norm(vertices[:, :2], axis=1) < 0.8  # a "within 95 mm of the nose tip" region
    transform, history, distances = similarity_icp(src, mask, vertices, faces, init_correspondences=vertices)
    assert history[-1] < 1e-9 and np.max(distances) < 1e-9  # ~0 everywhere, masked or not
    assert_close(transform.scale, 1.3, atol=1e-9)
    assert_close(transform.rotation, truth.rotation, atol=1e-9)
    assert distances.shape == (len(src),)


def test_similarity_icp_stops_when_the_improvement_is_below_tol(small_surface):
    vertices, faces = small_surface
    rng = np.random.default_rng(3)
    # a noisy copy off by a small pose, started from closest points: many small improvements
    truth = Similarity(1.05, Rotation.from_euler("y", 6, degrees=True).as_matrix(), [0.05, 0.0, 0.02])
    src = truth.inverse().apply(vertices) + rng.normal(0, 0.005, vertices.shape)
    mask = np.ones(len(src), bool)
    tol = 1e-4
    result = similarity_icp(src, mask, vertices, faces, tol=tol)
    steps = -np.diff(result.history)
    assert len(result.history) >= 3
    assert (steps[:-1] > tol).all() and steps[-1] <= tol
    assert result.history[-1] < 0.7 * result.history[0]
    assert_close(result.distances, point_to_surface(result.transform.apply(src), vertices, faces), atol=1e-12)
    # a huge tolerance stops after the second iteration; a budget of one stops after one
    assert len(similarity_icp(src, mask, vertices, faces, tol=10.0).history) == 2
    assert len(similarity_icp(src, mask, vertices, faces, max_iter=1).history) == 1


def test_similarity_icp_rejects_bad_input(small_surface):
    vertices, faces = small_surface
    with pytest.raises(InputError, match="src mask"):
        similarity_icp(vertices, np.ones(3, bool), vertices, faces)
    with pytest.raises(InputError, match="initial correspondences"):
        similarity_icp(vertices, np.ones(len(vertices), bool), vertices, faces, init_correspondences=vertices[:5])
    with pytest.raises(InputError, match="collinear"):
        similarity_icp(vertices, np.arange(len(vertices)) < 2, vertices, faces)
