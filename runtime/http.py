"""The HTTP layer of ``serve``: the standard library's ``ThreadingHTTPServer`` over an ``openai_api.Service``.

Nothing to install in the slim image. HTTP/1.1 with keep-alive, streams in chunked transfer encoding, TCP_NODELAY;
a request beyond the service's bound gets 429 with ``Retry-After`` at once rather than queueing behind a long
answer. Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/models/<id>``, ``GET /health``.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from runtime.openai_api import ApiError, Generation, Service, completion, sse_events

log = logging.getLogger("olivepress")
MAX_BODY = 4 * 1024 * 1024


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

    def _read_json(self) -> Any:  # noqa: ANN401 (any JSON value)
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
        try:
            if path == "/health":
                self._send_json(200, self.service.health())
            elif path == "/v1/models":
                self._send_json(200, self.service.models())
            elif path.startswith("/v1/models/"):
                self._send_json(200, self.service.model(path.removeprefix("/v1/models/")))
            else:
                raise ApiError(404, f"no route GET {path}")
        except ApiError as error:
            self._send_error(error)

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            body = self._read_json()  # read even for an unknown route, so keep-alive stays in step
            if path != "/v1/chat/completions":
                raise ApiError(404, f"no route POST {path}")
            generation = self.service.prepare(body)
            self.service.acquire()
        except ApiError as error:
            self._send_error(error)
            return
        stream = generation.request.stream
        try:
            if stream:
                self._stream(generation)
            else:
                self._complete(generation)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug or a runtime failure: an answer, not a dropped connection
            log.exception("generation failed")
            if not stream:  # a stream has sent its headers already; it can only end
                self._send_error(ApiError(500, f"generation failed: {exc}", kind="server_error"))
            self.close_connection = True
        finally:
            self.service.release()

    def _complete(self, generation: Generation) -> None:
        started = time.perf_counter()
        model = generation.request.model
        self._send_json(200, completion(model, self.service.pieces(generation), generation.usage))
        log.info("%s: %d tokens in %.2f s", model, generation.usage.completion_tokens, time.perf_counter() - started)

    def _stream(self, generation: Generation) -> None:
        request = generation.request
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = sse_events(request.model, self.service.pieces(generation), generation.usage, request.include_usage)
        try:
            for event in events:
                self._write_chunk(event)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            # The client went away: stop generating (closing the events closes the engine's loop).
            self.close_connection = True
            log.info("%s: client disconnected after %s tokens", request.model, generation.usage.completion_tokens)
        finally:
            events.close()


def make_server(service: Service, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"service": service})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True  # a stuck client never blocks shutdown
    return server
