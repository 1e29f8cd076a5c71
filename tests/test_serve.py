"""runtime.serve: the OpenAI-compatible server, started as a user starts it and queried with the real openai client."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
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


USER_X = '"messages": [{"role": "user", "content": "x"}]'


@pytest.mark.parametrize(
    "body, fragment, param",
    [
        (b"{not json", "not valid JSON", None),
        (b'["a list"]', "JSON object", None),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON", None),  # nesting beyond the JSON reader's recursion
        (b'{"model": "base", "messages": []}', "messages", "messages"),
        (f'{{"model": "base", {USER_X}, "max_tokens": 0}}'.encode(), "max_tokens", "max_tokens"),
        (f'{{"model": "base", {USER_X}, "temperature": "hot"}}'.encode(), "temperature", "temperature"),
        (f'{{"model": "base", {USER_X}, "temperature": NaN}}'.encode(), "temperature", "temperature"),
        (f'{{"model": "base", {USER_X}, "seed": {2**70}}}'.encode(), "seed", "seed"),
        (f'{{"model": "base", {USER_X}, "stream": true, "stream_options": 5}}'.encode(), "stream_options",
         "stream_options"),
        (f'{{"model": "base", {USER_X}, "max_tokens": {2**70}}}'.encode(), "max_tokens", "max_tokens"),
        (b'{"model": "base", "messages": [{"role": "user", "content": {"x": 1}}]}', "content", "messages[0].content"),
    ],
)  # fmt: skip
def test_bad_requests_are_400_with_an_openai_error_object_naming_the_field(server, body, fragment, param):
    status, payload = post(f"{server.url}/chat/completions", body)
    assert status == 400, payload
    assert fragment in payload["error"]["message"] and payload["error"]["type"] == "invalid_request_error"
    assert payload["error"]["param"] == param


def test_an_over_long_prompt_is_a_400_on_messages_and_a_huge_body_a_413(server):
    status, payload = post(f"{server.url}/chat/completions", json.dumps(
        {"model": "base", "messages": [{"role": "user", "content": "word " * 5000}]}).encode())  # fmt: skip
    assert status == 400 and payload["error"]["param"] == "messages"
    assert payload["error"]["type"] == "invalid_request_error" and "context" in payload["error"]["message"]
    status, payload = post(f"{server.url}/chat/completions", b" " * (5 * 1024 * 1024))
    assert status == 413 and payload["error"]["type"] == "invalid_request_error"


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


def stream_request(port: int, body: dict, timeout: float = 120) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on its own connection: (status, headers, the whole body); a reset raises."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.msg, response.read()
    finally:
        conn.close()


def port_of(server: Server) -> int:
    return int(server.root.rsplit(":", 1)[1])


def test_a_burst_of_64_streams_on_one_slot_gets_only_200s_and_429s_and_no_reset(tiny_run):
    """Issue 13: 64 streaming requests at once against --max-concurrent 1; every connection gets an answer."""
    busy = Server(tiny_run / "optimize", "--max-concurrent", "1", "--token-delay-ms", "20")
    body = {"model": "travel", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16, "stream": True}
    start, results, failures = threading.Barrier(64), [], []

    def one() -> None:
        start.wait()
        try:
            results.append(stream_request(port_of(busy), body))
        except OSError as exc:  # a reset or refused connection
            failures.append(repr(exc))

    try:
        threads = [threading.Thread(target=one) for _ in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
    finally:
        busy.stop()
    assert not failures, failures
    statuses = [status for status, _, _ in results]
    assert len(statuses) == 64 and set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses
    for status, headers, data in results:
        if status == 429:
            assert headers["Retry-After"] == "1" and json.loads(data)["error"]["type"] == "rate_limit_error"
        else:
            assert data.rstrip().endswith(b"data: [DONE]")


def test_connections_are_kept_alive(server):
    conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=30)
    body = json.dumps({"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    sockets = []
    for path in ("/health", "/v1/models"):
        conn.request("GET", path)
        assert conn.getresponse().read() and conn.sock is not None
        sockets.append(conn.sock)
    for stream in (False, True):
        conn.request("POST", "/v1/chat/completions", json.dumps({**json.loads(body), "stream": stream}))
        response = conn.getresponse()
        assert response.status == 200 and response.read()
        sockets.append(conn.sock)
    conn.close()
    assert len({id(s) for s in sockets}) == 1  # one TCP connection served all four


def test_requests_that_arrive_together_are_batched_and_answer_as_alone(server):
    """Four greedy requests at once with one adapter decode as one batch; each answer is the one it gets alone."""
    prompt = "Where should I eat in Rome?"
    alone = ask(server.client, "travel", prompt, max_tokens=16).choices[0].message.content
    before = metrics_of(server).get("olivepress_batch_size", {})
    answers, start = [], threading.Barrier(4)

    def one() -> None:
        start.wait()
        answers.append(ask(server.client, "travel", prompt, max_tokens=16).choices[0].message.content)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert answers == [alone] * 4
    after = metrics_of(server)["olivepress_batch_size"]
    batched = sum(after[k] - before.get(k, 0) for k in after if k[0] == "_count") - sum(
        after[k] - before.get(k, 0) for k in after if k == ("_bucket", "1")
    )
    assert batched > 0, "no step decoded more than one sequence"


def metrics_of(server: Server) -> dict[str, dict[tuple, float]]:
    """GET /metrics read by prometheus_client's own parser: {family: {(sample suffix, label values...): value}}."""
    parser = pytest.importorskip("prometheus_client.parser")
    with urllib.request.urlopen(f"{server.root}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            suffix = sample.name.removeprefix(family.name)
            labels = tuple(v for k, v in sorted(sample.labels.items()) if k != "le")
            key = (suffix or "_value", *labels, *([sample.labels["le"]] if "le" in sample.labels else []))
            out.setdefault(family.name, {})[key] = sample.value
    return out


def test_metrics_count_requests_tokens_and_latency_per_adapter(tiny_run):
    fresh = Server(tiny_run / "optimize")
    try:
        ask(fresh.client, "travel", max_tokens=6)
        list(ask(fresh.client, "base", max_tokens=5, stream=True))
        with pytest.raises(openai.BadRequestError):
            ask(fresh.client, "travel", max_tokens=0)
        m = metrics_of(fresh)
    finally:
        fresh.stop()
    requests = m["olivepress_requests"]
    assert requests[("_total", "travel", "200")] == 1 and requests[("_total", "base", "200")] == 1
    assert requests[("_total", "travel", "400")] == 1
    assert m["olivepress_generation_tokens"][("_total", "travel")] == 6
    assert m["olivepress_generation_tokens"][("_total", "base")] == 5
    assert m["olivepress_prompt_tokens"][("_total", "travel")] > 0
    for model, tokens in (("travel", 6), ("base", 5)):
        assert m["olivepress_time_to_first_token_seconds"][("_count", model)] == 1
        assert m["olivepress_time_to_first_token_seconds"][("_bucket", model, "+Inf")] == 1
        assert m["olivepress_time_per_output_token_seconds"][("_count", model)] == tokens - 1
        assert m["olivepress_request_duration_seconds"][("_count", model)] == 1
        assert m["olivepress_queue_length"][("_value", model)] == 0
        assert m["olivepress_running_requests"][("_value", model)] == 0
    assert m["olivepress_batch_size"][("_count",)] >= 11


def test_the_log_lines_carry_real_values(tiny_run):
    """Verbose: one line per answer with its counts and times, one per client that left mid-stream."""
    logged = Server(tiny_run / "optimize", "-v", "--token-delay-ms", "50")
    try:
        ask(logged.client, "travel", max_tokens=4)
        stream = ask(logged.client, "base", max_tokens=40, stream=True)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
        time.sleep(1.5)
    finally:
        logged.stop()
    text = "".join(logged.lines)
    assert re.search(r"travel: \d+ prompt \+ 4 tokens in \d+\.\d\d s \(first token \d+ ms, length\)", text), text
    assert re.search(r"base: client disconnected after \d+ tokens, \d+\.\d\d s", text), text
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in text
    assert "None" not in text


def test_sigterm_ends_streams_cleanly_within_the_grace_period_and_exits_0(tiny_run):
    slow = Server(tiny_run / "optimize", "--token-delay-ms", "100", "--shutdown-timeout", "1")
    port = port_of(slow)
    result: dict = {}

    def reader() -> None:
        result["response"] = stream_request(port, {"model": "travel", "max_tokens": 200, "stream": True,
                                                   "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(1.0)  # the stream is under way
    started = time.monotonic()
    slow.proc.send_signal(signal.SIGTERM)
    assert slow.proc.wait(timeout=15) == 0
    elapsed = time.monotonic() - started
    thread.join(timeout=10)
    status, _, data = result["response"]
    events = [line.removeprefix(b"data: ") for line in data.split(b"\n\n") if line.startswith(b"data: ")]
    last = json.loads(events[-1])
    assert status == 200 and last["error"]["type"] == "server_error" and "shutting down" in last["error"]["message"]
    assert any(b'"content"' in e for e in events[1:-1])  # it was streaming when told to stop
    assert elapsed < 1 + 5, elapsed  # the grace period, then a prompt exit
    with pytest.raises(OSError):  # nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_sigterm_lets_a_short_answer_finish(tiny_run):
    slow = Server(tiny_run / "optimize", "--token-delay-ms", "100", "--shutdown-timeout", "5")
    result: dict = {}
    body = {"model": "travel", "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    thread = threading.Thread(target=lambda: result.setdefault("r", stream_request(port_of(slow), body)))
    thread.start()
    time.sleep(0.4)
    slow.proc.send_signal(signal.SIGTERM)
    assert slow.proc.wait(timeout=15) == 0
    thread.join(timeout=10)
    status, _, data = result["r"]
    assert status == 200 and data.rstrip().endswith(b"data: [DONE]") and b'"finish_reason": "length"' in data


def test_a_request_over_its_timeout_ends_with_a_timeout_error(tiny_run):
    slow = Server(tiny_run / "optimize", "--token-delay-ms", "100", "--request-timeout", "1")
    try:
        status, _, data = stream_request(port_of(slow), {"model": "travel", "max_tokens": 100, "stream": True,
                                                         "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
        last = [line for line in data.split(b"\n\n") if line.startswith(b"data: ")][-1]
        assert status == 200 and json.loads(last[6:])["error"]["type"] == "timeout"
        status, _, data = stream_request(port_of(slow), {"model": "travel", "max_tokens": 100,
                                                         "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
        assert status == 504 and json.loads(data)["error"]["type"] == "timeout"
        with urllib.request.urlopen(f"{slow.root}/health", timeout=10) as response:
            assert json.load(response)["active"] == 0  # both freed their place
    finally:
        slow.stop()


def test_the_chat_page_is_one_offline_file(server):
    with urllib.request.urlopen(f"{server.root}/", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/html")
        page = response.read().decode()
    assert "/v1/chat/completions" in page and "/v1/models" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched from elsewhere
    assert "<script src" not in page and "<link" not in page
