"""Pretrain a small Phi-3 model on the offline corpus, so the quality benchmark runs on weights that know English.

A byte-level BPE tokenizer (Phi-3's special tokens and chat template, stages/tiny_model.py's) is trained on the
corpus, then a ``Phi3ForCausalLM`` (preset ``small``: hidden 1024, 8 layers of 8 heads of 128, intermediate 2816,
about 120M parameters; every width a multiple of 128 so each int4 block size fits) trains in bfloat16 autocast on
the GPU for a wall-clock budget: AdamW, linear warmup then cosine decay over the budget, documents packed into
full sequences separated by ``<|endoftext|>``. The model is saved in Hugging Face layout (with the tokenizer and a
generation config whose end tokens are ``<|end|>`` and ``<|endoftext|>``) for ``olivepress quantize --model``.
The report (JSON) holds the held-out perplexity on the corpus documents it never trained on, greedy
continuations of a few prompts, the throughput and the loss curve.

    python benchmarks/pretrain.py --corpus .corpus --out /tmp/model --train-seconds 300      # on a GPU
    python benchmarks/pretrain.py --preset tiny --max-steps 5 --seq-len 64 --out /tmp/tiny   # seconds, on a CPU
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.corpus import read_documents  # noqa: E402
from stages.tiny_model import train_tokenizer  # noqa: E402

PRESETS: dict[str, dict[str, int]] = {
    "small": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
    },
    # For tests on a CPU: the tiny model's shapes.
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
    },
}
MAX_POSITIONS = 2048
DOCUMENT_END = "<|endoftext|>"
PROMPTS = (
    "The Linux kernel",
    "In the beginning",
    "To install the package, run",
    "A function is",
    "The best time to visit Paris is",
)


class Clock:
    """Wall-clock seconds of each named phase, in order."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._start = time.perf_counter()

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.phases[name] = round(now - self._start, 2)
        self._start = now
        print(f"pretrain: {name} {self.phases[name]:.1f} s", flush=True)
        return self.phases[name]


def learning_rate(progress: float, peak: float, warmup: float, floor: float) -> float:
    """Linear warmup over the first ``warmup`` of the run, then cosine decay to ``floor`` x peak at its end."""
    if progress < warmup:
        return peak * max(progress, 1e-3) / warmup
    done = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done)))


def token_stream(tokenizer: Any, documents: list[str]) -> Any:  # noqa: ANN401 (a numpy array)
    """Every document's tokens followed by ``<|endoftext|>``, as one uint16 array."""
    import numpy as np

    end = tokenizer.convert_tokens_to_ids(DOCUMENT_END)
    # The Rust tokenizer directly: batched over every core, and no warning about documents longer than a sequence.
    ids = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(documents, add_special_tokens=False)]
    total = sum(len(x) + 1 for x in ids)
    stream = np.empty(total, dtype=np.uint16)
    at = 0
    for x in ids:
        stream[at : at + len(x)] = x
        stream[at + len(x)] = end
        at += len(x) + 1
    return stream


def chunks(stream: Any, seq_len: int, device: str) -> Any:  # noqa: ANN401 (numpy in, torch out)
    """The stream cut into non-overlapping sequences of ``seq_len + 1`` tokens (inputs and shifted labels)."""
    import torch

    count = (len(stream) - 1) // seq_len
    if count < 1:
        raise SystemExit(f"the corpus has {len(stream)} tokens: too few for one sequence of {seq_len}")
    starts = torch.arange(count) * seq_len
    index = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    return torch.from_numpy(stream.astype("int64"))[index].to(device)


def build_model(preset: str, tokenizer: Any, device: str) -> Any:  # noqa: ANN401
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Phi3Config

    end_id, eos_id = tokenizer.convert_tokens_to_ids(["<|end|>", DOCUMENT_END])
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": [end_id, eos_id], "pad_token_id": eos_id}
    config = Phi3Config(
        **PRESETS[preset],
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        original_max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        **ids,
    )
    attention = "sdpa" if device == "cuda" else "eager"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=torch.float32).to(device)
    model.generation_config = GenerationConfig(**ids)
    return model


def evaluate(model: Any, data: Any, batch: int, device: str) -> dict[str, float]:  # noqa: ANN401
    """Mean next-token loss over every held-out sequence, and its perplexity."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast(device):
        for at in range(0, len(data), batch):
            part = data[at : at + batch]
            logits = model(part[:, :-1], use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), part[:, 1:].reshape(-1), reduction="sum"
            )
            total += loss.item()
            count += part[:, 1:].numel()
    model.train()
    loss = total / max(count, 1)
    return {"loss": round(loss, 4), "perplexity": round(math.exp(loss), 3), "tokens": count}


def autocast(device: str) -> Any:  # noqa: ANN401 (a context manager)
    """bfloat16 autocast on a GPU (the weights and optimizer stay float32); plain float32 on a CPU."""
    import contextlib

    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def continuations(model: Any, tokenizer: Any, prompts: tuple[str, ...], new_tokens: int, device: str) -> list[dict]:  # noqa: ANN401
    import torch

    model.eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        with torch.no_grad(), autocast(device):
            generated = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        text = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=False)
        out.append({"prompt": prompt, "continuation": text})
        print(f"pretrain: {prompt!r} -> {text!r}", flush=True)
    return out


def save(model: Any, tokenizer: Any, out: Path, dtype: str) -> None:  # noqa: ANN401
    """Hugging Face layout, written beside ``out`` and renamed into place."""
    import torch

    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.to(getattr(torch, dtype)).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def pretrain(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    clock = Clock()
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    torch.manual_seed(args.seed)
    train_docs = read_documents(args.corpus / "train.txt.xz")
    heldout_docs = read_documents(args.corpus / "heldout.txt.xz")
    train_bytes = sum(len(d.encode()) for d in train_docs)
    clock.lap("read corpus")

    sample, size = [], 0
    for document in train_docs:  # the corpus is shuffled: a prefix is a fair sample
        if size >= args.tokenizer_sample_mb * 1e6:
            break
        sample.append(document)
        size += len(document.encode())
    tokenizer = train_tokenizer(sample, args.vocab_size)
    clock.lap("train tokenizer")
    train_stream = token_stream(tokenizer, train_docs)
    heldout_stream = token_stream(tokenizer, heldout_docs)
    clock.lap("tokenize")
    train = chunks(train_stream, args.seq_len, device)
    heldout = chunks(heldout_stream, args.seq_len, device)[: args.eval_sequences]

    model = build_model(args.preset, tokenizer, device)
    parameters = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=device == "cuda",
    )
    step_model = torch.compile(model) if args.compile else model
    print(
        f"pretrain: {parameters / 1e6:.1f}M parameters on {device}, {len(train_stream) / 1e6:.1f}M train tokens "
        f"({train_bytes / len(train_stream):.2f} bytes/token)",
        flush=True,
    )
    clock.lap("build model")

    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    order, cursor, epoch = torch.randperm(len(train), generator=generator), 0, 0
    curve, step, seen, first_step_s = [], 0, 0, None
    model.train()
    start = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        progress = max(elapsed / args.train_seconds, step / args.max_steps if args.max_steps else 0.0)
        if progress >= 1:
            break
        lr = learning_rate(progress, args.lr, args.warmup, args.lr_floor)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if cursor + args.batch > len(order):
            order, cursor, epoch = torch.randperm(len(train), generator=generator), 0, epoch + 1
        batch = train[order[cursor : cursor + args.batch].to(train.device)]
        cursor += args.batch
        with autocast(device):
            logits = step_model(batch[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seen += batch[:, 1:].numel()
        if step == 1:
            first_step_s = round(time.perf_counter() - start, 2)  # includes torch.compile's compilation
        if step % args.log_every == 0 or step == 1:
            value = loss.item()
            curve.append(
                {"step": step, "s": round(time.perf_counter() - start, 1), "loss": round(value, 4), "lr": round(lr, 7)}
            )
            print(
                f"pretrain: step {step} loss {value:.3f} lr {lr:.2e} {seen / (time.perf_counter() - start):,.0f} "
                f"tokens/s epoch {epoch}",
                flush=True,
            )
    if device == "cuda":
        torch.cuda.synchronize()  # the last steps were only queued
    train_s = time.perf_counter() - start
    clock.lap("train")

    heldout_metrics = evaluate(model, heldout, args.batch, device)
    train_metrics = evaluate(model, train[: len(heldout)], args.batch, device)  # as many sequences, for the gap
    samples = continuations(model, tokenizer, PROMPTS, args.continuation_tokens, device)
    clock.lap("evaluate")
    dtype = args.save_dtype if args.save_dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    save(model, tokenizer, args.out, dtype)
    clock.lap("save")
    report = {
        "preset": args.preset,
        "config": {**PRESETS[args.preset], "vocab_size": len(tokenizer), "max_position_embeddings": MAX_POSITIONS},
        "parameters": parameters,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "saved_dtype": dtype,
        "compile": args.compile,
        "seq_len": args.seq_len,
        "batch_sequences": args.batch,
        "lr": args.lr,
        "steps": step,
        "epochs": round(seen / max(1, len(train) * args.seq_len), 2),
        "train_tokens_seen": seen,
        "train_seconds": round(train_s, 1),
        "tokens_per_s": round(seen / train_s),
        "first_step_s": first_step_s,
        "corpus": {
            "train_bytes": train_bytes,
            "train_tokens": int(len(train_stream)),
            "heldout_tokens": int(len(heldout_stream)),
            "bytes_per_token": round(train_bytes / len(train_stream), 3),
            "tokenizer_sample_mb": round(size / 1e6, 1),
        },
        "final_train_loss": curve[-1]["loss"] if curve else None,
        "train_loss_same_size": train_metrics,
        "heldout": heldout_metrics,
        "continuations": samples,
        "curve": curve,
        "phases_s": clock.phases,
        "versions": {"torch": torch.__version__, "numpy": np.__version__, **transformers_version()},
    }
    print(
        f"pretrain: held-out loss {heldout_metrics['loss']} (perplexity {heldout_metrics['perplexity']}), "
        f"{step} steps, {report['tokens_per_s']:,} tokens/s",
        flush=True,
    )
    return report


def transformers_version() -> dict[str, str]:
    import tokenizers
    import transformers

    return {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=REPO / ".corpus", help="folder made by benchmarks/corpus.py")
    parser.add_argument("--out", type=Path, required=True, help="model folder to write (Hugging Face layout)")
    parser.add_argument("--report", type=Path, help="JSON report [default: <out>.json]")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--train-seconds", type=float, default=300, help="wall-clock training budget")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps too (0: no limit)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64, help="sequences per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=float, default=0.05, help="share of the budget spent warming up")
    parser.add_argument("--lr-floor", type=float, default=0.1, help="final learning rate, as a share of the peak")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--tokenizer-sample-mb", type=float, default=24, help="corpus text the tokenizer learns on")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step")
    parser.add_argument(
        "--save-dtype",
        choices=["auto", "bfloat16", "float32"],
        default="auto",
        help="auto: bfloat16 after GPU training (as Phi-3 ships), float32 on a CPU",
    )
    parser.add_argument("--eval-sequences", type=int, default=1024, help="most held-out sequences scored")
    parser.add_argument("--continuation-tokens", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is visible")
    args = parser.parse_args()
    report = pretrain(args)
    report_file = args.report or args.out.with_name(args.out.name + ".json")
    report_file.write_text(json.dumps(report, indent=2) + "\n")
    print(f"pretrain: wrote {args.out} and {report_file}")


if __name__ == "__main__":
    main()
