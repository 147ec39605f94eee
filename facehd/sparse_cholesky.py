"""Sparse Cholesky factorization of the block systems that non-rigid ICP solves: SPD matrices with one
4x4 block per mesh vertex and one shared, symmetric 4x4 block per edge (Amberg's normal equations,
REALY's bICP).

Two back ends with one interface, ``factorize(diagonal, off_diagonal).solve(rhs)``:

- `CholmodCholesky`: SuiteSparse's supernodal CHOLMOD (through cvxopt), 3-4x faster on the
  20k-vertex regions of the benchmarks; the default (`block_cholesky`) when cvxopt imports;
- `BlockCholesky`: a pure numpy/LAPACK multifrontal factorization on a geometric nested dissection,
  the fallback.

Both do the symbolic analysis once per mesh; each factorization only does numeric work.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.linalg.blas import dtrsm
from scipy.linalg.lapack import dpotrf

from facehd.errors import InputError

HOMOGENEOUS = 4  # unknowns per vertex and output coordinate: a column of the 3x3 linear part + translation
_LEAF_VERTICES = 32  # nested-dissection leaves: small enough that dense leaf factors stay cheap
_MAX_RUNS = 8  # above this many pieces, one fancy-indexed add is faster than run-by-run slices
NOT_POSITIVE_DEFINITE = (
    "the non-rigid ICP system is not positive definite (too few weighted correspondences to "
    "fix the affines: use damping > 0, more correspondences or landmarks)"
)
BACKENDS = ("auto", "cholmod", "nested-dissection")


@contextlib.contextmanager
def single_threaded_blas():
    """Run the block with BLAS on one thread. The factorizations here are many small dense blocks that
    threads do not speed up, and on shared cores OpenBLAS's spinning threads slowed them down up to
    100x (0.1 s -> 10 s per factorization measured on 2 loaded cores). Cheap to enter: the scan of
    the loaded BLAS libraries is done once."""
    with _blas_controller().limit(limits=1, user_api="blas"):
        yield


@functools.cache
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def cholmod_available() -> bool:
    """Whether the CHOLMOD back end can be used (cvxopt imports)."""
    try:
        from cvxopt import cholmod  # noqa: F401
    except ImportError:
        return False
    return True


def block_cholesky(vertices: np.ndarray, edges: np.ndarray, backend: str = "auto"):
    """The analysed factorization of a mesh's block system: CHOLMOD when available (``auto``), else
    the nested-dissection fallback; ``backend`` forces one."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cholmod" or (backend == "auto" and cholmod_available()):
        return CholmodCholesky(len(vertices), edges)
    return BlockCholesky(vertices, edges)


class CholmodCholesky:
    """CHOLMOD's supernodal Cholesky of the block system, with the symbolic analysis (fill-reducing
    ordering, supernodes) done once per mesh; `factorize` scatters the blocks into the fixed upper
    triangle and refactors numerically."""

    def __init__(self, n_vertices: int, edges: np.ndarray):
        from cvxopt import cholmod, matrix, spmatrix

        h = HOMOGENEOUS
        n, edges = int(n_vertices), np.asarray(edges, dtype=np.int64).reshape(-1, 2)
        low, high = edges.min(axis=1), edges.max(axis=1)
        # CHOLMOD is given the upper triangle: its supernodal numeric factorization reads that form
        # directly (the lower one costs a transpose, ~4 % of the factorization here)
        a, b = np.triu_indices(h)  # upper triangle of each diagonal block
        diagonal_rows = (h * np.arange(n)[:, None] + a).ravel()
        diagonal_cols = (h * np.arange(n)[:, None] + b).ravel()
        # an edge's block sits above the diagonal at (low, high); it is symmetric, so no transpose
        shape = (len(edges), h, h)
        edge_rows = np.broadcast_to(h * low[:, None, None] + np.arange(h)[None, :, None], shape).reshape(-1)
        edge_cols = np.broadcast_to(h * high[:, None, None] + np.arange(h)[None, None, :], shape).reshape(-1)
        rows, cols = np.concatenate([diagonal_rows, edge_rows]), np.concatenate([diagonal_cols, edge_cols])
        self._order = np.argsort(cols * (h * n) + rows, kind="stable")  # cvxopt keeps entries column-major
        self._triu = (a, b)
        self._n_edges = len(edges)
        self.size = h * n
        # cvxopt matrices, not lists: building from Python lists took 5x longer
        self._matrix = spmatrix(matrix(np.zeros(len(rows))), matrix(rows[self._order]), matrix(cols[self._order]),
                                (self.size, self.size))
        if len(self._matrix.V) != len(rows):
            raise InputError("the mesh's edge list repeats an edge")
        self._cholmod = cholmod
        with _cholmod_options(cholmod):
            self._symbolic = cholmod.symbolic(self._matrix, uplo="U")

    def factorize(self, diagonal: np.ndarray, off_diagonal: np.ndarray) -> _CholmodFactor:
        """Factor the matrix with ``diagonal[i]`` (N, 4, 4) per vertex and the symmetric ``off_diagonal``
        (4, 4) on every edge."""
        from cvxopt import matrix

        a, b = self._triu
        off = np.broadcast_to(np.asarray(off_diagonal, dtype=np.float64), (self._n_edges, HOMOGENEOUS, HOMOGENEOUS))
        values = np.concatenate([np.asarray(diagonal, dtype=np.float64)[:, a, b].ravel(), off.ravel()])
        self._matrix.V = matrix(values[self._order])
        try:
            with _cholmod_options(self._cholmod):
                self._cholmod.numeric(self._matrix, self._symbolic)
        except ArithmeticError as exc:
            raise InputError(NOT_POSITIVE_DEFINITE) from exc
        return _CholmodFactor(self)


class _CholmodFactor:
    """Solves K X = R for per-vertex (N, 4, C) right-hand sides. The factor lives in the analysis,
    so it is valid until the next `factorize` of the same mesh."""

    def __init__(self, cholesky: CholmodCholesky):
        self.cholesky = cholesky

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        from cvxopt import matrix, sparse

        rhs = np.asarray(rhs, dtype=np.float64)
        columns = matrix(np.ascontiguousarray(rhs.reshape(self.cholesky.size, -1)))  # cvxopt copies C order fastest
        # cvxopt's dense `solve` runs CHOLMOD once per column, so it reads the factor once per column;
        # `spsolve` hands CHOLMOD the columns together (up to 4 per pass): 14 ms instead of 23 ms for
        # three columns of a 9k-vertex region, with the same result to the bit.
        solution = self.cholesky._cholmod.spsolve(self.cholesky._symbolic, sparse(columns))
        return np.array(matrix(solution)).reshape(rhs.shape)


class _cholmod_options:
    """CHOLMOD's options are module-global in cvxopt: set the supernodal method and quiet output for
    one call, and put back what was there."""

    WANTED = {"supernodal": 2, "print": 0}

    def __init__(self, cholmod):
        self.options = cholmod.options

    def __enter__(self):
        self.saved = {key: self.options[key] for key in self.WANTED if key in self.options}
        self.options.update(self.WANTED)

    def __exit__(self, *exc):
        for key in self.WANTED:
            self.options.pop(key, None)
        self.options.update(self.saved)


class BlockCholesky:
    """Sparse Cholesky of SPD matrices with 4x4 blocks on a mesh's vertex graph: diagonal blocks per
    vertex and one shared block per edge. The analysis (geometric nested dissection of the vertices,
    multifrontal symbolic structure) is done once; each `factorize` only does dense numeric work.

    scipy's SuperLU took 2-7 s per factorization of a 20k-vertex system (MMD ordering, 25M factor
    entries); dense fronts on a nested-dissection tree run the same factorization through BLAS-3.
    """

    def __init__(self, vertices: np.ndarray, edges: np.ndarray):
        n = len(vertices)
        adjacency = sp.coo_matrix((np.ones(2 * len(edges)), (edges.ravel(), edges[:, ::-1].ravel())), shape=(n, n))
        adjacency = adjacency.tocsr()
        self.fronts: list[_Front] = []
        _dissect(np.arange(n), vertices, adjacency, np.zeros(n, dtype=bool), self.fronts)
        self.order = np.concatenate([front.own for front in self.fronts])  # elimination order of vertices
        position = np.empty(n, dtype=np.int64)
        position[self.order] = np.arange(n)
        start = 0
        for front in self.fronts:
            front.start, start = start, start + len(front.own)
        _analyse(self.fronts, position[edges], n)

    def factorize(self, diagonal: np.ndarray, off_diagonal: np.ndarray) -> _Factor:
        """Factor the matrix with ``diagonal[i]`` (N, 4, 4) per vertex and the symmetric ``off_diagonal``
        (4, 4) on every edge."""
        diagonal = diagonal[self.order]
        updates: dict[int, np.ndarray] = {}
        blocks = []
        for index, front in enumerate(self.fronts):
            size = len(front.vertices)
            dense = np.zeros((HOMOGENEOUS * size, HOMOGENEOUS * size))
            view = dense.reshape(size, HOMOGENEOUS, size, HOMOGENEOUS).transpose(0, 2, 1, 3)
            own = np.arange(len(front.own))
            view[own, own] += diagonal[front.start : front.start + len(own)]
            view[front.edge_a, front.edge_b] += off_diagonal
            view[front.edge_b, front.edge_a] += off_diagonal.T
            for child, runs in zip(front.children, front.child_runs):
                _extend_add(dense, updates.pop(child), runs)
            k = HOMOGENEOUS * len(own)
            pivot, info = dpotrf(dense[:k, :k], lower=1, clean=0)
            if info != 0:
                raise InputError(NOT_POSITIVE_DEFINITE)
            below = dtrsm(1.0, pivot, dense[k:, :k], side=1, lower=1, trans_a=1)  # F_uo L^-T
            if len(front.struct):
                updates[index] = dense[k:, k:] - below @ below.T
            blocks.append((pivot, below))
        return _Factor(self, blocks)


@dataclass
class _Front:
    """A node of the elimination tree: its own vertices and the later vertices its factor rows reach."""

    own: np.ndarray  # vertex ids eliminated here (contiguous positions from `start`)
    children: list[int]
    start: int = 0
    struct: np.ndarray | None = None  # positions (> own) coupled to this front after elimination
    vertices: np.ndarray | None = None  # positions of own + struct
    edge_a: np.ndarray | None = None  # local indices of the edges assembled here
    edge_b: np.ndarray | None = None
    child_runs: list | None = None  # per child: where its update matrix goes in this front (see _runs)
    struct_dofs: np.ndarray | None = None  # global dof positions of the struct vertices


class _Factor:
    """A numeric factorization: solves K X = R for per-vertex (N, 4, 3) right-hand sides."""

    def __init__(self, cholesky: BlockCholesky, blocks: list):
        self.cholesky = cholesky
        self.blocks = blocks

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        order = self.cholesky.order
        y = rhs[order].reshape(-1, rhs.shape[-1])
        fronts = self.cholesky.fronts
        for front, (pivot, below) in zip(fronts, self.blocks):
            own = slice(HOMOGENEOUS * front.start, HOMOGENEOUS * (front.start + len(front.own)))
            y[own] = dtrsm(1.0, pivot, y[own], lower=1)
            if len(front.struct):
                y[front.struct_dofs] -= below @ y[own]
        for front, (pivot, below) in zip(reversed(fronts), reversed(self.blocks)):
            own = slice(HOMOGENEOUS * front.start, HOMOGENEOUS * (front.start + len(front.own)))
            if len(front.struct):
                y[own] -= below.T @ y[front.struct_dofs]
            y[own] = dtrsm(1.0, pivot, y[own], lower=1, trans_a=1)
        solution = np.empty_like(rhs)
        solution[order] = y.reshape(rhs.shape)
        return solution


def _dissect(ids, vertices, adjacency, scratch, fronts) -> list[int]:
    """Geometric nested dissection: split at the median of the widest axis, eliminate the cut last.

    Appends fronts in postorder and returns the indices of the roots of this part (a forest when the
    halves do not touch). ``scratch`` is an all-False (N,) buffer.
    """
    if len(ids) == 0:  # a half that was all separator
        return []
    if len(ids) <= _LEAF_VERTICES:
        fronts.append(_Front(own=ids, children=[]))
        return [len(fronts) - 1]
    points = vertices[ids]
    order = np.argsort(points[:, np.argmax(np.ptp(points, axis=0))], kind="stable")
    half = len(ids) // 2
    left, right = ids[order[:half]], ids[order[half:]]
    left_cut, right_cut = _touching(left, right, adjacency, scratch), _touching(right, left, adjacency, scratch)
    if left_cut.sum() <= right_cut.sum():  # the smaller one-sided vertex separator
        separator, left = left[left_cut], left[~left_cut]
    else:
        separator, right = right[right_cut], right[~right_cut]
    roots = [
        *_dissect(left, vertices, adjacency, scratch, fronts),
        *_dissect(right, vertices, adjacency, scratch, fronts),
    ]
    if len(separator) == 0:
        return roots
    # ordering the cut along itself keeps the pieces that a subtree touches contiguous (see _extend_add)
    along = vertices[separator]
    separator = separator[np.argsort(along[:, np.argmax(np.ptp(along, axis=0))], kind="stable")]
    fronts.append(_Front(own=separator, children=roots))
    return [len(fronts) - 1]


def _touching(part, other, adjacency, scratch) -> np.ndarray:
    """(len(part),) bool: which vertices of ``part`` have a neighbour in ``other``."""
    scratch[other] = True
    touching = (adjacency[part] @ scratch) > 0
    scratch[other] = False
    return touching


def _analyse(fronts: list[_Front], edges: np.ndarray, n: int) -> None:
    """Symbolic multifrontal factorization: each front's struct set, edges and children's places."""
    owner = np.empty(n, dtype=np.int64)
    for index, front in enumerate(fronts):
        owner[front.start : front.start + len(front.own)] = index
    low, high = edges.min(axis=1), edges.max(axis=1)
    by_front = np.argsort(owner[low], kind="stable")
    bounds = np.searchsorted(owner[low][by_front], np.arange(len(fronts) + 1))
    for index, front in enumerate(fronts):
        stop = front.start + len(front.own)
        mine = by_front[bounds[index] : bounds[index + 1]]
        reach = [high[mine][high[mine] >= stop]] + [fronts[c].struct[fronts[c].struct >= stop] for c in front.children]
        front.struct = np.unique(np.concatenate(reach)).astype(np.int64)
        front.vertices = np.concatenate([np.arange(front.start, stop), front.struct])
        front.edge_a = low[mine] - front.start
        front.edge_b = np.searchsorted(front.vertices, high[mine])
        front.child_runs = [_runs(np.searchsorted(front.vertices, fronts[c].struct)) for c in front.children]
        front.struct_dofs = _dofs(front.struct)


def _runs(places: np.ndarray) -> np.ndarray:
    """(R, 3) maximal runs of consecutive vertex places as dof ranges: (start in front, start in update, length)."""
    breaks = np.flatnonzero(np.diff(places) != 1) + 1
    starts = np.concatenate([[0], breaks])
    lengths = np.diff(np.concatenate([starts, [len(places)]]))
    return HOMOGENEOUS * np.stack([places[starts], starts, lengths], axis=1)


def _extend_add(dense: np.ndarray, update: np.ndarray, runs: np.ndarray) -> None:
    """Add a child's update matrix into its parent's front; slices over runs beat fancy indexing here."""
    if len(runs) > _MAX_RUNS:
        places = np.concatenate([np.arange(d, d + n) for d, _, n in runs])
        dense[np.ix_(places, places)] += update
        return
    for row, row_source, rows in runs:
        for column, column_source, columns in runs:
            dense[row : row + rows, column : column + columns] += update[
                row_source : row_source + rows, column_source : column_source + columns
            ]


def _dofs(vertex_positions: np.ndarray) -> np.ndarray:
    """Scalar unknown indices of block rows: vertex q owns 4q .. 4q + 3."""
    return (HOMOGENEOUS * vertex_positions[:, None] + np.arange(HOMOGENEOUS)).ravel()
