"""One optimized model folder loaded in onnxruntime-genai, its LoRA adapters switched by name.

``Batch`` is the one generation loop: up to N prompts decoded together by one onnxruntime-genai generator (one
adapter, one sampling setting), token by token; ``Engine.stream`` runs a batch of one (infer and chat) and the
server's scheduler (``runtime.batching``) runs several. ``resolve`` is the one place a user's name for an adapter
is resolved: an adapter's name, or ``model_folder.BASE`` for any of ``BASE_ALIASES``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from contract import model_folder
from contract.exits import BadInput
from contract.model_folder import BASE, BASE_ALIASES


@dataclass
class Answer:
    prompt: str
    adapter: str
    text: str
    new_tokens: int
    time_to_first_token_ms: float
    decode_tokens_per_s: float


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at temperature 0, else sampled with ``top_p`` (seeded if ``seed``)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


class UnknownAdapter(BadInput):
    """A name that is neither one of the model's adapters nor, where the model has one, its base."""


class RefusedConversation(BadInput):
    """A conversation the model's chat template does not take, e.g. a system message for Gemma."""


def resolve(name: object, names: Sequence[str], noun: str = "adapter") -> str:
    """The served name that ``name`` asks for, out of ``names`` (an Engine's ``names``, or a server's models).

    ``noun`` is what the user called it: ``--adapter`` in infer, ``model`` in the OpenAI API and the chat.
    """
    if name in BASE_ALIASES and BASE in names:
        return BASE
    if isinstance(name, str) and name in names:
        return name
    merged = "" if BASE in names else " (its adapter is merged in; build with --adapter-mode switchable)"
    raise UnknownAdapter(f"no {noun} named {name!r}{merged}; choose one of: {', '.join(names)}")


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
    """One loaded model and its adapters; ``stream`` generates tokens for one prompt."""

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
        """What a user may ask for: BASE (when there is one) and each adapter."""
        return [BASE] * self.has_base + self.adapter_names

    def resolve(self, name: object, noun: str = "adapter") -> str:
        """``name`` as one of ``names`` (an alias of the base becomes BASE), or a BadInput naming the choices."""
        return resolve(name, self.names, noun)

    def prompt_tokens(self, prompt: str) -> list[int]:
        return self.chat_tokens([{"role": "user", "content": prompt}])

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """A whole conversation through the model's chat template, ready for the assistant's turn.

        A template that refuses the conversation (Gemma's has no system role; Mistral's and Gemma's want user and
        assistant turns to alternate) is a ``RefusedConversation`` naming its reason.
        """
        try:
            text = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        except RuntimeError as error:  # the template's raise_exception(), with the template's position after it
            reason = str(error).strip().splitlines()[0].split(" at row ")[0]
            raise RefusedConversation(f"the model's chat template refuses this conversation: {reason}") from None
        return list(self.tokenizer.encode(text))

    @property
    def context_length(self) -> int:
        return int(self.config["model"].get("context_length", 2048))

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.config["model"].get("eos_token_id", [])
        return set(eos if isinstance(eos, list) else [eos])

    @property
    def pad_token_id(self) -> int:
        return int(self.config["model"].get("pad_token_id", 0))

    def new_generator(  # noqa: ANN201 (an onnxruntime_genai.Generator)
        self, adapter: str, max_length: int, sampling: Sampling = Sampling(), batch_size: int = 1
    ):
        """A generator for ``batch_size`` sequences with ``adapter`` active (or none for BASE)."""
        adapter = self.resolve(adapter)
        params = self.og.GeneratorParams(self.model)
        options: dict = {"max_length": max_length, "batch_size": batch_size}
        if sampling.greedy:
            options["do_sample"] = False
        else:
            options.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
            if sampling.seed is not None:
                options["random_seed"] = sampling.seed
        params.set_search_options(**options)
        generator = self.og.Generator(self.model, params)
        if adapter != BASE and self.has_base:
            generator.set_active_adapter(self.adapters, adapter)
        return generator

    def stream(
        self, ids: list[int], adapter: str, max_new_tokens: int, sampling: Sampling = Sampling()
    ) -> Generator[tuple[int, str], None, None]:
        """Yield (token id, text piece) for each new token of one prompt, up to and with an end-of-sequence token.

        Nothing is computed until the first item is asked for, and closing the iterator stops generation.
        """
        batch = Batch(self, [ids], adapter, [max_new_tokens], sampling)
        while batch.open_rows:
            for _, token, piece in batch.step():
                yield token, piece

    def generate(
        self, prompt: str, adapter: str, max_new_tokens: int, echo: Callable[[str], object] | None = None
    ) -> Answer:
        """One greedy answer to ``prompt``, timed; ``echo`` gets each text piece as it comes."""
        adapter = self.resolve(adapter)
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


class Batch:
    """Prompts decoded together by one onnxruntime-genai generator: one adapter, one sampling setting.

    Rows are right-padded with the pad token to the longest prompt (onnxruntime-genai masks trailing pad tokens and
    positions each row from its own start); each row ends at its own end-of-sequence token or token budget, or when
    closed (a client gone, a stop string), and its tokens are no longer reported; the generator computes every row
    until all are done, so a batch is cheapest when its rows are alike. The prefill (the prompts' forward pass)
    runs in the constructor.
    """

    def __init__(
        self, engine: Engine, prompts: list[list[int]], adapter: str, budgets: list[int], sampling: Sampling
    ) -> None:
        self.engine = engine
        self.budgets = budgets
        self.counts = [0] * len(prompts)
        self.open = [True] * len(prompts)
        self.eos = engine.eos_token_ids
        longest = max(len(ids) for ids in prompts)
        self.generator = engine.new_generator(adapter, longest + max(budgets), sampling, batch_size=len(prompts))
        self.decoders = [engine.tokenizer.create_stream() for _ in prompts]
        if len(prompts) == 1:
            self.generator.append_tokens(np.asarray(prompts[0], dtype=np.int32))
        else:
            padded = np.full((len(prompts), longest), engine.pad_token_id, dtype=np.int32)
            for row, ids in enumerate(prompts):
                padded[row, : len(ids)] = ids
            self.generator.append_tokens(padded)

    @property
    def open_rows(self) -> list[int]:
        return [row for row, is_open in enumerate(self.open) if is_open]

    def close(self, row: int) -> None:
        """Stop reporting ``row``; once every row is closed, the generator and its key-value cache are freed."""
        self.open[row] = False
        if not any(self.open):
            self.generator = None

    def step(self) -> list[tuple[int, int, str]]:
        """One new token for every row: (row, token id, text piece) for the rows still open, which close at their
        end-of-sequence token or budget."""
        self.generator.generate_next_token()
        tokens = self.generator.get_next_tokens()
        out = []
        for row in self.open_rows:
            token = int(tokens[row])
            self.counts[row] += 1
            out.append((row, token, self.decoders[row].decode(token)))
            if token in self.eos or self.counts[row] >= self.budgets[row]:
                self.close(row)
        if self.generator is not None and self.generator.is_done():
            for row in self.open_rows:
                self.close(row)
        return out
