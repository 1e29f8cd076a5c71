"""Where an Azure ML command goes (a workspace, or for push and pull also a registry) and a signed-in client for it.

The workspace comes from flags, then the environment, then the workspace's ``config.json``, as ``az ml`` and
``MLClient.from_config`` find it. Sign-in is ``DefaultAzureCredential``, checked with one token request before
anything is hashed, uploaded or submitted, so missing credentials cost nothing and say how to sign in (exit 3).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from contract.exits import Exit, NoAzureCredentials
from olivepress.azureml import errors

SUBSCRIPTION_ENV, GROUP_ENV, WORKSPACE_ENV = "AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZUREML_WORKSPACE_NAME"
REGISTRY_ENV = "AZUREML_REGISTRY_NAME"
# Asset and registry names: letters, digits, '-', '_', '.', starting with a letter or digit, at most 255 (Azure ML's).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")

SIGN_IN_HELP = f"""\
no Azure credentials found. Sign in with one of:
  az login                      Azure CLI, on a laptop (a container does not see it: use the next line there)
  AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET
                                a service principal, in the environment (CI, containers)
  a managed identity            on an Azure VM, App Service, Container Apps or AKS (nothing to set)
Run again with --verbose to see what each method said. (exit code {int(Exit.NO_AZURE_CREDENTIALS)})"""


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


def workspace_options(*, registry: bool) -> Callable[[Callable], Callable]:
    """The workspace options every Azure ML command takes, and --verbose; ``registry``: also --registry."""
    options = [
        click.option("--subscription", envvar=SUBSCRIPTION_ENV, show_envvar=True, help="Azure subscription id."),
        click.option("--resource-group", envvar=GROUP_ENV, show_envvar=True, help="Resource group of the workspace."),
        click.option("--workspace", envvar=WORKSPACE_ENV, show_envvar=True, help="Azure ML workspace name."),
    ]
    if registry:
        options.append(
            click.option(
                "--registry",
                envvar=REGISTRY_ENV,
                show_envvar=True,
                help="An Azure ML registry (NAME or azureml://registries/NAME) instead of a workspace.",
            )
        )
    options += [
        click.option(
            "--config",
            type=click.Path(exists=True, path_type=Path),
            help="The workspace's config.json (default: ./config.json or ./.azureml/config.json, or in a parent).",
        ),
        click.option("-v", "--verbose", is_flag=True, help="Show the Azure SDK's own messages and errors in full."),
    ]

    def decorate(func: Callable) -> Callable:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


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


def connect(target: Target, verbose: bool) -> Any:
    """An MLClient for ``target``, once DefaultAzureCredential has produced a token (else NoAzureCredentials)."""
    from azure.ai.ml import MLClient
    from azure.core.exceptions import ClientAuthenticationError
    from azure.identity import DefaultAzureCredential

    errors.quiet_sdk_loggers(verbose)
    credential = DefaultAzureCredential()
    try:
        credential.get_token(_management_scope())
    except ClientAuthenticationError as e:
        detail = f"\n\n{e.message}" if verbose else ""
        raise NoAzureCredentials(SIGN_IN_HELP + detail) from None
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
    except Exception:  # the SDK's private helper: if it moves, the public cloud is the right default
        return "https://management.azure.com/.default"
