"""Shared fixtures: one tiny pipeline run (the README's main job) that several test modules read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_STEPS = "20"


def olivepress(*args: str, home: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run the launcher as a user does, in a fresh process."""
    full_env = dict(os.environ, OLIVEPRESS_HOME=str(home), **(env or {}))
    result = subprocess.run(
        [sys.executable, "-m", "olivepress.cli", *args], capture_output=True, text=True, env=full_env, cwd=REPO
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"olivepress {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The volume after `olivepress run` on the embedded default (tiny model, GPTQ on CPU)."""
    home = tmp_path_factory.mktemp("tiny-run")
    olivepress("run", "--max-steps", TINY_STEPS, home=home)
    return home


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the tiny pipeline's volume is in the `slow` tier."""
    for item in items:
        if "tiny_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
