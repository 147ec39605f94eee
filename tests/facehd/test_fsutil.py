import os
import subprocess
import sys
import tempfile

import pytest

from facehd import fsutil
from facehd.fsutil import atomic_path, owned_temporary_folder, owner_tag, remove_stale_folders, remove_stale_parts


@pytest.fixture(scope="module")
def dead_pid():
    """The id of a process that has ended (a pid reused within the test would only keep files)."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_atomic_path_names_its_process_and_leaves_nothing_on_error(tmp_path):
    with atomic_path(tmp_path / "cam0.npz") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".cam0.{owner_tag()}.") and tmp.suffix == ".npz"
        tmp.write_bytes(b"x")
    assert (tmp_path / "cam0.npz").read_bytes() == b"x"
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "cam1.npz") as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cam0.npz"]


def test_only_the_parts_of_ended_processes_on_this_machine_are_removed(tmp_path, dead_pid):
    host = owner_tag().rsplit("-", 1)[0]
    stale = [f".cam0.{host}-{dead_pid}.k2j_x9ab.part.npz", f".align.{host}-{dead_pid}.abc.part.json"]
    kept = [
        f".cam1.{owner_tag()}.k2j_x9ab.part.npz",  # this process: still writing
        f".cam2.otherhost-{dead_pid}.k2j_x9ab.part.npz",  # another machine's process cannot be checked
        ".align.x.part.json",  # no owner recorded
        "cam0.npz",
        f"notes.{host}-{dead_pid}.txt",
    ]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / f".cam3.{host}-{dead_pid}.dir.part.npz").mkdir()  # not a file we write
    kept.append(f".cam3.{host}-{dead_pid}.dir.part.npz")
    removed = remove_stale_parts(tmp_path)
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert remove_stale_parts(tmp_path / "missing") == []


def test_temporary_folders_of_killed_runs_are_removed_on_the_next_start(tmp_path, dead_pid, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    host = owner_tag().rsplit("-", 1)[0]
    stale = tmp_path / f"facehd-model-{host}-{dead_pid}-abc_123"
    alive = tmp_path / f"facehd-model-{owner_tag()}-abc_123"
    foreign = tmp_path / f"facehd-model-otherhost-{dead_pid}-abc_123"
    unowned = tmp_path / "facehd-model-abc_123"  # no owner recorded
    other = tmp_path / f"other-{host}-{dead_pid}-abc_123"
    for folder in (stale, alive, foreign, unowned, other):
        folder.mkdir()
        (folder / "BFM_model_front.mat").write_bytes(b"\0" * 10)
    (tmp_path / f"facehd-model-{host}-{dead_pid}-file").write_bytes(b"")  # a file, not a folder
    with owned_temporary_folder("facehd-model-") as folder:
        assert folder.is_dir() and folder.name.startswith(f"facehd-model-{owner_tag()}-")
        assert not stale.exists() and alive.is_dir() and foreign.is_dir() and unowned.is_dir() and other.is_dir()
        (folder / "model.mat").write_bytes(b"x")
    assert not folder.exists()
    assert (tmp_path / f"facehd-model-{host}-{dead_pid}-file").is_file()
    assert remove_stale_folders(tmp_path, "facehd-model-") == []


def test_the_host_in_a_tag_has_no_separators():
    assert "-" not in fsutil._HOST and "." not in fsutil._HOST and owner_tag() == f"{fsutil._HOST}-{os.getpid()}"
