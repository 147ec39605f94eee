import json
import shutil
import sys
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
    resolve_shard,
    run_batch,
    run_item,
)
from facehd.cli import main  # noqa: E402
from facehd.dataset import read_align, read_gt_maps  # noqa: E402
from facehd.errors import FileFormatError, InputError  # noqa: E402

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
    report = align_dataset(root, job)
    assert {r.name: r.status for r in report.results} == {
        "S001/neutral": "skipped", "S001/smile": "skipped", "S002/neutral": "done", "S003/neutral": "done"}
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
    assert "4 captures: 2 aligned, 0 up to date, 2 failed" in result.output
    failure = next(line for line in result.output.splitlines() if line.startswith("FAILED S002/neutral: "))
    assert "landmarks7.txt" in failure and "mirrored" in failure
    assert "FAILED S003/neutral: " in result.output and "scan.ply" in result.output
    assert read_align(out / "S001" / "smile")["icp"]["fitness"] > 0.5
    assert read_align(out / "S002" / "neutral") is None


def test_shards_from_the_option_and_from_torchrun(dataset, tmp_path):
    root, model_path = dataset
    args = ["align", str(root), "--model", str(model_path), "--coeffs", str(root / "_truth")]
    runner = CliRunner()
    first = runner.invoke(main, [*args, "--out", str(tmp_path / "a"), "--shard", "1/2"])
    assert first.exit_code == 0, first.output
    assert "2 captures (shard 1/2): 2 aligned" in first.output
    assert sorted(p.parent.name for p in (tmp_path / "a").rglob("align.json")) == ["neutral", "smile"]  # 1 and 3
    ranked = runner.invoke(main, [*args, "--out", str(tmp_path / "b")], env={"RANK": "0", "WORLD_SIZE": "4"})
    assert ranked.exit_code == 0 and "1 captures (shard 0/4)" in ranked.output


def test_gt_maps_command_writes_every_view_and_resumes(dataset, tmp_path):
    root, model_path = dataset
    for subject, expression in CAPTURES[1:]:
        shutil.rmtree(root / subject / expression)
    out = tmp_path / "derived"
    args = ["gt-maps", str(root), "--out", str(out), "--model", str(model_path), "--coeffs", str(root / "_truth")]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "1 captures: 1 fitted" in first.output
    folder = out / "S001" / "neutral"
    views = [f"cam{i}" for i in range(9)]
    maps = read_gt_maps(folder, views)
    assert maps["present"].all()
    assert (maps["displacement"][0] == maps["displacement"][8]).all()  # one set of coefficients: same maps
    assert json.loads((folder / "align.json").read_text())["coefficients"]["source"].endswith("truth.npz")
    assert (folder / "gt_maps" / "preview.png").is_file()
    stamp = (folder / "gt_maps" / "cam0.npz").stat().st_mtime_ns
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "0 fitted, 1 up to date" in again.output
    assert (folder / "gt_maps" / "cam0.npz").stat().st_mtime_ns == stamp


def test_outputs_never_go_into_the_dataset(dataset):
    root, model_path = dataset
    for out in (root, root / "S001" / "derived"):
        with pytest.raises(InputError, match="would write into the dataset"):
            align_dataset(root, align_job(root, model_path, out))
    report = align_dataset(root, align_job(root, model_path, root / "_derived"), shard=Shard(0, 4))
    assert report.counts()["done"] == 1 and (root / "_derived" / "S001" / "neutral" / "align.json").is_file()
