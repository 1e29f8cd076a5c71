"""``olivepress adapters``: the LoRA adapters on the volume, each with its lineage, and those registered for its base.

An adapter's lineage is what ``olivepress push`` tags it with (olivepress.azureml.assets): the finetune data's hash,
steps, rank and seed, the held-out loss, the optimize settings, and its base's content id. The registry's adapters
are the versions of ``<name>-<adapter>`` whose base is the volume's (by content), or all of them when the volume has
no model yet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from contract import logs, model_folder, volume
from olivepress.azureml import assets, errors, models
from olivepress.azureml.workspace import connect, resolve_target, workspace_options

# The lineage shown per adapter: column -> tag.
COLUMNS = {
    "steps": "finetune.max_steps",
    "rank": "finetune.rank",
    "seed": "finetune.seed",
    "data sha256": "finetune.data_sha256",
    "held-out loss": "metric.optimize.onnx_adapter.loss",
    "precision": "optimize.precision",
}


def on_volume(root: Path, name: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The volume's base content id (None without a switchable model) and its adapters, each with the tags push
    would give it."""
    manifest = volume.read_manifest(volume.stage_dir(root, assets.MODEL_STAGE))
    if manifest is None:
        return None, []
    rows = []
    for asset in assets.assets_of(root, manifest, name):
        tags, _ = assets.describe(asset)
        if asset.kind == assets.ADAPTER_KIND:
            rows.append(_row(str(asset.adapter), None, True, asset.bytes, tags))
        elif asset.kind == assets.MODEL_KIND:
            merged = model_folder.merged_adapter(asset.folder)
            rows.append(_row(f"{merged} (merged)", None, True, asset.bytes, tags))
    base = None if assets.is_merged(manifest) else assets.base_content(manifest)
    return base, rows


def registered(client: Any, name: str, base: str | None, here: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The registry's adapters for ``base`` as rows, each saying whether the same content is on the volume."""
    local = {row["tags"][assets.CONTENT_TAG] for row in here}
    return [
        _row(
            found["tags"].get(assets.ADAPTER_TAG, "?"),
            f"{found['name']}:{found['version']}",
            found["tags"].get(assets.CONTENT_TAG) in local,
            int(found["tags"].get(assets.BYTES_TAG, 0)),
            found["tags"],
        )
        for found in models.registered_adapters(client, name, base)
    ]


def _row(adapter: str, registered_as: str | None, on_volume: bool, size: int, tags: dict[str, str]) -> dict[str, Any]:
    return {"adapter": adapter, "registered": registered_as, "on_volume": on_volume, "bytes": size, "tags": tags}


@click.command("adapters", epilog="Exit codes: 0 listed, 2 bad input, 3 no usable Azure credentials.")
@click.option(
    "--name",
    default=models.DEFAULT_NAME,
    show_default=True,
    help="The name the adapters were pushed under: the registry's NAME-ADAPTER models.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the adapters and every tag of their lineage as JSON.")
@workspace_options(registry=True)
@volume.home_option("Volume root")
def command(
    name: str,
    as_json: bool,
    subscription: str | None,
    resource_group: str | None,
    workspace: str | None,
    registry: str | None,
    config: Path | None,
    verbose: bool,
    root: Path | None,
) -> None:
    """List the adapters on the volume with their lineage; with a workspace named, also those registered for its base.

    The registry is asked only when a workspace or registry is named (the options, their environment variables, or
    --config); it lists the versions of NAME-ADAPTER trained for the volume's base (by content), or every adapter
    pushed under NAME when the volume has no model.

    \b
    Examples:
      olivepress adapters
      olivepress adapters --workspace WS --resource-group RG --subscription SUB --name ft-for-travel
    """
    logs.console_logging(verbose)
    root = volume.home(root)
    base, rows = on_volume(root, name)
    if any((subscription, resource_group, workspace, registry, config)):
        target = resolve_target(subscription, resource_group, workspace, registry, config)
        client = connect(target, verbose)
        with errors.sdk_errors(target, verbose, failed=f"listing the adapters in {target} failed"):
            rows += registered(client, name, base, rows)
    if as_json:
        click.echo(json.dumps({"home": str(root), "base": base, "adapters": rows}, indent=2))
        return
    if not rows:
        click.echo(
            f"no adapters on {root}: `olivepress optimize` makes one, `olivepress pull NAME-ADAPTER` fetches one"
        )
        return
    click.echo(f"base {base[:12]}: the content id of {root}/optimize/model" if base else f"volume {root}")
    header = ("adapter", "where", "size", "base", *COLUMNS)
    lines = [header]
    for row in rows:
        tags = row["tags"]
        where = row["registered"] or "volume"
        lines.append(
            (
                row["adapter"],
                where + (" (also on the volume)" if row["registered"] and row["on_volume"] else ""),
                f"{row['bytes'] / 1e6:.1f} MB",
                tags.get(assets.BASE_CONTENT_TAG, "")[:12],
                *(_short(tags.get(tag, "")) for tag in COLUMNS.values()),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


def _short(value: str) -> str:
    """A hash to its first 12 characters, a figure to 3 decimals."""
    if len(value) == 64:
        return value[:12]
    try:
        return f"{float(value):.3f}" if "." in value else value
    except ValueError:
        return value
