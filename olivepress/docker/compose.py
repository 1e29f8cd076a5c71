"""The pipeline under docker compose: which compose files a run uses, each stage's result, the run's exit code.

compose.yaml has one service per stage, named as in ``contract.registry``; the results are read from the
project's containers, in pipeline order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from contract import registry
from olivepress.docker.build import REPO

if TYPE_CHECKING:
    from rich.console import Console

    import docker


@dataclass
class StageResult:
    stage: str
    state: str  # "exited", "created" (never started), "running", "missing"
    exit_code: int | None
    seconds: float | None


def _parse_time(value: str) -> datetime | None:
    if not value or value.startswith("0001-"):
        return None
    # Docker gives nanoseconds; fromisoformat takes microseconds.
    head, _, frac = value.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac or '0')[:6]}+00:00")


def stage_results(client: docker.DockerClient, project: str) -> list[StageResult]:
    """Each stage's container state and exit code in a compose project, in pipeline order."""
    found: dict[str, Any] = {}
    for container in client.containers.list(all=True, filters={"label": f"com.docker.compose.project={project}"}):
        found[container.labels.get("com.docker.compose.service", "")] = container
    results = []
    for stage in registry.NAMES:
        container = found.get(stage)
        if container is None:
            results.append(StageResult(stage, "missing", None, None))
            continue
        state = container.attrs["State"]
        start, end = _parse_time(state.get("StartedAt", "")), _parse_time(state.get("FinishedAt", ""))
        seconds = (end - start).total_seconds() if start and end and end >= start else None
        status = state.get("Status", "unknown")
        results.append(StageResult(stage, status, state.get("ExitCode") if status == "exited" else None, seconds))
    return results


def compose_files(cpu: bool, extra: Sequence[Path], project_dir: Path) -> list[Path]:
    """compose.yaml, compose.cpu.yaml on a machine without a GPU, then the user's own files on top."""
    files = [project_dir / "compose.yaml"]
    if cpu:
        files.append(project_dir / "compose.cpu.yaml")
    return [*files, *extra]


def project_dir() -> Path:
    """Where compose.yaml is: the working directory if it has one, else this checkout."""
    for candidate in (Path.cwd(), REPO):
        if (candidate / "compose.yaml").is_file():
            return candidate
    raise click.ClickException("No compose.yaml here: run from a clone of olivepress (or pass --project-dir).")


def report(results: Sequence[StageResult], console: Console, wall: float, compose_code: int, logs_hint: str) -> int:
    """Print the per-stage table; return the exit code for the whole run."""
    from rich.table import Table

    table = Table("stage", "result", "seconds", title=f"pipeline ({wall:.0f} s)")
    failed: StageResult | None = None
    for r in results:
        if failed is not None or r.state in ("created", "missing"):
            why = f"not run ({failed.stage} failed)" if failed else "not run"
            table.add_row(r.stage, f"[yellow]{why}[/]", "")
            continue
        if r.state == "exited" and r.exit_code == 0:
            table.add_row(r.stage, "[green]ok[/]", f"{r.seconds:.1f}" if r.seconds is not None else "")
        else:
            failed = r
            what = f"exit {r.exit_code}" if r.state == "exited" else r.state
            table.add_row(r.stage, f"[red]failed ({what})[/]", f"{r.seconds or 0:.1f}")
    console.print(table)
    if failed is not None:
        later = [r.stage for r in results[results.index(failed) + 1 :]]
        console.print(
            f"[red]Stage {failed.stage} failed (exit {failed.exit_code})"
            + (f"; {', '.join(later)} did not run" if later else "")
            + ".[/]",
        )
        console.print(f"Its log: {logs_hint} logs {failed.stage}", soft_wrap=True)
        return failed.exit_code or 1
    if any(r.state != "exited" for r in results) or compose_code != 0:
        console.print(f"[red]docker compose exited {compose_code} before every stage finished.[/]")
        return compose_code or 1
    return 0
