"""An optimized model folder: what optimize publishes, infer/serve/chat load, push uploads and pull restores.

    <folder>/
      model/                         the onnxruntime-genai folder: model.onnx(.data), genai_config.json, tokenizer
        olivepress_merged_adapter.txt  only in a merged build: the name of the adapter built into the graph
      adapters/<name>.onnx_adapter   switchable LoRA adapters, loaded by name

``<home>/optimize`` is one; ``--model-dir`` takes any other (a copy, a pulled model).
"""

from __future__ import annotations

from pathlib import Path

MODEL = "model"
ADAPTERS = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"
MERGED_ADAPTER_FILE = "olivepress_merged_adapter.txt"
GENAI_CONFIG = "genai_config.json"
# The name that means "no adapter", in answers, /v1/models and every --adapter / --model option.
BASE = "base"
# Also accepted where a user names an adapter: the spelling of earlier releases' `infer --adapter none`.
BASE_ALIASES = (BASE, "none")


def model_dir(folder: Path) -> Path:
    return folder / MODEL


def adapter_file(folder: Path, name: str) -> Path:
    return folder / ADAPTERS / f"{name}{ADAPTER_SUFFIX}"


def adapter_names(folder: Path) -> list[str]:
    """The switchable adapters in the folder, sorted."""
    return sorted(p.name.removesuffix(ADAPTER_SUFFIX) for p in (folder / ADAPTERS).glob(f"*{ADAPTER_SUFFIX}"))


def merged_adapter(folder: Path) -> str | None:
    """The adapter built into the graph of a merged build, or None for a build with a base to switch to."""
    marker = folder / MODEL / MERGED_ADAPTER_FILE
    return marker.read_text().strip() if marker.is_file() else None


def is_model_folder(folder: Path) -> bool:
    return (folder / MODEL / GENAI_CONFIG).is_file()
