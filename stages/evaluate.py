"""Held-out loss: mean negative log-likelihood of the response tokens of the held-out rows, and its perplexity.

The same rows, template and token split score every model of a run: the base and quantized models (quantize),
the finetuned model with its adapter (finetune) and the ONNX model with the adapter on and off (optimize, through
onnxruntime-genai).  A row scores the tokens after the template's prompt part, so the numbers say how well each
model answers, not how well it repeats the question.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _prompt_part(template: str) -> str:
    """The template up to the response field: what the model is given before it answers."""
    head, found, _ = template.partition("{response}")
    if not found:
        raise ValueError("the text template has no {response} field to score")
    return head


def split_tokens(encode: Any, rows: list[dict[str, str]], template: str) -> list[tuple[list[int], list[int]]]:  # noqa: ANN401
    """(prompt tokens, response tokens) per row, tokenizing the whole text once so merges match training."""
    pairs = []
    for row in rows:
        prompt_ids = list(encode(_prompt_part(template).format(**row)))
        full_ids = list(encode(template.format(**row)))
        if full_ids[: len(prompt_ids)] != prompt_ids:  # a merge across the boundary: score from the same offset
            prompt_ids = full_ids[: len(prompt_ids)]
        pairs.append((prompt_ids, full_ids[len(prompt_ids) :]))
    return pairs


def summary(total_nll: float, tokens: int) -> dict[str, float]:
    loss = total_nll / tokens
    return {"loss": round(loss, 6), "perplexity": round(math.exp(loss), 4), "tokens": tokens}


def torch_loss(model_dir: Path, rows: list[dict[str, str]], template: str, adapter_dir: Path | None = None) -> dict:
    """Score a Hugging Face model folder (with a PEFT adapter on top if given): in bfloat16 on a GPU (half the
    memory of float32, and what the GPU trains in), in float32 on a CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    total, count = 0.0, 0
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    with torch.no_grad():
        for prompt_ids, response_ids in split_tokens(encode, rows, template):
            ids = torch.tensor([prompt_ids + response_ids], device=device)
            logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, len(prompt_ids) :], reduction="sum")
            total, count = total + nll.item(), count + len(response_ids)
    return summary(total, count)


def onnx_loss(folder: Path, rows: list[dict[str, str]], template: str, adapter: str) -> dict:
    """Score an optimize-layout folder through onnxruntime-genai: each row in one forward pass, reading the logits
    of every position (the model's ``logits`` output) that predicts a response token."""
    import numpy as np

    from runtime.engine import Engine

    engine = Engine(folder)
    total, count = 0.0, 0
    for prompt_ids, response_ids in split_tokens(engine.tokenizer.encode, rows, template):
        ids = prompt_ids + response_ids
        generator = engine.new_generator(adapter, len(ids) + 1)
        generator.append_tokens(ids)
        logits = np.asarray(generator.get_output("logits"), dtype=np.float64)[0, len(prompt_ids) - 1 : -1]
        top = logits.max(axis=-1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
        total += float((log_norm - logits[np.arange(len(response_ids)), response_ids]).sum())
        count += len(response_ids)
    return summary(total, count)
