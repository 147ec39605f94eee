import numpy as np
import pytest
from helpers import assert_close
from scipy.spatial import Delaunay

from facehd.errors import InputError
from facehd.nicp import mesh_edges
from facehd.sparse_cholesky import (
    HOMOGENEOUS,
    BlockCholesky,
    CholmodCholesky,
    block_cholesky,
    cholmod_available,
)

BACKENDS = ["nested-dissection", pytest.param("cholmod", marks=pytest.mark.skipif(
    not cholmod_available(), reason="cvxopt (CHOLMOD) is not installed"))]


def irregular_mesh(n: int, seed: int):
    """A Delaunay sheet of ``n`` random points on a gentle curve: irregular degrees, many fronts."""
    rng = np.random.default_rng(seed)
    flat = rng.uniform(0, 1, (n, 2))
    faces = Delaunay(flat).simplices
    return np.c_[flat, 0.3 * np.sin(3 * flat[:, 0])], faces


def block_system(n_vertices: int, edges: np.ndarray, seed: int):
    """Random SPD blocks in the shape non-rigid ICP makes: a Laplacian times an SPD 4x4 block (the same
    for every seed) plus a rank-one data block and a little damping per vertex."""
    g = np.random.default_rng(0).normal(size=(HOMOGENEOUS, HOMOGENEOUS))
    rng = np.random.default_rng(seed)
    g2 = g @ g.T + np.eye(HOMOGENEOUS)
    degree = np.bincount(edges.ravel(), minlength=n_vertices).astype(np.float64)
    h = np.c_[rng.normal(size=(n_vertices, 3)), np.ones(n_vertices)]
    diagonal = degree[:, None, None] * g2 + rng.uniform(0, 2, n_vertices)[:, None, None] * (
        h[:, :, None] * h[:, None, :]) + 1e-3 * np.eye(HOMOGENEOUS)
    return diagonal, -g2, rng.normal(size=(n_vertices, HOMOGENEOUS, 3))


def dense_matrix(diagonal: np.ndarray, off_diagonal: np.ndarray, edges: np.ndarray) -> np.ndarray:
    n, h = len(diagonal), HOMOGENEOUS
    dense = np.zeros((h * n, h * n))
    for i, block in enumerate(diagonal):
        dense[h * i : h * i + h, h * i : h * i + h] = block
    for a, b in edges:
        dense[h * a : h * a + h, h * b : h * b + h] = off_diagonal
        dense[h * b : h * b + h, h * a : h * a + h] = off_diagonal.T
    return dense


@pytest.mark.parametrize("backend", BACKENDS)
def test_solves_match_a_dense_solve(backend):
    vertices, faces = irregular_mesh(300, seed=3)
    # a second, disconnected piece and a vertex in no edge
    vertices = np.concatenate([vertices, vertices + [0, 0, 2.0], [[5.0, 5.0, 5.0]]])
    faces = np.concatenate([faces, faces + 300])
    edges = mesh_edges(faces)
    diagonal, off_diagonal, rhs = block_system(len(vertices), edges, seed=4)
    cholesky = block_cholesky(vertices, edges, backend=backend)
    expected = np.linalg.solve(dense_matrix(diagonal, off_diagonal, edges), rhs.reshape(-1, 3)).reshape(rhs.shape)
    assert_close(cholesky.factorize(diagonal, off_diagonal).solve(rhs), expected, atol=1e-9, rtol=1e-9)
    # the analysis is reused: a second numeric factorization of other values is as exact
    diagonal2, _, rhs2 = block_system(len(vertices), edges, seed=5)
    expected2 = np.linalg.solve(dense_matrix(diagonal2, off_diagonal, edges), rhs2.reshape(-1, 3))
    assert_close(cholesky.factorize(diagonal2, off_diagonal).solve(rhs2), expected2.reshape(rhs2.shape),
                 atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_indefinite_matrix_is_reported(backend):
    vertices, faces = irregular_mesh(60, seed=6)
    edges = mesh_edges(faces)
    diagonal, off_diagonal, _ = block_system(len(vertices), edges, seed=7)
    diagonal[10] = -np.eye(HOMOGENEOUS)
    with pytest.raises(InputError, match="not positive definite"):
        block_cholesky(vertices, edges, backend=backend).factorize(diagonal, off_diagonal)


def test_back_end_choice():
    vertices, faces = irregular_mesh(40, seed=8)
    edges = mesh_edges(faces)
    assert isinstance(block_cholesky(vertices, edges, backend="nested-dissection"), BlockCholesky)
    chosen = block_cholesky(vertices, edges)
    assert isinstance(chosen, CholmodCholesky if cholmod_available() else BlockCholesky)
    with pytest.raises(ValueError, match="backend"):
        block_cholesky(vertices, edges, backend="superlu")
