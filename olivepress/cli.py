"""The ``olivepress`` launcher: one verb per stage, plus the host-side verbs."""

from __future__ import annotations

import click

from stages import finetune, infer, optimize, quantize, tiny_model


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="olivepress")
def main() -> None:
    """Turn an open LLM into a small, fast, fine-tuned int4 ONNX model for a laptop CPU.

    \b
    The stages, in order (each reads the one before from the volume):
      quantize   4-bit AWQ / GPTQ / RTN through Olive
      finetune   LoRA on the quantized weights
      optimize   int4 ONNX for onnxruntime-genai, adapter kept separate
      infer      generate with the adapter on and off
    `olivepress run` does all four; `olivepress status` shows the volume.
    """


main.add_command(tiny_model.main, "make-tiny-model")
main.add_command(quantize.command, "quantize")
main.add_command(finetune.command, "finetune")
main.add_command(optimize.command, "optimize")
main.add_command(infer.command, "infer")
