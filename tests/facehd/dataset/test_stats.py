import numpy as np
import pandas as pd
import pytest
from capture_factory import make_capture, make_dataset, scan_mesh, truncate
from click.testing import CliRunner
from PIL import Image

from facehd.capture import CaptureRef
from facehd.cli_dataset import stats as stats_command
from facehd.stats import age_by_gender, dataset_stats, demographics, mean_edge_length, write_stats

# 20 subjects: 15 asian, 3 white, 2 black; 12 female, 8 male
SUBJECTS = tuple(
    (f"S{i + 1:03d}", "female" if i < 12 else "male", 17 + i, "asian" if i < 15 else ("white" if i < 18 else "black"))
    for i in range(20)
)


def naive_mean_edge(vertices, faces) -> float:
    edges = {tuple(sorted((int(f[a]), int(f[b])))) for f in faces for a, b in ((0, 1), (1, 2), (2, 0))}
    return float(np.mean([np.linalg.norm(vertices[a] - vertices[b]) for a, b in edges]))


def test_demographic_percentages_and_age_bins():
    table = pd.DataFrame(SUBJECTS, columns=["subject_id", "gender", "age", "ethnicity"])
    demo = demographics(table).set_index(["attribute", "value"])
    assert demo.loc[("ethnicity", "asian"), "percent"] == 75.0
    assert demo.loc[("ethnicity", "white"), "percent"] == 15.0
    assert demo.loc[("ethnicity", "black"), "count"] == 2 and demo.loc[("ethnicity", "other"), "count"] == 0
    assert demo.loc[("gender", "female"), "percent"] == 60.0 and demo.loc[("gender", "male"), "percent"] == 40.0
    assert demo.loc[("age", "17-35"), "count"] == 19  # ages 17..36
    bins = age_by_gender(table)
    assert list(bins.index[:2]) == ["15-17", "18-20"] and list(bins.columns) == ["female", "male"]
    assert bins.loc["15-17", "female"] == 1 and bins.loc["18-20", "female"] == 3
    assert bins["female"].sum() == 12 and bins["male"].sum() == 8


def test_mean_edge_length_matches_a_naive_count():
    mesh = scan_mesh()
    assert mean_edge_length(mesh.vertices, mesh.faces) == pytest.approx(naive_mean_edge(mesh.vertices, mesh.faces))


def test_stats_tables_and_files(tmp_path):
    root = make_dataset(tmp_path / "ds", subjects=SUBJECTS[:4] + SUBJECTS[-2:], expressions=("neutral",))
    make_capture(root, "S001", "smile")
    truncate(CaptureRef(root, "S002", "neutral").paths.scan)
    stats = dataset_stats(root)
    assert stats.n_captures == 7
    assert stats.subjects.set_index("subject_id").loc["S001", "n_expressions"] == 2
    assert stats.expressions.iloc[0].tolist() == ["neutral", 6]
    scans = stats.scans.set_index(["subject", "expression"])
    row = scans.loc[("S001", "neutral")]  # scale 1: the factory's reference scan
    assert row["n_vertices"] == 576 and row["n_faces"] == 1058
    mesh = scan_mesh()
    assert row["bbox_x_mm"] == pytest.approx(np.ptp(mesh.vertices[:, 0]), rel=1e-5)
    assert row["bbox_diagonal_mm"] == pytest.approx(np.linalg.norm(np.ptp(mesh.vertices, axis=0)), rel=1e-5)
    assert row["mean_edge_mm"] == pytest.approx(naive_mean_edge(mesh.vertices, mesh.faces), rel=1e-5)
    broken = scans.loc[("S002", "neutral")]
    assert "truncated" in broken["error"] and np.isnan(broken["n_vertices"])

    written = write_stats(stats, tmp_path / "out")
    names = {p.name for p in written}
    assert {"demographics.csv", "subjects_summary.csv", "scans.csv", "age_by_gender.csv", "expressions.csv",
            "figure1_age_by_gender.png", "expressions_per_subject.png", "stats.md"} <= names
    demo = pd.read_csv(tmp_path / "out" / "demographics.csv")
    assert demo.query("value == 'black'")["percent"].item() == pytest.approx(100 * 2 / 6, abs=0.05)
    with Image.open(tmp_path / "out" / "figure1_age_by_gender.png") as img:
        assert img.size[0] > 600
    md = (tmp_path / "out" / "stats.md").read_text()
    assert "![age by gender](figure1_age_by_gender.png)" in md and "S002/neutral/scan.ply" in md


def test_cli_stats_prints_a_summary_and_skips_scans_when_asked(dataset, tmp_path):
    result = CliRunner().invoke(stats_command, [str(dataset), "--out", str(tmp_path / "out"), "--no-scans"])
    assert result.exit_code == 0, result.output
    assert "ethnicity  asian      2     50.0" in result.stdout and "wrote" in result.stdout
    assert not (tmp_path / "out" / "scans.csv").exists() and (tmp_path / "out" / "stats.md").exists()
    result = CliRunner().invoke(stats_command, [str(dataset), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0 and "mean_edge_mm" in result.stdout
    assert len(pd.read_csv(tmp_path / "out" / "scans.csv")) == 8


def test_cli_stats_names_a_broken_subjects_csv(dataset, tmp_path):
    (dataset / "subjects.csv").write_text("subject_id,gender,age\nS001,female,20\n")
    result = CliRunner().invoke(stats_command, [str(dataset), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "subjects.csv: missing column(s) ethnicity" in result.output
    assert "Traceback" not in result.output


def test_cli_stats_on_an_empty_subject_or_missing_folder_is_one_line_with_status_1(dataset, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = (
        (tmp_path / "empty", "no dataset here (no subjects.csv and no <subject>/<expression>/ folders)"),
        (dataset / "S001", f"a subject folder, not a dataset root (no subjects.csv, and its folders are captures); "
                           f"give its parent, {dataset}"),
        (tmp_path / "nowhere", "no such folder"),
    )
    for root, words in cases:
        result = CliRunner().invoke(stats_command, [str(root), "--out", str(tmp_path / "out")])
        assert result.exit_code == 1, result.output
        assert result.output == f"Error: {root}: {words}\n"
    (dataset / "subjects.csv").unlink()  # a dataset's folders without its table
    result = CliRunner().invoke(stats_command, [str(dataset), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {dataset / 'subjects.csv'}: missing subjects.csv")
    assert len(result.output.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_scan_that_is_a_symlink_loop_is_named_in_the_scan_table(dataset):
    scan = CaptureRef(dataset, "S004", "neutral").paths.scan
    scan.unlink()
    scan.symlink_to(scan.name)
    scans = dataset_stats(dataset).scans
    row = scans[(scans["subject"] == "S004") & (scans["expression"] == "neutral")]
    assert row["error"].tolist() == ["scan.ply is a symlink loop"] and row["n_vertices"].isna().all()
    assert (scans["error"] == "").sum() == 7
