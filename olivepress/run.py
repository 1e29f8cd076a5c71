"""``olivepress run``: every stage in order on this machine, each in its own process.

Each stage runs as ``python -m stages.<name>`` (what its container runs), its
console output goes to ``<home>/logs/<stage>.console.txt`` and the terminal
shows one line of progress per stage.  Settings reach the stages as the
``OLIVEPRESS_<STAGE>_<OPTION>`` variables every stage option reads.  Each
stage's process starts while the stage before it runs and imports its
libraries (seconds each for torch, transformers and Olive) before its turn.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table

from contract import lock, registry, volume
from contract.exits import Exit


def _table(states: dict[str, tuple[str, str]]) -> Table:
    table = Table.grid(padding=(0, 2))
    for stage, (state, detail) in states.items():
        mark = Spinner("dots") if state == "running" else {"done": "✓", "skipped": "=", "failed": "✗"}.get(state, "·")
        table.add_row(mark, stage, state, detail)
    return table


def start_stage_process(
    stage: str, root: Path, force: bool, env: dict[str, str], wait_for_turn: bool = False
) -> subprocess.Popen:
    """The stage in its own process (as its container runs it), holding this process's writer lock. With
    ``wait_for_turn`` it imports its libraries and waits until ``follow_stage_process`` gives it its turn: started
    while the stage before it runs, its start-up overlaps that stage's work instead of following it."""
    command = [sys.executable, "-m", registry.STAGES[stage].module, "--home", str(root)] + (
        ["--force"] if force else []
    )
    held = lock.inherited_fd(root)
    if held is not None:
        env, passed = {**env, lock.FD_ENV: str(held)}, (held,)
    else:
        passed = ()
    if wait_for_turn:
        env = {**env, registry.WAIT_FOR_TURN: "1"}
    return subprocess.Popen(
        command,
        stdin=subprocess.PIPE if wait_for_turn else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        pass_fds=passed,
        bufsize=0,
    )


def follow_stage_process(
    process: subprocess.Popen, console_log: Path, progress: Callable[[str], None]
) -> tuple[int, Path]:
    """Give a waiting stage process its turn, then follow it to the end: its output goes to ``console_log`` and
    each line (or progress-bar update) is also handed to ``progress``."""
    if process.stdin is not None:
        process.stdin.write(f"{registry.TURN}\n".encode())
        process.stdin.close()
    assert process.stdout is not None
    with console_log.open("wb") as out:
        pending = b""
        for chunk in iter(lambda: process.stdout.read(4096), b""):
            out.write(chunk)
            # Progress bars rewrite their line with \r; the last complete piece is the stage's latest word.
            *pieces, pending = re.split(rb"[\r\n]", pending + chunk)
            latest = next((p for p in reversed(pieces) if PROGRESS.search(p)), None)
            if latest is not None:
                progress(latest.decode("utf-8", errors="replace").strip())
    return process.wait(), console_log


def stop(process: subprocess.Popen | None) -> None:
    """End a stage process that is still waiting for its turn (the run stopped before it)."""
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()


# What counts as progress in a stage's output: a bar or count (AWQ layers, training steps, shards), a training
# log line, or olivepress's own step messages; library warnings do not.
PROGRESS = re.compile(rb"\d+/\d+|\d+%|'loss'|olivepress")


def progress_detail(line: str, width: int = 70) -> str:
    """A stage's latest output line as one short table cell (progress bars without their bar)."""
    line = re.sub(r"\|[^|]*\|", " ", line)  # tqdm's bar between the two pipes
    line = re.sub(r"\s+", " ", line).strip()
    return line if len(line) <= width else line[: width - 1] + "…"


@contextmanager
def writing(root: Path) -> Iterator[Path]:
    """The home's writer lock for the whole run, and the folder for the stages' console logs.

    A home that cannot be written is still run: every stage that finds its work done skips (a read-only copy
    of a finished volume), and the first one that has to write says so. Its console logs go to a temporary folder.
    """
    with ExitStack() as stack:
        try:
            took = stack.enter_context(lock.writer(root))
        except lock.HomeNotWritable:
            yield Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="olivepress-logs-")))
            return
        if took:
            volume.clean_leftovers(root)
        logs = root / "logs"
        logs.mkdir(exist_ok=True)
        yield logs


def _error_lines(console_log: Path, count: int = 8) -> str:
    """The stage's own error message (click prints it last, from "Error:" on), else the end of its output."""
    lines = [line for line in console_log.read_text(errors="replace").splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("Error:")]
    return "\n".join(lines[starts[-1] :] if starts else lines[-count:])


@click.command("run")
@volume.home_option("Volume root")
@click.option(
    "--model",
    help="Base model: hub id, folder, 'tiny' (the default: the embedded random-weight Phi-3) or 'tiny:NAME' (the "
    'tiny model of another family: README, "Models").',
)
@click.option(
    "--algorithm",
    type=click.Choice(["auto", "awq", "gptq", "rtn"]),
    help="Quantizer [default: auto: awq on a GPU, gptq on a CPU].",
)
@click.option(
    "--data-files", type=click.Path(exists=True), help="JSONL file, or folder of them, to calibrate and train on."
)
@click.option("--max-steps", type=click.IntRange(min=1), help="LoRA steps [default: 100].")
@click.option("--force", is_flag=True, help="Rerun every stage even if nothing changed.")
@lock.wait_option
def command(
    root: Path | None,
    model: str | None,
    algorithm: str | None,
    data_files: str | None,
    max_steps: int | None,
    force: bool,
) -> None:
    """Run quantize, finetune, optimize and infer in order, on this machine.

    With no options it runs the embedded default: the tiny random-weight
    Phi-3 model, GPTQ on the CPU, 100 LoRA steps on the travel data.  A stage
    whose inputs and parameters have not changed is skipped.  Any stage
    option can be set with its variable, e.g. OLIVEPRESS_FINETUNE_RANK=16.

    \b
    Examples:
      olivepress run
      olivepress run --model microsoft/Phi-3.5-mini-instruct --algorithm awq   # on a GPU host
      olivepress run --model tiny:llama                                       # another family's tiny model

    A second writer on the same home stops with exit code 5 (or waits, with --wait).
    """
    root = volume.home(root)
    env = dict(os.environ, **{volume.HOME_ENV: str(root)})
    data_files = str(Path(data_files).resolve()) if data_files else None  # absolute, whatever folder a stage runs in
    for name, value in {
        "model": model,
        "algorithm": algorithm,
        "data_files": data_files,
        "max_steps": max_steps,
    }.items():
        if value is not None:
            env.update(dict.fromkeys(registry.run_shortcuts()[name], str(value)))
    console = Console(stderr=True)
    states = {stage: ("waiting", "") for stage in registry.NAMES}
    upcoming: subprocess.Popen | None = None
    with writing(root) as logs, Live(_table(states), console=console, refresh_per_second=8, transient=False) as live:
        try:
            for position, stage in enumerate(registry.NAMES):
                before = volume.manifest_or_none(volume.stage_dir(root, stage))
                states[stage] = ("running", f"log: {logs / (stage + '.console.txt')}")
                live.update(_table(states))
                clock = time.perf_counter()
                process = upcoming or start_stage_process(stage, root, force, env)
                later = registry.NAMES[position + 1 : position + 2]
                upcoming = start_stage_process(later[0], root, force, env, wait_for_turn=True) if later else None

                def show(line: str, stage: str = stage) -> None:
                    states[stage] = ("running", progress_detail(line))
                    live.update(_table(states))

                try:
                    code, console_log = follow_stage_process(process, logs / f"{stage}.console.txt", show)
                except KeyboardInterrupt:
                    states[stage] = ("failed", "interrupted: nothing of this stage was published")
                    live.update(_table(states))
                    raise SystemExit(130) from None
                if code != 0:
                    states[stage] = ("failed", f"exit {code} after {time.perf_counter() - clock:.1f} s")
                    live.update(_table(states))
                    live.stop()
                    console.print()
                    console.print(f"[red]{stage} failed[/red] (exit {code}); later stages were not run.")
                    console.print(_error_lines(console_log), markup=False, highlight=False, soft_wrap=True)
                    console.print(f"Full output: {console_log}")
                    raise SystemExit(code if code in set(map(int, Exit)) else Exit.FAILED)
                after = volume.read_manifest(volume.stage_dir(root, stage))
                if after == before:
                    states[stage] = ("skipped", "unchanged since the last run")
                else:
                    states[stage] = ("done", f"{after['wall_s']:.1f} s, {after['bytes_out'] / 1e6:.1f} MB")
                live.update(_table(states))
        finally:
            stop(upcoming)
    answers = json.loads(volume.output(root, "infer", "answers").read_text())
    for answer in answers:
        click.echo(f"\n[{answer['adapter']}] {answer['prompt']}\n{answer['text'].strip()}")
    click.echo(f"\nEverything is under {root}; `olivepress status` lists it.")
