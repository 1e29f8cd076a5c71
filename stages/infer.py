"""infer: generate with onnxruntime-genai, the LoRA adapter switched on and off by name.

This is all the slim CPU image runs: it imports onnxruntime-genai, numpy and
click, never torch or transformers.  It reads an optimize-layout folder
(``model/`` + ``adapters/<name>.onnx_adapter``) and writes ``infer/answers.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from contract import model_folder, volume
from contract.exits import BadInput
from stages import common

BASE = model_folder.BASE
DEFAULT_PROMPTS = ("What is the best time of year to visit Paris?", "What should I pack for a week in Tokyo?")


@dataclass
class Answer:
    prompt: str
    adapter: str
    text: str
    new_tokens: int
    time_to_first_token_ms: float
    decode_tokens_per_s: float


def threads_option(f):  # noqa: ANN001, ANN201 (a click decorator)
    """``--threads``, shared by every command that loads an Engine."""
    return click.option(
        "--threads",
        default=0,
        type=click.IntRange(min=0),
        show_default=True,
        show_envvar=True,
        help="CPU threads per generation step; 0 = one per core. (Left unset, onnxruntime-genai ran one thread: "
        "half the decode speed on 2 cores.)",
    )(f)


def og_config(model_dir: Path, threads: int | None = 0):  # noqa: ANN201 (an onnxruntime_genai.Config)
    """The model folder's onnxruntime-genai config with ``threads`` intra-op threads (0: one per core; None: as the
    folder says, which onnxruntime-genai ran as one thread)."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    if threads is not None:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return config


class Engine:
    """One loaded model and its adapters; generate() streams tokens for one prompt."""

    def __init__(self, folder: Path, threads: int = 0) -> None:
        import onnxruntime_genai as og

        self.og = og
        model_dir = model_folder.model_dir(folder)
        if not model_folder.is_model_folder(folder):
            raise BadInput(
                f"{folder} is not an optimized model folder (no model/genai_config.json); "
                "run `olivepress optimize` or pass --model-dir with model/ and adapters/"
            )
        self.config = json.loads((model_dir / model_folder.GENAI_CONFIG).read_text())
        self.model = og.Model(og_config(model_dir, threads))
        self.tokenizer = og.Tokenizer(self.model)
        self.adapters = og.Adapters(self.model)
        merged = model_folder.merged_adapter(folder)
        # A merged build serves its adapter's name and has no base to switch to.
        self.has_base = merged is None
        if self.has_base:
            self.adapter_names = model_folder.adapter_names(folder)
            for name in self.adapter_names:
                self.adapters.load(str(model_folder.adapter_file(folder, name)), name)
        else:
            self.adapter_names = [merged]

    @property
    def names(self) -> list[str]:
        """What a request may ask for: BASE (when there is one) and each adapter."""
        return [BASE] * self.has_base + self.adapter_names

    def prompt_tokens(self, prompt: str) -> list[int]:
        return self.chat_tokens([{"role": "user", "content": prompt}])

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """A whole conversation through the model's chat template, ready for the assistant's turn."""
        text = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        return list(self.tokenizer.encode(text))

    @property
    def context_length(self) -> int:
        return int(self.config["model"].get("context_length", 2048))

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.config["model"].get("eos_token_id", [])
        return set(eos if isinstance(eos, list) else [eos])

    def new_generator(  # noqa: ANN201 (an onnxruntime_genai.Generator)
        self, adapter: str, max_length: int, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None
    ):
        """A generator with ``adapter`` active (or none for BASE): greedy at temperature 0, else sampled."""
        adapter = BASE if adapter in model_folder.BASE_ALIASES else adapter
        if adapter not in self.names:
            known = ", ".join(self.names)
            merged = "" if self.has_base else " (its adapter is merged in; build with --adapter-mode switchable)"
            raise BadInput(f"no adapter named {adapter!r} in this model{merged}; choose one of: {known}")
        params = self.og.GeneratorParams(self.model)
        if temperature > 0:
            options = {"max_length": max_length, "do_sample": True, "temperature": temperature, "top_p": top_p}
            if seed is not None:
                options["random_seed"] = seed
            params.set_search_options(**options)
        else:
            params.set_search_options(max_length=max_length, do_sample=False)
        generator = self.og.Generator(self.model, params)
        if adapter != BASE and self.has_base:
            generator.set_active_adapter(self.adapters, adapter)
        return generator

    def stream(
        self,
        ids: list[int],
        adapter: str,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[tuple[int, str]]:
        """Yield (token id, text piece) for each new token; the one generation loop infer, serve and chat share.

        Nothing is computed until the first item is asked for, and closing the iterator stops generation.
        """
        generator = self.new_generator(adapter, len(ids) + max_new_tokens, temperature, top_p, seed)
        decoder = self.tokenizer.create_stream()
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            yield token, decoder.decode(token)

    def generate(self, prompt: str, adapter: str, max_new_tokens: int, echo=None) -> Answer:  # noqa: ANN001
        ids = self.prompt_tokens(prompt)
        start = time.perf_counter()
        pieces, first = [], None
        for _, piece in self.stream(ids, adapter, max_new_tokens):
            if first is None:
                first = time.perf_counter()
            pieces.append(piece)
            if echo:
                echo(piece)
        end = time.perf_counter()
        n = len(pieces)
        return Answer(
            prompt=prompt,
            adapter=adapter,
            text="".join(pieces),
            new_tokens=n,
            time_to_first_token_ms=round(((first or end) - start) * 1000, 1),
            decode_tokens_per_s=round((n - 1) / (end - first), 1) if n > 1 and first else 0.0,
        )


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
      olivepress infer --model-dir ./pulled-model --adapter none
    """
    folder = model_dir or volume.upstream(root, "infer", "optimize")
    engine = Engine(folder, threads)
    chosen = list(adapters) or engine.names
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


def image_main(argv: list[str] | None = None) -> None:
    """The slim image's entrypoint (``python -m stages.infer``): ``serve`` (its default command), ``chat``, or infer.

    The first argument picks the verb; anything else (``--prompt ...``, ``--help``, or ``infer ...``) is infer's,
    so the pipeline and ``olivepress infer --image`` run it as before.
    """
    import importlib
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    verb = "infer"
    if args and args[0] in IMAGE_VERBS:
        verb, args = args[0], args[1:]
    if verb == "infer" and args == ["--help"]:
        click.echo(
            f"Verbs of this image: {', '.join(IMAGE_VERBS)} (serve is the default command); see `serve --help`.\n"
        )
    stage = sys.modules[__name__] if verb == "infer" else importlib.import_module(f"stages.{verb}")
    stage.command(args, prog_name=f"python -m stages.{verb}", auto_envvar_prefix=f"OLIVEPRESS_{verb.upper()}")


IMAGE_VERBS = ("infer", "serve", "chat")

if __name__ == "__main__":
    image_main()
