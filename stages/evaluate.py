"""Held-out loss: mean negative log-likelihood of the answer tokens of the held-out rows, and its perplexity.

The same rows, rendering and token split score every model of a run: the base and quantized models (quantize),
the finetuned model with its adapter (finetune) and the ONNX model with the adapter on and off (optimize, through
onnxruntime-genai).  The answer tokens are the ones training counts (``data.example``): a prompt/response row's
text after its template's prompt part, every assistant turn of a chat row.  So the numbers say how well each model
answers, not how well it repeats the question.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from stages import data

if TYPE_CHECKING:
    from runtime.engine import Engine


def scored_examples(tokenizer: data.Tokenizer, rows: list[dict], template: str) -> list[data.Example]:
    """Each row's tokens and which of them are scored (the answer's; a row's first token has nothing before it)."""
    return [data.example(row, template, tokenizer) for row in rows]


def summary(total_nll: float, tokens: int) -> dict[str, float]:
    loss = total_nll / tokens
    return {"loss": round(loss, 6), "perplexity": round(math.exp(loss), 4), "tokens": tokens}


def torch_loss(model_dir: Path, rows: list[dict], template: str, adapter_dir: Path | None = None) -> dict:
    """Score a Hugging Face model folder (with a PEFT adapter on top if given): in bfloat16 on a GPU (half the
    memory of float32, and what the GPU trains in), in float32 on a CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = data.hf_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in scored_examples(tokenizer, rows, template):
            scored = torch.tensor(mask[1:], device=device)
            tokens = torch.tensor([ids], device=device)
            logits = model(tokens).logits[0, :-1].float()  # position t predicts token t + 1
            nll = torch.nn.functional.cross_entropy(logits[scored], tokens[0, 1:][scored], reduction="sum")
            total, count = total + nll.item(), count + int(scored.sum())
    return summary(total, count)


def genai_tokenizer(engine: Engine) -> data.Tokenizer:
    """An optimized model's own tokenizer and chat template in onnxruntime-genai: what infer and serve send."""

    def chat_template(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return engine.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=add_generation_prompt)

    return data.Tokenizer(engine.tokenizer.encode, chat_template)


def onnx_losses(folder: Path, rows: list[dict], template: str, adapters: list[str]) -> dict[str, dict]:
    """Score an optimize-layout folder through onnxruntime-genai with each of ``adapters`` (``base`` for none), the
    model loaded once: its own tokenizer and chat template (what infer and serve use), each row in one forward pass,
    reading the logits of every position (the model's ``logits`` output) that predicts a scored token."""
    import numpy as np

    from runtime.engine import Engine

    engine = Engine(folder)
    examples = list(scored_examples(genai_tokenizer(engine), rows, template))
    losses = {}
    for adapter in adapters:
        total, count = 0.0, 0
        for ids, mask in examples:
            generator = engine.new_generator(adapter, len(ids) + 1)
            generator.append_tokens(ids)
            logits = np.asarray(generator.get_output("logits"), dtype=np.float64)[0, :-1]  # t predicts token t + 1
            scored = np.asarray(mask[1:], dtype=bool)
            targets = np.asarray(ids[1:])[scored]
            logits = logits[scored]
            top = logits.max(axis=-1, keepdims=True)
            log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
            total += float((log_norm - logits[np.arange(len(targets)), targets]).sum())
            count += len(targets)
        losses[adapter] = summary(total, count)
    return losses
