"""Atomic file writes (outputs appear under their final name only once they are complete) and
temporary files and folders tagged with the process that made them, so that a later run can
remove what a killed one left behind."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

# This machine's name as it appears in the tags: letters, digits and '_' only, since '-' and '.'
# separate the parts of a temporary name.
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
# The random part of a name from tempfile (letters, digits, '_').
_RANDOM = r"[A-Za-z0-9_]+"
# A temporary output of `atomic_path`: .<stem>.<host>-<pid>.<random>.part<suffix>
_PART_FILE = re.compile(rf"\..+\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.{_RANDOM}\.part(\.[^.]*)?")


def owner_tag() -> str:
    """'<host>-<pid>': names this process in its temporary files and folders."""
    return f"{_HOST}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process id we wrote: leave it alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a number we cannot check): not ours to judge
    return True


def _stale(host: str, pid: str) -> bool:
    """Whether a tag names a process of this machine that has ended (another machine's processes,
    for example on a shared file system, cannot be checked and are left alone)."""
    return host == _HOST and not _pid_alive(int(pid))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    The temporary name keeps the final suffix so writers that dispatch on it still work, and names
    this process (`owner_tag`) so that `remove_stale_parts` can tell a killed writer's leftover
    from a running writer's file. On an exception (also KeyboardInterrupt) the temporary file is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.{owner_tag()}.", suffix=f".part{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; give the output the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs) -> Iterator:
    """Open a temporary file beside ``path`` for writing; rename it onto ``path`` on success."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


def remove_stale_parts(folder: str | Path) -> list[Path]:
    """Remove the temporary files of `atomic_path` in ``folder`` whose writer has ended without
    cleaning up (killed); returns them. Files of running processes, of other machines and every
    other file are left alone."""
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(folder):
            match = _PART_FILE.fullmatch(entry.name)
            if match and entry.is_file(follow_symlinks=False) and _stale(match["host"], match["pid"]):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def remove_stale_folders(parent: str | Path, prefix: str) -> list[Path]:
    """Remove the folders `owned_temporary_folder(prefix)` made in ``parent`` whose process has
    ended without cleaning up (killed); returns them. Only folders of this user and this machine
    with exactly that name form are considered."""
    pattern = re.compile(rf"{re.escape(prefix)}(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-{_RANDOM}")
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(parent):
            match = pattern.fullmatch(entry.name)
            if not (match and entry.is_dir(follow_symlinks=False)):
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.stat(follow_symlinks=False).st_uid == os.getuid() and _stale(match["host"], match["pid"]):
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def owned_temporary_folder(prefix: str) -> Iterator[Path]:
    """A temporary folder ``<tmp>/<prefix><host>-<pid>-<random>``, removed after the block; the
    leftovers of earlier processes that were killed before removing theirs are removed first."""
    parent = Path(tempfile.gettempdir())
    remove_stale_folders(parent, prefix)
    with tempfile.TemporaryDirectory(prefix=f"{prefix}{owner_tag()}-", dir=parent) as tmp:
        yield Path(tmp)
