"""olivepress run: the whole tiny pipeline end to end, as the README's main job runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_STEPS, olivepress

from contract import registry, volume
from stages import data
from tests.test_evaluate import CHAT_ROWS


def test_run_publishes_four_manifests_and_answers(tiny_run):
    for stage in registry.NAMES:
        manifest = volume.read_manifest(tiny_run / stage)
        assert manifest is not None, stage
        assert manifest["outputs"], f"{stage} recorded no outputs"
        assert manifest["wall_s"] > 0
        for relpath, digest in manifest["outputs"].items():
            assert volume.sha256_file(tiny_run / stage / relpath) == digest
    assert (tiny_run / "optimize" / "model" / "model.onnx").is_file()
    assert (tiny_run / "optimize" / "adapters" / "travel.onnx_adapter").is_file()
    answers = json.loads((tiny_run / "infer" / "answers.json").read_text())
    assert {a["adapter"] for a in answers} == {"base", "travel"}
    assert all(a["text"].strip() for a in answers), "the ONNX model generated no text"
    by_prompt = {}
    for a in answers:
        by_prompt.setdefault(a["prompt"], {})[a["adapter"]] = a["text"]
    assert any(v["base"] != v["travel"] for v in by_prompt.values()), "the adapter changed no answer"
    assert not list(tiny_run.glob(".*.partial")), "a partial stage folder was left behind"


def test_second_run_skips_every_stage(tiny_run):
    before = {stage: volume.read_manifest(tiny_run / stage) for stage in registry.NAMES}
    result = olivepress("run", "--max-steps", TINY_STEPS, home=tiny_run)
    assert "skipped" in result.stderr
    assert {stage: volume.read_manifest(tiny_run / stage) for stage in registry.NAMES} == before


def test_same_inputs_and_seed_give_byte_identical_outputs(tiny_run, tmp_path):
    olivepress("run", "--max-steps", TINY_STEPS, home=tmp_path)
    for stage in registry.NAMES:
        first, second = volume.read_manifest(tiny_run / stage), volume.read_manifest(tmp_path / stage)
        assert first["outputs"] == second["outputs"], f"{stage} outputs differ between two identical runs"


def test_a_failing_stage_stops_the_run_with_its_message(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "response": "there"}\nnot json\n')
    result = olivepress("run", "--data-files", str(bad), home=tmp_path / "home", check=False)
    assert result.returncode == 2
    assert "line 2" in result.stderr and "quantize failed" in result.stderr
    assert not (tmp_path / "home" / "finetune").exists()
    # finetune's process, started to wait for its turn, ended with the run.
    assert not [p for p in Path("/proc").glob("[0-9]*") if str(tmp_path) in _cmdline(p)]


def _cmdline(process: Path) -> str:
    try:
        return (process / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_status_lists_the_stages(tiny_run):
    rows = json.loads(olivepress("status", "--json", home=tiny_run).stdout)
    assert [r["stage"] for r in rows] == list(registry.NAMES)
    assert all(r["state"] == "done" for r in rows)
    assert rows[0]["parameters"]["algorithm"] == "gptq"


@pytest.mark.slow
@pytest.mark.parametrize("rows", ["prompt/response", "chat"])
def test_two_rows_run_end_to_end(tmp_path, rows):
    """The fewest rows a run takes (one to train on, one held out), far fewer tokens than --max-seq-len."""
    data_file = tmp_path / "two.jsonl"
    if rows == "chat":
        data_file.write_text("".join(json.dumps(row) + "\n" for row in CHAT_ROWS))
    else:
        data_file.write_text("\n".join(data.DEFAULT_DATA.read_text().splitlines()[:2]))
    olivepress("run", "--data-files", str(data_file), "--max-steps", "3", home=tmp_path / "home")
    finetune = volume.read_manifest(tmp_path / "home" / "finetune")
    assert finetune["split"]["train_rows"] == finetune["split"]["heldout_rows"] == 1
    assert finetune["training_data"]["format"] == rows and finetune["training_data"]["sequences"] == 1
    assert set(volume.read_manifest(tmp_path / "home" / "optimize")["metrics"]) == {"onnx_adapter", "onnx_base"}
