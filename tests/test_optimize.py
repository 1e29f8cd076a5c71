"""stages.optimize: the ONNX model computes what PyTorch + PEFT compute, and the adapter is switchable."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import olivepress

from contract import volume
from contract.exits import BadInput
from stages import optimize

PROMPT = "<|user|>\nWhere should I go in Italy?<|end|>\n<|assistant|>\n"


def onnx_last_logits(folder, adapter):
    import onnxruntime_genai as og

    model = og.Model(str(folder / "model"))
    ids = list(og.Tokenizer(model).encode(PROMPT))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1)
    generator = og.Generator(model, params)
    if adapter:
        adapters = og.Adapters(model)
        adapters.load(str(folder / "adapters" / f"{adapter}.onnx_adapter"), adapter)
        generator.set_active_adapter(adapters, adapter)
    generator.append_tokens(ids)
    return np.array(generator.get_logits())[0, -1], ids


def torch_last_logits(home, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(home / "quantize" / "dequantized", dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(torch.tensor([ids])).logits[0, -1].numpy()
        tuned = PeftModel.from_pretrained(base, home / "finetune" / "adapter").eval()(torch.tensor([ids]))
    return plain, tuned.logits[0, -1].numpy()


def relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def optimize_a_copy(tiny_run, home, *options):
    """optimize with other options on a copy of the tiny run's quantize and finetune stages."""
    for stage in ("quantize", "finetune"):
        shutil.copytree(tiny_run / stage, home / stage)
    result = CliRunner().invoke(optimize.command, ["--home", str(home), *options])
    assert result.exit_code == 0, result.output
    return home


@pytest.fixture(scope="module")
def fp32_home(tiny_run, tmp_path_factory):
    return optimize_a_copy(tiny_run, tmp_path_factory.mktemp("fp32"), "--precision", "fp32")


def test_fp32_export_matches_pytorch_with_and_without_the_adapter(fp32_home):
    off, ids = onnx_last_logits(fp32_home / "optimize", None)
    on, _ = onnx_last_logits(fp32_home / "optimize", "travel")
    torch_off, torch_on = torch_last_logits(fp32_home, ids)
    assert relative(off, torch_off) < 1e-4
    assert relative(on, torch_on) < 1e-4
    assert relative(torch_on, torch_off) > 1e-3, "the adapter does not change the logits"
    onnx_figures = volume.read_manifest(fp32_home / "optimize")["metrics"]
    torch_figures = volume.read_manifest(fp32_home / "finetune")["metrics"]
    assert abs(onnx_figures["onnx_adapter"]["loss"] - torch_figures["finetuned"]["loss"]) < 1e-4


def test_int4_model_stays_close_and_the_adapter_moves_its_logits(tiny_run):
    off, ids = onnx_last_logits(tiny_run / "optimize", None)
    on, _ = onnx_last_logits(tiny_run / "optimize", "travel")
    torch_off, torch_on = torch_last_logits(tiny_run, ids)
    # int4 blocks re-quantize the already-quantized weights; on random weights that costs a few percent.
    assert relative(off, torch_off) < 0.15
    assert relative(on, torch_on) < 0.15
    assert relative(on, off) > 1e-3


def test_keeping_the_output_projection_float_brings_int4_closer(tiny_run, tmp_path):
    optimize_a_copy(tiny_run, tmp_path, "--keep-lm-head")
    off, ids = onnx_last_logits(tmp_path / "optimize", None)
    torch_off, _ = torch_last_logits(tmp_path, ids)
    default_off, _ = onnx_last_logits(tiny_run / "optimize", None)
    assert relative(off, torch_off) < 0.08 < relative(default_off, torch_off) + 0.08
    assert relative(off, torch_off) < relative(default_off, torch_off)


def test_manifest_records_the_grid_and_the_adapter_name(tiny_run):
    manifest = volume.read_manifest(tiny_run / "optimize")
    assert manifest["parameters"]["int4_block_size"] == 128  # the quantize stage's group size
    assert manifest["adapters"] == ["travel"]


def test_optimize_before_finetune_says_what_to_run(tmp_path, tiny_run):
    shutil.copytree(tiny_run / "quantize", tmp_path / "quantize")
    result = CliRunner().invoke(optimize.command, ["--home", str(tmp_path)])
    assert result.exit_code == 2 and "run `olivepress finetune` first" in result.output


def test_switchable_adapter_weights_stay_float_so_the_runtime_can_prepack_the_base(tiny_run):
    import onnx

    graph = onnx.load(str(tiny_run / "optimize" / "model" / "model.onnx"), load_external_data=False).graph
    lora = [node for node in graph.node if "/lora_" in node.name]
    assert lora and all(node.op_type == "MatMul" for node in lora), {node.op_type for node in lora}
    assert any(node.op_type == "MatMulNBits" for node in graph.node)


@pytest.fixture(scope="module")
def merged_home(tiny_run, tmp_path_factory):
    return optimize_a_copy(tiny_run, tmp_path_factory.mktemp("merged"), "--adapter-mode", "merged")


def test_merged_build_answers_as_the_adapter_and_keeps_what_finetuning_learned(merged_home, tiny_run):
    from contract.model_folder import BASE
    from runtime.engine import Engine

    engine = Engine(merged_home / "optimize")
    assert engine.names == ["travel"] and not engine.has_base
    assert not list((merged_home / "optimize" / "adapters").iterdir())
    with pytest.raises(BadInput, match="merged in"):
        engine.new_generator(BASE, 8)
    merged, ids = onnx_last_logits(merged_home / "optimize", None)
    switchable, _ = onnx_last_logits(tiny_run / "optimize", "travel")
    base, _ = onnx_last_logits(tiny_run / "optimize", None)
    assert relative(merged, switchable) < relative(base, switchable) / 2
    merged_loss = volume.read_manifest(merged_home / "optimize")["metrics"]["onnx_adapter"]["loss"]
    quantized_loss = volume.read_manifest(tiny_run / "quantize")["metrics"]["quantized"]["loss"]
    assert merged_loss < quantized_loss - 0.01, "the merged build lost the fine-tune"


def test_a_per_channel_quantize_gets_the_closest_block_size_the_builder_takes(tmp_path):
    olivepress("quantize", "--algorithm", "rtn", "--group-size", "-1", "--no-evaluate", home=tmp_path)
    olivepress("finetune", "--max-steps", "1", "--no-evaluate", home=tmp_path)
    result = olivepress("optimize", "--dry-run", home=tmp_path)
    assert json.loads(result.stdout)["olive_workflow"]["passes"]["builder"]["int4_block_size"] == 256
    assert optimize.block_size_for(128) == 128 and optimize.block_size_for(100) == 64


def test_quantize_refuses_group_sizes_it_cannot_pack(tmp_path):
    for args in (["--group-size", "0"], ["--group-size", "-1", "--algorithm", "awq"]):
        result = olivepress("quantize", "--dry-run", *args, home=tmp_path, check=False)
        assert result.returncode == 2 and "--group-size" in result.stderr, result.stderr


def test_q_k_and_v_are_fused_back_with_one_lora_and_compute_what_the_builder_wrote(tiny_run, tmp_path):
    """The builder's split q/k/v (three int4 matmuls, three LoRA branches) against fuse_qkv_lora's one of each:
    the same logits and held-out loss, adapter on and off."""
    import onnx

    from stages import common
    from stages import evaluate as evaluate_

    manifest = volume.read_manifest(tiny_run / "optimize")
    base = volume.output(tiny_run, "quantize", "dequantized")
    adapter = volume.output(tiny_run, "finetune", "adapter")
    paths = optimize.Paths(base, adapter, optimize.num_hidden_layers(base), tmp_path / "olive", "cpu")
    split = common.run_olive_workflow(optimize.olive_workflow(manifest["parameters"], paths))
    folder = tmp_path / "split"
    (folder / "adapters").mkdir(parents=True)
    shutil.move(str(next(split.glob("*.onnx_adapter"))), folder / "adapters" / "travel.onnx_adapter")
    shutil.move(str(split), folder / "model")

    def graph(f):
        return onnx.load(str(f / "model" / "model.onnx"), load_external_data=False).graph

    layers = paths.num_layers
    split_graph, fused_graph = graph(folder), graph(tiny_run / "optimize")

    def count(g, match):
        return sum(1 for n in g.node if match(n))

    int4 = lambda n: n.op_type == "MatMulNBits"  # noqa: E731
    lora_a = lambda n: "lora_A" in n.name  # noqa: E731
    assert count(split_graph, int4) - count(fused_graph, int4) == 2 * layers  # three matmuls became one per layer
    assert count(split_graph, lora_a) - count(fused_graph, lora_a) == 2 * layers
    attention = [n for n in fused_graph.node if n.op_type == "GroupQueryAttention"]
    assert all(list(n.input[1:3]) == ["", ""] for n in attention)  # packed q|k|v
    for name in (None, "travel"):
        split_logits, _ = onnx_last_logits(folder, name)
        fused_logits, _ = onnx_last_logits(tiny_run / "optimize", name)
        assert relative(fused_logits, split_logits) < 1e-6
    rows = [json.loads(line) for line in volume.output(tiny_run, "finetune", "heldout").read_text().splitlines()]
    template = volume.read_manifest(tiny_run / "finetune")["parameters"]["text_template"]
    split_losses = evaluate_.onnx_losses(folder, rows, template, ["travel", "base"])
    for key, name in (("onnx_adapter", "travel"), ("onnx_base", "base")):
        assert abs(manifest["metrics"][key]["loss"] - split_losses[name]["loss"]) < 1e-5


def test_the_builder_without_random_initialisation_writes_the_same_files(tiny_run, tmp_path, monkeypatch):
    """The tiny run built its ONNX model with new Linear layers left uninitialized; without that patch the files
    are byte for byte the same."""
    import torch

    original = torch.nn.Linear.reset_parameters
    with optimize.builder_linear_layers_uninitialized() as patched:
        assert patched and torch.nn.Linear.reset_parameters is not original
    assert torch.nn.Linear.reset_parameters is original
    monkeypatch.setattr(optimize, "BUILDER_PATCHED_VERSION", "another")
    optimize_a_copy(tiny_run, tmp_path, "--no-evaluate")
    assert (
        volume.read_manifest(tmp_path / "optimize")["outputs"] == volume.read_manifest(tiny_run / "optimize")["outputs"]
    )
