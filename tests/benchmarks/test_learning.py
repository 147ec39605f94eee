"""`python -m benchmarks.learning`: the learning test's configuration at any budget."""

from benchmarks import learning


def test_learning_benchmark_prints_the_validations_and_their_ratios(tmp_path, capsys):
    learning.main(["--images", "8", "--held-out", "4", "--steps", "2", "--batch-size", "4", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "2 steps of 4 on 8 images (cpu)" in out and "errors on 4 held-out faces" in out
    table = out.splitlines()[-5:]
    assert table[0].split()[:3] == ["step", "landmark", "px"]
    assert [line.split()[0] for line in table[1:]] == ["0", "1", "2", "end/start"]
    assert all(cell.endswith("%") for cell in table[-1].split()[1:])
    rows = learning.validation_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert f"{rows[-1]['shape_mm']:.3f}" in table[3]
    assert (tmp_path / "train").is_dir() and (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
