"""Time the CUDA stages as the images run them: per-stage wall time, peak GPU memory, output size.

Runs each stage as its container does (``python -m stages.<name>``) on a volume per model size, polls
``nvidia-smi`` for the peak GPU memory of the machine, and appends one JSON row per stage to the results file;
``--table`` turns that file into the Markdown table committed beside it, with the lab's figures alongside.

    python benchmarks/gpu_pipeline.py --size tiny --size phi-3.5-mini --algorithm awq --work /tmp/bench \\
        --results benchmarks/results/gpu_pipeline.jsonl
    python benchmarks/gpu_pipeline.py --table --results benchmarks/results/gpu_pipeline.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZES = {"tiny": None, "phi-3.5-mini": REPO / "configs" / "phi-3.5-mini.json"}
# The lab's own figures (Phi-3.5-mini on an A10/A100, from its README), for the table.
LAB = {"quantize": "~8 min, 7.5 GB → 2.5 GB", "finetune": "~6 min", "optimize": "~5 min"}


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


def bench(size: str, algorithm: str, steps: int, work: Path, results: Path, stages: list[str]) -> None:
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
    plan = {
        "quantize": ["--model", str(model), "--algorithm", algorithm],
        "finetune": ["--max-steps", str(steps)],
        "optimize": [],
        "infer": ["--max-new-tokens", "64"],
    }
    for stage in (s for s in plan if s in stages):
        wall, peak, _ = run_stage(stage, home, plan[stage], log)
        manifest = json.loads((home / stage / "manifest.json").read_text())
        row = {
            "size": size,
            "stage": stage,
            "wall_s": round(wall, 1),
            "stage_wall_s": manifest["wall_s"],
            "gpu_peak_mib": peak,
            "bytes_in": manifest["bytes_in"],
            "bytes_out": manifest["bytes_out"],
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
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k not in ("versions", "answers")}), flush=True)


def table(results: Path) -> str:
    """The results file as Markdown: each row labelled with the algorithm and steps of the command that made it."""
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    gb = 1e9
    lines = [
        "| model | run | stage | wall (s) | peak GPU (GiB) | output | lab (A10/A100, real weights) |",
        "|---|---|---|---|---|---|---|",
    ]
    run = ""
    for r in records:
        if "command" in r:
            words = r["command"].split()
            algorithm = words[words.index("--algorithm") + 1] if "--algorithm" in words else "awq"
            steps = words[words.index("--steps") + 1] if "--steps" in words else "100"
            run = f"{algorithm}, {steps} steps"
            continue
        if r["stage"] == "quantize":
            out = f"{r['base_bytes'] / gb:.2f} GB → {r['quantized_bytes'] / gb:.2f} GB"
        elif r["stage"] == "optimize":
            out = f"ONNX {r['onnx_bytes'] / gb:.2f} GB + adapter {r['adapter_bytes'] / 1e6:.0f} MB"
        elif r["stage"] == "infer":
            speeds = ", ".join(f"{a['adapter']} {a['decode_tokens_per_s']} tok/s" for a in r["answers"][:2])
            out = f"CPU decode: {speeds}"
        else:
            out = f"adapter {r['bytes_out'] / 1e6:.0f} MB"
        peak = f"{r['gpu_peak_mib'] / 1024:.1f}" if r.get("gpu_peak_mib") else "-"
        lab = LAB.get(r["stage"], "") if r["size"] == "phi-3.5-mini" else ""
        lines.append(f"| {r['size']} | {run} | {r['stage']} | {r['wall_s']} | {peak} | {out} | {lab} |")
    lines.append("\nMade by: " + "; ".join(f"`{r['command']}` ({r['started']})" for r in records if "command" in r))
    rows = [r for r in records if "stage" in r]
    versions = rows[0]["versions"] if rows else {}
    lines.append(
        f"\nGPU: {rows[0]['gpu'] if rows else '?'}; versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", action="append", choices=sorted(SIZES), default=[])
    parser.add_argument("--algorithm", default="awq", choices=["awq", "gptq", "rtn"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--stages", default="make,quantize,finetune,optimize,infer")
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
        f.write(json.dumps({"command": shlex.join(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    for size in args.size:
        bench(size, args.algorithm, args.steps, args.work, args.results, args.stages.split(","))
    print(table(args.results))


if __name__ == "__main__":
    main()
