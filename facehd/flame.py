"""FLAME (Li et al., SIGGRAPH Asia 2017): the file readers (`generic_model.pkl` with its chumpy
objects, `head_template.obj`, the 51-point static landmark embedding) and batched, differentiable
FLAME in PyTorch (shape, expression, global / neck / jaw / eye pose, linear blend skinning)."""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from facehd.errors import FileFormatError, InputError
from facehd.fsutil import atomic_open

# FLAME 2020's generic_model.pkl: 400 shape directions, the first 300 identity, the last 100
# expression (flame-fitting hello_world.py, DECA FLAME.py).
N_SHAPE = 300
N_EXPRESSION = 100
N_JOINTS = 5  # global (root), neck, jaw, left eye, right eye
JOINT_NAMES = ("global", "neck", "jaw", "eye_left", "eye_right")
N_POSE = 3 * N_JOINTS  # axis-angle per joint, in JOINT_NAMES order
N_POSE_BASIS = 9 * (N_JOINTS - 1)  # posedirs: (R - I) of every non-root joint, flattened
N_STATIC_LANDMARKS = 51  # iBUG 17..67 (no jaw line), flame_static_embedding.pkl
FIRST_STATIC_LANDMARK_IBUG = 17

MODEL_FILE = "generic_model.pkl"
TEMPLATE_FILE = "head_template.obj"
EMBEDDING_FILE = "flame_static_embedding.pkl"

REQUIRED_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f")
_BARY_SUM_ATOL = 1e-4
_SMALL_ANGLE2 = 1e-8  # below this squared angle Rodrigues' coefficients use their Taylor series


# ----------------------------------------------------------------------------------------------
# restricted unpickling


class _ChumpyStub:
    """Stands in for `chumpy.ch.Ch` while unpickling: keeps the object's state dict, whose `x`
    holds the array (chumpy's `Ch.__getstate__` pickles `__dict__`)."""

    def __setstate__(self, state):
        self.state = state


class _SparseStub:
    """Stands in for a scipy sparse matrix while unpickling (its `__dict__` holds `data`,
    `indices`, `indptr` and `_shape`); the class name says the format."""

    format = ""

    def __setstate__(self, state):
        self.state = state


def _sparse_stub(fmt: str) -> type:
    return type(f"_Sparse_{fmt}", (_SparseStub,), {"format": fmt})


def _numpy_names() -> dict[str, object]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    names = {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar,
             "ndarray": np.ndarray, "dtype": np.dtype}
    if hasattr(numeric, "_frombuffer"):
        names["_frombuffer"] = numeric._frombuffer
    return names


_NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                  "numpy._core.numeric")
_SPARSE_FORMATS = ("csc", "csr", "coo")
# chumpy's state dicts hold sets (`_dirty_vars`); containers cannot run code
_BUILTIN_CONTAINERS = {"object": object, "set": set, "frozenset": frozenset, "list": list, "dict": dict,
                       "tuple": tuple, "bytes": bytes, "bytearray": bytearray}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, chumpy `Ch` arrays (as stubs) and scipy sparse matrices (as stubs),
    and refuses every other class, so a pickle file cannot run code."""

    def __init__(self, fh, path: Path):
        super().__init__(fh, encoding="latin1")  # FLAME's files were written by Python 2
        self.path = path
        self.numpy = _numpy_names()

    def find_class(self, module: str, name: str):
        if module in _NUMPY_MODULES and name in self.numpy:
            return self.numpy[name]
        if module.startswith("chumpy") and name == "Ch":
            return _ChumpyStub
        if module.startswith("scipy.sparse"):
            fmt = name.split("_")[0]
            if name.endswith("_matrix") or name.endswith("_array"):
                if fmt in _SPARSE_FORMATS:
                    return _sparse_stub(fmt)
        if module in ("copy_reg", "copyreg") and name == "_reconstructor":
            return _reconstructor
        if module in ("__builtin__", "builtins") and name in _BUILTIN_CONTAINERS:
            return _BUILTIN_CONTAINERS[name]
        if module == "_codecs" and name == "encode":  # how Python 3 writes bytes at protocol 2
            return _encode_text
        raise FileFormatError(self.path, f"holds a pickled {module}.{name}, which is not a numpy, chumpy "
                                         "or scipy sparse array; refusing to unpickle it")


def _reconstructor(cls, base, state):
    """copyreg._reconstructor for the stub classes only (protocol 0/1 pickles of chumpy objects)."""
    if not (isinstance(cls, type) and issubclass(cls, (_ChumpyStub, _SparseStub)) and base is object):
        raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")
    return object.__new__(cls)


def _encode_text(text, encoding="utf-8"):
    if not isinstance(text, str) or not isinstance(encoding, str):
        raise pickle.UnpicklingError("_codecs.encode with non-text arguments")
    return text.encode(encoding)


def _to_numpy(value, path: Path, key: str):
    """Stubs and arrays -> numpy arrays (sparse matrices densified); other values unchanged."""
    if isinstance(value, _ChumpyStub):
        state = value.state if isinstance(value.state, dict) else {}
        if "x" not in state:
            raise FileFormatError(path, f"key {key!r} is a chumpy object without an array ('x')")
        return _to_numpy(state["x"], path, key)
    if isinstance(value, _SparseStub):
        return _densify(value, path, key)
    return value


def _densify(stub: _SparseStub, path: Path, key: str) -> np.ndarray:
    import scipy.sparse

    state = stub.state if isinstance(stub.state, dict) else {}
    shape = state.get("_shape", state.get("shape"))
    try:
        if stub.format == "coo":
            row = state.get("row", state.get("coords", (None, None))[0])
            col = state.get("col", state.get("coords", (None, None))[1])
            matrix = scipy.sparse.coo_matrix((state["data"], (row, col)), shape=shape)
        else:
            cls = scipy.sparse.csc_matrix if stub.format == "csc" else scipy.sparse.csr_matrix
            matrix = cls((state["data"], state["indices"], state["indptr"]), shape=shape)
        return np.asarray(matrix.toarray())
    except Exception as exc:  # scipy raises several types for inconsistent arrays
        raise FileFormatError(path, f"key {key!r} is a malformed sparse matrix ({exc})") from exc


def read_pickle(path: str | Path) -> object:
    """Unpickle a FLAME asset with the restricted unpickler; chumpy arrays and sparse matrices in a
    top-level dict become numpy arrays. Raises `FileFormatError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(path, "no such file")
    data = path.read_bytes()
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), path).load()
    except FileFormatError:
        raise
    except Exception as exc:  # truncated or corrupt pickles raise many types
        raise FileFormatError(path, f"not a readable pickle file ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, dict):
        obj = {(k.decode("latin1") if isinstance(k, bytes) else k): _to_numpy(v, path, str(k))
               for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------------------------
# the model file


@dataclass(frozen=True, eq=False)
class FlameModel:
    """FLAME's arrays as numpy, in the file's units (metres) and 0-based indices.

    V vertices, F faces, J = 5 joints.
    """

    v_template: np.ndarray  # (V, 3)
    shapedirs: np.ndarray  # (V, 3, 400): 300 shape then 100 expression directions
    posedirs: np.ndarray  # (V, 3, 36) pose correctives for (R - I) of joints 1..4
    J_regressor: np.ndarray  # (J, V) dense
    weights: np.ndarray  # (V, J) skinning weights
    parents: np.ndarray  # (J,) int64, -1 for the root (kintree_table[0])
    faces: np.ndarray  # (F, 3) int64
    source: Path | None = None

    @property
    def n_vertices(self) -> int:
        return int(self.v_template.shape[0])

    @property
    def n_faces(self) -> int:
        return int(self.faces.shape[0])


def _array(data: dict, key: str, path: Path, shape: tuple, integer: bool = False) -> np.ndarray:
    if key not in data:
        raise FileFormatError(path, f"missing key {key!r} (a FLAME generic_model.pkl needs "
                                    f"{', '.join(REQUIRED_KEYS)})")
    try:
        arr = np.asarray(data[key])
    except Exception as exc:
        raise FileFormatError(path, f"key {key!r} is not an array ({exc})") from exc
    if not np.issubdtype(arr.dtype, np.number):
        raise FileFormatError(path, f"key {key!r} is not numeric (dtype {arr.dtype})")
    want = tuple(arr.shape[i] if (s is None and i < arr.ndim) else s for i, s in enumerate(shape))
    if arr.shape != want:
        wanted = tuple("any" if s is None else s for s in shape)
        raise FileFormatError(path, f"key {key!r} has shape {arr.shape}, expected {wanted}")
    if integer:
        return arr.astype(np.int64)
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise FileFormatError(path, f"key {key!r} holds NaN or infinite values")
    return arr


def load_flame(path: str | Path) -> FlameModel:
    """Read FLAME's `generic_model.pkl` (real or SynthFLAME) without chumpy.

    Checks the keys and shapes: v_template (V, 3), shapedirs (V, 3, 400), posedirs (V, 3, 36),
    J_regressor (5, V) (scipy sparse in the real file), weights (V, 5), kintree_table (2, 5),
    f (F, 3). Raises `FileFormatError` naming the file and the offending key.
    """
    path = Path(path)
    data = read_pickle(path)
    if not isinstance(data, dict):
        raise FileFormatError(path, f"holds a {type(data).__name__}, expected a dict of FLAME arrays")
    v_template = _array(data, "v_template", path, (None, 3))
    n = len(v_template)
    shapedirs = _array(data, "shapedirs", path, (n, 3, N_SHAPE + N_EXPRESSION))
    posedirs = _array(data, "posedirs", path, (n, 3, N_POSE_BASIS))
    regressor = _array(data, "J_regressor", path, (N_JOINTS, n))
    weights = _array(data, "weights", path, (n, N_JOINTS))
    kintree = _array(data, "kintree_table", path, (2, N_JOINTS), integer=True)
    faces = _array(data, "f", path, (None, 3), integer=True)
    if faces.size == 0 or faces.min() < 0 or faces.max() >= n:
        raise FileFormatError(path, f"key 'f' holds vertex indices outside [0, {n})")
    parents = kintree[0].copy()
    # the root's parent is stored as -1 or as 2**32 - 1 (uint32 in the real file)
    parents[0] = -1
    if np.any(parents[1:] < 0) or np.any(parents[1:] >= np.arange(1, N_JOINTS)):
        raise FileFormatError(path, f"kintree_table parents {kintree[0].tolist()} are not a tree ordered "
                                    "root first")
    if not np.allclose(weights.sum(axis=1), 1.0, atol=1e-3):
        raise FileFormatError(path, "skinning weights do not sum to 1 per vertex")
    return FlameModel(v_template=v_template, shapedirs=shapedirs, posedirs=posedirs, J_regressor=regressor,
                      weights=weights, parents=parents, faces=faces, source=path)


# ----------------------------------------------------------------------------------------------
# head_template.obj and the landmark embedding


@dataclass(frozen=True, eq=False)
class HeadTemplate:
    """`head_template.obj`: positions and UVs with separate indices (T >= V texture vertices)."""

    vertices: np.ndarray  # (V, 3)
    uvs: np.ndarray  # (T, 2) in [0, 1], v up
    faces: np.ndarray  # (F, 3) int64 into vertices
    faces_uv: np.ndarray  # (F, 3) int64 into uvs

    def vertex_uvs(self) -> np.ndarray:
        """(V, 2) one UV per vertex: where a vertex has several (on a UV seam), the one most of its
        corners use."""
        corners_v = self.faces.ravel()
        corners_t = self.faces_uv.ravel()
        pairs, counts = np.unique(np.stack([corners_v, corners_t], 1), axis=0, return_counts=True)
        order = np.lexsort((-counts, pairs[:, 0]))  # by vertex, most used first
        pairs = pairs[order]
        first = np.r_[True, pairs[1:, 0] != pairs[:-1, 0]]
        out = np.zeros((len(self.vertices), 2))
        out[pairs[first, 0]] = self.uvs[pairs[first, 1]]
        return out


def read_head_template(path: str | Path) -> HeadTemplate:
    """Read `head_template.obj` keeping the separate v / vt indices of its `f v/vt` corners."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(path, "no such file")
    vertices, uvs, faces, faces_uv = [], [], [], []
    text = path.read_bytes().decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            if parts[0] == "v":
                vertices.append([float(p) for p in parts[1:4]])
            elif parts[0] == "vt":
                uvs.append([float(p) for p in parts[1:3]])
            elif parts[0] == "f":
                corners = [p.split("/") for p in parts[1:]]
                if len(corners) < 3 or any(len(c) < 2 or not c[1] for c in corners):
                    raise ValueError("faces need v/vt corners")
                v = [int(c[0]) - 1 for c in corners]
                t = [int(c[1]) - 1 for c in corners]
                for k in range(1, len(corners) - 1):  # fan triangulation
                    faces.append([v[0], v[k], v[k + 1]])
                    faces_uv.append([t[0], t[k], t[k + 1]])
        except ValueError as exc:
            raise FileFormatError(path, f"line {number}: {exc}") from exc
    vertices = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    uvs = np.asarray(uvs, dtype=np.float64).reshape(-1, 2)
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    faces_uv = np.asarray(faces_uv, dtype=np.int64).reshape(-1, 3)
    if len(vertices) == 0 or len(faces) == 0:
        raise FileFormatError(path, "no vertices or no faces")
    if faces.min() < 0 or faces.max() >= len(vertices) or faces_uv.min() < 0 or faces_uv.max() >= len(uvs):
        raise FileFormatError(path, "face indices out of range")
    return HeadTemplate(vertices=vertices, uvs=uvs, faces=faces, faces_uv=faces_uv)


def write_head_template(path: str | Path, template: HeadTemplate) -> None:
    """Write a `head_template.obj` with separate v / vt indices (`f v/vt v/vt v/vt`), atomically."""
    lines = ["# FLAME head template: v, vt, f v/vt\n"]
    lines += [f"v {x!r} {y!r} {z!r}\n" for x, y, z in template.vertices.tolist()]
    lines += [f"vt {u!r} {v!r}\n" for u, v in template.uvs.tolist()]
    corners = np.stack([template.faces + 1, template.faces_uv + 1], axis=2).reshape(-1, 6)
    lines += ["f {}/{} {}/{} {}/{}\n".format(*row) for row in corners.tolist()]
    with atomic_open(path, "w", newline="\n") as fh:
        fh.writelines(lines)


@dataclass(frozen=True, eq=False)
class LandmarkEmbedding:
    """Landmarks as barycentric points on mesh faces (FLAME's `flame_static_embedding.pkl`)."""

    face_index: np.ndarray  # (L,) int64
    bary: np.ndarray  # (L, 3)


def load_static_embedding(path: str | Path, n_faces: int) -> LandmarkEmbedding:
    """Read `flame_static_embedding.pkl` (`lmk_face_idx` (51,), `lmk_b_coords` (51, 3)) for a
    mesh of ``n_faces`` faces. Raises `FileFormatError` naming the file."""
    path = Path(path)
    data = read_pickle(path)
    if not isinstance(data, dict):
        raise FileFormatError(path, f"holds a {type(data).__name__}, expected a dict")
    face_index = _array(data, "lmk_face_idx", path, (N_STATIC_LANDMARKS,), integer=True)
    bary = _array(data, "lmk_b_coords", path, (N_STATIC_LANDMARKS, 3))
    if face_index.min() < 0 or face_index.max() >= n_faces:
        raise FileFormatError(path, f"lmk_face_idx holds faces outside [0, {n_faces})")
    if not np.allclose(bary.sum(axis=1), 1.0, atol=_BARY_SUM_ATOL):
        raise FileFormatError(path, "lmk_b_coords rows do not sum to 1")
    return LandmarkEmbedding(face_index=face_index, bary=bary)


def write_static_embedding(path: str | Path, embedding: LandmarkEmbedding) -> None:
    """Write `flame_static_embedding.pkl` as the real file stores it (uint32 faces, float64)."""
    data = {"lmk_face_idx": embedding.face_index.astype(np.uint32),
            "lmk_b_coords": embedding.bary.astype(np.float64)}
    with atomic_open(path, "wb") as fh:
        pickle.dump(data, fh, protocol=2)


def embedded_points(vertices, faces, embedding: LandmarkEmbedding):
    """(..., V, 3) vertices (numpy or torch), (F, 3) faces -> (..., L, 3) landmark positions."""
    if torch.is_tensor(vertices):
        tri = torch.as_tensor(faces[embedding.face_index], device=vertices.device)
        bary = torch.as_tensor(embedding.bary, dtype=vertices.dtype, device=vertices.device)
        return (vertices[..., tri, :] * bary[..., None]).sum(-2)
    tri = np.asarray(faces)[embedding.face_index]
    return (np.asarray(vertices)[..., tri, :] * embedding.bary[..., None]).sum(-2)


@dataclass(frozen=True, eq=False)
class FlameAssets:
    """A FLAME folder: the model, its UV template and its 51-point static embedding."""

    model: FlameModel
    template: HeadTemplate
    embedding: LandmarkEmbedding
    folder: Path


def load_flame_folder(folder: str | Path) -> FlameAssets:
    """Read `generic_model.pkl`, `head_template.obj` and `flame_static_embedding.pkl` from a folder
    and check that they describe the same mesh."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileFormatError(folder, "not a folder (expected generic_model.pkl, head_template.obj, "
                                      "flame_static_embedding.pkl)")
    model = load_flame(folder / MODEL_FILE)
    template = read_head_template(folder / TEMPLATE_FILE)
    if len(template.vertices) != model.n_vertices or not np.array_equal(template.faces, model.faces):
        raise FileFormatError(folder / TEMPLATE_FILE, f"has {len(template.vertices)} vertices / "
                                                      f"{len(template.faces)} faces that do not match "
                                                      f"{MODEL_FILE}'s {model.n_vertices} / {model.n_faces}")
    embedding = load_static_embedding(folder / EMBEDDING_FILE, model.n_faces)
    return FlameAssets(model=model, template=template, embedding=embedding, folder=folder)


# ----------------------------------------------------------------------------------------------
# differentiable FLAME


@dataclass(frozen=True, eq=False)
class FlameTensors:
    """FLAME's arrays as tensors of one dtype and device (see `FlameModel`)."""

    v_template: torch.Tensor  # (V, 3)
    shapedirs: torch.Tensor  # (V, 3, 400)
    posedirs: torch.Tensor  # (36, 3V), the (V, 3, 36) array reordered for one matmul
    J_regressor: torch.Tensor  # (J, V)
    weights: torch.Tensor  # (V, J)
    parents: tuple[int, ...]
    faces: torch.Tensor  # (F, 3) int64

    @classmethod
    def of(cls, model: FlameModel, dtype: torch.dtype = torch.float32,
           device: torch.device | str | None = None) -> FlameTensors:
        def t(a):
            return torch.as_tensor(a, dtype=dtype, device=device)

        return cls(v_template=t(model.v_template), shapedirs=t(model.shapedirs),
                   posedirs=t(model.posedirs.reshape(-1, N_POSE_BASIS).T.copy()),
                   J_regressor=t(model.J_regressor), weights=t(model.weights),
                   parents=tuple(int(p) for p in model.parents),
                   faces=torch.as_tensor(model.faces, dtype=torch.int64, device=device))


@dataclass
class FlameOutput:
    vertices: torch.Tensor  # (B, V, 3) posed
    joints: torch.Tensor  # (B, J, 3) posed joint locations
    shaped: torch.Tensor  # (B, V, 3) template + shape + expression, before pose


def flame_pose(global_pose: torch.Tensor, neck_pose: torch.Tensor, jaw_pose: torch.Tensor,
               eye_pose: torch.Tensor) -> torch.Tensor:
    """(B, 3) x 3 and (B, 6) eye pose (left then right) -> (B, 15) full pose in joint order."""
    return torch.cat([global_pose, neck_pose, jaw_pose, eye_pose], dim=-1)


def rodrigues(rotvec: torch.Tensor) -> torch.Tensor:
    """(..., 3) axis-angle -> (..., 3, 3) rotation matrices, exact and differentiable at zero."""
    theta2 = (rotvec * rotvec).sum(-1)
    small = theta2 < _SMALL_ANGLE2
    safe2 = torch.where(small, torch.ones_like(theta2), theta2)
    theta = safe2.sqrt()
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / safe2)
    x, y, z = rotvec.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*rotvec.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device).expand_as(k)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


def flame_forward(model: FlameTensors, shape: torch.Tensor, expression: torch.Tensor,
                  pose: torch.Tensor, translation: torch.Tensor | None = None) -> FlameOutput:
    """Batched FLAME: (B, <=300) shape, (B, <=100) expression, (B, 15) pose -> posed vertices.

    Missing trailing coefficients count as zero. Pose is axis-angle per joint in `JOINT_NAMES`
    order (see `flame_pose`). Linear blend skinning as SMPL / FLAME: shaped = template + shapedirs
    coeffs; joints = J_regressor shaped; pose correctives from (R_j - I) of the non-root joints;
    vertices = sum_j w_j G_j (shaped + correctives), G_j the world transforms relative to the rest
    joints. ``translation`` (B, 3) is added last.
    """
    if shape.ndim != 2 or expression.ndim != 2 or pose.ndim != 2:
        raise InputError("shape, expression and pose must be (B, k) tensors")
    if shape.shape[1] > N_SHAPE or expression.shape[1] > N_EXPRESSION or pose.shape[1] != N_POSE:
        raise InputError(f"expected (B, <= {N_SHAPE}) shape, (B, <= {N_EXPRESSION}) expression and "
                         f"(B, {N_POSE}) pose, got {tuple(shape.shape)}, {tuple(expression.shape)}, "
                         f"{tuple(pose.shape)}")
    b = pose.shape[0]
    ns, ne = shape.shape[1], expression.shape[1]
    dirs = torch.cat([model.shapedirs[..., :ns], model.shapedirs[..., N_SHAPE:N_SHAPE + ne]], dim=-1)
    coeffs = torch.cat([shape, expression], dim=-1)
    shaped = model.v_template + torch.einsum("vck,bk->bvc", dirs, coeffs)
    joints = torch.einsum("jv,bvc->bjc", model.J_regressor, shaped)

    rot = rodrigues(pose.reshape(b, N_JOINTS, 3))  # (B, J, 3, 3)
    eye = torch.eye(3, dtype=pose.dtype, device=pose.device)
    pose_feature = (rot[:, 1:] - eye).reshape(b, N_POSE_BASIS)
    posed = shaped + (pose_feature @ model.posedirs).reshape(b, -1, 3)

    world = []  # (B, 4, 4) per joint
    for j, parent in enumerate(model.parents):
        offset = joints[:, j] if parent < 0 else joints[:, j] - joints[:, parent]
        local = _homogeneous_transform(rot[:, j], offset)
        world.append(local if parent < 0 else world[parent] @ local)
    world = torch.stack(world, dim=1)  # (B, J, 4, 4)
    posed_joints = world[..., :3, 3]
    # transforms relative to the rest pose: G_j [I, -J_j]
    rel_t = world[..., :3, 3] - (world[..., :3, :3] @ joints[..., None])[..., 0]
    rel = torch.cat([world[..., :3, :3], rel_t[..., None]], dim=-1)  # (B, J, 3, 4)
    blended = torch.einsum("vj,bjrc->bvrc", model.weights, rel)  # (B, V, 3, 4)
    vertices = (blended[..., :3] @ posed[..., None])[..., 0] + blended[..., 3]
    if translation is not None:
        vertices = vertices + translation[:, None]
        posed_joints = posed_joints + translation[:, None]
    return FlameOutput(vertices=vertices, joints=posed_joints, shaped=shaped)


def _homogeneous_transform(rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    top = torch.cat([rotation, translation[..., None]], dim=-1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)
