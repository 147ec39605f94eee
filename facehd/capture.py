"""The FaceHD-100 capture layout on disk (DESIGN section 6): file names, cameras, landmarks and
subjects.csv, with one reader and one atomic writer per file."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from facehd.conventions import LANDMARKS7_IBUG, N_LANDMARKS
from facehd.errors import FileFormatError, InputError
from facehd.fsutil import atomic_open

# --- the layout ------------------------------------------------------------------------------
N_VIEWS = 9  # FaceHD-100: 9 calibrated views per capture
CAMERA_NAMES = tuple(f"cam{i}" for i in range(N_VIEWS))
IMAGE_SUFFIXES = (".jpg", ".png")  # looked up in this order

SUBJECTS_CSV = "subjects.csv"
IMAGES_DIR = "images"
CAMERAS_JSON = "cameras.json"
SCAN_PLY = "scan.ply"
LANDMARKS7_TXT = "landmarks7.txt"
LANDMARKS68_DIR = "landmarks68"

# --- subjects.csv ------------------------------------------------------------------------------
SUBJECT_COLUMNS = ("subject_id", "gender", "age", "ethnicity")
GENDERS = ("female", "male")
ETHNICITIES = ("asian", "white", "black", "other")
SUBJECT_ID_PATTERN = re.compile(r"^S\d{3,}$")  # S001, S002, ...
MAX_AGE_YEARS = 120

# --- cameras.json ------------------------------------------------------------------------------
CAMERAS_UNITS = "mm"
CAMERAS_CONVENTION = "opencv world-to-camera: x_cam = R @ X_world + t"
N_DISTORTION = 5  # OpenCV k1, k2, p1, p2, k3

N_LANDMARKS7 = len(LANDMARKS7_IBUG)


# --- cameras -----------------------------------------------------------------------------------


@dataclass(eq=False)
class Camera:
    """A calibrated pinhole camera in the OpenCV convention, world = scan millimetres.

    Attributes:
        K: (3, 3) intrinsics in pixels; pixel (0, 0) is the centre of the top-left pixel,
            x right, y down.
        R: (3, 3) world-to-camera rotation: ``x_cam = R @ X_world + t``.
        t: (3,) world-to-camera translation in millimetres.
        width: image width in pixels.
        height: image height in pixels.
        distortion: (5,) OpenCV coefficients k1, k2, p1, p2, k3 (zeros: none).
    """

    K: np.ndarray
    R: np.ndarray
    t: np.ndarray
    width: int
    height: int
    distortion: np.ndarray = field(default_factory=lambda: np.zeros(N_DISTORTION))

    def __post_init__(self) -> None:
        self.K = np.asarray(self.K, dtype=np.float64).reshape(3, 3)
        self.R = np.asarray(self.R, dtype=np.float64).reshape(3, 3)
        self.t = np.asarray(self.t, dtype=np.float64).reshape(3)
        self.distortion = np.asarray(self.distortion, dtype=np.float64).reshape(N_DISTORTION)
        self.width = int(self.width)
        self.height = int(self.height)

    @property
    def center_mm(self) -> np.ndarray:
        """(3,) camera centre in world millimetres."""
        return -self.R.T @ self.t

    def to_camera(self, points_mm: np.ndarray) -> np.ndarray:
        """World points (P, 3) mm -> camera-frame points (P, 3) mm (z forward)."""
        return np.asarray(points_mm, dtype=np.float64) @ self.R.T + self.t

    def project(self, points_mm: np.ndarray, *, distort: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Project world points (P, 3) mm to pixels (P, 2) and depths (P,) mm.

        With ``distort`` (the default, as the images were taken) the OpenCV radial-tangential
        model is applied to the normalised coordinates before K, like ``cv2.projectPoints``;
        ``distort=False`` gives the ideal pinhole projection. A point is in front of the camera
        when its depth (camera-frame z) is > 0; pixels of the other points are NaN.
        """
        cam = self.to_camera(points_mm)
        depth = cam[:, 2]
        front = depth > 0
        xy = np.full((cam.shape[0], 2), np.nan)
        xy[front] = cam[front, :2] / depth[front, None]
        if distort and np.any(self.distortion):
            xy = _distort(xy, self.distortion)
        pixels = xy @ self.K[:2, :2].T + self.K[:2, 2]
        return pixels, depth

    def inside_image(self, pixels: np.ndarray) -> np.ndarray:
        """(P,) bool: pixel positions (P, 2) that fall on the image (pixel centres at integers)."""
        x, y = pixels[:, 0], pixels[:, 1]
        with np.errstate(invalid="ignore"):
            return (x >= -0.5) & (x <= self.width - 0.5) & (y >= -0.5) & (y <= self.height - 0.5)

    def resized(self, width: int, height: int) -> Camera:
        """The same camera for the image resized to ``width`` x ``height`` pixels."""
        return Camera(
            K=scale_intrinsics(self.K, width / self.width, height / self.height),
            R=self.R.copy(),
            t=self.t.copy(),
            width=width,
            height=height,
            distortion=self.distortion.copy(),
        )

    def to_dict(self) -> dict:
        """JSON-ready dict in the cameras.json layout."""
        return {
            "K": self.K.tolist(),
            "R": self.R.tolist(),
            "t": self.t.tolist(),
            "width": self.width,
            "height": self.height,
            "distortion": self.distortion.tolist(),
        }


def scale_intrinsics(K: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """K for an image resized by (sx, sy). Pixel centres are at integers, so the image edge is at
    -0.5: u' = (u + 0.5) * sx - 0.5, which moves the principal point by 0.5 (sx - 1)."""
    S = np.array([[sx, 0.0, 0.5 * (sx - 1.0)], [0.0, sy, 0.5 * (sy - 1.0)], [0.0, 0.0, 1.0]])
    return S @ np.asarray(K, dtype=np.float64)


def scale_pixels(pixels: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Pixel positions (..., 2) for an image resized by (sx, sy); the same map as `scale_intrinsics`."""
    out = np.array(pixels, dtype=np.float64, copy=True)
    out[..., 0] = (out[..., 0] + 0.5) * sx - 0.5
    out[..., 1] = (out[..., 1] + 0.5) * sy - 0.5
    return out


def _distort(xy: np.ndarray, d: np.ndarray) -> np.ndarray:
    """OpenCV's 5-coefficient radial-tangential distortion of normalised coordinates (P, 2)."""
    k1, k2, p1, p2, k3 = d
    x, y = xy[:, 0], xy[:, 1]
    r2 = x * x + y * y
    radial = 1.0 + r2 * (k1 + r2 * (k2 + r2 * k3))
    xd = x * radial + 2.0 * p1 * x * y + p2 * (r2 + 2.0 * x * x)
    yd = y * radial + p1 * (r2 + 2.0 * y * y) + 2.0 * p2 * x * y
    return np.stack([xd, yd], axis=1)


def read_cameras(path: str | Path) -> dict[str, Camera]:
    """Read cameras.json: camera name -> `Camera`, in view order (cam0, cam1, ...).

    Raises `FileFormatError` naming the file and the first problem (bad JSON, a missing key, a
    matrix of the wrong shape, a non-numeric or non-finite value, units other than mm).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except UnicodeDecodeError as exc:
        raise FileFormatError(path, f"not a text file: {exc}") from None
    except json.JSONDecodeError as exc:
        raise FileFormatError(path, f"invalid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise FileFormatError(path, "top level must be a JSON object")
    for key in ("units", "cameras"):
        if key not in doc:
            raise FileFormatError(path, f"missing key {key!r}")
    if doc["units"] != CAMERAS_UNITS:
        raise FileFormatError(path, f"units are {doc['units']!r}, expected {CAMERAS_UNITS!r}")
    entries = doc["cameras"]
    if not isinstance(entries, dict):
        raise FileFormatError(path, "'cameras' must be an object of camera name -> camera")
    cameras = {name: _camera_from_dict(path, name, entry) for name, entry in entries.items()}
    return dict(sorted(cameras.items(), key=lambda item: _view_sort_key(item[0])))


def _view_sort_key(name: str) -> tuple[int, str]:
    match = re.fullmatch(r"cam(\d+)", name)
    return (int(match.group(1)) if match else _UNNUMBERED, name)


_UNNUMBERED = 10**9  # names that are not cam<i> sort after the numbered cameras


def _camera_from_dict(path: Path, name: str, entry) -> Camera:
    if not isinstance(entry, dict):
        raise FileFormatError(path, f"camera {name!r} must be an object")
    for key in ("K", "R", "t", "width", "height"):
        if key not in entry:
            raise FileFormatError(path, f"camera {name!r}: missing key {key!r}")
    K = _numeric_array(path, f"camera {name!r} K", entry["K"], (3, 3))
    R = _numeric_array(path, f"camera {name!r} R", entry["R"], (3, 3))
    t = _numeric_array(path, f"camera {name!r} t", entry["t"], (3,))
    distortion = _numeric_array(
        path, f"camera {name!r} distortion", entry.get("distortion", [0.0] * N_DISTORTION), (N_DISTORTION,)
    )
    size = {}
    for key in ("width", "height"):
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise FileFormatError(path, f"camera {name!r}: {key} must be a positive integer, got {value!r}")
        size[key] = value
    return Camera(K=K, R=R, t=t, distortion=distortion, **size)


def _numeric_array(path: Path, what: str, value, shape: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise FileFormatError(path, f"{what} is not numeric: {value!r}") from None
    if arr.shape != shape:
        raise FileFormatError(path, f"{what} has shape {arr.shape}, expected {shape}")
    if not np.all(np.isfinite(arr)):
        raise FileFormatError(path, f"{what} has non-finite values")
    return arr


def write_cameras(path: str | Path, cameras: Mapping[str, Camera]) -> None:
    """Write cameras.json atomically (units mm, the OpenCV world-to-camera convention)."""
    doc = {
        "units": CAMERAS_UNITS,
        "convention": CAMERAS_CONVENTION,
        "cameras": {name: cam.to_dict() for name, cam in cameras.items()},
    }
    with atomic_open(path) as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")


# --- landmarks ---------------------------------------------------------------------------------


def read_landmarks7(path: str | Path) -> np.ndarray:
    """Read landmarks7.txt: (7, 3) scan-space landmarks in mm, iBUG order 36,39,42,45,33,48,54."""
    rows = _read_number_rows(path, widths=(3,))
    if len(rows) != N_LANDMARKS7:
        raise FileFormatError(path, f"{len(rows)} landmarks, expected {N_LANDMARKS7}")
    arr = np.array(rows, dtype=np.float64)
    _require_finite(path, arr)
    return arr


def write_landmarks7(path: str | Path, landmarks_mm: np.ndarray) -> None:
    """Write (7, 3) scan-space landmarks in mm as landmarks7.txt, atomically."""
    arr = np.asarray(landmarks_mm, dtype=np.float64)
    if arr.shape != (N_LANDMARKS7, 3):
        raise InputError(f"landmarks7 must have shape ({N_LANDMARKS7}, 3), got {arr.shape}")
    _write_rows(path, arr, ("{:.6f}", "{:.6f}", "{:.6f}"))


def read_landmarks68(path: str | Path) -> np.ndarray:
    """Read landmarks68/cam<i>.txt: (68, 3) rows of x, y (pixels, OpenCV) and visible (0 or 1).

    Lines with only x y are read as visible. Coordinates of invisible points may be NaN.
    """
    rows = _read_number_rows(path, widths=(2, 3))
    if len(rows) != N_LANDMARKS:
        raise FileFormatError(path, f"{len(rows)} landmarks, expected {N_LANDMARKS}")
    arr = np.array([row if len(row) == 3 else [*row, 1.0] for row in rows], dtype=np.float64)
    visible = arr[:, 2]
    bad_flag = ~np.isin(visible, (0.0, 1.0))
    if bad_flag.any():
        line = int(np.flatnonzero(bad_flag)[0]) + 1
        raise FileFormatError(path, f"line {line}: visible must be 0 or 1, got {visible[line - 1]:g}")
    _require_finite(path, arr[visible == 1.0])
    return arr


def write_landmarks68(path: str | Path, landmarks: np.ndarray) -> None:
    """Write (68, 3) image landmarks (x, y pixels, visible 0/1) or (68, 2) (all visible), atomically."""
    arr = np.asarray(landmarks, dtype=np.float64)
    if arr.ndim == 2 and arr.shape == (N_LANDMARKS, 2):
        arr = np.concatenate([arr, np.ones((N_LANDMARKS, 1))], axis=1)
    if arr.shape != (N_LANDMARKS, 3):
        raise InputError(f"landmarks68 must have shape ({N_LANDMARKS}, 3) or ({N_LANDMARKS}, 2), got {arr.shape}")
    if not np.isin(arr[:, 2], (0.0, 1.0)).all():
        raise InputError("landmarks68 visibility must be 0 or 1")
    _write_rows(path, arr, ("{:.3f}", "{:.3f}", "{:.0f}"))


def _read_number_rows(path: str | Path, widths: tuple[int, ...]) -> list[list[float]]:
    """Non-empty lines of a whitespace-separated number file; every line has one of ``widths``."""
    path = Path(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise FileFormatError(path, "not a text file") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) not in widths:
            expected = " or ".join(str(w) for w in widths)
            raise FileFormatError(path, f"line {number}: {len(tokens)} values, expected {expected}")
        try:
            rows.append([float(tok) for tok in tokens])
        except ValueError:
            bad = next(tok for tok in tokens if not _is_float(tok))
            raise FileFormatError(path, f"line {number}: non-numeric value {bad!r}") from None
    return rows


def _is_float(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _require_finite(path: str | Path, arr: np.ndarray) -> None:
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise FileFormatError(path, f"{int(bad.sum())} landmarks have non-finite values, first on line "
                                    f"{int(np.flatnonzero(bad)[0]) + 1}")


def _write_rows(path: str | Path, arr: np.ndarray, formats: tuple[str, ...]) -> None:
    with atomic_open(path) as fh:
        for row in arr:
            fh.write(" ".join(fmt.format(value) for fmt, value in zip(formats, row)) + "\n")


# --- subjects.csv ------------------------------------------------------------------------------


def read_subjects(path: str | Path, *, check: bool = True) -> pd.DataFrame:
    """Read subjects.csv as a table with columns subject_id, gender, age, ethnicity.

    With ``check`` (the default) every value is checked (`subjects_problems`) and ``age`` is an
    integer column; any problem raises `FileFormatError` listing them. With ``check=False`` the
    table is returned as strings, as long as it parses and has the required columns, so a
    validator can report each problem itself.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise FileFormatError(path, f"cannot parse CSV: {exc}") from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in SUBJECT_COLUMNS if c not in table.columns]
    if missing:
        raise FileFormatError(path, f"missing column(s) {', '.join(missing)} (expected {', '.join(SUBJECT_COLUMNS)})")
    table = table.apply(lambda col: col.str.strip())
    if not check:
        return table
    problems = subjects_problems(table)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise FileFormatError(path, shown)
    table = table.copy()
    table["age"] = table["age"].astype(np.int64)
    return table


def subjects_problems(table: pd.DataFrame) -> list[str]:
    """Every problem of a subjects table read with ``check=False``: missing columns, empty or
    invalid values, duplicate subject ids. One message per problem, naming the row."""
    missing = [c for c in SUBJECT_COLUMNS if c not in table.columns]
    if missing:
        return [f"missing column(s) {', '.join(missing)}"]
    problems = []
    for i, row in enumerate(table.itertuples(index=False), start=2):  # line 1 is the header
        where = f"line {i} ({row.subject_id or 'no subject_id'})"
        problems += [f"{where}: {p}" for p in _row_problems(row)]
    ids = table["subject_id"][table["subject_id"] != ""]
    for sid in sorted(ids[ids.duplicated()].unique()):
        problems.append(f"subject_id {sid} appears {int((ids == sid).sum())} times")
    return problems


def _row_problems(row) -> list[str]:
    problems = []
    if not SUBJECT_ID_PATTERN.match(str(row.subject_id)):
        problems.append(f"subject_id {row.subject_id!r} is not like S001")
    if row.gender not in GENDERS:
        problems.append(f"gender {row.gender!r} is not one of {', '.join(GENDERS)}")
    if row.ethnicity not in ETHNICITIES:
        problems.append(f"ethnicity {row.ethnicity!r} is not one of {', '.join(ETHNICITIES)}")
    if not re.fullmatch(r"\d+", str(row.age)) or not 0 < int(row.age) <= MAX_AGE_YEARS:
        problems.append(f"age {row.age!r} is not a whole number of years in 1..{MAX_AGE_YEARS}")
    return problems


def write_subjects(path: str | Path, subjects: pd.DataFrame | Iterable[Mapping]) -> None:
    """Write subjects.csv atomically; rows are checked first (`InputError` on any problem)."""
    table = pd.DataFrame(list(subjects) if not isinstance(subjects, pd.DataFrame) else subjects)
    missing = [c for c in SUBJECT_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"subjects table lacks column(s) {', '.join(missing)}")
    table = table[list(SUBJECT_COLUMNS)].astype(str)
    problems = subjects_problems(table)
    if problems:
        raise InputError(f"invalid subjects table: {'; '.join(problems[:5])}")
    with atomic_open(path, newline="") as fh:
        table.to_csv(fh, index=False)


# --- captures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CapturePaths:
    """Where each file of one capture is (or should be). ``images[i]`` is the existing file of
    view i (.jpg before .png) or the expected .jpg path when there is none."""

    directory: Path
    images: tuple[Path, ...]
    cameras: Path
    scan: Path
    landmarks7: Path
    landmarks68: tuple[Path, ...]


def capture_paths(directory: str | Path) -> CapturePaths:
    """The layout's file paths for the capture in ``directory`` (<root>/<subject>/<expression>)."""
    directory = Path(directory)
    return CapturePaths(
        directory=directory,
        images=tuple(find_image(directory / IMAGES_DIR, name) or directory / IMAGES_DIR / f"{name}.jpg"
                     for name in CAMERA_NAMES),
        cameras=directory / CAMERAS_JSON,
        scan=directory / SCAN_PLY,
        landmarks7=directory / LANDMARKS7_TXT,
        landmarks68=tuple(directory / LANDMARKS68_DIR / f"{name}.txt" for name in CAMERA_NAMES),
    )


def find_image(images_dir: Path, name: str) -> Path | None:
    """The image file of camera ``name`` in ``images_dir`` (.jpg first, then .png), or None."""
    for suffix in IMAGE_SUFFIXES:
        candidate = images_dir / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class CaptureRef:
    """One capture (a subject in one expression) of a dataset rooted at ``root``."""

    root: Path
    subject: str
    expression: str

    @property
    def directory(self) -> Path:
        return self.root / self.subject / self.expression

    @property
    def paths(self) -> CapturePaths:
        return capture_paths(self.directory)

    def load(self) -> Capture:
        """Read the capture's cameras (the files the loader always needs)."""
        return load_capture(self)


@dataclass
class Capture:
    """A capture with its cameras read: ``cameras`` maps camera name -> `Camera` (world = mm)."""

    root: Path
    subject: str
    expression: str
    paths: CapturePaths
    cameras: dict[str, Camera]

    def landmarks7(self) -> np.ndarray:
        """(7, 3) scan-space landmarks in mm."""
        return read_landmarks7(self.paths.landmarks7)

    def landmarks68(self, view: int) -> np.ndarray | None:
        """(68, 3) image landmarks of view ``view`` (x, y, visible), or None when there is no file."""
        path = self.paths.landmarks68[view]
        return read_landmarks68(path) if path.is_file() else None

    def load_scan(self):
        """The raw scan as a `facehd.io.Mesh` in millimetres."""
        from facehd.io import load_mesh

        return load_mesh(self.paths.scan)


def load_capture(ref: CaptureRef) -> Capture:
    """Read one capture's cameras.json; raises `FileFormatError` if it is missing or malformed."""
    paths = ref.paths
    if not paths.cameras.is_file():
        raise FileFormatError(paths.cameras, "missing (every capture needs its cameras.json)")
    return Capture(ref.root, ref.subject, ref.expression, paths, read_cameras(paths.cameras))


def find_captures(root: str | Path) -> list[CaptureRef]:
    """Every <root>/<subject>/<expression> folder, sorted by subject then expression.

    Hidden folders (names starting with '.') and side-product folders (names starting with '_',
    e.g. `_truth`) are skipped. Subject folders without expression folders give no capture (the
    validator reports them).
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory")
    return [
        CaptureRef(root, subject.name, expression.name)
        for subject in subject_dirs(root)
        for expression in _visible_dirs(subject)
    ]


def subject_dirs(root: str | Path) -> list[Path]:
    """The subject folders of a dataset root, sorted by name."""
    return _visible_dirs(Path(root))


def _visible_dirs(path: Path) -> list[Path]:
    # '_' folders hold side products beside the data (e.g. the synthetic generator's `_truth/`), not subjects.
    return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))),
                  key=lambda p: p.name)
