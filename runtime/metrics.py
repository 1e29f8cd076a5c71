"""What ``GET /metrics`` shows: counters, gauges and histograms in Prometheus' text format (version 0.0.4), kept
by ``prometheus_client``.

Every metric is labelled by the served model (``base`` or an adapter's name), so each adapter's traffic and latency
show on their own.
"""

from __future__ import annotations

from collections.abc import Sequence

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

# Only the samples a scraper reads: no ``_created`` series beside each counter and histogram.
prometheus_client.disable_created_metrics()

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# Seconds: a time to first token spans a short prompt on a small model to a long one on a 4B model on 2 cores.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
# Seconds between two tokens of one answer: ~5 ms for a tiny model, ~100 ms for a 4B one under load.
TOKEN_BUCKETS = (0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)


class ServerMetrics:
    """The server's metrics, named as vLLM's and TGI's are where they mean the same thing; a registry of their own,
    so two servers in one process (the tests) keep apart."""

    def __init__(self, models: Sequence[str]) -> None:
        r = self.registry = CollectorRegistry()
        m = ("model",)
        self.requests = Counter("olivepress_requests", "Chat-completion requests answered, by HTTP status.",
                                ("model", "status"), registry=r)  # fmt: skip
        self.prompt_tokens = Counter("olivepress_prompt_tokens", "Prompt tokens read (tokens in).", m, registry=r)
        self.completion_tokens = Counter("olivepress_generation_tokens", "Tokens generated (tokens out).", m,
                                         registry=r)  # fmt: skip
        self.ttft = Histogram("olivepress_time_to_first_token_seconds", "From a request's arrival to its first token.",
                              m, buckets=TTFT_BUCKETS, registry=r)  # fmt: skip
        self.per_token = Histogram("olivepress_time_per_output_token_seconds",
                                   "Between two consecutive tokens of one answer.", m, buckets=TOKEN_BUCKETS,
                                   registry=r)  # fmt: skip
        self.duration = Histogram("olivepress_request_duration_seconds", "From a request's arrival to its last token.",
                                  m, buckets=DURATION_BUCKETS, registry=r)  # fmt: skip
        self.queued = Gauge("olivepress_queue_length", "Requests accepted and waiting for the generation loop.", m,
                            registry=r)  # fmt: skip
        self.running = Gauge("olivepress_running_requests", "Requests generating now.", m, registry=r)
        self.batch_size = Histogram("olivepress_batch_size", "Sequences decoded together per generation step.",
                                    buckets=BATCH_BUCKETS, registry=r)  # fmt: skip
        for model in models:  # every adapter shows from the start, at zero
            for metric in (self.queued, self.running, self.prompt_tokens, self.completion_tokens):
                metric.labels(model)

    def render(self) -> bytes:
        return generate_latest(self.registry)
