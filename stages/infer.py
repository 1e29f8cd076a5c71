"""infer: answer a few prompts with onnxruntime-genai, the LoRA adapter switched on and off by name.

A stage over ``runtime.engine``: it reads an optimize-layout folder (``model/`` +
``adapters/<name>.onnx_adapter``), writes ``infer/answers.json`` and the timings to the manifest. It
imports onnxruntime-genai, numpy and click, never torch or transformers: the slim CPU image runs it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from contract import volume
from contract.model_folder import BASE
from runtime.engine import Engine, threads_option
from stages import common

DEFAULT_PROMPTS = ("What is the best time of year to visit Paris?", "What should I pack for a week in Tokyo?")


@common.stage_command("infer")
@click.option("--prompt", "prompts", multiple=True, help="A user message (repeatable) [default: two travel questions].")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    help=f"Adapter to use, or '{BASE}' for the base model (repeatable) [default: {BASE} and every adapter].",
)
@click.option("--max-new-tokens", default=64, type=click.IntRange(min=1), help="Tokens to generate per answer.")
@click.option(
    "--model-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="An optimize-layout folder (model/ + adapters/) [default: <home>/optimize].",
)
@threads_option
def command(
    root: Path,
    force: bool,
    prompts: tuple[str, ...],
    adapters: tuple[str, ...],
    max_new_tokens: int,
    model_dir: Path | None,
    threads: int,
) -> None:
    """Generate answers with onnxruntime-genai on the CPU, with the adapter on and off.

    Tokens stream to the terminal; tokens/s and time to first token go to the
    manifest.  Answers are greedy, so the same model gives the same text.

    \b
    Examples:
      olivepress infer --prompt "Where should I eat in Rome?" --adapter travel
      olivepress infer --model-dir ./pulled-model --adapter base
    """
    folder = model_dir or volume.upstream(root, "infer", "optimize")
    engine = Engine(folder, threads)
    chosen = [engine.resolve(a) for a in adapters] or engine.names
    prompts = prompts or DEFAULT_PROMPTS
    parameters = {"prompts": list(prompts), "adapters": chosen, "max_new_tokens": max_new_tokens}

    ran = []

    def work(out: Path) -> dict:
        ran.append(True)
        answers = []
        for prompt in prompts:
            for adapter in chosen:
                click.secho(f"\n[{adapter}] {prompt}", bold=True)
                answer = engine.generate(prompt, adapter, max_new_tokens, echo=lambda p: click.echo(p, nl=False))
                click.secho(
                    f"\n  {answer.new_tokens} tokens, {answer.decode_tokens_per_s} tokens/s, "
                    f"first token after {answer.time_to_first_token_ms} ms",
                    dim=True,
                    err=True,
                )
                answers.append(answer)
        # Text alone in answers.json (reproducible); timings in the manifest.
        texts = [{"prompt": a.prompt, "adapter": a.adapter, "text": a.text} for a in answers]
        (out / "answers.json").write_text(json.dumps(texts, indent=2, ensure_ascii=False) + "\n")
        return {"answers": [asdict(a) for a in answers]}

    manifest = volume.run_stage(
        "infer", root, {"model": folder}, parameters, work, force=force, packages=("onnxruntime-genai", "numpy")
    )
    if not ran:  # skipped: show what the last run answered
        for answer in manifest["answers"]:
            click.echo(f"[{answer['adapter']}] {answer['prompt']}\n{answer['text']}\n")


if __name__ == "__main__":
    common.entrypoint(command, warm_imports=("onnxruntime_genai",))
