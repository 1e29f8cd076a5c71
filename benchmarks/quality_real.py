"""Quality on a model that knows English: pretrain one offline, then measure every choice olivepress makes on it.

One command on one GPU machine: ``benchmarks/pretrain.py`` trains a ~120M-parameter Phi-3 on the corpus of
``benchmarks/corpus.py`` for a wall-clock budget; then olivepress's own stages (``python -m stages.<name>``, as
its containers run them) quantize it with AWQ, GPTQ and RTN (groups of 128; 8-bit RTN as the near-float ceiling;
per-channel int4 where the quantizer takes it), train a LoRA adapter (100 steps) on each, build the int4 ONNX
model with each int4 grid, the output projection in int4 or float, the adapter switchable or merged, and answer
held-out travel prompts with the adapter off and on. Every model is scored on the travel held-out rows (by the
stages themselves: their manifests' ``metrics``) and on passages of the corpus's held-out documents (by this
script, through stages/evaluate.py's scorers), to see what quantization loses, what LoRA recovers and what it
makes the model forget.

Runs that only read a stage's output share it through hard links (one quantize, many optimize builds), and
independent stages run side by side (GPU stages a few at a time, CPU builds up to the core count). The matrix runs
in order of importance; at ``--deadline`` (seconds since the start) running stages are stopped and the results
file is complete for what finished. It is rewritten after every stage, so a kill keeps what was done.

    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/quality_real.py --pretrain-seconds 240 --deadline 530 --out $OUT

writes ``$OUT/quality_real.md``, ``$OUT/quality_real.jsonl`` and ``$OUT/logs.tar.xz`` (every stage's log).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.corpus import read_documents  # noqa: E402
from stages.infer import DEFAULT_PROMPTS  # noqa: E402

# What a quantize run is: the stage's options. "fp8" is the ceiling: finetune needs a quantize stage before it,
# and 8-bit RTN in groups of 128 is within noise of the float model (its own row shows by how much).
RUNS: dict[str, list[str]] = {
    "awq": ["--algorithm", "awq"],
    "gptq": ["--algorithm", "gptq"],
    "rtn": ["--algorithm", "rtn"],
    "fp8": ["--algorithm", "rtn", "--bits", "8"],
    "gptq-pc": ["--algorithm", "gptq", "--group-size", "-1"],
    "rtn-pc": ["--algorithm", "rtn", "--group-size", "-1"],
}
RUN_LABELS = {
    "awq": "AWQ int4, groups of 128",
    "gptq": "GPTQ int4, groups of 128",
    "rtn": "RTN int4, groups of 128",
    "fp8": "RTN 8-bit, groups of 128 (near-float ceiling)",
    "gptq-pc": "GPTQ int4, per channel",
    "rtn-pc": "RTN int4, per channel",
}
GPU_ONLY = {"awq"}
# Per-channel runs stop before optimize: the ONNX builder's blocks are 16..256 wide, never a whole row.
NO_ONNX = {"gptq-pc", "rtn-pc"}
# optimize's options per ONNX build. a128 is optimize's default: asymmetric blocks of the quantizer's group size.
VARIANTS: dict[str, list[str]] = {
    "a128": [],
    "a128-keep": ["--keep-lm-head"],
    "s256": ["--int4-symmetric", "--int4-block-size", "256"],
    "s128": ["--int4-symmetric", "--int4-block-size", "128"],
    "s256-keep": ["--int4-symmetric", "--int4-block-size", "256", "--keep-lm-head"],
    "s128-keep": ["--int4-symmetric", "--int4-block-size", "128", "--keep-lm-head"],
    "a128-merged": ["--adapter-mode", "merged"],
}
VARIANT_LABELS = {
    "a128": ("asymmetric 128", "int4", "switchable"),
    "a128-keep": ("asymmetric 128", "float", "switchable"),
    "s256": ("symmetric 256", "int4", "switchable"),
    "s128": ("symmetric 128", "int4", "switchable"),
    "s256-keep": ("symmetric 256", "float", "switchable"),
    "s128-keep": ("symmetric 128", "float", "switchable"),
    "a128-merged": ("asymmetric 128", "int4", "merged"),
}
# Which builds each run gets, most important first.
BUILDS: dict[str, list[str]] = {
    "awq": list(VARIANTS),
    "gptq": ["a128"],
    "rtn": ["a128"],
    "fp8": ["a128", "s256"],
}
ADAPTER = "travel"  # optimize's default --adapter-name
# A corpus passage is scored whole, after the document separator the model was pretrained with.
CORPUS_TEMPLATE = "<|endoftext|>{response}"
VERSIONED = (
    "torch transformers peft accelerate tokenizers olive-ai onnx onnxruntime onnxruntime-genai autoawq datasets numpy"
).split()


# ----------------------------------------------------------------------------------------------------------------
# Jobs and the scheduler


@dataclass
class Job:
    """One process of the matrix: a stage run, a scoring run or the pretraining."""

    name: str
    command: list[str] | Any  # or a callable giving it when the job starts (its inputs exist only then)
    priority: float
    needs: tuple[str, ...] = ()
    gpu: bool = False
    cpus: int = 2
    prepare: Any = None  # callable() run right before the process starts (e.g. to lay out its volume)
    status: str = "waiting"  # waiting, running, ok, failed, skipped, stopped at deadline, not started
    note: str = ""
    started_s: float | None = None
    wall_s: float | None = None
    log: Path | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)


class Scheduler:
    """Runs jobs as their needs finish, in priority order, within GPU and CPU budgets, until a deadline."""

    def __init__(self, jobs: list[Job], logs: Path, deadline: float, t0: float, gpu_slots: int, cpus: int) -> None:
        self.jobs = {j.name: j for j in sorted(jobs, key=lambda j: j.priority)}
        self.logs, self.deadline, self.t0 = logs, deadline, t0
        self.gpu_slots, self.cpus = gpu_slots, cpus
        self.on_finish: list[Any] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def running(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.status == "running"]

    def _finish(self, job: Job, status: str, note: str = "") -> None:
        job.status, job.note = status, note or job.note
        if job.started_s is not None:
            job.wall_s = round(self.elapsed() - job.started_s, 1)
        print(
            f"[{self.elapsed():6.0f} s] {job.name}: {status}{f' ({job.wall_s} s)' if job.wall_s else ''}"
            f"{f' - {job.note}' if job.note else ''}",
            flush=True,
        )
        for callback in self.on_finish:
            callback(job)

    def _start(self, job: Job) -> None:
        if job.prepare:
            job.prepare()
        if callable(job.command):
            job.command = job.command()
        job.log = self.logs / f"{job.name.replace(' ', '_')}.log"
        job.started_s = round(self.elapsed(), 1)
        job.status = "running"
        env = dict(os.environ, OMP_NUM_THREADS=str(job.cpus), MKL_NUM_THREADS=str(job.cpus), PYTHONUNBUFFERED="1")
        print(f"[{self.elapsed():6.0f} s] {job.name}: $ {shlex.join(job.command)}", flush=True)
        with job.log.open("w") as out:
            job.process = subprocess.Popen(
                job.command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
            )

    def _fits(self, job: Job) -> bool:
        running = self.running()
        if job.gpu and sum(j.gpu for j in running) >= self.gpu_slots:
            return False
        used = sum(min(j.cpus, self.cpus) for j in running)
        return not running or used + min(job.cpus, self.cpus) <= self.cpus

    def run(self, launch_margin: float = 15.0, stop_margin: float = 5.0) -> None:
        while True:
            for job in self.running():
                code = job.process.poll()
                if code is not None:
                    self._finish(job, "ok" if code == 0 else "failed", "" if code == 0 else f"exit {code}")
            if self.elapsed() >= self.deadline - stop_margin:
                for job in self.running():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(job.process.pid, 9)
                    job.process.wait()
                    self._finish(job, "stopped at deadline")
                for job in self.jobs.values():
                    if job.status == "waiting":
                        self._finish(job, "not started", "deadline")
                return
            for job in self.jobs.values():
                if job.status != "waiting":
                    continue
                states = [self.jobs[n].status for n in job.needs if n in self.jobs]
                missing = [n for n in job.needs if n not in self.jobs]
                if missing or any(s in ("failed", "skipped", "not started", "stopped at deadline") for s in states):
                    self._finish(job, "skipped", f"needs {', '.join(missing or job.needs)}")
                    continue
                if all(s == "ok" for s in states) and self.elapsed() < self.deadline - launch_margin:
                    if self._fits(job):
                        try:
                            self._start(job)
                        except (OSError, ValueError, KeyError, subprocess.CalledProcessError) as error:
                            self._finish(job, "failed", f"could not start: {error}")
            if all(j.status not in ("waiting", "running") for j in self.jobs.values()):
                return
            time.sleep(0.3)


# ----------------------------------------------------------------------------------------------------------------
# Corpus scoring (run as ``quality_real.py score ...`` in its own process)


def corpus_passages(documents: list[str], count: int, max_chars: int, seed: int) -> list[str]:
    """Up to ``count`` passages of held-out documents: whole paragraphs, at most ``max_chars`` each (a paragraph
    alone longer than that is cut at a word), from documents chosen at random with ``seed``."""
    order = list(documents)
    random.Random(seed).shuffle(order)
    passages = []
    for document in order:
        passage = ""
        for paragraph in document.split("\n\n"):
            if len(paragraph) > max_chars:
                paragraph = paragraph[:max_chars].rsplit(" ", 1)[0]
            if passage and len(passage) + 2 + len(paragraph) > max_chars:
                break
            passage = f"{passage}\n\n{paragraph}" if passage else paragraph
        if len(passage) >= max_chars // 4:
            passages.append(passage)
        if len(passages) == count:
            break
    return passages


def score(args: argparse.Namespace) -> None:
    """Score corpus passages with stages/evaluate.py: a Hugging Face folder (with a PEFT adapter if given) through
    PyTorch, or an optimize-layout folder through onnxruntime-genai with each named adapter."""
    from stages import evaluate

    rows = [{"response": p} for p in json.loads(args.passages.read_text())]
    result = {}
    if args.onnx:
        result.update(evaluate.onnx_losses(args.onnx, rows, CORPUS_TEMPLATE, args.adapters.split(",")))
    else:
        result["torch"] = evaluate.torch_loss(args.model, rows, CORPUS_TEMPLATE, args.adapter)
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


# ----------------------------------------------------------------------------------------------------------------
# The matrix


@dataclass
class Plan:
    work: Path
    model: Path
    runs: list[str]
    variants: list[str]
    finetune_steps: int
    infer_tokens: int
    infer_prompts: int
    gpu: bool
    cpus: int

    def home(self, run: str) -> Path:
        return self.work / "homes" / run

    def build_home(self, run: str, variant: str) -> Path:
        return self.work / "homes" / f"{run}@{variant}"

    def score_file(self, name: str) -> Path:
        return self.work / "scores" / f"{name}.json"


def stage(name: str, home: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", f"stages.{name}", "--home", str(home), *options]


def scorer(plan: Plan, name: str, *options: str) -> list[str]:
    passages = plan.work / "corpus_passages.json"
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "score",
        "--passages",
        str(passages),
        "--result",
        str(plan.score_file(name)),
        *options,
    ]


def link_volume(source: Path, target: Path, stages: tuple[str, ...]) -> None:
    """A new home that shares ``stages``' published folders with ``source`` through hard links: the stages after
    them only read those folders, and a manifest identifies its inputs by their place in the home and content."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in stages:
        subprocess.run(["cp", "-al", str(source / name), str(target / name)], check=True)


def matrix(plan: Plan, pretrain_job: Job | None) -> list[Job]:
    """Every job, with priorities that put the decisive rows first: the three quantizers and the ceiling, their
    LoRA, the default ONNX build of each, the AWQ answers, then the other int4 grids and per-channel int4."""
    first = (pretrain_job.name,) if pretrain_job else ()
    jobs = [pretrain_job] if pretrain_job else []
    torch_cpus = 2 if plan.gpu else plan.cpus  # on a CPU, one PyTorch job at a time takes every core

    def torch_job(name: str, command: list[str], priority: float, needs: tuple[str, ...]) -> Job:
        return Job(name, command, priority, needs, gpu=plan.gpu, cpus=torch_cpus)

    runs = [r for r in plan.runs if plan.gpu or r not in GPU_ONLY]
    jobs.append(torch_job("score base", scorer(plan, "base", "--model", str(plan.model)), 14, first))
    for i, run in enumerate(runs):
        offset = i + 40 * (run in NO_ONNX)  # per-channel runs after every default build
        home = plan.home(run)
        quantize, finetune = f"quantize {run}", f"finetune {run}"
        dequantized, adapter = home / "quantize" / "dequantized", home / "finetune" / "adapter"
        quantized_scoring = scorer(plan, f"{run}.quantized", "--model", str(dequantized))
        finetuned_scoring = scorer(plan, f"{run}.finetuned", "--model", str(dequantized), "--adapter", str(adapter))
        jobs += [
            torch_job(quantize, stage("quantize", home, "--model", str(plan.model), *RUNS[run]), 10 + offset, first),
            torch_job(f"score {run} quantized", quantized_scoring, 15 + offset / 10, (quantize,)),
            torch_job(
                finetune, stage("finetune", home, "--max-steps", str(plan.finetune_steps)), 20 + offset, (quantize,)
            ),
            torch_job(f"score {run} finetuned", finetuned_scoring, 25 + offset / 10, (finetune,)),
        ]
    for i, run in enumerate(r for r in runs if r not in NO_ONNX):
        for j, variant in enumerate(v for v in BUILDS.get(run, ["a128"]) if v in plan.variants):
            name, home = f"{run}@{variant}", plan.build_home(run, variant)
            build = f"optimize {name}"
            priority = 30 + i if j == 0 else 40 + 10 * i + j  # every run's default build before the other grids
            link = functools.partial(link_volume, plan.home(run), home, ("quantize", "finetune"))
            adapters = ADAPTER if VARIANT_LABELS[variant][2] == "merged" else f"base,{ADAPTER}"
            onnx_scoring = scorer(plan, f"{name}.onnx", "--onnx", str(home / "optimize"), "--adapters", adapters)
            options = VARIANTS[variant]
            jobs += [
                Job(build, stage("optimize", home, *options), priority, (f"finetune {run}",), cpus=4, prepare=link),
                Job(f"score {name} onnx", onnx_scoring, priority + 6, (build,), cpus=4),
            ]
            if variant in ("a128", "a128-merged") and (run in ("awq", "fp8") or not plan.gpu):
                jobs.append(Job(f"infer {name}", infer_command(plan, run, home), priority + 5, (build,), cpus=2))
    return jobs


def infer_command(plan: Plan, run: str, home: Path) -> Any:  # noqa: ANN401 (a callable giving the command)
    """Answers to the first held-out travel prompts (never trained on) and one of infer's own, adapter off and on;
    the prompts are read when the job starts, once finetune has written its held-out rows."""

    def command() -> list[str]:
        prompts = list(references(plan.home(run)))[: plan.infer_prompts] + [DEFAULT_PROMPTS[0]]
        options = [o for p in prompts for o in ("--prompt", p)]
        return stage("infer", home, "--max-new-tokens", str(plan.infer_tokens), "--threads", "2", *options)

    return command


# ----------------------------------------------------------------------------------------------------------------
# Results


class Results:
    """Everything measured so far, written as JSONL and Markdown after each finished job."""

    def __init__(self, plan: Plan, out: Path, header: dict, jobs: dict[str, Job]) -> None:
        self.plan, self.out, self.header, self.jobs = plan, out, header, jobs

    def manifest(self, home: Path, stage_name: str) -> dict | None:
        path = home / stage_name / "manifest.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def score(self, name: str) -> dict | None:
        path = self.plan.score_file(name)
        return json.loads(path.read_text()) if path.is_file() else None

    def pretrain(self) -> dict | None:
        path = self.plan.model.with_name(self.plan.model.name + ".json")
        return json.loads(path.read_text()) if path.is_file() else None

    def rows(self) -> list[dict]:
        rows: list[dict] = [{"kind": "header", **self.header}]
        if report := self.pretrain():
            rows.append({"kind": "pretrain", **report})
        base_travel = None
        for run in self.plan.runs:
            q = self.manifest(self.plan.home(run), "quantize")
            f = self.manifest(self.plan.home(run), "finetune")
            if q and base_travel is None:
                base_travel = q.get("metrics", {}).get("base")
            rows.append(
                {
                    "kind": "pytorch",
                    "run": run,
                    "label": RUN_LABELS[run],
                    "quantize_parameters": q and q["parameters"],
                    "travel_quantized": q and q.get("metrics", {}).get("quantized"),
                    "travel_finetuned": f and f.get("metrics", {}).get("finetuned"),
                    "corpus_quantized": (self.score(f"{run}.quantized") or {}).get("torch"),
                    "corpus_finetuned": (self.score(f"{run}.finetuned") or {}).get("torch"),
                    "quantize_wall_s": q and q["wall_s"],
                    "finetune_wall_s": f and f["wall_s"],
                    "quantized_bytes": q and q["bytes_out"],
                }
            )
        rows.insert(
            2 if self.pretrain() else 1,
            {"kind": "base", "travel": base_travel, "corpus": (self.score("base") or {}).get("torch")},
        )
        for run in self.plan.runs:
            for variant in BUILDS.get(run, []):
                home = self.plan.build_home(run, variant)
                o = self.manifest(home, "optimize")
                if not o and f"optimize {run}@{variant}" not in self.jobs:
                    continue
                grid, head, mode = VARIANT_LABELS[variant]
                corpus = self.score(f"{run}@{variant}.onnx") or {}
                rows.append(
                    {
                        "kind": "onnx",
                        "run": run,
                        "variant": variant,
                        "grid": grid,
                        "output_projection": head,
                        "adapter_mode": mode,
                        "travel_off": o and o.get("metrics", {}).get("onnx_base"),
                        "travel_on": o and o.get("metrics", {}).get("onnx_adapter"),
                        "corpus_off": corpus.get("base"),
                        "corpus_on": corpus.get(ADAPTER),
                        "onnx_bytes": o and folder_bytes(home / "optimize" / "model"),
                        "adapter_bytes": o and folder_bytes(home / "optimize" / "adapters"),
                        "optimize_wall_s": o and o["wall_s"],
                    }
                )
                i = self.manifest(home, "infer")
                if i:
                    rows.append(
                        {
                            "kind": "answers",
                            "run": run,
                            "variant": variant,
                            "answers": i["answers"],
                            "references": references(self.plan.home(run)),
                        }
                    )
        for job in self.jobs.values():
            rows.append(
                {
                    "kind": "job",
                    "name": job.name,
                    "status": job.status,
                    "note": job.note,
                    "started_s": job.started_s,
                    "wall_s": job.wall_s,
                    "command": command_text(job),
                }
            )
        return rows

    def write(self) -> None:
        rows = self.rows()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "quality_real.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (self.out / "quality_real.md").write_text(markdown(rows))


def command_text(job: Job) -> str:
    return shlex.join(job.command) if isinstance(job.command, list) else "(made when it starts)"


def references(home: Path) -> dict[str, str]:
    path = home / "finetune" / "heldout.jsonl"
    if not path.is_file():
        return {}
    return {r["prompt"]: r["response"] for r in map(json.loads, path.read_text().splitlines())}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fmt(metric: dict | None, base: dict | None = None) -> str:
    """``loss (perplexity)``, and the difference to ``base`` in nats where given."""
    if not metric:
        return "-"
    text = f"{metric['loss']:.4f} ({metric['perplexity']:.2f})"
    if base:
        text += f" {metric['loss'] - base['loss']:+.4f}"
    return text


HOW_TO_READ = """\
## How to read it

- **loss** is the mean negative log-likelihood per token in nats (lower is better), perplexity = e^loss in
  brackets; a signed number after it is the difference to the row's reference, named in the column header.
- **travel** is the response tokens of the travel data's held-out rows (`--heldout-fraction 0.1 --seed 0`, never
  calibrated or trained on), scored by the stages themselves: quantize (base, quantized), finetune
  (PyTorch + LoRA), optimize (onnxruntime-genai, adapter off and on). The pretrained model never saw the chat
  format, so its travel loss is high; LoRA teaches the format and the domain.
- **corpus** is passages of the corpus's held-out documents (never pretrained on), each scored whole after
  `<|endoftext|>`, by this benchmark through `stages/evaluate.py`. Quantization should cost little here; a LoRA
  that raises it has made the model forget (it trains on travel answers only).
- **fp8** (8-bit RTN, groups of 128) is the near-float ceiling: finetune needs a quantize stage before it, and 8-bit
  costs what its own row shows against the base. Its ONNX builds are int4 too: they show what the ONNX builder's
  own RTN does to float weights, against what it does to AWQ's or GPTQ's already-quantized weights.
- **ONNX vs PyTorch**: "off" compares the int4 ONNX model without its adapter to the quantized PyTorch model, "on"
  with the adapter to the finetuned PyTorch model: what the re-quantization of the build (its grid, the output
  projection) and int8 activations (accuracy level 4) cost on top of the quantizer.
- Each figure comes from one run with one seed: differences of a few thousandths of a nat are within noise.
"""

NOT_MEASURED = """\
## Not measured, and why

- **int3**: quantize's `--bits` takes 4 or 8 (Olive's RTN and GPTQ would take 2, 4 or 8; AutoAWQ 0.2.9 packs only
  4-bit). The stages are not changed for this benchmark, so no 3-bit row.
- **per-channel AWQ**: AutoAWQ 0.2.9's GEMM packing indexes its scales by `column // group_size` and
  stages/awq_speedups.py repeats them `group_size` times: neither takes `--group-size -1`, and quantize does not
  refuse it up front (it fails after the scale search).
- **per-channel int4 in ONNX**: the builder's int4 blocks are 16 to 256 wide, and optimize's `--int4-block-size
  auto` hands it the quantizer's -1 (the build fails); the per-channel runs stop after finetune.
"""


def markdown(rows: list[dict]) -> str:
    header = next(r for r in rows if r["kind"] == "header")
    lines = [
        "# Quality on a pretrained model (issue 17)",
        "",
        f"Made by `{header['command']}` on {header['machine']}, started {header['started']}.",
        "",
        "Versions: " + (", ".join(f"{k} {v}" for k, v in header["versions"].items()) or "(recorded when run)") + ".",
        "",
    ]
    pretrain = next((r for r in rows if r["kind"] == "pretrain"), None)
    lines += finish_line(header, [r for r in rows if r["kind"] == "job"])
    lines += pretrain_section(pretrain)
    lines += corpus_section(header.get("corpus_sources"), header.get("corpus_passages"))
    base = next((r for r in rows if r["kind"] == "base"), {})
    lines += [
        "## Quantizers and LoRA (PyTorch)",
        "",
        "| run | travel: quantized, vs base | travel: + LoRA, vs quantized | corpus: quantized, vs base "
        "| corpus: + LoRA, vs quantized | quantize s | finetune s |",
        "|---|---|---|---|---|---|---|",
        f"| base (pretrained, {base_dtype(pretrain)}) | {fmt(base.get('travel'))} | - | {fmt(base.get('corpus'))} "
        "| - | - | - |",
    ]
    for r in (r for r in rows if r["kind"] == "pytorch"):
        lines.append(
            f"| {r['label']} | {fmt(r['travel_quantized'], base.get('travel'))} "
            f"| {fmt(r['travel_finetuned'], r['travel_quantized'])} | {fmt(r['corpus_quantized'], base.get('corpus'))} "
            f"| {fmt(r['corpus_finetuned'], r['corpus_quantized'])} | {r['quantize_wall_s'] or '-'} "
            f"| {r['finetune_wall_s'] or '-'} |"
        )
    pytorch = {r["run"]: r for r in rows if r["kind"] == "pytorch"}
    lines += [
        "",
        "## int4 ONNX builds (onnxruntime-genai)",
        "",
        "| run | int4 grid | output projection | adapter | travel: off, vs PyTorch quantized "
        "| travel: on, vs PyTorch + LoRA | corpus: off, vs PyTorch quantized | corpus: on, vs PyTorch + LoRA "
        "| ONNX MB | adapter MB | build s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["kind"] == "onnx"):
        p = pytorch.get(r["run"], {})
        mb = lambda b: f"{b / 1e6:.0f}" if b else "-"  # noqa: E731
        lines.append(
            f"| {r['run']} | {r['grid']} | {r['output_projection']} | {r['adapter_mode']} "
            f"| {fmt(r['travel_off'], p.get('travel_quantized'))} | {fmt(r['travel_on'], p.get('travel_finetuned'))} "
            f"| {fmt(r['corpus_off'], p.get('corpus_quantized'))} | {fmt(r['corpus_on'], p.get('corpus_finetuned'))} "
            f"| {mb(r['onnx_bytes'])} | {mb(r['adapter_bytes'])} | {r['optimize_wall_s'] or '-'} |"
        )
    for r in (r for r in rows if r["kind"] == "answers"):
        lines += answers_section(r)
    lines += ["", "## Jobs", "", "| job | status | started (s) | wall (s) | note |", "|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "job"):
        lines.append(f"| {r['name']} | {r['status']} | {r['started_s'] or '-'} | {r['wall_s'] or '-'} | {r['note']} |")
    lines += ["", HOW_TO_READ, NOT_MEASURED]
    return "\n".join(lines)


def finish_line(header: dict, jobs: list[dict]) -> list[str]:
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job["status"]] = counts.get(job["status"], 0) + 1
    states = ", ".join(f"{n} {status}" for status, n in counts.items())
    if "finished_s" not in header:
        return [f"Jobs so far: {states}.", ""]
    return [f"Finished after {header['finished_s']} s (deadline {header['deadline_s']} s). Jobs: {states}.", ""]


def corpus_section(sources: list[dict] | None, passages: dict | None) -> list[str]:
    if not sources:
        return []
    total = sum(s["train_bytes"] for s in sources)
    kinds: dict[str, int] = {}
    for s in sources:
        kinds[s["kind"]] = kinds.get(s["kind"], 0) + s["train_bytes"]
    lines = [
        "## The corpus",
        "",
        f"{total / 1e6:.1f} MB of text from {len(sources)} Debian 12 packages (`benchmarks/corpus.py`): "
        + ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
        + f". The corpus rows score {passages['count']} passages ({passages['chars']:,} characters) of its held-out "
        "documents.",
        "",
        "| package | version | kind | licence | train MB |",
        "|---|---|---|---|---|",
    ]
    for s in sorted(sources, key=lambda s: -s["train_bytes"]):
        lines.append(
            f"| {s['package']} | {s['version']} | {s['kind']} | {s['licence']} | {s['train_bytes'] / 1e6:.2f} |"
        )
    return lines + [""]


def base_dtype(pretrain: dict | None) -> str:
    return pretrain["saved_dtype"] if pretrain else "as saved"


def pretrain_section(report: dict | None) -> list[str]:
    if not report:
        return [
            "## The pretrained model",
            "",
            "(no pretraining report: not run yet, or --model named a folder with no <folder>.json beside it)",
            "",
        ]
    c = report["corpus"]
    lines = [
        "## The pretrained model",
        "",
        f"`Phi3ForCausalLM`, {report['parameters'] / 1e6:.1f}M parameters ({json.dumps(report['config'])}), "
        f"trained {report['train_seconds']} s on {report.get('gpu') or report['device']}: {report['steps']} steps "
        f"of {report['batch_sequences']} x {report['seq_len']} tokens, {report['train_tokens_seen'] / 1e6:.1f}M "
        f"tokens ({report['epochs']} epochs of {c['train_tokens'] / 1e6:.1f}M), {report['tokens_per_s']:,} "
        f"tokens/s, first step {report['first_step_s']} s{' (torch.compile)' if report['compile'] else ''}, "
        f"peak learning rate {report['lr']}. Tokenizer: byte-level BPE, {report['config']['vocab_size']} tokens, "
        f"{c['bytes_per_token']} bytes/token.",
        "",
        f"Held-out corpus documents ({c['heldout_tokens']:,} tokens, in sequences of {report['seq_len']}): loss "
        f"**{report['heldout']['loss']}**, perplexity **{report['heldout']['perplexity']}** (training sequences, "
        f"as many: loss {report['train_loss_same_size']['loss']}). Phases (s): "
        + ", ".join(f"{k} {v}" for k, v in report["phases_s"].items())
        + ".",
        "",
        "Greedy continuations:",
        "",
    ]
    for sample in report["continuations"]:
        lines.append(f"- *{sample['prompt']}* → {json.dumps(sample['continuation'], ensure_ascii=False)}")
    return lines + [""]


def answers_section(row: dict) -> list[str]:
    by_prompt: dict[str, dict[str, str]] = {}
    for answer in row["answers"]:
        by_prompt.setdefault(answer["prompt"], {})[answer["adapter"]] = answer["text"]
    lines = [
        "",
        f"## Answers: {row['run']}, ONNX {row['variant']} (greedy)",
        "",
        "| prompt | held-out reference | adapter off | adapter on |",
        "|---|---|---|---|",
    ]
    cell = lambda t: json.dumps(t, ensure_ascii=False)[1:-1].replace("|", "\\|") if t else "-"  # noqa: E731
    for prompt, texts in by_prompt.items():
        reference = row["references"].get(prompt, "")
        lines.append(
            f"| {cell(prompt)} | {cell(reference[:200])} | {cell(texts.get('base'))} | {cell(texts.get(ADAPTER))} |"
        )
    return lines


# ----------------------------------------------------------------------------------------------------------------
# The command


def machine() -> str:
    try:
        gpus = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
            )
            .stdout.strip()
            .splitlines()
        )
    except (OSError, subprocess.TimeoutExpired):
        gpus = []
    where = f"{len(gpus)} x {gpus[0]}" if gpus else "no GPU"
    return f"{where}, {os.cpu_count()} CPU cores ({platform.machine()}), Python {platform.python_version()}"


def versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def collect_logs(work: Path, out: Path) -> None:
    """Every job's console log and every stage's log.txt / failed log, as one archive."""
    with tarfile.open(out / "logs.tar.xz", "w:xz") as archive:
        for path in sorted((work / "logs").glob("*.log")):
            archive.add(path, arcname=f"jobs/{path.name}")
        for path in sorted((work / "homes").glob("*/*")):
            linked = "@" in path.parent.name and path.name in ("quantize", "finetune")  # the source home has it
            if path.name.endswith(".failed.log"):
                archive.add(path, arcname=f"homes/{path.parent.name}/{path.name}")
            elif (path / "log.txt").is_file() and not linked:
                archive.add(path / "log.txt", arcname=f"homes/{path.parent.name}/{path.name}.log.txt")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for quality_real.md, .jsonl, logs.tar.xz")
    parser.add_argument("--work", type=Path, default=Path("/tmp/quality-real"), help="volumes and the model")
    parser.add_argument("--corpus", type=Path, default=REPO / ".corpus", help="folder made by benchmarks/corpus.py")
    parser.add_argument("--deadline", type=float, default=530, help="seconds from the start: stop and write")
    parser.add_argument("--model", type=Path, help="an already pretrained model folder (skips pretraining)")
    parser.add_argument("--only-pretrain", action="store_true", help="pretrain into --work and stop")
    parser.add_argument("--plan-only", action="store_true", help="write the results file of the GPU matrix, unrun")
    parser.add_argument("--pretrain-seconds", type=float, default=240, help="pretraining's training budget")
    parser.add_argument("--pretrain-preset", default="small", help="pretrain.py --preset")
    parser.add_argument("--pretrain-max-steps", type=int, default=0)
    parser.add_argument("--pretrain-seq-len", type=int, default=1024)
    parser.add_argument("--pretrain-batch", type=int, default=64)
    parser.add_argument("--pretrain-compile", action="store_true", help="pretrain.py --compile")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"quantize runs, of: {', '.join(RUNS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"ONNX builds, of: {', '.join(VARIANTS)}")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--infer-tokens", type=int, default=48)
    parser.add_argument("--infer-prompts", type=int, default=3, help="held-out travel prompts answered")
    parser.add_argument("--corpus-passages", type=int, default=48)
    parser.add_argument("--passage-chars", type=int, default=1500)
    parser.add_argument("--gpu-slots", type=int, default=4, help="GPU stages at a time")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPU budget of the jobs at a time")
    args = parser.parse_args(argv)
    for name, choices in (("runs", RUNS), ("variants", VARIANTS)):
        unknown = set(getattr(args, name).split(",")) - set(choices)
        if unknown:
            parser.error(f"--{name}: unknown {', '.join(sorted(unknown))}; choose from {', '.join(choices)}")
    return args


def run_matrix(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "OLIVE_DISABLE_TELEMETRY"):
        os.environ[flag] = "1"  # nothing is downloaded: a network call could only hang until its timeout
    header = {
        "command": shlex.join(["benchmarks/quality_real.py", *sys.argv[1:]]),
        "machine": machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "deadline_s": args.deadline,
        "versions": versions(),
    }
    work = args.work.resolve()
    if args.plan_only:
        header["machine"] = "(not run: --plan-only lists the matrix a GPU machine runs)"
        header["versions"] = {}
    else:
        if not args.model:  # a fresh pretraining starts from a fresh work folder
            shutil.rmtree(work, ignore_errors=True)
        for folder in ("homes", "scores", "logs"):
            shutil.rmtree(work / folder, ignore_errors=True)
            (work / folder).mkdir(parents=True)
    gpu = args.plan_only or has_gpu()
    plan = Plan(
        work=work,
        model=(args.model or work / "model").resolve(),
        runs=[r for r in args.runs.split(",") if r],
        variants=[v for v in args.variants.split(",") if v],
        finetune_steps=args.finetune_steps,
        infer_tokens=args.infer_tokens,
        infer_prompts=args.infer_prompts,
        gpu=gpu,
        cpus=args.cpus,
    )
    if not args.plan_only:
        passages = corpus_passages(
            read_documents(args.corpus / "heldout.txt.xz"), args.corpus_passages, args.passage_chars, seed=0
        )
        (work / "corpus_passages.json").write_text(json.dumps(passages, indent=1) + "\n")
        header["corpus_passages"] = {"count": len(passages), "chars": sum(map(len, passages))}
        if (args.corpus / "sources.json").is_file():
            header["corpus_sources"] = json.loads((args.corpus / "sources.json").read_text())
    pretrain_job = None
    if not args.model:
        command = [
            sys.executable,
            str(REPO / "benchmarks" / "pretrain.py"),
            "--corpus",
            str(args.corpus.resolve()),
            "--out",
            str(plan.model),
            "--train-seconds",
            str(args.pretrain_seconds),
            "--preset",
            args.pretrain_preset,
            "--max-steps",
            str(args.pretrain_max_steps),
            "--seq-len",
            str(args.pretrain_seq_len),
            "--batch",
            str(args.pretrain_batch),
        ]
        command += ["--compile"] if args.pretrain_compile else []
        pretrain_job = Job("pretrain", command, 0, gpu=gpu, cpus=args.cpus)
    jobs = [pretrain_job] if args.only_pretrain else matrix(plan, pretrain_job)
    scheduler = Scheduler(jobs, work / "logs", args.deadline, t0, args.gpu_slots if gpu else 1, args.cpus)
    results = Results(plan, args.out, header, scheduler.jobs)
    results.write()
    if args.plan_only:
        return 0

    def save(job: Job | None = None) -> None:  # after every job: a command killed from outside keeps what was done
        results.write()
        collect_logs(work, args.out)

    scheduler.on_finish.append(save)
    scheduler.run()
    header["finished_s"] = round(time.perf_counter() - t0, 1)
    save()
    failed = [j.name for j in scheduler.jobs.values() if j.status == "failed"]
    print(f"quality_real: {header['finished_s']} s; results in {args.out}; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


def score_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="quality_real.py score", description=score.__doc__)
    parser.add_argument("--passages", type=Path, required=True, help="JSON list of corpus passages")
    parser.add_argument("--result", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--model", type=Path, help="a Hugging Face model folder")
    parser.add_argument("--adapter", type=Path, help="a PEFT adapter folder on top of --model")
    parser.add_argument("--onnx", type=Path, help="an optimize-layout folder")
    parser.add_argument("--adapters", default=f"base,{ADAPTER}", help="adapters to score the ONNX model with")
    return parser.parse_args(argv)


def main() -> None:
    if sys.argv[1:2] == ["score"]:
        score(score_args(sys.argv[2:]))
        return
    sys.exit(run_matrix(parse_args(sys.argv[1:])))


if __name__ == "__main__":
    main()
