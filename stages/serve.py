"""serve: an OpenAI-compatible HTTP API over one onnxruntime-genai model and its LoRA adapters.

Runs in the slim CPU image, so it uses the standard library's ``ThreadingHTTPServer`` (nothing to install) and
``stages.infer.Engine`` for generation. The base model is loaded once; each request picks an adapter by its
``model`` name (``base`` or an adapter's name). A bounded number of generations run at once: a request beyond
the bound gets 429 with ``Retry-After`` at once rather than queueing behind a long answer.

Endpoints: ``POST /v1/chat/completions`` (``stream`` true or false), ``GET /v1/models``, ``GET /health``.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import click

from contract import model_folder, volume
from stages import infer

log = logging.getLogger("olivepress")
BASE_NAME = infer.BASE
DEFAULT_PORT = 8000
MAX_BODY = 4 * 1024 * 1024


class ApiError(Exception):
    """An error the client caused (or a full server), sent as OpenAI's error object."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def _text_of(content: Any) -> str:
    """A message's content: a string, or OpenAI's list of parts (only text parts are understood)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(400, "only text content parts are supported", param="messages")
            texts.append(part["text"])
        return "".join(texts)
    if content is None:
        return ""
    raise ApiError(400, "message content must be a string or a list of text parts", param="messages")


class StopScanner:
    """Cuts generated text at the first stop string, holding back a tail that might be the start of one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Text that is safe to emit now; sets ``stopped`` once a stop string appeared."""
        self.buffer += piece
        if self.stops:
            hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
            if hits:
                self.stopped = True
                out, self.buffer = self.buffer[: min(hits)], ""
                return out
        cut = len(self.buffer) - self.hold if self.stops else len(self.buffer)
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


class Service:
    """The model, its adapters and the bound on concurrent generations; what every request handler shares."""

    def __init__(
        self,
        engine: infer.Engine,
        max_concurrent: int = 1,
        default_max_tokens: int = 512,
        token_delay_s: float = 0.0,
    ) -> None:
        self.engine = engine
        self.slots = threading.BoundedSemaphore(max_concurrent)
        self.max_concurrent = max_concurrent
        self.default_max_tokens = default_max_tokens
        self.token_delay_s = token_delay_s  # tests and demos: a visibly slow stream
        self.created = int(time.time())
        self.active = 0
        self._lock = threading.Lock()

    @property
    def model_names(self) -> list[str]:
        return [BASE_NAME] * self.engine.has_base + self.engine.adapter_names

    def adapter_for(self, model: Any) -> str:
        if model in model_folder.BASE_ALIASES and self.engine.has_base:
            return infer.BASE
        if isinstance(model, str) and model in self.engine.adapter_names:
            return model
        known = ", ".join(self.model_names)
        raise ApiError(400, f"no model named {model!r}; choose one of: {known}", param="model")

    def models(self) -> dict[str, Any]:
        data = [
            {"id": n, "object": "model", "created": self.created, "owned_by": "olivepress"} for n in self.model_names
        ]
        return {"object": "list", "data": data}

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "models": self.model_names,
            "active": self.active,
            "max_concurrent": self.max_concurrent,
        }

    def parse(self, body: dict[str, Any]) -> dict[str, Any]:
        """Check a chat-completion request; return what generation needs, or raise a 400."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        adapter = self.adapter_for(body.get("model"))
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        chat = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, "each message needs a role and content", param="messages")
            chat.append({"role": m["role"], "content": _text_of(m.get("content"))})
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = self.default_max_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError(400, "max_tokens must be a positive integer", param="max_tokens")
        temperature = body.get("temperature", 0.0)
        top_p = body.get("top_p", 1.0)
        for name, value, high in (("temperature", temperature, 2.0), ("top_p", top_p, 1.0)):
            if value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 <= value <= high):
                raise ApiError(400, f"{name} must be a number from 0 to {high}", param=name)
        if body.get("n", 1) not in (1, None):
            raise ApiError(400, "only n=1 is supported", param="n")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4):
            raise ApiError(400, "stop must be a string or a list of up to 4 strings", param="stop")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ApiError(400, "seed must be an integer", param="seed")
        ids = self.engine.chat_tokens(chat)
        room = self.engine.context_length - len(ids)
        if room < 1:
            raise ApiError(
                400, f"the prompt is {len(ids)} tokens; the model's context is {self.engine.context_length}", "messages"
            )
        return {
            "model": body["model"],
            "adapter": adapter,
            "ids": ids,
            "max_tokens": min(max_tokens, room),
            "temperature": float(temperature or 0.0),
            "top_p": float(1.0 if top_p is None else top_p),
            "seed": seed,
            "stop": stop,
            "stream": bool(body.get("stream", False)),
            "include_usage": bool((body.get("stream_options") or {}).get("include_usage", False)),
        }

    def acquire(self) -> None:
        if not self.slots.acquire(blocking=False):
            raise ApiError(
                429,
                f"all {self.max_concurrent} generation slot(s) are busy; retry shortly",
                kind="rate_limit_error",
            )
        with self._lock:
            self.active += 1

    def release(self) -> None:
        with self._lock:
            self.active -= 1
        self.slots.release()

    def pieces(self, request: dict[str, Any]) -> Iterator[tuple[str, str | None]]:
        """(text, finish_reason) pairs: text as it becomes safe to send, then a final one with the reason."""
        scanner = StopScanner(request["stop"])
        eos = self.engine.eos_token_ids
        n, finish = 0, "length"
        tokens = self.engine.stream(
            request["ids"], request["adapter"], request["max_tokens"], request["temperature"], request["top_p"],
            request["seed"],
        )  # fmt: skip
        try:
            for token, piece in tokens:
                n += 1
                if token in eos:
                    finish = "stop"
                    break
                text = scanner.feed(piece)
                if scanner.stopped:
                    finish = "stop"
                    yield text, None
                    break
                if text:
                    yield text, None
                if self.token_delay_s:
                    time.sleep(self.token_delay_s)
        finally:
            tokens.close()
            request["completion_tokens"] = n
        yield scanner.flush(), finish


def _chunk(request: dict[str, Any], rid: str, created: int, delta: dict, finish: str | None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": request["model"],
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def _usage(request: dict[str, Any]) -> dict[str, int]:
    prompt, completion = len(request["ids"]), request.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Handler(BaseHTTPRequestHandler):
    """One HTTP/1.1 connection (keep-alive; streams use chunked transfer encoding)."""

    protocol_version = "HTTP/1.1"
    server_version = "olivepress"
    service: Service  # set on the subclass make_server builds

    def setup(self) -> None:
        super().setup()
        # A stream is many small writes: without TCP_NODELAY, Nagle's algorithm holds each one back until the
        # client's (delayed) ACK of the one before, up to tens of milliseconds per event.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.info("%s %s", self.address_string(), format % args)

    # --- plumbing ---------------------------------------------------------------------------------------

    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: ApiError) -> None:
        headers = {"Retry-After": "1"} if error.status == 429 else None
        self._send_json(error.status, error.body(), headers)

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411 if length is None else 400, "a JSON body with Content-Length is required")
        if int(length) > MAX_BODY:
            self.close_connection = True
            raise ApiError(413, f"the body is over {MAX_BODY} bytes")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None

    # --- routes -----------------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            self._send_json(200, self.service.health())
        elif path == "/v1/models":
            self._send_json(200, self.service.models())
        elif path.startswith("/v1/models/"):
            name = path.removeprefix("/v1/models/")
            try:
                self.service.adapter_for(name)
            except ApiError as error:
                self._send_error(error)
                return
            self._send_json(
                200, {"id": name, "object": "model", "created": self.service.created, "owned_by": "olivepress"}
            )
        else:
            self._send_error(ApiError(404, f"no route GET {path}"))

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            body = self._read_json()  # read even for an unknown route, so keep-alive stays in step
            if path != "/v1/chat/completions":
                raise ApiError(404, f"no route POST {path}")
            request = self.service.parse(body)
            self.service.acquire()
        except ApiError as error:
            self._send_error(error)
            return
        try:
            if request["stream"]:
                self._stream(request)
            else:
                self._complete(request)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug or a runtime failure: an answer, not a dropped connection
            log.exception("generation failed")
            if not request["stream"]:  # a stream has sent its headers already; it can only end
                self._send_error(ApiError(500, f"generation failed: {exc}", kind="server_error"))
            self.close_connection = True
        finally:
            self.service.release()

    def _complete(self, request: dict[str, Any]) -> None:
        started = time.perf_counter()
        parts, finish = [], "length"
        for text, reason in self.service.pieces(request):
            parts.append(text)
            finish = reason or finish
        self._send_json(
            200,
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": request["model"],
                "system_fingerprint": None,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(parts)},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": _usage(request),
            },
        )
        log.info(
            "%s: %d tokens in %.2f s", request["model"], request["completion_tokens"], time.perf_counter() - started
        )

    def _stream(self, request: dict[str, Any]) -> None:
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def event(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            self._write_chunk(f"data: {data}\n\n".encode())

        # Every content event is the same JSON but for the text: serialize the rest once, not once per token.
        marker = "\u0000olivepress\u0000"
        head, tail = json.dumps(_chunk(request, rid, created, {"content": marker}, None)).split(json.dumps(marker))
        head, tail = f"data: {head}", f"{tail}\n\n"
        pieces = self.service.pieces(request)
        try:
            event(_chunk(request, rid, created, {"role": "assistant", "content": ""}, None))
            for text, finish in pieces:
                if text:
                    self._write_chunk(f"{head}{json.dumps(text)}{tail}".encode())
                if finish:
                    event(_chunk(request, rid, created, {}, finish))
            if request["include_usage"]:
                usage = {**_chunk(request, rid, created, {}, None), "choices": [], "usage": _usage(request)}
                event(usage)
            event("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            # The client went away: stop generating (closing the iterator ends the generator's loop).
            self.close_connection = True
            log.info("%s: client disconnected after %s tokens", request["model"], request.get("completion_tokens"))
        finally:
            pieces.close()


def make_server(service: Service, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"service": service})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True  # a stuck client never blocks shutdown
    return server


@click.command(
    "serve",
    context_settings={"auto_envvar_prefix": "OLIVEPRESS_SERVE", "show_default": True},
)
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
    default=1,
    type=click.IntRange(min=1),
    show_envvar=True,
    help="Generations at once; more get 429 + Retry-After. On a laptop one uses every core.",
)
@click.option(
    "--default-max-tokens",
    default=512,
    type=click.IntRange(min=1),
    show_envvar=True,
    help="New tokens per answer when a request sets no max_tokens (always capped by the context).",
)
@click.option("--token-delay-ms", default=0.0, type=click.FloatRange(min=0), hidden=True)
@infer.threads_option
@click.option("-v", "--verbose", is_flag=True, help="Log every request.")
def command(
    root: Path | None,
    model_dir: Path | None,
    host: str,
    port: int,
    max_concurrent: int,
    default_max_tokens: int,
    token_delay_ms: float,
    threads: int,
    verbose: bool,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (chat completions, streaming, adapters by name).

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
    engine = infer.Engine(folder, threads)  # a BadInput (exit 2) names a folder that is not a model
    service = Service(engine, max_concurrent, default_max_tokens, token_delay_ms / 1000)
    try:
        server = make_server(service, host, port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    bound_host, bound_port = server.server_address[:2]
    shown = "localhost" if bound_host in ("127.0.0.1", "0.0.0.0") else bound_host
    # One line a script (or a test) can wait for: the server is ready when it appears.
    click.echo(
        f"olivepress serve: {folder} on http://{shown}:{bound_port}/v1 "
        f"(models: {', '.join(service.model_names)}; {max_concurrent} at once)",
        err=True,
    )
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    command(prog_name="python -m stages.serve", auto_envvar_prefix="OLIVEPRESS_SERVE")
