import scipy.io
from click.testing import CliRunner
from factories import tiny_fields

from facehd.cli import main


def test_help_lists_the_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "synth" in result.output and "model-info" in result.output
    result = CliRunner().invoke(main, ["synth", "model", "--help"])
    assert result.exit_code == 0 and "--resolution" in result.output and "--preview" in result.output


def test_model_info_summarises_a_model(tmp_path):
    scipy.io.savemat(tmp_path / "m.mat", tiny_fields())
    result = CliRunner().invoke(main, ["model-info", str(tmp_path / "m.mat")])
    assert result.exit_code == 0, result.output
    assert "vertices   36" in result.output and "mm" in result.output


def test_model_info_names_the_broken_file_without_a_traceback(tmp_path):
    fields = tiny_fields()
    del fields["keypoints"]
    scipy.io.savemat(tmp_path / "broken.mat", fields)
    result = CliRunner().invoke(main, ["model-info", str(tmp_path / "broken.mat")])
    assert result.exit_code == 1
    assert "broken.mat" in result.output and "'keypoints'" in result.output
    assert "Traceback" not in result.output


def test_align_and_gt_maps_refuse_a_bad_root_in_one_line_with_status_1(tmp_path):
    """The README promises exit status 1 and one line for bad input; click's own check exited 2."""
    subject = tmp_path / "data" / "S001"
    (subject / "neutral").mkdir(parents=True)
    (subject / "neutral" / "scan.ply").write_text("ply\n")
    cases = ((tmp_path / "nowhere", "no such folder"),
             (subject, f"a subject folder, not a dataset root (no subjects.csv, and its folders are captures); "
                       f"give its parent, {tmp_path / 'data'}"))
    for command in ("align", "gt-maps"):
        for root, words in cases:
            result = CliRunner().invoke(main, [command, str(root), "--out", str(tmp_path / "out")])
            assert result.exit_code == 1, result.output
            assert result.output == f"Error: {root}: {words}\n"
    assert not (tmp_path / "out").exists()
