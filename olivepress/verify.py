"""``olivepress verify``: every published file of every stage against the sha256 in its manifest.

A skip checks sizes and modification times only (and hashes what was touched); this reads every byte, for a
volume that was copied by a tool that keeps timestamps, or that lived on a disk you do not trust.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from contract import registry, volume
from contract.exits import Exit


@click.command("verify", epilog="Exit codes: 0 every published file matches, 1 some do not (each is listed).")
@volume.home_option("Volume root")
def command(root: Path | None) -> None:
    """Hash every published file of every stage and compare it with its manifest."""
    root = volume.home(root)
    bad = 0
    for stage in registry.NAMES:
        folder = volume.stage_dir(root, stage)
        try:
            manifest = volume.read_manifest(folder)
        except volume.ManifestError as error:
            click.echo(f"{stage:<10}corrupt manifest: {error.message}")
            bad += 1
            continue
        if manifest is None:
            click.echo(f"{stage:<10}not run")
            continue
        clock = time.perf_counter()
        changed = volume.changed_outputs(folder, manifest, full=True)
        seconds = time.perf_counter() - clock
        size = sum((folder / name).stat().st_size for name in manifest["outputs"] if name not in changed)
        if changed:
            bad += 1
            click.echo(f"{stage:<10}{len(changed)} of {len(manifest['outputs'])} file(s) differ from the manifest:")
            for name, why in changed.items():
                click.echo(f"            {name}: {why}")
            click.echo(f"            `olivepress {stage}` remakes it")
        else:
            click.echo(f"{stage:<10}ok: {len(manifest['outputs'])} files, {size / 1e9:.2f} GB in {seconds:.1f} s")
    raise SystemExit(Exit.FAILED if bad else Exit.OK)
