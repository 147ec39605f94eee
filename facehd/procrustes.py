"""Similarity and rigid Procrustes (Umeyama) on corresponding 3D points, the `Similarity` record,
and the checks that catch degenerate or mirrored landmark sets before they are used."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facehd.errors import InputError

# Orthonormality tolerance when a rotation comes from a file or a caller (JSON keeps ~16 digits).
ROTATION_ATOL = 1e-6
# Points whose second singular value (centred) is below this fraction of the first lie on a line
# (or a point), around which no rotation is determined: an exact degeneracy, not noise.
EXACT_DEGENERACY_RTOL = 1e-9
# Landmark defaults: a spread ratio below 5% means the landmarks are nearly collinear, so the
# rotation about their line is decided by noise (the 7 alignment landmarks of a face have ~0.7).
MIN_LANDMARK_SPREAD_RATIO = 0.05
# A proper rotation leaving an RMS residual this many times the mirrored fit's (and more than
# MIRROR_MIN_GAP of the landmarks' RMS spread) means the landmark sets are mirror images.
MIRROR_RMS_FACTOR = 2.0
MIRROR_MIN_GAP = 0.02


def _as_points(array, name: str) -> np.ndarray:
    pts = np.asarray(array, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise InputError(f"{name}: expected shape (N, 3), got {pts.shape}")
    if pts.shape[0] == 0:
        raise InputError(f"{name}: empty array, expected at least 3 points")
    if not np.isfinite(pts).all():
        raise InputError(f"{name}: contains NaN or inf")
    return pts


@dataclass(frozen=True, eq=False)
class Similarity:
    """x -> scale * rotation @ x + translation, for row vectors `points @ (s R).T + t`.

    scale > 0 (unitless, or target units per source unit, e.g. model units per mm), rotation
    (3, 3) orthonormal (det +1 unless a reflection was explicitly allowed), translation (3,)
    in target units.
    """

    scale: float
    rotation: np.ndarray
    translation: np.ndarray

    def __post_init__(self):
        scale = float(self.scale)
        rotation = np.asarray(self.rotation, dtype=np.float64)
        translation = np.asarray(self.translation, dtype=np.float64).reshape(-1)
        if not (np.isfinite(scale) and scale > 0):
            raise InputError(f"similarity scale must be positive and finite, got {scale}")
        if rotation.shape != (3, 3) or not np.isfinite(rotation).all() \
                or not np.allclose(rotation @ rotation.T, np.eye(3), atol=ROTATION_ATOL):
            raise InputError(f"similarity rotation must be an orthonormal 3x3 matrix, got {rotation.tolist()}")
        if translation.shape != (3,) or not np.isfinite(translation).all():
            raise InputError(f"similarity translation must be 3 finite numbers, got {translation.tolist()}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "rotation", rotation)
        object.__setattr__(self, "translation", translation)

    @classmethod
    def identity(cls) -> Similarity:
        return cls(1.0, np.eye(3), np.zeros(3))

    def apply(self, points) -> np.ndarray:
        """(N, 3) -> (N, 3) transformed points, float64."""
        return _as_points(points, "points") @ (self.scale * self.rotation).T + self.translation

    def inverse(self) -> Similarity:
        """The transform undoing this one: x = R.T (y - t) / s."""
        rot_t = self.rotation.T
        return Similarity(1.0 / self.scale, rot_t, -(rot_t @ self.translation) / self.scale)

    def compose(self, other: Similarity) -> Similarity:
        """`other` first, then `self`: x -> self.apply(other.apply(x)), i.e. the 4x4 product
        self.as_matrix() @ other.as_matrix()."""
        return Similarity(
            self.scale * other.scale,
            self.rotation @ other.rotation,
            self.scale * (self.rotation @ other.translation) + self.translation,
        )

    def as_matrix(self) -> np.ndarray:
        """(4, 4) homogeneous matrix [[s R, t], [0, 1]] acting on column vectors."""
        m = np.eye(4)
        m[:3, :3] = self.scale * self.rotation
        m[:3, 3] = self.translation
        return m

    @classmethod
    def from_matrix(cls, matrix) -> Similarity:
        """Inverse of `as_matrix`: scale = cube root of |det| of the 3x3 block."""
        m = np.asarray(matrix, dtype=np.float64)
        if m.shape != (4, 4) or not np.allclose(m[3], [0, 0, 0, 1]):
            raise InputError(f"expected a 4x4 similarity matrix with last row [0, 0, 0, 1], got {m.tolist()}")
        scale = float(np.cbrt(abs(np.linalg.det(m[:3, :3]))))
        if not scale > 0:
            raise InputError("similarity matrix has a singular 3x3 block")
        return cls(scale, m[:3, :3] / scale, m[:3, 3])

    def to_dict(self) -> dict:
        """Plain JSON-ready record: {"scale": float, "rotation": 3x3 lists, "translation": 3 list}."""
        return {"scale": self.scale, "rotation": self.rotation.tolist(), "translation": self.translation.tolist()}

    @classmethod
    def from_dict(cls, record: dict) -> Similarity:
        try:
            return cls(record["scale"], record["rotation"], record["translation"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"not a similarity record (scale, rotation, translation): {exc!r}") from exc


def _weights(weights, n: int) -> np.ndarray:
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise InputError(f"weights: expected {n} finite non-negative values with a positive sum, got shape {w.shape}")
    return w / w.sum()


def _singular_values(centred: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Singular values of the weighted centred points, largest first (units of the points)."""
    return np.linalg.svd(centred * np.sqrt(w)[:, None], compute_uv=False)


def fit_similarity(src, dst, weights=None, *, scale: bool = True, allow_reflection: bool = False) -> Similarity:
    """Least-squares similarity (isotropic scale) mapping src (N, 3) onto dst (N, 3) (Umeyama 1991).

    Minimises sum_i w_i |s R src_i + t - dst_i|^2 with weights (N,) (uniform if None). The
    reflection fix keeps det R = +1 unless `allow_reflection`; `scale=False` fixes s = 1 (rigid).
    Raises InputError when src is exactly degenerate (coincident or collinear points).
    """
    src = _as_points(src, "src")
    dst = _as_points(dst, "dst")
    if src.shape != dst.shape:
        raise InputError(f"src and dst must correspond one to one, got {src.shape} and {dst.shape}")
    w = _weights(weights, len(src))
    mu_src, mu_dst = w @ src, w @ dst
    x, y = src - mu_src, dst - mu_dst
    sv = _singular_values(x, w)
    if len(src) < 3 or not sv[0] > 0 or sv[1] <= EXACT_DEGENERACY_RTOL * sv[0]:
        raise InputError(f"src points are coincident or collinear ({len(src)} points, singular values "
                         f"{np.round(sv, 12).tolist()}): no rotation is determined")
    u, d, vt = np.linalg.svd((y * w[:, None]).T @ x)  # weighted cross-covariance dst x src^T
    fix = np.ones(3)
    if not allow_reflection and np.linalg.det(u) * np.linalg.det(vt) < 0:
        fix[2] = -1.0
    rotation = (u * fix) @ vt
    s = float(d @ fix / np.sum(w * np.sum(x * x, axis=1))) if scale else 1.0
    return Similarity(s, rotation, mu_dst - s * rotation @ mu_src)


def fit_similarity_norm_ratio(src, dst) -> Similarity:
    """The similarity of menpo's `AlignmentSimilarity` mapping src (N, 3) onto dst (N, 3).

    Not Umeyama's least-squares scale: s = |dst - mean(dst)|_F / |src - mean(src)|_F (the ratio of
    the Frobenius norms of the centred sets), then the best proper rotation of the centred sets
    (Kabsch: R = U V^T from the SVD of the cross-covariance, the last singular direction flipped
    when det < 0), then t = mean(dst) - s R mean(src). GANFit's released MICC evaluation uses it.
    Raises InputError when src is exactly degenerate (coincident or collinear points).
    """
    src = _as_points(src, "src")
    dst = _as_points(dst, "dst")
    if src.shape != dst.shape:
        raise InputError(f"src and dst must correspond one to one, got {src.shape} and {dst.shape}")
    mu_src, mu_dst = src.mean(axis=0), dst.mean(axis=0)
    x, y = src - mu_src, dst - mu_dst
    sv = np.linalg.svd(x, compute_uv=False)
    if len(src) < 3 or not sv[0] > 0 or sv[1] <= EXACT_DEGENERACY_RTOL * sv[0]:
        raise InputError(f"src points are coincident or collinear ({len(src)} points, singular values "
                         f"{np.round(sv, 12).tolist()}): no rotation is determined")
    s = float(np.linalg.norm(y) / np.linalg.norm(x))
    u, _, vt = np.linalg.svd(y.T @ x)
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:
        rotation = (u * [1.0, 1.0, -1.0]) @ vt
    return Similarity(s, rotation, mu_dst - s * rotation @ mu_src)


def fit_rigid(src, dst, weights=None, *, allow_reflection: bool = False) -> Similarity:
    """Least-squares rotation + translation (scale 1) mapping src (N, 3) onto dst (N, 3)."""
    return fit_similarity(src, dst, weights, scale=False, allow_reflection=allow_reflection)


def rms_residual(transform: Similarity, src, dst) -> float:
    """Root mean square of |transform(src_i) - dst_i| over the N pairs, in dst units."""
    diff = transform.apply(src) - _as_points(dst, "dst")
    return float(np.sqrt(np.mean(np.sum(diff * diff, axis=1))))


@dataclass(frozen=True, eq=False)
class LandmarkFit:
    """A checked landmark alignment: src -> dst similarity and its residuals in dst units."""

    transform: Similarity
    rms: float
    residuals: np.ndarray  # (N,) |transform(src_i) - dst_i|


def check_landmark_fit(src, dst, *, scale: bool = True, max_rms: float | None = None,
                       min_spread_ratio: float = MIN_LANDMARK_SPREAD_RATIO,
                       source: str | None = None, unit: tuple[float, str] | None = None) -> LandmarkFit:
    """Fit landmarks src (N, 3) onto dst (N, 3) and raise InputError when the fit cannot be trusted.

    Checks, in order: either set is degenerate (coincident, or collinear: second singular value of
    the centred points below `min_spread_ratio` of the first); the sets are mirror images (the
    best proper rotation is much worse than a reflection, e.g. left/right landmarks swapped); the
    RMS residual exceeds `max_rms` (dst units). `source` (a file name) prefixes every message;
    `unit` (factor, name), e.g. (100.0, "mm") for dst in model units, is how messages state
    residuals.
    """
    where = f"{source}: " if source else ""
    factor, unit_name = unit if unit is not None else (1.0, "")

    def length(value: float) -> str:
        return f"{value * factor:.4g}{' ' + unit_name if unit_name else ''}"

    src = _as_points(src, f"{where}source landmarks")
    dst = _as_points(dst, f"{where}target landmarks")
    if src.shape != dst.shape:
        raise InputError(f"{where}landmark sets differ in size: {len(src)} source vs {len(dst)} target")
    if len(src) < 3:
        raise InputError(f"{where}need at least 3 landmarks, got {len(src)}")
    w = np.full(len(src), 1.0 / len(src))
    for name, pts in (("source", src), ("target", dst)):
        sv = _singular_values(pts - pts.mean(axis=0), w)
        if not sv[0] > EXACT_DEGENERACY_RTOL * max(1.0, float(np.abs(pts).max())):
            raise InputError(f"{where}degenerate {name} landmarks: all {len(pts)} points coincide")
        if sv[1] < min_spread_ratio * sv[0]:
            raise InputError(f"{where}degenerate {name} landmarks: nearly collinear (spread ratio "
                             f"{sv[1] / sv[0]:.3g} < {min_spread_ratio}), the rotation is undetermined")
    proper = fit_similarity(src, dst, scale=scale)
    rms = rms_residual(proper, src, dst)
    mirrored = fit_similarity(src, dst, scale=scale, allow_reflection=True)
    mirrored_rms = rms_residual(mirrored, src, dst)
    spread = float(np.sqrt(np.mean(np.sum((dst - dst.mean(axis=0)) ** 2, axis=1))))
    if rms > MIRROR_RMS_FACTOR * mirrored_rms and rms - mirrored_rms > MIRROR_MIN_GAP * spread:
        raise InputError(f"{where}landmarks look mirrored (left/right swapped?): the best rotation leaves "
                         f"RMS {length(rms)}, a mirror image would fit with RMS {length(mirrored_rms)}")
    if max_rms is not None and rms > max_rms:
        raise InputError(f"{where}landmark fit RMS residual {length(rms)} exceeds the limit {length(max_rms)}")
    residuals = np.linalg.norm(proper.apply(src) - dst, axis=1)
    return LandmarkFit(proper, rms, residuals)
