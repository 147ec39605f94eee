import io
import json

import pandas as pd
import pytest
from click.testing import CliRunner

from benchmarks.cli import main
from benchmarks.published import micc_published_table, realy_published_table
from benchmarks.tables import format_table


def test_micc_table_holds_the_supplement_numbers():
    table = micc_published_table()
    assert table.loc["HRN", ("Cooperative", "mean")] == 0.86
    assert table.loc["HRN", ("Outdoor", "std")] == 0.104
    assert table.loc["GANFit", ("Indoor", "mean")] == 0.94
    assert table.loc["Tran et al.", ("Indoor", "mean")] == 2.02
    assert list(table.index) == ["Tran et al.", "Booth et al.", "Genova et al.", "GANFit", "HRN"]


def test_realy_tables_hold_both_tracks():
    frontal, side = realy_published_table("frontal"), realy_published_table("side")
    assert frontal.loc["HRN", "all"] == 1.537 and side.loc["Deep3D", "cheek"] == 1.528
    # "all" is the mean of the four region means
    for table in (frontal, side):
        regions = table[["nose", "mouth", "forehead", "cheek"]].mean(axis=1)
        assert (abs(regions - table["all"]) < 1e-3).all()
    with pytest.raises(KeyError, match="unknown REALY track"):
        realy_published_table("profile")


def test_format_table_every_format():
    df = pd.DataFrame({"a": [1.23456, float("nan")], "b": [2.0, 3.0]}, index=pd.Index(["x", "y"], name="method"))
    md = format_table(df, "markdown", note="metric: point-to-surface")
    lines = md.splitlines()
    assert lines[0].split("|")[1].strip() == "method" and set(lines[1]) <= set("|-:")
    assert "1.235" in md and "| -" in md and md.endswith("metric: point-to-surface")
    assert "\\begin{tabular}{lrr}" in format_table(df, "latex")
    back = pd.read_csv(io.StringIO(format_table(df, "csv")), index_col=0)
    assert back.loc["x", "a"] == pytest.approx(1.23456) and pd.isna(back.loc["y", "a"])
    obj = json.loads(format_table(df, "json", note="n"))
    assert obj["rows"]["y"]["a"] is None and obj["note"] == "n"
    with pytest.raises(ValueError, match="unknown table format"):
        format_table(df, "html")


@pytest.mark.parametrize("fmt", ["markdown", "latex", "csv", "json"])
def test_published_command(fmt):
    result = CliRunner().invoke(main, ["published", "all", "--format", fmt])
    assert result.exit_code == 0, result.output
    if fmt == "json":
        assert set(json.loads(result.stdout)) == {"micc", "realy_frontal", "realy_side"}
    elif fmt == "csv":
        table = pd.read_csv(io.StringIO(result.stdout))
        assert len(table) == 5 + 2 + 2 and table["table"].iloc[0] == "micc"
    else:
        assert "GANFit" in result.output and "Deep3D" in result.output
