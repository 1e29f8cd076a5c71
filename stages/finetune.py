"""finetune: LoRA (or QLoRA) through Olive's training pass, on the quantized weights.

It trains on ``quantize/dequantized`` (the quantized weights as a plain float
model; quantize.py says why) and writes ``finetune/adapter`` (a PEFT adapter).
Only the train split is seen; the held-out rows are left for scoring.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click

from contract import registry, volume
from contract.exits import BadInput
from stages import common, data
from stages import evaluate as evaluate_

log = logging.getLogger("olivepress")
OUTPUTS = registry.STAGES["finetune"].outputs


def resolve_processes(value: str) -> int:
    if value == "all":
        return max(1, common.gpu_count())
    if not value.isdigit() or int(value) < 1:
        raise BadInput(f"--processes must be a whole number of at least 1, or 'all'; got {value!r}")
    return int(value)


def write_rows(rows: list[dict[str, str]], path: Path) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def train(job: dict) -> Path:
    """Run Olive's LoRA pass for one process and return the adapter folder it wrote.

    Under torchrun (``train_distributed``) every process runs this: the Hugging Face Trainer inside Olive's pass
    finds the process group in the environment and trains data-parallel; each rank writes into its own folder
    and rank 0's adapter is the one kept.
    """
    import torch

    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    workdir = Path(job["workdir"]) / f"rank{rank}"
    passes = json.loads(json.dumps(job["passes"]))
    if os.environ.get("WORLD_SIZE", "1") != "1":
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)  # one GPU per process, not the whole model spread over all of them
            passes["lora"]["device_map"] = "current_device"
        else:
            os.environ["ACCELERATE_USE_CPU"] = "true"  # else the Trainer ignores the gloo group and trains alone
    torch.manual_seed(job["seed"])  # PEFT draws the LoRA A matrices before the trainer seeds anything
    return common.run_olive(workdir, job["model"], passes, job["data_configs"]) / "adapter"


def train_distributed(job: dict, processes: int) -> Path:
    """Train with ``processes`` data-parallel processes through PyTorch's own launcher (torchrun)."""
    job_file = Path(job["workdir"]) / "job.json"
    job_file.write_text(json.dumps(job))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command += ["-m", "stages.finetune", "--train-job", str(job_file)]
    log.info("finetune: %s", " ".join(command))
    subprocess.run(command, check=True)
    return Path(job["workdir"]) / "rank0" / "output" / "adapter"


@common.stage_command("finetune")
@click.option(
    "--data-files",
    type=click.Path(path_type=Path),
    default=data.DEFAULT_DATA,
    help='JSONL of {"prompt": ..., "response": ...} rows (CRLF and a missing final newline are fine).',
)
@click.option("--text-template", default=data.DEFAULT_TEMPLATE, help="How a row becomes training text (the lab's).")
@click.option("--method", type=click.Choice(["lora", "qlora"]), default="lora", help="qlora needs a CUDA GPU.")
@click.option("--max-steps", default=100, type=click.IntRange(min=1), help="Optimizer steps.")
@click.option("--rank", default=64, type=click.IntRange(min=1), help="LoRA rank r.")
@click.option("--alpha", default=16.0, help="LoRA alpha (scale = alpha / rank).")
@click.option("--learning-rate", default=2e-4, help="AdamW learning rate (constant schedule, Olive's default).")
@click.option("--batch-size", default=4, type=click.IntRange(min=1), help="Sequences per step.")
@click.option("--max-seq-len", default=512, type=click.IntRange(min=16), help="Tokens per training sequence.")
@click.option(
    "--target-modules", default="", help="Comma-separated module names to adapt (default: Olive's for the model)."
)
@click.option("--heldout-fraction", default=0.1, help="Share of rows kept out of training, for scoring.")
@click.option("--seed", default=0, help="Seed of the split, LoRA initialisation and data order.")
@click.option("--evaluate/--no-evaluate", default=True, help="Score the finetuned model on the held-out rows.")
@click.option(
    "--processes",
    default="1",
    help="Data-parallel training processes through torchrun: one per GPU ('all' = every visible GPU); "
    "on a CPU they share its cores (gloo). The adapter is saved once.",
)
@click.option("--train-job", type=click.Path(exists=True, dir_okay=False, path_type=Path), hidden=True)
@click.option(
    "--torch-dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    help="Training dtype; auto is bfloat16 on a GPU, float32 on a CPU.",
)
def command(
    root: Path,
    force: bool,
    data_files: Path,
    text_template: str,
    method: str,
    max_steps: int,
    rank: int,
    alpha: float,
    learning_rate: float,
    batch_size: int,
    max_seq_len: int,
    target_modules: str,
    heldout_fraction: float,
    seed: int,
    evaluate: bool,
    processes: str,
    train_job: Path | None,
    torch_dtype: str,
) -> None:
    """Train a LoRA adapter on the quantized model from a JSONL of prompt/response rows.

    \b
    Examples:
      olivepress finetune --max-steps 100
      olivepress finetune --data-files my.jsonl --rank 16 --learning-rate 1e-4
    """
    if train_job:  # one torchrun worker of train_distributed: train only, the parent publishes
        train(json.loads(train_job.read_text()))
        return
    processes = resolve_processes(processes)
    text_template = data.unescape(text_template)
    dataset = data.load_dataset(data_files, text_template)  # every row checked before any compute
    train_idx, heldout_idx = data.split(dataset, heldout_fraction, seed)
    if method == "qlora" and not common.has_cuda():
        raise BadInput("--method qlora needs a CUDA GPU (bitsandbytes); on a CPU use --method lora")
    base = volume.upstream(root, "finetune", "quantize", "dequantized")
    dtype = common.resolve_dtype(torch_dtype)
    parameters = {
        "method": method,
        "text_template": text_template,
        "max_steps": max_steps,
        "rank": rank,
        "alpha": alpha,
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "max_seq_len": max_seq_len,
        "target_modules": [m for m in target_modules.split(",") if m],
        "heldout_fraction": heldout_fraction,
        "seed": seed,
        "torch_dtype": dtype,
        "evaluate": evaluate,
        "processes": processes,
    }
    split_record = {
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        "train_rows": len(train_idx),
        "heldout_rows": len(heldout_idx),
        "heldout_sha256": data.rows_sha256(dataset, heldout_idx),
        "train_sha256": data.rows_sha256(dataset, train_idx),
    }

    def work(out: Path) -> dict:
        with volume.scratch(root, "finetune-") as tmp:
            train_file = write_rows([dataset.rows[i] for i in train_idx], tmp / "train.jsonl")
            lora = {
                "type": {"lora": "LoRA", "qlora": "QLoRA"}[method],
                "train_data_config": "train_data",
                "torch_dtype": dtype,
                "r": rank,
                "alpha": alpha,
                "training_args": {
                    "max_steps": max_steps,
                    "learning_rate": learning_rate,
                    "per_device_train_batch_size": batch_size,
                    "seed": seed,
                    "data_seed": seed,
                    "logging_steps": max(1, max_steps // 10),
                    # Checkpointing trades compute for GPU memory; on a CPU it only slows training down.
                    "gradient_checkpointing": common.has_cuda(),
                },
            }
            if parameters["target_modules"]:
                lora["target_modules"] = parameters["target_modules"]
            train_data = {
                "name": "train_data",
                "type": "HuggingfaceContainer",
                "load_dataset_config": {"data_name": "json", "split": "train", "data_files": [str(train_file)]},
                "pre_process_data_config": {
                    "text_template": text_template,
                    "max_seq_len": max_seq_len,
                    "add_special_tokens": False,
                    "max_samples": len(train_idx),
                },
                "dataloader_config": {"batch_size": batch_size},
            }
            job = {
                "workdir": str(tmp),
                "seed": seed,
                "model": {"model_path": str(base), "load_kwargs": {"attn_implementation": "eager"}},
                "passes": {"lora": lora},
                "data_configs": [train_data],
            }
            adapter_dir = train(job) if processes == 1 else train_distributed(job, processes)
            shutil.move(str(adapter_dir), out / OUTPUTS["adapter"])
        # Paths on this machine would make identical runs differ: name the base by its place on the volume.
        config_file = out / OUTPUTS["adapter"] / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = base.relative_to(root).as_posix()
        if isinstance(config.get("target_modules"), list):  # PEFT writes a set in hash order
            config["target_modules"] = sorted(config["target_modules"])
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (out / OUTPUTS["adapter"] / "README.md").unlink(missing_ok=True)  # PEFT's empty model card
        # The held-out rows travel with the adapter: optimize scores the ONNX model on exactly these.
        heldout = [dataset.rows[i] for i in heldout_idx]
        write_rows(heldout, out / OUTPUTS["heldout"])
        extra: dict = {"split": split_record, "world_size": processes}
        if evaluate and heldout:
            extra["metrics"] = {
                "finetuned": evaluate_.torch_loss(base, heldout, text_template, out / OUTPUTS["adapter"])
            }
        return extra

    inputs = {"base": base, "data_files": data_files}
    volume.run_stage("finetune", root, inputs, parameters, work, force=force, packages=common.TORCH_STACK)


if __name__ == "__main__":
    common.entrypoint(command)
