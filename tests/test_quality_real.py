"""benchmarks/quality_real.py (and the pretraining it starts): the scheduler's deadline, the corpus passages, and a
CPU smoke run of the whole benchmark on a tiny pretrained model with one quantizer and one ONNX build, so the GPU
command cannot fail on a typo."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import pretrain, quality_real
from tests.test_corpus import sample_corpus

REPO = Path(__file__).resolve().parent.parent


def sleeper(name: str, seconds: float, priority: float, needs: tuple[str, ...] = ()) -> quality_real.Job:
    command = [sys.executable, "-c", f"import time; time.sleep({seconds})"]
    return quality_real.Job(name, command, priority, needs, cpus=1)


def test_scheduler_runs_by_need_and_stops_at_the_deadline(tmp_path):
    failing = quality_real.Job("fails", [sys.executable, "-c", "raise SystemExit(3)"], 0, cpus=1)
    jobs = [
        sleeper("quick", 0.1, 1),
        sleeper("after quick", 0.1, 2, ("quick",)),
        failing,
        sleeper("after fails", 0.1, 3, ("fails",)),
        sleeper("slow", 60, 4),
        sleeper("after slow", 0.1, 5, ("slow",)),
    ]
    finished = []
    scheduler = quality_real.Scheduler(jobs, tmp_path, deadline=4, t0=time.perf_counter(), gpu_slots=1, cpus=4)
    scheduler.on_finish.append(lambda job: finished.append(job.name))
    start = time.perf_counter()
    scheduler.run(launch_margin=1, stop_margin=1)
    assert time.perf_counter() - start < 10
    status = {name: job.status for name, job in scheduler.jobs.items()}
    assert status == {
        "fails": "failed",
        "quick": "ok",
        "after quick": "ok",
        "after fails": "skipped",
        "slow": "stopped at deadline",
        "after slow": "not started",
    }
    assert finished.index("quick") < finished.index("after quick")


def test_corpus_passages_are_whole_paragraphs_within_the_limit():
    documents = ["One two three four.\n\n" + "Five six seven eight nine ten. " * 20, "short", "A b c d e f g h. " * 50]
    passages = quality_real.corpus_passages(documents, count=5, max_chars=200, seed=0)
    assert passages and all(50 <= len(p) <= 200 for p in passages)
    assert "short" not in passages


def test_learning_rate_warms_up_then_decays_to_the_floor():
    rates = [pretrain.learning_rate(p / 100, 1.0, 0.1, 0.1) for p in range(101)]
    assert rates[5] < rates[10] == pytest.approx(1.0) and rates[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[10:-1], rates[11:], strict=True))


@pytest.mark.slow
def test_cpu_smoke_run(tmp_path):
    """Corpus from fake packages, a tiny model pretrained a few steps, then the matrix for RTN and the default
    ONNX build: every stage, every scorer and the results file, on a CPU."""
    sample_corpus(tmp_path / "corpus", tmp_path / "x", documents=60)
    out = tmp_path / "out"
    command = [
        sys.executable, "benchmarks/quality_real.py", "--out", str(out), "--work", str(tmp_path / "work"),
        "--corpus", str(tmp_path / "corpus"), "--deadline", "600", "--pretrain-preset", "tiny",
        "--pretrain-max-steps", "3", "--pretrain-seq-len", "64", "--pretrain-batch", "4", "--runs", "rtn",
        "--variants", "a128", "--finetune-steps", "2", "--infer-tokens", "4", "--infer-prompts", "1",
        "--corpus-passages", "4", "--passage-chars", "400",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "quality_real.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in rows}
    assert {"header", "pretrain", "base", "pytorch", "onnx", "answers", "job"} <= kinds
    assert all(r["status"] == "ok" for r in rows if r["kind"] == "job"), [r for r in rows if r["kind"] == "job"]
    rtn = next(r for r in rows if r["kind"] == "pytorch")
    for key in ("travel_quantized", "travel_finetuned", "corpus_quantized", "corpus_finetuned"):
        assert rtn[key]["loss"] > 0, key
    onnx = next(r for r in rows if r["kind"] == "onnx")
    for key in ("travel_off", "travel_on", "corpus_off", "corpus_on"):
        assert onnx[key]["loss"] > 0, key
    answers = next(r for r in rows if r["kind"] == "answers")["answers"]
    assert {a["adapter"] for a in answers} == {"base", "travel"} and len(answers) == 4
    markdown = (out / "quality_real.md").read_text()
    assert "## Quantizers and LoRA (PyTorch)" in markdown and "RTN int4, groups of 128" in markdown
    assert (out / "logs.tar.xz").stat().st_size > 0
    assert (tmp_path / "work" / "model" / "generation_config.json").is_file()
