"""stages.evaluate: held-out loss at every stage of the tiny run, and what each stage must do to it."""

from __future__ import annotations

import json
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
    tokenizer = data.Tokenizer(encode=lambda text: [ord(c) for c in text])  # a character "tokenizer"
    for row, (ids, mask) in zip(rows, evaluate.scored_examples(tokenizer, rows, data.DEFAULT_TEMPLATE), strict=True):
        response = "".join(chr(i) for i, scored in zip(ids, mask, strict=True) if scored)
        prompt = "".join(chr(i) for i, scored in zip(ids, mask, strict=True) if not scored)
        assert response == row["response"] + "<|end|>"
        assert prompt.endswith("<|assistant|>\n") and mask == sorted(mask)


CHAT_ROWS = [
    {
        "messages": [
            {"role": "system", "content": "You are a travel guide."},
            {"role": "user", "content": "Where should I eat in Rome?"},
            {"role": "assistant", "content": "Trastevere, for its trattorias."},
            {"role": "user", "content": "And for dessert?"},
            {"role": "assistant", "content": "Gelato near the Pantheon."},
        ]
    },
    {"messages": [{"role": "user", "content": "Best time for Paris?"}, {"role": "assistant", "content": "Spring."}]},
]


def test_onnxruntime_genai_renders_and_tokenizes_as_training_does(tiny_run):
    """Chat rows through the optimized model's onnxruntime-genai tokenizer and chat template (what infer and serve
    use) give the tokens and the scored positions that the Hugging Face tokenizer gives training."""
    from runtime.engine import Engine

    engine = Engine(tiny_run / "optimize")
    onnx = evaluate.genai_tokenizer(engine)
    torch_side = data.hf_tokenizer(tiny_run / "quantize" / "dequantized")
    heldout = [json.loads(line) for line in (tiny_run / "finetune" / "heldout.jsonl").read_text().splitlines()]
    for rows, template in ((CHAT_ROWS, ""), (heldout, data.DEFAULT_TEMPLATE)):
        assert evaluate.scored_examples(onnx, rows, template) == evaluate.scored_examples(torch_side, rows, template)
    # What serve sends for a conversation is the scored text up to the answer the model is to give.
    for row in CHAT_ROWS:
        ids, mask = data.example(row, "", torch_side)
        asked = engine.chat_tokens(row["messages"][:-1])
        assert ids[: len(asked)] == asked and mask[len(asked)] and not mask[len(asked) - 1]
    prompt, response = heldout[0]["prompt"], heldout[0]["response"]
    asked = engine.prompt_tokens(prompt)
    assert (
        data.example({"prompt": prompt, "response": response}, data.DEFAULT_TEMPLATE, torch_side)[0][: len(asked)]
        == asked
    )
