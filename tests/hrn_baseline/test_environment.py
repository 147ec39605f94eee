from click.testing import CliRunner

from hrn_baseline.cli import main
from hrn_baseline.environment import environment_report, nvdiffrast_status


def test_info_reports_versions_and_back_ends():
    report = environment_report()
    assert report["torch"] and report["open3d"] and report["nvdiffrast"] == nvdiffrast_status()
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0 and "torch" in result.output and "nvdiffrast" in result.output
