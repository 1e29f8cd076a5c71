"""Issue 8's speed table: olivepress's int4 ONNX builds against llama.cpp on the same weights, on this CPU.

Builds once (each step is skipped when its output is already in --work):
  1. a random-weight Phi-3 model (configs/phi3-0.95b.json: 0.95B parameters) and the pipeline's own stages on it:
     quantize (RTN, group 128), finetune (one step of LoRA r=64 on qkv_proj + o_proj, learning rate 0.01 so the
     adapter is far from zero: only the speed counts here), and optimize in the variants below;
  2. llama.cpp's files from the same dequantized weights and adapter: GGUF f16 through the converter scripts of the
     llama-cpp-python sdist (its vendored llama.cpp), Q4_K_M and Q4_0 through llama.cpp's own quantizer, and the
     PEFT adapter as a LoRA GGUF.

Then times every engine on the same 32 prompt token ids and 128 greedy new tokens (the end-of-text token is held
off so every run makes all 128), all loaded once in this process and interleaved per repeat so drift in the
machine hits them alike. Time to first token: the prompt in, to the first new token out. Decode: the other 127
tokens over their time. Prints a table and writes the results file with the command, the machine and versions.

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
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from serve_overhead import machine, versions  # noqa: E402 (this folder: the script's own)

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
    "sym256-merged": ["--int4-block-size", "256", "--int4-symmetric", "--adapter-mode", "merged"],
}


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
    return builds


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/olivepress-laptop"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="Both engines' threads.")
    parser.add_argument("--results", type=Path, required=True)
    args = parser.parse_args()
    os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    builds = build_onnx(args.work)
    gguf = build_gguf(args.work)

    t = args.threads
    rows = [  # (label, engine maker, files the size column counts)
        ("llama.cpp Q4_K_M", lambda: llama_engine(gguf["q4_k_m"], None, t), [gguf["q4_k_m"]]),
        ("llama.cpp Q4_K_M + LoRA GGUF", lambda: llama_engine(gguf["q4_k_m"], gguf["lora"], t), [gguf["lora"]]),
        ("llama.cpp Q4_0", lambda: llama_engine(gguf["q4_0"], None, t), [gguf["q4_0"]]),
        (
            "olivepress default, threads unset (as before this benchmark)",
            lambda: onnx_engine(builds["default"], BASE, None),
            [],
        ),
    ]
    onnx_rows = [  # (label, build, adapter, the part of the build the size column counts)
        ("olivepress default, adapter off", "default", BASE, "model"),
        ("olivepress default, adapter on (switchable)", "default", "travel", "adapters"),
        ("olivepress --adapter-mode merged", "merged", "travel", "model"),
        ("olivepress sym256, adapter off", "sym256", BASE, "model"),
        ("olivepress sym256, adapter on (switchable)", "sym256", "travel", "adapters"),
        ("olivepress sym256 --adapter-mode merged", "sym256-merged", "travel", "model"),
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

    def med(label: str, i: int) -> float:
        return statistics.median(r[i] for r in runs[label])

    reference = "llama.cpp Q4_K_M"
    lines = [
        "# Laptop speed: olivepress's int4 ONNX against llama.cpp on the same weights (issue 8)",
        "",
        f"Command: `python {shlex.join(sys.argv)}`  ",
        f"Machine: {machine()}  ",
        f"Versions: {versions(*VERSIONS)}  ",
        f"Date: {started}",
        "",
        f"Model: random weights in {CONFIG.relative_to(REPO)} (Phi-3 architecture, 0.95B parameters), RTN 4-bit "
        "group 128 by `olivepress quantize`, LoRA r=64 on qkv_proj + o_proj by `olivepress finetune`; the ONNX "
        "builds by `olivepress optimize`, llama.cpp's files from the same dequantized weights and adapter. "
        f"{len(PROMPT)} prompt tokens, {NEW_TOKENS} greedy new tokens, {t} threads for both engines; medians of "
        f"{args.repeats} repeats after a warm-up, every engine loaded once and the engines interleaved per repeat.",
        "",
        "| engine and build | decode tokens/s | vs llama.cpp Q4_K_M | time to first token (ms) "
        "| vs llama.cpp Q4_K_M | files (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for label, _, files in engines:
        decode, ttft = med(label, 1), med(label, 0) * 1000
        ref_decode, ref_ttft = med(reference, 1), med(reference, 0) * 1000
        size = f"{size_mb(*files):.0f}" if files else ""
        lines.append(
            f"| {label} | {decode:.1f} | {decode / ref_decode:.2f}x | {ttft:.0f} | {ref_ttft / ttft:.2f}x | {size} |"
        )
    ratios = [
        ("switchable adapter on / off (default build)", "olivepress default, adapter on (switchable)",
         "olivepress default, adapter off"),
        ("merged / adapter off (default build)", "olivepress --adapter-mode merged", "olivepress default, adapter off"),
        ("switchable adapter on / off (sym256)", "olivepress sym256, adapter on (switchable)",
         "olivepress sym256, adapter off"),
        ("merged / adapter off (sym256)", "olivepress sym256 --adapter-mode merged", "olivepress sym256, adapter off"),
        ("llama.cpp LoRA on / off", "llama.cpp Q4_K_M + LoRA GGUF", "llama.cpp Q4_K_M"),
    ]  # fmt: skip
    lines += ["", "| decode ratio | median |", "|---|---|"]
    for name, a, b in ratios:
        lines.append(f"| {name} | {med(a, 1) / med(b, 1):.2f}x |")
    lines += ["", "Raw runs (time to first token s, decode tokens/s):", "", "```", json.dumps(runs), "```", ""]
    text = "\n".join(lines)
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)


if __name__ == "__main__":
    main()
