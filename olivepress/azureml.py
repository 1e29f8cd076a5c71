"""push / pull: the optimized model to and from an Azure ML model registry (a workspace or an Azure ML registry).

``olivepress push`` does what the lab's ``az ml model create --name ft-for-travel --version 1 --path
./models/phi/onnx-ao`` does, with the lineage of the stage manifests as tags, a content id that makes a second push
of the same files a no-op, and the credentials checked before anything is hashed or uploaded.
``olivepress pull NAME[:VERSION]`` brings a registered version back into ``<home>/optimize``, verified against the
sha256 of every file in its manifest, for ``olivepress infer``.

The Azure SDK is imported inside the commands only: ``olivepress --help`` and the inference image need none of it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from contract import logs, volume
from contract.exits import BadInput

log = logging.getLogger("olivepress")

EXIT_NO_CREDENTIALS = 3
CONTENT_TAG = "olivepress.content"  # digest of the optimize manifest's outputs: what makes two pushes "the same"
DEFAULT_NAME = "ft-for-travel"  # the lab's name
LINEAGE = "lineage"  # folder in the pushed model holding the upstream stages' manifests
SUBSCRIPTION_ENV, GROUP_ENV, WORKSPACE_ENV = "AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZUREML_WORKSPACE_NAME"
REGISTRY_ENV = "AZUREML_REGISTRY_NAME"
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
# Asset names: letters, digits, '-', '_', '.', starting with a letter or digit, at most 255 (Azure ML's rule).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,49}$")
T = TypeVar("T")

SIGN_IN_HELP = f"""\
no Azure credentials found. Sign in with one of:
  az login                      Azure CLI, on a laptop (a container does not see it: use the next line there)
  AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET
                                a service principal, in the environment (CI, containers)
  a managed identity            on an Azure VM, App Service, Container Apps or AKS (nothing to set)
Run again with --verbose to see what each method said. (exit code {EXIT_NO_CREDENTIALS})"""


class NoCredentials(click.ClickException):
    exit_code = EXIT_NO_CREDENTIALS


class TransferFailed(click.ClickException):
    exit_code = 1


# --- where to push: a workspace or a registry -------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    subscription: str | None = None
    resource_group: str | None = None
    workspace: str | None = None
    registry: str | None = None

    def __str__(self) -> str:
        if self.registry:
            return f"azureml://registries/{self.registry}"
        return f"azureml://subscriptions/{self.subscription}/resourcegroups/{self.resource_group}/workspaces/{self.workspace}"


def find_config(start: Path) -> Path | None:
    """``config.json`` or ``.azureml/config.json`` in ``start`` or a folder above it, as MLClient.from_config looks."""
    start = start.resolve()
    if start.is_file():
        return start
    for folder in (start, *start.parents):
        for candidate in (folder / "config.json", folder / ".azureml" / "config.json"):
            if candidate.is_file():
                return candidate
    return None


def resolve_target(
    subscription: str | None,
    resource_group: str | None,
    workspace: str | None,
    registry: str | None,
    config: Path | None,
) -> Target:
    """Flags, then the environment (click fills both), then a config.json: the first complete workspace wins."""
    if registry:
        name = registry.removeprefix("azureml://registries/").strip("/")
        if not NAME_RE.match(name):
            raise click.BadParameter(f"{registry!r} is not a registry name (azureml://registries/NAME or NAME)")
        return Target(subscription=subscription, resource_group=resource_group, registry=name)
    given = {"--subscription": subscription, "--resource-group": resource_group, "--workspace": workspace}
    if all(given.values()):
        return Target(subscription, resource_group, workspace)
    path = find_config(config or Path.cwd())
    if config and path is None:
        raise click.BadParameter(f"{config} has no config.json", param_hint="--config")
    if path is not None and not any(given.values()):
        try:
            data = json.loads(path.read_text())
            return Target(data["subscription_id"], data["resource_group"], data["workspace_name"])
        except (ValueError, KeyError, TypeError) as e:
            raise click.UsageError(
                f"{path} is not an Azure ML config.json (needs subscription_id, resource_group and workspace_name): "
                f"download it from the workspace's overview page in the Azure portal ({e})"
            ) from None
    missing = [flag for flag, value in given.items() if not value]
    raise click.UsageError(
        f"no Azure ML workspace given (missing {', '.join(missing)}). Name it with --subscription, --resource-group "
        f"and --workspace, or {SUBSCRIPTION_ENV}, {GROUP_ENV} and {WORKSPACE_ENV}, or put the workspace's "
        f"config.json in this folder (or pass --config); for an Azure ML registry use --registry NAME"
    )


# --- what to push: the optimize folder and its lineage ------------------------------------------------------------


def _lineage_manifest(root: Path, stage: str) -> dict[str, Any] | None:
    """A stage's manifest from the volume, else the copy a pulled model carries in optimize/lineage/."""
    manifest = volume.read_manifest(volume.stage_dir(root, stage))
    if manifest is None:
        copy = volume.stage_dir(root, "optimize") / LINEAGE / f"{stage}.json"
        manifest = json.loads(copy.read_text()) if copy.is_file() else None
    return manifest


def content_id(optimize_manifest: dict[str, Any]) -> str:
    return volume.digest_of(optimize_manifest["outputs"])


def describe(root: Path) -> tuple[dict[str, str], str]:
    """Tags (string to string, as Azure ML stores them) and a one-paragraph description, from the manifests."""
    optimize = volume.read_manifest(volume.stage_dir(root, "optimize")) or {}
    quantize = _lineage_manifest(root, "quantize") or {}
    finetune = _lineage_manifest(root, "finetune") or {}
    tags: dict[str, str] = {CONTENT_TAG: content_id(optimize), "olivepress.schema": str(optimize.get("schema"))}
    q, f, o = quantize.get("parameters", {}), finetune.get("parameters", {}), optimize.get("parameters", {})
    base = quantize.get("base_model") or quantize.get("inputs", {}).get("model", {}).get("hub_id")
    if base:
        tags["base_model"] = str(base)
    for key in ("algorithm", "bits", "group_size"):
        if key in q:
            tags[f"quantize.{key}"] = str(q[key])
    for key in ("method", "max_steps", "rank", "alpha", "learning_rate", "seed"):
        if key in f:
            tags[f"finetune.{key}"] = str(f[key])
    data = finetune.get("inputs", {}).get("data_files", {})
    if data.get("sha256"):
        tags["finetune.data_sha256"] = data["sha256"]
    for key in ("precision", "adapter_name", "int4_block_size", "int4_accuracy_level"):
        if key in o:
            tags[f"optimize.{key}"] = str(o[key])
    if optimize.get("adapters"):
        tags["adapters"] = ",".join(optimize["adapters"])
    versions: dict[str, str] = {}
    for manifest in (quantize, finetune, optimize):
        versions.update(manifest.get("versions", {}))
    for package, version in sorted(versions.items()):
        tags[f"version.{package}"] = str(version)
    for stage, manifest in (("quantize", quantize), ("finetune", finetune), ("optimize", optimize)):
        for model, figures in (manifest.get("metrics") or {}).items():  # e.g. quantized: {loss, perplexity, tokens}
            for name in ("loss", "perplexity"):
                if name in figures:
                    tags[f"metric.{stage}.{model}.{name}"] = str(figures[name])
    parts = ["int4 ONNX model for onnxruntime-genai, made by olivepress (Microsoft Olive)."]
    if base:
        parts.append(f"Base model: {base}.")
    if q:
        parts.append(
            f"Quantized with {q.get('algorithm', '?')} to {q.get('bits', '?')} bits (group {q.get('group_size', '?')})."
        )
    if f:
        parts.append(
            f"Fine-tuned with {f.get('method', 'LoRA')} for {f.get('max_steps', '?')} steps, "
            f"rank {f.get('rank', '?')}, on data sha256 {str(data.get('sha256', '?'))[:12]}."
        )
    if optimize.get("adapters"):
        parts.append(f"Adapters (.onnx_adapter, loaded by name): {', '.join(optimize['adapters'])}.")
    parts.append(f"Content id {tags[CONTENT_TAG][:12]}; the manifest.json inside lists every file's sha256.")
    return tags, " ".join(parts)


def require_optimized(root: Path) -> dict[str, Any]:
    folder = volume.stage_dir(root, "optimize")
    manifest = volume.read_manifest(folder)
    if manifest is None:
        raise BadInput(
            f"nothing to push: {folder} has no manifest.json; run `olivepress optimize` (or `olivepress run`) first, "
            f"or point --home at the volume that has it"
        )
    if manifest.get("schema") != volume.SCHEMA or manifest.get("stage") != "optimize" or "outputs" not in manifest:
        raise BadInput(f"{folder / volume.MANIFEST} is not an olivepress optimize manifest (schema 1)")
    return manifest


def verify_files(folder: Path, outputs: dict[str, str]) -> None:
    """Every file the manifest lists, with its sha256: a folder changed since the stage ran is not pushed."""
    for rel, expected in outputs.items():
        path = folder / rel
        if not path.is_file():
            raise BadInput(f"{path} is listed in the manifest but missing; rerun `olivepress optimize --force`")
        if volume.sha256_file(path) != expected:
            raise BadInput(
                f"{path} changed since optimize wrote it (sha256 differs from the manifest); "
                f"rerun `olivepress optimize --force`"
            )


@contextmanager
def staged(root: Path, manifest: dict[str, Any]) -> Iterator[Path]:
    """The folder to upload: the manifest's outputs, the manifest, and the upstream manifests under lineage/.

    Hard links (copies across file systems), so the upload never includes stray files or the stage log.
    """
    source = volume.stage_dir(root, "optimize")
    with volume.scratch(root, "push-") as tmp:
        out = tmp / "optimize"  # the SDK names the uploaded folder after this one
        for rel in [*manifest["outputs"], volume.MANIFEST]:
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source / rel, target)
            except OSError:
                shutil.copy2(source / rel, target)
        for stage in ("quantize", "finetune"):
            upstream = _lineage_manifest(root, stage)
            if upstream is not None:
                (out / LINEAGE).mkdir(exist_ok=True)
                (out / LINEAGE / f"{stage}.json").write_text(json.dumps(upstream, indent=2) + "\n")
        yield out


# --- the SDK ------------------------------------------------------------------------------------------------------


def _quiet_sdk(verbose: bool) -> None:
    # DefaultAzureCredential logs its whole failure at WARNING and then raises the same text: the exception is
    # the one copy we show (with --verbose). azure-ai-ml's own warnings repeat what our messages say.
    logging.getLogger("azure").setLevel(logging.INFO if verbose else logging.CRITICAL)
    logging.getLogger("azure.identity").setLevel(logging.CRITICAL)
    # Request and response headers at INFO: too much even for --verbose.
    logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)
    # Some azure-ai-ml modules give themselves an INFO handler on stderr at import ("Downloading the model ...").
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("azure.ai.ml") and isinstance(logger, logging.Logger) and not logger.propagate:
            logger.setLevel(logging.INFO if verbose else logging.WARNING)


@contextmanager
def sdk_console(verbose: bool) -> Iterator[None]:
    """The SDK prints a colour reset after each upload; shown only where its progress bar is (a terminal)."""
    if verbose or sys.stderr.isatty():
        yield
        return
    with open(os.devnull, "w") as sink, redirect_stderr(sink):
        yield


def credential_and_client(target: Target, verbose: bool) -> Any:
    """DefaultAzureCredential, checked with one token request before anything else happens, and an MLClient."""
    from azure.ai.ml import MLClient
    from azure.core.exceptions import ClientAuthenticationError
    from azure.identity import DefaultAzureCredential

    _quiet_sdk(verbose)
    credential = DefaultAzureCredential()
    try:
        credential.get_token(_management_scope())
    except ClientAuthenticationError as e:
        detail = f"\n\n{e.message}" if verbose else ""
        raise NoCredentials(SIGN_IN_HELP + detail) from None
    show_progress = sys.stderr.isatty()
    if target.registry:
        return MLClient(credential, registry_name=target.registry, show_progress=show_progress)
    return MLClient(
        credential, target.subscription, target.resource_group, target.workspace, show_progress=show_progress
    )


def _management_scope() -> str:
    """The token scope of the cloud the SDK will talk to (Azure public, sovereign, or ARM_CLOUD_METADATA_URL's)."""
    try:
        from azure.ai.ml._azure_environments import _get_base_url_from_metadata

        return _get_base_url_from_metadata().rstrip("/") + "/.default"
    except Exception:  # a private helper: if it moves, the public cloud is the right default
        return "https://management.azure.com/.default"


def _status(error: BaseException) -> int | None:
    return getattr(error, "status_code", None)


def is_transient(error: BaseException) -> bool:
    from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

    if isinstance(error, (ServiceRequestError, ServiceResponseError, ConnectionError, TimeoutError)):
        return True
    return isinstance(error, HttpResponseError) and _status(error) in TRANSIENT_STATUS


def with_retries(what: str, call: Callable[[], T], attempts: int, backoff_s: float) -> T:
    """azure-core already retries each request; this retries the whole step when a request runs out of tries.

    Blob uploads are content-addressed, so a retried upload sends only what is not there yet.
    """
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as e:
            if attempt == attempts or not is_transient(e):
                raise
            wait = backoff_s * 2 ** (attempt - 1)
            log.warning("%s: %s; trying again in %.0f s (%d/%d)", what, _short(e), wait, attempt, attempts - 1)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _short(error: BaseException) -> str:
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    return text.strip().splitlines()[0][:300]


def _denied(error: BaseException, target: Target) -> NoCredentials | None:
    if _status(error) in (401, 403):
        return NoCredentials(
            f"signed in, but {target} refused the request ({_status(error)}: {_short(error)}). The identity needs a "
            f"role such as 'AzureML Data Scientist' on the workspace, or the workspace name is wrong."
        )
    return None


def list_versions(client: Any, name: str) -> list[Any]:
    from azure.ai.ml.constants import ListViewType
    from azure.core.exceptions import ResourceNotFoundError

    try:
        # Archived versions too: their numbers are taken, and one may hold the same content.
        return list(client.models.list(name=name, list_view_type=ListViewType.ALL))
    except ResourceNotFoundError:
        return []


def latest(versions: list[Any]) -> str:
    """The highest numbered version; named ones (e.g. 'rc1') only when none is numbered."""
    numbered = [str(v.version) for v in versions if str(v.version).isdigit()]
    if numbered:
        return max(numbered, key=int)
    return max(str(v.version) for v in versions)


def next_version(versions: list[Any]) -> str:
    numbers = [int(v.version) for v in versions if str(v.version).isdigit()]
    return str(max(numbers, default=0) + 1)


# --- push ---------------------------------------------------------------------------------------------------------


def workspace_options(func: Callable) -> Callable:
    options = [
        click.option("--subscription", envvar=SUBSCRIPTION_ENV, show_envvar=True, help="Azure subscription id."),
        click.option("--resource-group", envvar=GROUP_ENV, show_envvar=True, help="Resource group of the workspace."),
        click.option("--workspace", envvar=WORKSPACE_ENV, show_envvar=True, help="Azure ML workspace name."),
        click.option(
            "--registry",
            envvar=REGISTRY_ENV,
            show_envvar=True,
            help="An Azure ML registry (NAME or azureml://registries/NAME) instead of a workspace.",
        ),
        click.option(
            "--config",
            type=click.Path(exists=True, path_type=Path),
            help="The workspace's config.json (default: ./config.json or ./.azureml/config.json, or in a parent).",
        ),
        volume.home_option("Volume root"),
        click.option("-v", "--verbose", is_flag=True, help="Show the Azure SDK's own messages and errors in full."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.command(
    "push",
    context_settings={"show_default": True},
    epilog=f"Exit codes: 0 registered (or already there), 1 the push failed, 2 bad input, "
    f"{EXIT_NO_CREDENTIALS} no usable Azure credentials.",
)
@click.option("--name", default=DEFAULT_NAME, envvar="OLIVEPRESS_PUSH_NAME", show_envvar=True, help="Model name.")
@click.option(
    "--version",
    "version",
    envvar="OLIVEPRESS_PUSH_VERSION",
    show_envvar=True,
    help="Version [default: the next free one].",
)
@click.option("--dry-run", is_flag=True, help="Print what would be registered; needs no credentials.")
@click.option("--retries", default=3, type=click.IntRange(1, 10), help="Tries for a step that fails transiently.")
@workspace_options
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
    root: Path | None,
    verbose: bool,
) -> None:
    """Register <home>/optimize (model, adapters, manifest) as an Azure ML custom model.

    Like the lab's `az ml model create --type custom_model --path <optimized folder>`, with the quantize, finetune
    and optimize manifests as tags and description. The same content pushed again uploads nothing. Signs in with
    DefaultAzureCredential: `az login`, service-principal variables, or a managed identity.

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
    if version is not None and not VERSION_RE.match(version):
        raise click.BadParameter(f"{version!r}: letters, digits, '-', '_' and '.'", param_hint="--version")
    root = volume.home(root)
    manifest = require_optimized(root)
    tags, description = describe(root)
    folder = volume.stage_dir(root, "optimize")

    if dry_run:
        try:
            where = str(resolve_target(subscription, resource_group, workspace, registry, config))
        except click.UsageError as e:
            where = f"(not set: {e.message})"
        plan = {
            "target": where,
            "name": name,
            "version": version or "(the next free one, decided at push time)",
            "type": "custom_model",
            "path": str(folder),
            "files": len(manifest["outputs"]) + 1,
            "bytes": sum((folder / rel).stat().st_size for rel in manifest["outputs"] if (folder / rel).is_file()),
            "description": description,
            "tags": tags,
        }
        click.echo(json.dumps(plan, indent=2))
        click.echo("dry run: nothing was uploaded or registered", err=True)
        return

    target = resolve_target(subscription, resource_group, workspace, registry, config)
    client = credential_and_client(target, verbose)  # before any hashing or upload
    verify_files(folder, manifest["outputs"])
    try:
        result = _push(client, target, root, manifest, name, version, tags, description, retries, verbose)
    except click.ClickException:
        raise
    except Exception as e:
        denied = _denied(e, target)
        if denied:
            raise denied from None
        detail = f"\n{e}" if verbose else " (--verbose shows the SDK's error)"
        raise TransferFailed(
            f"push to {target} failed: {_short(e)}{detail}\nNothing was registered: no version of {name} points at "
            f"this upload. Run the same command again once the cause is fixed; files already uploaded are reused."
        ) from None
    click.echo(result)


def _push(
    client: Any,
    target: Target,
    root: Path,
    manifest: dict[str, Any],
    name: str,
    version: str | None,
    tags: dict[str, str],
    description: str,
    retries: int,
    verbose: bool,
) -> str:
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import Model

    content = tags[CONTENT_TAG]
    versions = with_retries("listing versions", lambda: list_versions(client, name), retries, 2.0)
    same = [v for v in versions if (v.tags or {}).get(CONTENT_TAG) == content]
    if version is not None:
        existing = next((v for v in versions if str(v.version) == version), None)
        if existing is not None and (existing.tags or {}).get(CONTENT_TAG) == content:
            return f"{name}:{version} in {target} already holds this content; nothing uploaded"
        if existing is not None:
            raise click.UsageError(
                f"{name}:{version} already exists in {target} with other content (model versions are immutable): "
                f"pick another --version, or leave it out for the next free one ({next_version(versions)})"
            )
    elif same:
        found = ", ".join(f"{name}:{v.version}" for v in same)
        return f"already registered as {found} in {target}; nothing uploaded"
    version = version or next_version(versions)
    log.info("pushing %s to %s as %s:%s", volume.stage_dir(root, "optimize"), target, name, version)
    with staged(root, manifest) as path:
        model = Model(
            name=name, version=version, path=str(path), type=AssetTypes.CUSTOM_MODEL, tags=tags, description=description
        )

        def register() -> Any:
            try:
                with sdk_console(verbose):
                    return client.models.create_or_update(model)
            except Exception:
                # The final PUT may have landed before its answer was lost: if our version is there, it is done.
                registered = _get_version(client, name, version)
                if registered is not None and (registered.tags or {}).get(CONTENT_TAG) == content:
                    return registered
                raise

        registered = with_retries("upload and register", register, retries, 5.0)
    return f"registered {registered.name}:{registered.version} in {target}\n  path: {registered.path}"


def _get_version(client: Any, name: str, version: str) -> Any | None:
    try:
        return client.models.get(name=name, version=version)
    except Exception:  # absent, or the service is down: either way, not known to be registered
        return None


# --- pull ---------------------------------------------------------------------------------------------------------


def parse_ref(ref: str) -> tuple[str, str | None]:
    name, _, version = ref.partition(":")
    if not NAME_RE.match(name) or (version and not VERSION_RE.match(version)) or ref.endswith(":"):
        raise click.BadParameter(
            f"{ref!r} is not NAME or NAME:VERSION (e.g. ft-for-travel:1)", param_hint="NAME[:VERSION]"
        )
    return name, version or None


def verify_download(folder: Path) -> dict[str, Any]:
    """The downloaded folder's manifest, once every file it lists is there with its sha256 and nothing else is."""
    manifest = volume.read_manifest(folder)
    if manifest is None or manifest.get("stage") != "optimize" or "outputs" not in manifest:
        raise BadInput(
            "the downloaded model has no olivepress optimize manifest.json: it was not pushed by `olivepress push`"
        )
    for rel, expected in manifest["outputs"].items():
        path = folder / rel
        if not path.is_file():
            raise TransferFailed(
                f"download incomplete: {rel} is missing; nothing was changed, run `olivepress pull` again"
            )
        if volume.sha256_file(path) != expected:
            raise TransferFailed(f"download corrupt: {rel} does not match its sha256; nothing was changed, try again")
    allowed = set(manifest["outputs"]) | {volume.MANIFEST, volume.LOG}
    extra = [
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).as_posix() not in allowed and p.relative_to(folder).parts[0] != LINEAGE
    ]
    if extra:
        raise TransferFailed(
            f"the registered model has files its manifest does not list: {', '.join(sorted(extra)[:5])}"
        )
    return manifest


@click.command(
    "pull",
    context_settings={"show_default": True},
    epilog=f"Exit codes: 0 pulled (or already here), 1 the download failed, 2 bad input or not found, "
    f"{EXIT_NO_CREDENTIALS} no usable Azure credentials.",
)
@click.argument("ref", metavar="NAME[:VERSION]", default=DEFAULT_NAME)
@click.option("--force", is_flag=True, help="Replace a different model already in <home>/optimize.")
@workspace_options
def pull(
    ref: str,
    force: bool,
    subscription: str | None,
    resource_group: str | None,
    workspace: str | None,
    registry: str | None,
    config: Path | None,
    root: Path | None,
    verbose: bool,
) -> None:
    """Download a registered model version into <home>/optimize, verified file by file, for `olivepress infer`.

    Without :VERSION, the latest. The files land in a temporary folder first and replace <home>/optimize only once
    every sha256 in the model's manifest matches.

    \b
    Examples:
      olivepress pull ft-for-travel:1 --subscription SUB --resource-group RG --workspace WS
      olivepress pull ft-for-travel && olivepress infer --adapter travel
    """
    logs.console_logging(verbose)
    name, version = parse_ref(ref)
    root = volume.home(root)
    target = resolve_target(subscription, resource_group, workspace, registry, config)
    client = credential_and_client(target, verbose)
    try:
        _pull(client, target, root, name, version, force, verbose)
    except click.ClickException:
        raise
    except Exception as e:
        denied = _denied(e, target)
        if denied:
            raise denied from None
        from azure.core.exceptions import ResourceNotFoundError

        if isinstance(e, ResourceNotFoundError):
            raise click.UsageError(
                f"{ref} not found in {target}: check the name and version (`az ml model list`)"
            ) from None
        detail = f"\n{e}" if verbose else " (--verbose shows the SDK's error)"
        raise TransferFailed(
            f"pull of {ref} from {target} failed: {_short(e)}{detail}\n<home>/optimize is unchanged."
        ) from None


def _download(client: Any, name: str, version: str, folder: Path, verbose: bool) -> None:
    with sdk_console(verbose):
        client.models.download(name=name, version=version, download_path=str(folder))


def _pull(client: Any, target: Target, root: Path, name: str, version: str | None, force: bool, verbose: bool) -> None:
    if version is None:
        versions = list_versions(client, name)
        if not versions:
            raise click.UsageError(f"no model named {name} in {target}")
        version = latest(versions)
    model = client.models.get(name=name, version=version)
    wanted = (model.tags or {}).get(CONTENT_TAG)
    final = volume.stage_dir(root, "optimize")
    local = volume.read_manifest(final)
    if local and "outputs" in local:
        if wanted and content_id(local) == wanted:
            click.echo(f"{final} already holds {name}:{version}; nothing downloaded")
            return
        if not force:
            raise click.UsageError(
                f"{final} holds another model (content {content_id(local)[:12]}); pass --force to replace it, "
                f"or --home to pull into another volume"
            )
    root.mkdir(parents=True, exist_ok=True)
    partial = root / ".optimize.pull.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        with_retries("download", lambda: _download(client, name, version, partial, verbose), 3, 5.0)
        manifests = sorted(partial.rglob(volume.MANIFEST), key=lambda p: len(p.parts))
        folder = manifests[0].parent if manifests else partial
        manifest = verify_download(folder)
        if wanted and content_id(manifest) != wanted:
            raise TransferFailed(
                f"{name}:{version}'s files do not match its {CONTENT_TAG} tag; it was changed after push"
            )
        volume.publish(folder, final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    click.echo(f"pulled {name}:{version} from {target} into {final} ({len(manifest['outputs'])} files verified)")
    click.echo("next: olivepress infer")


@click.group()
def cli() -> None:
    """push / pull alone: `python -m olivepress.azureml push|pull` (the launcher registers the same commands)."""


cli.add_command(push)
cli.add_command(pull)

if __name__ == "__main__":
    cli()
