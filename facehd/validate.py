"""Validation of a FaceHD-100-style dataset: every check on every capture, all problems reported
together, each naming the file it is about."""

from __future__ import annotations

import contextlib
import errno
import html
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facehd.capture import (
    CAMERA_NAMES,
    CAMERAS_JSON,
    IMAGE_SUFFIXES,
    IMAGES_DIR,
    LANDMARKS7_TXT,
    LANDMARKS68_DIR,
    SCAN_PLY,
    SUBJECTS_CSV,
    Camera,
    CapturePaths,
    CaptureRef,
    find_captures,
    read_cameras,
    read_landmarks7,
    read_landmarks68,
    read_subjects,
    subject_dirs,
    subjects_problems,
)
from facehd.conventions import LANDMARKS7_IBUG, MM_PER_MODEL_UNIT
from facehd.errors import FaceHDError, FileFormatError, InputError
from facehd.fsutil import atomic_open

ERROR = "error"
WARNING = "warning"

# What each check looks at; the keys are the `Problem.check` values.
CHECKS = {
    "layout": "required files and folders are present",
    "subjects_csv": "subjects.csv parses, has the required columns, valid values, no duplicate ids",
    "subjects_match": "subject folders and subjects.csv rows match one to one",
    "cameras_file": "cameras.json parses and lists every view with K, R, t, width, height",
    "rotation": "R is orthonormal with determinant +1",
    "intrinsics": "K has positive focal lengths and the principal point inside the image",
    "image_missing": "all 9 views have an image",
    "image_decodable": "every image decodes completely (no truncation)",
    "image_size": "image sizes match the calibration",
    "scan_readable": "scan.ply is a readable mesh",
    "scan_finite": "scan coordinates are finite",
    "scan_degenerate": "the scan has enough vertices, a non-zero extent and faces with area",
    "scan_units": "the scan's size is plausible for millimetres",
    "landmarks7": "landmarks7.txt has 7 rows of x y z",
    "landmarks7_units": "the 7 landmarks span a face's size in millimetres",
    "landmarks7_in_scan": "the 7 landmarks lie within the scan's bounds",
    "landmarks7_mirrored": "the 7 landmarks are a face, not its mirror image (left and right not swapped)",
    "landmarks7_projection": "the 7 landmarks project in front of every camera and inside its image",
    "landmarks68": "68-point files have 68 rows, visible points inside the image",
    "landmarks68_reprojection": "the 7 scan landmarks reproject near the same points of the 68-point files",
}

ROTATION_TOLERANCE = 1e-4  # max |R R^T - I| and |det R - 1|
MIN_SCAN_VERTICES = 100
# A face scan's bounding-box diagonal is about 150-400 mm; the accepted range has a margin, and
# the factors are small enough apart that at most one suspected unit matches.
SCAN_DIAGONAL_RANGE_MM = (100.0, 600.0)
SUSPECTED_UNITS = (("metres", 1000.0), ("model units (1 unit = 100 mm)", MM_PER_MODEL_UNIT), ("centimetres", 10.0))
ZERO_AREA_MM2 = 1e-10
ZERO_AREA_WARNING_FRACTION = 0.05
LANDMARK_SCAN_MARGIN_MM = 10.0
# RMS distance of the 7 landmarks from their centre: about 40-50 mm for adults (the outer eye
# corners are ~90 mm apart). The range is under 10x wide, so at most one power of ten explains
# a file in another unit.
LANDMARKS7_RADIUS_RANGE_MM = (20.0, 100.0)
LANDMARK_SUSPECTED_SCALES = (*SUSPECTED_UNITS, ("tenths of a millimetre", 0.1), ("micrometres", 0.001))
# Mirrored landmarks: each estimate of where the face looks must be this clear (cosine between the
# face normal the eye and mouth corners give and the estimate; the subnasale's lead in mm).
FACING_MIN_COSINE = 0.25
SUBNASALE_MIN_LEAD_MM = 3.0
LANDMARK68_TOLERANCE = 0.05  # reprojection tolerance as a fraction of the image's larger side

Progress = Callable[..., Iterable]  # called as progress(iterable, total=n, desc=text), e.g. tqdm


@dataclass(frozen=True)
class Problem:
    """One problem found: the file it is about, the check (a key of `CHECKS`), what is wrong."""

    path: Path
    check: str
    message: str
    severity: str = ERROR

    def line(self, root: Path | None = None) -> str:
        """``ERROR S001/neutral/scan.ply [scan_units]: message``, the path relative to ``root``."""
        return f"{self.severity.upper()} {_relative(self.path, root)} [{self.check}]: {self.message}"


@dataclass
class ValidationReport:
    """Everything `validate_dataset` found. A capture passes when no error (with ``strict``, no
    problem at all) is about its files."""

    root: Path
    problems: list[Problem] = field(default_factory=list)
    captures_checked: int = 0
    captures_passed: int = 0
    strict: bool = False  # warnings fail too

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def ok(self) -> bool:
        """True when there is no error, and with ``strict`` no warning either."""
        return not any(self.fails(p) for p in self.problems)

    def fails(self, problem: Problem) -> bool:
        """Whether ``problem`` fails the validation: an error, or with ``strict`` any problem."""
        return problem.severity == ERROR or self.strict

    def summary(self) -> str:
        verdict = "PASSED" if self.ok else "FAILED"
        strict = " (strict: warnings fail)" if self.strict else ""
        return (
            f"{verdict}{strict}: {self.root}: {self.captures_checked} captures checked, {self.captures_passed} "
            f"passed; {len(self.errors)} errors, {len(self.warnings)} warnings"
        )

    def lines(self) -> list[str]:
        """One line per problem, naming the file relative to the root."""
        return [p.line(self.root) for p in self.problems]

    def counts_by_check(self) -> dict[str, int]:
        return dict(sorted(Counter(p.check for p in self.problems).items()))

    def to_markdown(self) -> str:
        out = [f"# Validation report: {self.root}", "", self.summary(), ""]
        if self.problems:
            out += ["| check | problems | what it checks |", "| --- | ---: | --- |"]
            out += [f"| {c} | {n} | {CHECKS.get(c, '')} |" for c, n in self.counts_by_check().items()]
            out += ["", "| severity | file | check | problem |", "| --- | --- | --- | --- |"]
            out += [
                f"| {p.severity} | `{_relative(p.path, self.root)}` | {p.check} | {_md_cell(p.message)} |"
                for p in self.problems
            ]
        else:
            out.append("No problems found.")
        return "\n".join(out) + "\n"

    def to_html(self) -> str:
        esc = html.escape
        rows = "\n".join(
            f"<tr class='{p.severity}'><td>{p.severity}</td><td><code>{esc(str(_relative(p.path, self.root)))}"
            f"</code></td><td>{esc(p.check)}</td><td>{esc(p.message)}</td></tr>"
            for p in self.problems
        )
        counts = "\n".join(
            f"<tr><td>{esc(c)}</td><td>{n}</td><td>{esc(CHECKS.get(c, ''))}</td></tr>"
            for c, n in self.counts_by_check().items()
        )
        body = (
            "<p>No problems found.</p>" if not self.problems else
            f"<table><tr><th>check</th><th>problems</th><th>what it checks</th></tr>\n{counts}</table>\n"
            f"<table><tr><th>severity</th><th>file</th><th>check</th><th>problem</th></tr>\n{rows}</table>"
        )
        return (
            "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
            f"<title>Validation report: {esc(str(self.root))}</title>"
            "<style>body{font-family:sans-serif} table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left} tr.error td:first-child{color:#b00}"
            "tr.warning td:first-child{color:#a60}</style></head><body>\n"
            f"<h1>Validation report: {esc(str(self.root))}</h1>\n<p>{esc(self.summary())}</p>\n{body}\n</body></html>\n"
        )

    def write(self, path: str | Path) -> Path:
        """Write the report as Markdown (.md) or HTML (.html), atomically."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in REPORT_SUFFIXES:
            raise InputError(f"{path}: report must end in one of {', '.join(REPORT_SUFFIXES)}")
        text = self.to_html() if suffix in (".html", ".htm") else self.to_markdown()
        with atomic_open(path) as fh:
            fh.write(text)
        return path


REPORT_SUFFIXES = (".md", ".markdown", ".html", ".htm")


def _relative(path: Path, root: Path | None) -> Path:
    if root is not None:
        with contextlib.suppress(ValueError):
            return Path(path).relative_to(root)
    return Path(path)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --- the dataset -------------------------------------------------------------------------------


def validate_dataset(root: str | Path, *, strict: bool = False, progress: Progress | None = None) -> ValidationReport:
    """Check every capture of the dataset at ``root`` and subjects.csv; never stop at a problem.

    Raises `InputError` when ``root`` is not a dataset root at all (`check_dataset_root`). With
    ``strict`` warnings fail too. ``progress``, if given, wraps the capture iterable (called as
    ``progress(refs, total=n, desc=...)``, e.g. ``tqdm``).
    """
    root = Path(root)
    check_dataset_root(root)
    refs = find_captures(root)
    report = ValidationReport(root=root, strict=strict)
    report.problems += check_subjects(root)
    if not refs:
        report.problems.append(Problem(root, "layout", "no captures found (expected <subject>/<expression>/ folders)"))
    failed_dirs = {p.path for p in report.problems if report.fails(p) and p.path.is_dir()}
    items = progress(refs, total=len(refs), desc="validate") if progress is not None else refs
    for ref in items:
        problems = check_capture(ref)
        report.problems += problems
        report.captures_checked += 1
        failed = any(report.fails(p) for p in problems) or ref.root / ref.subject in failed_dirs
        report.captures_passed += not failed
    return report


def check_dataset_root(root: str | Path) -> None:
    """Raise `InputError` when ``root`` is not a dataset root: missing, not a folder, empty, or a
    subject or capture folder given by mistake (the message names the folder to give instead)."""
    root = Path(root)
    if not root.is_dir():
        problem = "not a folder" if root.exists() else absent_reason(root, "the folder")
        raise InputError(f"{root}: {'no such folder' if problem.startswith('missing') else problem}")
    if (root / SUBJECTS_CSV).exists():
        return
    if _looks_like_capture(root):
        raise InputError(f"{root}: a capture folder (<subject>/<expression>), not a dataset root; give the dataset "
                         f"root, {root.absolute().parent.parent}")
    folders = subject_dirs(root)
    if any(_looks_like_capture(d) for d in folders):
        raise InputError(f"{root}: a subject folder, not a dataset root (no {SUBJECTS_CSV}, and its folders are "
                         f"captures); give its parent, {root.absolute().parent}")
    if not folders:
        raise InputError(f"{root}: no dataset here (no {SUBJECTS_CSV} and no <subject>/<expression>/ folders)")


def _looks_like_capture(folder: Path) -> bool:
    return any((folder / name).exists() for name in (CAMERAS_JSON, SCAN_PLY, LANDMARKS7_TXT, IMAGES_DIR))


def absent_reason(path: str | Path, what: str) -> str:
    """Why ``path`` is not there to read, for a message about ``what``: 'missing scan.ply', 'scan.ply
    is a symlink loop', 'scan.ply is a broken symlink (to x.ply)' or 'scan.ply is not a file'."""
    path = Path(path)
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{what} is a symlink loop"
        if os.path.islink(path):
            return f"{what} is a broken symlink (to {os.readlink(path)})"
        return f"missing {what}"
    return f"{what} is not a file" if not path.is_file() else f"{what} is there"


def check_subjects(root: str | Path) -> list[Problem]:
    """subjects.csv on its own (columns, values, duplicates) and against the subject folders."""
    root = Path(root)
    csv_path = root / SUBJECTS_CSV
    folders = {d.name: d for d in subject_dirs(root)}
    problems = [Problem(d, "layout", "subject folder has no expression folders")
                for d in folders.values() if not any(c.is_dir() and not c.name.startswith(".") for c in d.iterdir())]
    if not csv_path.is_file():
        return problems + [Problem(csv_path, "layout", absent_reason(csv_path, SUBJECTS_CSV))]
    try:
        table = read_subjects(csv_path, check=False)
    except FileFormatError as exc:
        return problems + [Problem(csv_path, "subjects_csv", exc.problem)]
    problems += [Problem(csv_path, "subjects_csv", message) for message in subjects_problems(table)]
    listed = set(table["subject_id"])
    problems += [
        Problem(folder, "subjects_match", f"subject folder {sid} has no row in {SUBJECTS_CSV}")
        for sid, folder in folders.items() if sid not in listed
    ]
    problems += [
        Problem(csv_path, "subjects_match", f"row {sid} has no subject folder {sid}/")
        for sid in sorted(listed - set(folders)) if sid
    ]
    return problems


# --- one capture -------------------------------------------------------------------------------


def check_capture(ref: CaptureRef) -> list[Problem]:
    """Every check of one capture; the problems found, in a fixed order."""
    paths = ref.paths
    problems: list[Problem] = []
    cameras, sane = _check_cameras(paths, problems)
    _check_images(paths, cameras, problems)
    scan = _check_scan(paths, problems)
    sane_cameras = {n: cameras[n] for n in sane}
    landmarks7 = _check_landmarks7(paths, scan, sane_cameras, problems)
    if landmarks7 is not None:
        _check_projection(paths, landmarks7, sane_cameras, problems)
    _check_landmarks68(paths, cameras, sane, landmarks7, problems)
    return problems


def _check_cameras(paths: CapturePaths, problems: list[Problem]) -> tuple[dict[str, Camera], list[str]]:
    """Read cameras.json; returns all cameras and the names of those whose R and K are sane."""
    if not paths.cameras.is_file():
        problems.append(Problem(paths.cameras, "layout", absent_reason(paths.cameras, CAMERAS_JSON)))
        return {}, []
    try:
        cameras = read_cameras(paths.cameras)
    except FileFormatError as exc:
        problems.append(Problem(paths.cameras, "cameras_file", exc.problem))
        return {}, []
    missing = [n for n in CAMERA_NAMES if n not in cameras]
    if missing:
        problems.append(Problem(paths.cameras, "cameras_file", f"no calibration for {', '.join(missing)}"))
    extra = [n for n in cameras if n not in CAMERA_NAMES]
    if extra:
        problems.append(Problem(paths.cameras, "cameras_file", f"unexpected cameras {', '.join(extra)}", WARNING))
    sane = []
    for name, camera in cameras.items():
        found = [Problem(paths.cameras, check, f"{name}: {message}")
                 for check, message in _rotation_problems(camera.R) + _intrinsics_problems(camera)]
        problems += found
        if not found:
            sane.append(name)
    return cameras, sane


def _rotation_problems(R: np.ndarray) -> list[tuple[str, str]]:
    off = float(np.abs(R @ R.T - np.eye(3)).max())
    det = float(np.linalg.det(R))
    if off > ROTATION_TOLERANCE:
        return [("rotation", f"R is not orthonormal (max |R R^T - I| = {off:.3g} > {ROTATION_TOLERANCE:g})")]
    if abs(det - 1.0) > ROTATION_TOLERANCE:
        return [("rotation", f"R has determinant {det:+.4f}, expected +1 (a reflection)")]
    return []


def _intrinsics_problems(camera: Camera) -> list[tuple[str, str]]:
    K = camera.K
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    problems = []
    if fx <= 0 or fy <= 0:
        problems.append(("intrinsics", f"focal lengths must be positive, got fx={fx:g}, fy={fy:g} px"))
    if not (-0.5 <= cx <= camera.width - 0.5 and -0.5 <= cy <= camera.height - 0.5):
        problems.append(("intrinsics", f"principal point ({cx:g}, {cy:g}) is outside the "
                                       f"{camera.width}x{camera.height} image"))
    if not np.allclose(K[2], (0.0, 0.0, 1.0)) or K[1, 0] != 0.0:
        problems.append(("intrinsics", f"K is not upper triangular with last row 0 0 1: {K.tolist()}"))
    return problems


@contextlib.contextmanager
def _strict_image_loading() -> Iterator[None]:
    """Make Pillow raise on truncated images for the duration, restoring the caller's setting."""
    from PIL import ImageFile

    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def image_size(path: Path) -> tuple[int, int]:
    """Decode the whole image (so truncation is detected); its (width, height) in pixels."""
    from PIL import Image

    with _strict_image_loading(), Image.open(path) as img:
        img.load()
        return img.size


def _check_images(paths: CapturePaths, cameras: dict[str, Camera], problems: list[Problem]) -> None:
    for name, path in zip(CAMERA_NAMES, paths.images):
        if not path.is_file():
            there = [p for p in (path.with_suffix(s) for s in IMAGE_SUFFIXES) if os.path.lexists(p)]
            if there:  # a link to nothing, a loop or a folder: say which rather than "missing"
                problems.append(Problem(there[0], "image_missing", f"view {name}: "
                                        f"{absent_reason(there[0], f'{IMAGES_DIR}/{there[0].name}')}"))
                continue
            options = " or ".join(f"{name}{s}" for s in IMAGE_SUFFIXES)
            reason = absent_reason(path, f"{IMAGES_DIR}/")  # the images folder itself may be a loop
            detail = f"; {reason}" if "symlink" in reason else ""
            problems.append(Problem(path, "image_missing", f"missing view {name} (no images/{options}{detail})"))
            continue
        others = [path.with_suffix(s) for s in IMAGE_SUFFIXES if s != path.suffix]
        for other in (o for o in others if o.is_file()):
            problems.append(Problem(other, "image_missing", f"{name} has two images; {path.name} is used", WARNING))
        try:
            size = image_size(path)
        except Exception as exc:  # Pillow raises many types for broken files (OSError, SyntaxError, ...)
            problems.append(Problem(path, "image_decodable", f"cannot decode {name} (truncated or corrupt): {exc}"))
            continue
        camera = cameras.get(name)
        if camera is not None and size != (camera.width, camera.height):
            problems.append(Problem(path, "image_size", f"image is {size[0]}x{size[1]} px but cameras.json says "
                                                         f"{camera.width}x{camera.height} for {name}"))


@dataclass(frozen=True, eq=False)
class ScanExtent:
    """Where a scan is, in its file's units: bounding box and the median of its vertices."""

    lo: np.ndarray  # (3,)
    hi: np.ndarray  # (3,)
    median: np.ndarray  # (3,) behind the face surface: a face scan curves around the head
    in_mm: bool  # its size is plausible for millimetres (`scan_units` found nothing)


def _check_scan(paths: CapturePaths, problems: list[Problem]) -> ScanExtent | None:
    """Load and check the scan; returns where it is, or None when it cannot be read."""
    from facehd.io import load_mesh

    path = paths.scan
    if not path.is_file():
        problems.append(Problem(path, "layout", absent_reason(path, SCAN_PLY)))
        return None
    try:
        mesh = load_mesh(path)
    except FaceHDError as exc:
        message = getattr(exc, "problem", str(exc))
        # The mesh reader refuses non-finite coordinates and says how many: keep that as its own check.
        check = "scan_finite" if "non-finite" in message else "scan_readable"
        problems.append(Problem(path, check, f"cannot load scan: {message}"))
        return None
    except Exception as exc:  # a validator reports an unreadable file and goes on
        problems.append(Problem(path, "scan_readable", f"cannot load scan: {type(exc).__name__}: {exc}"))
        return None
    return _check_scan_geometry(path, mesh.vertices, mesh.faces, problems)


def _check_scan_geometry(path: Path, vertices: np.ndarray, faces: np.ndarray, problems: list[Problem]):
    finite = np.isfinite(vertices).all(axis=1)
    if not finite.all():
        problems.append(Problem(path, "scan_finite", f"{int((~finite).sum())} of {len(vertices)} vertices "
                                                     "have NaN or infinite coordinates"))
        vertices = vertices[finite]
    if len(vertices) < MIN_SCAN_VERTICES:
        problems.append(Problem(path, "scan_degenerate", f"only {len(vertices)} vertices "
                                                         f"(a face scan has at least {MIN_SCAN_VERTICES})"))
        if len(vertices) == 0:
            return None
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    extent = hi - lo
    if (extent <= 0).any():
        problems.append(Problem(path, "scan_degenerate", f"zero extent along {'xyz'[int(np.argmin(extent))]} "
                                                         f"(bounding box {_fmt3(extent)})"))
    _check_faces(path, vertices if finite.all() else None, faces, problems)
    found = len(problems)
    _check_units(path, float(np.linalg.norm(extent)), problems)
    return ScanExtent(lo, hi, np.median(vertices, axis=0), in_mm=len(problems) == found)


def _check_faces(path: Path, vertices: np.ndarray | None, faces: np.ndarray, problems: list[Problem]) -> None:
    if len(faces) == 0:
        problems.append(Problem(path, "scan_degenerate", "no faces (a point cloud, not a mesh)"))
        return
    if vertices is None:  # indices no longer match once non-finite vertices are dropped
        return
    v0, v1, v2 = (vertices[faces[:, k]] for k in range(3))
    area = 0.5 * np.linalg.norm(np.cross(v1 - v0, v2 - v0), axis=1)
    zero = area <= ZERO_AREA_MM2
    if zero.all():
        problems.append(Problem(path, "scan_degenerate", f"all {len(faces)} faces have zero area"))
    elif zero.mean() > ZERO_AREA_WARNING_FRACTION:
        problems.append(Problem(path, "scan_degenerate", f"{int(zero.sum())} of {len(faces)} faces have zero area",
                                WARNING))


def _check_units(path: Path, diagonal: float, problems: list[Problem]) -> None:
    lo, hi = SCAN_DIAGONAL_RANGE_MM
    if lo <= diagonal <= hi:
        return
    expected = f"a face scan's bounding-box diagonal is {lo:g}-{hi:g} mm"
    for unit, mm_per_unit in SUSPECTED_UNITS:
        if lo <= diagonal * mm_per_unit <= hi:
            problems.append(Problem(path, "scan_units", f"bounding-box diagonal is {diagonal:.4g} but {expected}: "
                                                        f"the scan looks like it is in {unit} "
                                                        f"(x{mm_per_unit:g} gives {diagonal * mm_per_unit:.0f} mm)"))
            return
    problems.append(Problem(path, "scan_units", f"bounding-box diagonal is {diagonal:.4g} but {expected}; "
                                                "no common unit explains it"))


def _check_landmarks7(paths: CapturePaths, scan: ScanExtent | None, cameras: dict[str, Camera],
                      problems: list[Problem]) -> np.ndarray | None:
    """Read and check landmarks7.txt; returns the landmarks, or None when the checks that use them
    (projection, reprojection) would only repeat this file's problem."""
    path = paths.landmarks7
    if not path.is_file():
        problems.append(Problem(path, "layout", absent_reason(path, LANDMARKS7_TXT)))
        return None
    try:
        landmarks = read_landmarks7(path)
    except FileFormatError as exc:
        problems.append(Problem(path, "landmarks7", exc.problem))
        return None
    units = _landmark_units_problem(landmarks)
    if units is not None:  # wrong units put the landmarks everywhere: blame this file once
        problems.append(Problem(path, "landmarks7_units", units))
        return None
    if scan is not None:
        margin = LANDMARK_SCAN_MARGIN_MM
        outside = ((landmarks < scan.lo - margin) | (landmarks > scan.hi + margin)).any(axis=1)
        if outside.any():
            problems.append(Problem(path, "landmarks7_in_scan", f"{_which(outside)} outside the scan's bounding box "
                                                                f"(with a {margin:g} mm margin)"))
    mirrored = _mirrored_problem(landmarks, scan.median if scan is not None and scan.in_mm else None,
                                 [camera.center_mm for camera in cameras.values()])
    if mirrored is not None:
        problems.append(Problem(path, "landmarks7_mirrored", mirrored))
    return landmarks


def _landmark_units_problem(landmarks: np.ndarray) -> str | None:
    """Why the landmarks cannot be a face in millimetres (their size), or None."""
    radius = float(np.sqrt(np.mean(np.sum((landmarks - landmarks.mean(axis=0)) ** 2, axis=1))))
    lo, hi = LANDMARKS7_RADIUS_RANGE_MM
    if lo <= radius <= hi:
        return None
    size = (f"the 7 landmarks lie {radius:.4g} units from their centre (RMS) but a face's lie {lo:g}-{hi:g} mm "
            "from theirs")
    for unit, mm_per_unit in LANDMARK_SUSPECTED_SCALES:
        if lo <= radius * mm_per_unit <= hi:
            return f"{size}: the file looks like it is in {unit} (x{mm_per_unit:g} gives {radius * mm_per_unit:.0f} mm)"
    return f"{size}; no common unit explains it"


def landmarks7_normal(landmarks: np.ndarray) -> np.ndarray | None:
    """(3,) unit vector out of the face that the 7 landmarks' handedness gives, or None.

    The subject's right-to-left direction (eye and mouth corners 42, 45, 54 minus 36, 39, 48)
    crossed with the mouth-to-eyes direction points forward, out of the face; for a mirrored set
    (left and right rows swapped, or the points reflected) it points back into the head.
    """
    right, left = landmarks[[0, 1, 5]].mean(axis=0), landmarks[[2, 3, 6]].mean(axis=0)
    eyes, mouth = landmarks[:4].mean(axis=0), landmarks[5:].mean(axis=0)
    normal = np.cross(left - right, eyes - mouth)
    length = float(np.linalg.norm(normal))
    return normal / length if length > 0 else None


def _mirrored_problem(landmarks: np.ndarray, scan_median: np.ndarray | None,
                      camera_centres: list[np.ndarray]) -> str | None:
    """The message when every clear sign says the landmarks are a mirror image, or None.

    The face normal from the landmarks' handedness (`landmarks7_normal`) is compared with where
    the face looks: away from the scan's median (the head is behind the face), towards the
    cameras, and towards the subnasale, which leads the eye and mouth corners by 10-20 mm.
    """
    normal = landmarks7_normal(landmarks)
    if normal is None:
        return None
    centre = landmarks.mean(axis=0)
    lead_mm = float((landmarks[4] - landmarks[[0, 1, 2, 3, 5, 6]].mean(axis=0)) @ normal)
    signs = []  # (what the face would look away from, says mirrored)
    if abs(lead_mm) >= SUBNASALE_MIN_LEAD_MM:
        signs.append((f"its subnasale (then {abs(lead_mm):.0f} mm behind the eye and mouth corners)", lead_mm < 0))
    directions = [("the scan's front", None if scan_median is None else centre - scan_median),
                  ("the cameras", np.mean(camera_centres, axis=0) - centre if camera_centres else None)]
    for what, direction in directions:
        length = 0.0 if direction is None else float(np.linalg.norm(direction))
        if length > 0:
            cosine = float(direction @ normal) / length
            if abs(cosine) >= FACING_MIN_COSINE:
                signs.append((what, cosine < 0))
    if not signs or not all(mirrored for _, mirrored in signs):
        return None
    names = [what for what, _ in signs]
    away = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return ("left and right look swapped: with iBUG 36, 39, 48 (rows 1, 2, 6) on the subject's right and 42, 45, 54 "
            f"(rows 3, 4, 7) on the left, the face looks away from {away}; a mirror image cannot be aligned "
            "(swap rows 1-4, 2-3 and 6-7, or check the scan is not mirrored)")


def _which(mask: np.ndarray) -> str:
    """'landmarks 2, 5 (iBUG 39, 48)' for a (7,) mask over the landmarks7 rows, 1-based."""
    rows = np.flatnonzero(mask)
    ibug = ", ".join(str(LANDMARKS7_IBUG[r]) for r in rows)
    return f"landmark{'s' if len(rows) > 1 else ''} {', '.join(str(r + 1) for r in rows)} (iBUG {ibug})"


def _check_projection(paths: CapturePaths, landmarks7: np.ndarray, cameras: dict[str, Camera],
                      problems: list[Problem]) -> None:
    for name, camera in cameras.items():
        pixels, depth = camera.project(landmarks7)
        behind = depth <= 0
        outside = ~behind & ~camera.inside_image(pixels)
        if behind.any():
            problems.append(Problem(paths.cameras, "landmarks7_projection",
                                    f"{name}: landmarks7.txt {_which(behind)} behind the camera"))
        if outside.any():
            problems.append(Problem(paths.cameras, "landmarks7_projection",
                                    f"{name}: landmarks7.txt {_which(outside)} project outside the "
                                    f"{camera.width}x{camera.height} image"))


def _check_landmarks68(paths: CapturePaths, cameras: dict[str, Camera], sane: list[str],
                       landmarks7: np.ndarray | None, problems: list[Problem]) -> None:
    folder = paths.directory / LANDMARKS68_DIR
    if not folder.is_dir():
        return  # the 68-point files are optional
    expected = set(paths.landmarks68)
    for stray in sorted(p for p in folder.iterdir() if p.is_file() and p not in expected):
        problems.append(Problem(stray, "landmarks68", "not a landmarks68/cam<i>.txt file of a view", WARNING))
    for name, path in zip(CAMERA_NAMES, paths.landmarks68):
        if not path.is_file():
            if os.path.lexists(path):  # optional, but a loop or a link to nothing is a mistake
                problems.append(Problem(path, "landmarks68", absent_reason(path, f"{LANDMARKS68_DIR}/{path.name}")))
            continue
        try:
            points = read_landmarks68(path)
        except FileFormatError as exc:
            problems.append(Problem(path, "landmarks68", exc.problem))
            continue
        camera = cameras.get(name)
        if camera is None:
            continue
        visible = points[:, 2] == 1.0
        outside = visible & ~camera.inside_image(points[:, :2])
        if outside.any():
            first = int(np.flatnonzero(outside)[0])
            problems.append(Problem(path, "landmarks68", f"{int(outside.sum())} visible landmarks outside {name}'s "
                                                         f"{camera.width}x{camera.height} image (first: index {first} "
                                                         f"at {_fmt2(points[first, :2])})"))
        if landmarks7 is not None and name in sane:
            _check_reprojection(path, name, camera, landmarks7, points, problems)


def _check_reprojection(path: Path, name: str, camera: Camera, landmarks7: np.ndarray, points: np.ndarray,
                        problems: list[Problem]) -> None:
    idx = np.array(LANDMARKS7_IBUG)
    pixels, depth = camera.project(landmarks7)
    usable = (points[idx, 2] == 1.0) & (depth > 0)
    if not usable.any():
        return
    dist = np.linalg.norm(pixels[usable] - points[idx[usable], :2], axis=1)
    tolerance = LANDMARK68_TOLERANCE * max(camera.width, camera.height)
    worst = int(np.argmax(dist))
    if dist[worst] > tolerance:
        problems.append(Problem(path, "landmarks68_reprojection",
                                f"landmarks7.txt reprojected into {name} lies {dist[worst]:.1f} px from this file's "
                                f"iBUG {idx[usable][worst]} (tolerance {tolerance:.1f} px = "
                                f"{LANDMARK68_TOLERANCE:.0%} of the image size; {int((dist > tolerance).sum())} "
                                f"of {int(usable.sum())} points off)"))


def _fmt2(p) -> str:
    return f"({p[0]:.1f}, {p[1]:.1f})"


def _fmt3(p) -> str:
    return "x".join(f"{v:.3g}" for v in p)
