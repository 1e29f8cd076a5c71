"""The ``olivepress`` launcher: one verb per stage (the same commands the containers run), plus host-side verbs.

The stage verbs, their order and their one-line summaries come from contract/registry.py.
"""

from __future__ import annotations

import importlib

import click

from contract import exits, registry
from olivepress import adapters, report, run, status, verify
from olivepress.azureml import commands as azureml
from olivepress.docker import commands as docker
from runtime import chat, serve
from stages import tiny_model


def _help() -> str:
    stages = "\n".join(f"  {stage.name:<10} {stage.summary}" for stage in registry.PIPELINE)
    return (
        "Turn an open LLM into a small, fast, fine-tuned int4 ONNX model for a laptop CPU.\n\n"
        "\b\nThe stages, in order (each reads the ones before it from the volume):\n"
        f"{stages}\n\n"
        "`olivepress run` does them all; `olivepress status` shows the volume. `olivepress docker build|up|infer` "
        "builds the images and runs them (`olivepress build` and `olivepress up` are short for the first two); "
        "`olivepress azureml push|pull|run|status` talks to Azure ML (`olivepress push` and `olivepress pull` are "
        "short for the first two). Every option also reads an environment variable: OLIVEPRESS_HOME, and "
        "OLIVEPRESS_<STAGE>_<OPTION> for stage options (see each --help)."
    )


@click.group(help=_help(), epilog=exits.epilog(), context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="olivepress")
def main() -> None:
    pass


for verb, command in {
    "run": run.command,
    "status": status.command,
    "verify": verify.command,
    "report": report.command,
    "make-tiny-model": tiny_model.main,
    **{stage.name: importlib.import_module(stage.module).command for stage in registry.PIPELINE},
    "serve": serve.command,
    "chat": chat.command,
    "docker": docker.docker,
    "build": docker.build,
    "up": docker.up,
    "azureml": azureml.azureml,
    "push": azureml.push,
    "pull": azureml.pull,
    "adapters": adapters.command,
}.items():
    main.add_command(command, verb)


if __name__ == "__main__":
    main()
