"""stages.finetune: LoRA on the quantized weights, on the train split only, with input checks first."""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import string

import pytest
import torch
from click.testing import CliRunner
from conftest import olivepress

from contract import volume
from contract.exits import BadInput
from stages import data, finetune


def invoke(home, *args):
    return CliRunner().invoke(finetune.command, ["--home", str(home), *args])


def test_the_adapter_targets_phi3_projections_and_names_its_base_by_volume_path(tiny_run):
    config = json.loads((tiny_run / "finetune" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 64 and config["lora_alpha"] == 16
    assert config["target_modules"] == sorted(config["target_modules"]) and "qkv_proj" in config["target_modules"]
    assert config["base_model_name_or_path"] == "quantize/dequantized"
    manifest = volume.read_manifest(tiny_run / "finetune")
    assert manifest["inputs"]["base"]["stage"] == "quantize"
    assert manifest["split"]["train_rows"] + manifest["split"]["heldout_rows"] == 289


def test_bad_rows_are_reported_with_line_numbers_and_nothing_is_written(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\r\n{"prompt": "a", "response": ""}\r\nnope')
    result = invoke(tmp_path, "--data-files", str(bad))
    assert result.exit_code == 2
    assert "line 2: empty field(s) response" in result.output and "line 3: not valid JSON" in result.output
    assert list(tmp_path.iterdir()) == [bad]


def test_finetune_before_quantize_says_what_to_run(tmp_path):
    result = invoke(tmp_path)
    assert result.exit_code == 2 and "run `olivepress quantize` first" in result.output


def test_qlora_on_a_cpu_is_refused_clearly(tiny_run, tmp_path):
    result = invoke(tiny_run, "--method", "qlora")
    assert result.exit_code == 2 and "needs a CUDA GPU" in result.output


def test_two_gloo_processes_train_data_parallel_and_save_one_adapter(tiny_run, tmp_path):
    from safetensors.torch import load_file

    adapters = {}
    for processes in ("1", "2"):
        home = tmp_path / f"p{processes}"
        shutil.copytree(tiny_run / "quantize", home / "quantize")
        result = invoke(home, "--max-steps", "4", "--processes", processes, "--no-evaluate")
        assert result.exit_code == 0, result.output
        assert volume.read_manifest(home / "finetune")["world_size"] == int(processes)
        adapters[processes] = load_file(home / "finetune" / "adapter" / "adapter_model.safetensors")
    single, double = adapters["1"], adapters["2"]
    assert {k: v.shape for k, v in single.items()} == {k: v.shape for k, v in double.items()}
    # Same seed and data: only a real data-parallel run (other shards, twice the batch) trains other weights.
    assert any(not torch.equal(single[k], double[k]) for k in single)
    assert not list((tmp_path / "p2").glob(".finetune.partial"))


def test_processes_must_be_a_count(tmp_path):
    result = invoke(tmp_path, "--processes", "two")
    assert result.exit_code == 2 and "--processes must be a whole number" in result.output


def noise(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits + string.punctuation) for _ in range(length))


def noisy_rows(count: int) -> list[dict[str, str]]:
    """Travel answers to prompts of random characters: a model cannot predict the prompts, so their tokens would
    move the loss if they leaked into it."""
    rng = random.Random(0)
    answers = [row["response"] for row in data.load_dataset(data.DEFAULT_DATA).rows[:count]]
    return [{"prompt": noise(rng, 60), "response": answer} for answer in answers]


def hand_made_labels(tokenizer: data.Tokenizer, rows: list[dict[str, str]], train_on_inputs: bool) -> list[int]:
    """The labels of rows packed in one sequence, built piece by piece from the template's text by hand."""
    labels = []
    for row in rows:
        prompt = tokenizer.encode(f"<|user|>\n{row['prompt']}<|end|>\n<|assistant|>\n")
        answer = tokenizer.encode(f"{row['response']}<|end|>")
        row_labels = list(prompt if train_on_inputs else [data.IGNORE_INDEX] * len(prompt)) + list(answer)
        labels += [data.IGNORE_INDEX] + row_labels[1:]  # nothing predicts a row's first token
    return labels


def test_training_labels_are_the_answers_unless_training_on_inputs(tiny_run, caplog):
    tokenizer = data.hf_tokenizer(tiny_run / "quantize" / "dequantized")
    rows = noisy_rows(3)
    dataset = data.Dataset(rows, data.DEFAULT_TEMPLATE, "")
    for train_on_inputs in (False, True):
        packed = finetune.training_data(dataset, tokenizer, 512, train_on_inputs)
        (sequence,) = packed.sequences
        assert sequence["labels"] == hand_made_labels(tokenizer, rows, train_on_inputs)
        ids = [t for label, t in zip(sequence["labels"], sequence["input_ids"], strict=True) if label != -100]
        assert [label for label in sequence["labels"] if label != -100] == ids
    examples = dataset.examples(tokenizer)
    longest_prompt = max(mask.index(True) for _, mask in examples)
    shortest_row = min(len(ids) for ids, _ in examples)
    cut = longest_prompt + 2  # every row cut, every row keeping answer tokens
    assert cut < shortest_row
    with caplog.at_level(logging.WARNING, logger="olivepress"):
        packed = finetune.training_data(dataset, tokenizer, cut, False)
    assert packed.truncated == 3 and f"3 of 3 train rows are longer than --max-seq-len {cut}" in caplog.text
    assert [len(sequence["input_ids"]) for sequence in packed.sequences] == [cut] * 3
    with pytest.raises(BadInput, match="raise --max-seq-len"):
        finetune.training_data(dataset, tokenizer, min(mask.index(True) for _, mask in examples), False)


def test_the_loss_the_trainer_reports_is_the_loss_on_the_answers(tiny_run, tmp_path):
    """Olive's trainer, one step from the untrained adapter (LoRA starts as a no-op), reports the base model's
    loss on its batch: the answer tokens' loss, and with --train-on-inputs the loss on every token; the two differ
    by far more than the log's rounding, so a prompt token leaking into the loss fails this test."""
    from transformers import AutoModelForCausalLM

    rows = noisy_rows(4)
    data_file = tmp_path / "noisy.jsonl"
    finetune.write_rows(rows, data_file)
    train_idx, _ = data.split(data.load_dataset(data_file), 0.25, seed=0)
    train = [rows[i] for i in train_idx]
    tokenizer = data.hf_tokenizer(tiny_run / "quantize" / "dequantized")
    model = AutoModelForCausalLM.from_pretrained(tiny_run / "quantize" / "dequantized", dtype=torch.float32)
    texts = [data.text(row, data.DEFAULT_TEMPLATE, None) for row in train]
    input_ids = torch.tensor([[token for text in texts for token in tokenizer.encode(text)]])
    expected = {}
    with torch.no_grad():
        for train_on_inputs in (False, True):
            labels = torch.tensor([hand_made_labels(tokenizer, train, train_on_inputs)])
            expected[train_on_inputs] = model.eval()(input_ids=input_ids, labels=labels).loss.item()
    assert abs(expected[True] - expected[False]) > 0.005, "the data cannot tell the two losses apart"
    for train_on_inputs in (False, True):
        home = tmp_path / f"inputs-{train_on_inputs}"
        shutil.copytree(tiny_run / "quantize", home / "quantize")
        args = ["--data-files", str(data_file), "--heldout-fraction", "0.25", "--max-steps", "1", "--no-evaluate"]
        result = olivepress("finetune", *args, *["--train-on-inputs"] * train_on_inputs, home=home)
        (reported,) = re.findall(r"'loss': '?([0-9.]+)", result.stdout + result.stderr)
        assert float(reported) == pytest.approx(expected[train_on_inputs], abs=6e-4), (train_on_inputs, expected)
        assert volume.read_manifest(home / "finetune")["training_data"]["sequences"] == 1
