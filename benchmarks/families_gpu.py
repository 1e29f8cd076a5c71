"""AWQ, which needs a CUDA GPU, for every family of contract/families.py: which families pass on this machine.

For each family, the tiny pipeline with AWQ on its own volume (`olivepress run --model tiny:NAME --algorithm awq
--max-steps 3`), then the check tests/test_families.py makes on the CPU: the int4 ONNX held-out loss within
FIDELITY nats of PyTorch's, adapter on and off. Writes a Markdown table: each family's result, each stage's wall
time, the held-out figures, and the error of a failure.

    python benchmarks/families_gpu.py --work /tmp/families --results benchmarks/results/families_gpu.md
    python benchmarks/families_gpu.py --family gemma2 --family qwen2 --work /tmp/families --results /tmp/two.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpu_pipeline import gpu_name  # noqa: E402 (this folder: the script's own)

from contract import families, registry  # noqa: E402

STEPS = "3"
# tests/test_evaluate.py's INT4_TOLERANCE: how far the int4 build's held-out loss may be from PyTorch's.
FIDELITY = 0.02
PACKAGES = ("torch", "transformers", "autoawq", "olive-ai", "onnxruntime-genai")


def manifest(home: Path, stage: str) -> dict | None:
    path = home / stage / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_family(family: families.Family, work: Path) -> dict:
    """One family's AWQ pipeline on a fresh volume under ``work``: its result row."""
    home = work / family.name
    command = [sys.executable, "-m", "olivepress.cli", "run", "--home", str(home), "--force"]
    command += ["--model", f"tiny:{family.name}", "--algorithm", "awq", "--max-steps", STEPS]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=dict(os.environ))
    row: dict = {"family": family.name, "wall_s": round(time.perf_counter() - start, 1)}
    manifests = {stage: manifest(home, stage) for stage in registry.NAMES}
    row["stages"] = {stage: m["wall_s"] for stage, m in manifests.items() if m}
    losses = {key: value["loss"] for m in manifests.values() if m for key, value in m.get("metrics", {}).items()}
    row["losses"] = losses
    if process.returncode != 0:
        row["result"] = "failed"
        row["note"] = " ".join(process.stderr.strip().splitlines()[-6:])[:400]
        return row
    gaps = {
        "adapter on": abs(losses["onnx_adapter"] - losses["finetuned"]),
        "adapter off": abs(losses["onnx_base"] - losses["quantized"]),
    }
    row["result"] = "passed" if max(gaps.values()) < FIDELITY else "failed"
    row["note"] = ", ".join(f"int4 vs PyTorch, {name}: {gap:.4f} nats" for name, gap in gaps.items())
    return row


def table(rows: list[dict]) -> str:
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in PACKAGES if _installed(p))
    lines = [
        "# AWQ for every family, on a GPU",
        "",
        f"`python benchmarks/families_gpu.py` on {gpu_name()} ({platform.node()}), {time.strftime('%Y-%m-%d')}: "
        f"each family's tiny pipeline with `--algorithm awq --max-steps {STEPS}`; passed means every stage ran "
        f"and the int4 held-out loss is within {FIDELITY} nats of PyTorch's, adapter on and off. {versions}.",
        "",
        "| family | result | quantize (awq) s | finetune s | optimize s | infer s | base | quantized | finetuned | "
        "ONNX off | ONNX on | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        stages = [str(row["stages"].get(stage, "-")) for stage in registry.NAMES]
        losses = [
            f"{row['losses'][key]:.4f}" if key in row["losses"] else "-"
            for key in ("base", "quantized", "finetuned", "onnx_base", "onnx_adapter")
        ]
        note = row["note"].replace("|", "\\|")
        lines.append(
            f"| {row['family']} | **{row['result']}** | {' | '.join(stages)} | {' | '.join(losses)} | {note} |"
        )
    return "\n".join(lines) + "\n"


def _installed(package: str) -> bool:
    try:
        metadata.version(package)
    except metadata.PackageNotFoundError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", action="append", choices=families.NAMES, help="Repeatable [default: every one].")
    parser.add_argument("--work", type=Path, required=True, help="Folder for one volume per family.")
    parser.add_argument("--results", type=Path, required=True, help="The Markdown table to write.")
    args = parser.parse_args()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.family or families.NAMES:
        rows.append(run_family(families.BY_NAME[name], args.work))
        args.results.write_text(table(rows))  # after each family: a run cut short keeps what it finished
    print(table(rows))
    sys.exit(0 if all(row["result"] == "passed" for row in rows) else 1)


if __name__ == "__main__":
    main()
