"""stages.quantize: CPU quantizers through Olive, a faithful dequantized model, clear refusals."""

from __future__ import annotations

import torch
from click.testing import CliRunner

from stages import quantize, volume


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
    result = invoke(tmp_path, "--algorithm", "rtn", "--calibration-data", str(tmp_path / "not-needed.jsonl"))
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
