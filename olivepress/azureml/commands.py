"""The ``olivepress azureml`` commands: push and pull the model, run the stages as a pipeline job and follow it.

``push`` and ``pull`` are also the launcher's ``olivepress push`` / ``olivepress pull``; the push image runs this
group as ``python -m olivepress.azureml``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from contract import logs, volume
from contract.exits import Exit
from olivepress.azureml import assets, errors, models, pipeline
from olivepress.azureml.workspace import NAME_RE, connect, resolve_target, workspace_options


def _exit_codes(meanings: dict[Exit, str]) -> str:
    """A command's line of contract.exits codes, in its own words."""
    return "Exit codes: " + ", ".join(f"{int(code)} {meaning}" for code, meaning in meanings.items()) + "."


def _parse_ref(ref: str) -> tuple[str, str | None]:
    name, _, version = ref.partition(":")
    if not NAME_RE.match(name) or (version and not models.VERSION_RE.match(version)) or ref.endswith(":"):
        raise click.BadParameter(
            f"{ref!r} is not NAME or NAME:VERSION (e.g. ft-for-travel:1)", param_hint="NAME[:VERSION]"
        )
    return name, version or None


@click.group("azureml")
def azureml() -> None:
    """Azure ML: register the model (push), bring it back (pull), run the stages as a pipeline job (run, status).

    Signs in with DefaultAzureCredential: `az login`, service-principal variables, or a managed identity.
    """


@click.command(
    "push",
    context_settings={"show_default": True},
    epilog=_exit_codes(
        {
            Exit.OK: "registered (or already there)",
            Exit.FAILED: "the push failed",
            Exit.BAD_INPUT: "bad input",
            Exit.NO_AZURE_CREDENTIALS: "no usable Azure credentials",
        }
    ),
)
@click.option(
    "--name",
    default=models.DEFAULT_NAME,
    envvar="OLIVEPRESS_PUSH_NAME",
    show_envvar=True,
    help="Model name: the base is registered as NAME-base, each adapter as NAME-ADAPTER (a merged build as NAME).",
)
@click.option(
    "--version",
    "version",
    envvar="OLIVEPRESS_PUSH_VERSION",
    show_envvar=True,
    help="Version of each adapter (of a merged build) [default: the one holding this content, else the next free "
    "one]. The base's is always the one holding its content, else the next free one.",
)
@click.option("--dry-run", is_flag=True, help="Print what would be registered; needs no credentials.")
@click.option("--retries", default=3, type=click.IntRange(1, 10), help="Tries for a step that fails transiently.")
@workspace_options(registry=True)
@volume.home_option("Volume root")
def push(
    name: str,
    version: str | None,
    dry_run: bool,
    retries: int,
    subscription: str | None,
    resource_group: str | None,
    workspace: str | None,
    registry: str | None,
    config: Path | None,
    verbose: bool,
    root: Path | None,
) -> None:
    """Register <home>/optimize in Azure ML: its base once, each adapter as its own custom model.

    Like the lab's `az ml model create --type custom_model --path <optimized folder>`, split so that adapters share
    one registered base: the base (model/) as NAME-base, found again by its content, so a new adapter for it uploads
    only the adapter; each adapter as NAME-ADAPTER, tagged with its base and its lineage (the quantize, finetune and
    optimize manifests). A merged build (--adapter-mode merged) is one model, NAME. The same content pushed again
    uploads nothing. Signs in with DefaultAzureCredential: `az login`, service-principal variables, or a managed
    identity.

    \b
    Examples:
      olivepress push --subscription SUB --resource-group RG --workspace WS
      olivepress push --name ft-for-travel --version 1 --dry-run
      olivepress push --registry my-registry
    """
    logs.console_logging(verbose)
    if not NAME_RE.match(name):
        raise click.BadParameter(
            f"{name!r}: letters, digits, '-', '_' and '.', starting with a letter or digit", param_hint="--name"
        )
    if version is not None and not models.VERSION_RE.match(version):
        raise click.BadParameter(f"{version!r}: letters, digits, '-', '_' and '.'", param_hint="--version")
    root = volume.home(root)
    manifest = assets.require_optimized(root)
    where = (subscription, resource_group, workspace, registry, config)

    if dry_run:
        try:
            target_text = str(resolve_target(*where))
        except click.UsageError as e:
            target_text = f"(not set: {e.message})"
        click.echo(json.dumps(models.plan(root, manifest, name, version, target_text), indent=2))
        click.echo("dry run: nothing was uploaded or registered", err=True)
        return

    target = resolve_target(*where)
    client = connect(target, verbose)  # before any hashing or upload
    assets.verify_files(volume.stage_dir(root, assets.MODEL_STAGE), manifest["outputs"])
    with errors.sdk_errors(
        target,
        verbose,
        failed=f"push to {target} failed",
        afterwards="Nothing was registered for this step: no model version points at a partial upload (what the "
        "lines above registered stays, and is found again by its content). Run the same command again once the "
        "cause is fixed; files already uploaded are reused.",
    ):
        models.push(client, target, root, manifest, name, version, retries=retries, verbose=verbose, echo=click.echo)


@click.command(
    "pull",
    context_settings={"show_default": True},
    epilog=_exit_codes(
        {
            Exit.OK: "pulled (or already here)",
            Exit.FAILED: "the download failed",
            Exit.BAD_INPUT: "bad input or not found",
            Exit.NO_AZURE_CREDENTIALS: "no usable Azure credentials",
        }
    ),
)
@click.argument("ref", metavar="NAME[:VERSION]", default=assets.adapter_asset_name(models.DEFAULT_NAME, "travel"))
@click.option(
    "--force",
    is_flag=True,
    help="Replace a different model already in <home>/optimize (for an adapter: another base, or an adapter of the "
    "same name).",
)
@workspace_options(registry=True)
@volume.home_option("Volume root")
def pull(
    ref: str,
    force: bool,
    subscription: str | None,
    resource_group: str | None,
    workspace: str | None,
    registry: str | None,
    config: Path | None,
    verbose: bool,
    root: Path | None,
) -> None:
    """Download a registered model version into <home>/optimize, verified file by file, for `olivepress infer`.

    Without :VERSION, the latest. An adapter (NAME-ADAPTER, as push registers it) joins the base already in
    <home>/optimize when it is the one the adapter was trained for (only the adapter is downloaded), or comes with
    its base into an empty volume; another base there is refused. The files land in a temporary folder first and
    replace <home>/optimize only once every sha256 in the manifests matches. A running `olivepress serve` loads the
    adapters present when it starts: restart it to serve one pulled since.

    \b
    Examples:
      olivepress pull ft-for-travel-travel:1 --subscription SUB --resource-group RG --workspace WS
      olivepress pull ft-for-travel-travel && olivepress infer --adapter travel
      olivepress pull ft-for-travel-cooking      # a second adapter: only its .onnx_adapter comes down
    """
    logs.console_logging(verbose)
    name, version = _parse_ref(ref)
    root = volume.home(root)
    target = resolve_target(subscription, resource_group, workspace, registry, config)
    client = connect(target, verbose)
    with errors.sdk_errors(
        target,
        verbose,
        failed=f"pull of {ref} from {target} failed",
        not_found=f"{ref} not found in {target}: check the name and version (adapters are NAME-ADAPTER: "
        f"`olivepress adapters --name NAME` with the workspace options lists them; `az ml model list` lists all)",
        afterwards="<home>/optimize is unchanged.",
    ):
        click.echo(models.pull(client, target, root, name, version, force=force, verbose=verbose))


@click.command(
    "run",
    epilog=_exit_codes(
        {
            Exit.OK: "submitted (or, with --wait, completed)",
            Exit.FAILED: "failed",
            Exit.BAD_INPUT: "bad input",
            Exit.NO_AZURE_CREDENTIALS: "no usable Azure credentials",
        }
    ),
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
@click.option("--name", "model_name", default=models.DEFAULT_NAME, show_default=True, help="Model name to register.")
@click.option("--env-file", type=click.Path(dir_okay=False, path_type=Path), default=Path(".env"), show_default=True)
@click.option(
    "--datastore", default=pipeline.DEFAULT_DATASTORE, show_default=True, help="Where the stage folders land."
)
@click.option("--job-name", help="Name of the pipeline job [default: olivepress-<UTC time>-<random>].")
@click.option("--dry-run", is_flag=True, help="Print the job spec (YAML) and stop; needs no credentials.")
@click.option("--wait", is_flag=True, help="Follow the job until it ends (as `olivepress azureml status JOB`).")
@workspace_options(registry=False)
def run(
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
      olivepress azureml run --compute gpu-cluster --image-registry myacr.azurecr.io --dry-run
      olivepress azureml run --compute gpu-cluster --image-registry myacr.azurecr.io --gpus 4 \\
          --model microsoft/Phi-3.5-mini-instruct --algorithm awq
    """
    errors.quiet_sdk_loggers(verbose)
    settings = pipeline.collect_settings(
        os.environ,
        env_file,
        {"model": model, "algorithm": algorithm, "data_files": data_files, "max_steps": max_steps},
    )
    images = pipeline.stage_images(image_registry, tag)
    if no_infer:
        images = {stage: image for stage, image in images.items() if stage in pipeline.REQUIRED}
    job = pipeline.build_pipeline_job(
        images, compute, settings, gpus, model_name=model_name, datastore=datastore, job_name=job_name
    )
    if dry_run:
        local = pipeline.local_inputs(settings)
        if local:  # the SDK writes them as azureml:<path>; at submission it uploads them and sends datastore URIs
            click.echo(f"# local inputs, uploaded to the workspace's datastore on submission: {', '.join(local)}")
        click.echo(pipeline.job_yaml(job), nl=False)
        click.echo("dry run: nothing was submitted", err=True)
        return
    logs.console_logging(verbose)
    target = resolve_target(subscription, resource_group, workspace, None, config)
    client = connect(target, verbose)  # exit 3 with the sign-in help if none
    with errors.sdk_errors(
        target,
        verbose,
        failed=f"submitting to {target} failed",
        refused=f"{target} refused the job, nothing was submitted",
    ):
        with errors.sdk_console(verbose):
            created = pipeline.submit(client, job)
    click.echo(f"submitted {created.name} to {target}")
    if getattr(created, "studio_url", None):
        click.echo(f"  studio: {created.studio_url}")
    click.echo(f"  follow: olivepress azureml status {created.name}")
    if wait:
        with errors.sdk_errors(target, verbose, failed=f"reading {created.name} from {target} failed"):
            state = pipeline.follow(client, created.name)
        sys.exit(Exit.FAILED if state in pipeline.FAILED else Exit.OK)


@click.command(
    "status",
    epilog=_exit_codes(
        {
            Exit.OK: "running or completed",
            Exit.FAILED: "failed or canceled",
            Exit.BAD_INPUT: "bad input or no such job",
            Exit.NO_AZURE_CREDENTIALS: "no usable Azure credentials",
        }
    ),
)
@click.argument("job_name", metavar="JOB")
@click.option(
    "--follow/--once", "keep_following", default=True, show_default=True, help="Poll until the job ends, or print once."
)
@click.option("--interval", default=15.0, show_default=True, help="Seconds between polls.")
@workspace_options(registry=False)
def status(
    job_name: str,
    keep_following: bool,
    interval: float,
    subscription: str | None,
    resource_group: str | None,
    workspace: str | None,
    config: Path | None,
    verbose: bool,
) -> None:
    """Each step's state of the pipeline job JOB (as `olivepress azureml run` printed it)."""
    logs.console_logging(verbose)
    target = resolve_target(subscription, resource_group, workspace, None, config)
    client = connect(target, verbose)
    with errors.sdk_errors(
        target, verbose, failed=f"reading {job_name} from {target} failed", not_found=f"no job {job_name} in {target}"
    ):
        state = pipeline.follow(client, job_name, poll_s=interval, once=not keep_following)
    sys.exit(Exit.FAILED if state in pipeline.FAILED else Exit.OK)


for command in (push, pull, run, status):
    azureml.add_command(command)
