"""OpenAI's chat-completions API over an Engine, as plain functions and small classes: no sockets here.

A request body becomes a ``ChatRequest``, or an ``ApiError`` (OpenAI's error object, ``param`` naming the field);
``AnswerText`` turns generated tokens into text with stop strings cut out; ``completion`` and ``EventStream`` are
the two shapes of an answer; ``Service`` is what every request shares: the model, the scheduler, the bound on
requests at once, the metrics. ``runtime.http`` puts it on the network.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from runtime.batching import End, Item, Job, Scheduler
from runtime.engine import Engine, RefusedConversation, Sampling, UnknownAdapter, resolve
from runtime.metrics import ServerMetrics

MAX_STOPS = 4
OWNER = "olivepress"


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


ROLES = ("system", "developer", "user", "assistant", "tool")
# OpenAI's seed is a 64-bit integer; onnxruntime-genai seeds its sampler with a 32-bit one (-1: random).
SEED_RANGE = (-(2**63), 2**63 - 1)
OG_SEEDS = 2**31 - 1
MAX_TOKENS_LIMIT = 2**31 - 1


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param)


def _is_int(value: Any) -> bool:  # noqa: ANN401 (any JSON value)
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:  # noqa: ANN401 (any JSON value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(body: dict, name: str, low: float, high: float, default: float) -> float:
    """A number field from ``low`` to ``high`` (NaN and infinities, which Python's JSON reader accepts, are out)."""
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not (low <= value <= high):  # NaN fails every comparison
        raise _bad(name, f"{name} must be a number from {low:g} to {high:g}")
    return float(value)


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or not (low <= value <= high):
        raise _bad(name, f"{name} must be an integer from {low} to {high}")
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _bad(name, f"{name} must be true or false")
    return bool(value)


def _text_of(content: Any, param: str) -> str:  # noqa: ANN401 (any JSON value)
    """A message's content: a string, or OpenAI's list of parts (only text parts are understood)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _bad(param, "only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    if content is None:
        return ""
    raise _bad(param, "message content must be a string or a list of text parts")


def _messages(value: Any) -> list[dict[str, str]]:  # noqa: ANN401 (any JSON value)
    if not isinstance(value, list) or not value:
        raise _bad("messages", "messages must be a non-empty list")
    chat = []
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(param, "each message must be an object with a role and content")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"{param}.role", f"role must be one of {', '.join(ROLES)}")
        if message.get("name") is not None and not isinstance(message["name"], str):
            raise _bad(f"{param}.name", "name must be a string")
        chat.append({"role": role, "content": _text_of(message.get("content"), f"{param}.content")})
    return chat


def _stops(value: Any) -> tuple[str, ...]:  # noqa: ANN401 (any JSON value)
    stops = [value] if isinstance(value, str) else ([] if value is None else value)
    if not (isinstance(stops, list) and all(isinstance(s, str) for s in stops) and len(stops) <= MAX_STOPS):
        raise _bad("stop", f"stop must be a string or a list of up to {MAX_STOPS} strings")
    return tuple(stops)


def _unsupported(body: dict) -> None:
    """Fields of OpenAI's API that this server does not implement: checked, and refused unless they ask for the
    default behaviour."""
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, -2.0, 2.0, 0.0):
            raise _bad(name, f"{name} is not supported by this server; leave it out or set it to 0")
    n = _integer(body, "n", 1, 128)
    if n not in (None, 1):
        raise _bad("n", "only n=1 is supported")
    if _boolean(body, "logprobs"):
        raise _bad("logprobs", "logprobs are not supported by this server")
    if _integer(body, "top_logprobs", 0, 20):
        raise _bad("top_logprobs", "logprobs are not supported by this server")
    bias = body.get("logit_bias")
    if bias is not None and not isinstance(bias, dict):
        raise _bad("logit_bias", "logit_bias must be an object")
    if bias:
        raise _bad("logit_bias", "logit_bias is not supported by this server")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _bad("tools", "tools must be a list")
    if tools or body.get("functions"):
        raise _bad("tools" if tools else "functions", "tool calling is not supported by this server")
    choice = body.get("tool_choice")
    if choice not in (None, "none", "auto"):
        raise _bad("tool_choice", "tool calling is not supported by this server")
    _boolean(body, "parallel_tool_calls")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _bad("response_format", 'only response_format {"type": "text"} is supported')
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("user", "user must be a string")


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat-completion request."""

    model: str  # as the client named it: every response echoes it
    adapter: str  # the engine's name for it
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # onnxruntime-genai's: from 0 to OG_SEEDS - 1
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


def parse_chat_request(body: Any, models: Sequence[str], default_max_tokens: int) -> ChatRequest:  # noqa: ANN401
    """Check a chat-completion request body (parsed JSON) against the served ``models``, or raise a 400 whose
    ``param`` names the field. Fields this server does not know are ignored, as OpenAI-compatible servers do."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if not isinstance(body.get("model"), str):
        raise _bad("model", "model must be a string: one of " + ", ".join(models))
    adapter = served_model(body["model"], models)
    messages = _messages(body.get("messages"))
    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins when both are set
        max_tokens = _integer(body, name, 1, MAX_TOKENS_LIMIT) or max_tokens
    temperature = _number(body, "temperature", 0.0, 2.0, 0.0)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    seed = _integer(body, "seed", *SEED_RANGE)
    stop = _stops(body.get("stop"))
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", "stream_options must be an object")
    if options and not stream:
        raise _bad("stream_options", "stream_options is only allowed when stream is true")
    include_usage = (options or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise _bad("stream_options.include_usage", "stream_options.include_usage must be true or false")
    _unsupported(body)
    return ChatRequest(
        model=body["model"],
        adapter=adapter,
        messages=messages,
        max_tokens=max_tokens or default_max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=None if seed is None else seed % OG_SEEDS,
        stop=stop,
        stream=stream,
        include_usage=bool(include_usage),
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
    """Token counts of one answer; ``AnswerText`` counts the completion as it generates."""

    prompt_tokens: int
    completion_tokens: int = 0

    def payload(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}


class AnswerText:
    """An answer's text as its tokens come: what is safe to send now, and why it finished.

    ``feed`` takes each (token id, text piece) and returns the text to send; once an end-of-sequence token or a stop
    string has come, ``finish`` is "stop" and the rest must not be generated. ``close`` ends it early (the
    generation ran out of budget: "length") and returns the text held back, if any.
    """

    def __init__(self, eos_ids: set[int], stops: Sequence[str], usage: Usage) -> None:
        self.eos_ids = eos_ids
        self.scanner = StopScanner(stops)
        self.usage = usage
        self.finish: str | None = None

    def feed(self, token: int, piece: str) -> str:
        self.usage.completion_tokens += 1
        if token in self.eos_ids:
            self.finish = "stop"
            return self.scanner.flush()
        text = self.scanner.feed(piece)
        if self.scanner.stopped:
            self.finish = "stop"
        return text

    def close(self, reason: str = "length") -> str:
        self.finish = self.finish or reason
        return self.scanner.flush()


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


def completion(model: str, text: str, finish: str, usage: Usage) -> dict[str, Any]:
    """A whole ``chat.completion``: the answer's text, its finish reason and usage."""
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": usage.payload(),
    }


class EventStream:
    """The server-sent events of one streamed answer, each ``data: ...\n\n``: ``start`` (the assistant's role),
    ``content`` as text comes, ``finish``, ``usage`` if asked for, ``done``; or ``error`` when it cannot finish."""

    def __init__(self, model: str) -> None:
        self.model, self.id, self.created = model, completion_id(), int(time.time())
        # Every content event is the same JSON but for the text: serialize the rest once, not once per token.
        marker = "\u0000olivepress\u0000"
        head, tail = json.dumps(self._chunk({"content": marker}, None)).split(json.dumps(marker))
        self.head, self.tail = f"data: {head}", f"{tail}\n\n"

    def _chunk(self, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
        return chunk(self.model, self.id, self.created, delta, finish)

    @staticmethod
    def event(payload: dict[str, Any] | str) -> bytes:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        return f"data: {data}\n\n".encode()

    def start(self) -> bytes:
        return self.event(self._chunk({"role": "assistant", "content": ""}, None))

    def content(self, text: str) -> bytes:
        return f"{self.head}{json.dumps(text)}{self.tail}".encode()

    def finish(self, reason: str) -> bytes:
        return self.event(self._chunk({}, reason))

    def usage(self, usage: Usage) -> bytes:
        return self.event({**self._chunk({}, None), "choices": [], "usage": usage.payload()})

    def done(self) -> bytes:
        return self.event("[DONE]")

    def error(self, error: ApiError) -> bytes:
        """OpenAI's in-stream error (its clients raise it): the answer cannot be finished."""
        return self.event(error.body())


def model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": OWNER}


def model_list(names: Sequence[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(n, created) for n in names]}


# How a generation that did not finish by itself is reported: (HTTP status, error type, message).
ENDINGS = {
    "timeout": (504, "timeout", "the request took longer than the server's --request-timeout"),
    "shutdown": (503, "server_error", "the server is shutting down; retry on another instance or later"),
    "error": (500, "server_error", "generation failed"),
    "cancelled": (499, "invalid_request_error", "the request was cancelled"),
}


def ending_error(end: End) -> ApiError:
    status, kind, message = ENDINGS[end.reason]
    return ApiError(status, end.message or message, kind=kind)


@dataclass
class Generation:
    """A request ready to run: its prompt's tokens, the new tokens it may generate, its usage as it runs."""

    request: ChatRequest
    ids: list[int]
    max_tokens: int
    usage: Usage


class Service:
    """What every request shares: the model, the scheduler that generates, the bound on requests at once
    (queued or generating), the metrics, and whether the server is shutting down."""

    def __init__(
        self,
        engine: Engine,
        max_concurrent: int = 1,
        default_max_tokens: int = 512,
        request_timeout_s: float = 600.0,
        batch_window_s: float = 0.05,
        step_delay_s: float = 0.0,
    ) -> None:
        self.engine = engine
        self.max_concurrent = max_concurrent
        self.default_max_tokens = default_max_tokens
        self.request_timeout_s = request_timeout_s
        self.created = int(time.time())
        self.metrics = ServerMetrics(engine.names)
        self.scheduler = Scheduler(engine, max_concurrent, batch_window_s, self.metrics, step_delay_s)
        self.active = 0
        self.draining = False
        self._lock = threading.Lock()

    @property
    def model_names(self) -> list[str]:
        return self.engine.names

    def models(self) -> dict[str, Any]:
        return model_list(self.model_names, self.created)

    def model(self, name: str) -> dict[str, Any]:
        served_model(name, self.model_names)
        return model_object(name, self.created)

    def label(self, body: Any) -> str:  # noqa: ANN401 (any JSON value)
        """The model a request body names, as the metrics label it: a served name, or "unknown"."""
        try:
            return served_model(body.get("model"), self.model_names) if isinstance(body, dict) else "unknown"
        except ApiError:
            return "unknown"

    def health(self) -> dict[str, Any]:
        return {
            "status": "draining" if self.draining else "ok",
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
        """Take one of the ``max_concurrent`` places, or raise a 429 (full) or a 503 (shutting down)."""
        with self._lock:
            if self.draining:
                raise ApiError(503, ENDINGS["shutdown"][2], kind="server_error")
            if self.active >= self.max_concurrent:
                busy = f"all {self.max_concurrent} generation slot(s) are busy; retry shortly"
                raise ApiError(429, busy, kind="rate_limit_error")
            self.active += 1

    def release(self) -> None:
        with self._lock:
            self.active -= 1

    def submit(
        self, generation: Generation, deliver: Callable[[Item], object], arrived: float, announced: bool = False
    ) -> Job:
        """Start generating ``generation`` (its place taken with ``acquire``, and ``announced`` to the scheduler
        when it arrived); its tokens and end go to ``deliver``, from the scheduler's thread."""
        request = generation.request
        self.metrics.prompt_tokens.labels(request.adapter).inc(generation.usage.prompt_tokens)
        job = Job(
            ids=generation.ids,
            adapter=request.adapter,
            max_new_tokens=generation.max_tokens,
            sampling=Sampling(request.temperature, request.top_p, request.seed),
            deliver=deliver,
            deadline=arrived + self.request_timeout_s,
            arrived=arrived,
        )
        self.scheduler.submit(job, announced)
        return job

    def begin_shutdown(self, grace_s: float) -> None:
        """Refuse new requests (503); what is generating may finish within ``grace_s`` seconds, then ends."""
        with self._lock:
            self.draining = True
        self.scheduler.shutdown(time.monotonic() + grace_s)
