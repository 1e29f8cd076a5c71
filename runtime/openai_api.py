"""OpenAI's chat-completions API over an Engine, as plain functions and small classes: no sockets here.

A request body becomes a ``ChatRequest``, or an ``ApiError`` (OpenAI's error object, ``param`` naming the field);
``pieces`` turns the engine's tokens into (text, finish_reason) pairs with stop strings cut out; ``completion``
and ``sse_events`` are the two shapes of an answer; ``Service`` is what every request shares: the model and the
bound on concurrent generations. ``runtime.http`` puts it on the network.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from runtime.engine import Engine, RefusedConversation, UnknownAdapter, resolve

MAX_STOPS = 4
OWNER = "olivepress"

# (text, finish_reason) pairs, as ``pieces`` yields them.
Pieces = Generator[tuple[str, str | None], None, None]
Tokens = Generator[tuple[int, str], None, None]


class ApiError(Exception):
    """An error the client caused (or a full server), sent as OpenAI's error object."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def served_model(model: Any, models: Sequence[str]) -> str:  # noqa: ANN401 (any JSON value)
    """The engine's name for a request's ``model``: one of ``models``, the base under any of its aliases."""
    try:
        return resolve(model, models, noun="model")
    except UnknownAdapter as error:
        raise ApiError(400, error.message, param="model") from None


def _text_of(content: Any) -> str:  # noqa: ANN401 (any JSON value)
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


def _is_int(value: Any) -> bool:  # noqa: ANN401 (any JSON value)
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat-completion request."""

    model: str  # as the client named it: every response echoes it
    adapter: str  # the engine's name for it
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


def parse_chat_request(body: Any, models: Sequence[str], default_max_tokens: int) -> ChatRequest:  # noqa: ANN401
    """Check a chat-completion request body (parsed JSON) against the served ``models``, or raise a 400."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    adapter = served_model(body.get("model"), models)
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
        max_tokens = default_max_tokens
    if not _is_int(max_tokens) or max_tokens < 1:
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
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOPS):
        raise ApiError(400, f"stop must be a string or a list of up to {MAX_STOPS} strings", param="stop")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ApiError(400, "seed must be an integer", param="seed")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    return ChatRequest(
        model=body["model"],
        adapter=adapter,
        messages=chat,
        max_tokens=max_tokens,
        temperature=float(temperature or 0.0),
        top_p=float(1.0 if top_p is None else top_p),
        seed=seed,
        stop=tuple(stop),
        stream=bool(body.get("stream", False)),
        include_usage=bool(stream_options.get("include_usage", False)),
    )


def token_budget(max_tokens: int, prompt_tokens: int, context_length: int) -> int:
    """The new tokens a request may generate: what it asked for, capped by the room its prompt leaves."""
    room = context_length - prompt_tokens
    if room < 1:
        raise ApiError(
            400, f"the prompt is {prompt_tokens} tokens; the model's context is {context_length}", param="messages"
        )
    return min(max_tokens, room)


class StopScanner:
    """Cuts generated text at the first stop string, holding back a tail that might be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
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


@dataclass
class Usage:
    """Token counts of one answer; ``pieces`` counts the completion as it generates."""

    prompt_tokens: int
    completion_tokens: int = 0

    def payload(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}


def pieces(tokens: Tokens, eos_ids: set[int], stop: Sequence[str], usage: Usage) -> Pieces:
    """(text, None) pairs as text becomes safe to send, then a last (text, finish_reason): "stop" at an end of
    sequence token or a stop string, "length" when ``tokens`` runs out. Closing it closes ``tokens``."""
    scanner = StopScanner(stop)
    finish = "length"
    try:
        for token, piece in tokens:
            usage.completion_tokens += 1
            if token in eos_ids:
                finish = "stop"
                break
            text = scanner.feed(piece)
            if scanner.stopped:
                finish = "stop"
                yield text, None
                break
            if text:
                yield text, None
    finally:
        tokens.close()
    yield scanner.flush(), finish


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def chunk(model: str, rid: str, created: int, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    """One ``chat.completion.chunk`` event of a streamed answer."""
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def completion(model: str, answer: Iterable[tuple[str, str | None]], usage: Usage) -> dict[str, Any]:
    """A whole ``chat.completion``: all of ``answer`` (``pieces``' output), its finish reason and usage."""
    parts, finish = [], "length"
    for text, reason in answer:
        parts.append(text)
        finish = reason or finish
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(parts)},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": usage.payload(),
    }


def sse_events(model: str, answer: Pieces, usage: Usage, include_usage: bool) -> Generator[bytes, None, None]:
    """The server-sent events of a streamed answer, each ``data: ...\\n\\n``: the assistant's role, the text as it
    comes, the finish reason, the usage if asked for, ``[DONE]``. Closing it closes ``answer``."""
    rid, created = completion_id(), int(time.time())

    def event(payload: dict[str, Any] | str) -> bytes:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        return f"data: {data}\n\n".encode()

    # Every content event is the same JSON but for the text: serialize the rest once, not once per token.
    marker = "\u0000olivepress\u0000"
    head, tail = json.dumps(chunk(model, rid, created, {"content": marker}, None)).split(json.dumps(marker))
    head, tail = f"data: {head}", f"{tail}\n\n"
    try:
        yield event(chunk(model, rid, created, {"role": "assistant", "content": ""}, None))
        for text, finish in answer:
            if text:
                yield f"{head}{json.dumps(text)}{tail}".encode()
            if finish:
                yield event(chunk(model, rid, created, {}, finish))
        if include_usage:
            yield event({**chunk(model, rid, created, {}, None), "choices": [], "usage": usage.payload()})
        yield event("[DONE]")
    finally:
        answer.close()


def model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": OWNER}


def model_list(names: Sequence[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(n, created) for n in names]}


@dataclass
class Generation:
    """A request ready to run: its prompt's tokens, the new tokens it may generate, its usage as it runs."""

    request: ChatRequest
    ids: list[int]
    max_tokens: int
    usage: Usage


def _slowed(tokens: Tokens, delay_s: float) -> Tokens:
    try:
        for item in tokens:
            yield item
            time.sleep(delay_s)
    finally:
        tokens.close()


class Service:
    """The model, its adapters and the bound on concurrent generations: what every request handler shares."""

    def __init__(
        self,
        engine: Engine,
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
        return self.engine.names

    def models(self) -> dict[str, Any]:
        return model_list(self.model_names, self.created)

    def model(self, name: str) -> dict[str, Any]:
        served_model(name, self.model_names)
        return model_object(name, self.created)

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "models": self.model_names,
            "active": self.active,
            "max_concurrent": self.max_concurrent,
        }

    def prepare(self, body: Any) -> Generation:  # noqa: ANN401 (any JSON value)
        """Check a request and tokenize its conversation, or raise a 400."""
        request = parse_chat_request(body, self.model_names, self.default_max_tokens)
        try:
            ids = self.engine.chat_tokens(request.messages)
        except RefusedConversation as error:
            raise ApiError(400, error.message, param="messages") from None
        max_tokens = token_budget(request.max_tokens, len(ids), self.engine.context_length)
        return Generation(request, ids, max_tokens, Usage(prompt_tokens=len(ids)))

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

    def pieces(self, generation: Generation) -> Pieces:
        """The answer to ``generation`` as ``pieces`` gives it; nothing runs until the first is asked for."""
        request = generation.request
        tokens = self.engine.stream(
            generation.ids, request.adapter, generation.max_tokens, request.temperature, request.top_p, request.seed
        )
        if self.token_delay_s:
            tokens = _slowed(tokens, self.token_delay_s)
        return pieces(tokens, self.engine.eos_token_ids, request.stop, generation.usage)
