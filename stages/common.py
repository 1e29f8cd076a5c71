"""What every stage entrypoint shares: the volume options, Olive's workflow runner, device checks."""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from contract import exits, lock, logs, volume

# Packages whose versions every torch-side stage records in its manifest.
_console = {"verbose": False}
TORCH_STACK = ("olive-ai", "torch", "transformers", "peft", "accelerate", "tokenizers", "onnx", "onnxruntime")


def stage_command(name: str, help_text: str | None = None) -> Callable[[Callable], click.Command]:
    """A click command with the options every stage takes: --home and --force.

    Every option also reads OLIVEPRESS_<STAGE>_<OPTION> (e.g. OLIVEPRESS_FINETUNE_MAX_STEPS).
    """

    def decorate(func: Callable) -> click.Command:
        @volume.home_option()
        @click.option("--force", is_flag=True, help="Run even if inputs and parameters match the last run.")
        @lock.wait_option
        @click.option("-v", "--verbose", is_flag=True, help="Show library logs on the console too.")
        @functools.wraps(func)
        def wrapper(root: Path | None, force: bool, verbose: bool, **kwargs: Any) -> None:
            root = volume.home(root)
            volume.use_volume_caches(root)
            _console["verbose"] = verbose
            # Everything at INFO reaches the stage's log.txt; the console shows warnings, and our own progress.
            logs.console_logging(verbose)
            with exits.reported(name, root / f"{name}.failed.log"):
                return func(root=root, force=force, **kwargs)

        return click.command(
            name,
            help=help_text or func.__doc__,
            context_settings={"auto_envvar_prefix": f"OLIVEPRESS_{name.upper()}", "show_default": True},
        )(wrapper)

    return decorate


def entrypoint(command: click.Command) -> None:
    """``python -m stages.<name>``: the container entrypoint, with the same env-var prefix as the launcher."""
    command(prog_name=f"python -m stages.{command.name}", auto_envvar_prefix=f"OLIVEPRESS_{command.name.upper()}")


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def resolve_dtype(choice: str) -> str:
    """``auto`` is bfloat16 on a GPU and float32 on a CPU, where bf16 training is slow or unsupported."""
    if choice != "auto":
        return choice
    return "bfloat16" if has_cuda() else "float32"


def run_olive(
    workdir: Path,
    input_model: dict[str, Any],
    passes: dict[str, Any],
    data_configs: list[dict[str, Any]] | None = None,
    target: str | None = None,
) -> Path:
    """Run one Olive workflow on this machine and return the folder of its output model.

    ``target`` is the device the output model is for (optimize: always "cpu"); by default this machine's GPU.
    Olive gets a fresh cache inside ``workdir``: our manifests decide what to skip, and a stale
    Olive cache must never stand in for a rerun the user forced.
    """
    from olive.workflows import run

    for handler in logging.getLogger("olive").handlers:  # Olive prints INFO to stdout; the stage log has it all
        if type(handler) is logging.StreamHandler:
            handler.setLevel(logging.INFO if _console["verbose"] else logging.WARNING)

    device = target or ("gpu" if has_cuda() else "cpu")
    provider = "CUDAExecutionProvider" if device == "gpu" else "CPUExecutionProvider"
    config = {
        "input_model": {"type": "HfModel", **input_model},
        "systems": {
            "local_system": {
                "type": "LocalSystem",
                "accelerators": [{"device": device, "execution_providers": [provider]}],
            }
        },
        "data_configs": data_configs or [],
        "passes": passes,
        "host": "local_system",
        "target": "local_system",
        "cache_config": {"cache_dir": str(workdir / "olive-cache")},
        "output_dir": str(workdir / "output"),
        "no_artifacts": True,
        "log_severity_level": 1,
    }
    output = run(config)
    if output is None or not output.has_output_model():
        raise click.ClickException(
            f"Olive produced no output model (passes: {', '.join(passes)}); see the stage log for its reason"
        )
    return workdir / "output"


def copy_tokenizer(source: Path, target: Path) -> None:
    for pattern in ("tokenizer*", "special_tokens_map.json", "chat_template.jinja", "*.model"):
        for file in source.glob(pattern):
            shutil.copy2(file, target / file.name)
