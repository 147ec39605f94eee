"""MV-HRN: the joint fit of N views of one person (shared identity and deformation map; per view
expression, texture, lighting, pose and displacement map), as the public HRN code's
`forward_mvhrn`, plus a calibrated mode in which known cameras tie the views to one head pose."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from facehd import conventions as cv
from facehd.capture import Camera
from facehd.errors import FileFormatError, InputError
from facehd.morphable import (
    compute_albedo,
    compute_shape,
    rotation_matrix,
    sh_basis,
    sh_shading,
    vertex_normals,
)
from facehd.procrustes import fit_rigid
from facehd.uv import dense_positions_from_map, sample_uv_map
from hrn_baseline.losses import landmark_weights, photometric_loss, tv_loss
from hrn_baseline.model import HRN, fill_border, project_rows, sample_image
from hrn_baseline.render import render_mesh

Progress = Callable[..., Iterable]

# --- the public MV fit (HRN `forward_mvhrn` and `compute_losses_for_mvhrn`) -----------------------
MV_ITERATIONS = 50  # Adam iterations over all variables at once
MV_LEARNING_RATE = 1e-3
# coefficient prior of Deep3DFaceRecon's `reg_loss`, inside the weight `coeff_reg`
REG_ID, REG_EXP, REG_TEX = 1.0, 0.8, 0.017
TV_FACTOR = 2.0  # HRN's TVLoss and TVLoss_std both return 2 * (...) / B

# --- the start without a checkpoint (this toolkit's addition; upstream starts from its ResNet) ---
# A landmark fit gives pose, identity and expression: first the pose alone from several yaw
# guesses (a side view fitted from a frontal start can flip), then pose, id and exp together.
YAW_GUESSES_DEG = (-60.0, -30.0, 0.0, 30.0, 60.0)
RIGID_ITERATIONS = 100
LANDMARK_ITERATIONS = 200
LANDMARK_LEARNING_RATE = 1e-2
LANDMARK_INIT_REG = 1.0  # weight of |id|^2 + 0.8 |exp|^2 against the mean squared landmark error (px^2)
# lighting and albedo start from least squares on the vertices that face the camera this much
APPEARANCE_MIN_COS = 0.3
TEX_RIDGE = 1.0  # ridge weight of the texture least squares (per coefficient, in colour units^2)

LOSS_PRESETS = ("public_code",)


@dataclass(frozen=True)
class MVLossWeights:
    """Weights of the MV-HRN fit; defaults are the public code's (`compute_losses_for_mvhrn`).
    Each term is computed per view and summed over the views."""

    photo_high: float = 1.92  # photometric loss of the render shaded with the displacement's normals
    photo_mid: float = 1.92  # ... and of the mid mesh's render
    coeff_reg: float = 3e-4  # 1.0 |id|^2 + 0.8 |exp|^2 + 0.017 |tex|^2
    gamma_reg: float = 10.0  # variance of the SH lighting across colour channels
    landmark: float = 1.6e-4  # w_lm 1.6e-3 x 0.1
    deformation_tv: float = 1e3
    deformation_tv_std: float = 1e4
    displacement_l1: float = 1.0
    displacement_tv: float = 1e4
    displacement_tv_std: float = 1e4
    contour: float = 20.0  # used only when face masks are given


PRESET_WEIGHTS = {"public_code": MVLossWeights()}
FUSED_EXPRESSIONS = ("zero", "mean")  # or the name of a view


@dataclass(frozen=True)
class MVConfig:
    """Settings of one MV-HRN fit (`configs/mv_hrn.yaml`)."""

    preset: str = "public_code"
    weights: MVLossWeights = field(default_factory=MVLossWeights)
    iterations: int = MV_ITERATIONS
    lr: float = MV_LEARNING_RATE
    device: str = "auto"
    rigid_iterations: int = RIGID_ITERATIONS
    landmark_iterations: int = LANDMARK_ITERATIONS
    landmark_lr: float = LANDMARK_LEARNING_RATE
    landmark_init_reg: float = LANDMARK_INIT_REG
    calibrated: bool = True  # use cameras.json when a capture has one
    expression: str = "zero"  # of the fused mesh: zero, mean, or a view's name
    seed: int = 0

    def validate(self, where: str = "the MV-HRN config") -> MVConfig:
        if self.preset not in LOSS_PRESETS:
            raise InputError(f"{where}: loss preset {self.preset!r} is not one of {', '.join(LOSS_PRESETS)}")
        for name in ("iterations", "rigid_iterations", "landmark_iterations", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise InputError(f"{where}: {name} must be a whole number >= 0, got {getattr(self, name)!r}")
        for name in ("lr", "landmark_lr", "landmark_init_reg"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise InputError(f"{where}: {name} must be a number >= 0, got {value!r}")
        if not isinstance(self.calibrated, bool):
            raise InputError(f"{where}: calibrated must be true or false, got {self.calibrated!r}")
        for name in ("expression", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InputError(f"{where}: {name} must be a name, got {getattr(self, name)!r}")
        for f in dataclasses.fields(self.weights):
            value = getattr(self.weights, f.name)
            if not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise InputError(f"{where}: loss weight {f.name} must be a number >= 0, got {value!r}")
        return self


def load_mv_config(path: str | Path | None = None, **overrides) -> MVConfig:
    """An `MVConfig` from a YAML file (sections `loss: {preset, weights}` and `fit: {...}`) and
    keyword overrides (None values are ignored); no file: the defaults."""
    loss, fit = {}, {}
    if path is not None:
        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise FileFormatError(path, f"not readable: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise FileFormatError(path, f"invalid YAML{where}") from None
        if not isinstance(doc, dict) or set(doc) - {"loss", "fit"}:
            raise FileFormatError(path, "expected the sections loss and fit only")
        loss, fit = doc.get("loss") or {}, doc.get("fit") or {}
        if not isinstance(loss, dict) or not isinstance(fit, dict):
            raise FileFormatError(path, "loss and fit must be mappings")
    where = str(path) if path is not None else "the MV-HRN settings"
    preset = loss.get("preset", "public_code")
    if preset not in PRESET_WEIGHTS:
        raise InputError(f"{where}: loss preset {preset!r} is not one of {', '.join(LOSS_PRESETS)}")
    weights = loss.get("weights") or {}
    known = {f.name for f in dataclasses.fields(MVLossWeights)}
    if not isinstance(weights, dict) or set(weights) - known:
        raise InputError(f"{where}: unknown loss weight(s) {', '.join(sorted(set(weights) - known))}; "
                         f"known: {', '.join(sorted(known))}")
    fit_known = {f.name for f in dataclasses.fields(MVConfig)} - {"preset", "weights"}
    unknown = set(fit) - fit_known
    if unknown:
        raise InputError(f"{where}: unknown fit setting(s) {', '.join(sorted(unknown))}; known: "
                         f"{', '.join(sorted(fit_known))}")
    settings = {**fit, **{k: v for k, v in overrides.items() if v is not None}}
    config = MVConfig(preset=preset, weights=dataclasses.replace(PRESET_WEIGHTS[preset], **weights), **settings)
    return config.validate(where)


# ----------------------------------------------------------------------------------------------
# views and cameras


@dataclass
class MVView:
    """One view, cropped for the model: image (3, S, S) in [0, 1], landmarks (68, 2) crop pixels
    (x, row) and their (68,) visible flags; ``camera`` (cameras.json) and the photo -> crop
    affine (crop = k * photo + d per axis) tie it to the calibrated rig."""

    name: str
    source: Path
    image: torch.Tensor
    landmarks: np.ndarray
    visible: np.ndarray
    crop_k: np.ndarray = field(default_factory=lambda: np.ones(2))
    crop_d: np.ndarray = field(default_factory=lambda: np.zeros(2))
    camera: Camera | None = None
    photo: np.ndarray | None = None  # (H, W, 3) uint8 as read (for the preview)
    face_mask: torch.Tensor | None = None  # (1, S, S) optional


def crop_camera_matrix(view: MVView, image_size: int) -> np.ndarray:
    """(3, 3) C: OpenCV camera-frame points -> the project's camera frame (same units) such that the
    project's pinhole (focal 1015, centre 112 at 224 px, y up) projects C X where the view's
    camera and crop put X: col = kx (fx x + s y) / z + kx cx + dx, row = ky fy y / z + ky cy + dy."""
    K, (kx, ky), (dx, dy) = view.camera.K, view.crop_k, view.crop_d
    f = cv.FOCAL * image_size / cv.IMAGE_SIZE
    c = cv.PRINCIPAL_POINT * image_size / cv.IMAGE_SIZE
    rows = np.array([
        [kx * K[0, 0], kx * K[0, 1], kx * K[0, 2] + dx - c],
        [0.0, -ky * K[1, 1], image_size - 1 - ky * K[1, 2] - dy - c],
        [0.0, 0.0, f],
    ])
    return rows / f


def triangulate(cameras: Sequence[Camera], points: Sequence[np.ndarray], visible: Sequence[np.ndarray]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Linear (DLT) triangulation of P points seen in several calibrated views: per view (P, 2)
    photo pixels and (P,) visible flags -> (P, 3) world mm and (P,) bool (seen in >= 2 views)."""
    n_points = len(points[0])
    out, ok = np.zeros((n_points, 3)), np.zeros(n_points, dtype=bool)
    projections = [cam.K @ np.hstack([cam.R, cam.t[:, None]]) for cam in cameras]
    for j in range(n_points):
        rows = []
        for P, pts, vis in zip(projections, points, visible):
            if vis[j] and np.isfinite(pts[j]).all():
                x, y = pts[j]
                rows += [x * P[2] - P[0], y * P[2] - P[1]]
        if len(rows) < 4:
            continue
        _, _, vt = np.linalg.svd(np.asarray(rows))
        if abs(vt[-1, 3]) > 1e-12:
            out[j], ok[j] = vt[-1, :3] / vt[-1, 3], True
    return out, ok


# ----------------------------------------------------------------------------------------------
# the variables


@dataclass
class MVState:
    """The fit's variables. Shared: ``id`` (1, 80) and ``deformation`` (1, 3, Hm, Hm). Per view:
    exp (N, 64), tex (N, 80), gamma (N, 27), displacement (N, 1, Hh, Hh) and the pose: angle and
    trans (N, 3) each, or in calibrated mode one head pose (1, 3) + (1, 3) (model -> rig world:
    X_mm = 100 (R(head_angle) v + head_trans)) seen through the fixed per-view matrices
    ``view_rotation`` (N, 3, 3) = R_i and ``view_matrix`` (N, 3, 3) = `crop_camera_matrix`,
    ``view_offset`` (N, 3) = t_i in model units."""

    id: torch.Tensor
    deformation: torch.Tensor
    exp: torch.Tensor
    tex: torch.Tensor
    gamma: torch.Tensor
    displacement: torch.Tensor
    angle: torch.Tensor | None = None
    trans: torch.Tensor | None = None
    head_angle: torch.Tensor | None = None
    head_trans: torch.Tensor | None = None
    view_rotation: torch.Tensor | None = None
    view_matrix: torch.Tensor | None = None
    view_offset: torch.Tensor | None = None

    @property
    def calibrated(self) -> bool:
        return self.head_angle is not None

    @property
    def n_views(self) -> int:
        return int(self.exp.shape[0])

    def pose_tensors(self) -> list[torch.Tensor]:
        return [self.head_angle, self.head_trans] if self.calibrated else [self.angle, self.trans]

    def variables(self) -> list[torch.Tensor]:
        return [self.deformation, self.id, self.displacement, self.exp, self.tex, *self.pose_tensors(), self.gamma]

    def cameras(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per view (A, b, Q): model-space v -> the project's camera frame A v + b (model units,
        z = distance), and Q (N, 3, 3) the rotation of model normals into the project's world
        frame (x right, y up, z toward the camera), which the SH lighting sees."""
        if not self.calibrated:
            rot = rotation_matrix(self.angle)
            flip = rot.new_tensor([1.0, 1.0, -1.0])
            a = rot * flip[:, None]
            b = torch.stack([self.trans[:, 0], self.trans[:, 1], cv.CAMERA_DISTANCE - self.trans[:, 2]], -1)
            return a, b, rot
        head = rotation_matrix(self.head_angle)  # (1, 3, 3)
        view = self.view_rotation @ head  # (N, 3, 3) model -> OpenCV camera
        a = self.view_matrix @ view
        b = (self.view_matrix @ (self.view_rotation @ self.head_trans[0] + self.view_offset)[..., None])[..., 0]
        q = view * view.new_tensor([1.0, -1.0, -1.0])[:, None]
        return a, b, q

    def camera_centres(self) -> torch.Tensor:
        """(N, 3) each view's camera centre in model space (where A v + b = 0)."""
        a, b, _ = self.cameras()
        return -torch.linalg.solve(a, b[..., None])[..., 0]

    def detach(self) -> MVState:
        return dataclasses.replace(self, **{f.name: (None if getattr(self, f.name) is None
                                                     else getattr(self, f.name).detach().clone())
                                           for f in dataclasses.fields(self)})


# ----------------------------------------------------------------------------------------------
# the forward model


@dataclass
class MVRender:
    """What `render_views` computes for N views (pixels (x, row); S = the model's image size)."""

    shape_mid: torch.Tensor  # (N, V, 3) M1 in model space: id + exp + the shared deformation
    vertices_cam: torch.Tensor  # (N, V, 3) in the project's camera frame
    proj: torch.Tensor  # (N, V, 2)
    landmarks: torch.Tensor  # (N, 68, 2)
    position_map: torch.Tensor  # (N, 3, Hh, Hh) M1 rasterized in UV
    normal_map0: torch.Tensor  # (N, 3, Hh, Hh) M0's model-space normals in UV
    texture_map: torch.Tensor  # (N, 3, Hh, Hh) the image re-sampled through M1 (HRN's texture map)
    dense_vertices: torch.Tensor  # (N, Hh * Hh, 3) the detailed surface
    render_mid: torch.Tensor  # (N, 3, S, S)
    render_high: torch.Tensor  # (N, 3, S, S)
    render_mask: torch.Tensor  # (N, 1, S, S)
    depth: torch.Tensor  # (N, S, S) z of the nearest surface (0 on the background)


def _flat(maps: torch.Tensor) -> torch.Tensor:
    return maps.flatten(2).transpose(1, 2)


def _unflat(values: torch.Tensor, size: int) -> torch.Tensor:
    return values.transpose(1, 2).reshape(values.shape[0], -1, size, size)


# Fast versions of `facehd.morphable` / `facehd.uv` kernels with the same values: N views at the
# displacement map's size make these the cost of an iteration, and gathers by index_select (whose
# gradient is index_add) and elementwise sums run several times faster on the CPU than advanced
# indexing, small batched matmuls and norms over a 3-vector axis.
_NORMAL_EPS = 1e-12  # as F.normalize


def normalize(v: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> unit vectors, like F.normalize(v, dim=-1) (zero stays zero)."""
    return v / (v * v).sum(-1, keepdim=True).sqrt().clamp_min(_NORMAL_EPS)


def _vertex_major(x: torch.Tensor) -> torch.Tensor:
    """(B, V, C) -> (V, B, C) contiguous: gathers and their gradients then move whole rows."""
    return x.transpose(0, 1).contiguous()


def face_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(V, B, 3) vertex-major vertices, (F, 3) -> (F, B, 3) unit normals of (v1 - v2) x (v2 - v3),
    as `facehd.morphable.face_normals`."""
    v1, v2, v3 = (vertices.index_select(0, faces[:, k]) for k in range(3))
    a, b = v1 - v2, v2 - v3
    cross = torch.stack([a[..., 1] * b[..., 2] - a[..., 2] * b[..., 1], a[..., 2] * b[..., 0] - a[..., 0] * b[..., 2],
                         a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]], -1)
    return normalize(cross)


def model_vertex_normals(vertices: torch.Tensor, faces: torch.Tensor, point_buf: torch.Tensor) -> torch.Tensor:
    """(B, V, 3) -> (B, V, 3): `facehd.morphable.vertex_normals`, the normalized sum of the faces
    in ``point_buf``."""
    fn = face_normals(_vertex_major(vertices), faces)
    fn = torch.cat([fn, fn.new_zeros(1, *fn.shape[1:])], dim=0)
    summed = fn.index_select(0, point_buf.reshape(-1)).reshape(*point_buf.shape, *fn.shape[1:]).sum(1)
    return normalize(summed).transpose(0, 1)


def grid_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(B, V, 3) -> (B, V, 3): `hrn_baseline.model.grid_vertex_normals`, the normalized sum of the
    unit normals of the faces around each vertex."""
    major = _vertex_major(vertices)
    fn = face_normals(major, faces)
    summed = torch.zeros_like(major)
    for k in range(3):
        summed = summed.index_add(0, faces[:, k], fn)
    return normalize(summed).transpose(0, 1)


def uv_gather(attrs: torch.Tensor, corners: torch.Tensor, bary: torch.Tensor, mask: torch.Tensor, size: int
              ) -> torch.Tensor:
    """`facehd.uv.rasterize_attributes` with a prepared raster: (B, V, C) attributes, (H*W, 3)
    corner vertices, (H*W, 3) barycentrics, (H*W,) bool coverage -> (B, C, H, W), 0 off the chart."""
    batch, n_vertices, channels = attrs.shape
    rows = attrs.permute(1, 0, 2).reshape(n_vertices, batch * channels)
    values = rows.index_select(0, corners.reshape(-1)).reshape(-1, 3, batch * channels)
    maps = (values * bary[:, :, None]).sum(1)
    maps = torch.where(mask[:, None], maps, maps.new_zeros(()))
    return maps.reshape(size, size, batch, channels).permute(2, 3, 0, 1)


def _raster_tables(model: HRN) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    raster = model.uv_raster
    corners = model.mm_faces.long()[raster.face_index.clamp(min=0)].reshape(-1, 3)
    bary = raster.bary.reshape(-1, 3).to(model.mm_mean_shape.dtype)
    mask = raster.mask.reshape(-1)
    return corners, bary, mask, bool(model.uv_coverage.all())


def render_views(model: HRN, images: torch.Tensor, state: MVState) -> MVRender:
    """(N, 3, S, S) images and the fit's variables -> the renders of every view, differentiable
    w.r.t. every variable (HRN's face formation of `HRN.decode` with given maps). Colours of the
    texels just outside the UV chart (which the render's bilinear lookups reach at the
    silhouette) are filled without gradient."""
    mm, s, size = model.morphable, model.image_size, model.high_size
    faces, uv = mm.faces, mm.uv
    corners, bary, covered, full = _raster_tables(model)
    n = images.shape[0]
    shape0 = compute_shape(mm, state.id.expand(n, -1), state.exp)
    albedo = compute_albedo(mm, state.tex)
    a, b, q = state.cameras()
    normals0 = model_vertex_normals(shape0, faces, mm.point_buf)
    shape_mid = shape0 + sample_uv_map(state.deformation, uv)
    vertices_cam = shape_mid @ a.transpose(-1, -2) + b[:, None]
    proj = project_rows(vertices_cam, s)
    normals_mid = model_vertex_normals(shape_mid, faces, mm.point_buf)
    maps = uv_gather(torch.cat([shape_mid, normals_mid, albedo, normals0, proj], -1), corners, bary, covered, size)
    coverage = model.uv_coverage.to(images.dtype)
    texture_map = sample_image(images, maps[:, 12:14].detach()) * coverage
    dense = dense_positions_from_map(maps[:, 0:3], maps[:, 9:12], state.displacement)
    mid_flat = normalize(_flat(maps[:, 3:6]))
    detail = grid_normals(dense, model.grid_faces)
    detail = torch.where(model.grid_used[None, :, None], detail, mid_flat)
    albedo_flat = _flat(maps[:, 6:9])
    rot_t = q.transpose(-1, -2)
    colour_mid = sh_shading(albedo_flat, mid_flat @ rot_t, state.gamma)
    colour_high = sh_shading(albedo_flat, detail @ rot_t, state.gamma)
    colour_maps = _unflat(torch.cat([colour_mid, colour_high], -1), size)
    if not full:
        border = fill_border(colour_maps.detach(), coverage) - colour_maps.detach()
        colour_maps = colour_maps + border * (1 - coverage)
    rasterizer = model.rasterizer_for(images.device)
    rendered = render_mesh(vertices_cam, faces, uv, s, rasterizer=rasterizer)
    mask = rendered.mask[:, None].to(images.dtype)
    looked_up = rasterizer.texture(colour_maps, rendered.image).permute(0, 3, 1, 2) * mask
    return MVRender(shape_mid=shape_mid, vertices_cam=vertices_cam, proj=proj, landmarks=proj[:, mm.keypoints],
                    position_map=maps[:, 0:3], normal_map0=maps[:, 9:12], texture_map=texture_map,
                    dense_vertices=dense, render_mid=looked_up[:, 0:3], render_high=looked_up[:, 3:6],
                    render_mask=mask, depth=rendered.fragments.depth)


# ----------------------------------------------------------------------------------------------
# losses


def tv_std_loss(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> HRN's `TVLoss_std`: 2 * (sum (dv^2 - mean dv^2)^2 + sum (dh^2 - mean dh^2)^2) / B,
    which evens out the sizes of the steps (squared differences)."""
    dv = (maps[:, :, 1:, :] - maps[:, :, :-1, :]) ** 2
    dh = (maps[:, :, :, 1:] - maps[:, :, :, :-1]) ** 2
    return TV_FACTOR * (((dv - dv.mean()) ** 2).sum() + ((dh - dh.mean()) ** 2).sum()) / maps.shape[0]


def _landmark_terms(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """(N, 68, 2) predicted, (N, 68, 2) detected (NaN allowed where invisible), (N, 68) visible
    -> (N,) HRN's weighted mean squared landmark error of each view (invisible points weigh 0)."""
    weights = landmark_weights(pred.shape[1], dtype=pred.dtype, device=pred.device) * visible
    target = torch.where(visible[..., None] > 0, target, pred.detach())
    return (((pred - target) ** 2).sum(-1) * weights).sum(-1) / pred.shape[1]


def mv_losses(state: MVState, out: MVRender, images: torch.Tensor, landmarks: torch.Tensor, visible: torch.Tensor,
              weights: MVLossWeights, face_masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The weighted terms of `compute_losses_for_mvhrn`, each summed over the views."""
    n = images.shape[0]
    mask = out.render_mask.detach()
    terms = {
        "photo_high": sum(photometric_loss(out.render_high[i:i + 1], images[i:i + 1], mask[i:i + 1]) for i in range(n)),
        "photo_mid": sum(photometric_loss(out.render_mid[i:i + 1], images[i:i + 1], mask[i:i + 1]) for i in range(n)),
        "coeff_reg": n * REG_ID * (state.id**2).sum() + REG_EXP * (state.exp**2).sum()
        + REG_TEX * (state.tex**2).sum(),
        "gamma_reg": _gamma_variance(state.gamma).sum(),
        "landmark": _landmark_terms(out.landmarks, landmarks, visible).sum(),
        "deformation_tv": n * tv_loss(state.deformation),
        "deformation_tv_std": n * tv_std_loss(state.deformation),
        "displacement_l1": state.displacement.abs().flatten(1).mean(1).sum(),
        "displacement_tv": sum(tv_loss(state.displacement[i:i + 1]) for i in range(n)),
        "displacement_tv_std": sum(tv_std_loss(state.displacement[i:i + 1]) for i in range(n)),
    }
    if face_masks is not None:
        from hrn_baseline.losses import contour_loss

        terms["contour"] = sum(contour_loss(out.proj[i:i + 1], face_masks[i], images.shape[-1]) for i in range(n))
    return {name: getattr(weights, name) * value for name, value in terms.items()}


def _gamma_variance(gamma: torch.Tensor) -> torch.Tensor:
    g = gamma.reshape(-1, 3, 9)
    return ((g - g.mean(dim=1, keepdim=True)) ** 2).flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------
# initialisation


def _view_tensors(views: Sequence[MVView], device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.stack([v.image for v in views]).to(device=device, dtype=dtype)
    landmarks = torch.as_tensor(np.stack([v.landmarks for v in views]), device=device, dtype=dtype)
    visible = torch.as_tensor(np.stack([v.visible for v in views]), device=device, dtype=dtype)
    return images, landmarks, visible


def initial_state(model: HRN, views: Sequence[MVView], *, calibrated: bool, from_checkpoint: bool) -> MVState:
    """The variables before any fitting: from the model's per-view predictions (mean of the ids and
    of the deformation maps, as upstream) when ``from_checkpoint``, else the mean face, flat
    maps and (uncalibrated) frontal poses; calibrated views get the head pose from triangulated
    landmarks (two views or more) or from the first view's crop."""
    device, dtype = model.mm_mean_shape.device, model.mm_mean_shape.dtype
    n, hm, hh = len(views), model.mid_size, model.high_size
    zeros = dict(device=device, dtype=dtype)
    if from_checkpoint:
        images = torch.stack([v.image for v in views]).to(**zeros)
        with torch.no_grad():
            out = model(images)
        c = out.coeffs
        sl = cv.COEFF_SLICES
        state = MVState(id=c[:, sl["id"]].mean(0, keepdim=True), deformation=out.deformation.mean(0, keepdim=True),
                        exp=c[:, sl["exp"]], tex=c[:, sl["tex"]], gamma=c[:, sl["gamma"]],
                        displacement=out.displacement, angle=c[:, sl["angle"]], trans=c[:, sl["trans"]])
    else:
        state = MVState(id=torch.zeros(1, cv.N_ID, **zeros), deformation=torch.zeros(1, 3, hm, hm, **zeros),
                        exp=torch.zeros(n, cv.N_EXP, **zeros), tex=torch.zeros(n, cv.N_TEX, **zeros),
                        gamma=torch.zeros(n, cv.N_GAMMA, **zeros), displacement=torch.zeros(n, 1, hh, hh, **zeros),
                        angle=torch.zeros(n, 3, **zeros), trans=torch.zeros(n, 3, **zeros))
    if calibrated:
        state = _calibrate(model, views, state)
    return state


def _calibrate(model: HRN, views: Sequence[MVView], state: MVState) -> MVState:
    """Replace the per-view poses by one head pose seen through each view's camera."""
    device, dtype = state.id.device, state.id.dtype
    s = model.image_size
    mats = np.stack([crop_camera_matrix(v, s) for v in views])
    rotations = np.stack([v.camera.R for v in views])
    offsets = np.stack([v.camera.t for v in views]) / cv.MM_PER_MODEL_UNIT
    keypoints = (compute_shape(model.morphable, state.id, state.exp[:1]) + sample_uv_map(state.deformation,
                 model.morphable.uv))[0, model.morphable.keypoints].detach().double().cpu().numpy()
    photo_points = [(v.landmarks - v.crop_d) / v.crop_k for v in views]
    points, ok = triangulate([v.camera for v in views], photo_points, [v.visible > 0 for v in views])
    if ok.sum() >= 6:
        rigid = fit_rigid(keypoints[ok] * cv.MM_PER_MODEL_UNIT, points[ok])
        head_rotation, head_trans = rigid.rotation, rigid.translation / cv.MM_PER_MODEL_UNIT
    else:
        # one view: the head faces the camera at the depth the crop implies (10 units at focal 1015)
        v0 = views[0]
        depth = cv.CAMERA_DISTANCE * v0.crop_k[0] * v0.camera.K[0, 0] / (cv.FOCAL * s / cv.IMAGE_SIZE)
        head_rotation = v0.camera.R.T @ np.diag([1.0, -1.0, -1.0])
        centre_cam = np.array([0.0, 0.0, depth]) - keypoints.mean(0) @ np.diag([1.0, -1.0, -1.0]).T
        head_trans = v0.camera.R.T @ (centre_cam - offsets[0])
    # the Euler angles of `rotation_matrix` (R = Rz Ry Rx) of the head rotation
    from scipy.spatial.transform import Rotation

    z, y, x = Rotation.from_matrix(head_rotation).as_euler("ZYX")
    t = dict(device=device, dtype=dtype)
    return dataclasses.replace(state, angle=None, trans=None,
                               head_angle=torch.tensor([[x, y, z]], **t),
                               head_trans=torch.as_tensor(head_trans, **t).reshape(1, 3),
                               view_rotation=torch.as_tensor(rotations, **t), view_matrix=torch.as_tensor(mats, **t),
                               view_offset=torch.as_tensor(offsets, **t))


def _keypoints_cam(model: HRN, state: MVState) -> torch.Tensor:
    """(N, 68, 2) projected keypoints of M1 (rows from the top), cheaply (no rendering)."""
    mm = model.morphable
    kp = mm.keypoints
    n = state.n_views
    rows = torch.stack([kp * 3, kp * 3 + 1, kp * 3 + 2], -1).reshape(-1)
    shape = (state.id.expand(n, -1) @ mm.id_base[rows].T + state.exp @ mm.exp_base[rows].T).reshape(n, -1, 3)
    offsets = sample_uv_map(state.deformation, mm.uv[kp])
    shape = shape + mm.mean_shape[kp] + offsets
    a, b, _ = state.cameras()
    return project_rows(shape @ a.transpose(-1, -2) + b[:, None], model.image_size)


def fit_landmarks(model: HRN, state: MVState, landmarks: torch.Tensor, visible: torch.Tensor, config: MVConfig
                  ) -> MVState:
    """The landmark start: (uncalibrated) each view's pose from the best of several yaw guesses,
    then pose, shared id and per-view exp against the 68 landmarks with a coefficient prior."""
    state = state.detach()
    if not state.calibrated and config.rigid_iterations:
        state = _rigid_from_guesses(model, state, landmarks, visible, config)
    if config.landmark_iterations:
        variables = [state.id, state.exp, *state.pose_tensors()]
        for v in variables:
            v.requires_grad_(True)
        optimizer = torch.optim.Adam(variables, lr=config.landmark_lr)
        for _ in range(config.landmark_iterations):
            optimizer.zero_grad()
            pred = _keypoints_cam(model, state)
            loss = _landmark_terms(pred, landmarks, visible).sum() + config.landmark_init_reg * (
                REG_ID * (state.id**2).sum() + REG_EXP * (state.exp**2).sum() / state.n_views)
            loss.backward()
            optimizer.step()
    return state.detach()


def _rigid_from_guesses(model: HRN, state: MVState, landmarks, visible, config: MVConfig) -> MVState:
    n, g = state.n_views, len(YAW_GUESSES_DEG)
    yaws = torch.tensor(np.radians(YAW_GUESSES_DEG), dtype=state.id.dtype, device=state.id.device)
    angle = state.angle.repeat_interleave(g, 0).clone()
    angle[:, 1] = angle[:, 1] + yaws.repeat(n)
    trial = dataclasses.replace(state, exp=state.exp.repeat_interleave(g, 0), angle=angle.requires_grad_(True),
                                trans=state.trans.repeat_interleave(g, 0).clone().requires_grad_(True))
    target, vis = landmarks.repeat_interleave(g, 0), visible.repeat_interleave(g, 0)
    optimizer = torch.optim.Adam([trial.angle, trial.trans], lr=config.landmark_lr * 2)
    for _ in range(config.rigid_iterations):
        optimizer.zero_grad()
        _landmark_terms(_keypoints_cam(model, trial), target, vis).sum().backward()
        optimizer.step()
    with torch.no_grad():
        errors = _landmark_terms(_keypoints_cam(model, trial), target, vis).reshape(n, g)
        best = errors.argmin(1) + torch.arange(n, device=errors.device) * g
    return dataclasses.replace(state, angle=trial.angle.detach()[best].clone(),
                               trans=trial.trans.detach()[best].clone())


def fit_appearance(model: HRN, state: MVState, images: torch.Tensor) -> MVState:
    """Per view, the SH lighting (with the mean albedo) and then the texture coefficients by
    (ridge) least squares on the vertices facing the camera: a start for the photometric fit."""
    mm = model.morphable
    state = state.detach()
    with torch.no_grad():
        n = state.n_views
        shape = compute_shape(mm, state.id.expand(n, -1), state.exp) + sample_uv_map(state.deformation, mm.uv)
        a, b, q = state.cameras()
        cam = shape @ a.transpose(-1, -2) + b[:, None]
        rows = project_rows(cam, model.image_size)
        normals = vertex_normals(shape, mm.faces, mm.point_buf)
        to_camera = F.normalize(state.camera_centres()[:, None] - shape, dim=-1)
        facing = (normals * to_camera).sum(-1) > APPEARANCE_MIN_COS
        colours = sample_image(images, rows.transpose(1, 2)[..., None])[..., 0].transpose(1, 2)  # (N, V, 3)
        basis = sh_basis(normals @ q.transpose(-1, -2))  # (N, V, 9)
        mean_albedo = mm.mean_tex.reshape(-1, 3) / 255.0
        gammas, texes = [], []
        tex_base = mm.tex_base.reshape(-1, 3, mm.tex_base.shape[-1]) / 255.0  # (V, 3, 80)
        for i in range(n):
            use = facing[i]
            if use.sum() < 20:
                gammas.append(state.gamma[i])
                texes.append(state.tex[i])
                continue
            # one white light for the three channels (the gamma prior prefers it); colour goes to the albedo
            design = (basis[i, use, None, :] * mean_albedo[use, :, None]).reshape(-1, basis.shape[-1])
            white = torch.linalg.lstsq(design, colours[i, use].reshape(-1, 1)).solution[:, 0]
            gamma = white.expand(3, -1) - white.new_tensor([cv.SH_INIT_DC] + [0.0] * 8)
            irradiance = basis[i, use] @ (gamma + gamma.new_tensor([cv.SH_INIT_DC] + [0.0] * 8)).T  # (M, 3)
            design = (tex_base[use] * irradiance[..., None]).reshape(-1, tex_base.shape[-1])
            residual = (colours[i, use] - mean_albedo[use] * irradiance).reshape(-1)
            lhs = design.T @ design + TEX_RIDGE * torch.eye(design.shape[1], dtype=design.dtype, device=design.device)
            texes.append(torch.linalg.solve(lhs, design.T @ residual))
            gammas.append(gamma.reshape(-1))
        return dataclasses.replace(state, gamma=torch.stack(gammas), tex=torch.stack(texes))


# ----------------------------------------------------------------------------------------------
# the fit


@dataclass
class MVFit:
    """The outcome of `fit_multiview`: the variables, the final renders (the extra pass without
    gradients, as upstream), and the weighted loss terms of the last iteration."""

    state: MVState
    render: MVRender
    views: list[MVView]
    losses: dict[str, float]
    history: list[float]


def fit_multiview(model: HRN, views: Sequence[MVView], config: MVConfig | None = None, *,
                  from_checkpoint: bool = False, progress: Progress | None = None) -> MVFit:
    """Fit N >= 1 views of one person jointly (module docstring). Calibrated when
    ``config.calibrated`` and every view has a camera. Deterministic for ``config.seed``."""
    config = config or MVConfig()
    if not views:
        raise InputError("no views to fit")
    torch.manual_seed(config.seed)
    model.eval()
    calibrated = config.calibrated and all(v.camera is not None for v in views)
    param = model.mm_mean_shape
    images, landmarks, visible = _view_tensors(views, param.device, param.dtype)
    masks = None
    if all(v.face_mask is not None for v in views):
        masks = torch.stack([v.face_mask[0] for v in views]).to(param)
    state = initial_state(model, views, calibrated=calibrated, from_checkpoint=from_checkpoint)
    if not from_checkpoint:
        state = fit_landmarks(model, state, landmarks, visible, config)
        state = fit_appearance(model, state, images)
    state = state.detach()
    variables = state.variables()
    for v in variables:
        v.requires_grad_(True)
    optimizer = torch.optim.Adam(variables, lr=config.lr)
    steps: Iterable[int] = range(config.iterations)
    if progress is not None:
        steps = progress(steps, total=config.iterations, desc="mv fit", unit="it")
    history, terms = [], {}
    for _ in steps:
        optimizer.zero_grad()
        out = render_views(model, images, state)
        terms = mv_losses(state, out, images, landmarks, visible, config.weights, masks)
        total = sum(terms.values())
        total.backward()
        optimizer.step()
        history.append(float(total.detach()))
    state = state.detach()
    with torch.no_grad():
        out = render_views(model, images, state)
        terms = mv_losses(state, out, images, landmarks, visible, config.weights, masks)
    return MVFit(state=state, render=out, views=list(views), losses={k: float(v) for k, v in terms.items()},
                 history=history)
