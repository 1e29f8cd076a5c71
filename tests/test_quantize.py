"""stages.quantize: CPU quantizers through Olive, a faithful dequantized model, clear refusals."""

from __future__ import annotations

import json
import shutil

import torch
from click.testing import CliRunner

from contract import volume
from stages import quantize


def invoke(home, *args):
    return CliRunner().invoke(quantize.command, ["--home", str(home), *args])


def test_dequantized_model_computes_what_the_quantized_one_does(tiny_run):
    from olive.common.hf.utils import load_model_from_task
    from transformers import AutoModelForCausalLM

    quantized = load_model_from_task("text-generation", str(tiny_run / "quantize" / "model"), dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(tiny_run / "quantize" / "dequantized", dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(tiny_run / "tiny-model", dtype=torch.float32)
    ids = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q, p, o = (m.eval()(ids).logits for m in (quantized, plain, original))
    assert "QuantLinear" in str(quantized) and "QuantLinear" not in str(plain)
    assert torch.allclose(p, q, atol=1e-5), "dequantized model differs from the quantized kernels"
    assert not torch.allclose(o, q, atol=1e-3), "quantization changed nothing: was it applied?"


def test_rtn_runs_on_cpu_without_calibration_data(tmp_path):
    result = invoke(
        tmp_path, "--algorithm", "rtn", "--no-evaluate", "--calibration-data", str(tmp_path / "not-needed.jsonl")
    )
    assert result.exit_code == 0, result.output
    manifest = volume.read_manifest(tmp_path / "quantize")
    assert manifest["parameters"]["algorithm"] == "rtn" and "calibration_data" not in manifest["inputs"]
    assert (tmp_path / "quantize" / "dequantized" / "tokenizer.json").is_file()


def test_awq_without_a_gpu_names_the_cpu_algorithms(tmp_path):
    result = invoke(tmp_path, "--algorithm", "awq")
    assert result.exit_code == 2
    assert "needs a CUDA GPU" in result.output and "gptq, rtn" in result.output
    assert not (tmp_path / "quantize").exists()


def test_bad_calibration_data_stops_before_any_compute(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "only a prompt"}\n')
    result = invoke(tmp_path, "--calibration-data", str(bad))
    assert result.exit_code == 2 and "line 1: missing field(s) response" in result.output
    assert not (tmp_path / "tiny-model").exists(), "work started before the data was checked"


def write_awq_checkpoint(model_dir, out, group_size=128):
    """Pack a float model's decoder linears with AutoAWQ's own GEMM packing, as Olive's AWQ pass saves them.

    Returns the weights the packed values stand for, per layer name, to check the dequantizer against.
    """
    import json

    from awq.modules.linear.gemm import WQLinear_GEMM
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state, expected = {}, {}
    for name, tensor in model.state_dict().items():
        state[name] = tensor.contiguous()
    if model.config.tie_word_embeddings:  # saved once, as AutoAWQ's save_pretrained saves it
        state.pop("lm_head.weight", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            w = module.weight.data
            groups = w.reshape(-1, group_size)
            low, high = groups.min(1, keepdim=True).values, groups.max(1, keepdim=True).values
            scales = ((high - low).clamp(min=1e-5) / 15).half().float()
            zeros = (-torch.round(low / scales)).clamp(0, 15)
            q = (torch.round(groups / scales) + zeros).clamp(0, 15)
            expected[name] = ((q - zeros) * scales).reshape(w.shape)
            module.weight.data = expected[name]  # AutoAWQ packs the fake-quantized weights, as here
            packed = WQLinear_GEMM.from_linear(
                module, 4, group_size, scales=scales.view(w.shape[0], -1).t(), zeros=zeros.view(w.shape[0], -1).t()
            )
            del state[f"{name}.weight"]
            for part in ("qweight", "qzeros", "scales"):
                state[f"{name}.{part}"] = getattr(packed, part).contiguous()
    out.mkdir()
    save_file(state, out / "model.safetensors")
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group_size,
        "version": "gemm",
        "zero_point": True,
    }
    (out / "config.json").write_text(json.dumps(config))
    for file in model_dir.glob("tokenizer*"):
        (out / file.name).write_bytes(file.read_bytes())
    return expected


def test_an_autoawq_gemm_checkpoint_dequantizes_to_the_values_it_packs(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM

    expected = write_awq_checkpoint(tiny_run / "tiny-model", tmp_path / "awq")
    quantize.dequantize(tmp_path / "awq", tmp_path / "plain", "float32")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    weights = dict(plain.named_modules())
    for name, values in expected.items():
        # AutoAWQ multiplies in fp16, as its kernels do: equal to fp16 rounding.
        assert torch.allclose(weights[name].weight, values, rtol=1e-3, atol=1e-6), name
    original = AutoModelForCausalLM.from_pretrained(tiny_run / "tiny-model", dtype=torch.float32)
    assert torch.equal(plain.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert "quantization_config" not in (tmp_path / "plain" / "config.json").read_text()


def test_a_model_that_does_not_load_is_named_before_any_compute(tmp_path):
    (tmp_path / "not-a-model").mkdir()
    result = invoke(tmp_path, "--model", str(tmp_path / "not-a-model"), "--algorithm", "rtn")
    assert result.exit_code == 2
    assert "cannot load model" in result.output and "--model tiny" in result.output
    assert not (tmp_path / "quantize").exists()


def test_chat_rows_on_a_model_without_a_chat_template_stop_before_any_compute(tiny_run, tmp_path):
    model = tmp_path / "no-chat-template"
    shutil.copytree(tiny_run / "tiny-model", model)
    (model / "chat_template.jinja").unlink()
    chats = tmp_path / "chats.jsonl"
    row = {"messages": [{"role": "user", "content": "Where to?"}, {"role": "assistant", "content": "Rome."}]}
    chats.write_text((json.dumps(row) + "\n") * 2)
    result = invoke(tmp_path / "home", "--model", str(model), "--calibration-data", str(chats))
    assert result.exit_code == 2 and "no chat template" in result.output
    assert not (tmp_path / "home" / "quantize").exists()
