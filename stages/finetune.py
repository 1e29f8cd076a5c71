"""finetune: LoRA (or QLoRA) through Olive's training pass, on the quantized weights.

It trains on ``quantize/dequantized`` (the quantized weights as a plain float
model; quantize.py says why) and writes ``finetune/adapter`` (a PEFT adapter).
Only the train split is seen; the held-out rows are left for scoring.

The loss counts the answer tokens only, unless ``--train-on-inputs``.  Olive's
LoRA pass trains from a data config, and its text-generation preprocessing
cannot mask (it joins all rows and cuts blocks, dropping the tail), so this
stage hands it pre-tokenized data: ``training_data`` renders and tokenizes the
rows with the one function scoring uses too (``data.example``), packs them
into sequences with labels of -100 where the loss must not look, and Olive
loads that file as it is (``skip_pre_process``); its LoRA collator pads and
keeps the labels.  Registering a preprocessing component with Olive instead
would put the same code behind a user script that every training process
imports by path, and leave bad data to be found after the model has loaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from contract import families, registry, volume
from contract.exits import BadInput
from stages import common, data
from stages import evaluate as evaluate_

log = logging.getLogger("olivepress")
OUTPUTS = registry.STAGES["finetune"].outputs


# The faster attention kernel where a family allows either. On one H200 (Phi-3.5-mini shapes, bfloat16, padded
# batches, activation checkpointing) Olive's LoRA pass of 100 steps took 33 s with eager attention and 53 s with
# SDPA; on 2 CPU cores (the tiny model, float32) SDPA is the faster in a step benchmark, 158 against 171 ms.
FASTER_ATTENTION = {"gpu": "eager", "cpu": "sdpa"}


def training_attention(family: families.Family, device: str) -> str:
    """The attention finetune trains with: the family's own where it needs one, else the faster on ``device``."""
    return family.training_attention or FASTER_ATTENTION[device]


def resolve_processes(value: str) -> int:
    if value == "all":
        return max(1, common.gpu_count())
    if not value.isdigit() or int(value) < 1:
        raise BadInput(f"--processes must be a whole number of at least 1, or 'all'; got {value!r}")
    return int(value)


def write_rows(rows: list[dict], path: Path) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def training_data(
    dataset: data.Dataset, tokenizer: data.Tokenizer, max_seq_len: int, train_on_inputs: bool
) -> data.Packed:
    """The train rows as the sequences training sees: tokenized, masked, packed; a row cut at ``max_seq_len``
    is counted in a warning, and data with no answer token left to train on is refused."""
    packed = data.pack(dataset.examples(tokenizer, train_on_inputs), max_seq_len)
    if packed.truncated:
        log.warning(
            "finetune: %d of %d train rows are longer than --max-seq-len %d tokens and were cut to it",
            packed.truncated,
            len(dataset.rows),
            max_seq_len,
        )
    if packed.dropped:
        log.warning(
            "finetune: %d train row(s) have no answer token in their first %d tokens and are left out; "
            "raise --max-seq-len to train on them",
            packed.dropped,
            max_seq_len,
        )
    if not packed.sequences:
        raise BadInput(
            f"no train row has an answer token within its first --max-seq-len {max_seq_len} tokens; raise --max-seq-len"
        )
    return packed


@dataclass(frozen=True)
class Paths:
    """What a finetune run's Olive workflows work on: the base model, a scratch folder and the device."""

    base: Path  # the dequantized model LoRA trains on
    workdir: Path  # scratch: the training sequences, the job file and one folder per training process
    device: str  # "gpu" or "cpu": where training runs

    @property
    def train_file(self) -> Path:
        """The training sequences (``training_data``), one JSON object per line."""
        return self.workdir / "train.jsonl"

    @property
    def job_file(self) -> Path:
        """What every torchrun process reads (``train_distributed``)."""
        return self.workdir / "job.json"

    def process_dir(self, process: int) -> Path:
        return self.workdir / f"rank{process}"


def olive_workflow(parameters: dict, paths: Paths, process: int = 0) -> dict:
    """The Olive workflow of one training process (of ``parameters["processes"]``): the LoRA or QLoRA pass on the
    train rows, in that process's own folder. ``parameters`` are the stage's."""
    max_steps = parameters["max_steps"]
    lora = {
        "type": {"lora": "LoRA", "qlora": "QLoRA"}[parameters["method"]],
        "train_data_config": "train_data",
        "torch_dtype": parameters["torch_dtype"],
        "r": parameters["rank"],
        "alpha": parameters["alpha"],
        "training_args": {
            "max_steps": max_steps,
            "learning_rate": parameters["learning_rate"],
            "per_device_train_batch_size": parameters["batch_size"],
            "seed": parameters["seed"],
            "data_seed": parameters["seed"],
            "logging_steps": max(1, max_steps // 10),
            # Checkpointing trades compute for GPU memory; on a CPU it only slows training down.
            "gradient_checkpointing": paths.device == "gpu",
        },
    }
    if parameters["target_modules"]:
        lora["target_modules"] = parameters["target_modules"]
    if parameters["processes"] > 1 and paths.device == "gpu":
        lora["device_map"] = "current_device"  # one GPU per process, not the whole model spread over all of them
    train_data = {
        "name": "train_data",
        "type": "HuggingfaceContainer",
        "load_dataset_config": {"data_name": "json", "split": "train", "data_files": [str(paths.train_file)]},
        # The file holds input_ids, attention_mask and labels already (the module docstring says why).
        "pre_process_data_config": {"type": "skip_pre_process"},
    }
    model = {"model_path": str(paths.base), "load_kwargs": {"attn_implementation": parameters["attention"]}}
    return common.olive_workflow(model, {"lora": lora}, paths.process_dir(process), paths.device, [train_data])


def training_job(parameters: dict, paths: Paths) -> dict:
    """Everything the training processes run: the seed and each process's Olive workflow, by rank.

    With ``--processes`` above 1 this is the job file every torchrun process reads (``paths.job_file``).
    """
    workflows = [olive_workflow(parameters, paths, process) for process in range(parameters["processes"])]
    return {"seed": parameters["seed"], "workflows": workflows}


def train(job: dict) -> Path:
    """Run the Olive workflow of this process and return the adapter folder it wrote.

    Under torchrun (``train_distributed``) every process runs this: the Hugging Face Trainer inside Olive's pass
    finds the process group in the environment and trains data-parallel; each rank writes into its own folder
    and rank 0's adapter is the one kept.
    """
    import torch

    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if os.environ.get("WORLD_SIZE", "1") != "1":
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        else:
            os.environ["ACCELERATE_USE_CPU"] = "true"  # else the Trainer ignores the gloo group and trains alone
    torch.manual_seed(job["seed"])  # PEFT draws the LoRA A matrices before the trainer seeds anything
    return common.run_olive_workflow(job["workflows"][rank]) / "adapter"


def train_distributed(job: dict, job_file: Path) -> Path:
    """Train with one data-parallel process per workflow of ``job`` through PyTorch's own launcher (torchrun)."""
    job_file.write_text(json.dumps(job))
    processes = len(job["workflows"])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command += ["-m", "stages.finetune", "--train-job", str(job_file)]
    log.info("finetune: %s", " ".join(command))
    subprocess.run(command, check=True)
    return Path(job["workflows"][0]["output_dir"]) / "adapter"


@common.stage_command("finetune")
@click.option(
    "--data-files",
    type=click.Path(path_type=Path),
    default=data.DEFAULT_DATA,
    help='JSONL file, or a folder of them, of {"prompt": ..., "response": ...} rows or chat rows '
    '{"messages": [{"role": ..., "content": ...}, ...]} (CRLF and a missing final newline are fine).',
)
@click.option(
    "--text-template",
    help="How a prompt/response row becomes training text [default: the base model family's chat format; "
    "Phi-3's is the lab's]; chat rows use the model's own chat template.",
)
@click.option("--method", type=click.Choice(["lora", "qlora"]), default="lora", help="qlora needs a CUDA GPU.")
@click.option("--max-steps", default=100, type=click.IntRange(min=1), help="Optimizer steps.")
@click.option("--rank", default=64, type=click.IntRange(min=1), help="LoRA rank r.")
@click.option("--alpha", default=16.0, help="LoRA alpha (scale = alpha / rank).")
@click.option("--learning-rate", default=2e-4, help="AdamW learning rate (constant schedule, Olive's default).")
@click.option("--batch-size", default=4, type=click.IntRange(min=1), help="Sequences per step.")
@click.option(
    "--max-seq-len",
    default=512,
    type=click.IntRange(min=16),
    help="Tokens per training sequence: whole rows are packed into each; a longer row is cut to it.",
)
@click.option(
    "--train-on-inputs/--train-on-answers",
    default=False,
    help="The loss counts every token, prompt included, or only the answers (the response; each assistant turn).",
)
@click.option(
    "--target-modules",
    default="",
    help="Comma-separated module names to adapt [default: the family's attention projections: qkv_proj,o_proj for "
    "Phi-3, q_proj,k_proj,v_proj,o_proj for the others].",
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
@common.dry_run_option()
def command(
    root: Path,
    force: bool,
    data_files: Path,
    text_template: str | None,
    method: str,
    max_steps: int,
    rank: int,
    alpha: float,
    learning_rate: float,
    batch_size: int,
    max_seq_len: int,
    train_on_inputs: bool,
    target_modules: str,
    heldout_fraction: float,
    seed: int,
    evaluate: bool,
    processes: str,
    train_job: Path | None,
    torch_dtype: str,
    dry_run: bool,
) -> None:
    """Train a LoRA adapter on the quantized model from JSONL prompt/response or chat rows, on the answers.

    \b
    Examples:
      olivepress finetune --max-steps 100
      olivepress finetune --data-files my.jsonl --rank 16 --learning-rate 1e-4
      olivepress finetune --dry-run      # the Olive workflow it would run, as JSON
    """
    if train_job:  # one torchrun worker of train_distributed: train only, the parent publishes
        train(json.loads(train_job.read_text()))
        return
    processes = resolve_processes(processes)
    quantized = volume.output(root, "quantize", "dequantized")
    # The base model's family gives the defaults. Before quantize has run there is no base yet (upstream says so
    # below); every family's template names the same row fields, so the default family's checks the rows as well.
    family = (
        families.of_model_folder(quantized)
        if (quantized / "config.json").is_file()
        else families.BY_NAME[families.DEFAULT]
    )
    text_template = data.unescape(text_template or family.text_template)
    dataset = data.load_dataset(data_files, text_template)  # every row checked before any compute
    train_idx, heldout_idx = data.split(dataset, heldout_fraction, seed)
    device = common.local_device()
    if method == "qlora" and device != "gpu":
        raise BadInput("--method qlora needs a CUDA GPU (bitsandbytes); on a CPU use --method lora")
    base = volume.upstream(root, "finetune", "quantize", "dequantized")
    dtype = common.resolve_dtype(torch_dtype, device)
    parameters = {
        "method": method,
        "text_template": text_template,
        "max_steps": max_steps,
        "rank": rank,
        "alpha": alpha,
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "max_seq_len": max_seq_len,
        "train_on_inputs": train_on_inputs,
        "target_modules": [m for m in target_modules.split(",") if m] or list(family.lora_targets),
        "attention": training_attention(family, device),
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

    if dry_run:
        paths = Paths(base, volume.scratch_placeholder(root, "finetune-"), device)
        job = training_job(parameters, paths)
        details = {"job_file": {"path": str(paths.job_file), "content": job}} if processes > 1 else {}
        common.print_dry_run("finetune", root, parameters, paths, job["workflows"][0], **details)
        return

    def work(out: Path) -> dict:
        packed = training_data(dataset.subset(train_idx), data.hf_tokenizer(base), max_seq_len, train_on_inputs)
        with volume.scratch(root, "finetune-") as tmp:
            paths = Paths(base, tmp, device)
            write_rows(packed.sequences, paths.train_file)
            job = training_job(parameters, paths)
            adapter_dir = train(job) if processes == 1 else train_distributed(job, paths.job_file)
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
        extra: dict = {
            "split": split_record,
            "world_size": processes,
            "training_data": {
                "format": dataset.format,
                "sequences": len(packed.sequences),
                "tokens": packed.tokens,
                "trained_tokens": packed.trained_tokens,
                "truncated_rows": packed.truncated,
                "dropped_rows": packed.dropped,
            },
        }
        if evaluate and heldout:
            extra["metrics"] = {
                "finetuned": evaluate_.torch_loss(base, heldout, text_template, out / OUTPUTS["adapter"])
            }
        return extra

    inputs = {"base": base, "data_files": data_files}
    volume.run_stage("finetune", root, inputs, parameters, work, force=force, packages=common.TORCH_STACK)


if __name__ == "__main__":
    common.entrypoint(
        command, warm_imports=("olive.workflows", "olive.passes.pytorch.lora", "peft", "transformers.trainer")
    )
