"""The ``olivepress`` launcher: one verb per stage (the same commands the containers run), plus host-side verbs."""

from __future__ import annotations

import click

from olivepress import adapters, images, report, run, status, verify
from olivepress.azureml import commands as azureml
from runtime import chat, serve
from stages import finetune, infer, optimize, quantize, tiny_model


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="olivepress")
def main() -> None:
    """Turn an open LLM into a small, fast, fine-tuned int4 ONNX model for a laptop CPU.

    \b
    The stages, in order (each reads the one before it from the volume):
      quantize   4-bit AWQ / GPTQ / RTN through Olive
      finetune   LoRA on the quantized weights
      optimize   int4 ONNX for onnxruntime-genai, the adapter kept separate
      infer      generate with the adapter on and off
    `olivepress run` does all four; `olivepress status` shows the volume.
    Every option also reads an environment variable: OLIVEPRESS_HOME, and
    OLIVEPRESS_<STAGE>_<OPTION> for stage options (see each --help).
    """


for verb, command in {
    "run": run.command,
    "status": status.command,
    "verify": verify.command,
    "report": report.command,
    "make-tiny-model": tiny_model.main,
    "quantize": quantize.command,
    "finetune": finetune.command,
    "optimize": optimize.command,
    "infer": images.with_image_option(infer.command),
    "serve": serve.command,
    "chat": chat.command,
    "build": images.build,
    "up": images.up,
    "azureml": azureml.azureml,
    "push": azureml.push,
    "pull": azureml.pull,
    "adapters": adapters.command,
}.items():
    main.add_command(command, verb)


if __name__ == "__main__":
    main()
