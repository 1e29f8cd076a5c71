"""The stages as an Azure ML pipeline job: the job spec (a pure function of contract.registry), submitting it, and
following its steps.

One ``command`` step per stage, each in the stage's own image (``<registry>/olivepress/<image>:<tag>``, pushed with
``olivepress build --push REGISTRY``), running the same entrypoint compose runs (``python -m stages.<stage>``).

The volume contract on Azure ML. A stage expects one root with its predecessors' folders side by side
(``quantize/``, ``finetune/`` ...). Each step therefore:

1. makes a fresh root on the node's local disk (``$PWD/volume``: the HF/Olive caches and the ``.<stage>.partial``
   folder with its final rename stay off the mounted storage, where renames of large folders are copies),
2. links each stage it needs (contract.registry) into it from its ``uri_folder`` input (read-only mount), named as
   the folder,
3. runs the stage with ``--home`` on that root,
4. copies the stage's published folder into its ``uri_folder`` output, uploaded when the step ends.

Inputs and outputs are named after the volume folder they hold, and every output lands at
``azureml://datastores/<datastore>/paths/olivepress/<job name>/<stage>/``: on the datastore each job leaves one volume
root with every stage's folder side by side, as ``olivepress run`` does on a laptop. The job name is chosen here, not
by the service, because the server-side ``${{name}}`` of an output path is the *step's* job name. A stage reruns from
scratch in its step (the local root is empty), so "skip when unchanged" is Azure ML's own step reuse (same component,
inputs and settings) rather than the manifest check.

The model is registered by the pipeline itself: the optimize step's output is a ``custom_model`` with a name, which
Azure ML registers when the step succeeds. Its folder has push's layout (the stage's files, ``manifest.json`` and the
manifests of the stages it needs under ``lineage/``), so ``olivepress pull NAME:VERSION`` verifies and restores it.

Settings are the ``OLIVEPRESS_<STAGE>_<OPTION>`` variables compose reads from ``.env``: each step gets its stage's
variables as environment variables, except the stage's ``path_options`` naming local files and folders (data, a
local base model), which become step inputs the SDK uploads at submission.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from contract import registry, volume
from contract.registry import Stage
from olivepress.azureml import assets, models, workspace

if TYPE_CHECKING:
    from azure.ai.ml import MLClient
    from azure.ai.ml.entities import PipelineJob

DEFAULT_DATASTORE = "workspaceblobstore"
EXPERIMENT = "olivepress"
# Every stage up to the one whose output is registered runs on Azure ML; the stages after it are optional.
REQUIRED = registry.NAMES[: registry.NAMES.index(assets.MODEL_STAGE) + 1]
# The stage that trains: with more than one GPU it starts its own workers (--processes N).
TRAINING_STAGE = "finetune"
SETTING_RE = re.compile(rf"^OLIVEPRESS_({'|'.join(name.upper() for name in registry.NAMES)})_[A-Z0-9_]+$")
# Settings that name a file or folder -> (step input name, its type). A local path (or an azureml:// / https:// URI)
# becomes a step input, mounted read-only, instead of an environment variable that would point at nothing on the node.
PATH_SETTINGS: dict[str, tuple[str, str]] = {
    stage.setting(option): (option, kind) for stage in registry.PIPELINE for option, kind in stage.path_options.items()
}
JOB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,254}$")
TERMINAL = {"Completed", "Failed", "Canceled", "NotResponding", "Paused"}
FAILED = {"Failed", "Canceled", "NotResponding"}


# --- the job spec (pure: no credentials, no service) ---------------------------------------------------------------


def new_job_name() -> str:
    """A unique pipeline job name that sorts by time: olivepress-20260101-120000-1a2b3c."""
    return f"olivepress-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def stage_images(image_registry: str, tag: str = "latest") -> dict[str, str]:
    """``<registry>/olivepress/<image>:<tag>`` for every stage, as ``olivepress build --push REGISTRY`` names them."""
    image_registry = image_registry.rstrip("/")
    return {stage.name: f"{image_registry}/olivepress/{stage.image}:{tag}" for stage in registry.PIPELINE}


def _is_uri(value: str) -> bool:
    return value.startswith(("azureml:", "https://", "wasbs://", "abfss://"))


def local_inputs(settings: Mapping[str, str]) -> list[str]:
    """The local files and folders among the settings: the SDK uploads them when it submits the job."""
    return sorted({value for key, value in settings.items() if key in PATH_SETTINGS and Path(value).exists()})


def _split_settings(stage: Stage, settings: Mapping[str, str]) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """A stage's settings as (environment variables, {input name: (type, path)})."""
    prefix = stage.setting("")
    env: dict[str, str] = {}
    paths: dict[str, tuple[str, str]] = {}
    for key, value in settings.items():
        if not key.startswith(prefix):
            continue
        value = str(value)
        if key in PATH_SETTINGS and (_is_uri(value) or Path(value).exists()):
            name, kind = PATH_SETTINGS[key]
            if not _is_uri(value):
                kind = "uri_folder" if Path(value).is_dir() else "uri_file"
                value = str(Path(value).resolve())
            paths[name] = (kind, value)
        else:
            env[key] = value
    return env, paths


def step_command(stage: Stage, args: list[str]) -> str:
    """The shell the step runs: the volume root on local disk, the stage, its folder copied to the output."""
    run = ["python", "-m", stage.module, '--home "$root"', *args]
    lines = ["set -eu", 'root="$PWD/volume"', 'mkdir -p "$root"']
    lines += [f'ln -sfn "${{{{inputs.{need}}}}}" "$root/{need}"' for need in stage.needs]
    # The stage's own log of a failed attempt lives in the root, not in any output: show it in the step's log.
    lines.append(f'{" ".join(run)} || {{ code=$?; cat "$root/{stage.name}.failed.log" >&2 || true; exit $code; }}')
    out = f'"${{{{outputs.{stage.name}}}}}"'
    lines.append(f'cp -r "$root/{stage.name}/." {out}/')
    if stage.name == assets.MODEL_STAGE:
        # push's layout, so the registered model is what `olivepress pull` expects: the upstream manifests travel.
        lines.append(f"mkdir -p {out}/{assets.LINEAGE}")
        lines += [f'cp "$root/{need}/{volume.MANIFEST}" {out}/{assets.LINEAGE}/{need}.json' for need in stage.needs]
    return "\n".join(lines)


def _folder_type(stage: str) -> str:
    """The Azure ML type of a stage's folder: the model stage's is a model, registered when its step succeeds."""
    return "custom_model" if stage == assets.MODEL_STAGE else "uri_folder"


def build_pipeline_job(
    images: Mapping[str, str],
    compute: str,
    settings: Mapping[str, str],
    gpus: int = 1,
    *,
    model_name: str = models.DEFAULT_NAME,
    model_version: str | None = None,
    datastore: str = DEFAULT_DATASTORE,
    experiment: str = EXPERIMENT,
    job_name: str | None = None,
) -> PipelineJob:
    """The pipeline job for ``images`` (stage -> image; every stage up to optimize, and infer if given).

    ``settings``: ``OLIVEPRESS_<STAGE>_<OPTION>`` -> value, as in compose's ``.env``. ``gpus``: GPUs per node of
    ``compute`` that finetune trains on. Pure: nothing is contacted and no credentials are needed.
    """
    from azure.ai.ml import Input, Output, command, dsl
    from azure.ai.ml.entities import Environment

    missing = [s for s in REQUIRED if s not in images]
    if missing:
        raise click.UsageError(
            f"no image for {', '.join(missing)}: every stage up to {assets.MODEL_STAGE} runs on Azure ML"
        )
    bad = [k for k in settings if not SETTING_RE.match(k)]
    if bad:
        raise click.UsageError(f"not a stage setting (OLIVEPRESS_<STAGE>_<OPTION>): {', '.join(sorted(bad))}")
    if not workspace.NAME_RE.match(model_name):
        raise click.BadParameter(f"{model_name!r} is not a model name", param_hint="--name")
    stages = [stage for stage in registry.PIPELINE if stage.name in images]
    job_name = job_name or new_job_name()
    if not JOB_NAME_RE.match(job_name):
        raise click.BadParameter(f"{job_name!r}: letters, digits, '-' and '_', at most 255", param_hint="--job-name")

    def output_path(stage: str) -> str:
        return f"azureml://datastores/{datastore}/paths/olivepress/{job_name}/{stage}/"

    builders: dict[str, Callable[..., Any]] = {}
    node_env: dict[str, dict[str, str]] = {}
    path_inputs: dict[str, dict[str, Input]] = {}
    for stage in stages:
        env, paths = _split_settings(stage, settings)
        args = [f'--{name.replace("_", "-")} "${{{{inputs.{name}}}}}"' for name in paths]
        extra: dict[str, Any] = {}
        if stage.name == TRAINING_STAGE and gpus > 1:
            # finetune starts torchrun itself for --processes N > 1, as it does locally and under compose, so the
            # step is one process on one node (no `distribution`): Azure ML's PyTorchDistribution would start N
            # copies of this command, each then starting N workers, and run the copy to the output N times.
            # The GPUs come with the node (the compute's VM size); the workers need more than the 2 GiB /dev/shm.
            args.append(f"--processes {gpus}")
            extra["shm_size"] = "16g"
        inputs: dict[str, Any] = {need: Input(type=_folder_type(need), mode="ro_mount") for need in stage.needs}
        inputs.update({name: Input(type=kind, mode="ro_mount") for name, (kind, _) in paths.items()})
        builders[stage.name] = command(
            name=f"olivepress_{stage.name}",
            display_name=stage.name,
            description=f"olivepress {stage.name} stage (python -m {stage.module}) on the volume contract",
            command=step_command(stage, args),
            environment=Environment(image=images[stage.name]),
            inputs=inputs,
            outputs={stage.name: Output(type=_folder_type(stage.name), mode="upload")},
            **extra,
        )
        node_env[stage.name] = env
        path_inputs[stage.name] = {name: Input(type=kind, path=path) for name, (kind, path) in paths.items()}

    @dsl.pipeline(name="olivepress", display_name="olivepress", description=" -> ".join(registry.NAMES))
    def olivepress_pipeline() -> dict[str, Any]:
        produced: dict[str, Any] = {}
        for stage in stages:
            step = builders[stage.name](**{need: produced[need] for need in stage.needs}, **path_inputs[stage.name])
            step.name = stage.name  # the node's name in the job, and its ${{parent.jobs.<name>}} references
            step.compute = compute
            step.environment_variables = node_env[stage.name]
            output = step.outputs[stage.name]
            output.path = output_path(stage.name)
            if stage.name == assets.MODEL_STAGE:
                # Registered as a model when the step succeeds, as `olivepress push` would (version: the next one).
                output.name = model_name
                if model_version:
                    output.version = model_version
            produced[stage.name] = output
        return {"model": produced[assets.MODEL_STAGE]}

    job = olivepress_pipeline()
    job.name = job_name
    job.experiment_name = experiment
    job.settings.default_compute = compute
    job.settings.continue_on_step_failure = False
    job.tags = {"olivepress.stages": ",".join(stage.name for stage in stages), "olivepress.gpus": str(gpus)}
    return job


def job_yaml(job: PipelineJob) -> str:
    """The job as the SDK serializes it (``az ml job create --file`` takes the same YAML)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        # The step commands are shell scripts: a literal block reads as the script it is.
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return yaml.dump(job._to_dict(), Dumper=Dumper, sort_keys=False, width=120)


# --- settings from the launcher's world --------------------------------------------------------------------------


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a compose ``.env`` (comments and blank lines skipped, simple quotes removed)."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key, value = key.strip().removeprefix("export ").strip(), value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def collect_settings(
    environ: Mapping[str, str], dotenv: Path | None, shortcuts: Mapping[str, str | int | None]
) -> dict[str, str]:
    """The stage settings: ``.env``, then the environment, then ``run``'s shortcut options (last wins)."""
    merged = {**(read_dotenv(dotenv) if dotenv else {}), **environ}
    settings = {k: v for k, v in merged.items() if SETTING_RE.match(k) and v != ""}
    for option, value in shortcuts.items():
        if value is not None:
            settings.update({variable: str(value) for variable in registry.run_shortcuts()[option]})
    return settings


# --- the service ---------------------------------------------------------------------------------------------------


def submit(client: MLClient, job: PipelineJob) -> Any:
    """Create the job (the SDK uploads local inputs and registers the anonymous components and environments)."""
    return client.jobs.create_or_update(job, experiment_name=job.experiment_name)


def step_states(client: MLClient, job_name: str) -> tuple[str, dict[str, str]]:
    """The pipeline's status and each step's (by display name; steps not started yet are absent)."""

    def text(status: Any) -> str:  # the pipeline's status is an enum, the steps' plain strings
        return str(getattr(status, "value", status) or "NotStarted")

    job = client.jobs.get(job_name)
    children = client.jobs.list(parent_job_name=job_name)
    return text(job.status), {(child.display_name or child.name): text(child.status) for child in children}


def follow(
    client: MLClient,
    job_name: str,
    *,
    poll_s: float = 15.0,
    once: bool = False,
    echo: Callable[[str], None] = click.echo,
) -> str:
    """Print each step's state as it changes until the pipeline ends (or once); return the pipeline's status."""
    seen: dict[str, str] = {}
    while True:
        status, steps = step_states(client, job_name)
        for stage in [*registry.NAMES, *sorted(set(steps) - set(registry.NAMES))]:
            state = steps.get(stage, "NotStarted")
            if seen.get(stage) != state:
                echo(f"{stage:<10}{state}")
                seen[stage] = state
        if seen.get("(pipeline)") != status:
            echo(f"{'pipeline':<10}{status}")
            seen["(pipeline)"] = status
        if once or status in TERMINAL:
            return status
        time.sleep(poll_s)
