"""Pipeline speed at both ends: the stages on a GPU, and `olivepress run` of the tiny default on a CPU.

Runs each stage as its container does (``python -m stages.<name>``) on a volume per model size, polls
``nvidia-smi`` for the peak GPU memory of the machine, and appends one JSON row per stage (with the algorithm,
the LoRA steps and whether held-out scoring was on) to the results file. ``--end-to-end`` times `olivepress run`
from an empty home as a user runs it. ``--table`` turns the file into the Markdown table committed beside it,
with the goals and whether they were met.

    python benchmarks/gpu_pipeline.py --size tiny --size phi-3.5-mini --algorithm awq --work /tmp/bench \\
        --results benchmarks/results/gpu_pipeline.jsonl          # on the GPU machine
    python benchmarks/gpu_pipeline.py --end-to-end --results benchmarks/results/gpu_pipeline.jsonl  # 2 cores
    python benchmarks/gpu_pipeline.py --table --results benchmarks/results/gpu_pipeline.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from contract.registry import NAMES as STAGES  # noqa: E402

SIZES = {"tiny": None, "phi-3.5-mini": REPO / "configs" / "phi-3.5-mini.json"}


class GpuPeak:
    """Peak memory.used of GPU 0 while the block runs, from nvidia-smi every 100 ms (MiB); None without a GPU."""

    def __enter__(self) -> GpuPeak:
        self.peak = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                self.peak = max(self.peak or 0, int(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            self._stop.wait(0.1)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def gpu_name() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "none"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_stage(stage: str, home: Path, args: list[str], log: Path) -> tuple[float, int | None, int]:
    command = [sys.executable, "-m", f"stages.{stage}", "--home", str(home), *args]
    print("$", shlex.join(command), flush=True)
    start = time.perf_counter()
    with GpuPeak() as gpu, log.open("a") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO).returncode
    wall = time.perf_counter() - start
    if code != 0:
        print(log.read_text()[-4000:])
        raise SystemExit(f"{stage} failed with exit {code}; log: {log}")
    return wall, gpu.peak, code


def bench(size: str, algorithm: str, steps: int, evaluate: bool, work: Path, results: Path, stages: list[str]) -> None:
    home = work / size
    home.mkdir(parents=True, exist_ok=True)
    log = work / f"{size}.log"
    model = home / "base"
    if "make" in stages:
        start = time.perf_counter()
        make = [sys.executable, "-m", "stages.tiny_model", "--output", str(model)]
        if SIZES[size]:
            make += ["--config", str(SIZES[size]), "--vocab-size", "4096"]
        subprocess.run(make, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        print(f"{size}: base model built in {time.perf_counter() - start:.0f} s", flush=True)
    scoring = [] if evaluate else ["--no-evaluate"]
    plan = {
        "quantize": ["--model", str(model), "--algorithm", algorithm, *scoring],
        "finetune": ["--max-steps", str(steps), *scoring],
        "optimize": scoring,
        "infer": ["--max-new-tokens", "64"],
    }
    for stage in (s for s in plan if s in stages):
        wall, peak, _ = run_stage(stage, home, plan[stage], log)
        manifest = json.loads((home / stage / "manifest.json").read_text())
        row = {
            "size": size,
            "stage": stage,
            "algorithm": algorithm,
            "steps": steps,
            "scoring": evaluate,
            "wall_s": round(wall, 1),
            "stage_wall_s": manifest["wall_s"],
            "gpu_peak_mib": peak,
            "bytes_in": manifest["bytes_in"],
            "bytes_out": manifest["bytes_out"],
            "metrics": manifest.get("metrics", {}),
            "gpu": gpu_name(),
            "host": platform.node(),
            "versions": manifest["versions"],
        }
        if stage == "quantize":
            row["quantized_bytes"] = folder_bytes(home / "quantize" / "model")
            row["base_bytes"] = folder_bytes(model)
        if stage == "optimize":
            row["onnx_bytes"] = folder_bytes(home / "optimize" / "model")
            row["adapter_bytes"] = folder_bytes(home / "optimize" / "adapters")
        if stage == "infer":
            row["answers"] = manifest["answers"]
        append(results, row)


def end_to_end(work: Path, results: Path, checkout: Path = REPO) -> None:
    """`olivepress run` from an empty home, as a user runs it (every stage its own process): the total, each
    stage's own work (its manifest) and what each stage process spent around it (start-up, imports, exit).

    ``checkout`` is the source tree to run (another commit's worktree, for a before/after in one run); the home
    goes by OLIVEPRESS_HOME, which every version of the launcher reads.
    """
    home = work / "end-to-end"
    shutil.rmtree(home, ignore_errors=True)
    command = [sys.executable, "-m", "olivepress.cli", "run"]
    env = dict(os.environ, OLIVEPRESS_HOME=str(home), PYTHONPATH=str(checkout))
    revision = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()  # fmt: skip
    print("$", f"(in {checkout}, {revision})", shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = time.perf_counter() - start
    manifests = {s: json.loads((home / s / "manifest.json").read_text()) for s in STAGES}
    stage_work = {s: m["wall_s"] for s, m in manifests.items()}
    append(
        results,
        {
            "size": "tiny",
            "stage": "olivepress run (all four, from an empty home)",
            "checkout": "this" if checkout == REPO else f"commit {revision}",
            "algorithm": manifests["quantize"]["parameters"]["algorithm"],
            "steps": manifests["finetune"]["parameters"]["max_steps"],
            "scoring": True,
            "wall_s": round(total, 1),
            "stage_wall_s": round(sum(stage_work.values()), 1),
            "stage_work_s": stage_work,
            "outside_stages_s": round(total - sum(stage_work.values()), 1),
            "metrics": {s: m.get("metrics", {}) for s, m in manifests.items()},
            "gpu": gpu_name(),
            "host": platform.node(),
            "cpu": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
            "load": [round(x, 2) for x in os.getloadavg()],
            "versions": manifests["quantize"]["versions"],
        },
    )


def append(results: Path, row: dict) -> None:
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k not in ("versions", "answers", "metrics")}), flush=True)


def table(results: Path) -> str:
    """The results file as Markdown, with the issue's two goals and whether the rows meet them."""
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    command = ""
    for record in records:  # each row, with the command line before it
        command = record.get("command", command)
        record.setdefault("made_by", command)
    rows = [r for r in records if "stage" in r]
    gb = 1e9
    lines = [
        "| model | where | run | stage | wall (s) | stage's own work (s) | peak GPU (GiB) | output |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        run = f"{r['algorithm']}, {r['steps']} steps, scoring {'on' if r['scoring'] else 'off'}"
        if r.get("checkout", "this") != "this":
            run += f" ({r['checkout']}, before)"
        where = r["gpu"] if r["gpu"] not in ("", "none") else f"CPU ({r.get('cpu', '?')})"
        if r["stage"] == "quantize":
            out = f"{r['base_bytes'] / gb:.2f} GB → {r['quantized_bytes'] / gb:.2f} GB"
        elif r["stage"] == "optimize":
            out = f"ONNX {r['onnx_bytes'] / gb:.2f} GB + adapter {r['adapter_bytes'] / 1e6:.0f} MB"
        elif r["stage"] == "infer":
            out = "CPU decode: " + ", ".join(
                f"{a['adapter']} {a['decode_tokens_per_s']} tok/s" for a in r["answers"][:2]
            )
        elif r["stage"] == "finetune":
            out = f"adapter {r['bytes_out'] / 1e6:.0f} MB"
        else:
            out = "stages: " + ", ".join(f"{s} {t:.1f}" for s, t in r["stage_work_s"].items())
            out += f"; outside them {r['outside_stages_s']:.1f} s"
        peak = f"{r['gpu_peak_mib'] / 1024:.1f}" if r.get("gpu_peak_mib") else "-"
        lines.append(
            f"| {r['size']} | {where} | {run} | {r['stage']} | {r['wall_s']} | {r['stage_wall_s']} | {peak} | {out} |"
        )
    lines += [
        "",
        *goals(rows),
        "",
        "Made by: " + "; ".join(f"`{r['command']}` ({r['started']})" for r in records if "command" in r),
    ]
    versions = rows[0]["versions"] if rows else {}
    lines.append("\nVersions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[str]:
    """Goal 1: quantize + finetune + optimize of the Phi-3.5-mini shapes in <= 300 s (AWQ, 100 steps, scoring on)
    within 16 GiB of GPU memory. Goal 2: `olivepress run` of the tiny default in <= 35 s on 2 cores."""
    out = []
    full = [r for r in rows if r["size"] == "phi-3.5-mini" and r["algorithm"] == "awq" and r["scoring"]]
    three = {r["stage"]: r for r in full if r["stage"] in ("quantize", "finetune", "optimize")}
    if len(three) == 3:
        total = sum(r["wall_s"] for r in three.values())
        peak = max(r["gpu_peak_mib"] or 0 for r in three.values()) / 1024
        met = "met" if total <= 300 and peak <= 16 else "not met"
        out.append(
            f"- **Goal 1** (Phi-3.5-mini shapes, AWQ, 100 steps, scoring on, one GPU): quantize + finetune + optimize "
            f"**{total:.0f} s** (≤ 300 s), peak GPU memory **{peak:.1f} GiB** (≤ 16 GiB): **{met}**."
        )
    tiny = [r for r in rows if r["stage"].startswith("olivepress run")]
    if tiny:
        latest = [r for r in tiny if r["made_by"] == tiny[-1]["made_by"]]
        now = [r for r in latest if r.get("checkout", "this") == "this"]
        before = [r for r in latest if r.get("checkout", "this") != "this"]
        wall = statistics.median(r["wall_s"] for r in now)
        met = "met" if wall <= 35 else "not met"
        work = statistics.median(r["stage_wall_s"] for r in now)
        outside = statistics.median(r["outside_stages_s"] for r in now)
        line = (
            f"- **Goal 2** (`olivepress run`, tiny default, from an empty home, {now[-1].get('cpu', '?')}, median of "
            f"{len(now)}): **{wall:.1f} s** (≤ 35 s): **{met}**; the stages' own work {work:.1f} s, {outside:.1f} s "
            "around them."
        )
        if before:
            then = statistics.median(r["wall_s"] for r in before)
            line += (
                f" The same runs of {before[0]['checkout']}, alternating with these: {then:.1f} s "
                f"({wall / then:.2f}x of it)."
            )
        out.append(line)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", action="append", choices=sorted(SIZES), default=[])
    parser.add_argument("--algorithm", default="awq", choices=["awq", "gptq", "rtn"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--no-evaluate", action="store_true", help="run the stages without held-out scoring")
    parser.add_argument("--stages", default="make,quantize,finetune,optimize,infer")
    parser.add_argument("--end-to-end", action="store_true", help="time `olivepress run` of the tiny default")
    parser.add_argument("--repeats", type=int, default=1, help="--end-to-end runs (each after --baseline's)")
    parser.add_argument("--baseline", type=Path, help="--end-to-end also runs this checkout, alternating with this one")
    parser.add_argument("--work", type=Path, default=Path("/tmp/olivepress-bench"))
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "gpu_pipeline.jsonl")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of the results file")
    args = parser.parse_args()
    if args.table:
        print(table(args.results))
        return
    os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as f:
        f.write(
            json.dumps(
                {
                    "command": shlex.join(["benchmarks/gpu_pipeline.py", *sys.argv[1:]]),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
            )
            + "\n"
        )
    if args.end_to_end:
        for _ in range(args.repeats):
            if args.baseline:
                end_to_end(args.work, args.results, args.baseline.resolve())
            end_to_end(args.work, args.results)
    for size in args.size:
        bench(size, args.algorithm, args.steps, not args.no_evaluate, args.work, args.results, args.stages.split(","))
    print(table(args.results))


if __name__ == "__main__":
    main()
