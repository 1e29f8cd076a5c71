"""optimize: int4 ONNX for onnxruntime-genai on CPU, the LoRA adapter kept as a separate ``.onnx_adapter``.

Olive's ModelBuilder pass (onnxruntime-genai's builder) exports the
dequantized base with the adapter's LoRA branches, then ExtractAdapters moves
the adapter weights out of the graph into inputs, so one base model serves
any adapter of the same shape (or none); ``fuse_qkv_lora`` then undoes the
builder's split of the fused q/k/v projection.  Writes ``optimize/model`` (the
onnxruntime-genai folder) and ``optimize/adapters/<name>.onnx_adapter``.

``--adapter-mode merged`` skips ExtractAdapters: the LoRA branches stay in the
graph as int4 constants, for a one-adapter deployment at nearly base speed.  (Folding
the adapter into the base weights instead would be erased by the int4
rounding: the measured held-out loss was the base model's.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click

from contract import families, model_folder, volume
from contract.exits import BadInput
from stages import common
from stages import evaluate as evaluate_

log = logging.getLogger("olivepress")
LORA_PROJECTIONS = ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj")
LORA_PROJECTIONS += ("mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")
# The laptop's CPU, even when built on a GPU host (else genai_config asks for CUDA).
TARGET_DEVICE = "cpu"


def lora_matmul_names(num_layers: int) -> list[str]:
    """Every name the model builder can give a LoRA branch's MatMul (it splits fused qkv/gate_up per projection).

    A switchable adapter's weights become graph inputs, and an int4 MatMulNBits whose weights are an input cannot
    be prepacked: in a scratch run (0.95B model, 2 cores) int4 LoRA weights ran the adapter at 0.43x the base's
    decode speed, float ones at 0.79x (0.86x once ``fuse_qkv_lora`` joins q/k/v; benchmarks/results/laptop_speed.md).
    Names absent from the graph are ignored by the quantizer.
    """
    return [
        f"/model/layers.{i}/{projection}/lora_{ab}/MatMul"
        for i in range(num_layers)
        for projection in LORA_PROJECTIONS
        for ab in "AB"
    ]


def int4_nodes_to_exclude(parameters: dict, num_layers: int) -> list[str]:
    """The MatMuls the int4 quantizer leaves float: the output projection with --keep-lm-head, and a switchable
    adapter's LoRA branches (``lora_matmul_names`` says why)."""
    exclude = [] if parameters["quantize_lm_head"] else ["/lm_head/MatMul"]
    if parameters["adapter_mode"] == "switchable":
        exclude += lora_matmul_names(num_layers)
    return exclude


QKV = ("q", "k", "v")


# onnxruntime-genai 0.14.1's builder makes torch Linear layers (the split q/k/v, the MLP and their LoRA B) only to
# replace their weights on the next line: about 20 s of random initialisation at Phi-3.5-mini size on one H200.
BUILDER_PATCHED_VERSION = "0.14.1"


@contextlib.contextmanager
def builder_linear_layers_uninitialized() -> Iterator[bool]:
    """While Olive's ModelBuilder runs on builder 0.14.1, a new torch Linear skips its random initialisation (the
    weights it would draw are all replaced); other versions run as they are. Yields whether the patch is on."""
    import onnxruntime_genai
    import torch

    if onnxruntime_genai.__version__ != BUILDER_PATCHED_VERSION:
        yield False
        return
    original = torch.nn.Linear.reset_parameters
    torch.nn.Linear.reset_parameters = lambda self: None
    try:
        yield True
    finally:
        torch.nn.Linear.reset_parameters = original


def fuse_qkv_lora(model_file: Path, adapter_files: list[Path]) -> int:
    """Fuse each attention layer's q, k and v projections back into one, with one LoRA: returns the layers fused.

    With a LoRA on the fused ``qkv_proj``, the model builder splits it into q, k and v, each an int4 MatMulNBits with
    its own copy of the same LoRA A (PEFT trains one A for the fused projection) and its slice of B. A decode step
    then runs three int4 matmuls and three LoRA branches where one of each does (benchmarks/results/laptop_speed.md
    measures the difference). This undoes the split, in ``model_file`` and in each adapter file alike:

    - the three MatMulNBits become one, their int4 blocks, scales and zero points stacked along N (each output
      column is computed from its own row of blocks, so the values do not change);
    - their LoRA branches become one: A (the three copies are equal; a layer whose copies differ is left as it is),
      B the three slices side by side, one Add;
    - GroupQueryAttention takes the packed q|k|v as the builder writes it for a model without LoRA.

    The adapter's inputs keep the builder's naming (``...attn.qkv_proj.lora_A.MatMul.weight``), with the default
    empty tensors (rank 0) that let the model run with no adapter.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_file))
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    inits = {i.name: i for i in graph.initializer}
    adapters = {f: ort.AdapterFormat.read_adapter(str(f)) for f in adapter_files}
    params = {f: {k: np.array(v.numpy()) for k, v in a.get_parameters().items()} for f, a in adapters.items()}
    drop_nodes, drop_names, fused = set(), set(), 0
    for attention in [n for n in graph.node if n.op_type == "GroupQueryAttention"]:
        parts = _qkv_parts(attention, producer)
        if parts is None:
            continue
        base, lora_a, lora_b = ([p[i] for p in parts] for i in (1, 2, 3))
        a_names = [n.input[1] for n in lora_a]
        b_names = [n.input[1] for n in lora_b]
        same_a = all(
            all(np.array_equal(values[a_names[0]], values[a]) for a in a_names[1:]) for values in params.values()
        )
        attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in base]
        if not same_a or any({k: v for k, v in a.items() if k != "N"} != {k: v for k, v in attrs[0].items()
                                                                           if k != "N"} for a in attrs):  # fmt: skip
            continue
        prefix = attention.name.rsplit("/", 1)[0]  # /model/layers.<i>/attn
        layer = prefix.split("/")[2]  # layers.<i>
        weight = f"model.{layer}.attn.qkv_proj"
        # The base: one MatMulNBits over the stacked int4 blocks, scales and zero points.
        stacked = []
        for slot in range(1, len(base[0].input)):
            names = [n.input[slot] for n in base]
            name = f"{weight}.MatMul.{names[0].rsplit('.', 1)[-1]}"
            arrays = [numpy_helper.to_array(inits[n]) for n in names]
            graph.initializer.append(numpy_helper.from_array(np.concatenate(arrays, axis=0), name))
            stacked.append(name)
            drop_names.update(names)
        x = base[0].input[0]
        n_out = sum(a["N"] for a in attrs)
        y_base, y_a, y_b, qkv = (f"{prefix}/qkv_proj/{s}/output_0" for s in ("MatMul", "lora_A/MatMul",
                                                                            "lora_B/MatMul", "lora/Add"))  # fmt: skip
        new_a, new_b = f"{weight}.lora_A.MatMul.weight", f"{weight}.lora_B.MatMul.weight"
        graph.node.extend([
            helper.make_node("MatMulNBits", [x, *stacked], [y_base], f"{prefix}/qkv_proj/MatMul_Q4",
                             domain="com.microsoft", **{**attrs[0], "N": n_out}),
            helper.make_node("MatMul", [x, new_a], [y_a], f"{prefix}/qkv_proj/lora_A/MatMul"),
            helper.make_node("MatMul", [y_a, new_b], [y_b], f"{prefix}/qkv_proj/lora_B/MatMul"),
            helper.make_node("Add", [y_base, y_b], [qkv], f"{prefix}/qkv_proj/lora/Add"),
        ])  # fmt: skip
        # The adapter's inputs and their rank-0 defaults.
        k_in = attrs[0]["K"]
        graph.input.extend([
            helper.make_tensor_value_info(new_a, onnx.TensorProto.FLOAT, [k_in, "lora_r"]),
            helper.make_tensor_value_info(new_b, onnx.TensorProto.FLOAT, [ "lora_r", n_out]),
        ])  # fmt: skip
        graph.initializer.extend([
            numpy_helper.from_array(np.zeros((k_in, 0), np.float32), new_a),
            numpy_helper.from_array(np.zeros((0, n_out), np.float32), new_b),
        ])  # fmt: skip
        for values in params.values():
            values[new_a] = values[a_names[0]]
            values[new_b] = np.concatenate([values[b] for b in b_names], axis=1)
            for name in (*a_names, *b_names):
                del values[name]
        drop_names.update(a_names + b_names)
        for part in parts:
            drop_nodes.update(id(n) for n in part[1:])
            drop_nodes.add(id(part[0]))
        attention.input[0], attention.input[1], attention.input[2] = qkv, "", ""
        fused += 1
    if not fused:
        return 0
    keep = [n for n in graph.node if id(n) not in drop_nodes]
    del graph.node[:]
    graph.node.extend(_topological(keep))
    for field in (graph.initializer, graph.input):
        kept = [item for item in field if item.name not in drop_names]
        del field[:]
        field.extend(kept)
    _save_model(model, model_file)
    for f, adapter in adapters.items():
        adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params[f].items()})
        adapter.export_adapter(str(f))
    return fused


def _qkv_parts(attention, producer: dict) -> list | None:  # noqa: ANN001 (onnx NodeProtos)
    """For a GroupQueryAttention fed q, k and v by ``base + lora_B(lora_A(x))`` each, over one ``x``: per input its
    (Add, MatMulNBits, lora_A MatMul, lora_B MatMul); else None."""
    if len(attention.input) < 3 or not all(attention.input[:3]):
        return None
    parts = []
    for name in attention.input[:3]:
        add = producer.get(name)
        if add is None or add.op_type != "Add":
            return None
        inputs = [producer.get(i) for i in add.input]
        base = next((n for n in inputs if n is not None and n.op_type == "MatMulNBits"), None)
        lora_b = next((n for n in inputs if n is not None and n.op_type == "MatMul" and "lora_B" in n.name), None)
        lora_a = producer.get(lora_b.input[0]) if lora_b is not None else None
        if base is None or lora_a is None or lora_a.op_type != "MatMul" or "lora_A" not in lora_a.name:
            return None
        if len(base.input) > 4 or lora_a.input[0] != base.input[0]:  # a bias or g_idx, or not one input
            return None
        parts.append((add, base, lora_a, lora_b))
    if len({p[1].input[0] for p in parts}) != 1:
        return None
    return parts


def _topological(nodes: list) -> list:  # noqa: ANN001 (onnx NodeProtos)
    """``nodes`` in an order where each comes after the nodes whose outputs it reads (what ONNX requires)."""
    made = {o for n in nodes for o in n.output}
    ready, order, waiting = set(), [], list(nodes)
    while waiting:
        rest = []
        for node in waiting:
            if all(i in ready or i not in made or not i for i in node.input):
                order.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(waiting):
            raise RuntimeError("the rewritten graph has a cycle")
        waiting = rest
    return order


def _save_model(model, model_file: Path) -> None:  # noqa: ANN001 (an onnx ModelProto)
    """Save ``model`` where it was, its weights in one external file as the builder writes them when they are over
    protobuf's 2 GB (or when the builder already used one)."""
    import onnx

    data = model_file.with_name(model_file.name + ".data")
    external = data.exists() or model.ByteSize() > 2**31 - 2**26
    data.unlink(missing_ok=True)
    if external:
        onnx.save_model(model, str(model_file), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)  # fmt: skip
    else:
        onnx.save_model(model, str(model_file))


@dataclass(frozen=True)
class Paths:
    """What an optimize run's Olive workflow works on: the base model and adapter, a scratch folder, the device."""

    base: Path  # the dequantized model the adapter was trained on
    adapter: Path  # the PEFT adapter
    num_layers: int  # the base's decoder layers (its config's num_hidden_layers)
    workdir: Path  # scratch: Olive's cache and its output model
    device: str  # the device the ONNX model is for


def olive_workflow(parameters: dict, paths: Paths) -> dict:
    """The Olive workflow of an optimize run: ModelBuilder with the adapter, then ExtractAdapters for a switchable
    adapter. ``parameters`` are the stage's."""
    builder: dict = {"type": "ModelBuilder", "precision": parameters["precision"]}
    if parameters["precision"] == "int4":
        builder["int4_block_size"] = parameters["int4_block_size"]
        builder["int4_accuracy_level"] = parameters["int4_accuracy_level"]
        # The default, asymmetric blocks of the quantizer's group size, is the closest grid to the weights' own.
        builder["int4_is_symmetric"] = parameters["int4_symmetric"]
        exclude = int4_nodes_to_exclude(parameters, paths.num_layers)
        if exclude:
            builder["int4_nodes_to_exclude"] = exclude
    passes: dict = {"builder": builder}
    if parameters["adapter_mode"] == "switchable":
        passes["extract_adapters"] = {"type": "ExtractAdapters"}
    model = {
        "model_path": str(paths.base),
        "adapter_path": str(paths.adapter),
        "load_kwargs": {"attn_implementation": "eager"},
    }
    return common.olive_workflow(model, passes, paths.workdir, paths.device)


def complete_genai_config(model_dir: Path, family: families.Family, base: Path) -> dict:
    """What the family needs of genai_config.json that the builder leaves out; returns the config.

    - eos_token_id holds every token that ends the family's assistant turn: onnxruntime-genai stops only there, and
      a model's generation config may name only its base end-of-text token (tokens the tokenizer lacks are left out);
    - context_length is at most the family's ``context_limit``, where the builder's graph stops computing what the
      model does.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    config_file = model_dir / model_folder.GENAI_CONFIG
    written = config_file.read_text()
    config = json.loads(written)
    model = config["model"]
    eos = model["eos_token_id"] if isinstance(model["eos_token_id"], list) else [model["eos_token_id"]]
    missing = [i for i in map(tokenizer.token_to_id, family.stop_tokens) if i is not None and i not in eos]
    limit = json.loads((base / "config.json").read_text()).get(family.context_limit) if family.context_limit else None
    if missing:
        model["eos_token_id"] = eos + missing
    if limit and limit < model["context_length"]:
        model["context_length"] = config["search"]["max_length"] = limit
    if config != json.loads(written):
        config_file.write_text(json.dumps(config, indent=4))
    return config


def num_hidden_layers(model: Path) -> int:
    return json.loads((model / "config.json").read_text())["num_hidden_layers"]


BLOCK_SIZES = (16, 32, 64, 128, 256)  # what the ONNX builder's int4 (MatMulNBits) takes


def block_size_for(group_size: int) -> int:
    """The int4 block size closest to the quantizer's grid: its group size, or for a grid the builder cannot
    express (per channel, -1, or an odd size) the largest block not above it (per channel: the largest)."""
    if group_size in BLOCK_SIZES:
        return group_size
    fitting = [b for b in BLOCK_SIZES if group_size == -1 or b <= group_size]
    chosen = max(fitting or [BLOCK_SIZES[0]])
    log.warning(
        "quantize's group size %s is not an int4 block size (%s): blocks of %d", group_size, BLOCK_SIZES, chosen
    )
    return chosen


@common.stage_command("optimize")
@click.option(
    "--precision",
    type=click.Choice(["int4", "fp32"]),
    default="int4",
    help="int4 (MatMulNBits) for the laptop; fp32 to check the export itself.",
)
@click.option("--adapter-name", default="travel", help="Name the adapter is loaded under at inference.")
@click.option(
    "--int4-block-size",
    type=click.Choice(["auto", *map(str, BLOCK_SIZES)]),
    default="auto",
    help="int4 block size; auto takes the quantize stage's group size, so the int4 grid matches the quantized one.",
)
@click.option(
    "--quantize-lm-head/--keep-lm-head",
    default=True,
    help="int4 for the output projection too, as the lab's build does (340 MB smaller at Phi-3.5-mini size, "
    "faster decode), or keep it float as the quantizers do (closer to the quantized model).",
)
@click.option(
    "--int4-symmetric/--int4-asymmetric",
    default=False,
    help="Symmetric int4 blocks (no zero points: smaller, faster decode) or asymmetric (the quantizers' grid).",
)
@click.option(
    "--adapter-mode",
    type=click.Choice(["switchable", "merged"]),
    default="switchable",
    help="switchable: the adapter in its own file, chosen (or not) per request; merged: built into the graph, "
    "always on, at nearly base speed (one-adapter deployments).",
)
@click.option(
    "--int4-accuracy-level",
    type=click.IntRange(0, 4),
    default=4,
    help="MatMulNBits compute type: 4 = int8 activations (fastest on CPU), 0 = as the input.",
)
@click.option(
    "--evaluate/--no-evaluate", default=True, help="Score the ONNX model, adapter on and off, on held-out rows."
)
@common.dry_run_option()
def command(
    root: Path,
    force: bool,
    precision: str,
    adapter_name: str,
    int4_block_size: str,
    quantize_lm_head: bool,
    int4_symmetric: bool,
    adapter_mode: str,
    int4_accuracy_level: int,
    evaluate: bool,
    dry_run: bool,
) -> None:
    """Build the int4 ONNX model and the separate LoRA adapter file with Olive.

    \b
    Examples:
      olivepress optimize --precision int4 --adapter-name travel
      olivepress optimize --dry-run      # the Olive workflow it would run, as JSON
    """
    if not adapter_name.isidentifier():
        raise BadInput(f"--adapter-name {adapter_name!r} must be letters, digits and underscores")
    quantized = volume.upstream(root, "optimize", "quantize")
    base = volume.output(root, "quantize", "dequantized")
    if int4_block_size == "auto":
        int4_block_size = str(block_size_for(volume.read_manifest(quantized)["parameters"]["group_size"]))
    adapter = volume.upstream(root, "optimize", "finetune", "adapter")
    parameters = {
        "precision": precision,
        "adapter_name": adapter_name,
        "int4_block_size": int(int4_block_size),
        "quantize_lm_head": quantize_lm_head,
        "int4_symmetric": int4_symmetric,
        "adapter_mode": adapter_mode,
        "int4_accuracy_level": int4_accuracy_level,
        "evaluate": evaluate,
    }
    switchable = adapter_mode == "switchable"
    family = families.of_model_folder(base)
    layers = num_hidden_layers(base)
    if dry_run:
        paths = Paths(base, adapter, layers, volume.scratch_placeholder(root, "optimize-"), TARGET_DEVICE)
        common.print_dry_run("optimize", root, parameters, paths, olive_workflow(parameters, paths))
        return

    def work(out: Path) -> dict:
        with volume.scratch(root, "optimize-") as tmp:
            paths = Paths(base, adapter, layers, tmp, TARGET_DEVICE)
            with builder_linear_layers_uninitialized():
                output = common.run_olive_workflow(olive_workflow(parameters, paths))
            (out / model_folder.ADAPTERS).mkdir(parents=True)
            for weights in output.glob(f"*{model_folder.ADAPTER_SUFFIX}"):
                shutil.move(str(weights), model_folder.adapter_file(out, adapter_name))
            # Olive's own bookkeeping (it names temp paths) is not part of the model.
            (output / "model_config.json").unlink(missing_ok=True)
            shutil.move(str(output), model_folder.model_dir(out))
        complete_genai_config(model_folder.model_dir(out), family, base)
        if switchable and not model_folder.adapter_file(out, adapter_name).is_file():
            raise click.ClickException("Olive wrote no adapter file; see the stage log")
        if switchable and precision == "int4":
            adapter_file = model_folder.adapter_file(out, adapter_name)
            fused = fuse_qkv_lora(model_folder.model_dir(out) / "model.onnx", [adapter_file])
            click.echo(f"q, k and v fused back into one projection with one LoRA in {fused} of {layers} layers")
        if not switchable:
            # What infer reads to serve the model under the adapter's name, with no base to switch to.
            (model_folder.model_dir(out) / model_folder.MERGED_ADAPTER_FILE).write_text(adapter_name + "\n")
        extra: dict = {"adapters": [adapter_name]}
        heldout_file = volume.output(root, "finetune", "heldout")
        if evaluate and heldout_file.is_file() and heldout_file.stat().st_size:
            rows = [json.loads(line) for line in heldout_file.read_text(encoding="utf-8").splitlines()]
            template = volume.read_manifest(volume.stage_dir(root, "finetune"))["parameters"]["text_template"]
            scored = [adapter_name, model_folder.BASE] if switchable else [adapter_name]
            losses = evaluate_.onnx_losses(out, rows, template, scored)
            extra["metrics"] = {"onnx_adapter": losses[adapter_name]}
            if switchable:
                extra["metrics"]["onnx_base"] = losses[model_folder.BASE]
        return extra

    inputs = {"base": base, "adapter": adapter}
    volume.run_stage("optimize", root, inputs, parameters, work, force=force, packages=common.TORCH_STACK)


if __name__ == "__main__":
    common.entrypoint(
        command,
        warm_imports=(
            "olive.workflows",
            "olive.passes.onnx.model_builder",
            "olive.passes.onnx.extract_adapters",
            "onnxruntime_genai.models.builder",
        ),
    )
