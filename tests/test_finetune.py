"""stages.finetune: LoRA on the quantized weights, on the train split only, with input checks first."""

from __future__ import annotations

import json
import shutil

import torch
from click.testing import CliRunner

from contract import volume
from stages import finetune


def invoke(home, *args):
    return CliRunner().invoke(finetune.command, ["--home", str(home), *args])


def test_the_adapter_targets_phi3_projections_and_names_its_base_by_volume_path(tiny_run):
    config = json.loads((tiny_run / "finetune" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 64 and config["lora_alpha"] == 16
    assert config["target_modules"] == sorted(config["target_modules"]) and "qkv_proj" in config["target_modules"]
    assert config["base_model_name_or_path"] == "quantize/dequantized"
    manifest = volume.read_manifest(tiny_run / "finetune")
    assert manifest["inputs"]["base"]["stage"] == "quantize"
    assert manifest["split"]["train_rows"] + manifest["split"]["heldout_rows"] == 289


def test_bad_rows_are_reported_with_line_numbers_and_nothing_is_written(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\r\n{"prompt": "a", "response": ""}\r\nnope')
    result = invoke(tmp_path, "--data-files", str(bad))
    assert result.exit_code == 2
    assert "line 2: empty field(s) response" in result.output and "line 3: not valid JSON" in result.output
    assert list(tmp_path.iterdir()) == [bad]


def test_finetune_before_quantize_says_what_to_run(tmp_path):
    result = invoke(tmp_path)
    assert result.exit_code == 2 and "run `olivepress quantize` first" in result.output


def test_qlora_on_a_cpu_is_refused_clearly(tiny_run, tmp_path):
    result = invoke(tiny_run, "--method", "qlora")
    assert result.exit_code == 2 and "needs a CUDA GPU" in result.output


def test_two_gloo_processes_train_data_parallel_and_save_one_adapter(tiny_run, tmp_path):
    from safetensors.torch import load_file

    adapters = {}
    for processes in ("1", "2"):
        home = tmp_path / f"p{processes}"
        shutil.copytree(tiny_run / "quantize", home / "quantize")
        result = invoke(home, "--max-steps", "4", "--processes", processes, "--no-evaluate")
        assert result.exit_code == 0, result.output
        assert volume.read_manifest(home / "finetune")["world_size"] == int(processes)
        adapters[processes] = load_file(home / "finetune" / "adapter" / "adapter_model.safetensors")
    single, double = adapters["1"], adapters["2"]
    assert {k: v.shape for k, v in single.items()} == {k: v.shape for k, v in double.items()}
    # Same seed and data: only a real data-parallel run (other shards, twice the batch) trains other weights.
    assert any(not torch.equal(single[k], double[k]) for k in single)
    assert not list((tmp_path / "p2").glob(".finetune.partial"))


def test_processes_must_be_a_count(tmp_path):
    result = invoke(tmp_path, "--processes", "two")
    assert result.exit_code == 2 and "--processes must be a whole number" in result.output
