import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))  # gt_factory.py lives beside the tests

from gt_factory import make_model, make_truth, write_capture  # noqa: E402

from facehd.align import AlignJob, ModelSource, align_dataset  # noqa: E402
from facehd.batch import (  # noqa: E402
    BatchReport,
    ItemResult,
    Shard,
    inputs_digest,
    limit_threads,
    resolve_shard,
    run_batch,
    run_item,
)
from facehd.capture import capture_paths  # noqa: E402
from facehd.cli import main  # noqa: E402
from facehd.dataset import read_align, read_gt_maps  # noqa: E402
from facehd.detail import GTJob, GTMapOptions, gt_maps_dataset  # noqa: E402
from facehd.errors import FileFormatError, InputError  # noqa: E402
from facehd.fsutil import owner_tag  # noqa: E402

CAPTURES = [("S001", "neutral"), ("S001", "smile"), ("S002", "neutral"), ("S003", "neutral")]


# --- shards, digests, items ----------------------------------------------------------------------


def test_shards_split_items_and_follow_torchrun():
    items = list(range(10))
    parts = [Shard(k, 3).select(items) for k in range(3)]
    assert sorted(sum(parts, [])) == items and parts[1] == [1, 4, 7]
    assert Shard.parse("2/4") == Shard(2, 4)
    assert resolve_shard(None, {}) == Shard(0, 1)
    assert resolve_shard(None, {"RANK": "3", "WORLD_SIZE": "8"}) == Shard(3, 8)
    assert resolve_shard("1/2", {"RANK": "3", "WORLD_SIZE": "8"}) == Shard(1, 2)  # the option wins
    for bad in ("4/4", "a/b", "1", "-1/2"):
        with pytest.raises(InputError, match="shard"):
            Shard.parse(bad)
    with pytest.raises(InputError, match="RANK"):
        resolve_shard(None, {"RANK": "x", "WORLD_SIZE": "2"})


def test_inputs_digest_follows_contents_and_parameters(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one")
    b.write_text("two")
    base = inputs_digest([a, b], {"k": 1})
    assert inputs_digest([a, b], {"k": 1}) == base
    assert inputs_digest([a, b], {"k": 2}) != base
    assert inputs_digest([b, a], {"k": 1}) != base
    a.write_text("One")
    assert inputs_digest([a, b], {"k": 1}) != base
    with pytest.raises(FileFormatError, match=r"c\.txt: missing"):
        inputs_digest([tmp_path / "c.txt"], {})


def test_run_item_turns_errors_into_failed_results():
    def broken():
        raise FileFormatError("x/scan.ply", "truncated")

    def buggy():
        return [][1]

    assert run_item("a", lambda: "done").status == "done"
    failed = run_item("b", broken)
    assert (failed.status, failed.message) == ("failed", "x/scan.ply: truncated")
    bug = run_item("c", buggy)
    assert bug.status == "failed" and bug.message.startswith("IndexError") and "test_batch.py" in bug.message
    report = BatchReport([run_item("a", lambda: "done"), failed, ItemResult("d", "skipped")])
    assert report.counts() == {"done": 1, "skipped": 1, "failed": 1}
    assert "FAILED b: x/scan.ply: truncated" in report.summary()


def test_run_batch_with_worker_processes():
    seen = []
    results = list(run_batch([-3, -1, 2], abs, workers=2, progress=lambda it, **kw: seen.append(kw) or it))
    assert sorted(results) == [1, 2, 3]
    assert seen == [{"total": 3, "desc": ""}]


def test_every_item_runs_on_one_thread():
    """Thread counts change the last bits of BLAS and torch results, and worker processes with
    all-core pools slow one another down: every item runs single-threaded, in-process or not."""
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    def threads():
        return torch.get_num_threads(), max(pool["num_threads"] for pool in threadpool_info())

    seen = []
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with threadpool_limits(limits=2):
            outer = threads()
            assert list(run_batch([7], lambda item: seen.append(threads()) or item)) == [7]
            assert threads() == outer  # restored after the item
    finally:
        torch.set_num_threads(before)
    assert outer == (2, 2) and seen == [(1, 1)]
    with limit_threads(1, open3d=True):
        import open3d as o3d

        assert o3d.utility.get_max_threads() == 1 and threads() == (1, 1)
    names = ["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"]
    assert list(run_batch(names, os.getenv, workers=2)) == ["1", "1", "1"]  # what the workers' pools start with


# --- signals ---------------------------------------------------------------------------------------

SIGNAL_SCRIPT = """
import sys, time
from pathlib import Path
from facehd.batch import ItemResult, run_resumable
from facehd.fsutil import atomic_path, owned_temporary_folder

def task(job, item):
    with atomic_path(Path(sys.argv[2]) / f"{item}.npz") as tmp:
        tmp.write_bytes(b"x")
        time.sleep(120)
    return ItemResult(str(item), "done")

if __name__ == "__main__":
    if sys.argv[1] == "model":  # the built-in model's temporary folder, one item in this process
        from facehd.align import ModelSource
        items, workers, prepare = [0], 1, ModelSource(None, builtin_resolution=16).materialized
    else:
        items, workers, prepare = [0, 1], 2, lambda: owned_temporary_folder("facehd-model-")
    run_resumable(items, name=str, up_to_date=lambda item: False, task=task, prepare=prepare, workers=workers)
"""


@pytest.mark.parametrize("mode, sig, group", [("model", signal.SIGTERM, False), ("workers", signal.SIGTERM, False),
                                              ("workers", signal.SIGINT, True)])
def test_a_stopped_batch_leaves_no_temporary_files(tmp_path, mode, sig, group):
    """SIGTERM to the batch (or Ctrl-C to its process group) while items are writing: the model's
    temporary folder and the half-written outputs are removed, in this process and in the workers."""
    script, out, tmp = tmp_path / "batch.py", tmp_path / "out", tmp_path / "tmp"
    script.write_text(textwrap.dedent(SIGNAL_SCRIPT))
    out.mkdir()
    tmp.mkdir()
    import facehd

    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(Path(facehd.__file__).parents[1])}
    process = subprocess.Popen([sys.executable, str(script), mode, str(out)], env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.iterdir())) < (1 if mode == "model" else 2):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()
            time.sleep(0.1)
        assert [p.name.startswith("facehd-model-") for p in tmp.iterdir()] == [True]
        (os.killpg if group else os.kill)(process.pid, sig)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode != 0
    assert list(out.iterdir()) == [] and list(tmp.iterdir()) == []


# --- datasets ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset_template(tmp_path_factory):
    """Four small captures with their truth (coefficients under _truth)."""
    root = tmp_path_factory.mktemp("batch") / "data"
    model_path, model = make_model(root.parent, resolution=40)
    truth = make_truth(model, seed=1, deformation_rms_mm=0.5)
    for k, (subject, expression) in enumerate(CAPTURES):
        write_capture(root, subject, expression, model, model_path, seed=k, truth=truth)
    return root, model_path


@pytest.fixture
def dataset(dataset_template, tmp_path):
    root, model_path = dataset_template
    return Path(shutil.copytree(root, tmp_path / "data")), model_path


def align_job(root: Path, model_path: Path, out: Path) -> AlignJob:
    return AlignJob(out=out, model=ModelSource(model_path), coeffs_dir=root / "_truth")


def test_resume_after_an_interrupted_batch(dataset, tmp_path):
    root, model_path = dataset
    job = align_job(root, model_path, tmp_path / "out")

    def interrupt_after_two(result):
        if len(done) == 1:
            raise KeyboardInterrupt
        done.append(result)

    done = []
    with pytest.raises(KeyboardInterrupt):
        align_dataset(root, job, on_result=interrupt_after_two)
    written = sorted(p.parent.parent.name + "/" + p.parent.name for p in (tmp_path / "out").rglob("align.json"))
    assert written == ["S001/neutral", "S001/smile"]
    # a writer killed mid-file leaves only a temporary: never a half-written align.json
    (tmp_path / "out" / "S002" / "neutral").mkdir(parents=True)
    (tmp_path / "out" / "S002" / "neutral" / ".align.x.part.json").write_text("{")
    # one a killed run left behind (its process has ended) is removed by the next run
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    host = owner_tag().rsplit("-", 1)[0]
    leftover = tmp_path / "out" / "S001" / "smile" / f".align.{host}-{ended.pid}.ab_1.part.json"
    leftover.write_text("")
    report = align_dataset(root, job)
    assert {r.name: r.status for r in report.results} == {
        "S001/neutral": "skipped", "S001/smile": "skipped", "S002/neutral": "done", "S003/neutral": "done"}
    assert not leftover.exists()
    # a changed input is noticed, an unchanged one is not
    lm = root / "S001" / "smile" / "landmarks7.txt"
    lm.write_text(lm.read_text() + "\n")  # same numbers, different bytes: recomputed, to be safe
    np.savetxt(root / "S003" / "neutral" / "landmarks7.txt", np.loadtxt(root / "S003" / "neutral" / "landmarks7.txt"))
    report = align_dataset(root, job)
    statuses = {r.name: r.status for r in report.results}
    assert statuses["S001/smile"] == "done" and statuses["S002/neutral"] == "skipped"
    forced = align_dataset(root, AlignJob(**{**job.__dict__, "force": True}))
    assert forced.counts()["done"] == 4


def test_a_failing_capture_is_reported_and_the_rest_go_on(dataset, tmp_path):
    root, model_path = dataset
    lm = root / "S002" / "neutral" / "landmarks7.txt"
    np.savetxt(lm, np.loadtxt(lm) * np.array([-1.0, 1.0, 1.0]))  # mirrored
    (root / "S003" / "neutral" / "scan.ply").write_bytes(b"ply\nformat ascii 1.0\n")  # truncated
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["align", str(root), "--out", str(out), "--model", str(model_path),
                                       "--coeffs", str(root / "_truth")])
    assert result.exit_code == 1
    assert "4 captures: 2 aligned, 0 up to date, 2 failed" in result.stdout
    failure = next(line for line in result.stdout.splitlines() if line.startswith("FAILED S002/neutral: "))
    assert "landmarks7.txt" in failure and "mirrored" in failure
    failure = next(line for line in result.stdout.splitlines() if line.startswith("FAILED S003/neutral: "))
    assert "scan.ply" in failure
    assert read_align(out / "S001" / "smile")["icp"]["fitness"] > 0.5
    assert read_align(out / "S002" / "neutral") is None


def test_shards_from_the_option_and_from_torchrun(dataset, tmp_path):
    root, model_path = dataset
    args = ["align", str(root), "--model", str(model_path), "--coeffs", str(root / "_truth")]
    runner = CliRunner()
    first = runner.invoke(main, [*args, "--out", str(tmp_path / "a"), "--shard", "1/2"])
    assert first.exit_code == 0, first.output
    assert "2 captures (shard 1/2): 2 aligned" in first.stdout
    assert sorted(p.parent.name for p in (tmp_path / "a").rglob("align.json")) == ["neutral", "smile"]  # 1 and 3
    ranked = runner.invoke(main, [*args, "--out", str(tmp_path / "b")], env={"RANK": "0", "WORLD_SIZE": "4"})
    assert ranked.exit_code == 0 and "1 captures (shard 0/4)" in ranked.stdout


def test_gt_maps_command_writes_every_view_and_resumes(dataset, tmp_path):
    root, model_path = dataset
    for subject, expression in CAPTURES[1:]:
        shutil.rmtree(root / subject / expression)
    out = tmp_path / "derived"
    args = ["gt-maps", str(root), "--out", str(out), "--model", str(model_path), "--coeffs", str(root / "_truth")]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "1 captures: 1 fitted" in first.stdout
    folder = out / "S001" / "neutral"
    views = [f"cam{i}" for i in range(9)]
    maps = read_gt_maps(folder, views)
    assert maps["present"].all()
    assert (maps["displacement"][0] == maps["displacement"][8]).all()  # one set of coefficients: same maps
    assert json.loads((folder / "align.json").read_text())["coefficients"]["source"].endswith("truth.npz")
    assert (folder / "gt_maps" / "preview.png").is_file()
    stamp = (folder / "gt_maps" / "cam0.npz").stat().st_mtime_ns
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "0 fitted, 1 up to date" in again.stdout
    assert (folder / "gt_maps" / "cam0.npz").stat().st_mtime_ns == stamp

    # the loader refuses maps and alignments of a capture that changed since
    capture = capture_paths(root / "S001" / "neutral")
    assert read_gt_maps(folder, views, capture=capture)["present"].all()
    assert read_align(folder, capture=capture)["inputs"]["capture_digest"]
    capture.landmarks7.write_text(capture.landmarks7.read_text() + "\n")
    with pytest.raises(FileFormatError, match=r"cam0\.npz: computed from another version of scan\.ply or "
                                              r"landmarks7\.txt .*rerun `facehd gt-maps`"):
        read_gt_maps(folder, views, capture=capture)
    with pytest.raises(FileFormatError, match=r"align\.json: computed from another version"):
        read_align(folder, capture=capture)
    # a recompute that fails removes the outputs that no longer match the capture
    capture.scan.write_bytes(capture.scan.read_bytes()[:200])
    failed = CliRunner().invoke(main, args)
    assert failed.exit_code == 1
    failure = next(line for line in failed.stdout.splitlines() if line.startswith("FAILED S001/neutral: "))
    assert "scan.ply" in failure
    assert sorted(p.name for p in folder.rglob("*")) == ["gt_maps"]


def test_a_failed_recompute_removes_the_stale_align_json(dataset, tmp_path):
    root, model_path = dataset
    job = align_job(root, model_path, tmp_path / "out")
    assert align_dataset(root, job, shard=Shard(0, 4)).counts()["done"] == 1
    path = tmp_path / "out" / "S001" / "neutral" / "align.json"
    record = path.read_text()
    forced = align_dataset(root, AlignJob(**{**job.__dict__, "force": True}), shard=Shard(0, 4))
    assert forced.counts()["done"] == 1 and path.read_text() == record  # same inputs: same bytes
    scan = root / "S001" / "neutral" / "scan.ply"
    scan.write_bytes(scan.read_bytes()[:300])  # the scan became unreadable
    report = align_dataset(root, job, shard=Shard(0, 4))
    assert report.counts()["failed"] == 1 and "scan.ply" in report.failed[0].message
    assert not path.exists()


@pytest.mark.parametrize("command", ["align", "gt-maps"])
def test_a_dataset_without_captures_is_an_error(tmp_path, command):
    root = tmp_path / "data"
    (root / "S001").mkdir(parents=True)  # a subject without expressions
    (root / "subjects.csv").write_text("subject_id,gender,age,ethnicity\nS001,female,25,asian\n")
    result = CliRunner().invoke(main, [command, str(root), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output == f"Error: {root}: no captures found (expected <subject>/<expression>/ folders with " \
                            "scan.ply and landmarks7.txt)\n"
    with pytest.raises(InputError, match="no captures found"):
        align_dataset(root, AlignJob(out=tmp_path / "out"))


def test_gt_maps_are_the_same_bytes_on_every_run(dataset, tmp_path):
    """Two runs on the same inputs, here with different thread counts around them, write the same
    align.json bytes and the same npz arrays (open3d's ICP sums in a thread-dependent order)."""
    import torch
    from threadpoolctl import threadpool_limits

    root, model_path = dataset
    for subject, expression in CAPTURES[1:]:
        shutil.rmtree(root / subject / expression)
    options = GTMapOptions(deformation_distances_mm=(5.0, 2.0), deformation_huber_mm=(0.3, 0.1),
                           displacement_distances_mm=(1.5, 1.0))
    before = torch.get_num_threads()
    outputs = []
    try:
        for threads in (1, 2):
            out = tmp_path / f"run{threads}"
            torch.set_num_threads(threads)
            with threadpool_limits(limits=threads):
                job = GTJob(align=align_job(root, model_path, out), options=options, preview=False)
                assert gt_maps_dataset(root, job).counts()["done"] == 1
            outputs.append(out / "S001" / "neutral")
    finally:
        torch.set_num_threads(before)
    first, second = outputs
    assert (first / "align.json").read_bytes() == (second / "align.json").read_bytes()
    names = sorted(p.name for p in (first / "gt_maps").iterdir())
    assert names == [f"cam{i}.npz" for i in range(9)] == sorted(p.name for p in (second / "gt_maps").iterdir())
    with np.load(first / "gt_maps" / "cam0.npz") as a, np.load(second / "gt_maps" / "cam0.npz") as b:
        assert a.files == b.files
        for key in a.files:
            assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key


def test_outputs_never_go_into_the_dataset(dataset):
    root, model_path = dataset
    for out in (root, root / "S001" / "derived"):
        with pytest.raises(InputError, match="would write into the dataset"):
            align_dataset(root, align_job(root, model_path, out))
    report = align_dataset(root, align_job(root, model_path, root / "_derived"), shard=Shard(0, 4))
    assert report.counts()["done"] == 1 and (root / "_derived" / "S001" / "neutral" / "align.json").is_file()


def test_gt_maps_take_the_uvs_of_a_model_file_without_them(dataset, tmp_path):
    """BFM09's BFM_model_front.mat has no `uv` field (HRN ships bfm_uvs2.npy): --uv supplies them,
    and a missing or mismatched UV file is refused before any capture is aligned."""
    import scipy.io

    root, model_path = dataset
    for subject, expression in CAPTURES[1:]:
        shutil.rmtree(root / subject / expression)
    fields = {k: v for k, v in scipy.io.loadmat(str(model_path)).items() if not k.startswith("__")}
    uv = fields.pop("uv")
    no_uv = tmp_path / "BFM_model_front.mat"
    scipy.io.savemat(str(no_uv), fields)
    uv_file = tmp_path / "bfm_uvs2.npy"
    np.save(uv_file, uv)
    common = ["--coeffs", str(root / "_truth"), "--no-preview"]

    missing = CliRunner().invoke(main, ["gt-maps", str(root), "--out", str(tmp_path / "none"), "--model", str(no_uv),
                                        *common])
    assert missing.exit_code == 1 and "no per-vertex UVs" in missing.output and "--uv" in missing.output
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").rglob("align.json"))

    wrong = tmp_path / "wrong.npy"
    np.save(wrong, uv[:-1])
    refused = CliRunner().invoke(main, ["gt-maps", str(root), "--out", str(tmp_path / "wrong"), "--model", str(no_uv),
                                        "--uv", str(wrong), *common])
    assert refused.exit_code == 1 and "wrong.npy" in refused.output and f"({len(uv)}, 2)" in refused.output
    assert not any((tmp_path / "wrong").rglob("align.json")) if (tmp_path / "wrong").exists() else True

    views = [f"cam{i}" for i in range(9)]
    given = ["--model", str(no_uv), "--uv", str(uv_file)]
    for name, args in (("with", ["--model", str(model_path)]), ("given", given)):
        result = CliRunner().invoke(main, ["gt-maps", str(root), "--out", str(tmp_path / name), *args, *common])
        assert result.exit_code == 0, result.output
    with_uv = read_gt_maps(tmp_path / "with" / "S001" / "neutral", views)
    given_uv = read_gt_maps(tmp_path / "given" / "S001" / "neutral", views)
    assert np.array_equal(with_uv["displacement"], given_uv["displacement"])
    assert np.array_equal(with_uv["deformation"], given_uv["deformation"])
