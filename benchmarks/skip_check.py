"""What checking a volume costs: the fast check every skip makes against the full sha256 of `olivepress verify`.

Two volumes: the tiny default (a real `olivepress run`), and one with the file sizes of a Phi-3.5-mini run (the
sizes an H200 run published: benchmarks/results/gpu_pipeline.jsonl), filled with random bytes and published through
contract.volume so its manifests are real. For each: the fast check (sizes and mtimes; what `run` does before every
skip), and the full check (every byte hashed) with a cold page cache (where this process may drop it) and a warm one.

    .venv/bin/python benchmarks/skip_check.py --results benchmarks/results/skip_check.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from contract import registry, volume  # noqa: E402

GB = 1_000_000_000
# The published files of a Phi-3.5-mini run (AWQ, r=64 switchable adapter), by size.
FULL_SIZE = {
    "quantize": {"model/model.safetensors": 2.28 * GB, "dequantized/model-00001-of-00002.safetensors": 4.97 * GB,
                 "dequantized/model-00002-of-00002.safetensors": 2.67 * GB},
    "finetune": {"adapter/adapter_model.safetensors": 0.151 * GB},
    "optimize": {"model/model.onnx.data": 2.60 * GB, "adapters/travel.onnx_adapter": 0.168 * GB},
    "infer": {"answers.json": 700},
}  # fmt: skip


def write_random(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1 << 24)
    with path.open("wb") as f:
        left = size
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)


def make_full_size(home: Path) -> None:
    for stage, files in FULL_SIZE.items():
        if volume.manifest_or_none(home / stage):
            continue

        def work(out: Path, files: dict[str, float] = files) -> None:
            for name, size in files.items():
                write_random(out / name, int(size))

        volume.run_stage(stage, home, {}, {"synthetic": True}, work)


def make_tiny(home: Path) -> None:
    if not all(volume.manifest_or_none(home / s) for s in registry.NAMES):
        olivepress = [sys.executable, "-m", "olivepress.cli", "run", "--max-steps", "5", "--home", str(home)]
        subprocess.run(olivepress, check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def check_all(home: Path, full: bool) -> float:
    clock = time.perf_counter()
    for stage in registry.NAMES:
        manifest = volume.read_manifest(home / stage)
        assert not volume.changed_outputs(home / stage, manifest, full=full), stage
    return time.perf_counter() - clock


def measure(home: Path, repeats: int) -> dict:
    size = sum(volume.read_manifest(home / s)["bytes_out"] for s in registry.NAMES)
    files = sum(len(volume.read_manifest(home / s)["outputs"]) for s in registry.NAMES)
    fast = statistics.median(check_all(home, full=False) for _ in range(repeats))
    cold = check_all(home, full=True) if drop_page_cache() else None
    warm = check_all(home, full=True)
    return {"bytes": size, "files": files, "fast_s": fast, "full_cold_s": cold, "full_warm_s": warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/olivepress-skip-check"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    rows = {}
    for name, make in (("tiny default", make_tiny), ("Phi-3.5-mini sizes", make_full_size)):
        home = args.work / name.split()[0]
        make(home)
        rows[name] = measure(home, args.repeats)
    table = [
        "| volume | published | files | fast check (every skip) | full sha256, cold cache | full sha256, warm |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        cold = f"{r['full_cold_s']:.2f} s" if r["full_cold_s"] is not None else "not measured (needs root)"
        table.append(
            f"| {name} | {r['bytes'] / GB:.2f} GB | {r['files']} | {r['fast_s'] * 1000:.2f} ms | {cold} "
            f"| {r['full_warm_s']:.2f} s |"
        )
    print("\n".join(table))
    if args.results:
        machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}"
        command = shlex.join(["benchmarks/skip_check.py", *sys.argv[1:]])
        args.results.write_text(
            "# What checking a volume costs\n\n"
            f"`{command}` on {machine}, Python {platform.python_version()}, "
            f"{datetime.now(timezone.utc):%Y-%m-%d}. Fast check: median of {args.repeats}.\n\n"
            + "\n".join(table)
            + "\n\nThe fast check (sizes and modification times, and a hash of only what was touched) runs before "
            "every skip and whenever a stage reads the stage before it; `olivepress verify` hashes every byte.\n"
        )
        args.results.with_suffix(".jsonl").write_text(
            json.dumps({"command": command, "machine": machine, "rows": rows}) + "\n"
        )


if __name__ == "__main__":
    main()
