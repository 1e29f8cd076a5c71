"""The Olive workflow of each stage as a plain dict, and --dry-run, which prints it: no model, no torch work."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from contract import families, volume
from stages import common, data, finetune, optimize, quantize, tiny_model

REPO = Path(__file__).resolve().parent.parent
WORK = Path("/volume/cache/tmp/stage-1")


def quantize_parameters(**changes):
    parameters = {"algorithm": "gptq", "bits": 4, "group_size": 128, "max_seq_len": 512, "trust_remote_code": False}
    return {**parameters, **changes}


def finetune_parameters(**changes):
    parameters = {
        "method": "lora",
        "text_template": "{prompt} {response}",
        "max_steps": 100,
        "rank": 64,
        "alpha": 16.0,
        "learning_rate": 2e-4,
        "batch_size": 4,
        "max_seq_len": 512,
        "target_modules": [],
        "attention": "sdpa",
        "seed": 0,
        "torch_dtype": "float32",
        "processes": 1,
    }
    return {**parameters, **changes}


def optimize_parameters(**changes):
    parameters = {
        "precision": "int4",
        "int4_block_size": 128,
        "quantize_lm_head": True,
        "int4_symmetric": False,
        "adapter_mode": "switchable",
        "int4_accuracy_level": 4,
    }
    return {**parameters, **changes}


def test_the_outer_workflow_names_the_device_and_keeps_olive_inside_the_workdir():
    workflow = quantize.olive_workflow(quantize_parameters(), quantize.Paths("/models/m", WORK, "gpu"))
    (accelerator,) = workflow["systems"]["local_system"]["accelerators"]
    assert accelerator == {"device": "gpu", "execution_providers": ["CUDAExecutionProvider"]}
    assert workflow["host"] == workflow["target"] == "local_system"
    assert workflow["cache_config"] == {"cache_dir": str(WORK / "olive-cache")}
    assert workflow["output_dir"] == str(WORK / "output")
    assert workflow["input_model"]["type"] == "HfModel" and workflow["input_model"]["model_path"] == "/models/m"


def test_gptq_calibrates_on_the_local_dataset_in_the_workdir():
    workflow = quantize.olive_workflow(
        quantize_parameters(group_size=64, max_seq_len=256), quantize.Paths("/m", WORK, "cpu")
    )
    assert workflow["passes"] == {
        "quantize": {"type": "Gptq", "bits": 4, "group_size": 64, "data_config": "calibration_data"}
    }
    (calibration,) = workflow["data_configs"]
    assert calibration["load_dataset_config"]["data_name"] == str(WORK / "calibration")
    assert calibration["pre_process_data_config"] == {
        "input_cols": "text",
        "max_seq_len": 256,
        "strategy": "line-by-line",
        "pad_to_max_len": False,
    }
    assert workflow["systems"]["local_system"]["accelerators"][0]["execution_providers"] == ["CPUExecutionProvider"]


def test_awq_names_its_group_size_its_own_way_and_rtn_needs_no_data():
    awq = quantize.olive_workflow(quantize_parameters(algorithm="awq"), quantize.Paths("/m", WORK, "gpu"))
    assert awq["passes"]["quantize"]["type"] == "AutoAWQQuantizer" and awq["passes"]["quantize"]["q_group_size"] == 128
    rtn = quantize.olive_workflow(
        quantize_parameters(algorithm="rtn", bits=8, max_seq_len=None, trust_remote_code=True),
        quantize.Paths("/m", WORK, "cpu"),
    )
    assert rtn["passes"] == {"quantize": {"type": "Rtn", "bits": 8, "group_size": 128}}
    assert rtn["data_configs"] == [] and rtn["input_model"]["load_kwargs"]["trust_remote_code"] is True


def test_finetune_trains_lora_on_the_train_file_with_the_parameters():
    paths = finetune.Paths(Path("/volume/quantize/dequantized"), WORK, "cpu")
    workflow = finetune.olive_workflow(finetune_parameters(max_steps=20, target_modules=["qkv_proj"]), paths)
    lora = workflow["passes"]["lora"]
    assert lora["type"] == "LoRA" and lora["r"] == 64 and lora["target_modules"] == ["qkv_proj"]
    assert lora["training_args"]["max_steps"] == 20 and lora["training_args"]["logging_steps"] == 2
    assert lora["training_args"]["gradient_checkpointing"] is False and "device_map" not in lora
    (train_data,) = workflow["data_configs"]
    assert train_data["load_dataset_config"]["data_files"] == [str(WORK / "train.jsonl")]
    assert train_data["pre_process_data_config"] == {"type": "skip_pre_process"}  # the file is tokenized already
    assert workflow["input_model"]["model_path"] == "/volume/quantize/dequantized"
    assert workflow["input_model"]["load_kwargs"] == {"attn_implementation": "sdpa"}
    assert workflow["output_dir"] == str(WORK / "rank0" / "output")


def test_finetune_trains_with_the_attention_its_family_needs_else_the_faster_on_its_device():
    paths = finetune.Paths(Path("/volume/quantize/dequantized"), WORK, "cpu")
    workflow = finetune.olive_workflow(finetune_parameters(attention="eager"), paths)
    assert workflow["input_model"]["load_kwargs"] == {"attn_implementation": "eager"}
    gemma2, phi3 = families.BY_NAME["gemma2"], families.BY_NAME["phi3"]
    # Gemma 2's soft-capping: transformers refuses sdpa for it.
    assert [finetune.training_attention(gemma2, device) for device in ("cpu", "gpu")] == ["eager", "eager"]
    assert [finetune.training_attention(phi3, device) for device in ("cpu", "gpu")] == ["sdpa", "eager"]


def test_each_training_process_gets_its_own_folder_and_on_gpus_its_own_device():
    parameters = finetune_parameters(method="qlora", processes=2)
    job = finetune.training_job(parameters, finetune.Paths(Path("/b"), WORK, "gpu"))
    assert job["seed"] == 0 and [w["output_dir"] for w in job["workflows"]] == [
        str(WORK / "rank0" / "output"),
        str(WORK / "rank1" / "output"),
    ]
    lora = job["workflows"][1]["passes"]["lora"]
    assert lora["type"] == "QLoRA" and lora["device_map"] == "current_device"
    assert lora["training_args"]["gradient_checkpointing"] is True
    on_cpu = finetune.training_job(parameters, finetune.Paths(Path("/b"), WORK, "cpu"))
    assert "device_map" not in on_cpu["workflows"][0]["passes"]["lora"]


def test_a_switchable_int4_build_keeps_the_lora_branches_float():
    paths = optimize.Paths(Path("/v/quantize/dequantized"), Path("/v/finetune/adapter"), 2, WORK, "cpu")
    workflow = optimize.olive_workflow(optimize_parameters(int4_block_size=32), paths)
    builder = workflow["passes"]["builder"]
    assert builder["type"] == "ModelBuilder" and builder["int4_block_size"] == 32
    assert builder["int4_nodes_to_exclude"] == optimize.lora_matmul_names(2)
    assert len(builder["int4_nodes_to_exclude"]) == 2 * 7 * 2
    assert workflow["passes"]["extract_adapters"] == {"type": "ExtractAdapters"}
    assert workflow["input_model"]["adapter_path"] == "/v/finetune/adapter"
    assert workflow["systems"]["local_system"]["accelerators"][0]["device"] == "cpu"


def test_merged_fp32_and_keep_lm_head_builds():
    paths = optimize.Paths(Path("/b"), Path("/a"), 2, WORK, "cpu")
    merged = optimize.olive_workflow(optimize_parameters(adapter_mode="merged"), paths)
    assert list(merged["passes"]) == ["builder"] and "int4_nodes_to_exclude" not in merged["passes"]["builder"]
    kept = optimize.olive_workflow(optimize_parameters(adapter_mode="merged", quantize_lm_head=False), paths)
    assert kept["passes"]["builder"]["int4_nodes_to_exclude"] == ["/lm_head/MatMul"]
    fp32 = optimize.olive_workflow(optimize_parameters(precision="fp32"), paths)
    assert fp32["passes"]["builder"] == {"type": "ModelBuilder", "precision": "fp32"}


def test_building_the_workflows_imports_no_torch_transformers_or_olive():
    script = """
import sys
from pathlib import Path
from stages import finetune, optimize, quantize
from tests.test_olive_workflows import WORK, finetune_parameters, optimize_parameters, quantize_parameters
quantize.olive_workflow(quantize_parameters(), quantize.Paths("/m", WORK, "cpu"))
finetune.training_job(finetune_parameters(processes=2), finetune.Paths(Path("/b"), WORK, "cpu"))
optimize.olive_workflow(optimize_parameters(), optimize.Paths(Path("/b"), Path("/a"), 2, WORK, "cpu"))
print(sorted({name.split(".")[0] for name in sys.modules} & {"torch", "transformers", "olive"}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]"


# --dry-run


def snapshot(home: Path) -> list:
    return sorted((p.relative_to(home).as_posix(), p.stat().st_mtime_ns) for p in home.rglob("*"))


def dry_run(command, home: Path, *args):
    result = CliRunner().invoke(command, ["--home", str(home), "--dry-run", *args])
    return result, (json.loads(result.stdout) if result.exit_code == 0 else None)


@pytest.fixture
def upstream_home(tmp_path):
    """A volume with a published quantize (group size 32, a 3-layer base) and finetune, as optimize reads them."""

    def dequantized(out):
        (out / "dequantized").mkdir()
        (out / "dequantized" / "config.json").write_text(json.dumps({"model_type": "phi3", "num_hidden_layers": 3}))
        # finetune tokenizes the rows itself (answer-only labels, packing): it needs the base's tokenizer.
        rows = data.load_dataset(data.DEFAULT_DATA).rows[:20]
        texts = [row["prompt"] + "\n" + row["response"] for row in rows]
        tiny_model.train_tokenizer(texts, 300).save_pretrained(out / "dequantized")

    volume.run_stage("quantize", tmp_path, {}, {"group_size": 32}, dequantized)
    volume.run_stage("finetune", tmp_path, {}, {}, lambda out: (out / "adapter").mkdir())
    return tmp_path


def test_quantize_dry_run_shows_where_the_tiny_model_would_be_built_and_writes_nothing(tmp_path):
    home = tmp_path / "home"
    result, shown = dry_run(quantize.command, home, "--algorithm", "rtn")
    assert result.exit_code == 0, result.output
    assert not home.exists()
    assert shown["builds_tiny_model_in"] == str(home / "tiny-model") == shown["paths"]["model"]
    assert shown["parameters"]["algorithm"] == "rtn" and shown["publishes"] == str(home / "quantize")
    workflow = shown["olive_workflow"]
    assert workflow["passes"]["quantize"]["type"] == "Rtn"
    assert workflow["input_model"]["model_path"] == str(home / "tiny-model")
    assert workflow["output_dir"].startswith(str(home / "cache" / "tmp" / "quantize-"))
    assert Path(workflow["output_dir"]).parent == Path(shown["paths"]["workdir"])


def test_quantize_dry_run_checks_the_data_as_a_run_does(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "only a prompt"}\n')
    result, _ = dry_run(quantize.command, tmp_path, "--calibration-data", str(bad))
    assert result.exit_code == 2 and "line 1: missing field(s) response" in result.output
    assert list(tmp_path.iterdir()) == [bad]


def test_finetune_dry_run_needs_quantize_as_a_run_does(tmp_path):
    result, _ = dry_run(finetune.command, tmp_path)
    assert result.exit_code == 2 and "run `olivepress quantize` first" in result.output


def test_finetune_dry_run_prints_the_job_file_the_processes_would_read(upstream_home):
    before = snapshot(upstream_home)
    result, shown = dry_run(finetune.command, upstream_home, "--processes", "2", "--max-steps", "7")
    assert result.exit_code == 0, result.output
    assert snapshot(upstream_home) == before
    assert shown["parameters"]["max_steps"] == 7 and shown["parameters"]["processes"] == 2
    lora = shown["olive_workflow"]["passes"]["lora"]
    assert lora["type"] == "LoRA" and lora["training_args"]["max_steps"] == 7
    assert shown["olive_workflow"]["input_model"]["model_path"] == str(upstream_home / "quantize" / "dequantized")
    job = shown["job_file"]
    assert job["path"] == str(Path(shown["paths"]["workdir"]) / "job.json")
    assert job["content"]["workflows"][0] == shown["olive_workflow"] and len(job["content"]["workflows"]) == 2


def test_optimize_dry_run_takes_the_block_size_and_layers_from_upstream(upstream_home):
    before = snapshot(upstream_home)
    result, shown = dry_run(optimize.command, upstream_home, "--keep-lm-head")
    assert result.exit_code == 0, result.output
    assert snapshot(upstream_home) == before
    builder = shown["olive_workflow"]["passes"]["builder"]
    assert shown["parameters"]["int4_block_size"] == 32 == builder["int4_block_size"]
    assert builder["int4_nodes_to_exclude"] == ["/lm_head/MatMul", *optimize.lora_matmul_names(3)]
    assert shown["olive_workflow"]["input_model"]["adapter_path"] == str(upstream_home / "finetune" / "adapter")
    assert shown["paths"]["device"] == "cpu"


def test_optimize_dry_run_needs_finetune_as_a_run_does(upstream_home):
    shutil.rmtree(upstream_home / "finetune")
    result, _ = dry_run(optimize.command, upstream_home)
    assert result.exit_code == 2 and "run `olivepress finetune` first" in result.output


@pytest.mark.parametrize("stage", [quantize, finetune, optimize], ids=lambda module: module.command.name)
def test_a_run_runs_the_workflow_its_dry_run_shows(stage, upstream_home, monkeypatch):
    model = upstream_home / "base-model"  # what quantize reads a model's dtype from, before any work
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    args = ["--model", str(model)] if stage is quantize else []
    _, shown = dry_run(stage.command, upstream_home, *args)
    ran = []

    def run_olive_workflow(workflow):
        ran.append(workflow)
        raise RuntimeError("stop before Olive")

    monkeypatch.setattr(common, "run_olive_workflow", run_olive_workflow)
    result = CliRunner().invoke(stage.command, ["--home", str(upstream_home), "--force", *args])
    assert result.exit_code == 1 and "stop before Olive" in result.output and len(ran) == 1
    # The scratch folder's random part is drawn when the run starts.
    scratch_name = re.compile(rf"({stage.command.name}-)[a-z0-9_]{{8}}")
    assert json.loads(scratch_name.sub(r"\1XXXXXXXX", json.dumps(ran[0]))) == shown["olive_workflow"]


def test_with_telemetry_disabled_olive_queues_no_heartbeat(monkeypatch):
    """Olive 0.13.0 queued a heartbeat before reading OLIVE_DISABLE_TELEMETRY, and each stage process then waited
    about 11 s at exit for its exporter to give up on the network."""
    from olive.telemetry import telemetry

    sent = []
    monkeypatch.setenv("OLIVE_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(telemetry, "get_encrypted_device_id_and_status", lambda: sent.append("heartbeat"))
    monkeypatch.setattr(telemetry.Telemetry, "_log_heartbeat", telemetry.Telemetry._log_heartbeat)
    monkeypatch.setattr(telemetry.Telemetry, "_instance", None)
    assert common.skip_olive_heartbeat_when_disabled()
    telemetry.Telemetry()
    assert sent == []
    monkeypatch.setenv("OLIVE_DISABLE_TELEMETRY", "0")
    assert not common.skip_olive_heartbeat_when_disabled()


def test_olive_names_an_input_model_by_its_paths_without_reading_it(monkeypatch, tmp_path):
    """Olive 0.13.0 hashed every byte of a local input model to name it in its own cache, which olivepress keeps
    per run; the name now comes from the paths: stable for one model, different for another."""
    from olive.model.config.model_config import ModelConfig

    current = ModelConfig.get_model_identifier  # Olive's own, unless a stage run in this process patched it
    monkeypatch.setattr(ModelConfig, "get_model_identifier", getattr(current, "olive_original", current))
    read = []
    monkeypatch.setattr("olive.model.config.model_config.hash_file", lambda *a, **k: read.append(a) or "0" * 64)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "b").mkdir()

    def model_id(path):
        return ModelConfig.from_json({"type": "HfModel", "config": {"model_path": str(path)}}).get_model_id()

    model_id(tmp_path / "a")
    assert read, "the original reads the files"
    read.clear()
    assert common.name_olive_input_models_by_path()
    assert model_id(tmp_path / "a") == model_id(tmp_path / "a") != model_id(tmp_path / "b")
    assert read == []
