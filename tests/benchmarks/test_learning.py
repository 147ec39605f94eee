"""`python -m benchmarks.learning`: the learning test's configuration at any budget."""

from benchmarks import learning


def test_learning_benchmark_prints_the_validations_and_their_ratios(tmp_path, capsys):
    learning.main(["--images", "8", "--held-out", "4", "--steps", "2", "--batch-size", "4", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "2 steps of 4 on 8 images (cpu)" in out and "errors on 4 held-out faces" in out
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()[-6:]]
    assert table[0][:2] == ["step", "landmark (px)"]
    assert [row[0] for row in table[2:]] == ["0", "1", "2", "end/start"]  # under the header's rule
    assert all(cell.endswith("%") for cell in table[-1][1:])
    rows = learning.validation_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert f"{rows[-1]['shape_mm']:.3f}" in table[4]
    assert (tmp_path / "train").is_dir() and (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
