"""What olivepress adds on top of onnxruntime-genai: decode tokens/s and time to first token of

  (a) the bare onnxruntime-genai loop (the lab's app.py on today's API: append_tokens, generate_next_token),
  (b) ``runtime.engine.Engine.generate`` (what ``olivepress infer`` runs),
  (c) ``olivepress serve`` over HTTP with streaming (a subprocess; the client reads the SSE chunks as they come),

on the same model folder, the same prompt, adapter and greedy length, in one run; the three are interleaved
per repeat so drift in the machine's speed hits them alike. Prints a table per model folder and writes
benchmarks/results/serve_overhead.md with the command, the machine and the versions.

    python benchmarks/serve_overhead.py --model-dir artifacts/optimize [--model-dir other/optimize] --repeats 5
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from contract import model_folder  # noqa: E402
from contract.model_folder import BASE  # noqa: E402
from runtime.engine import Engine, og_config  # noqa: E402

PAUSE_S = 0.5
PROMPT = "What is the best time of year to visit Paris, and what should I pack?"


@dataclass
class Run:
    tokens: int
    ttft_ms: float
    decode_tps: float


def _timing(start: float, stamps: list[float], tokens: int | None = None) -> Run:
    """``stamps``: when each non-empty piece of text arrived; ``tokens``: how many tokens were generated.

    A token whose text is still incomplete (part of a word or of a UTF-8 character) decodes to nothing and the
    server sends no event for it, so every path is timed on the same visible text: TTFT is the time to the first
    text, decode the tokens after it over the time from the first text to the last.
    """
    n = len(stamps) if tokens is None else tokens
    span = stamps[-1] - stamps[0] if stamps else 0.0
    decode = (n - 1) / span if n > 1 and span > 0 else 0.0
    return Run(n, (stamps[0] - start) * 1000 if stamps else 0.0, decode)


def bare(model, tokenizer, adapters, adapter: str, ids: list[int], max_new: int) -> Run:  # noqa: ANN001
    """The lab's loop, as onnxruntime-genai 0.14 spells it."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_new, do_sample=False)
    generator = og.Generator(model, params)
    if adapter != BASE:
        generator.set_active_adapter(adapters, adapter)
    stream = tokenizer.create_stream()
    stamps, tokens = [], 0
    start = time.perf_counter()
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
        tokens += 1
        if stream.decode(generator.get_next_tokens()[0]):
            stamps.append(time.perf_counter())
    return _timing(start, stamps, tokens)


def engine_run(engine: Engine, adapter: str, max_new: int) -> Run:
    stamps: list[float] = []
    start = time.perf_counter()
    answer = engine.generate(PROMPT, adapter, max_new, echo=lambda piece: piece and stamps.append(time.perf_counter()))
    return _timing(start, stamps, answer.new_tokens)


def streamed_events(port: int, path: str, body: dict) -> Iterator[tuple[float, dict]]:
    """POST ``body`` as JSON to a local server and yield (time.perf_counter() of its arrival, event) for each
    server-sent ``data:`` event with a JSON object."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        for raw in response:
            line = raw.strip()
            if line.startswith(b"data: {"):
                yield time.perf_counter(), json.loads(line[6:])
    finally:
        conn.close()


def streamed_chat(port: int, model: str, prompt: str, max_tokens: int) -> tuple[float, list[float], int | None]:
    """One streamed chat completion from an OpenAI-compatible server: when it was sent, the arrival time of each
    event with content, and the completion tokens its usage reports (None without one)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    stamps, tokens = [], None
    start = time.perf_counter()
    for now, event in streamed_events(port, "/v1/chat/completions", body):
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        if event["choices"] and event["choices"][0]["delta"].get("content"):
            stamps.append(now)
    return start, stamps, tokens


def server_run(port: int, model: str, max_new: int) -> Run:
    return _timing(*streamed_chat(port, model, PROMPT, max_new))


def settled(run: Callable[[], Run]) -> Run:
    """Run after a pause: onnxruntime's thread pools spin for a while after their last work, and the path measured
    just before (in this process or the server's) must not take cores from this one."""
    time.sleep(PAUSE_S)
    return run()


def start_server(folder: Path) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "runtime.serve", "--model-dir", str(folder), "--port", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        found = re.search(r"http://[^:]+:(\d+)/v1", line)
        if found:
            return proc, int(found.group(1))
    raise RuntimeError("the server did not start")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        pass
    mem = ""
    try:
        kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    load = f", load average {os.getloadavg()[0]:.2f} at start" if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} logical cores{mem}, {platform.system()} {platform.release()}{load}"


def versions(*names: str) -> str:
    """Python's and each installed package's version (a package not installed is left out)."""
    found = []
    for name in names or ("onnxruntime-genai", "onnxruntime", "numpy"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join([f"Python {platform.python_version()}", *found])


def describe(folder: Path) -> str:
    config = json.loads((folder / "model" / "genai_config.json").read_text())["model"]
    decoder = config["decoder"]
    size = sum(f.stat().st_size for f in (folder / "model").glob("model.onnx*")) / 1e6
    return (
        f"hidden {decoder['hidden_size']}, {decoder['num_hidden_layers']} layers, "
        f"{decoder['num_attention_heads']} heads, vocab {config['vocab_size']}; model.onnx* {size:.1f} MB"
    )


def measure(folder: Path, repeats: int, max_new: int, adapter: str | None) -> tuple[str, list[tuple[str, list[Run]]]]:
    import onnxruntime_genai as og

    engine = Engine(folder)  # olivepress's default threads: 0, one per core
    adapter = engine.resolve(adapter) if adapter else (engine.adapter_names[0] if engine.adapter_names else BASE)
    # The bare loop gets its own model, as app.py would load it, with the same thread setting as the Engine and the
    # server: unset, onnxruntime-genai runs one thread, and the comparison would be of thread counts.
    model = og.Model(og_config(folder / "model", 0))
    tokenizer = og.Tokenizer(model)
    adapters = og.Adapters(model)
    for name in engine.adapter_names:
        adapters.load(str(model_folder.adapter_file(folder, name)), name)
    ids = engine.prompt_tokens(PROMPT)
    proc, port = start_server(folder)
    results: dict[str, list[Run]] = {"bare onnxruntime-genai loop": [], "Engine.generate": [], "serve (HTTP, SSE)": []}
    try:
        for i in range(repeats + 1):  # the first round warms every path up and is dropped
            runs = (
                settled(lambda: bare(model, tokenizer, adapters, adapter, ids, max_new)),
                settled(lambda: engine_run(engine, adapter, max_new)),
                settled(lambda: server_run(port, adapter, max_new)),
            )
            if i:
                for key, run in zip(results, runs, strict=True):
                    results[key].append(run)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return adapter, list(results.items())


def table(rows: list[tuple[str, list[Run]]]) -> list[str]:
    """Medians, and the best run: on a shared machine the best is the least disturbed by other work."""
    lines = [
        "| path | tokens | TTFT ms (median) | decode tokens/s (median) | best | vs bare (median) | vs bare (best) |",
        "|---|---|---|---|---|---|---|",
    ]
    base = [r.decode_tps for r in rows[0][1]]
    if not min(base):
        raise click.UsageError("a run showed too little text to time its decode; raise --max-new-tokens")
    for name, runs in rows:
        tps = [r.decode_tps for r in runs]
        med, best = statistics.median(tps), max(tps)
        lines.append(
            f"| {name} | {runs[0].tokens} | {statistics.median(r.ttft_ms for r in runs):.1f} | {med:.1f} | "
            f"{best:.1f} | {med / statistics.median(base):.3f}x | {best / max(base):.3f}x |"
        )
    return lines


@click.command()
@click.option("--model-dir", "folders", multiple=True, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--repeats", default=5, show_default=True)
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--adapter", default=None, help=f"An adapter's name or '{BASE}' [default: the first adapter].")
@click.option("--note", "notes", multiple=True, help="A paragraph for the results file (repeatable).")
@click.option(
    "--output", default=REPO / "benchmarks" / "results" / "serve_overhead.md", type=click.Path(path_type=Path)
)
def main(
    folders: tuple[Path, ...],
    repeats: int,
    max_new_tokens: int,
    adapter: str | None,
    notes: tuple[str, ...],
    output: Path,
) -> None:
    """Decode tokens/s and time to first token: bare onnxruntime-genai vs Engine.generate vs serve."""
    shown, skip = [], False
    for arg in sys.argv[1:]:  # the notes are the file's text, not part of the command worth showing
        if not skip and arg != "--note" and not arg.startswith("--note="):
            shown.append(arg)
        skip = arg == "--note"
    command = "python benchmarks/serve_overhead.py " + shlex.join(shown)
    out = [
        "# Serving overhead: bare onnxruntime-genai vs olivepress infer vs olivepress serve",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Versions: {versions()}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"Greedy, {max_new_tokens} new tokens at most, prompt {PROMPT!r} through the chat template; medians of "
        f"{repeats} repeats after one warm-up round, the three paths interleaved. TTFT: from the call (or the HTTP "
        "request) to the first non-empty text (a token that is part of a word or of a UTF-8 character decodes to "
        "nothing until the rest comes, and the server sends nothing for it); decode: the tokens after the first "
        "text over the time from the first text to the last. The server runs in its own process on the same cores; "
        "the client reads its stream with http.client. All three run one onnxruntime thread per core "
        "(`--threads 0`, olivepress's default).",
        "",
    ]
    for folder in folders:
        chosen, rows = measure(folder, repeats, max_new_tokens, adapter)
        section = [f"## {folder}", "", f"Model: {describe(folder)}; adapter `{chosen}`.", "", *table(rows), ""]
        click.echo("\n".join(section))
        out += section
    for note in notes:
        out += [note, ""]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(out))
    click.echo(f"wrote {output}")


if __name__ == "__main__":
    main()
