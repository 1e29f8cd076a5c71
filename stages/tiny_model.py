"""Build a random-weight model of one decoder family with a tokenizer trained offline on the dataset.

It is the embedded default of the pipeline and of the tests (no model hub is
needed): ``--model tiny`` is the Phi-3 one, ``--model tiny:NAME`` any family of
``contract.families``, each with its real config class and layer layout, its
tokenizer's special tokens and its documented chat template. With ``--config``
it is a real-size stand-in (e.g. the Phi-3.5-mini shapes) for timing runs:
same shapes, same cost, random weights.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import click

from contract import families, lock, volume
from contract.exits import BadInput
from stages import data

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

TINY = "tiny"


def architecture_of(model: str) -> str | None:
    """The family a ``--model`` value names: ``tiny`` is the default family, ``tiny:NAME`` that one; else None."""
    if model == TINY:
        return families.DEFAULT
    name = model.removeprefix(f"{TINY}:")
    if name == model:
        return None
    if name not in families.BY_NAME:
        raise BadInput(
            f"--model {model}: no tiny model {name!r}; choose tiny:NAME with NAME one of {', '.join(families.NAMES)}"
        )
    return name


def train_tokenizer(
    texts: list[str], vocab_size: int, family: families.Family = families.BY_NAME[families.DEFAULT]
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the family's special tokens and chat template (Phi-3's by default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(family.tokens.special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    roles = {"unk_token": family.tokens.unk, "bos_token": family.tokens.bos}
    roles |= {"eos_token": family.tokens.eos, "pad_token": family.tokens.pad}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **{role: token for role, token in roles.items() if token is not None},
        chat_template=family.chat_template,
        model_max_length=family.tiny_config["max_position_embeddings"],
    )


def build(
    output: Path,
    data_file: Path,
    vocab_size: int,
    seed: int,
    config_file: Path | None,
    architecture: str = families.DEFAULT,
) -> None:
    import torch
    import transformers
    from transformers import AutoConfig, GenerationConfig

    family = families.BY_NAME[architecture]
    dataset = data.load_dataset(data_file)
    tokenizer = train_tokenizer([row["prompt"] + "\n" + row["response"] for row in dataset.rows], vocab_size, family)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.convert_tokens_to_ids(list(family.stop_tokens)),
        "pad_token_id": tokenizer.pad_token_id,
    }
    if config_file:
        settings = json.loads(Path(config_file).read_text())
        settings.pop("auto_map", None)  # never point at remote code
        settings.update(ids)
        if settings.get("model_type", family.model_type) != family.model_type:
            raise BadInput(
                f"{config_file} is a {settings['model_type']} config; --architecture {architecture} "
                f"builds {family.model_type} models"
            )
        settings.pop("model_type", None)
    else:
        settings = {**family.tiny_config, "vocab_size": len(tokenizer), **ids}
    if settings.get("vocab_size", 0) < len(tokenizer):
        raise BadInput(f"the config's vocab_size must be at least the tokenizer's {len(tokenizer)}")
    config = AutoConfig.for_model(family.model_type, **settings)
    torch.manual_seed(seed)
    dtype = getattr(torch, str(settings.get("torch_dtype") or settings.get("dtype") or "float32"))
    model = getattr(transformers, family.architecture)(config)
    if family.tiny_random_biases:  # initialised to zero, which the model builder would leave out of the graph
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                torch.nn.init.normal_(module.bias, std=config.initializer_range)
    model = model.to(dtype).eval()
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
    "--architecture",
    type=click.Choice(families.NAMES),
    default=families.DEFAULT,
    show_default=True,
    help="The decoder family (contract/families.py); --model tiny:NAME uses the tiny model of family NAME.",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    help="Folder to write (default: <home>/tiny-model for phi3, the pipeline's default base model; "
    "<home>/tiny-model-NAME for another family).",
)
@volume.home_option("Volume root whose tiny-model/ is the default --output")
@click.option(
    "--data-file",
    type=click.Path(path_type=Path),
    default=data.DEFAULT_DATA,
    show_default=True,
    help="JSONL the tokenizer is trained on.",
)
@click.option(
    "--vocab-size",
    default=2048,
    show_default=True,
    help="Tokenizer vocabulary size. Not the width of a linear layer (the tiny MLP's 512): onnxruntime-genai 0.14.1's "
    "builder takes every linear layer as wide as the vocabulary for the output projection.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A Hugging Face config.json of the family giving real shapes, e.g. configs/phi-3.5-mini.json (3.8B).",
)
@click.option("--force", is_flag=True, help="Rebuild even if the folder has a model.")
@lock.wait_option
def main(
    architecture: str,
    output: Path | None,
    root: str | None,
    data_file: Path,
    vocab_size: int,
    seed: int,
    config_file: Path | None,
    force: bool,
) -> None:
    """Build a random-weight model of one decoder family and a tokenizer trained offline on the dataset.

    The result is in Hugging Face layout with the family's config class, chat
    tokens and chat template, and the same seed gives the same bytes.  Without
    --config it is tiny (about 1.6M parameters, seconds to build); with
    --config it has that config's shapes.
    """
    home = volume.home(root)
    output = (output or volume.tiny_model_dir(home, architecture)).resolve()
    if (output / "config.json").is_file() and not force:
        click.echo(f"{output} already holds a model (--force rebuilds it)")
        return
    with lock.writer(home) if output.is_relative_to(home) else contextlib.nullcontext():
        build(output, data_file, vocab_size, seed, config_file, architecture)
    click.echo(f"wrote {output}")


if __name__ == "__main__":
    main()
