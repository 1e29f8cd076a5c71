"""runtime.serve: the OpenAI-compatible server, started as a user starts it and queried with the real openai client."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parent.parent


class Server:
    """`olivepress serve` in a subprocess on a free port; the URL comes from its ready line."""

    def __init__(self, model_dir: Path, *args: str) -> None:
        cmd = [sys.executable, "-m", "olivepress.cli", "serve", "--model-dir", str(model_dir), "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
        self.lines: list[str] = []
        deadline = time.monotonic() + 60
        self.url = None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            found = re.search(r"on (http://\S+/v1)", line)
            if found:
                self.url = found.group(1)
                break
        if self.url is None:
            self.stop()
            raise AssertionError("the server did not start:\n" + "".join(self.lines))
        # Keep draining stderr so the server never blocks on a full pipe.
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()
        self.client = openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=60)

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(tiny_run):
    s = Server(tiny_run / "optimize")
    yield s
    s.stop()


def ask(client, model: str, text: str = "Where should I eat in Rome?", **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kwargs)


def post(url: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_health_and_models_list_base_and_every_adapter(server):
    with urllib.request.urlopen(f"{server.root}/health", timeout=10) as response:
        assert response.status == 200 and json.load(response)["status"] == "ok"
    assert [m.id for m in server.client.models.list()] == ["base", "travel"]


def test_non_streaming_completion_has_text_usage_and_a_finish_reason(server):
    answer = ask(server.client, "travel", max_tokens=12)
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and answer.model == "travel"
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("length", "stop")
    assert answer.usage.completion_tokens <= 12 and answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_streaming_gives_the_same_greedy_text_in_chunks(server):
    whole = ask(server.client, "travel", max_tokens=12).choices[0].message.content
    chunks = list(ask(server.client, "travel", max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (
        ["length"],
        ["stop"],
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 12


def test_the_model_name_picks_the_adapter(server):
    on = ask(server.client, "travel", max_tokens=16).choices[0].message.content
    off = ask(server.client, "base", max_tokens=16).choices[0].message.content
    assert on != off
    assert ask(server.client, "none", max_tokens=16).choices[0].message.content == off  # an alias of base
    assert ask(server.client, "travel", max_tokens=16).choices[0].message.content == on  # greedy: reproducible


def test_the_same_answer_as_infer_for_the_same_prompt(server, tiny_run):
    from runtime.engine import Engine

    engine = Engine(tiny_run / "optimize")
    local = engine.generate("Hi", "travel", 10).text
    assert ask(server.client, "travel", "Hi", max_tokens=10).choices[0].message.content == local


def test_stop_strings_cut_the_answer(server):
    full = ask(server.client, "travel", max_tokens=16).choices[0].message.content
    words = full.split()
    assert len(words) > 3
    stop = words[2]
    cut = ask(server.client, "travel", max_tokens=16, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.index(stop)]
    assert cut.finish_reason == "stop"


def test_sampling_with_a_seed_is_reproducible(server):
    kwargs = {"max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    first = ask(server.client, "travel", **kwargs).choices[0].message.content
    assert first.strip() and ask(server.client, "travel", **kwargs).choices[0].message.content == first


def test_unknown_model_is_a_400_naming_the_choices(server):
    with pytest.raises(openai.BadRequestError) as error:
        ask(server.client, "cooking")
    assert error.value.status_code == 400
    assert "no model named 'cooking'" in str(error.value) and "travel" in str(error.value)


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"{not json", "not valid JSON"),
        (b'["a list"]', "JSON object"),
        (b'{"model": "base", "messages": []}', "messages"),
        (b'{"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max_tokens"),
        (b'{"model": "base", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "temperature"),
    ],
)
def test_bad_requests_are_400_with_an_openai_error_object(server, body, fragment):
    status, payload = post(f"{server.url}/chat/completions", body)
    assert status == 400
    assert fragment in payload["error"]["message"] and payload["error"]["type"] == "invalid_request_error"


def test_unknown_routes_are_404(server):
    status, payload = post(f"{server.url}/completions", b"{}")
    assert status == 404 and "no route" in payload["error"]["message"]


def test_a_full_server_answers_429_with_retry_after(tiny_run):
    """One slot, held by a slow stream: a second request is refused at once, and served once the slot frees."""
    slow = Server(tiny_run / "optimize", "--max-concurrent", "1", "--token-delay-ms", "100")
    try:
        stream = ask(slow.client, "travel", max_tokens=30, stream=True)
        next(iter(stream))  # the first chunk: the generation holds the slot now
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as error:
            ask(slow.client, "base", max_tokens=2)
        assert time.monotonic() - started < 2  # refused, not queued
        assert error.value.status_code == 429 and error.value.response.headers["Retry-After"] == "1"
        with urllib.request.urlopen(f"{slow.root}/health", timeout=10) as response:  # health still answers
            assert json.load(response)["active"] == 1
        stream.close()  # the client goes away: the server stops generating and frees the slot
        deadline = time.monotonic() + 10
        while True:
            try:
                assert ask(slow.client, "base", max_tokens=2).choices[0].message.content is not None
                break
            except openai.RateLimitError:
                assert time.monotonic() < deadline, "the slot was never freed"
                time.sleep(0.2)
    finally:
        slow.stop()


def test_two_slots_run_two_adapters_at_once_with_the_same_answers(tiny_run, server):
    """One model shared by concurrent generations, each with its own adapter: answers match the sequential ones."""
    expected = {m: ask(server.client, m, max_tokens=24).choices[0].message.content for m in ("base", "travel")}
    wide = Server(tiny_run / "optimize", "--max-concurrent", "2")
    got, errors = [], []

    def one(model: str) -> None:
        try:
            got.append((model, ask(wide.client, model, max_tokens=24).choices[0].message.content))
        except Exception as exc:  # surfaced below, with the others
            errors.append(repr(exc))

    try:
        for _ in range(3):
            threads = [threading.Thread(target=one, args=(m,)) for m in ("base", "travel")]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        wide.stop()
    assert not errors, errors
    assert len(got) == 6 and all(text == expected[model] for model, text in got)


def test_a_folder_that_is_not_a_model_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "olivepress.cli", "serve", "--model-dir", str(tmp_path), "--port", "0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 2 and "not an optimized model folder" in result.stderr


def test_the_image_entrypoints_run_infer_serve_and_chat():
    for module in ("stages.infer", "runtime.serve", "runtime.chat"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO).stdout
        assert f"Usage: python -m {module}" in out


def test_a_merged_build_serves_only_its_adapter_and_with_the_threads_asked_for(tiny_run, tmp_path):
    from click.testing import CliRunner

    from stages import optimize

    for stage in ("quantize", "finetune"):
        (tmp_path / stage).symlink_to(tiny_run / stage)
    result = CliRunner().invoke(optimize.command, ["--home", str(tmp_path), "--adapter-mode", "merged"])
    assert result.exit_code == 0, result.output
    merged = Server(tmp_path / "optimize", "--threads", "1")
    try:
        assert [m.id for m in merged.client.models.list()] == ["travel"]
        with pytest.raises(openai.BadRequestError, match="no model named 'base'"):
            ask(merged.client, "base", max_tokens=4)
        assert ask(merged.client, "travel", max_tokens=8).choices[0].message.content
    finally:
        merged.stop()
