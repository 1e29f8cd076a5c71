"""quantize: 4-bit weight quantization of a Hugging Face causal LM through Olive.

Writes ``quantize/model`` (the quantized checkpoint, as Olive saved it) and
``quantize/dequantized`` (a plain float model holding exactly the values the
quantized kernels compute with).  LoRA trains on the dequantized model: PEFT
cannot attach to Olive's QuantLinear, and AWQ checkpoints need gptqmodel under
transformers 5 (see the README), so this is the one route that serves AWQ, GPTQ
and RTN alike.  Knowing how each format packs its weights stays in this module.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import click

from contract import families, lock, registry, volume
from contract.exits import BadInput
from stages import awq_speedups, common, data, tiny_model
from stages import evaluate as evaluate_

ALGORITHMS = {
    # name: (Olive pass, needs a CUDA GPU, uses calibration data)
    "awq": ("AutoAWQQuantizer", True, True),
    "gptq": ("Gptq", False, True),
    "rtn": ("Rtn", False, False),
}
OUTPUTS = registry.STAGES["quantize"].outputs


@dataclass(frozen=True)
class Paths:
    """What a quantize run's Olive workflow works on: the model, a scratch folder and the device."""

    model: str  # a local folder or a hub id
    workdir: Path  # scratch: the calibration data, Olive's cache and its output model
    device: str  # "gpu" or "cpu": where Olive quantizes

    @property
    def calibration(self) -> Path:
        """The local dataset folder the calibrating algorithms read (``write_calibration`` fills it)."""
        return self.workdir / "calibration"


def model_source(model: str, root: Path) -> str:
    """``tiny`` (or ``tiny:NAME``) is an embedded tiny model, in its folder on the volume; a folder is used as is;
    else a hub id."""
    architecture = tiny_model.architecture_of(model)
    if architecture:
        return str(volume.tiny_model_dir(root, architecture))
    return str(Path(model).resolve()) if Path(model).exists() else model


def tiny_model_to_build(model: str, root: Path) -> tuple[Path, str] | None:
    """The folder an embedded tiny model is built in on first use, and its family, while it is not built yet."""
    architecture = tiny_model.architecture_of(model)
    if not architecture:
        return None
    folder = volume.tiny_model_dir(root, architecture)
    return None if (folder / "config.json").is_file() else (folder, architecture)


def default_algorithm(device: str) -> str:
    """The quantizer a run gets by default: AWQ on a GPU (the best after LoRA on a pretrained model, and as int4
    ONNX; benchmarks/results/quality_real.md), GPTQ where AWQ cannot run (a CPU, or no AutoAWQ installed)."""
    if device == "gpu" and importlib.util.find_spec("awq") is not None:
        return "awq"
    return "gptq"


def model_config(model: str, trust_remote_code: bool) -> dict:
    """The model's config (of a hub id, config.json alone is fetched): the check, before any weights are fetched or
    loaded, that the model loads."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0]
        hint = (
            "it needs --trust-remote-code (runs the repository's code: review it first)"
            if "trust_remote_code" in str(err)
            else "pass a local folder with --model, check the hub id, the network and HF_TOKEN for gated models, "
            "or use --model tiny"
        )
        raise BadInput(f"cannot load model {model!r}: {reason} -- {hint}") from None
    return config.to_dict()


def model_dtype(config: dict) -> str:
    """The model's own dtype, as its config names it."""
    return str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")


def write_calibration(texts: list[str], folder: Path) -> Path:
    """The calibration texts as a local JSONL dataset folder: Olive and AutoAWQ read it instead of a hub set."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "calibration.jsonl").open("w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return folder


def olive_workflow(parameters: dict, paths: Paths) -> dict:
    """The Olive workflow of a quantize run: one pass (AutoAWQQuantizer, Gptq or Rtn), calibrated on the local
    dataset in ``paths.calibration`` where the algorithm calibrates. ``parameters`` are the stage's."""
    algorithm = parameters["algorithm"]
    pass_type, _, calibrates = ALGORITHMS[algorithm]
    config: dict = {"type": pass_type, "bits": parameters["bits"]}
    data_configs = []
    if algorithm == "awq":
        config["q_group_size"] = parameters["group_size"]
    else:
        config["group_size"] = parameters["group_size"]
    if calibrates:
        config["data_config"] = "calibration_data"
        data_configs.append(
            {
                "name": "calibration_data",
                "type": "HuggingfaceContainer",
                # AutoAWQ calls datasets.load_dataset(data_name, split=...) itself: a local folder works for both.
                "load_dataset_config": {"data_name": str(paths.calibration), "split": "train"},
                "pre_process_data_config": {
                    "input_cols": "text",  # one column name, not a list: AutoAWQ indexes each row with it
                    "max_seq_len": parameters["max_seq_len"],
                    # One sample per row, cut at max_seq_len: Olive's default joins the rows into max_seq_len
                    # blocks and drops the rest, which leaves nothing of a small file.
                    "strategy": "line-by-line",
                    "pad_to_max_len": False,
                },
                "dataloader_config": {"batch_size": 1},
            }
        )
    load_kwargs = {"attn_implementation": "eager", "trust_remote_code": parameters["trust_remote_code"]}
    return common.olive_workflow(
        {"model_path": paths.model, "load_kwargs": load_kwargs},
        {"quantize": config},
        paths.workdir,
        paths.device,
        data_configs,
    )


def dequantize(quantized: Path, out: Path, dtype: str) -> None:
    """Write the float model that the quantized weights stand for, in Hugging Face layout."""
    method = json.loads((quantized / "config.json").read_text()).get("quantization_config", {}).get("quant_method")
    if method == "olive":
        _dequantize_olive(quantized, out, dtype)
    elif method == "awq":
        _dequantize_awq(quantized, out, dtype)
    else:
        raise BadInput(f"{quantized} has quant_method {method!r}; olivepress reads 'olive' and 'awq'")
    common.copy_tokenizer(quantized, out)


def _dequantize_olive(quantized: Path, out: Path, dtype: str) -> None:
    import torch
    from olive.common.hf.utils import load_model_from_task
    from olive.common.quant.nn import QuantEmbedding, QuantLinear

    model = load_model_from_task("text-generation", str(quantized), dtype=getattr(torch, dtype))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantLinear):
                plain = torch.nn.Linear(child.cols, child.rows, bias=child.bias is not None)
            elif isinstance(child, QuantEmbedding):
                plain = torch.nn.Embedding(child.rows, child.cols)
            else:
                continue
            plain.weight.data = child.unpack_and_dequantize(child.qweight, child.scales, child.qzeros).to(
                getattr(torch, dtype)
            )
            if getattr(child, "bias", None) is not None:
                plain.bias.data = child.bias.data.clone()
            setattr(parent, name, plain)
    # Now a plain model: drop what marks it quantized, so transformers saves and reloads it as float.
    model.config.quantization_config = None
    del model.config.quantization_config
    for attribute in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attribute):
            delattr(model, attribute)
    model.is_quantized = False
    model.save_pretrained(out)


def _dequantize_awq(quantized: Path, out: Path, dtype: str) -> None:
    """Unpack AutoAWQ's GEMM tensors straight into a safetensors file: no model is built (3.8B random inits
    would cost a minute), and the arithmetic is AutoAWQ's own, on the GPU when there is one."""
    import torch
    from awq.utils.packing_utils import dequantize_gemm
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(quantized)
    qcfg = config.quantization_config
    qcfg = qcfg if isinstance(qcfg, dict) else qcfg.to_dict()
    if str(qcfg.get("version", "gemm")).lower() != "gemm":
        raise BadInput(f"AWQ version {qcfg.get('version')!r} is not read; quantize with version gemm")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    state: dict = {}
    for file in sorted(quantized.glob("*.safetensors")):
        state.update(load_file(file))
    for key in [k for k in state if k.endswith(".qweight")]:
        prefix = key.removesuffix(".qweight")
        packed = [state.pop(f"{prefix}.{part}").to(device) for part in ("qweight", "qzeros", "scales")]
        weight = dequantize_gemm(*packed, qcfg["bits"], qcfg["group_size"]).to(getattr(torch, dtype))
        state[f"{prefix}.weight"] = weight.T.contiguous().cpu()  # AWQ packs (in, out); nn.Linear holds (out, in)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.to(getattr(torch, dtype)).contiguous() for k, v in state.items()},  # a no-op for the weights above
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    del config.quantization_config
    config.dtype = getattr(torch, dtype)  # AutoAWQ saved its fp16 working dtype; the weights are now `dtype`
    config.save_pretrained(out)
    if (quantized / "generation_config.json").is_file():
        shutil.copy2(quantized / "generation_config.json", out / "generation_config.json")


@common.stage_command("quantize")
@click.option(
    "--model",
    default=tiny_model.TINY,
    help="Hugging Face hub id or local folder; 'tiny' is the embedded random-weight Phi-3, 'tiny:NAME' that of "
    f"another family ({', '.join(families.NAMES)}); built on first use.",
)
@click.option(
    "--algorithm",
    type=click.Choice(["auto", *sorted(ALGORITHMS)]),
    default="auto",
    help="auto: awq on a CUDA GPU (where AutoAWQ is installed), gptq on a CPU: what held-out quality on a "
    "pretrained model chose (README). awq is the lab's (needs a CUDA GPU); gptq and rtn also run on a CPU.",
)
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", help="Weight bits.")
@click.option("--group-size", default=128, help="Weights sharing one scale and zero point.")
@click.option(
    "--calibration-data",
    type=click.Path(path_type=Path),
    default=data.DEFAULT_DATA,
    help="JSONL file (or folder of them) of prompt/response or chat rows that awq and gptq calibrate on "
    "(never a hub dataset).",
)
@click.option(
    "--text-template",
    help="How a prompt/response row becomes calibration text [default: the model family's chat format]; chat rows "
    "use the model's own chat template.",
)
@click.option("--calibration-samples", default=128, help="Rows used for calibration.")
@click.option("--max-seq-len", default=512, help="Tokens per calibration sample.")
@click.option("--trust-remote-code", is_flag=True, help="Run the model repository's own Python code (off: unsafe).")
@click.option("--heldout-fraction", default=0.1, help="Share of rows kept out of calibration, to score the models on.")
@click.option("--seed", default=0, help="Seed of the train / held-out split (finetune's --seed must match).")
@click.option("--evaluate/--no-evaluate", default=True, help="Score the base and quantized models on held-out rows.")
@common.dry_run_option()
def command(
    root: Path,
    force: bool,
    model: str,
    algorithm: str,
    bits: str,
    group_size: int,
    calibration_data: Path,
    text_template: str | None,
    calibration_samples: int,
    max_seq_len: int,
    trust_remote_code: bool,
    heldout_fraction: float,
    seed: int,
    evaluate: bool,
    dry_run: bool,
) -> None:
    """Quantize a causal LM to 4-bit weights with Olive (AWQ, GPTQ or RTN).

    \b
    Examples:
      olivepress quantize                         # the tiny default: GPTQ on a CPU, AWQ on a GPU
      olivepress quantize --model microsoft/Phi-3.5-mini-instruct --algorithm awq
      olivepress quantize --dry-run               # the Olive workflow it would run, as JSON
    """
    device = common.local_device()
    algorithm = default_algorithm(device) if algorithm == "auto" else algorithm
    _, needs_gpu, calibrates = ALGORITHMS[algorithm]
    if group_size == 0 or group_size < -1:
        raise BadInput(
            f"--group-size must be a positive number of weights, or -1 for one group per row; got {group_size}"
        )
    if group_size == -1 and algorithm == "awq":
        raise BadInput("--algorithm awq packs groups only (AutoAWQ 0.2.9): use --group-size 128, or gptq / rtn per row")
    if needs_gpu and device != "gpu":
        cpu_ones = ", ".join(a for a, (_, gpu, _) in sorted(ALGORITHMS.items()) if not gpu)
        raise BadInput(
            f"--algorithm {algorithm} needs a CUDA GPU and none is visible; on a CPU use --algorithm one of {cpu_ones}"
        )
    tiny_architecture = tiny_model.architecture_of(model)
    tiny_folder = tiny_model_to_build(model, root)
    model = model_source(model, root)
    # The family decides the defaults, and whether the model goes through at all: from its config, before any data,
    # weights or compute.
    config = None if tiny_architecture else model_config(model, trust_remote_code)
    family = families.BY_NAME[tiny_architecture] if tiny_architecture else families.of_config(config, model)
    families.refuse(family, algorithm)
    text_template = data.unescape(text_template or family.text_template)
    dataset = data.load_dataset(calibration_data, text_template) if calibrates or evaluate else None
    if dataset:
        train_idx, heldout_idx = data.split(dataset, heldout_fraction, seed)
    parameters = {
        "algorithm": algorithm,
        "bits": int(bits),
        "group_size": group_size,
        "text_template": text_template if calibrates else None,
        "calibration_samples": calibration_samples if calibrates else None,
        "max_seq_len": max_seq_len if calibrates else None,
        "trust_remote_code": trust_remote_code,
        "heldout_fraction": heldout_fraction if dataset else None,
        "seed": seed if dataset else None,
        "evaluate": evaluate,
    }
    inputs: dict = {"model": model}
    if dataset:
        inputs["calibration_data"] = calibration_data

    if dry_run:
        paths = Paths(model, volume.scratch_placeholder(root, "quantize-"), device)
        details = {"family": family.name}
        if tiny_folder:
            details["builds_tiny_model_in"] = str(tiny_folder[0])
        common.print_dry_run("quantize", root, parameters, paths, olive_workflow(parameters, paths), **details)
        return
    if tiny_folder:
        folder, architecture = tiny_folder
        with lock.writer(root):
            tiny_model.build(
                folder, data.DEFAULT_DATA, vocab_size=2048, seed=0, config_file=None, architecture=architecture
            )
    dtype = model_dtype(config or model_config(model, trust_remote_code))
    # Each row's whole text, as training and inference see it: chat rows through the model's own chat template,
    # which this checks before any compute.
    chat_template = data.hf_tokenizer(model).chat_template if dataset and dataset.format == data.CHAT else None
    texts = dataset.texts(chat_template) if dataset else []

    def work(out: Path) -> dict:
        with volume.scratch(root, "quantize-") as tmp:
            paths = Paths(model, tmp, device)
            if calibrates:  # on the train rows only: the held-out rows must stay unseen
                write_calibration([texts[i] for i in train_idx[:calibration_samples]], paths.calibration)
            if algorithm == "awq":
                awq_speedups.apply()  # same weights, minutes sooner (stages/awq_speedups.py)
            output = common.run_olive_workflow(olive_workflow(parameters, paths))
            shutil.move(str(output / "model"), out / OUTPUTS["model"])
        dequantize(out / OUTPUTS["model"], out / OUTPUTS["dequantized"], dtype)
        extra = {"base_model": model if not Path(model).exists() else Path(model).name, "dtype": dtype}
        if evaluate:
            rows = [dataset.rows[i] for i in heldout_idx]
            extra["split"] = {
                "seed": seed,
                "heldout_fraction": heldout_fraction,
                "heldout_rows": len(rows),
                "heldout_sha256": data.rows_sha256(dataset, heldout_idx),
            }
            extra["metrics"] = {
                "base": evaluate_.torch_loss(Path(model) if Path(model).exists() else model, rows, text_template),
                "quantized": evaluate_.torch_loss(out / OUTPUTS["dequantized"], rows, text_template),
            }
        return extra

    volume.run_stage("quantize", root, inputs, parameters, work, force=force, packages=(*common.TORCH_STACK, "autoawq"))


if __name__ == "__main__":
    common.entrypoint(
        command, warm_imports=("olive.workflows", "olive.passes.pytorch.gptq", "olive.passes.pytorch.autoawq")
    )
