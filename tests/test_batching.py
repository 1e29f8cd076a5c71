"""runtime.batching: how the scheduler groups, batches, interleaves and ends jobs, with a stand-in for the model."""

from __future__ import annotations

import threading
import time

import pytest

from runtime import batching
from runtime.batching import End, Job, Scheduler
from runtime.engine import Sampling


class FakeEngine:
    context_length = 64
    pad_token_id = 0
    eos_token_ids = {99}


class FakeBatch:
    """Token i of every row is 100 + i; a row ends at its budget. Each batch is recorded with its rows."""

    made: list[FakeBatch] = []

    def __init__(self, engine, prompts, adapter, budgets, sampling) -> None:
        self.adapter, self.prompts, self.budgets = adapter, prompts, budgets
        self.counts = [0] * len(prompts)
        self.open = [True] * len(prompts)
        self.steps = 0
        FakeBatch.made.append(self)

    @property
    def open_rows(self):
        return [r for r, is_open in enumerate(self.open) if is_open]

    def close(self, row):
        self.open[row] = False

    def step(self):
        self.steps += 1
        out = []
        for row in self.open_rows:
            self.counts[row] += 1
            out.append((row, 100 + self.counts[row], f"w{self.counts[row]} "))
            if self.counts[row] >= self.budgets[row]:
                self.close(row)
        return out


@pytest.fixture
def scheduler(monkeypatch):
    monkeypatch.setattr(batching, "Batch", FakeBatch)
    FakeBatch.made = []
    made = []

    def make(**kwargs) -> Scheduler:
        s = Scheduler(FakeEngine(), **{"max_batch": 4, "batch_window_s": 0.5, **kwargs})
        s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.shutdown(0)
        assert s.join(timeout=5)


class Collector:
    """A job's deliver callback: its tokens, its end, and when each came."""

    def __init__(self) -> None:
        self.tokens, self.end, self.done, self.first_at = [], None, threading.Event(), None

    def __call__(self, item) -> None:
        if isinstance(item, End):
            self.end = item
            self.done.set()
        else:
            self.first_at = self.first_at or time.monotonic()
            self.tokens.append(item[0])


def job(adapter="travel", ids=(1, 2, 3), budget=5, sampling=Sampling(), **kwargs) -> tuple[Job, Collector]:
    out = Collector()
    return Job(list(ids), adapter, budget, sampling, out, **kwargs), out


def test_requests_announced_together_share_one_batch_and_each_gets_its_budget(scheduler):
    s = scheduler()
    jobs = [job(budget=b) for b in (3, 5, 4)]
    for _ in jobs:
        s.announce()
    for j, _ in jobs:
        s.submit(j, announced=True)
    for j, out in jobs:
        assert out.done.wait(5) and out.end == End("length")
        assert out.tokens == [100 + i for i in range(1, j.max_new_tokens + 1)]
    assert len(FakeBatch.made) == 1 and len(FakeBatch.made[0].prompts) == 3


def test_a_lone_request_does_not_wait_for_the_window(scheduler):
    s = scheduler(batch_window_s=2.0)
    j, out = job()
    start = time.monotonic()
    s.submit(j)
    assert out.done.wait(5) and out.first_at - start < 1.0


def test_the_window_waits_for_announced_requests_but_not_past_its_end(scheduler):
    s = scheduler(batch_window_s=0.3)
    first, second = job(), job()
    s.announce()
    s.announce()
    s.submit(first[0], announced=True)
    time.sleep(0.1)
    s.submit(second[0], announced=True)
    assert first[1].done.wait(5) and second[1].done.wait(5)
    assert len(FakeBatch.made) == 1  # the second came within the window: one batch
    third = job()
    s.announce()  # announced but never submitted: the next batch waits at most the window
    start = time.monotonic()
    s.submit(third[0])
    assert third[1].done.wait(5) and 0.25 < third[1].first_at - start < 2
    s.withdraw()


def test_adapters_and_seeded_sampling_get_their_own_batches_and_take_turns(scheduler):
    s = scheduler()
    seeded = Sampling(temperature=1.0, top_p=0.9, seed=3)
    jobs = [job("travel", budget=20), job("base", budget=20), job("travel", sampling=seeded), job(sampling=seeded)]
    for _ in jobs:
        s.announce()
    for j, _ in jobs:
        s.submit(j, announced=True)
    for _, out in jobs:
        assert out.done.wait(5)
    assert sorted(len(b.prompts) for b in FakeBatch.made) == [1, 1, 1, 1]
    assert {b.adapter for b in FakeBatch.made} == {"travel", "base"}


def test_grouping_keeps_prompts_and_budgets_within_the_context_and_pad_tokens_alone():
    s = Scheduler(FakeEngine(), max_batch=2)
    a, b, c = job(ids=[1] * 30, budget=20)[0], job(ids=[1] * 10, budget=40)[0], job(ids=[1] * 10, budget=10)[0]
    assert s.group([a, b, c]) == [[a, c], [b]]  # a and b: 30 + 40 > 64 (rows are padded to the longest prompt)
    three = [job(ids=[1] * 10, budget=10)[0] for _ in range(3)]
    assert [len(g) for g in s.group(three)] == [2, 1]  # at most max_batch rows
    padded = job(ids=[1, 2, 0])[0]  # ends with the pad token: it would be masked as padding
    assert [len(g) for g in s.group([c, padded])] == [1, 1]
    greedy, sampled = job()[0], job(sampling=Sampling(temperature=0.7))[0]
    unseeded = job(sampling=Sampling(temperature=0.7))[0]
    assert [len(g) for g in s.group([greedy, sampled, unseeded])] == [1, 2]


def test_cancel_timeout_and_shutdown_end_a_job_with_their_reason(scheduler):
    s = scheduler(step_delay_s=0.05)
    cancelled, out_c = job(budget=1000)
    timed, out_t = job(adapter="base", budget=1000, deadline=time.monotonic() + 0.3)
    s.submit(cancelled)
    s.submit(timed)
    time.sleep(0.2)
    cancelled.cancel()
    assert out_c.done.wait(5) and out_c.end == End("cancelled")
    assert out_t.done.wait(5) and out_t.end.reason == "timeout"
    running, out_r = job(budget=1000)
    s.submit(running)
    time.sleep(0.2)
    s.shutdown(time.monotonic() + 0.2)
    late, out_l = job()
    s.submit(late)
    assert out_l.done.wait(1) and out_l.end.reason == "shutdown" and not out_l.tokens
    assert out_r.done.wait(5) and out_r.end.reason == "shutdown" and out_r.tokens
    assert s.join(timeout=5)
