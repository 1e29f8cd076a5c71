"""chat: an interactive terminal chat with the model, in this process or through a running ``olivepress serve``.

Each line read is a user turn; the answer streams back as it is generated and the conversation is kept, so
the model sees the whole history through its chat template. Lines starting with ``/`` are commands (``/help``).
The standard library's urllib talks to a server, ``runtime.engine.Engine`` to a model folder.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import click

from contract import volume
from runtime.engine import Engine, Sampling, UnknownAdapter, resolve, threads_option

ENVVAR_PREFIX = "OLIVEPRESS_CHAT"
HELP = "commands: /model NAME (switch adapter), /models, /reset (forget the conversation), /quit (or Ctrl-D)"


class Backend(Protocol):
    def models(self) -> list[str]: ...

    def reply(
        self, messages: list[dict[str, str]], model: str, max_tokens: int, temperature: float
    ) -> Iterator[str]: ...


class LocalBackend:
    """The model folder loaded here, through the same generation loop as infer and serve."""

    def __init__(self, folder: Path, threads: int = 0) -> None:
        self.engine = Engine(folder, threads)

    def models(self) -> list[str]:
        return self.engine.names

    def reply(self, messages: list[dict[str, str]], model: str, max_tokens: int, temperature: float) -> Iterator[str]:
        ids = self.engine.chat_tokens(messages)
        # The oldest turns go first when the conversation outgrows the context (the latest turn always stays).
        while len(ids) + max_tokens > self.engine.context_length and len(messages) > 2:
            messages = messages[2:] if messages[0]["role"] != "system" else messages[:1] + messages[3:]
            ids = self.engine.chat_tokens(messages)
        max_tokens = max(1, min(max_tokens, self.engine.context_length - len(ids)))
        eos = self.engine.eos_token_ids
        for token, piece in self.engine.stream(ids, model, max_tokens, Sampling(temperature, top_p=0.95)):
            if token in eos:
                break
            yield piece


class HttpBackend:
    """A running OpenAI-compatible server (``olivepress serve``), streamed over server-sent events."""

    def __init__(self, url: str) -> None:
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else f"{base}/v1"

    def _open(self, path: str, body: dict | None = None):  # noqa: ANN202 (an HTTP response)
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.base}{path}", data=data, headers={"Content-Type": "application/json"})
        try:
            return urllib.request.urlopen(request, timeout=600)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            raise click.ClickException(f"the server answered {exc.code}: {message}") from None
        except urllib.error.URLError as exc:
            raise click.ClickException(f"no server answers at {self.base}: {exc.reason}") from None

    def models(self) -> list[str]:
        with self._open("/models") as response:
            return [m["id"] for m in json.load(response)["data"]]

    def reply(self, messages: list[dict[str, str]], model: str, max_tokens: int, temperature: float) -> Iterator[str]:
        body = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
        }
        with self._open("/chat/completions", body) as response:
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line.removeprefix("data:").strip()
                if data == "[DONE]":
                    return
                for choice in json.loads(data).get("choices", []):
                    text = choice.get("delta", {}).get("content")
                    if text:
                        yield text


@click.command("chat", context_settings={"auto_envvar_prefix": ENVVAR_PREFIX, "show_default": True})
@volume.home_option("Volume root; the model is <home>/optimize unless --model-dir or --url")
@click.option(
    "--model-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Chat with this optimize-layout folder (model/ + adapters/), loaded here.",
)
@click.option("--url", show_envvar=True, help="Chat through a running server instead, e.g. http://localhost:8000.")
@click.option(
    "--model", "-m", default=None, show_envvar=True, help="'base' or an adapter's name [default: the first adapter]."
)
@click.option("--system", default=None, help="A system message to start the conversation with.")
@click.option("--max-tokens", default=256, type=click.IntRange(min=1), show_envvar=True, help="Per answer.")
@click.option(
    "--temperature", default=0.0, type=click.FloatRange(0, 2), show_envvar=True, help="0: greedy; above: sampled."
)
@threads_option
def command(
    root: Path | None,
    model_dir: Path | None,
    url: str | None,
    model: str | None,
    system: str | None,
    max_tokens: int,
    temperature: float,
    threads: int,
) -> None:
    """Chat with the model in the terminal: type a message, the answer streams back; Ctrl-D ends.

    \b
    Examples:
      olivepress chat --model-dir ./artifacts/optimize --model travel
      olivepress chat --url http://localhost:8000 --model base
    """
    if url:
        backend: Backend = HttpBackend(url)
    else:
        folder = model_dir or volume.published(volume.home(root), "optimize")
        backend = LocalBackend(folder, threads)
    names = backend.models()
    try:
        model = resolve(model, names, noun="model") if model else (names[1] if len(names) > 1 else names[0])
    except UnknownAdapter as error:
        raise click.BadParameter(error.message, param_hint="--model") from None
    interactive = sys.stdin.isatty()
    click.secho(f"chatting with {model} (models: {', '.join(names)}); {HELP}", dim=True, err=True)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input(f"{model}> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            click.echo(err=True)
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            word, _, arg = line.partition(" ")
            if word in ("/quit", "/exit"):
                break
            if word == "/reset":
                history = history[:1] if system else []
                click.secho("(conversation forgotten)", dim=True, err=True)
            elif word == "/models":
                click.echo(", ".join(names))
            elif word == "/model":
                try:
                    model = resolve(arg.strip(), names, noun="model")
                    click.secho(f"(now {model})", dim=True, err=True)
                except UnknownAdapter as error:
                    click.secho(error.message, dim=True, err=True)
            else:
                click.secho(HELP, dim=True, err=True)
            continue
        history.append({"role": "user", "content": line})
        pieces = []
        try:
            for piece in backend.reply(history, model, max_tokens, temperature):
                pieces.append(piece)
                click.echo(piece, nl=False)
        except KeyboardInterrupt:  # stop this answer, keep the chat
            click.secho(" [interrupted]", dim=True, nl=False, err=True)
        click.echo()
        history.append({"role": "assistant", "content": "".join(pieces)})


if __name__ == "__main__":
    command(prog_name="python -m runtime.chat", auto_envvar_prefix=ENVVAR_PREFIX)
