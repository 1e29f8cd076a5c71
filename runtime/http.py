"""The HTTP layer of ``serve``: a Starlette app on uvicorn over an ``openai_api.Service``.

uvicorn keeps connections alive, listens with a deep backlog (a burst of requests waits in the kernel, never
reset), and on SIGTERM or Ctrl-C stops listening, refuses new requests with 503, lets answers in progress finish
within the grace period and then ends them with an error event, before exiting 0. A request beyond the
service's bound gets 429 with ``Retry-After`` at once rather than queueing behind a long answer.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/models/<id>``, ``GET /health``,
``GET /metrics`` (Prometheus) and ``GET /`` (the chat page, ``runtime/static/chat.html``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from runtime.batching import End, Item, Job
from runtime.metrics import CONTENT_TYPE
from runtime.openai_api import AnswerText, ApiError, EventStream, Generation, Service, completion, ending_error

log = logging.getLogger("olivepress")
MAX_BODY = 4 * 1024 * 1024
DRAIN_LIMIT = 64 * 1024 * 1024  # a body over MAX_BODY is still read up to this, so its sender gets the 413
PAGE = Path(__file__).resolve().parent / "static" / "chat.html"
BACKLOG = 2048  # pending connections the kernel holds while the loop is busy (Python's default is 5)


def error_response(error: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status in (429, 503) else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def read_json(request: Request, timeout_s: float) -> Any:  # noqa: ANN401 (any JSON value)
    """The request's JSON body: at most MAX_BODY bytes, read within ``timeout_s``.

    A larger body is read to its end (up to DRAIN_LIMIT) and dropped before the 413, so the client, still sending,
    reads the answer instead of a reset connection.
    """
    length = request.headers.get("content-length")
    if length is not None and not length.isdigit():
        raise ApiError(400, "Content-Length must be a number of bytes")
    if length is not None and int(length) > DRAIN_LIMIT:
        raise ApiError(413, f"the body is over {MAX_BODY} bytes")

    async def read() -> bytes:
        data, size = bytearray(), 0
        async for piece in request.stream():
            size += len(piece)
            if size > DRAIN_LIMIT:
                break
            if size <= MAX_BODY:
                data += piece
        if size > MAX_BODY:
            raise ApiError(413, f"the body is over {MAX_BODY} bytes")
        return bytes(data)

    try:
        raw = await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the body did not arrive within {timeout_s:g} s") from None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {str(exc)[:200]}") from None


class Answer:
    """One accepted request's generation seen from the event loop: its tokens arrive on a queue from the
    scheduler's thread; ``close`` (exactly once, however the answer ends) cancels what is left and frees its place."""

    def __init__(self, service: Service, generation: Generation, arrived: float, announced: bool) -> None:
        self.service, self.generation, self.arrived = service, generation, arrived
        self.request = generation.request
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def deliver(item: Item) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, item)
            except RuntimeError:  # the loop is gone: the server has stopped
                pass

        self.text = AnswerText(service.engine.eos_token_ids, self.request.stop, generation.usage)
        self.job: Job = service.submit(generation, deliver, arrived, announced)
        self.closed = False
        self.sent_all = False  # a stream's last event is written
        self.disconnected = False

    async def items(self) -> AsyncIterator[tuple[str, str | None]]:
        """(text to send, None) as text comes, then (text, finish reason); an unfinished generation raises its
        ApiError (timeout, shutdown, failure)."""
        while True:
            item = await self.queue.get()
            if isinstance(item, End):
                if item.reason in ("stop", "length"):
                    yield self.text.close(item.reason), self.text.finish
                    return
                raise ending_error(item)
            text = self.text.feed(*item)
            if self.text.finish:
                self.job.cancel()  # a stop string or end of sequence: nothing more to generate
                yield text, self.text.finish
                return
            if text:
                yield text, None

    def close(self, status: int) -> None:
        if self.closed:
            return
        self.closed = True
        self.job.cancel()
        self.service.release()
        usage, elapsed = self.generation.usage, time.monotonic() - self.arrived
        self.service.metrics.requests.labels(self.request.adapter, str(status)).inc()
        if self.disconnected:
            log.info("%s: client disconnected after %d tokens, %.2f s", self.request.model, usage.completion_tokens,
                     elapsed)  # fmt: skip
        else:
            first = self.job.first_token_at
            ttft = f"{(first - self.arrived) * 1000:.0f} ms" if first else "none"
            outcome = self.text.finish or status
            log.info("%s: %d prompt + %d tokens in %.2f s (first token %s, %s)", self.request.model,
                     usage.prompt_tokens, usage.completion_tokens, elapsed, ttft, outcome)  # fmt: skip


class AnswerStream(StreamingResponse):
    """A streamed answer whose ``Answer`` is closed however the response ends, even if it never started."""

    def __init__(self, answer: Answer, body: AsyncIterator[bytes]) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.answer.disconnected = not self.answer.sent_all
            self.answer.close(200)


def make_app(service: Service) -> Starlette:
    page = PAGE.read_bytes()
    timeout_s = service.request_timeout_s

    async def chat_completions(request: Request) -> Response:
        arrived, body = time.monotonic(), None
        service.scheduler.announce()  # an idle scheduler waits for requests sent together, to batch them
        try:
            body = await read_json(request, timeout_s)
            generation = await asyncio.to_thread(service.prepare, body)
            service.acquire()
        except BaseException as error:
            service.scheduler.withdraw()
            if not isinstance(error, ApiError):
                raise
            service.metrics.requests.labels(service.label(body), str(error.status)).inc()
            return error_response(error)
        answer = Answer(service, generation, arrived, announced=True)
        items = answer.items()
        try:
            first = await anext(items)  # before any header: an answer that cannot start gets its own status
        except ApiError as error:
            answer.close(error.status)
            return error_response(error)
        except BaseException:
            answer.disconnected = True
            answer.close(499)
            raise
        if generation.request.stream:
            return AnswerStream(answer, stream(answer, first, items))
        return await whole(answer, first, items, request)

    async def stream(answer: Answer, first: tuple[str, str | None], items: AsyncIterator) -> AsyncIterator[bytes]:
        events = EventStream(answer.request.model)
        yield events.start()
        text, finish = first
        try:
            while True:
                if text:
                    yield events.content(text)
                if finish:
                    break
                text, finish = await anext(items)
        except ApiError as error:  # timed out, shut down or failed: OpenAI's in-stream error, then the end
            log.warning("%s: %s after %d tokens", answer.request.model, error.message,
                        answer.generation.usage.completion_tokens)  # fmt: skip
            answer.sent_all = True
            yield events.error(error)
            return
        yield events.finish(finish)
        if answer.request.include_usage:
            yield events.usage(answer.generation.usage)
        answer.sent_all = True
        yield events.done()

    async def whole(answer: Answer, first: tuple[str, str | None], items: AsyncIterator, request: Request) -> Response:
        (text, finish), parts = first, []
        try:
            while True:
                parts.append(text)
                if finish:
                    break
                if len(parts) % 16 == 0 and await request.is_disconnected():
                    answer.disconnected = True
                    answer.close(499)
                    return Response(status_code=499)
                text, finish = await anext(items)
        except ApiError as error:
            answer.close(error.status)
            return error_response(error)
        answer.close(200)
        return JSONResponse(completion(answer.request.model, "".join(parts), finish, answer.generation.usage))

    async def models(request: Request) -> Response:
        return JSONResponse(service.models())

    async def model(request: Request) -> Response:
        try:
            return JSONResponse(service.model(request.path_params["name"]))
        except ApiError as error:
            return error_response(error)

    async def health(request: Request) -> Response:
        return JSONResponse(service.health(), status_code=503 if service.draining else 200)

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    async def index(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(ApiError(404, f"no route {request.method} {request.url.path}"))

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed})


class Server(uvicorn.Server):
    """uvicorn's server, with the service told when a signal asks it to stop, and a ready callback."""

    def __init__(self, config: uvicorn.Config, service: Service, grace_s: float, ready: Callable[[], Any]) -> None:
        super().__init__(config)
        self.service, self.grace_s, self.ready = service, grace_s, ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.ready()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn's own handler re-raises the signal after a graceful stop (exit -15); a drained server exits 0.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
            return
        if not self.should_exit:
            log.warning("stopping: finishing %d answer(s) within %g s", self.service.active, self.grace_s)
        self.service.begin_shutdown(self.grace_s)
        self.should_exit = True


def listen(host: str, port: int) -> socket.socket:
    """A listening socket with a deep backlog; an OSError says why it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def serve(service: Service, sock: socket.socket, grace_s: float, verbose: bool, ready: Callable[[], Any]) -> None:
    """Serve until SIGTERM or Ctrl-C, then drain within ``grace_s`` seconds."""
    config = uvicorn.Config(
        make_app(service),
        backlog=BACKLOG,
        timeout_keep_alive=5,
        # uvicorn's own cut-off, past the service's: answers still running by then were already ended.
        timeout_graceful_shutdown=int(grace_s) + 3,
        log_config=None,
        access_log=verbose,
        lifespan="off",
        loop="asyncio",
        http="h11",
    )
    service.scheduler.start()
    try:
        Server(config, service, grace_s, ready).run(sockets=[sock])
    finally:
        service.begin_shutdown(0)
        service.scheduler.join(timeout=5)
