"""LoRA finetune on 1 and on N data-parallel processes, side by side in one run (issue 7's benchmark).

Builds a model (tiny, or the Phi-3.5-mini shapes), quantizes it once (RTN: the quantizer does not matter for the
training speed), then runs the finetune stage as its container runs it with ``--processes 1`` and
``--processes N`` on the same volume, and reads the Trainer's own throughput from each run's output. Same
per-process batch in both, so N processes train N times the samples per step: the table gives steps/s and
samples/s, and the speed-up in samples/s is the scaling figure.

    python benchmarks/multi_gpu_finetune.py --size phi-3.5-mini --processes 2 --steps 100 \\
        --results benchmarks/results/multi_gpu_finetune.md        # on a 2-GPU machine
    python benchmarks/multi_gpu_finetune.py --size tiny --processes 2 --steps 10 --results /tmp/cpu.md   # gloo on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"tiny": None, "phi-3.5-mini": REPO / "configs" / "phi-3.5-mini.json"}
TRAINER_FIGURE = re.compile(r"'(train_runtime|train_steps_per_second|train_samples_per_second)': '?([\d.]+)")


def stage(name: str, home: Path, *args: str, env: dict[str, str] | None = None) -> str:
    command = [sys.executable, "-m", f"stages.{name}", "--home", str(home), *args]
    print("$", " ".join(f"{k}={v}" for k, v in (env or {}).items()), shlex.join(command), flush=True)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise SystemExit(f"{name} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def gpu_names() -> list[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        )
    except FileNotFoundError:
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--work", type=Path, default=Path("/tmp/olivepress-multi"))
    parser.add_argument("--results", type=Path, required=True)
    args = parser.parse_args()
    os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")
    home = args.work / args.size
    base = home / "base"
    if not (base / "config.json").is_file():
        make = [sys.executable, "-m", "stages.tiny_model", "--output", str(base)]
        if CONFIGS[args.size]:
            make += ["--config", str(CONFIGS[args.size]), "--vocab-size", "4096"]
        subprocess.run(make, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    stage("quantize", home, "--model", str(base), "--algorithm", "rtn", "--no-evaluate")
    rows = []
    gpus = len(gpu_names())
    for processes in (1, args.processes):
        # One process per GPU it may see: a single process shown every GPU would spread the model over them all
        # (the loader's device_map="auto"), which is model parallelism, not the one-GPU baseline.
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(processes)))} if gpus else {}
        started = time.perf_counter()
        out = stage(
            "finetune",
            home,
            *("--max-steps", str(args.steps), "--processes", str(processes), "--force", "--no-evaluate"),
            env=env,
        )
        wall = time.perf_counter() - started
        figures = {key: float(value) for key, value in TRAINER_FIGURE.findall(out)}
        manifest = json.loads((home / "finetune" / "manifest.json").read_text())
        rows.append({"processes": processes, "wall_s": round(wall, 1), **figures, "world_size": manifest["world_size"]})
        print(rows[-1], flush=True)
    one, many = rows
    lines = [
        f"# LoRA finetune on 1 and {args.processes} processes ({args.size}, {args.steps} steps)",
        "",
        f"Made by `python {shlex.join(sys.argv)}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"devices: {', '.join(gpu_names()) or 'CPU only (gloo)'}; "
        f"{os.cpu_count()} CPU cores. Each run sees only the GPUs it uses (`CUDA_VISIBLE_DEVICES`): 1 GPU, then "
        f"{args.processes}.",
        "",
        "| processes | wall (s) | train runtime (s) | steps/s | samples/s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['processes']} | {r['wall_s']} | {r.get('train_runtime', '-')} | "
            f"{r.get('train_steps_per_second', '-')} | {r.get('train_samples_per_second', '-')} |"
        )
    if one.get("train_samples_per_second") and many.get("train_samples_per_second"):
        speedup = many["train_samples_per_second"] / one["train_samples_per_second"]
        lines += [
            "",
            f"Samples/s with {args.processes} processes: **{speedup:.2f}x** one process (goal: ≥ 1.8x on 2 GPUs).",
        ]
    text = "\n".join(lines) + "\n"
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
