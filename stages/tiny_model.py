"""Build a random-weight Phi-3 model with a tokenizer trained offline on the dataset.

It is the embedded default of the pipeline and of the tests (no model hub is
needed), and with ``--config`` a real-size stand-in (the Phi-3.5-mini shapes)
for timing runs: same shapes, same cost, random weights.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import click

from contract import lock, volume
from contract.exits import BadInput
from stages import data

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# The special tokens and chat template of microsoft/Phi-3.5-mini-instruct.
SPECIAL_TOKENS = ["<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Small enough to train in seconds on 2 cores; dimensions are multiples of 128 so every int4 block size fits.
TINY_SHAPES = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "original_max_position_embeddings": 2048,
}


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Phi-3's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=TINY_SHAPES["max_position_embeddings"],
    )


def build(output: Path, data_file: Path, vocab_size: int, seed: int, config_file: Path | None) -> None:
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    dataset = data.load_dataset(data_file)
    tokenizer = train_tokenizer([row["prompt"] + "\n" + row["response"] for row in dataset.rows], vocab_size)
    end_id, eos_id = tokenizer.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"])
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": [end_id, eos_id],
        "pad_token_id": tokenizer.pad_token_id,
    }
    if config_file:
        settings = json.loads(Path(config_file).read_text())
        settings.pop("auto_map", None)  # never point at remote code
        settings.update(ids)
    else:
        settings = {**TINY_SHAPES, "vocab_size": len(tokenizer), "tie_word_embeddings": False, **ids}
    if settings.get("vocab_size", 0) < len(tokenizer):
        raise BadInput(f"the config's vocab_size must be at least the tokenizer's {len(tokenizer)}")
    config = Phi3Config(**settings)
    torch.manual_seed(seed)
    dtype = getattr(torch, str(settings.get("torch_dtype") or settings.get("dtype") or "float32"))
    model = Phi3ForCausalLM(config).to(dtype).eval()
    model.generation_config = GenerationConfig(**ids)
    # Written beside and renamed into place: a killed build never leaves a folder that looks like a model.
    partial = output.with_name(f".{output.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    volume.publish(partial, output)


@click.command("make-tiny-model")
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    help="Folder to write (default: <home>/tiny-model, the pipeline's default base model).",
)
@volume.home_option("Volume root whose tiny-model/ is the default --output")
@click.option(
    "--data-file",
    type=click.Path(path_type=Path),
    default=data.DEFAULT_DATA,
    show_default=True,
    help="JSONL the tokenizer is trained on.",
)
@click.option("--vocab-size", default=2048, show_default=True, help="Tokenizer vocabulary size.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A Hugging Face config.json giving real shapes, e.g. configs/phi-3.5-mini.json (3.8B).",
)
@click.option("--force", is_flag=True, help="Rebuild even if the folder has a model.")
@lock.wait_option
def main(
    output: Path | None,
    root: str | None,
    data_file: Path,
    vocab_size: int,
    seed: int,
    config_file: Path | None,
    force: bool,
) -> None:
    """Build a random-weight Phi-3 model and a tokenizer trained offline on the dataset.

    The result is in Hugging Face layout with the Phi-3 chat tokens, and the
    same seed gives the same bytes.  Without --config it is tiny (about 1.6M
    parameters, seconds to build); with --config it has that config's shapes.
    """
    home = volume.home(root)
    output = (output or volume.tiny_model_dir(home)).resolve()
    if (output / "config.json").is_file() and not force:
        click.echo(f"{output} already holds a model (--force rebuilds it)")
        return
    with lock.writer(home) if output.is_relative_to(home) else contextlib.nullcontext():
        build(output, data_file, vocab_size, seed, config_file)
    click.echo(f"wrote {output}")


if __name__ == "__main__":
    main()
