"""stages.evaluate: held-out loss at every stage of the tiny run, and what each stage must do to it."""

from __future__ import annotations

import math

from contract import volume
from stages import data, evaluate

# int4 re-quantizes the quantized weights (and the output projection): on the tiny model that moves the
# held-out loss by about 0.003 nats; the bound leaves room for other machines' float rounding.
INT4_TOLERANCE = 0.02


def metrics(home, stage):
    return volume.read_manifest(home / stage)["metrics"]


def test_every_stage_records_loss_and_perplexity_on_the_same_tokens(tiny_run):
    figures = {**metrics(tiny_run, "quantize"), **metrics(tiny_run, "finetune"), **metrics(tiny_run, "optimize")}
    assert set(figures) == {"base", "quantized", "finetuned", "onnx_adapter", "onnx_base"}
    assert len({f["tokens"] for f in figures.values()}) == 1 and figures["base"]["tokens"] > 100
    for f in figures.values():
        assert math.isclose(f["perplexity"], math.exp(f["loss"]), rel_tol=1e-4)


def test_finetuning_lowers_the_heldout_loss_of_the_quantized_model(tiny_run):
    assert (
        metrics(tiny_run, "finetune")["finetuned"]["loss"] < metrics(tiny_run, "quantize")["quantized"]["loss"] - 0.01
    )


def test_onnx_with_the_adapter_scores_like_the_pytorch_finetuned_model(tiny_run):
    onnx = metrics(tiny_run, "optimize")["onnx_adapter"]["loss"]
    assert abs(onnx - metrics(tiny_run, "finetune")["finetuned"]["loss"]) < INT4_TOLERANCE


def test_onnx_without_the_adapter_scores_like_the_quantized_base(tiny_run):
    onnx = metrics(tiny_run, "optimize")["onnx_base"]["loss"]
    assert abs(onnx - metrics(tiny_run, "quantize")["quantized"]["loss"]) < INT4_TOLERANCE


def test_the_split_is_shared_and_heldout_rows_are_on_the_volume(tiny_run):
    quantize_split = volume.read_manifest(tiny_run / "quantize")["split"]
    finetune_split = volume.read_manifest(tiny_run / "finetune")["split"]
    assert quantize_split["heldout_sha256"] == finetune_split["heldout_sha256"]
    rows = (tiny_run / "finetune" / "heldout.jsonl").read_text().splitlines()
    assert len(rows) == finetune_split["heldout_rows"] == 29


def test_scored_tokens_are_the_response_only():
    rows = data.load_dataset(data.DEFAULT_DATA).rows[:3]
    encode = lambda text: [ord(c) for c in text]  # noqa: E731 (a character "tokenizer")
    for row, (prompt, response) in zip(rows, evaluate.split_tokens(encode, rows, data.DEFAULT_TEMPLATE), strict=True):
        assert "".join(map(chr, response)) == row["response"] + "<|end|>"
        assert "".join(map(chr, prompt)).endswith("<|assistant|>\n")
