"""serve: an OpenAI-compatible HTTP API over one onnxruntime-genai model and its LoRA adapters, with a chat page.

The base model is loaded once; each request picks an adapter by its ``model`` name (``base`` or an adapter's
name); requests at once share the generation loop (``runtime.batching``). ``python -m runtime.serve`` runs it as
the slim image's server does (settings from OLIVEPRESS_SERVE_*).
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from contract import volume
from runtime.engine import Engine, threads_option
from runtime.http import listen, log, serve
from runtime.openai_api import Service

DEFAULT_PORT = 8000
ENVVAR_PREFIX = "OLIVEPRESS_SERVE"


@click.command("serve", context_settings={"auto_envvar_prefix": ENVVAR_PREFIX, "show_default": True})
@volume.home_option("Volume root; the model is <home>/optimize unless --model-dir")
@click.option(
    "--model-dir",
    type=click.Path(file_okay=False, path_type=Path),
    show_envvar=True,
    help="An optimize-layout folder (model/ + adapters/) [default: <home>/optimize].",
)
@click.option("--host", default="127.0.0.1", show_envvar=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=DEFAULT_PORT, type=click.IntRange(0, 65535), show_envvar=True, help="0: any free port.")
@click.option(
    "--max-concurrent",
    default=4,
    type=click.IntRange(min=1, max=64),
    show_envvar=True,
    help="Requests at once (generating or about to); more get 429 + Retry-After. Requests that arrive together "
    "with the same model are decoded as one batch; others take turns token by token.",
)
@click.option(
    "--default-max-tokens",
    default=512,
    type=click.IntRange(min=1),
    show_envvar=True,
    help="New tokens per answer when a request sets no max_tokens (always capped by the context).",
)
@click.option(
    "--request-timeout",
    default=600.0,
    type=click.FloatRange(min=0.1),
    show_envvar=True,
    help="Seconds a request may take, from its arrival to its last token (and to read its body).",
)
@click.option(
    "--shutdown-timeout",
    default=8.0,
    type=click.FloatRange(min=0),
    show_envvar=True,
    help="On SIGTERM or Ctrl-C: seconds answers in progress may take to finish before they are ended "
    "(docker stop waits 10 s).",
)
@click.option(
    "--batch-window-ms",
    default=50.0,
    type=click.FloatRange(min=0, max=1000),
    show_envvar=True,
    help="At most this long, an idle server waits for requests that arrived with the first and are still being "
    "read, to decode them as one batch (a request alone does not wait).",
)
@click.option("--token-delay-ms", default=0.0, type=click.FloatRange(min=0), hidden=True)
@threads_option
@click.option("-v", "--verbose", is_flag=True, help="Log every request.")
def command(
    root: Path | None,
    model_dir: Path | None,
    host: str,
    port: int,
    max_concurrent: int,
    default_max_tokens: int,
    request_timeout: float,
    shutdown_timeout: float,
    batch_window_ms: float,
    token_delay_ms: float,
    threads: int,
    verbose: bool,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (chat completions, streaming, adapters by name),
    with a chat page at / and Prometheus metrics at /metrics.

    The base model loads once; a request's "model" picks the adapter: "base" (no adapter) or an adapter's
    name, as GET /v1/models lists them. Answers use the model's chat template; temperature 0 (the default)
    is greedy, above 0 samples with top_p.

    \b
    Examples:
      olivepress serve --model-dir ./artifacts/optimize
      curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "travel", "messages": [{"role": "user", "content": "Where in Rome?"}]}'
      olivepress chat --url http://localhost:8000        # or any OpenAI client, base_url .../v1
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(message)s")
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    folder = model_dir or volume.published(volume.home(root), "optimize")
    engine = Engine(folder, threads)  # a BadInput (exit 2) names a folder that is not a model
    service = Service(
        engine,
        max_concurrent,
        default_max_tokens,
        request_timeout_s=request_timeout,
        batch_window_s=batch_window_ms / 1000,
        step_delay_s=token_delay_ms / 1000,
    )
    try:
        sock = listen(host, port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    bound_host, bound_port = sock.getsockname()[:2]
    shown = "localhost" if bound_host in ("127.0.0.1", "0.0.0.0", "::") else bound_host

    def ready() -> None:
        # One line a script (or a test) can wait for: the server answers once it appears.
        click.echo(
            f"olivepress serve: {folder} on http://{shown}:{bound_port}/v1 "
            f"(models: {', '.join(service.model_names)}; {max_concurrent} at once; chat page at "
            f"http://{shown}:{bound_port}/)",
            err=True,
        )

    serve(service, sock, shutdown_timeout, verbose, ready)


if __name__ == "__main__":
    command(prog_name="python -m runtime.serve", auto_envvar_prefix=ENVVAR_PREFIX)
