"""olivepress report: a table and a plot of the held-out loss, for one run or side by side."""

from __future__ import annotations

import shutil

from conftest import olivepress


def test_report_writes_table_and_plot_for_two_runs(tiny_run, tmp_path):
    other = tmp_path / "second-run"
    shutil.copytree(tiny_run, other, ignore=shutil.ignore_patterns("cache"))
    result = olivepress("report", "--compare", str(other), "--output", str(tmp_path / "out"), home=tiny_run)
    table = (tmp_path / "out" / "report.md").read_text()
    assert "| quantized |" in table and "| ONNX int4, adapter on |" in table and "second-run loss" in table
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "finetuning changed held-out loss by -" in result.stdout


def test_report_on_a_volume_without_figures_says_so(tmp_path):
    result = olivepress("report", "--output", str(tmp_path / "out"), home=tmp_path, check=False)
    assert result.returncode == 2 and "no held-out figures" in result.stderr
