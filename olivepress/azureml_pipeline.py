"""``olivepress run --on azureml`` / ``olivepress status --on azureml``: the stages as an Azure ML pipeline job.

One ``command`` step per stage, each in the stage's own image (``<registry>/olivepress/<stage>:<tag>``, pushed with
``olivepress build --push REGISTRY``), running the same entrypoint compose runs (``python -m stages.<stage>``).

The volume contract on Azure ML. A stage expects one root with its predecessors' folders side by side
(``quantize/``, ``finetune/`` ...). Each step therefore:

1. makes a fresh root on the node's local disk (``$PWD/volume``: the HF/Olive caches and the ``.<stage>.partial``
   folder with its final rename stay off the mounted storage, where renames of large folders are copies),
2. links each earlier stage's folder into it from its ``uri_folder`` input (read-only mount), named as the folder,
3. runs the stage with ``--home`` on that root,
4. copies the stage's published folder into its ``uri_folder`` output, uploaded when the step ends.

Inputs and outputs are named after the volume folder they hold, and every output lands at
``azureml://datastores/<datastore>/paths/olivepress/<job name>/<stage>/``: on the datastore each job leaves one volume
root with ``quantize/ finetune/ optimize/ infer/`` side by side, as ``olivepress run`` does on a laptop. The job name
is chosen here, not by the service, because the server-side ``${{name}}`` of an output path is the *step's* job name.
A stage reruns from scratch in its step (the local root is empty), so "skip when unchanged" is Azure ML's own step
reuse (same component, inputs and settings) rather than the manifest check.

The model is registered by the pipeline itself: the optimize step's output is a ``custom_model`` with a name, which
Azure ML registers when the step succeeds. Its folder has push's layout (the stage's files, ``manifest.json`` and the
quantize and finetune manifests under ``lineage/``), so ``olivepress pull NAME:VERSION`` verifies and restores it.

Settings are the ``OLIVEPRESS_<STAGE>_<OPTION>`` variables compose reads from ``.env``: each step gets its stage's
variables as environment variables, except local files and folders (data, a local base model), which become step
inputs the SDK uploads at submission.

The Azure SDK is imported inside the functions: ``olivepress --help`` needs none of it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from contract import logs, registry, volume
from olivepress import azureml
from olivepress.diverting import DivertingCommand

if TYPE_CHECKING:
    from azure.ai.ml import MLClient
    from azure.ai.ml.entities import PipelineJob

PIPELINE_STAGES = ("quantize", "finetune", "optimize", "infer")
# The volume folders each stage reads (stages/*.py: require_stage).
NEEDS = {"quantize": (), "finetune": ("quantize",), "optimize": ("quantize", "finetune"), "infer": ("optimize",)}
DEFAULT_DATASTORE = "workspaceblobstore"
EXPERIMENT = "olivepress"
# Settings that name a file or folder: a local path (or an azureml:// / https:// URI) becomes a step input,
# mounted read-only, instead of an environment variable that would point at nothing on the node.
PATH_SETTINGS = {
    "OLIVEPRESS_QUANTIZE_MODEL": ("model", "uri_folder"),
    "OLIVEPRESS_QUANTIZE_CALIBRATION_DATA": ("calibration_data", "uri_file"),
    "OLIVEPRESS_FINETUNE_DATA_FILES": ("data_files", "uri_file"),
}
SETTING_RE = re.compile(r"^OLIVEPRESS_(QUANTIZE|FINETUNE|OPTIMIZE|INFER)_[A-Z0-9_]+$")
JOB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,254}$")
TERMINAL = {"Completed", "Failed", "Canceled", "NotResponding", "Paused"}
FAILED = {"Failed", "Canceled", "NotResponding"}


# --- the job spec (pure: no credentials, no service) ---------------------------------------------------------------


def new_job_name() -> str:
    """A unique pipeline job name that sorts by time: olivepress-20260101-120000-1a2b3c."""
    return f"olivepress-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def stage_images(registry: str, tag: str = "latest") -> dict[str, str]:
    """``<registry>/olivepress/<stage>:<tag>`` for every stage, as ``olivepress build --push REGISTRY`` names them."""
    registry = registry.rstrip("/")
    return {stage: f"{registry}/olivepress/{stage}:{tag}" for stage in PIPELINE_STAGES}


def _is_uri(value: str) -> bool:
    return value.startswith(("azureml:", "https://", "wasbs://", "abfss://"))


def _split_settings(stage: str, settings: Mapping[str, str]) -> tuple[dict[str, str], dict[str, tuple[str, str, str]]]:
    """A stage's settings as (environment variables, {input name: (type, path, option)})."""
    prefix = f"OLIVEPRESS_{stage.upper()}_"
    env: dict[str, str] = {}
    paths: dict[str, tuple[str, str, str]] = {}
    for key, value in settings.items():
        if not key.startswith(prefix):
            continue
        value = str(value)
        if key in PATH_SETTINGS and (_is_uri(value) or Path(value).exists()):
            name, kind = PATH_SETTINGS[key]
            if not _is_uri(value):
                kind = "uri_folder" if Path(value).is_dir() else "uri_file"
                value = str(Path(value).resolve())
            option = "--" + key[len(prefix) :].lower().replace("_", "-")
            paths[name] = (kind, value, option)
        else:
            env[key] = value
    return env, paths


def step_command(stage: str, needs: tuple[str, ...], args: list[str], lineage: bool = False) -> str:
    """The shell the step runs: the volume root on local disk, the stage, its folder copied to the output."""
    run = ["python", "-m", f"stages.{stage}"] + (["infer"] if stage == "infer" else []) + ['--home "$root"', *args]
    lines = ["set -eu", 'root="$PWD/volume"', 'mkdir -p "$root"']
    lines += [f'ln -sfn "${{{{inputs.{need}}}}}" "$root/{need}"' for need in needs]
    # The stage's own log of a failed attempt lives in the root, not in any output: show it in the step's log.
    lines.append(f'{" ".join(run)} || {{ code=$?; cat "$root/{stage}.failed.log" >&2 || true; exit $code; }}')
    out = f'"${{{{outputs.{stage}}}}}"'
    lines.append(f'cp -r "$root/{stage}/." {out}/')
    if lineage:
        # push's layout, so the registered model is what `olivepress pull` expects: the upstream manifests travel.
        lines.append(f"mkdir -p {out}/{azureml.LINEAGE}")
        lines += [f'cp "$root/{need}/{volume.MANIFEST}" {out}/{azureml.LINEAGE}/{need}.json' for need in needs]
    return "\n".join(lines)


def build_pipeline_job(
    images: Mapping[str, str],
    compute: str,
    settings: Mapping[str, str],
    gpus: int = 1,
    *,
    model_name: str = azureml.DEFAULT_NAME,
    model_version: str | None = None,
    datastore: str = DEFAULT_DATASTORE,
    experiment: str = EXPERIMENT,
    job_name: str | None = None,
) -> PipelineJob:
    """The pipeline job for ``images`` (stage -> image; quantize, finetune and optimize, and infer if given).

    ``settings``: ``OLIVEPRESS_<STAGE>_<OPTION>`` -> value, as in compose's ``.env``. ``gpus``: GPUs per node of
    ``compute`` that finetune trains on. Pure: nothing is contacted and no credentials are needed.
    """
    from azure.ai.ml import Input, Output, command, dsl
    from azure.ai.ml.entities import Environment

    missing = [s for s in ("quantize", "finetune", "optimize") if s not in images]
    if missing:
        raise click.UsageError(f"no image for {', '.join(missing)}: every stage up to optimize runs on Azure ML")
    bad = [k for k in settings if not SETTING_RE.match(k)]
    if bad:
        raise click.UsageError(f"not a stage setting (OLIVEPRESS_<STAGE>_<OPTION>): {', '.join(sorted(bad))}")
    if not azureml.NAME_RE.match(model_name):
        raise click.BadParameter(f"{model_name!r} is not a model name", param_hint="--name")
    stages = [s for s in PIPELINE_STAGES if s in images]
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
        args = [f'{option} "${{{{inputs.{name}}}}}"' for name, (_, _, option) in paths.items()]
        extra: dict[str, Any] = {}
        if stage == "finetune" and gpus > 1:
            # finetune starts torchrun itself for --processes N > 1, as it does locally and under compose, so the
            # step is one process on one node (no `distribution`): Azure ML's PyTorchDistribution would start N
            # copies of this command, each then starting N workers, and run the copy to the output N times.
            # The GPUs come with the node (the compute's VM size); the workers need more than the 2 GiB /dev/shm.
            args.append(f"--processes {gpus}")
            extra["shm_size"] = "16g"
        inputs: dict[str, Any] = {need: Input(type="uri_folder", mode="ro_mount") for need in NEEDS[stage]}
        if stage == "infer":
            inputs["optimize"] = Input(type="custom_model", mode="ro_mount")
        inputs.update({name: Input(type=kind, mode="ro_mount") for name, (kind, _, _) in paths.items()})
        out_type = "custom_model" if stage == "optimize" else "uri_folder"
        builders[stage] = command(
            name=f"olivepress_{stage}",
            display_name=stage,
            description=f"olivepress {stage} stage (python -m stages.{stage}) on the volume contract",
            command=step_command(stage, NEEDS[stage], args, lineage=stage == "optimize"),
            environment=Environment(image=images[stage]),
            inputs=inputs,
            outputs={stage: Output(type=out_type, mode="upload")},
            **extra,
        )
        node_env[stage] = env
        path_inputs[stage] = {name: Input(type=kind, path=path) for name, (kind, path, _) in paths.items()}

    @dsl.pipeline(name="olivepress", display_name="olivepress", description="quantize -> finetune -> optimize -> infer")
    def olivepress_pipeline() -> dict[str, Any]:
        produced: dict[str, Any] = {}
        for stage in stages:
            step = builders[stage](**{need: produced[need] for need in NEEDS[stage]}, **path_inputs[stage])
            step.name = stage  # the node's name in the job, and its ${{parent.jobs.<name>}} references
            step.compute = compute
            step.environment_variables = node_env[stage]
            output = step.outputs[stage]
            output.path = output_path(stage)
            if stage == "optimize":
                # Registered as a model when the step succeeds, as `olivepress push` would (version: the next one).
                output.name = model_name
                if model_version:
                    output.version = model_version
            produced[stage] = output
        return {"model": produced["optimize"]}

    job = olivepress_pipeline()
    job.name = job_name
    job.experiment_name = experiment
    job.settings.default_compute = compute
    job.settings.continue_on_step_failure = False
    job.tags = {"olivepress.stages": ",".join(stages), "olivepress.gpus": str(gpus)}
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
        for stage in [*PIPELINE_STAGES, *sorted(set(steps) - set(PIPELINE_STAGES))]:
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


# --- the click commands (registered as `olivepress run --on azureml` / `status --on azureml` by the launcher) -------


def _validation_errors(error: BaseException) -> str | None:
    """The SDK's client-side validation result (a JSON text of {path, message} errors; the exception class depends
    on the entity) as one line per error, or None for any other error."""
    text = str(getattr(error, "message", None) or error).strip()
    try:
        errors = json.loads(text)["errors"] if text.startswith("{") else None
        return "\n".join(f"  {e['path']}: {str(e['message']).splitlines()[0]}" for e in errors) if errors else None
    except (ValueError, KeyError, TypeError):
        return None


def _client(
    subscription: str | None, resource_group: str | None, workspace: str | None, config: Path | None, verbose: bool
) -> tuple[azureml.Target, Any]:
    """The workspace (a pipeline job needs one: no --registry here) and a signed-in MLClient."""
    target = azureml.resolve_target(subscription, resource_group, workspace, None, config)
    return target, azureml.credential_and_client(target, verbose)  # exit 3 with the sign-in help if none


def _workspace_options(func: Callable) -> Callable:
    options = [
        click.option(
            "--subscription", envvar=azureml.SUBSCRIPTION_ENV, show_envvar=True, help="Azure subscription id."
        ),
        click.option(
            "--resource-group", envvar=azureml.GROUP_ENV, show_envvar=True, help="Workspace's resource group."
        ),
        click.option("--workspace", envvar=azureml.WORKSPACE_ENV, show_envvar=True, help="Azure ML workspace name."),
        click.option(
            "--config",
            type=click.Path(exists=True, path_type=Path),
            help="The workspace's config.json (default: found).",
        ),
        click.option("-v", "--verbose", is_flag=True, help="Show the Azure SDK's own messages and errors in full."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.command(
    "run-azureml",
    epilog=f"Exit codes: 0 submitted (or, with --wait, completed), 1 failed, 2 bad input, "
    f"{azureml.EXIT_NO_CREDENTIALS} no usable Azure credentials.",
)
@click.option(
    "--compute", required=True, envvar="OLIVEPRESS_AZUREML_COMPUTE", show_envvar=True, help="Compute cluster."
)
@click.option(
    "--image-registry",
    required=True,
    envvar="OLIVEPRESS_IMAGE_REGISTRY",
    show_envvar=True,
    help="Container registry holding REGISTRY/olivepress/<stage>:TAG (e.g. the workspace's myacr.azurecr.io, "
    "from `olivepress build --push`). Not push's --registry, which is an Azure ML registry.",
)
@click.option("--tag", envvar="OLIVEPRESS_TAG", default="latest", show_default=True, help="Tag of the images.")
@click.option("--gpus", default=1, type=click.IntRange(min=0), show_default=True, help="GPUs per node finetune uses.")
@click.option("--model", help="Base model: hub id, local folder (uploaded), or 'tiny'.")
@click.option("--algorithm", type=click.Choice(["awq", "gptq", "rtn"]), help="Quantizer.")
@click.option("--data-files", type=click.Path(exists=True, dir_okay=False), help="JSONL to calibrate and train on.")
@click.option("--max-steps", type=click.IntRange(min=1), help="LoRA steps.")
@click.option("--no-infer", is_flag=True, help="Stop after optimize (and the registration).")
@click.option("--name", "model_name", default=azureml.DEFAULT_NAME, show_default=True, help="Model name to register.")
@click.option("--env-file", type=click.Path(dir_okay=False, path_type=Path), default=Path(".env"), show_default=True)
@click.option("--datastore", default=DEFAULT_DATASTORE, show_default=True, help="Where the stage folders land.")
@click.option("--job-name", help="Name of the pipeline job [default: olivepress-<UTC time>-<random>].")
@click.option("--dry-run", is_flag=True, help="Print the job spec (YAML) and stop; needs no credentials.")
@click.option("--wait", is_flag=True, help="Follow the job until it ends (as `olivepress status --on azureml JOB`).")
@_workspace_options
def run_azureml(
    compute: str,
    image_registry: str,
    tag: str,
    gpus: int,
    model: str | None,
    algorithm: str | None,
    data_files: str | None,
    max_steps: int | None,
    no_infer: bool,
    model_name: str,
    env_file: Path,
    datastore: str,
    job_name: str | None,
    dry_run: bool,
    wait: bool,
    subscription: str | None,
    resource_group: str | None,
    workspace: str | None,
    config: Path | None,
    verbose: bool,
) -> None:
    """Run quantize, finetune, optimize (and infer) as an Azure ML pipeline job on COMPUTE; register the model.

    \b
    Examples:
      olivepress run --on azureml --compute gpu-cluster --image-registry myacr.azurecr.io --dry-run
      olivepress run --on azureml --compute gpu-cluster --image-registry myacr.azurecr.io --gpus 4 \\
          --model microsoft/Phi-3.5-mini-instruct --algorithm awq
    """
    settings = collect_settings(
        os.environ,
        env_file,
        {"model": model, "algorithm": algorithm, "data_files": data_files, "max_steps": max_steps},
    )
    if not verbose:  # the SDK's "This is an experimental class" notices, one per schema class it loads
        logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)
    images = stage_images(image_registry, tag)
    if no_infer:
        images.pop("infer")
    job = build_pipeline_job(
        images, compute, settings, gpus, model_name=model_name, datastore=datastore, job_name=job_name
    )
    if dry_run:
        local = sorted({v for k, v in settings.items() if k in PATH_SETTINGS and Path(v).exists()})
        if local:  # the SDK writes them as azureml:<path>; at submission it uploads them and sends datastore URIs
            click.echo(f"# local inputs, uploaded to the workspace's datastore on submission: {', '.join(local)}")
        click.echo(job_yaml(job), nl=False)
        click.echo("dry run: nothing was submitted", err=True)
        return
    logs.console_logging(verbose)
    target, client = _client(subscription, resource_group, workspace, config, verbose)
    try:
        with azureml.sdk_console(verbose):
            created = submit(client, job)
    except click.ClickException:
        raise
    except Exception as e:
        denied = azureml._denied(e, target)
        if denied:
            raise denied from None
        refused = _validation_errors(e)
        if refused:  # the SDK's own checks against the workspace (e.g. no such compute): bad input, exit 2
            raise click.UsageError(f"{target} refused the job, nothing was submitted:\n{refused}") from None
        detail = f"\n{e}" if verbose else " (--verbose shows the SDK's error)"
        raise azureml.TransferFailed(f"submitting to {target} failed: {azureml._short(e)}{detail}") from None
    click.echo(f"submitted {created.name} to {target}")
    if getattr(created, "studio_url", None):
        click.echo(f"  studio: {created.studio_url}")
    click.echo(f"  follow: olivepress status --on azureml {created.name}")
    if wait:
        status = follow(client, created.name)
        sys.exit(1 if status in FAILED else 0)


@click.command("status-azureml", epilog="Exit codes: 0 running or completed, 1 failed or canceled, 3 no credentials.")
@click.argument("job_name", metavar="JOB")
@click.option(
    "--follow/--once", "keep_following", default=True, show_default=True, help="Poll until the job ends, or print once."
)
@click.option("--interval", default=15.0, show_default=True, help="Seconds between polls.")
@_workspace_options
def status_azureml(
    job_name: str,
    keep_following: bool,
    interval: float,
    subscription: str | None,
    resource_group: str | None,
    workspace: str | None,
    config: Path | None,
    verbose: bool,
) -> None:
    """Each step's state of the pipeline job JOB (as `olivepress run --on azureml` printed it)."""
    logs.console_logging(verbose)
    target, client = _client(subscription, resource_group, workspace, config, verbose)
    try:
        status = follow(client, job_name, poll_s=interval, once=not keep_following)
    except Exception as e:
        from azure.core.exceptions import ResourceNotFoundError

        denied = azureml._denied(e, target)
        if denied:
            raise denied from None
        if isinstance(e, ResourceNotFoundError):
            raise click.UsageError(f"no job {job_name} in {target}") from None
        detail = f"\n{e}" if verbose else " (--verbose shows the SDK's error)"
        raise azureml.TransferFailed(f"reading {job_name} from {target} failed: {azureml._short(e)}{detail}") from None
    sys.exit(1 if status in FAILED else 0)


class _OnCommand(DivertingCommand):
    """A local command that hands its arguments to ``remote`` when given ``--on azureml``."""

    def __init__(self, local: click.Command, remote: click.Command) -> None:
        option = click.Option(
            ["--on"],
            type=click.Choice(["local", "azureml"]),
            default="local",
            show_default=True,
            help="Where: this machine, or an Azure ML workspace (`--on azureml --help` for its options).",
        )
        super().__init__(local, option)
        self.remote = remote

    def diverts(self, value: str | None, rest: list[str]) -> bool:
        return value == "azureml"

    def divert(self, ctx: click.Context, value: str, rest: list[str]) -> Any:
        # The remote command parses, reports errors and exits with its own codes (2 usage, 3 credentials).
        return self.remote.main(rest, prog_name=f"{ctx.command_path} --on azureml")


def with_on_azureml(local: click.Command, remote: click.Command) -> click.Command:
    """``local`` plus ``--on local|azureml``; with ``--on azureml`` the other arguments go to ``remote``.

    For the launcher: ``main.add_command(with_on_azureml(run.command, run_azureml), "run")`` and
    ``main.add_command(with_on_azureml(status.command, status_azureml), "status")``.
    """
    return _OnCommand(local, remote)


@click.group()
def main() -> None:
    """The Azure ML pipeline verbs alone: ``python -m olivepress.azureml_pipeline run-azureml|status-azureml``."""


main.add_command(run_azureml)
main.add_command(status_azureml)

if __name__ == "__main__":
    main()
