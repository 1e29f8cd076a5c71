"""stages.volume: publish on success only, skip when unchanged, identify inputs by content."""

from __future__ import annotations

import json

import pytest

from contract import volume


def write_output(text: str):
    def work(out):
        (out / "result.txt").write_text(text)
        return {"metrics": {"answer": 42}}

    return work


def test_publishes_manifest_with_hashes_and_skips_when_unchanged(tmp_path):
    source = tmp_path / "input.txt"
    source.write_text("data")
    first = volume.run_stage("demo", tmp_path, {"src": source}, {"k": 1}, write_output("a"))
    assert (tmp_path / "demo" / "result.txt").read_text() == "a"
    assert first["outputs"] == {"result.txt": volume.sha256_file(tmp_path / "demo" / "result.txt")}
    assert first["metrics"] == {"answer": 42}
    assert json.loads((tmp_path / "demo" / "manifest.json").read_text()) == first

    again = volume.run_stage("demo", tmp_path, {"src": source}, {"k": 1}, write_output("b"))
    assert again == first and (tmp_path / "demo" / "result.txt").read_text() == "a"

    changed = volume.run_stage("demo", tmp_path, {"src": source}, {"k": 2}, write_output("b"))
    assert changed["parameters"] == {"k": 2} and (tmp_path / "demo" / "result.txt").read_text() == "b"

    source.write_text("new data")
    rerun = volume.run_stage("demo", tmp_path, {"src": source}, {"k": 2}, write_output("c"))
    assert rerun["inputs"] != changed["inputs"]

    forced = volume.run_stage("demo", tmp_path, {"src": source}, {"k": 2}, write_output("d"), force=True)
    assert forced["started"] >= rerun["started"] and (tmp_path / "demo" / "result.txt").read_text() == "d"


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_stage_leaves_the_last_good_output_and_no_partial(tmp_path, error):
    volume.run_stage("demo", tmp_path, {}, {"k": 1}, write_output("good"))

    def crash(out):
        (out / "result.txt").write_text("half")
        raise error("stopped")

    with pytest.raises(error):
        volume.run_stage("demo", tmp_path, {}, {"k": 2}, crash)
    assert (tmp_path / "demo" / "result.txt").read_text() == "good"
    assert volume.read_manifest(tmp_path / "demo")["parameters"] == {"k": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert "stopped" in (tmp_path / "demo.failed.log").read_text()


def test_a_stage_output_is_identified_by_its_manifest(tmp_path):
    volume.run_stage("demo", tmp_path, {}, {}, write_output("x"))
    described = volume.describe_input(tmp_path / "demo" / "result.txt", tmp_path)
    assert described["stage"] == "demo"
    assert volume.describe_input("org/some-model", tmp_path) == {"hub_id": "org/some-model"}


def test_home_reads_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(volume.HOME_ENV, str(tmp_path))
    assert volume.home() == tmp_path.resolve()
    assert volume.home("elsewhere").name == "elsewhere"
