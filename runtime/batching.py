"""The server's generation loop: every request's tokens come from one thread that owns the model.

onnxruntime-genai 0.14.1 on the CPU can decode several sequences in one generator (a static batch: one adapter
and one sampling setting per generator, rows admitted only when it starts). Its ``og.Engine``/``og.Request`` API
batches too, but in that version on the CPU it only forms static batches of at most four, admits no request until
the whole batch has finished, and sets no adapter (README, "Serve on a laptop"); continuous batching there needs its
paged key-value cache, which runs on CUDA only. So the scheduler builds on batched generators:

- requests that arrive together with the same adapter and sampling are decoded as one ``Batch``: one weight pass
  per token for all of them. "Together": while a step runs, or, on an idle loop, while requests that arrived
  with the first are still being read and tokenized (``announce``d, up to ``batch_window_s``);
- batches of different adapters, and requests that arrive while others are generating, run as their own batches,
  interleaved step by step in this one thread, so a newcomer starts at the next step instead of waiting for the
  others to finish, and the cores are never split between competing loops;
- one thread runs every onnxruntime call (onnxruntime-genai's Python calls hold the GIL; several threads would
  only take turns).

Each ``Job`` reports its tokens and its end through its ``deliver`` callback, from this thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from runtime.engine import Batch, Engine, Sampling
from runtime.metrics import ServerMetrics

log = logging.getLogger("olivepress")


@dataclass(frozen=True)
class End:
    """How a job ended: ``reason`` is "stop" (end-of-sequence token), "length" (its budget), "cancelled",
    "timeout", "shutdown" or "error"; ``message`` says more for the last three."""

    reason: str
    message: str = ""


# What a job's deliver callback receives: (token id, text piece) per token, then one End.
Item = tuple[int, str] | End


@dataclass(eq=False)
class Job:
    """One request's generation. ``deliver`` is called from the scheduler's thread; ``cancel`` from any thread."""

    ids: list[int]
    adapter: str
    max_new_tokens: int
    sampling: Sampling
    deliver: Callable[[Item], object]
    deadline: float = float("inf")  # time.monotonic() after which it ends as a "timeout"
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    started: bool = False  # its batch was formed
    tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    ended: End | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def batch_key(self) -> tuple:
        """Jobs with equal keys may share a generator: same adapter and sampling; a seeded job must run alone to
        give the same text as it would alone."""
        s = self.sampling
        sampling = "greedy" if s.greedy else (s.temperature, s.top_p, id(self) if s.seed is not None else None)
        return self.adapter, sampling


@dataclass(eq=False)
class Running:
    """A batch and the jobs in its rows."""

    batch: Batch
    jobs: list[Job]


class Scheduler:
    """Admits jobs into batches and steps every batch, round robin, in one thread."""

    def __init__(
        self,
        engine: Engine,
        max_batch: int = 4,
        batch_window_s: float = 0.01,
        metrics: ServerMetrics | None = None,
        step_delay_s: float = 0.0,
    ) -> None:
        self.engine = engine
        self.step_delay_s = step_delay_s  # tests and demos: a visibly slow model
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.metrics = metrics
        self.pending: deque[Job] = deque()
        self.announced = 0  # requests on their way to submit (being read and tokenized)
        self.running: list[Running] = []
        self.condition = threading.Condition()
        self.stopping = False
        self.drain_deadline = float("inf")
        self.thread = threading.Thread(target=self._loop, name="olivepress-generation", daemon=True)

    # --- what the HTTP side calls ---------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def announce(self) -> None:
        """A request has arrived and will be submitted (or withdrawn) soon: an idle loop waits for it, briefly, to
        batch it with the others."""
        with self.condition:
            self.announced += 1

    def withdraw(self) -> None:
        """An announced request will not be submitted (refused, or its client left)."""
        with self.condition:
            self.announced -= 1
            self.condition.notify()

    def submit(self, job: Job, announced: bool = False) -> None:
        with self.condition:
            self.announced -= announced
            if self.stopping:
                self._end(job, End("shutdown", "the server is shutting down"))
                return
            self.pending.append(job)
            self._gauge(self.metrics and self.metrics.queued, job.adapter, 1)
            self.condition.notify()

    def shutdown(self, deadline: float) -> None:
        """Take no new job; jobs still generating at ``deadline`` (time.monotonic()) end as "shutdown"."""
        with self.condition:
            self.stopping = True
            self.drain_deadline = deadline
            self.condition.notify()

    def join(self, timeout: float | None = None) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    @property
    def busy(self) -> int:
        """Jobs queued or generating."""
        with self.condition:
            return len(self.pending) + sum(len(r.jobs) for r in self.running)

    # --- the loop --------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self.pending and not self.running and not self.stopping:
                    self.condition.wait()
                if self.pending and not self.running and not self.stopping:
                    # An idle loop's first arrival: the requests that arrived with it join its batch.
                    until = time.monotonic() + self.batch_window_s
                    while self.announced > 0 and len(self.pending) < self.max_batch:
                        if (left := until - time.monotonic()) <= 0:
                            break
                        self.condition.wait(left)
                arrivals = list(self.pending)
                self.pending.clear()
                if self.stopping and not arrivals and not self.running:
                    return
            for job in arrivals:
                self._gauge(self.metrics and self.metrics.queued, job.adapter, -1)
            if self.stopping:
                for job in arrivals:
                    self._end(job, End("shutdown", "the server is shutting down"))
                arrivals = []
            for group in self.group(arrivals):
                self._start(group)
            for running in list(self.running):
                self._step(running)
            if self.step_delay_s and self.running:
                time.sleep(self.step_delay_s)

    def group(self, jobs: list[Job]) -> list[list[Job]]:
        """Jobs that can share a generator, in arrival order: same batch key, at most max_batch, and the longest
        prompt plus the largest budget within the model's context (rows are padded to the longest prompt)."""
        groups: list[list[Job]] = []
        context = self.engine.context_length
        pad = self.engine.pad_token_id
        for job in jobs:
            if job.cancelled:
                self._end(job, End("cancelled"))
                continue
            for group in groups:
                fits = max(len(j.ids) for j in (*group, job)) + max(j.max_new_tokens for j in (*group, job))
                if (
                    len(group) < self.max_batch
                    and group[0].batch_key() == job.batch_key()
                    and fits <= context
                    and job.ids[-1] != pad  # a trailing pad token would be masked as padding
                    and group[0].ids[-1] != pad
                ):
                    group.append(job)
                    break
            else:
                groups.append([job])
        return groups

    def _start(self, jobs: list[Job]) -> None:
        first = jobs[0]
        for job in jobs:
            job.started = True
            self._gauge(self.metrics and self.metrics.running, job.adapter, 1)
        try:
            batch = Batch(self.engine, [j.ids for j in jobs], first.adapter, [j.max_new_tokens for j in jobs],
                          first.sampling)  # fmt: skip
        except Exception as exc:  # a runtime failure: an answer, not a dead loop
            log.exception("prefill failed")
            for job in jobs:
                self._end(job, End("error", f"generation failed: {exc}"))
            return
        self.running.append(Running(batch, jobs))

    def _step(self, running: Running) -> None:
        batch, jobs = running.batch, running.jobs
        now = time.monotonic()
        for row in batch.open_rows:
            job = jobs[row]
            ended = (
                End("cancelled") if job.cancelled
                else End("timeout", "the request timed out") if now > job.deadline
                else End("shutdown", "the server is shutting down") if now > self.drain_deadline
                else None
            )  # fmt: skip
            if ended:
                batch.close(row)
                self._end(job, ended)
        if batch.open_rows:
            if self.metrics:
                self.metrics.batch_size.observe(len(batch.open_rows))
            try:
                produced = batch.step()
            except Exception as exc:
                log.exception("generation failed")
                produced = []
                for row in batch.open_rows:
                    batch.close(row)
                    self._end(jobs[row], End("error", f"generation failed: {exc}"))
            now = time.monotonic()
            for row, token, piece in produced:
                self._token(jobs[row], token, piece, now)
                if row not in batch.open_rows:
                    reason = "stop" if token in self.engine.eos_token_ids else "length"
                    self._end(jobs[row], End(reason))
        if not batch.open_rows:
            self.running.remove(running)

    # --- bookkeeping -----------------------------------------------------------------------------------------

    def _token(self, job: Job, token: int, piece: str, now: float) -> None:
        job.tokens += 1
        if self.metrics:
            if job.first_token_at is None:
                self.metrics.ttft.labels(job.adapter).observe(now - job.arrived)
            else:
                self.metrics.per_token.labels(job.adapter).observe(now - job.last_token_at)
        job.first_token_at = job.first_token_at or now
        job.last_token_at = now
        job.deliver((token, piece))

    def _end(self, job: Job, end: End) -> None:
        if job.ended:
            return
        job.ended = end
        if self.metrics:
            self.metrics.completion_tokens.labels(job.adapter).inc(job.tokens)
            self.metrics.duration.labels(job.adapter).observe(time.monotonic() - job.arrived)
            if job.started:
                self._gauge(self.metrics.running, job.adapter, -1)
        job.deliver(end)

    @staticmethod
    def _gauge(gauge, model: str, amount: int) -> None:  # noqa: ANN001 (a prometheus_client Gauge or None)
        if gauge is not None:
            gauge.labels(model).inc(amount)
