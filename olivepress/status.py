"""``olivepress status``: a table of the stages on the volume, from their manifests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from contract import registry, volume


def summary(root: Path) -> list[dict[str, Any]]:
    rows = []
    for stage in registry.NAMES:
        manifest = volume.read_manifest(volume.stage_dir(root, stage))
        failed = (root / f"{stage}.failed.log").is_file()
        if manifest is None:
            rows.append({"stage": stage, "state": "failed" if failed else "missing"})
            continue
        parameters = manifest["parameters"]
        rows.append(
            {
                "stage": stage,
                "state": "done" + (" (last rerun failed)" if failed else ""),
                "ended": manifest["ended"],
                "wall_s": manifest["wall_s"],
                "bytes_out": manifest["bytes_out"],
                "parameters": {k: parameters[k] for k in registry.STAGES[stage].shown if k in parameters},
                "metrics": manifest.get("metrics", {}),
            }
        )
    return rows


@click.command("status")
@volume.home_option("Volume root")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def command(root: Path | None, as_json: bool) -> None:
    """Show each stage on the volume: done or not, when, how long, how big, and its key settings."""
    root = volume.home(root)
    rows = summary(root)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"olivepress volume {root}")
    for column in ("stage", "state", "finished", "wall", "output", "settings", "held-out loss"):
        table.add_column(column)
    for row in rows:
        if "ended" not in row:
            table.add_row(row["stage"], row["state"], "", "", "", "", "")
            continue
        table.add_row(
            row["stage"],
            row["state"],
            row["ended"].replace("T", " ").removesuffix("+00:00"),
            f"{row['wall_s']:.1f} s",
            f"{row['bytes_out'] / 1e6:.1f} MB",
            " ".join(f"{k}={v}" for k, v in row["parameters"].items()),
            " ".join(f"{model}={figures['loss']:.3f}" for model, figures in row["metrics"].items()),
        )
    Console().print(table)
