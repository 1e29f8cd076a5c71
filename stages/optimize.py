"""optimize: int4 ONNX for onnxruntime-genai on CPU, the LoRA adapter kept as a separate ``.onnx_adapter``.

Olive's ModelBuilder pass (onnxruntime-genai's builder) exports the
dequantized base with the adapter's LoRA branches, then ExtractAdapters moves
the adapter weights out of the graph into inputs, so one base model serves
any adapter of the same shape (or none).  Writes ``optimize/model`` (the
onnxruntime-genai folder) and ``optimize/adapters/<name>.onnx_adapter``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from stages import common, volume

ADAPTER_SUFFIX = ".onnx_adapter"


@common.stage_command("optimize")
@click.option(
    "--precision",
    type=click.Choice(["int4", "fp32"]),
    default="int4",
    help="int4 (MatMulNBits) for the laptop; fp32 to check the export itself.",
)
@click.option("--adapter-name", default="travel", help="Name the adapter is loaded under at inference.")
@click.option(
    "--int4-block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default="32", help="int4 block size."
)
@click.option(
    "--int4-accuracy-level",
    type=click.IntRange(0, 4),
    default=4,
    help="MatMulNBits compute type: 4 = int8 activations (fastest on CPU), 0 = as the input.",
)
def command(
    root: Path, force: bool, precision: str, adapter_name: str, int4_block_size: str, int4_accuracy_level: int
) -> None:
    """Build the int4 ONNX model and the separate LoRA adapter file with Olive.

    \b
    Example:
      olivepress optimize --precision int4 --adapter-name travel
    """
    if not adapter_name.isidentifier():
        raise volume.StageError(f"--adapter-name {adapter_name!r} must be letters, digits and underscores")
    base = volume.require_stage(root, "quantize", "run `olivepress quantize` first") / "dequantized"
    adapter = volume.require_stage(root, "finetune", "run `olivepress finetune` first") / "adapter"
    parameters = {
        "precision": precision,
        "adapter_name": adapter_name,
        "int4_block_size": int(int4_block_size),
        "int4_accuracy_level": int4_accuracy_level,
    }

    def work(out: Path) -> dict:
        builder: dict = {"type": "ModelBuilder", "precision": precision}
        if precision == "int4":
            builder["int4_block_size"] = int(int4_block_size)
            builder["int4_accuracy_level"] = int4_accuracy_level
        passes = {"builder": builder, "extract_adapters": {"type": "ExtractAdapters"}}
        model = {"model_path": str(base), "adapter_path": str(adapter), "load_kwargs": {"attn_implementation": "eager"}}
        with common.scratch(root, "optimize-") as tmp:
            output = common.run_olive(tmp, model, passes)
            (out / "adapters").mkdir(parents=True)
            for weights in output.glob(f"*{ADAPTER_SUFFIX}"):
                shutil.move(str(weights), out / "adapters" / f"{adapter_name}{ADAPTER_SUFFIX}")
            # Olive's own bookkeeping (it names temp paths) is not part of the model.
            (output / "model_config.json").unlink(missing_ok=True)
            shutil.move(str(output), out / "model")
        if not (out / "adapters" / f"{adapter_name}{ADAPTER_SUFFIX}").is_file():
            raise click.ClickException("Olive wrote no adapter file; see the stage log")
        return {"adapters": [adapter_name]}

    inputs = {"base": base, "adapter": adapter}
    volume.run_stage("optimize", root, inputs, parameters, work, force=force, packages=common.TORCH_STACK)


if __name__ == "__main__":
    common.entrypoint(command)
