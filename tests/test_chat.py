"""runtime.chat: the terminal chat, driven through stdin, on a model folder and through a running server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from contract.model_folder import BASE
from runtime.engine import Engine

REPO = Path(__file__).resolve().parent.parent


def chat(*args: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "olivepress.cli", "chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


@pytest.fixture(scope="module")
def expected(tiny_run) -> dict[str, str]:
    """What one greedy turn says with each model, from the engine directly."""
    engine = Engine(tiny_run / "optimize")
    ids = engine.chat_tokens([{"role": "user", "content": "Hello there"}])
    out = {}
    for name, adapter in (("travel", "travel"), ("base", BASE)):
        pieces = [p for t, p in engine.stream(ids, adapter, 8) if t not in engine.eos_token_ids]
        out[name] = "".join(pieces)
    return out


def test_chat_on_a_model_folder_answers_each_line_and_switches_adapter(tiny_run, expected):
    run = chat(
        "--model-dir", str(tiny_run / "optimize"), "--max-tokens", "8",
        stdin="Hello there\n/reset\n/model base\nHello there\n/models\n",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == expected["travel"] and lines[1] == expected["base"]
    assert lines[2] == "base, travel"
    assert "chatting with travel" in run.stderr and "(now base)" in run.stderr
    assert expected["travel"] != expected["base"]


def test_chat_keeps_the_conversation(tiny_run, expected):
    run = chat("--model-dir", str(tiny_run / "optimize"), "--max-tokens", "8", stdin="Hello there\nHello there\n")
    assert run.returncode == 0, run.stderr
    first, second = run.stdout.splitlines()[:2]
    assert first == expected["travel"]
    assert second != first  # the second turn sees the first one in its prompt


def test_chat_through_a_running_server(tiny_run, expected):
    from test_serve import Server

    server = Server(tiny_run / "optimize")
    try:
        run = chat("--url", server.root, "--max-tokens", "8", stdin="Hello there\n/reset\n/model base\nHello there\n")
    finally:
        server.stop()
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[:2] == [expected["travel"], expected["base"]]


def test_chat_with_no_server_or_unknown_model_is_a_clear_error(tiny_run):
    run = chat("--url", "http://127.0.0.1:9", stdin="hi\n")
    assert run.returncode == 1 and "no server answers at http://127.0.0.1:9/v1" in run.stderr
    run = chat("--model-dir", str(tiny_run / "optimize"), "--model", "cooking", stdin="hi\n")
    assert run.returncode == 2 and "no model named 'cooking'" in run.stderr
