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
