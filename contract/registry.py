"""The pipeline, declared once: every consumer (run, status, report, the images, compose, Azure ML) reads this table.

Adding a stage means a row here, its module ``stages/<name>.py`` (a click command run as ``python -m
stages.<name>``) and its image target. A stage reads another stage's folder only through
``volume.upstream(root, stage, need, key)``, which refuses a ``need`` this table does not list.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from contract import model_folder


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline and everything the host side needs to know about it."""

    name: str
    summary: str
    # The stages whose published folders this one reads.
    needs: tuple[str, ...]
    # Named sub-paths of the stage's folder: what it publishes for the stages after it (and for users).
    outputs: Mapping[str, str]
    # The image that runs it: ``olivepress/<image>``, built from ``dockerfile`` at ``target``.
    image: str
    dockerfile: str
    target: str
    # Reserves GPUs under compose on a GPU host (compose.cpu.yaml resets it).
    gpu: bool
    # Options naming a local file or folder, by the Azure ML input type they become: option -> uri_file|uri_folder.
    path_options: Mapping[str, str] = field(default_factory=dict)
    # `olivepress run` shortcut options this stage takes: run's option -> this stage's option.
    run_shortcuts: Mapping[str, str] = field(default_factory=dict)
    # Parameters `olivepress status` shows, and those `olivepress push` records as registry tags.
    shown: tuple[str, ...] = ()
    tagged: tuple[str, ...] = ()
    # The held-out figures this stage records under ``metrics`` in its manifest: key -> label in reports.
    metrics: Mapping[str, str] = field(default_factory=dict)

    @property
    def module(self) -> str:
        return f"stages.{self.name}"

    def setting(self, option: str) -> str:
        """The environment variable every stage option also reads: ``OLIVEPRESS_<STAGE>_<OPTION>``."""
        return f"OLIVEPRESS_{self.name.upper()}_{option.upper().replace('-', '_')}"


def _frozen(mapping: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping))


_CUDA, _CPU = "docker/cuda.Dockerfile", "docker/cpu.Dockerfile"

PIPELINE: tuple[Stage, ...] = (
    Stage(
        name="quantize",
        summary="4-bit AWQ / GPTQ / RTN through Olive",
        needs=(),
        outputs=_frozen({"model": "model", "dequantized": "dequantized"}),
        image="quantize",
        dockerfile=_CUDA,
        target="quantize",
        gpu=True,
        path_options=_frozen({"model": "uri_folder", "calibration_data": "uri_file"}),
        run_shortcuts=_frozen({"model": "model", "algorithm": "algorithm", "data_files": "calibration_data"}),
        shown=("algorithm", "bits", "group_size"),
        tagged=("algorithm", "bits", "group_size"),
        metrics=_frozen({"base": "base", "quantized": "quantized"}),
    ),
    Stage(
        name="finetune",
        summary="LoRA on the quantized weights",
        needs=("quantize",),
        outputs=_frozen({"adapter": "adapter", "heldout": "heldout.jsonl"}),
        image="finetune",
        dockerfile=_CUDA,
        target="finetune",
        gpu=True,
        path_options=_frozen({"data_files": "uri_file"}),
        run_shortcuts=_frozen({"data_files": "data_files", "max_steps": "max_steps"}),
        shown=("method", "max_steps", "rank", "learning_rate"),
        tagged=("method", "max_steps", "rank", "alpha", "learning_rate", "seed"),
        metrics=_frozen({"finetuned": "finetuned (PyTorch + LoRA)"}),
    ),
    Stage(
        name="optimize",
        summary="int4 ONNX for onnxruntime-genai, the adapter kept separate",
        needs=("quantize", "finetune"),
        # The optimized model folder (contract.model_folder): model/ and adapters/<name>.onnx_adapter.
        outputs=_frozen({"model": model_folder.MODEL, "adapters": model_folder.ADAPTERS}),
        image="optimize",
        dockerfile=_CUDA,
        target="optimize",
        gpu=True,
        shown=("precision", "adapter_name"),
        tagged=("precision", "adapter_name", "int4_block_size", "int4_accuracy_level"),
        metrics=_frozen({"onnx_base": "ONNX int4, adapter off", "onnx_adapter": "ONNX int4, adapter on"}),
    ),
    Stage(
        name="infer",
        summary="generate with the adapter on and off",
        needs=("optimize",),
        outputs=_frozen({"answers": "answers.json"}),
        image="infer",
        dockerfile=_CPU,
        target="infer",
        gpu=False,
        shown=("max_new_tokens",),
    ),
)

STAGES: Mapping[str, Stage] = MappingProxyType({stage.name: stage for stage in PIPELINE})
NAMES: tuple[str, ...] = tuple(STAGES)

# `olivepress run` starts each stage's process while the stage before it runs, with this variable set: the
# process imports its libraries, then waits for the line TURN on its standard input before it does anything
# else; standard input closing instead means the run stopped.
WAIT_FOR_TURN = "OLIVEPRESS_WAIT_FOR_TURN"
TURN = "go"


def run_shortcuts() -> dict[str, list[str]]:
    """`olivepress run`'s shortcut options and the stage variables each sets, e.g. data_files -> two variables."""
    shortcuts: dict[str, list[str]] = {}
    for stage in PIPELINE:
        for option, stage_option in stage.run_shortcuts.items():
            shortcuts.setdefault(option, []).append(stage.setting(stage_option))
    return shortcuts


def report_points() -> list[tuple[str, str, str]]:
    """Every held-out figure of a run in pipeline order: (stage, metric key, label)."""
    return [(stage.name, key, label) for stage in PIPELINE for key, label in stage.metrics.items()]
