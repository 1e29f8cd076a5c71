"""``olivepress status``: a table of the stages on the volume, from their manifests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from contract import lock, registry, volume


def summary(root: Path) -> list[dict[str, Any]]:
    """One row per stage: its state (done, missing, failed, running, killed, corrupt, changed), and from its
    manifest when, how long, how big, the key settings and held-out figures."""
    writer = lock.holder(root)
    rows = []
    for stage in registry.NAMES:
        folder = volume.stage_dir(root, stage)
        failed = (root / f"{stage}.failed.log").is_file()
        if (root / f".{stage}.partial").exists():
            in_progress = f"running (PID {writer.get('pid', '?')})" if writer is not None else "killed"
        else:
            in_progress = None
        try:
            manifest = volume.read_manifest(folder)
        except volume.ManifestError:
            rows.append({"stage": stage, "state": in_progress or f"corrupt manifest: run `olivepress {stage}`"})
            continue
        if manifest is None:
            rows.append({"stage": stage, "state": in_progress or ("failed" if failed else "missing")})
            continue
        changed = volume.changed_outputs(folder, manifest)
        if in_progress:
            state = f"done, rerun {in_progress}"
        elif changed:
            state = f"changed since published ({len(changed)} file(s)): `olivepress {stage}` remakes it"
        else:
            state = "done" + (" (last rerun failed)" if failed else "")
        parameters = manifest["parameters"]
        rows.append(
            {
                "stage": stage,
                "state": state,
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
    writer = lock.holder(root)
    title = f"olivepress volume {root}"
    if writer is not None:
        title += f"\nbeing written by `{writer.get('command', '?')}` (PID {writer.get('pid', '?')})"
    table = Table(title=title)
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
