"""contract.families: every decoder family in the table goes through every stage, as the Phi-3 tests check it.

The fast tests build each family's tiny model and check its config, tokenizer and chat template against the table,
and that a model no family takes is refused before anything is fetched. The slow ones run the tiny pipeline of each
family (`olivepress run --model tiny:NAME`) and check fidelity as tests/test_optimize.py does for Phi-3: the fp32
export matches PyTorch + PEFT, the int4 held-out loss stays within tolerance, the adapter moves the logits, the
family's stop tokens end generation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, olivepress

from contract import families, volume
from contract.model_folder import BASE
from stages import optimize, quantize, tiny_model
from tests.test_evaluate import INT4_TOLERANCE
from tests.test_optimize import relative
from tests.test_quantize import write_awq_checkpoint

PIPELINE_STEPS = "3"
# Smaller than the defaults where only time is saved (about 700 held-out tokens still score every model): the
# families' runs check wiring and fidelity.
PIPELINE_SETTINGS = {
    "OLIVEPRESS_QUANTIZE_CALIBRATION_SAMPLES": "16",
    "OLIVEPRESS_QUANTIZE_MAX_SEQ_LEN": "256",
    "OLIVEPRESS_FINETUNE_MAX_SEQ_LEN": "256",
    "OLIVEPRESS_QUANTIZE_HELDOUT_FRACTION": "0.05",
    "OLIVEPRESS_FINETUNE_HELDOUT_FRACTION": "0.05",
    "OLIVEPRESS_INFER_MAX_NEW_TOKENS": "8",
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Every family's tiny model, with a small vocabulary (seconds each); not of 512 tokens, the MLP's width, which
    the model builder would take for the output projection (make-tiny-model --vocab-size says why)."""
    root = tmp_path_factory.mktemp("tiny-models")
    for name in families.NAMES:
        tiny_model.build(root / name, tiny_model.data.DEFAULT_DATA, 1024, 0, None, name)
    return root


@pytest.mark.parametrize("name", families.NAMES)
def test_the_tiny_model_has_the_family_class_layout_and_stop_tokens(tiny_models, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family = families.BY_NAME[name]
    config = json.loads((tiny_models / name / "config.json").read_text())
    assert config["architectures"] == [family.architecture] and config["model_type"] == family.model_type
    assert families.of_config(config) is family
    tokenizer = AutoTokenizer.from_pretrained(tiny_models / name)
    stop_ids = tokenizer.convert_tokens_to_ids(list(family.stop_tokens))
    assert config["eos_token_id"] == stop_ids and tokenizer.convert_ids_to_tokens(stop_ids) == list(family.stop_tokens)
    assert all(len(tokenizer.tokenize(token)) == 1 for token in family.tokens.special)
    model = AutoModelForCausalLM.from_pretrained(tiny_models / name)
    assert type(model).__name__ == family.architecture
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == family.tiny_config["tie_word_embeddings"]
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(family.projections) <= names, names
    has_biases = any(m.bias is not None and m.bias.abs().sum() > 0 for m in linear)
    assert has_biases == family.tiny_random_biases


@pytest.mark.parametrize("name", families.NAMES)
def test_a_row_renders_as_the_chat_template_renders_one_turn(tiny_models, name):
    """What quantize calibrates on and finetune trains on is what infer, serve and chat feed the model."""
    from transformers import AutoTokenizer

    family = families.BY_NAME[name]
    tokenizer = AutoTokenizer.from_pretrained(tiny_models / name)
    prompt, response = "Where to in Rome?", "The Forum, at dawn."
    row = family.text_template.format(prompt=prompt, response=response)
    asked = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    answered = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
    )
    assert row.startswith(asked) and answered.startswith(row)
    assert row.endswith(family.stop_tokens[0]), "a row ends on the token that ends the assistant's turn"


@pytest.mark.parametrize("name", families.NAMES)
def test_an_autoawq_checkpoint_of_the_family_dequantizes_to_the_values_it_packs(tiny_models, name, tmp_path):
    """AWQ runs on a GPU only; its packing does not: fused or separate projections, biases, tied embeddings."""
    from transformers import AutoModelForCausalLM

    expected = write_awq_checkpoint(tiny_models / name, tmp_path / "awq")
    quantize.dequantize(tmp_path / "awq", tmp_path / "plain", "float32")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(tiny_models / name, dtype=torch.float32)
    modules, originals = dict(plain.named_modules()), dict(original.named_modules())
    assert {n.rsplit(".", 1)[-1] for n in expected} == set(families.BY_NAME[name].projections)
    for layer, values in expected.items():
        assert torch.allclose(modules[layer].weight, values, rtol=1e-3, atol=1e-6), layer
        if originals[layer].bias is not None:
            assert torch.equal(modules[layer].bias, originals[layer].bias), layer
    assert torch.equal(plain.get_output_embeddings().weight, original.get_output_embeddings().weight)
    tied = plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
    assert tied == families.BY_NAME[name].tiny_config["tie_word_embeddings"]


def test_tiny_phi3_is_the_default_tiny_model_and_unknown_names_are_refused(tmp_path):
    assert tiny_model.architecture_of("tiny") == tiny_model.architecture_of("tiny:phi3") == "phi3"
    assert volume.tiny_model_dir(tmp_path, "phi3") == volume.tiny_model_dir(tmp_path) == tmp_path / "tiny-model"
    assert volume.tiny_model_dir(tmp_path, "llama") == tmp_path / "tiny-model-llama"
    assert tiny_model.architecture_of("microsoft/Phi-3.5-mini-instruct") is None
    result = CliRunner().invoke(quantize.command, ["--home", str(tmp_path), "--model", "tiny:falcon"])
    assert result.exit_code == 2 and "no tiny model 'falcon'" in result.output and "qwen2" in result.output


def test_make_tiny_model_builds_a_family_into_its_own_folder(tmp_path):
    result = CliRunner().invoke(tiny_model.main, ["--architecture", "mistral", "--home", str(tmp_path)])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "tiny-model-mistral" / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and not (tmp_path / "tiny-model").exists()
    other = tmp_path / "phi3.json"
    other.write_text(json.dumps({"model_type": "phi3", "hidden_size": 128}))
    result = CliRunner().invoke(
        tiny_model.main, ["--architecture", "llama", "--config", str(other), "--output", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "is a phi3 config; --architecture llama builds llama models" in result.output


def test_phi4_mini_and_phi3_share_a_model_type_and_are_told_apart():
    phi4 = {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "partial_rotary_factor": 0.75}
    assert families.of_config(phi4).name == "phi4-mini"
    assert families.of_config({**phi4, "partial_rotary_factor": 1.0}).name == "phi3"
    assert families.of_config({"model_type": "phi3"}).name == "phi3"


def test_a_family_no_component_can_take_is_refused_naming_the_component_and_version():
    with pytest.raises(families.UnsupportedModel) as refused:
        families.of_config({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}, "acme/moe")
    message = refused.value.message
    assert "acme/moe is a mixtral model (MixtralForCausalLM)" in message
    assert "onnxruntime-genai 0.14.1's model builder cannot export MixtralForCausalLM" in message
    assert "llama (Llama 3)" in message and "gemma2 (Gemma 2)" in message
    with pytest.raises(families.UnsupportedModel, match="lists Qwen3ForCausalLM, but olivepress has not verified"):
        families.of_config({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]})


def test_a_component_a_family_refuses_stops_the_stage_before_any_work(tmp_path, monkeypatch):
    import dataclasses

    why = "Olive 0.13's Rtn cannot; Olive 0.14 would be needed"
    refusing = dataclasses.replace(families.BY_NAME["llama"], refused={"rtn": why})
    monkeypatch.setattr(families, "BY_NAME", {**families.BY_NAME, "llama": refusing})
    args = ["--home", str(tmp_path), "--model", "tiny:llama", "--algorithm", "rtn"]
    result = CliRunner().invoke(quantize.command, args)
    assert result.exit_code == 2 and f"rtn cannot take Llama 3 models: {why}" in result.output
    assert not list(tmp_path.iterdir())


def fake_hub_model(hf_home: Path, repo: str, config: dict) -> None:
    """A hub model in the Hugging Face cache as a download of config.json alone leaves it: no weights."""
    cache = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    revision = "0" * 40
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(revision)
    (cache / "snapshots" / revision).mkdir(parents=True)
    (cache / "snapshots" / revision / "config.json").write_text(json.dumps(config))


def test_run_of_an_unsupported_hub_model_says_so_from_its_config_alone(tmp_path):
    hf_home = tmp_path / "hf"
    fake_hub_model(hf_home, "acme/moe-8x1b", {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]})
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    result = olivepress("run", "--model", "acme/moe-8x1b", home=tmp_path / "home", env=env, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "quantize failed" in result.stderr and "cannot export MixtralForCausalLM" in result.stderr
    assert not (tmp_path / "home" / "quantize").exists()


def test_a_dry_run_names_the_family_and_takes_its_template_without_building_anything(tmp_path):
    result = CliRunner().invoke(quantize.command, ["--home", str(tmp_path), "--model", "tiny:gemma2", "--dry-run"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["family"] == "gemma2" and report["builds_tiny_model_in"] == str(tmp_path / "tiny-model-gemma2")
    assert report["parameters"]["text_template"] == families.BY_NAME["gemma2"].text_template
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_gemma2_builds_agree_with_pytorch_only_up_to_the_sliding_window(tiny_models, tmp_path):
    """Why optimize caps a Gemma 2 model's context at its sliding window (contract.families' context_limit).

    The builder slides the odd layers and transformers the even ones. If this fails, a newer builder agrees beyond
    the window: the cap can go.
    """
    import onnxruntime_genai as og
    from onnxruntime_genai.models.builder import create_model
    from transformers import AutoModelForCausalLM

    model = tmp_path / "gemma2"
    shutil.copytree(tiny_models / "gemma2", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "sliding_window": 8}))
    create_model("gemma2", str(model), str(tmp_path / "onnx"), "fp32", "cpu", str(tmp_path / "cache"))
    torch_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    onnx_model = og.Model(str(tmp_path / "onnx"))
    gaps = {}
    for length in (8, 12):
        ids = list(range(10, 10 + length))
        with torch.no_grad():
            expected = torch_model(torch.tensor([ids])).logits[0, -1].numpy()
        params = og.GeneratorParams(onnx_model)
        params.set_search_options(max_length=length + 1)
        generator = og.Generator(onnx_model, params)
        generator.append_tokens(ids)
        gaps[length] = relative(np.array(generator.get_logits())[0, -1], expected)
    assert gaps[8] < 1e-4 and gaps[12] > 0.1, gaps


def test_the_readme_models_table_is_the_family_table():
    assert families.markdown() in (REPO / "README.md").read_text()


# ---------------------------------------------------------------------------------------------------------------
# The tiny pipeline of each family.


@pytest.fixture(scope="module", params=families.NAMES)
def family_run(request, tmp_path_factory):
    """(family, the volume after `olivepress run --model tiny:NAME`); Phi-3's is the tiny run every module shares."""
    family = families.BY_NAME[request.param]
    if family.name == families.DEFAULT:
        return family, request.getfixturevalue("tiny_run")
    home = tmp_path_factory.mktemp(f"run-{family.name}")
    model = f"tiny:{family.name}"
    olivepress("run", "--model", model, "--max-steps", PIPELINE_STEPS, home=home, env=PIPELINE_SETTINGS)
    return family, home


def copy_and_optimize(home: Path, into: Path, *options: str) -> Path:
    for stage in ("quantize", "finetune"):
        shutil.copytree(home / stage, into / stage)
    result = CliRunner().invoke(optimize.command, ["--home", str(into), *options])
    assert result.exit_code == 0, result.output
    return into / "optimize"


def onnx_last_logits(folder: Path, adapter: str | None, prompt: str = "Where should I go in Italy?"):
    from runtime.engine import Engine

    engine = Engine(folder)
    ids = engine.prompt_tokens(prompt)
    generator = engine.new_generator(adapter or BASE, len(ids) + 1)
    generator.append_tokens(ids)
    return np.array(generator.get_logits())[0, -1], ids


def torch_last_logits(home: Path, ids: list[int]):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(home / "quantize" / "dequantized", dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(torch.tensor([ids])).logits[0, -1].numpy()
        tuned = PeftModel.from_pretrained(base, home / "finetune" / "adapter").eval()(torch.tensor([ids]))
    return plain, tuned.logits[0, -1].numpy()


def metric(home: Path, stage: str, key: str) -> float:
    return volume.read_manifest(home / stage)["metrics"][key]["loss"]


@pytest.mark.slow
def test_each_stage_took_the_family_defaults(family_run):
    family, home = family_run
    quantized = volume.read_manifest(home / "quantize")
    assert quantized["parameters"]["text_template"] == family.text_template
    adapter = json.loads((home / "finetune" / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == sorted(family.lora_targets)
    assert volume.read_manifest(home / "finetune")["parameters"]["text_template"] == family.text_template
    answers = json.loads((home / "infer" / "answers.json").read_text())
    assert {a["adapter"] for a in answers} == {BASE, "travel"}


@pytest.mark.slow
def test_the_onnx_context_ends_where_the_build_stops_computing_what_the_model_does(family_run):
    family, home = family_run
    config = json.loads((home / "quantize" / "dequantized" / "config.json").read_text())
    genai = json.loads((home / "optimize" / "model" / "genai_config.json").read_text())
    context = config["max_position_embeddings"]
    if family.context_limit:
        context = min(context, config[family.context_limit])
        assert context < config["max_position_embeddings"], "the tiny model does not exercise the limit"
    assert genai["model"]["context_length"] == genai["search"]["max_length"] == context


@pytest.mark.slow
def test_the_dequantized_model_computes_what_the_quantized_kernels_do(family_run):
    from olive.common.hf.utils import load_model_from_task
    from transformers import AutoModelForCausalLM

    _, home = family_run
    quantized = load_model_from_task("text-generation", str(home / "quantize" / "model"), dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(home / "quantize" / "dequantized", dtype=torch.float32)
    ids = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q, p = (m.eval()(ids).logits for m in (quantized, plain))
    assert "QuantLinear" in str(quantized) and "QuantLinear" not in str(plain)
    assert torch.allclose(p, q, atol=1e-5), "dequantized model differs from the quantized kernels"


@pytest.mark.slow
def test_rtn_quantizes_the_family_and_dequantizes_faithfully(family_run, tmp_path):
    from olive.common.hf.utils import load_model_from_task
    from transformers import AutoModelForCausalLM

    family, home = family_run
    tiny_folder = volume.tiny_model_dir(home, family.name)
    shutil.copytree(tiny_folder, volume.tiny_model_dir(tmp_path, family.name))
    args = ["--home", str(tmp_path), "--model", f"tiny:{family.name}", "--algorithm", "rtn", "--no-evaluate"]
    result = CliRunner().invoke(quantize.command, args)
    assert result.exit_code == 0, result.output
    quantized = load_model_from_task("text-generation", str(tmp_path / "quantize" / "model"), dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "quantize" / "dequantized", dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32)
    ids = torch.randint(0, 2000, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        q, p, o = (m.eval()(ids).logits for m in (quantized, plain, original))
    assert torch.allclose(p, q, atol=1e-5)
    assert not torch.allclose(o, q, atol=1e-4), "quantization changed nothing: was it applied?"


@pytest.mark.slow
def test_the_fp32_export_matches_pytorch_with_and_without_the_adapter(family_run, tmp_path):
    _, home = family_run
    fp32 = copy_and_optimize(home, tmp_path, "--precision", "fp32")
    off, ids = onnx_last_logits(fp32, None)
    on, _ = onnx_last_logits(fp32, "travel")
    torch_off, torch_on = torch_last_logits(tmp_path, ids)
    assert relative(off, torch_off) < 1e-4
    assert relative(on, torch_on) < 1e-4
    assert relative(torch_on, torch_off) > 1e-4, "the adapter does not change the logits"
    assert abs(metric(tmp_path, "optimize", "onnx_adapter") - metric(home, "finetune", "finetuned")) < 1e-4
    assert abs(metric(tmp_path, "optimize", "onnx_base") - metric(home, "quantize", "quantized")) < 1e-4


@pytest.mark.slow
def test_the_int4_model_scores_like_pytorch_and_the_adapter_moves_its_logits(family_run):
    _, home = family_run
    assert abs(metric(home, "optimize", "onnx_adapter") - metric(home, "finetune", "finetuned")) < INT4_TOLERANCE
    assert abs(metric(home, "optimize", "onnx_base") - metric(home, "quantize", "quantized")) < INT4_TOLERANCE
    off, _ = onnx_last_logits(home / "optimize", None)
    on, _ = onnx_last_logits(home / "optimize", "travel")
    assert relative(on, off) > 1e-4


@pytest.mark.slow
def test_every_lora_target_has_a_float_branch_in_the_switchable_build(family_run):
    import onnx

    family, home = family_run
    graph = onnx.load(str(home / "optimize" / "model" / "model.onnx"), load_external_data=False).graph
    lora = [node for node in graph.node if "/lora_" in node.name]
    assert lora and all(node.op_type == "MatMul" for node in lora), {node.op_type for node in lora}
    # Every branch is one the int4 exclude list names (none was quantized by a name the list missed), or the one
    # branch fuse_qkv_lora makes of q, k and v.
    layers = family.tiny_config["num_hidden_layers"]
    fused = {f"/model/layers.{i}/attn/qkv_proj/lora_{ab}/MatMul" for i in range(layers) for ab in "AB"}
    assert {node.name for node in lora} <= set(optimize.lora_matmul_names(layers)) | fused
    # The builder splits Phi-3's fused qkv_proj per part and fuse_qkv_lora joins it back: one branch per target.
    assert {node.name.split("/")[4] for node in lora} == set(family.lora_targets)


@pytest.mark.slow
def test_a_merged_build_keeps_the_fine_tune(family_run, tmp_path):
    from runtime.engine import Engine

    _, home = family_run
    merged = copy_and_optimize(home, tmp_path, "--adapter-mode", "merged")
    assert Engine(merged).names == ["travel"]
    merged_loss = metric(tmp_path, "optimize", "onnx_adapter")
    assert abs(merged_loss - metric(home, "finetune", "finetuned")) < INT4_TOLERANCE
    on, _ = onnx_last_logits(merged, "travel")
    switchable, _ = onnx_last_logits(home / "optimize", "travel")
    base, _ = onnx_last_logits(home / "optimize", None)
    assert relative(on, switchable) < relative(base, switchable)


@pytest.mark.slow
def test_prompts_go_through_the_family_chat_template(family_run):
    from transformers import AutoTokenizer

    from runtime.engine import Engine

    _, home = family_run
    engine = Engine(home / "optimize")
    tokenizer = AutoTokenizer.from_pretrained(home / "quantize" / "dequantized")
    messages = [{"role": "user", "content": "Where to in Spain?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert engine.chat_tokens(messages) == tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_the_family_stop_tokens_end_generation(family_run):
    """A greedy step whose logits make a stop token the choice ends generation; any other token does not."""
    from runtime.engine import Engine

    family, home = family_run
    engine = Engine(home / "optimize")
    stop_ids = [engine.tokenizer.encode(token)[0] for token in family.stop_tokens]
    assert set(stop_ids) <= engine.eos_token_ids
    ordinary = engine.tokenizer.encode("Rome")[0]
    for token, stops in [*((i, True) for i in stop_ids), (ordinary, False)]:
        generator = engine.new_generator(BASE, 64)
        generator.append_tokens(engine.prompt_tokens("Where to?"))
        logits = np.full_like(np.asarray(generator.get_logits(), dtype=np.float32), -10.0)
        logits[0, -1, token] = 10.0
        generator.set_logits(logits)
        generator.generate_next_token()
        assert int(generator.get_next_tokens()[0]) == token and generator.is_done() == stops, (token, stops)


@pytest.mark.slow
def test_a_template_that_refuses_a_conversation_is_a_clear_400(family_run):
    from runtime.engine import Engine, RefusedConversation
    from runtime.openai_api import ApiError, Service

    family, home = family_run
    if family.name != "gemma2":
        pytest.skip("only Gemma's template has no system role")
    engine = Engine(home / "optimize")
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with pytest.raises(RefusedConversation, match="System role not supported"):
        engine.chat_tokens(conversation)
    with pytest.raises(ApiError) as error:
        Service(engine).prepare({"model": "travel", "messages": conversation})
    assert error.value.status == 400 and error.value.param == "messages"
