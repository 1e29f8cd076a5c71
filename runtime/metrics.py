"""What ``GET /metrics`` shows: counters, gauges and histograms in Prometheus' text format (version 0.0.4).

Written here rather than taken from ``prometheus_client``, so the slim image needs nothing more; the tests read
the output back with ``prometheus_client``'s own parser. Every metric is labelled by the served model (``base`` or
an adapter's name), so each adapter's traffic and latency show on their own.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: a time to first token spans a short prompt on a small model to a long one on a 4B model on 2 cores.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
# Seconds between two tokens of one answer: ~5 ms for a tiny model, ~100 ms for a 4B one under load.
TOKEN_BUCKETS = (0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)

Labels = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Labels, extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, registry: Registry, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, tuple(labels)
        self._lock = registry.lock
        registry.metrics.append(self)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def header(self) -> list[str]:  # the 0.0.4 format names a counter by its sample, ``_total`` and all
        return [f"# HELP {self.name}_total {self.help}", f"# TYPE {self.name}_total {self.kind}"]

    def __init__(self, registry: Registry, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(registry, name, help_text, labels)
        self.values: dict[Labels, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + amount

    def lines(self) -> list[str]:
        return [f"{self.name}_total{_labels(self.label_names, k)} {_number(v)}" for k, v in sorted(self.values.items())]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, registry: Registry, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(registry, name, help_text, labels)
        self.values: dict[Labels, float] = {}

    def set(self, *labels: str, value: float) -> None:
        with self._lock:
            self.values[labels] = value

    def add(self, *labels: str, amount: float) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + amount

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in sorted(self.values.items())]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, registry: Registry, name: str, help_text: str, buckets: Iterable[float], labels: Sequence[str] = ()
    ) -> None:
        super().__init__(registry, name, help_text, labels)
        self.bounds = tuple(sorted(buckets)) + (math.inf,)
        self.values: dict[Labels, tuple[list[int], list[float]]] = {}  # per labels: bucket counts, [sum]

    def observe(self, *labels: str, value: float) -> None:
        with self._lock:
            counts, total = self.values.setdefault(labels, ([0] * len(self.bounds), [0.0]))
            for i, bound in enumerate(self.bounds):
                if value <= bound:
                    counts[i] += 1
            total[0] += value

    def lines(self) -> list[str]:
        out = []
        for key, (counts, total) in sorted(self.values.items()):
            for bound, count in zip(self.bounds, counts, strict=True):
                le = 'le="' + _number(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {count}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(total[0])}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {counts[-1]}")
        return out


class Registry:
    """A set of metrics rendered together; each metric is thread-safe (the scheduler thread and the HTTP loop
    both record)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.metrics: list[_Metric] = []

    def render(self) -> str:
        with self.lock:
            lines = []
            for metric in self.metrics:
                lines += metric.header() + metric.lines()
        return "\n".join(lines) + "\n"


class ServerMetrics:
    """The server's metrics, named as vLLM's and TGI's are where they mean the same thing."""

    def __init__(self, models: Sequence[str]) -> None:
        r = self.registry = Registry()
        m = ("model",)
        self.requests = Counter(r, "olivepress_requests", "Chat-completion requests answered, by HTTP status.",
                                ("model", "status"))  # fmt: skip
        self.prompt_tokens = Counter(r, "olivepress_prompt_tokens", "Prompt tokens read (tokens in).", m)
        self.completion_tokens = Counter(r, "olivepress_generation_tokens", "Tokens generated (tokens out).", m)
        self.ttft = Histogram(
            r, "olivepress_time_to_first_token_seconds", "From a request's arrival to its first token.",
            TTFT_BUCKETS, m,
        )  # fmt: skip
        self.per_token = Histogram(
            r, "olivepress_time_per_output_token_seconds", "Between two consecutive tokens of one answer.",
            TOKEN_BUCKETS, m,
        )  # fmt: skip
        self.duration = Histogram(
            r, "olivepress_request_duration_seconds", "From a request's arrival to its last token.",
            DURATION_BUCKETS, m,
        )  # fmt: skip
        self.queued = Gauge(r, "olivepress_queue_length", "Requests accepted and waiting for the generation loop.", m)
        self.running = Gauge(r, "olivepress_running_requests", "Requests generating now.", m)
        self.batch_size = Histogram(
            r, "olivepress_batch_size", "Sequences decoded together per generation step.", BATCH_BUCKETS
        )
        for model in models:  # every adapter shows from the start, at zero
            for gauge in (self.queued, self.running):
                gauge.set(model, value=0)
            for counter in (self.prompt_tokens, self.completion_tokens):
                counter.inc(model, amount=0)

    def render(self) -> str:
        return self.registry.render()
