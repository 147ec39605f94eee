"""The BFM09 morphable model as used by Deep3DFaceRecon and HRN: the file loader and batched,
differentiable face formation (shape, albedo, pose, camera, normals, SH shading, landmarks)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F

from facehd import conventions as cv
from facehd.errors import InputError, ModelFileError

REQUIRED_FIELDS = (
    "meanshape",
    "idBase",
    "exBase",
    "meantex",
    "texBase",
    "tri",
    "point_buf",
    "keypoints",
    "frontmask2_idx",
    "tri_mask2",
    "skinmask",
)


@dataclass(frozen=True)
class MorphableModel:
    """A BFM-layout morphable model with 0-based indices, in model units (1 unit ~ 100 mm).

    Shapes: N vertices, F faces, Nf front vertices, F2 front faces.
    """

    mean_shape: torch.Tensor  # (N, 3), recentred to zero mean
    id_base: torch.Tensor  # (3N, 80), premultiplied by the standard deviations
    exp_base: torch.Tensor  # (3N, 64)
    mean_tex: torch.Tensor  # (3N,), colour units 0..255
    tex_base: torch.Tensor  # (3N, 80), colour units
    faces: torch.Tensor  # (F, 3) int64
    point_buf: torch.Tensor  # (N, K) int64 faces around each vertex; F means "zero normal"
    keypoints: torch.Tensor  # (68,) int64 vertex index of each iBUG landmark
    front_vertices: torch.Tensor  # (Nf,) int64, `frontmask2_idx`
    front_faces: torch.Tensor  # (F2, 3) int64 into the full vertex array (`tri_mask2` remapped)
    skin_mask: torch.Tensor  # (N,) bool
    uv: torch.Tensor | None = None  # (N, 2) per-vertex UV in [0, 1]
    region: torch.Tensor | None = None  # (N,) int64 codes into `region_names`
    region_names: tuple[str, ...] = cv.REGION_NAMES
    source: Path | None = None

    @property
    def n_vertices(self) -> int:
        return int(self.mean_shape.shape[0])

    @property
    def n_faces(self) -> int:
        return int(self.faces.shape[0])

    @property
    def landmarks7(self) -> torch.Tensor:
        """(7,) vertex indices of the alignment landmarks (iBUG 36, 39, 42, 45, 33, 48, 54)."""
        return self.keypoints[list(cv.LANDMARKS7_IBUG)]

    def region_mask(self, name: str) -> torch.Tensor:
        """(N,) bool mask of the vertices labelled ``name`` (needs the optional `region` field)."""
        if self.region is None:
            raise InputError(f"{self.source or 'this model'} carries no region labels")
        if name not in self.region_names:
            raise InputError(f"unknown region {name!r}; the model has {', '.join(self.region_names)}")
        return self.region == self.region_names.index(name)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """A copy on ``device`` with floating-point fields in ``dtype`` (index fields stay int64)."""
        changes = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if torch.is_tensor(value):
                cast = dtype if value.is_floating_point() else None
                changes[field.name] = value.to(device=device, dtype=cast)
        return dataclasses.replace(self, **changes)


class Coeffs(NamedTuple):
    """The 257 coefficients split into their groups, each (B, k)."""

    id: torch.Tensor  # (B, 80)
    exp: torch.Tensor  # (B, 64)
    tex: torch.Tensor  # (B, 80)
    angle: torch.Tensor  # (B, 3) radians, x y z
    gamma: torch.Tensor  # (B, 27) SH lighting
    trans: torch.Tensor  # (B, 3) model units


@dataclass
class Reconstruction:
    """Everything `reconstruct` computes for a batch of coefficient vectors."""

    shape: torch.Tensor  # (B, N, 3) id + exp shape in model space, before pose
    vertices: torch.Tensor  # (B, N, 3) posed: shape @ R^T + t
    vertices_cam: torch.Tensor  # (B, N, 3) camera frame, z = distance in front of the camera
    normals: torch.Tensor  # (B, N, 3) posed (rotated) vertex normals
    albedo: torch.Tensor  # (B, N, 3) in 0..1
    color: torch.Tensor  # (B, N, 3) albedo shaded by the SH lighting
    proj: torch.Tensor  # (B, N, 2) pixel coordinates, y up (image row = size - 1 - y)
    landmarks: torch.Tensor  # (B, 68, 2) pixel coordinates, y up
    rotation: torch.Tensor  # (B, 3, 3)


# ----------------------------------------------------------------------------------------------
# loading


def _field(mat: dict, name: str, path: Path) -> np.ndarray:
    if name not in mat:
        raise ModelFileError(path, f"missing field {name!r} (a BFM_model_front.mat needs "
                                   f"{', '.join(REQUIRED_FIELDS)})")
    return np.asarray(mat[name])


def _float_field(mat: dict, name: str, path: Path, shape: tuple[int | None, ...]) -> np.ndarray:
    arr = _field(mat, name, path)
    if not np.issubdtype(arr.dtype, np.number):
        raise ModelFileError(path, f"field {name!r} is not numeric (dtype {arr.dtype})")
    want = tuple(arr.shape[i] if s is None else s for i, s in enumerate(shape))
    if arr.ndim != len(shape) or arr.shape != want:
        raise ModelFileError(path, f"field {name!r} has shape {arr.shape}, expected "
                                   f"{tuple('any' if s is None else s for s in shape)}")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ModelFileError(path, f"field {name!r} holds {int(bad.sum())} NaN or infinite values")
    return arr


def _index_field(mat: dict, name: str, path: Path, lo: int, hi: int, cols: int | None) -> np.ndarray:
    """A 1-based index field checked to lie in [lo, hi] and returned 0-based as int64."""
    arr = _field(mat, name, path)
    if not np.issubdtype(arr.dtype, np.number):
        raise ModelFileError(path, f"field {name!r} is not numeric (dtype {arr.dtype})")
    if cols is None:
        arr = arr.reshape(-1)
    elif arr.ndim != 2 or arr.shape[1] != cols:
        raise ModelFileError(path, f"field {name!r} has shape {arr.shape}, expected (any, {cols})")
    if arr.size == 0:
        raise ModelFileError(path, f"field {name!r} is empty")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.mod(arr, 1) == 0):
        raise ModelFileError(path, f"field {name!r} holds non-integer indices")
    arr = arr.astype(np.int64)
    if arr.min() < lo or arr.max() > hi:
        raise ModelFileError(path, f"field {name!r} holds indices in [{arr.min()}, {arr.max()}], "
                                   f"expected 1-based indices in [{lo}, {hi}]")
    return arr - 1


def _string_field(mat: dict, name: str) -> str | None:
    if name not in mat:
        return None
    value = np.asarray(mat[name]).reshape(-1)
    return "".join(str(v) for v in value) if value.size else ""


def load_morphable_model(path: str | Path, *, dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None) -> MorphableModel:
    """Load a morphable model in the `BFM_model_front.mat` layout (real BFM09 or SynthBFM).

    Follows Deep3DFaceRecon's conventions: 1-based index fields are made 0-based, `point_buf`'s
    padding value F+1 becomes F (the index of an appended zero normal), the mean shape is
    recentred to zero mean, and `tri_mask2` (local to `frontmask2_idx`) is remapped to the full
    vertex array. Raises `ModelFileError` naming the file and the offending field.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(path, "no such model file")
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises several unrelated types for corrupt files
        raise ModelFileError(path, f"not a readable MATLAB .mat file ({exc})") from exc

    meanshape = _field(mat, "meanshape", path)
    if meanshape.size == 0 or meanshape.size % 3:
        raise ModelFileError(path, f"field 'meanshape' has {meanshape.size} values, "
                                   "expected 3 per vertex")
    n = meanshape.size // 3
    mean_shape = _float_field(mat, "meanshape", path, (1, 3 * n)).reshape(n, 3)
    mean_shape = mean_shape - mean_shape.mean(axis=0, keepdims=True)
    id_base = _float_field(mat, "idBase", path, (3 * n, cv.N_ID))
    exp_base = _float_field(mat, "exBase", path, (3 * n, cv.N_EXP))
    mean_tex = _float_field(mat, "meantex", path, (1, 3 * n)).reshape(-1)
    tex_base = _float_field(mat, "texBase", path, (3 * n, cv.N_TEX))

    faces = _index_field(mat, "tri", path, 1, n, 3)
    n_faces = faces.shape[0]
    point_buf = _index_field(mat, "point_buf", path, 1, n_faces + 1, None)
    pb_raw = _field(mat, "point_buf", path)
    if pb_raw.ndim != 2 or pb_raw.shape[0] != n:
        raise ModelFileError(path, f"field 'point_buf' has shape {pb_raw.shape}, expected ({n}, K)")
    point_buf = point_buf.reshape(pb_raw.shape)
    keypoints = _index_field(mat, "keypoints", path, 1, n, None)
    if keypoints.size != cv.N_LANDMARKS:
        raise ModelFileError(path, f"field 'keypoints' has {keypoints.size} entries, "
                                   f"expected {cv.N_LANDMARKS}")
    front_vertices = _index_field(mat, "frontmask2_idx", path, 1, n, None)
    front_faces_local = _index_field(mat, "tri_mask2", path, 1, front_vertices.size, 3)
    skin = _field(mat, "skinmask", path).reshape(-1)
    if skin.size != n:
        raise ModelFileError(path, f"field 'skinmask' has {skin.size} entries, expected {n}")

    uv = None
    if "uv" in mat:
        uv = _float_field(mat, "uv", path, (n, 2))
    region = None
    region_names = cv.REGION_NAMES
    names = _string_field(mat, "region_names")
    if names:
        region_names = tuple(s.strip() for s in names.split(","))
    if "region" in mat:
        # region holds 0-based label codes (not indices), so it is checked here, not shifted
        region = _field(mat, "region", path).reshape(-1)
        if region.size != n:
            raise ModelFileError(path, f"field 'region' has {region.size} entries, expected {n}")
        if region.min() < 0 or region.max() >= len(region_names):
            raise ModelFileError(path, f"field 'region' holds codes outside 0..{len(region_names) - 1}")
        region = region.astype(np.int64)

    def t(a, floating=True):
        return torch.as_tensor(a, dtype=dtype if floating else torch.int64, device=device)

    return MorphableModel(
        mean_shape=t(mean_shape),
        id_base=t(id_base),
        exp_base=t(exp_base),
        mean_tex=t(mean_tex),
        tex_base=t(tex_base),
        faces=t(faces, False),
        point_buf=t(point_buf, False),
        keypoints=t(keypoints, False),
        front_vertices=t(front_vertices, False),
        front_faces=t(front_vertices[front_faces_local], False),
        skin_mask=torch.as_tensor(skin != 0, device=device),
        uv=None if uv is None else t(uv),
        region=None if region is None else t(region, False),
        region_names=region_names,
        source=path,
    )


# ----------------------------------------------------------------------------------------------
# face formation


def split_coeffs(coeffs: torch.Tensor) -> Coeffs:
    """Split (B, 257) coefficients into id, exp, tex, angle, gamma and trans."""
    if coeffs.ndim != 2 or coeffs.shape[-1] != cv.N_COEFFS:
        raise InputError(f"coefficients have shape {tuple(coeffs.shape)}, expected (B, {cv.N_COEFFS})")
    s = cv.COEFF_SLICES
    return Coeffs(*(coeffs[:, s[k]] for k in ("id", "exp", "tex", "angle", "gamma", "trans")))


def compute_shape(model: MorphableModel, id_coeff: torch.Tensor, exp_coeff: torch.Tensor) -> torch.Tensor:
    """(B, 80), (B, 64) -> (B, N, 3) model-space shape = mean + idBase id + exBase exp."""
    ref = id_coeff
    offsets = id_coeff @ model.id_base.to(ref).T + exp_coeff @ model.exp_base.to(ref).T
    return offsets.reshape(id_coeff.shape[0], -1, 3) + model.mean_shape.to(ref)


def compute_albedo(model: MorphableModel, tex_coeff: torch.Tensor) -> torch.Tensor:
    """(B, 80) -> (B, N, 3) albedo in 0..1 (the file's colour units divided by 255)."""
    tex = tex_coeff @ model.tex_base.to(tex_coeff).T + model.mean_tex.to(tex_coeff)
    return tex.reshape(tex_coeff.shape[0], -1, 3) / 255.0


def rotation_matrix(angle: torch.Tensor) -> torch.Tensor:
    """(B, 3) Euler angles (x, y, z) in radians -> (B, 3, 3) rotation R = Rz @ Ry @ Rx."""
    x, y, z = angle.unbind(-1)
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    cx, sx, cy, sy, cz, sz = x.cos(), x.sin(), y.cos(), y.sin(), z.cos(), z.sin()
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).reshape(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).reshape(-1, 3, 3)
    return rz @ ry @ rx


def rigid_transform(vertices: torch.Tensor, rotation: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """(B, N, 3), (B, 3, 3), (B, 3) -> (B, N, 3) row vectors transformed as v @ R^T + t."""
    return vertices @ rotation.transpose(-1, -2) + trans[:, None, :]


def to_camera(vertices: torch.Tensor, camera_distance: float = cv.CAMERA_DISTANCE) -> torch.Tensor:
    """(B, N, 3) world -> camera frame of a camera on +z looking at the origin (z = d - z)."""
    return torch.cat([vertices[..., :2], camera_distance - vertices[..., 2:]], dim=-1)


def project(vertices_cam: torch.Tensor, focal: float = cv.FOCAL,
            center: float = cv.PRINCIPAL_POINT) -> torch.Tensor:
    """(B, N, 3) camera-frame points -> (B, N, 2) pixels (f x / z + c, f y / z + c), y up."""
    return focal * vertices_cam[..., :2] / vertices_cam[..., 2:] + center


def y_up_to_rows(points: torch.Tensor, image_size: int = cv.IMAGE_SIZE) -> torch.Tensor:
    """(..., 2) pixel coordinates with y up -> (column, row) image coordinates (row = H-1-y)."""
    return torch.stack([points[..., 0], image_size - 1 - points[..., 1]], dim=-1)


def face_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(B, N, 3), (F, 3) -> (B, F, 3) unit normals normalize((v1 - v2) x (v2 - v3))."""
    v1, v2, v3 = (vertices[:, faces[:, k]] for k in range(3))
    return F.normalize(torch.linalg.cross(v1 - v2, v2 - v3, dim=-1), dim=-1)


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor, point_buf: torch.Tensor) -> torch.Tensor:
    """(B, N, 3) -> (B, N, 3) unit vertex normals: normalized sum of the faces in `point_buf`.

    `point_buf` entries equal to F select an appended zero normal (the file's padding).
    """
    fn = face_normals(vertices, faces)
    fn = torch.cat([fn, fn.new_zeros(fn.shape[0], 1, 3)], dim=1)
    return F.normalize(fn[:, point_buf].sum(dim=2), dim=-1)


def sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """(B, N, 3) unit normals -> (B, N, 9) second-order SH basis in Deep3DFaceRecon's order."""
    a, c = cv.SH_A, cv.SH_C
    x, y, z = normals[..., 0], normals[..., 1], normals[..., 2]
    return torch.stack([
        a[0] * c[0] * torch.ones_like(x),
        -a[1] * c[1] * y,
        a[1] * c[1] * z,
        -a[1] * c[1] * x,
        a[2] * c[2] * x * y,
        -a[2] * c[2] * y * z,
        0.5 * a[2] * c[2] / np.sqrt(3.0) * (3 * z**2 - 1),
        -a[2] * c[2] * x * z,
        0.5 * a[2] * c[2] * (x**2 - y**2),
    ], dim=-1)


def sh_shading(albedo: torch.Tensor, normals: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """(B, N, 3) albedo, (B, N, 3) posed normals, (B, 27) gamma -> (B, N, 3) shaded colour.

    gamma is reshaped (B, 3, 9) per colour channel and 0.8 is added to each DC term.
    """
    g = gamma.reshape(-1, 3, 9)
    g = g + g.new_tensor([cv.SH_INIT_DC] + [0.0] * 8)
    irradiance = sh_basis(normals) @ g.transpose(1, 2)  # (B, N, 3)
    return irradiance * albedo


def reconstruct(model: MorphableModel, coeffs: torch.Tensor, *, image_size: int = cv.IMAGE_SIZE
                ) -> Reconstruction:
    """Full face formation of Deep3DFaceRecon / HRN's coarse stage for (B, 257) coefficients.

    ``image_size`` scales the focal length and principal point from the 224-pixel convention.
    """
    c = split_coeffs(coeffs)
    shape = compute_shape(model, c.id, c.exp)
    rotation = rotation_matrix(c.angle)
    vertices = rigid_transform(shape, rotation, c.trans)
    vertices_cam = to_camera(vertices)
    scale = image_size / cv.IMAGE_SIZE
    proj = project(vertices_cam, cv.FOCAL * scale, cv.PRINCIPAL_POINT * scale)
    faces = model.faces.to(coeffs.device)
    normals = vertex_normals(shape, faces, model.point_buf.to(coeffs.device)) @ rotation.transpose(-1, -2)
    albedo = compute_albedo(model, c.tex)
    color = sh_shading(albedo, normals, c.gamma)
    landmarks = proj[:, model.keypoints.to(coeffs.device)]
    return Reconstruction(shape=shape, vertices=vertices, vertices_cam=vertices_cam, normals=normals,
                          albedo=albedo, color=color, proj=proj, landmarks=landmarks, rotation=rotation)


def describe_model(model: MorphableModel) -> str:
    """A human-readable summary of a model: sizes, extent in millimetres, landmarks, regions."""
    mean = model.mean_shape.double()
    extent_mm = (mean.max(0).values - mean.min(0).values) * cv.MM_PER_MODEL_UNIT
    nose = int(model.keypoints[cv.NOSE_TIP_IBUG])
    lines = [
        f"model      {model.source or '(in memory)'}",
        f"vertices   {model.n_vertices}   faces {model.n_faces}   "
        f"front region {model.front_vertices.numel()} vertices / {model.front_faces.shape[0]} faces",
        f"extent     {extent_mm[0]:.1f} x {extent_mm[1]:.1f} x {extent_mm[2]:.1f} mm (width x height x depth; "
        f"1 model unit = {cv.MM_PER_MODEL_UNIT:g} mm)",
        f"bases      id {model.id_base.shape[1]}, exp {model.exp_base.shape[1]}, tex {model.tex_base.shape[1]}; "
        f"first / last id std {model.id_base[:, 0].norm():.3g} / {model.id_base[:, -1].norm():.3g} "
        f"(column norms, model units)",
        f"landmarks  68 iBUG; nose tip vertex {nose} at z = {mean[nose, 2]:.3f} "
        f"(max z {mean[:, 2].max():.3f})",
        f"skin mask  {int(model.skin_mask.sum())} vertices",
        f"uv         {'per-vertex UVs present' if model.uv is not None else 'none in the file'}",
    ]
    if model.region is not None:
        counts = torch.bincount(model.region, minlength=len(model.region_names)).tolist()
        lines.append("regions    " + ", ".join(f"{n} {c}" for n, c in zip(model.region_names, counts)))
    else:
        lines.append("regions    none in the file")
    return "\n".join(lines)
