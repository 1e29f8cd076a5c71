"""The laptop speed tables: olivepress's int4 ONNX builds against llama.cpp on the same weights, on this CPU.

Builds once (each step is skipped when its output is already in --work):
  1. a random-weight Phi-3 model (configs/phi3-0.95b.json: 0.95B parameters) and the pipeline's own stages on it:
     quantize (RTN, group 128), finetune (one step of LoRA r=64 on qkv_proj + o_proj, learning rate 0.01 so the
     adapter is far from zero: only the speed counts here), and optimize in the variants below, plus the builder's
     own graph before ``fuse_qkv_lora`` ("split");
  2. llama.cpp's files from the same dequantized weights and adapter: GGUF f16 through the converter scripts of the
     llama-cpp-python sdist (its vendored llama.cpp), Q4_K_M and Q4_0 through llama.cpp's own quantizer, and the
     PEFT adapter as a LoRA GGUF; and llama.cpp's server (``llama-server``) built from the same sources.

Then, in one process:
  - one stream per engine: every engine on the same 32 prompt token ids and 128 greedy new tokens (the end-of-text
    token is held off so every run makes all 128), all loaded once and interleaved per repeat so drift in the
    machine hits them alike. Time to first token: the prompt in, to the first new token out. Decode: the other 127
    tokens over their time;
  - concurrent users (--no-servers skips it): `olivepress serve` and `llama-server --parallel 4` (continuous
    batching) on the same weights, one client and then four clients streaming at once, each a different prompt of
    about 32 tokens through olivepress's chat template (llama-server gets the same token ids), 128 new tokens each;
    the servers run one at a time, interleaved per repeat.
Prints the tables and writes the results file with the command, the machine, its load and the versions.

    pip install llama-cpp-python==0.3.36          # builds from the sdist: about 12 minutes on 2 cores
    python benchmarks/laptop_speed.py --results benchmarks/results/laptop_speed.md
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from serve_overhead import machine, streamed_chat, streamed_events, versions  # noqa: E402 (this folder: the script's own)

from contract.model_folder import BASE  # noqa: E402
from runtime.engine import og_config  # noqa: E402

CONFIG = REPO / "configs" / "phi3-0.95b.json"
LLAMA_CPP_VERSION = "0.3.36"
PROMPT = [(i * 37) % 4000 + 10 for i in range(32)]  # token ids both engines take as they are
NEW_TOKENS = 128
VERSIONS = ("onnxruntime-genai", "onnxruntime", "llama_cpp_python", "olive-ai", "torch", "transformers")
PAUSE_S = 0.5  # lets the last engine's spinning worker threads go idle before the next one starts
# optimize variants: name -> extra options (the stage's defaults otherwise)
BUILDS = {
    "default": [],
    "merged": ["--adapter-mode", "merged"],
    "sym256": ["--int4-block-size", "256", "--int4-symmetric"],
}
SPLIT = "split"  # the default build as the model builder writes it, before fuse_qkv_lora
# The concurrent users' messages: about 32 tokens each through the chat template, none ending its 128 greedy tokens
# early (checked at run time).
USER_PROMPTS = (
    "What is the best time of year to visit Paris, and what should I pack?",
    "Where should I eat in Rome if I like seafood and quiet streets?",
    "How many days do I need to see Kyoto's temples without rushing?",
    "Which neighbourhood of Lisbon is best for a first visit with children?",
)
CLIENTS = 4


def sh(*command: str, cwd: Path = REPO) -> None:
    print("$", shlex.join(command), flush=True)
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def stage(name: str, home: Path, *args: str) -> None:
    sh(sys.executable, "-m", f"stages.{name}", "--home", str(home), *args)


def build_onnx(work: Path) -> dict[str, Path]:
    home = work / "home"
    base = home / "base"
    if not (base / "config.json").is_file():
        sh(sys.executable, "-m", "stages.tiny_model", "--output", str(base), "--config", str(CONFIG))
    stage("quantize", home, "--model", str(base), "--algorithm", "rtn", "--no-evaluate")
    finetune = ["--max-steps", "1", "--batch-size", "1", "--max-seq-len", "64", "--learning-rate", "0.01"]
    stage("finetune", home, *finetune, "--target-modules", "qkv_proj,o_proj", "--no-evaluate")
    builds = {}
    for name, options in BUILDS.items():
        builds[name] = work / "builds" / name
        if not (builds[name] / "model" / "genai_config.json").is_file():
            stage("optimize", home, *options, "--no-evaluate")
            shutil.rmtree(builds[name], ignore_errors=True)
            shutil.copytree(home / "optimize", builds[name])
    builds[SPLIT] = work / "builds" / SPLIT
    if not (builds[SPLIT] / "model" / "genai_config.json").is_file():
        sh(sys.executable, "-c", SPLIT_BUILD, str(home), str(builds[SPLIT]), str(work / "split-olive"))
    return builds


# The optimize stage's Olive workflow (ModelBuilder, ExtractAdapters) with the default build's parameters, and
# nothing after it: the graph as the builder writes it, for the row that shows what fuse_qkv_lora gains.
SPLIT_BUILD = """
import json, shutil, sys
from pathlib import Path
from stages import common, optimize
home, out, scratch = map(Path, sys.argv[1:])
manifest = json.loads((out.parent / "default" / "manifest.json").read_text())
base = home / "quantize" / "dequantized"
paths = optimize.Paths(base, home / "finetune" / "adapter", optimize.num_hidden_layers(base), scratch, "cpu")
shutil.rmtree(scratch, ignore_errors=True)
model = common.run_olive_workflow(optimize.olive_workflow(manifest["parameters"], paths))
shutil.rmtree(out, ignore_errors=True)
(out / "adapters").mkdir(parents=True)
shutil.move(str(next(model.glob("*.onnx_adapter"))), out / "adapters" / "travel.onnx_adapter")
(model / "model_config.json").unlink(missing_ok=True)
shutil.move(str(model), out / "model")
shutil.rmtree(scratch)
"""


def llama_cpp_scripts(work: Path) -> Path:
    """The converter scripts of the llama.cpp that llama-cpp-python vendors (its sdist; fetched with pip)."""
    root = work / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp"
    if not (root / "convert_hf_to_gguf.py").is_file():
        sdist = work / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
        if not sdist.is_file():
            sh(sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(work),
               f"llama-cpp-python=={LLAMA_CPP_VERSION}")  # fmt: skip
        prefix = f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.removeprefix(prefix).startswith(wanted)]
            tar.extractall(work, members=members, filter="data")
    return root


def run_converter(root: Path, script: str, *args: str) -> None:
    """Run one of llama.cpp's converters, telling it our tokenizer pre-tokenizes as GPT-2's does.

    The random-weight model's byte-level BPE tokenizer (trained on the travel data) uses GPT-2's pre-tokenizer,
    which the converter only recognises by hashing known tokenizers' output; the token ids are what both engines
    are timed on, so the vocabulary only has to load.
    """
    code = (
        "import runpy, sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/gguf-py']\n"
        "import conversion.base as base\n"
        "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'\n"
        "script = sys.argv[2]; sys.argv = [script, *sys.argv[3:]]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    sh(sys.executable, "-c", code, str(root), str(root / script), *args, cwd=root)


def llama_server(work: Path) -> Path:
    """llama.cpp's own server (tools/server), built with CMake from the sdist's vendored sources, CPU only."""
    binary = work / "llama-server-build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    sdist = work / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
    llama_cpp_scripts(work)  # fetches the sdist
    source = work / "llama.cpp-src"
    if not (source / "CMakeLists.txt").is_file():
        prefix = f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                if m.name.startswith(prefix):
                    m.name = m.name.removeprefix(prefix)
                    members.append(m)
            tar.extractall(source, members=members, filter="data")
    build = binary.parent.parent
    options = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON"]  # fmt: skip
    sh("cmake", "-S", str(source), "-B", str(build), *options)
    sh("cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 1))
    return binary


def build_gguf(work: Path) -> dict[str, Path]:
    import ctypes

    import llama_cpp

    out = work / "gguf"
    files = {name: out / f"{name}.gguf" for name in ("f16", "q4_k_m", "q4_0", "lora")}
    if all(f.is_file() for f in files.values()):
        return files
    out.mkdir(parents=True, exist_ok=True)
    root = llama_cpp_scripts(work)
    dequantized = work / "home" / "quantize" / "dequantized"
    # The converter picks Phi-3's GPT-2-style vocabulary path from tokenizer_config's class: a copy says so.
    hf = out / "hf"
    shutil.rmtree(hf, ignore_errors=True)
    hf.mkdir()
    for f in dequantized.iterdir():
        (hf / f.name).symlink_to(f)
    settings = json.loads((dequantized / "tokenizer_config.json").read_text())
    (hf / "tokenizer_config.json").unlink()
    (hf / "tokenizer_config.json").write_text(json.dumps({**settings, "tokenizer_class": "GPT2Tokenizer"}))
    run_converter(root, "convert_hf_to_gguf.py", str(hf), "--outtype", "f16", "--outfile", str(files["f16"]))
    adapter = work / "home" / "finetune" / "adapter"
    lora = ["--base", str(hf), "--outtype", "f16", "--outfile", str(files["lora"]), str(adapter)]
    run_converter(root, "convert_lora_to_gguf.py", *lora)
    for name, ftype in (("q4_k_m", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M), ("q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = os.cpu_count() or 1
        print(f"$ llama_model_quantize {files['f16'].name} -> {files[name].name}", flush=True)
        if llama_cpp.llama_model_quantize(str(files["f16"]).encode(), str(files[name]).encode(), ctypes.byref(params)):
            raise SystemExit(f"llama.cpp could not quantize to {name}")
    return files


# ---- engines: each returns a function that generates once and gives (time to first token s, decode tokens/s)
Timer = Callable[[], tuple[float, float]]


@functools.cache
def onnx_model(folder: Path, threads: int | None):  # noqa: ANN201 (onnxruntime_genai objects)
    """One og.Model (and its adapters) per build and thread setting; None leaves the thread count unset."""
    import onnxruntime_genai as og

    model = og.Model(og_config(folder / "model", threads))
    adapters = og.Adapters(model)
    for f in (folder / "adapters").glob("*.onnx_adapter"):
        adapters.load(str(f), f.name.removesuffix(".onnx_adapter"))
    return model, adapters


def onnx_engine(folder: Path, adapter: str, threads: int | None) -> Timer:
    """The bare onnxruntime-genai loop (the lab's app.py on today's API); a merged build needs no adapter switch."""
    import onnxruntime_genai as og

    model, adapters = onnx_model(folder, threads)
    switch = adapter != BASE and (folder / "adapters" / f"{adapter}.onnx_adapter").is_file()

    def once() -> tuple[float, float]:
        params = og.GeneratorParams(model)
        length = len(PROMPT) + NEW_TOKENS
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        generator = og.Generator(model, params)
        if switch:
            generator.set_active_adapter(adapters, adapter)
        start = time.perf_counter()
        generator.append_tokens(PROMPT)
        generator.generate_next_token()
        first = time.perf_counter()
        n = 1
        while not generator.is_done():
            generator.generate_next_token()
            n += 1
        end = time.perf_counter()
        assert n == NEW_TOKENS, n
        return first - start, (n - 1) / (end - first)

    return once


def llama_engine(model: Path, lora: Path | None, threads: int) -> Timer:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(model),
        lora_path=str(lora) if lora else None,
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=512,
        n_batch=512,
        verbose=False,
    )

    def once() -> tuple[float, float]:
        llm.reset()  # no reuse of the last run's prompt
        start = time.perf_counter()
        n = 0
        for _ in llm.generate(PROMPT, top_k=1, temp=0.0, reset=True):
            n += 1
            if n == 1:
                first = time.perf_counter()
            if n == NEW_TOKENS:
                break
        end = time.perf_counter()
        return first - start, (n - 1) / (end - first)

    return once


def size_mb(*paths: Path) -> float:
    total = 0
    for path in paths:
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        total += sum(f.stat().st_size for f in files)
    return total / 1e6


# ---- concurrent users: a server in its own process, clients streaming from threads of this one
@dataclass
class Stream:
    ttft_s: float
    decode_tps: float
    tokens: int
    first_at: float  # time.perf_counter() of its first token
    last_at: float


def _stream(start: float, stamps: list[float], tokens: int) -> Stream:
    """Timing of one stream from the arrival times of its token events (at least two)."""
    decode = (tokens - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else 0.0
    return Stream(stamps[0] - start, decode, tokens, stamps[0], stamps[-1])


def olivepress_client(port: int, model: str, prompt: str) -> Stream:
    """One streamed chat completion from `olivepress serve`: a stamp per content event, the count from its usage."""
    start, stamps, tokens = streamed_chat(port, model, prompt, NEW_TOKENS)
    if tokens != NEW_TOKENS:
        raise SystemExit(f"{prompt!r} ended after {tokens} tokens with {model}; choose another USER_PROMPTS entry")
    return _stream(start, stamps, tokens)


def llama_client(port: int, ids: list[int]) -> Stream:
    """One streamed /completion from llama-server on the same token ids: greedy, no prompt cache, no early end."""
    body = {"prompt": ids, "n_predict": NEW_TOKENS, "stream": True, "ignore_eos": True, "cache_prompt": False,
            "temperature": 0.0, "top_k": 1, "samplers": ["top_k"]}  # fmt: skip
    stamps, tokens = [], 0
    start = time.perf_counter()
    for now, event in streamed_events(port, "/completion", body):
        if event.get("stop"):
            tokens = event.get("timings", {}).get("predicted_n", tokens)
        else:
            stamps.append(now)
            tokens += 1
    return _stream(start, stamps, tokens)


def together(clients: list[Callable[[], Stream]]) -> tuple[list[Stream], float]:
    """Run the clients at once (threads released by one barrier); their streams and the wall time of all."""
    barrier, out, errors = threading.Barrier(len(clients)), [None] * len(clients), []

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = clients[i]()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out, time.perf_counter() - start


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"no answer from {url}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerRow:
    """One server setup of the concurrency table: how to start it and how one client streams from it."""

    def __init__(self, label: str, command: Callable[[int], list[str]], client: Callable[[int, int], Stream]):
        self.label, self.command, self.client = label, command, client
        self.single: list[Stream] = []
        self.multi: list[tuple[list[Stream], float]] = []

    def measure(self) -> None:
        """Start the server, one client per prompt in turn, then all clients at once; stop the server."""
        port = free_port()
        proc = subprocess.Popen(self.command(port), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(proc, f"http://127.0.0.1:{port}/health")
            self.client(port, 0)  # warm-up
            time.sleep(PAUSE_S)
            for i in range(CLIENTS):
                self.single.append(self.client(port, i))
                time.sleep(PAUSE_S)
            self.multi.append(together([functools.partial(self.client, port, i) for i in range(CLIENTS)]))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        time.sleep(PAUSE_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/olivepress-laptop"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--server-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="Both engines' threads.")
    parser.add_argument("--no-servers", action="store_true", help="Leave out the concurrent users' table.")
    parser.add_argument("--note", action="append", default=[], help="A paragraph for the results file.")
    parser.add_argument("--results", type=Path, required=True)
    args = parser.parse_args()
    os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    builds = build_onnx(args.work)
    gguf = build_gguf(args.work)
    server_binary = None if args.no_servers else llama_server(args.work)
    load_at_start = os.getloadavg()

    t = args.threads
    rows = [  # (label, engine maker, files the size column counts)
        ("llama.cpp Q4_K_M", lambda: llama_engine(gguf["q4_k_m"], None, t), [gguf["q4_k_m"]]),
        ("llama.cpp Q4_K_M + LoRA GGUF", lambda: llama_engine(gguf["q4_k_m"], gguf["lora"], t), [gguf["lora"]]),
        ("llama.cpp Q4_0", lambda: llama_engine(gguf["q4_0"], None, t), [gguf["q4_0"]]),
        ("llama.cpp Q4_0 + LoRA GGUF", lambda: llama_engine(gguf["q4_0"], gguf["lora"], t), [gguf["lora"]]),
    ]
    onnx_rows = [  # (label, build, adapter, the part of the build the size column counts)
        ("olivepress default, adapter off", "default", BASE, "model"),
        ("olivepress default, adapter on (switchable)", "default", "travel", "adapters"),
        ("olivepress builder's split q/k/v, adapter off", SPLIT, BASE, "model"),
        ("olivepress builder's split q/k/v, adapter on", SPLIT, "travel", "adapters"),
        ("olivepress --adapter-mode merged", "merged", "travel", "model"),
        ("olivepress sym256, adapter off", "sym256", BASE, "model"),
        ("olivepress sym256, adapter on (switchable)", "sym256", "travel", "adapters"),
    ]
    for label, build, adapter, part in onnx_rows:
        rows.append((label, functools.partial(onnx_engine, builds[build], adapter, t), [builds[build] / part]))
    engines = []
    for label, make, files in rows:
        print("loading", label, flush=True)
        engines.append((label, make(), files))
    for _, once, _ in engines:  # warm-up
        once()
        time.sleep(PAUSE_S)
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in engines}
    for repeat in range(args.repeats):
        for label, once, _ in engines:
            runs[label].append(once())
            time.sleep(PAUSE_S)
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)
    del engines  # the models' memory, before the servers load theirs

    servers = [] if args.no_servers else server_rows(builds["default"], gguf, server_binary, t)
    for repeat in range(args.server_repeats):
        for row in servers:
            print(f"servers: {row.label}, repeat {repeat + 1}/{args.server_repeats}", flush=True)
            row.measure()

    def med(label: str, i: int) -> float:
        return statistics.median(r[i] for r in runs[label])

    reference = "llama.cpp Q4_K_M"
    load_at_end = os.getloadavg()
    lines = [
        "# Laptop speed: olivepress's int4 ONNX against llama.cpp on the same weights (issues 8 and 16)",
        "",
        f"Command: `python {shlex.join(sys.argv)}`  ",
        f"Machine: {machine()}  ",
        f"Load average (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in load_at_start)} at the start of the timed "
        f"runs, {', '.join(f'{x:.1f}' for x in load_at_end)} at the end (the machine is shared)  ",
        f"Versions: {versions(*VERSIONS)}  ",
        f"Date: {started}",
        "",
        f"Model: random weights in {CONFIG.relative_to(REPO)} (Phi-3 architecture, 0.95B parameters), RTN 4-bit "
        "group 128 by `olivepress quantize`, LoRA r=64 on qkv_proj + o_proj by `olivepress finetune`; the ONNX "
        "builds by `olivepress optimize`, llama.cpp's files from the same dequantized weights and adapter. ",
        "",
        "## One stream",
        "",
        f"{len(PROMPT)} prompt tokens, {NEW_TOKENS} greedy new tokens, {t} threads for both engines; medians of "
        f"{args.repeats} repeats after a warm-up, every engine loaded once and the engines interleaved per repeat.",
        "",
        "| engine and build | decode tokens/s | best | vs llama.cpp Q4_K_M | time to first token (ms) "
        "| vs llama.cpp Q4_K_M | files (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, _, files in rows:
        decode, ttft, best = med(label, 1), med(label, 0) * 1000, max(r[1] for r in runs[label])
        ref_decode, ref_ttft = med(reference, 1), med(reference, 0) * 1000
        size = f"{size_mb(*files):.0f}" if files else ""
        lines.append(
            f"| {label} | {decode:.1f} | {best:.1f} | {decode / ref_decode:.2f}x | {ttft:.0f} | {ref_ttft / ttft:.2f}x "
            f"| {size} |"
        )
    ratios = [
        ("switchable adapter on / off (default build)", "olivepress default, adapter on (switchable)",
         "olivepress default, adapter off"),
        ("switchable adapter on (default build) / llama.cpp Q4_0 without one",
         "olivepress default, adapter on (switchable)", "llama.cpp Q4_0"),
        ("switchable adapter on / off (builder's split q/k/v)", "olivepress builder's split q/k/v, adapter on",
         "olivepress builder's split q/k/v, adapter off"),
        ("default build / builder's split q/k/v, adapter on", "olivepress default, adapter on (switchable)",
         "olivepress builder's split q/k/v, adapter on"),
        ("default build / builder's split q/k/v, adapter off", "olivepress default, adapter off",
         "olivepress builder's split q/k/v, adapter off"),
        ("merged / adapter off (default build)", "olivepress --adapter-mode merged", "olivepress default, adapter off"),
        ("switchable adapter on / off (sym256)", "olivepress sym256, adapter on (switchable)",
         "olivepress sym256, adapter off"),
        ("llama.cpp LoRA on / off (Q4_K_M)", "llama.cpp Q4_K_M + LoRA GGUF", "llama.cpp Q4_K_M"),
        ("llama.cpp LoRA on / off (Q4_0)", "llama.cpp Q4_0 + LoRA GGUF", "llama.cpp Q4_0"),
    ]  # fmt: skip
    lines += [
        "",
        "Ratios: of the medians, and the median of the ratios within each repeat (engines run one after the other, "
        "so a repeat's two runs saw much the same load), and of the best runs.",
        "",
        "| decode ratio | of medians | paired | of bests |",
        "|---|---|---|---|",
    ]
    for name, a, b in ratios:
        paired = statistics.median(x[1] / y[1] for x, y in zip(runs[a], runs[b], strict=True))
        best = max(r[1] for r in runs[a]) / max(r[1] for r in runs[b])
        lines.append(f"| {name} | {med(a, 1) / med(b, 1):.2f}x | {paired:.2f}x | {best:.2f}x |")
    raw = {"one stream": runs}
    if servers:
        lines += server_table(servers, args.server_repeats, t)
        raw["servers"] = {
            row.label: {"single": [asdict(s) for s in row.single],
                        "together": [([asdict(s) for s in streams], wall) for streams, wall in row.multi]}
            for row in servers
        }  # fmt: skip
    lines += [*[f"\n{note}" for note in args.note]]
    lines += ["", "Raw runs (one stream: time to first token s, decode tokens/s; servers: every stream):", "", "```",
              json.dumps(raw), "```", ""]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)


def server_rows(default: Path, gguf: dict[str, Path], binary: Path, threads: int) -> list[ServerRow]:
    """olivepress serve with the adapter off and on, llama-server without and with the LoRA, on the same weights."""
    sys.path.insert(0, str(REPO))
    from runtime.engine import Engine

    engine = Engine(default)
    ids = [[int(t) for t in engine.prompt_tokens(p)] for p in USER_PROMPTS]
    del engine

    def olivepress(port: int) -> list[str]:
        return [sys.executable, "-m", "runtime.serve", "--model-dir", str(default), "--port", str(port),
                "--threads", str(threads), "--max-concurrent", str(CLIENTS)]  # fmt: skip

    def llama(lora: Path | None) -> Callable[[int], list[str]]:
        def command(port: int) -> list[str]:
            context = CLIENTS * (max(len(i) for i in ids) + NEW_TOKENS + 16)
            extra = ["--lora", str(lora)] if lora else []
            return [str(binary), "-m", str(gguf["q4_0"]), *extra, "--port", str(port), "-t", str(threads),
                    "-tb", str(threads), "--parallel", str(CLIENTS), "--cont-batching", "-c", str(context),
                    "--no-webui"]  # fmt: skip

        return command

    def onnx_client(model: str) -> Callable[[int, int], Stream]:
        return lambda port, i: olivepress_client(port, model, USER_PROMPTS[i])

    return [
        ServerRow("olivepress serve, adapter off", olivepress, onnx_client(BASE)),
        ServerRow("olivepress serve, adapter on", olivepress, onnx_client("travel")),
        ServerRow("llama-server Q4_0", llama(None), lambda port, i: llama_client(port, ids[i])),
        ServerRow("llama-server Q4_0 + LoRA GGUF", llama(gguf["lora"]), lambda port, i: llama_client(port, ids[i])),
    ]


def server_table(rows: list[ServerRow], repeats: int, threads: int) -> list[str]:
    lines = [
        "",
        "## Concurrent users",
        "",
        f"Each server alone on the machine with {threads} threads; {CLIENTS} different prompts of "
        f"{', '.join(str(n) for n in sorted({s.tokens for r in rows for s in r.single}))} new tokens each. One "
        f"client: each prompt in turn. {CLIENTS} clients: the {CLIENTS} prompts sent at once. Medians over "
        f"{repeats} starts of each server, interleaved. Aggregate decode: the sum of the clients' own decode rates "
        "(their tokens after the first over the time from their first to their last); throughput: every token of "
        "every client over the wall time from the requests to the last token.",
        "",
        f"| server | one client: TTFT ms | decode tokens/s | {CLIENTS} clients: TTFT ms, median (worst) "
        "| aggregate decode tokens/s | vs one client | worst TTFT vs one client | throughput tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ttft1 = statistics.median(s.ttft_s for s in row.single) * 1000
        dec1 = statistics.median(s.decode_tps for s in row.single)
        ttfts = [statistics.median(s.ttft_s for s in streams) * 1000 for streams, _ in row.multi]
        worst = [max(s.ttft_s for s in streams) * 1000 for streams, _ in row.multi]
        aggregate = statistics.median(sum(s.decode_tps for s in streams) for streams, _ in row.multi)
        throughput = statistics.median(sum(s.tokens for s in streams) / wall for streams, wall in row.multi)
        lines.append(
            f"| {row.label} | {ttft1:.0f} | {dec1:.1f} | {statistics.median(ttfts):.0f} "
            f"({statistics.median(worst):.0f}) | {aggregate:.1f} | {aggregate / dec1:.2f}x | "
            f"{statistics.median(worst) / ttft1:.2f}x | {throughput:.1f} |"
        )
    return lines


if __name__ == "__main__":
    main()
