"""The decoder families olivepress takes through every stage, declared once.

Each stage reads its family's row here, from the model's config.json (``model_type``, before any weights are
downloaded or loaded): quantize refuses a family it cannot take, finetune takes its LoRA targets, optimize its stop
tokens, make-tiny-model its config class, tokenizer tokens and chat template, and the README's "Models" table is
``markdown()``. Torch-free (the standard library and click), so the slim image can read it too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from contract.exits import BadInput

# The builder olivepress pins, and the decoder architectures its ``create_model`` dispatches on
# (onnxruntime_genai/models/builder.py). Olive 0.13's ModelBuilder pass calls it; 0.15-0.18 break that call.
BUILDER = "onnxruntime-genai 0.14.1"
BUILDER_ARCHITECTURES = frozenset(
    {
        "ChatGLMForConditionalGeneration",
        "ChatGLMModel",
        "Ernie4_5ForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "GptOssForCausalLM",
        "GraniteForCausalLM",
        "HunYuanDenseV1ForCausalLM",
        "InternLM2ForCausalLM",
        "Lfm2ForCausalLM",
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "NemotronForCausalLM",
        "OlmoForCausalLM",
        "PhiForCausalLM",
        "Phi3ForCausalLM",
        "Phi3SmallForCausalLM",
        "PhiMoEForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "SmolLM3ForCausalLM",
    }
)
# What the tiny pipeline of each family runs in CI (tests/test_families.py), on a CPU.
CPU_STAGES = (
    "quantize (gptq, rtn), finetune, optimize (int4 switchable and merged, fp32), infer, serve and chat (one engine)"
)

FUSED_PHI3 = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
SEPARATE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Tokens:
    """A tokenizer's special tokens, in id order (the tiny tokenizers put them first), and the roles some play."""

    special: tuple[str, ...]
    eos: str
    pad: str
    bos: str | None = None
    unk: str | None = None


@dataclass(frozen=True)
class Family:
    """One decoder family and what each stage needs to know about it."""

    name: str  # what make-tiny-model --architecture and --model tiny:NAME take
    title: str
    example: str  # a hub id of the family
    model_type: str  # config.json's model_type
    architecture: str  # config.json's architectures[0]: the class the builder dispatches on
    # The family's documented chat format: the tiny tokenizer's template, which infer, serve and chat render through.
    chat_template: str
    # One {prompt}/{response} row in that format: what quantize calibrates on, finetune trains on and every stage
    # scores, unless --text-template says otherwise. Rendering it gives what the chat template gives for one turn.
    text_template: str
    tokens: Tokens
    # Every token that ends an assistant turn; optimize makes sure genai_config.json's eos_token_id holds each.
    stop_tokens: tuple[str, ...]
    # finetune's default --target-modules, and every projection a LoRA can target in this family.
    lora_targets: tuple[str, ...]
    projections: tuple[str, ...]
    # The tiny model's config beyond the vocabulary: small shapes, the family's own settings.
    tiny_config: Mapping[str, Any]
    # config.json values that tell this family from another of the same model_type.
    marks: Mapping[str, Any] = field(default_factory=dict)
    # The tiny model draws its projection biases at random (initialised to zero, the builder would drop them).
    tiny_random_biases: bool = False
    # Components that cannot take this family, by name (an --algorithm), with why and what would be needed.
    refused: Mapping[str, str] = field(default_factory=dict)
    # A config.json key whose value bounds the ONNX model's context: the builder's graph computes what the model
    # does only up to there, so optimize caps genai_config.json's context_length at it.
    context_limit: str | None = None
    limits: tuple[str, ...] = ()
    # The attention finetune must train with, where the family computes something one kernel cannot; else None and
    # finetune takes the faster on its device.
    training_attention: str | None = None
    # What the AWQ run on a GPU found (benchmarks/families_gpu.py, benchmarks/results/families_gpu.md).
    gpu: str = "pending"

    def matches(self, config: Mapping[str, Any]) -> bool:
        return config.get("model_type") == self.model_type and all(
            config.get(key) == value for key, value in self.marks.items()
        )


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


# Shapes every tiny model shares: small enough to train in seconds on 2 cores, dimensions multiples of 128 so every
# int4 block size fits, and grouped-query attention (2 key/value heads for 4 query heads) where the family uses it.
_SHAPES = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 2048,
}
_GQA = {"num_key_value_heads": 2, "head_dim": 64}

QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

FAMILIES: tuple[Family, ...] = (
    Family(
        name="phi3",
        gpu="passed (one H200)",
        title="Phi-3, Phi-3.5",
        example="microsoft/Phi-3.5-mini-instruct",
        model_type="phi3",
        architecture="Phi3ForCausalLM",
        # microsoft/Phi-3.5-mini-instruct's template; the row is the Olive lab's --text_template.
        chat_template=PHI3_CHAT_TEMPLATE,
        text_template="<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>",
        tokens=Tokens(
            special=("<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
            unk="<unk>",
            bos="<s>",
            eos="<|endoftext|>",
            pad="<|endoftext|>",
        ),
        stop_tokens=("<|end|>", "<|endoftext|>"),
        # Olive's own default for phi3 (PEFT has none): attention only, fused q/k/v.
        lora_targets=("o_proj", "qkv_proj"),
        projections=FUSED_PHI3,
        tiny_config=_frozen(
            {
                **_SHAPES,
                "num_key_value_heads": 4,
                "original_max_position_embeddings": 2048,
                "tie_word_embeddings": False,
            }
        ),
    ),
    Family(
        name="phi4-mini",
        gpu="passed (one H200)",
        title="Phi-4-mini",
        example="microsoft/Phi-4-mini-instruct",
        model_type="phi3",
        architecture="Phi3ForCausalLM",
        # microsoft/Phi-4-mini-instruct's template without its tool-calling branch.
        chat_template=(
            "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
        ),
        text_template="<|user|>{prompt}<|end|><|assistant|>{response}<|end|>",
        tokens=Tokens(
            special=("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>"),
            unk="<|endoftext|>",
            bos="<|endoftext|>",
            eos="<|endoftext|>",
            pad="<|endoftext|>",
        ),
        stop_tokens=("<|end|>", "<|endoftext|>"),
        lora_targets=("o_proj", "qkv_proj"),
        projections=FUSED_PHI3,
        # Phi-4-mini's layout: partial rotary embeddings, LongRoPE (two caches), tied embeddings.
        tiny_config=_frozen(
            {
                **_SHAPES,
                "num_key_value_heads": 2,
                "max_position_embeddings": 4096,
                "original_max_position_embeddings": 2048,
                "partial_rotary_factor": 0.75,
                "rope_scaling": {
                    "type": "longrope",
                    "short_factor": [round(1.0 + 0.01 * i, 2) for i in range(24)],
                    "long_factor": [round(1.0 + 0.5 * i, 2) for i in range(24)],
                },
                "tie_word_embeddings": True,
            }
        ),
        marks=_frozen({"partial_rotary_factor": 0.75}),
    ),
    Family(
        name="llama",
        gpu="passed (one H200)",
        title="Llama 3",
        example="meta-llama/Llama-3.2-1B-Instruct",
        model_type="llama",
        architecture="LlamaForCausalLM",
        # meta-llama/Meta-Llama-3-8B-Instruct's template (3.1 and later add a dated system header).
        chat_template=(
            "{% set loop_messages = messages %}{% for message in loop_messages %}"
            "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
            "+ message['content'] | trim + '<|eot_id|>' %}"
            "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
        ),
        text_template=(
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n{response}<|eot_id|>"
        ),
        tokens=Tokens(
            special=(
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                "<|eom_id|>",
                "<|finetune_right_pad_id|>",
            ),
            bos="<|begin_of_text|>",
            eos="<|eot_id|>",
            pad="<|finetune_right_pad_id|>",
        ),
        stop_tokens=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        projections=SEPARATE,
        # Llama 3.2's layout: tied embeddings and Llama 3.1's RoPE scaling.
        tiny_config=_frozen(
            {
                **_SHAPES,
                **_GQA,
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 1024,
                },
                "tie_word_embeddings": True,
            }
        ),
        limits=(
            "the default text template is Llama 3.0's; 3.1 and later render a dated system turn too, and Llama 2 "
            "(also model_type llama) has its own format: pass --text-template to train in it",
        ),
    ),
    Family(
        name="mistral",
        gpu="passed (one H200)",
        title="Mistral",
        example="mistralai/Mistral-7B-Instruct-v0.3",
        model_type="mistral",
        architecture="MistralForCausalLM",
        # mistralai/Mistral-7B-Instruct-v0.3's template without its tool-calling branch: a system message goes
        # in front of the last user turn.
        chat_template=(
            "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
            "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
            "{{- bos_token }}{%- for message in loop_messages %}"
            "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{- raise_exception('After the optional system message, conversation roles must alternate "
            "user/assistant/user/assistant/...') }}{%- endif %}"
            "{%- if message['role'] == 'user' %}"
            "{%- if loop.last and system_message is defined %}"
            "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
            "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
            "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] | trim + eos_token }}"
            "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of "
            "an initial optional system message!') }}{%- endif %}{%- endfor %}"
        ),
        text_template="<s>[INST] {prompt}[/INST] {response}</s>",
        tokens=Tokens(
            special=("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), unk="<unk>", bos="<s>", eos="</s>", pad="</s>"
        ),
        stop_tokens=("</s>",),
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        projections=SEPARATE,
        tiny_config=_frozen(
            {
                **_SHAPES,
                **_GQA,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_window": None,
                "tie_word_embeddings": False,
            }
        ),
        limits=("roles must alternate user/assistant (the template refuses otherwise: a 400 from serve)",),
    ),
    Family(
        name="qwen2",
        gpu="passed (one H200)",
        title="Qwen2.5, Qwen2",
        example="Qwen/Qwen2.5-0.5B-Instruct",
        model_type="qwen2",
        architecture="Qwen2ForCausalLM",
        # Qwen/Qwen2.5-0.5B-Instruct's template without its tool-calling branches (ChatML, a default system turn).
        chat_template=(
            "{% if messages[0]['role'] == 'system' %}"
            "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
            "{% else %}{{ '<|im_start|>system\n" + QWEN25_SYSTEM + "<|im_end|>\n' }}{% endif %}"
            "{% for message in messages %}{% if message['role'] != 'system' or not loop.first %}"
            "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
        ),
        text_template=(
            "<|im_start|>system\n" + QWEN25_SYSTEM + "<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
            "<|im_start|>assistant\n{response}<|im_end|>"
        ),
        tokens=Tokens(special=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos="<|im_end|>", pad="<|endoftext|>"),
        stop_tokens=("<|im_end|>", "<|endoftext|>"),
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        projections=SEPARATE,
        # Qwen2.5-0.5B's layout: biases on q/k/v, tied embeddings.
        tiny_config=_frozen(
            {
                **_SHAPES,
                "num_key_value_heads": 2,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                "use_sliding_window": False,
                "tie_word_embeddings": True,
            }
        ),
        tiny_random_biases=True,
        limits=(
            "the default text template has Qwen2.5's default system turn; Qwen2's renders 'You are a helpful "
            "assistant.': pass --text-template to train in it",
        ),
    ),
    Family(
        name="gemma2",
        gpu="passed (one H200)",
        title="Gemma 2",
        example="google/gemma-2-2b-it",
        model_type="gemma2",
        architecture="Gemma2ForCausalLM",
        # google/gemma-2-2b-it's template.
        chat_template=(
            "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
            "{{ raise_exception('System role not supported') }}{% endif %}"
            "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
            "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
            "{% else %}{% set role = message['role'] %}{% endif %}"
            "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
        ),
        text_template="<bos><start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n{response}<end_of_turn>",
        tokens=Tokens(
            special=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
            unk="<unk>",
            bos="<bos>",
            eos="<eos>",
            pad="<pad>",
        ),
        stop_tokens=("<end_of_turn>", "<eos>"),
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        projections=SEPARATE,
        # Gemma 2's layout: 4 norms per layer, logit soft-capping, alternating sliding-window layers, tied embeddings.
        tiny_config=_frozen(
            {
                **_SHAPES,
                **_GQA,
                "query_pre_attn_scalar": 64,
                "sliding_window": 1024,
                "tie_word_embeddings": True,
            }
        ),
        # Attention logit soft-capping, which scaled_dot_product_attention cannot compute (transformers refuses it).
        training_attention="eager",
        context_limit="sliding_window",
        limits=(
            "no system role: the chat template refuses a system message (serve answers 400)",
            f"the ONNX model's context is the sliding window (4096 of 8192 tokens): {BUILDER}'s builder slides the "
            "odd layers where Gemma 2 slides the even ones, which agree only up to the window",
        ),
    ),
)

NAMES: tuple[str, ...] = tuple(family.name for family in FAMILIES)
BY_NAME: Mapping[str, Family] = MappingProxyType({family.name: family for family in FAMILIES})
DEFAULT = "phi3"


class UnsupportedModel(BadInput):
    """A model whose family olivepress does not take, or that one of the pinned components cannot take."""


def verified() -> str:
    return ", ".join(f"{family.name} ({family.title})" for family in FAMILIES)


def of_config(config: Mapping[str, Any], model: str = "the model") -> Family:
    """The family of a model from its config.json's content, or UnsupportedModel naming what cannot take it."""
    model_type = config.get("model_type")
    candidates = [family for family in FAMILIES if family.model_type == model_type]
    # A family with marks is the more specific one: it goes first.
    for family in sorted(candidates, key=lambda family: not family.marks):
        if family.matches(config):
            return family
    architecture = (config.get("architectures") or ["(none named)"])[0]
    if architecture in BUILDER_ARCHITECTURES:
        why = (
            f"{BUILDER}'s model builder lists {architecture}, but olivepress has not verified it through its stages "
            "(chat template, LoRA targets, stop tokens); it needs a row in contract/families.py and a tiny model"
        )
    else:
        why = (
            f"{BUILDER}'s model builder cannot export {architecture}, so optimize could not build it; that needs an "
            "onnxruntime-genai whose builder lists it and an Olive release that calls that builder (Olive 0.13 "
            "works with 0.14.1 only)"
        )
    raise UnsupportedModel(
        f"{model} is a {model_type or 'model without a model_type'} model ({architecture}): {why}. "
        f'The families olivepress takes: {verified()} (README, "Models").'
    )


def of_model_folder(folder: Path) -> Family:
    """The family of a Hugging Face model folder, from its config.json."""
    return of_config(json.loads((folder / "config.json").read_text()), str(folder))


def refuse(family: Family, component: str) -> None:
    """Stop before any work where ``component`` (e.g. an --algorithm) cannot take ``family``."""
    if component in family.refused:
        raise UnsupportedModel(f"{component} cannot take {family.title} models: {family.refused[component]}")


def markdown() -> str:
    """The README's "Models" table."""
    rows = [
        "| family | example hub id | verified on a CPU | on a GPU | LoRA targets (default) | known limits |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for family in FAMILIES:
        limits = "; ".join([*family.limits, *(f"{component}: {why}" for component, why in family.refused.items())])
        rows.append(
            f"| {family.title} (`tiny:{family.name}`) | `{family.example}` | {CPU_STAGES} | "
            f"awq: {family.gpu} | {', '.join(f'`{t}`' for t in family.lora_targets)} | {limits or '-'} |"
        )
    return "\n".join(rows) + "\n"
