"""What every stage entrypoint shares: the volume options, the Olive workflow config and its runner, device checks,
--dry-run."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from contract import exits, lock, logs, registry, volume

_console = {"verbose": False}
# Packages whose versions every torch-side stage records in its manifest.
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


def entrypoint(command: click.Command, warm_imports: tuple[str, ...] = ()) -> None:
    """``python -m stages.<name>``: the container entrypoint, with the same env-var prefix as the launcher.

    Started ahead of its turn (``registry.WAIT_FOR_TURN``), the process first imports ``warm_imports`` (what the
    stage's work loads: torch, transformers, Olive) and waits for its turn.

    Once the command is done (its outputs published or its error reported) the process ends without the
    interpreter's teardown: unloading torch, transformers and Olive module by module takes 1-1.5 s per stage
    and writes nothing. Logs and the standard streams are flushed first.
    """
    if os.environ.pop(registry.WAIT_FOR_TURN, None):  # popped: the stage's own subprocesses start at once
        for module in warm_imports:
            with contextlib.suppress(ImportError):  # the stage reports a missing package when it needs it
                importlib.import_module(module)
        if sys.stdin.readline().strip() != registry.TURN:
            os._exit(exits.Exit.INTERRUPTED)  # the run stopped before this stage's turn
    try:
        command(prog_name=f"python -m stages.{command.name}", auto_envvar_prefix=f"OLIVEPRESS_{command.name.upper()}")
        code: object = 0
    except SystemExit as done:
        code = done.code
    if code is None:
        code = 0
    if not isinstance(code, int):  # a message for sys.exit to print
        raise SystemExit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def local_device() -> str:
    """The device Olive targets on this machine: ``gpu`` where a CUDA GPU is visible, else ``cpu``."""
    return "gpu" if has_cuda() else "cpu"


def resolve_dtype(choice: str, device: str) -> str:
    """``auto`` is bfloat16 on a GPU and float32 on a CPU, where bf16 training is slow or unsupported."""
    if choice != "auto":
        return choice
    return "bfloat16" if device == "gpu" else "float32"


EXECUTION_PROVIDERS = {"gpu": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def olive_workflow(
    input_model: dict[str, Any],
    passes: dict[str, Any],
    workdir: Path,
    device: str,
    data_configs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The Olive workflow config around a stage's passes: one local system for ``device`` (``gpu`` or ``cpu``,
    the device the output model is for), Olive's cache and output inside ``workdir``.

    Olive gets a fresh cache inside ``workdir``: our manifests decide what to skip, and a stale
    Olive cache must never stand in for a rerun the user forced.
    """
    return {
        "input_model": {"type": "HfModel", **input_model},
        "systems": {
            "local_system": {
                "type": "LocalSystem",
                "accelerators": [{"device": device, "execution_providers": [EXECUTION_PROVIDERS[device]]}],
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


# olive-ai 0.13.0 logs a telemetry heartbeat before it reads OLIVE_DISABLE_TELEMETRY, and at exit its exporter
# retries sending it for about 11 s wherever there is no network: every stage process paid that after its work.
OLIVE_PATCHED_VERSION = "0.13.0"  # the one version the patch below applies to


def skip_olive_heartbeat_when_disabled() -> bool:
    """With OLIVE_DISABLE_TELEMETRY=1 (the stages' default), Olive 0.13.0 sends nothing at all: not even the
    heartbeat it queues before reading that variable. Other versions are left as they are."""
    from importlib import metadata

    if os.environ.get("OLIVE_DISABLE_TELEMETRY") != "1" or metadata.version("olive-ai") != OLIVE_PATCHED_VERSION:
        return False
    from olive.telemetry.telemetry import Telemetry

    Telemetry._log_heartbeat = lambda self, metadata=None: None
    return True


def name_olive_input_models_by_path() -> bool:
    """Olive 0.13.0 names a local input model in its cache by reading every byte of it: 7.6 GB, 5-7 s, in every
    stage at Phi-3.5-mini size. Each stage gives Olive a cache of its own that ends with the run
    (``olive_workflow``), so a name unique in it is enough: the model's paths. The manifests already identify the
    inputs by content. Other versions are left as they are."""
    from importlib import metadata

    if metadata.version("olive-ai") != OLIVE_PATCHED_VERSION:
        return False
    from olive.common.utils import hash_string
    from olive.model.config.model_config import ModelConfig

    def identifier_from_paths(self: ModelConfig) -> str:
        keys = ("model_path", "adapter_path", "model_script", "script_dir")
        return hash_string(json.dumps({key: str(self.config.get(key)) for key in keys}))

    identifier_from_paths.olive_original = getattr(  # type: ignore[attr-defined]
        ModelConfig.get_model_identifier, "olive_original", ModelConfig.get_model_identifier
    )
    ModelConfig.get_model_identifier = identifier_from_paths
    return True


def run_olive_workflow(workflow: dict[str, Any]) -> Path:
    """Run an Olive workflow config on this machine and return the folder of its output model."""
    from olive.workflows import run

    skip_olive_heartbeat_when_disabled()
    name_olive_input_models_by_path()
    for handler in logging.getLogger("olive").handlers:  # Olive prints INFO to stdout; the stage log has it all
        if type(handler) is logging.StreamHandler:
            handler.setLevel(logging.INFO if _console["verbose"] else logging.WARNING)
    output = run(copy.deepcopy(workflow))  # Olive pops keys off the config it is given
    if output is None or not output.has_output_model():
        passes = ", ".join(workflow["passes"])
        raise click.ClickException(
            f"Olive produced no output model (passes: {passes}); see the stage log for its reason"
        )
    return Path(workflow["output_dir"])


def dry_run_option() -> Callable[[Callable], Callable]:
    """--dry-run: print the Olive workflow a stage would run, then stop before any work."""
    return click.option(
        "--dry-run",
        is_flag=True,
        help="Check the inputs, print the Olive workflow this run would run (JSON, with its paths) and the "
        "parameters, and exit: no model is loaded or built, nothing is trained or written.",
    )


def print_dry_run(
    stage: str, root: Path, parameters: dict[str, Any], paths: Any, workflow: dict[str, Any], **details: Any
) -> None:
    """A dry run's report, as JSON on stdout: the parameters, the paths (a stage's ``Paths``) and the Olive workflow
    a run would use, and whatever else it would do first (``details``)."""
    report = {
        "stage": stage,
        "publishes": str(volume.stage_dir(root, stage)),
        "parameters": parameters,
        "paths": dataclasses.asdict(paths),
        "olive_workflow": workflow,
        **details,
    }
    click.echo(json.dumps(report, indent=2, default=str))


def copy_tokenizer(source: Path, target: Path) -> None:
    for pattern in ("tokenizer*", "special_tokens_map.json", "chat_template.jinja", "*.model"):
        for file in source.glob(pattern):
            shutil.copy2(file, target / file.name)
