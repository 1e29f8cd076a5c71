"""contract.exits: one exit-code table, shown by the README and --help, and errors that end as one message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from contract import exits, registry

REPO = Path(__file__).resolve().parent.parent


def test_each_outcome_has_its_own_code_and_the_readme_and_help_show_the_table():
    assert len({int(code) for code in exits.Exit}) == len(exits.Exit) == len(exits.TABLE)
    assert exits.markdown() in (REPO / "README.md").read_text()
    shown = subprocess.run(
        [sys.executable, "-m", "olivepress.cli", "--help"], capture_output=True, text=True, cwd=REPO
    ).stdout
    for code, meaning in exits.TABLE.items():
        assert f"{int(code):<4}{meaning[:40]}" in shown


@pytest.mark.parametrize(
    ("error", "code", "words"),
    [
        (KeyboardInterrupt(), 130, "interrupted"),
        (FileNotFoundError(2, "No such file or directory", "/nowhere/data.jsonl"), 2, "/nowhere/data.jsonl"),
        (RuntimeError("the kernel said no"), 1, "the kernel said no"),
    ],
)
def test_whatever_escapes_a_command_is_one_message_with_its_code(tmp_path, error, code, words):
    result = subprocess.run(
        [sys.executable, "-c", "import sys, test_exits as t; t.run_failing(sys.argv[1], sys.argv[2])", str(tmp_path),
         type(error).__name__],
        capture_output=True, text=True, cwd=REPO / "tests",
    )  # fmt: skip
    assert result.returncode == code, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr
    if code == 1:
        assert "Traceback" in (tmp_path / "demo.failed.log").read_text()


def run_failing(folder: str, kind: str) -> None:
    """The command of the test above, in a fresh process, as a user meets it."""
    error = {
        "KeyboardInterrupt": KeyboardInterrupt(),
        "FileNotFoundError": FileNotFoundError(2, "No such file or directory", "/nowhere/data.jsonl"),
        "RuntimeError": RuntimeError("the kernel said no"),
    }[kind]

    @click.command()
    def failing() -> None:
        with exits.reported("demo", Path(folder) / "demo.failed.log"):
            raise error

    failing([])


@pytest.mark.parametrize(("body", "code"), [("pass", 0), ("raise BadInput('no such rows')", 2)])
def test_a_stage_process_ends_with_its_code_and_everything_it_wrote(tmp_path, body, code):
    """The stage entrypoint skips the interpreter's teardown: what the stage printed and logged must still be out."""
    script = f"""
import logging, click
from contract.exits import BadInput
from stages import common
logging.basicConfig(filename={str(tmp_path / "log.txt")!r}, level=logging.INFO)
@click.command("probe")
def probe():
    logging.getLogger("olivepress").info("logged before the end")
    print("printed without a newline", end="")
    {body}
common.entrypoint(probe)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parent.parent
    )
    assert done.returncode == code, done.stderr
    assert "printed without a newline" in done.stdout
    assert "logged before the end" in (tmp_path / "log.txt").read_text()
    if code:
        assert "no such rows" in done.stderr and "Traceback" not in done.stderr


def test_a_stage_started_ahead_of_its_turn_waits_for_it_and_ends_if_the_run_stops(tmp_path):
    """`olivepress run` starts the next stage's process early: it must import, then do nothing until its turn."""
    script = f"""
import click
from stages import common
@click.command("probe")
def probe():
    open({str(tmp_path / "ran")!r}, "w").close()
common.entrypoint(probe, warm_imports=("json", "no_such_module_here"))
"""
    env = {**os.environ, registry.WAIT_FOR_TURN: "1"}
    root = REPO
    waiting = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, env=env, cwd=root)
    with pytest.raises(subprocess.TimeoutExpired):
        waiting.wait(timeout=2)
    assert not (tmp_path / "ran").exists()
    waiting.communicate(f"{registry.TURN}\n".encode(), timeout=60)
    assert waiting.returncode == 0 and (tmp_path / "ran").exists()
    (tmp_path / "ran").unlink()
    stopped = subprocess.run([sys.executable, "-c", script], input=b"", env=env, cwd=root, timeout=60)
    assert stopped.returncode == exits.Exit.INTERRUPTED and not (tmp_path / "ran").exists()
