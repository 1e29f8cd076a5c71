"""stages.data: both row formats, every bad row named with its line number, CRLF accepted, a deterministic split,
and the answer-only mask and packing that training and scoring share."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from contract.exits import BadInput
from stages import data, tiny_model

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path, text: str | bytes):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_the_lab_dataset_loads_with_crlf_and_no_final_newline():
    raw = data.DEFAULT_DATA.read_bytes()
    assert b"\r\n" in raw and not raw.endswith(b"\n")
    dataset = data.load_dataset(data.DEFAULT_DATA)
    assert len(dataset.rows) == 289
    assert dataset.texts()[0].startswith("<|user|>\n") and dataset.texts()[0].endswith("<|end|>")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n', "line 2: not valid JSON"),
        ('{"prompt": "a", "response": "b"}\r\n{"prompt": "a"}\r\n', "line 2: missing field(s) response"),
        ('{"prompt": " ", "response": "b"}\n', "line 1: empty field(s) prompt"),
        ('["prompt", "response"]\n', "line 1: expected a JSON object, got list"),
        ("\n\n", "has no rows"),
    ],
)
def test_bad_rows_are_named_by_line(tmp_path, content, expected):
    with pytest.raises(BadInput, match="") as err:
        data.load_dataset(write(tmp_path, content))
    assert expected in err.value.message


def test_every_bad_line_is_listed_at_once(tmp_path):
    rows = ['{"prompt": "p", "response": "r"}'] * 3 + ["oops", '{"prompt": "p"}']
    with pytest.raises(BadInput) as err:
        data.load_dataset(write(tmp_path, "\n".join(rows)))
    assert "2 bad row(s)" in err.value.message
    assert "line 4" in err.value.message and "line 5" in err.value.message


def test_missing_file_and_bad_template(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        data.load_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(BadInput, match="malformed"):
        data.load_dataset(data.DEFAULT_DATA, "{prompt")
    with pytest.raises(BadInput, match="missing field"):
        data.load_dataset(data.DEFAULT_DATA, "{question} {answer}")


def test_split_is_seeded_disjoint_and_complete():
    dataset = data.load_dataset(data.DEFAULT_DATA)
    train, heldout = data.split(dataset, 0.1, seed=0)
    assert (train, heldout) == data.split(dataset, 0.1, seed=0)
    assert data.split(dataset, 0.1, seed=1) != (train, heldout)
    assert sorted(train + heldout) == list(range(289)) and len(heldout) == 29
    with pytest.raises(BadInput):
        data.split(dataset, 1.0, seed=0)


def test_unescape_turns_a_typed_backslash_n_into_a_newline():
    assert data.unescape("<|user|>\\n{prompt}") == "<|user|>\n{prompt}"


def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path):
    dataset = data.load_dataset(write(tmp_path, b'\xef\xbb\xbf{"prompt": "a", "response": "b"}\r\n'))
    assert dataset.rows == [{"prompt": "a", "response": "b"}]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("null", "response (null)"), ("3", "response (a number)"), ('["b"]', "response (a list)")],
)
def test_values_that_are_not_text_are_refused_by_line(tmp_path, value, expected):
    rows = '{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": ' + value + "}\n"
    with pytest.raises(BadInput) as err:
        data.load_dataset(write(tmp_path, rows))
    assert "line 2" in err.value.message and expected in err.value.message


def test_invalid_utf8_is_refused_by_line(tmp_path):
    rows = b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n'
    with pytest.raises(BadInput) as err:
        data.load_dataset(write(tmp_path, rows))
    assert "line 2: not valid UTF-8" in err.value.message


def test_a_template_without_a_response_field_is_refused_before_anything_runs():
    with pytest.raises(BadInput, match=r"no \{response\} field"):
        data.load_dataset(data.DEFAULT_DATA, "<|user|>\n{prompt}<|end|>")


@pytest.mark.parametrize("rows", [2, 3, 5, 9])
def test_a_small_file_splits_with_neither_side_empty(tmp_path, rows):
    dataset = data.load_dataset(write(tmp_path, '{"prompt": "a", "response": "b"}\n' * rows))
    train, heldout = data.split(dataset, 0.1, seed=0)
    assert train and heldout and sorted(train + heldout) == list(range(rows))


def test_one_row_says_how_many_are_needed(tmp_path):
    dataset = data.load_dataset(write(tmp_path, '{"prompt": "a", "response": "b"}\n'))
    with pytest.raises(BadInput, match="at least 2"):
        data.split(dataset, 0.1, seed=0)
    assert data.split(dataset, 0.0, seed=0) == ([0], [])


# Chat rows (OpenAI's fine-tuning format) and folders

CHAT_ROW = {
    "messages": [
        {"role": "system", "content": "You are a travel guide."},
        {"role": "user", "content": "Where should I eat in Rome?"},
        {"role": "assistant", "content": "Trastevere.", "weight": 1},
        {"role": "user", "content": "And dessert?"},
        {"role": "assistant", "content": "Gelato."},
    ]
}


def chat_line(*messages) -> str:
    return json.dumps({"messages": [{"role": role, "content": content} for role, content in messages]}) + "\n"


def test_chat_rows_load_multi_turn_and_keep_role_and_content_only(tmp_path):
    dataset = data.load_dataset(
        write(tmp_path, json.dumps(CHAT_ROW) + "\r\n" + chat_line(("user", "a"), ("assistant", "b")))
    )
    assert dataset.format == data.CHAT and len(dataset.rows) == 2
    assert dataset.rows[0]["messages"][2] == {"role": "assistant", "content": "Trastevere."}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (chat_line(("user", "a"), ("bot", "b")), "message 2 has unknown role 'bot'"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": null}]}\n',
            "content must be text (a JSON string), got null",
        ),
        ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}\n', "got a number"),
        (chat_line(("user", "a"), ("assistant", " ")), "message 2 (assistant) has empty content"),
        (chat_line(("assistant", "b")), "not in a valid order"),
        (chat_line(("user", "a"), ("user", "b"), ("assistant", "c")), "not in a valid order"),
        (chat_line(("user", "a"), ("assistant", "b"), ("user", "c")), "ending with assistant"),
        (chat_line(("user", "a"), ("system", "s"), ("assistant", "b")), "not in a valid order"),
        (chat_line(("system", "s")), "not in a valid order"),
        ('{"messages": []}\n', "non-empty list"),
        ('{"messages": "hi"}\n', "got text"),
        ('{"messages": [["user", "a"]]}\n', "message 1 must be an object with role and content"),
        ('{"messages": [{"role": "user"}]}\n', "message 1 must be an object with role and content"),
    ],
)
def test_bad_chat_rows_are_named_by_line(tmp_path, line, expected):
    good = chat_line(("user", "a"), ("assistant", "b"))
    with pytest.raises(BadInput) as err:
        data.load_dataset(write(tmp_path, good + line))
    assert "line 2: " in err.value.message and expected in err.value.message
    assert "line 1" not in err.value.message


def test_every_bad_chat_line_is_listed_in_one_message(tmp_path):
    rows = [chat_line(("user", "a"), ("assistant", "b"))] * 2 + [chat_line(("user", "a")), "nope\n"]
    with pytest.raises(BadInput) as err:
        data.load_dataset(write(tmp_path, b"\xef\xbb\xbf" + "".join(rows).encode() + b'{"messages": "\xe9"}\n'))
    message = err.value.message
    assert "3 bad row(s)" in message and "line 3" in message and "line 4: not valid JSON" in message
    assert "line 5: not valid UTF-8" in message


def test_a_file_mixing_the_formats_is_one_clear_message(tmp_path):
    rows = '{"prompt": "a", "response": "b"}\n' + chat_line(("user", "a"), ("assistant", "b")) + "nope\n"
    with pytest.raises(BadInput) as err:
        data.load_dataset(write(tmp_path, rows))
    assert "mixes the two row formats" in err.value.message
    assert "(e.g. line 2)" in err.value.message and "(e.g. line 1)" in err.value.message


def test_a_folder_of_jsonl_files_loads_in_name_order(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"prompt": "b", "response": "2"}\n')
    (tmp_path / "a.jsonl").write_text('{"prompt": "a", "response": "1"}\n')
    (tmp_path / "notes.txt").write_text("not data")
    dataset = data.load_dataset(tmp_path)
    assert [row["prompt"] for row in dataset.rows] == ["a", "b"] and dataset.format == data.PROMPT_RESPONSE
    (tmp_path / "a.jsonl").rename(tmp_path / "c.jsonl")
    assert data.load_dataset(tmp_path).sha256 != dataset.sha256, "a folder's hash covers its file names"


def test_a_folder_names_the_file_of_each_bad_line_and_refuses_mixed_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "a", "response": "1"}\n{"prompt": "a"}\n')
    (tmp_path / "b.jsonl").write_text(chat_line(("user", "a"), ("assistant", "b")))
    with pytest.raises(BadInput, match=r"mixes the two row formats.*b\.jsonl line 1.*a\.jsonl line 1"):
        data.load_dataset(tmp_path)
    (tmp_path / "b.jsonl").unlink()
    with pytest.raises(BadInput, match=r"a\.jsonl line 2: missing field\(s\) response"):
        data.load_dataset(tmp_path)
    for file in tmp_path.iterdir():
        file.unlink()
    with pytest.raises(BadInput, match="holds no .jsonl files"):
        data.load_dataset(tmp_path)


def test_chat_rows_ignore_the_text_template(tmp_path):
    dataset = data.load_dataset(write(tmp_path, chat_line(("user", "a"), ("assistant", "b"))), "{question}")
    assert dataset.format == data.CHAT


# Rendering and the answer-only mask, against masks made by hand


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> data.Tokenizer:
    """The tiny model's tokenizer (Phi-3's special tokens and chat template), loaded as every stage loads one."""
    folder = tmp_path_factory.mktemp("tokenizer")
    rows = data.load_dataset(data.DEFAULT_DATA).rows
    tiny_model.train_tokenizer([row["prompt"] + "\n" + row["response"] for row in rows], 2048).save_pretrained(folder)
    return data.hf_tokenizer(folder)


def hand_made(tokenizer: data.Tokenizer, *pieces: tuple[str, bool]) -> data.Example:
    """Tokens and mask built piece by piece (the pieces end at special tokens, so the tokens do not merge)."""
    ids, mask = [], []
    for text, answer in pieces:
        piece_ids = list(tokenizer.encode(text))
        ids, mask = ids + piece_ids, mask + [answer] * len(piece_ids)
    return ids, mask


def test_a_prompt_response_row_trains_on_its_response_and_end_marker_only(tiny_tokenizer):
    row = {"prompt": "Where to eat?", "response": "Trastevere, in Rome."}
    expected = hand_made(
        tiny_tokenizer,
        ("<|user|>\nWhere to eat?<|end|>\n<|assistant|>\n", False),
        ("Trastevere, in Rome.<|end|>", True),
    )
    assert data.example(row, data.DEFAULT_TEMPLATE, tiny_tokenizer) == expected
    ids, mask = data.example(row, data.DEFAULT_TEMPLATE, tiny_tokenizer, train_on_inputs=True)
    assert ids == expected[0] and all(mask)


def test_a_chat_row_trains_on_every_assistant_turn_through_the_models_chat_template(tiny_tokenizer):
    row = {"messages": [{"role": m["role"], "content": m["content"]} for m in CHAT_ROW["messages"]]}
    expected = hand_made(
        tiny_tokenizer,
        ("<|system|>\nYou are a travel guide.<|end|>\n<|user|>\nWhere should I eat in Rome?<|end|>\n", False),
        ("<|assistant|>\n", False),
        ("Trastevere.<|end|>\n", True),
        ("<|user|>\nAnd dessert?<|end|>\n<|assistant|>\n", False),
        ("Gelato.<|end|>\n<|endoftext|>", True),
    )
    assert data.example(row, data.DEFAULT_TEMPLATE, tiny_tokenizer) == expected
    assert data.text(row, "", tiny_tokenizer.chat_template) == tiny_tokenizer.chat_template(row["messages"], False)


def test_chat_rows_need_a_chat_template():
    tokenizer = data.Tokenizer(encode=lambda text: [ord(c) for c in text])
    with pytest.raises(BadInput, match="no chat template"):
        data.example({"messages": CHAT_ROW["messages"]}, data.DEFAULT_TEMPLATE, tokenizer)


def test_a_template_that_rewrites_earlier_turns_is_refused():
    def rewriting(messages, add_generation_prompt):  # drops earlier answers, as some reasoning models' templates do
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        shown = [m for i, m in enumerate(messages) if m["role"] != "assistant" or i == last]
        return "".join(f"<{m['role']}>{m['content']}" for m in shown) + ("<assistant>" * add_generation_prompt)

    tokenizer = data.Tokenizer(encode=lambda text: [ord(c) for c in text], chat_template=rewriting)
    with pytest.raises(BadInput, match="own row"):
        data.example({"messages": CHAT_ROW["messages"]}, "", tokenizer)


def test_packing_keeps_rows_whole_masks_prompts_and_cuts_only_a_row_longer_than_a_sequence():
    rows = [
        ([1, 2, 3, 4], [False, False, True, True]),
        ([5, 6, 7], [False, True, True]),
        ([8, 9, 10, 11, 12, 13, 14, 15], [False, False, True, True, True, True, True, True]),
        ([16, 17, 18], [False, False, False]),  # no answer token: nothing to train
        ([19, 20, 21, 22, 23, 24], [False, False, False, False, False, True]),  # its answer is cut off
    ]
    packed = data.pack(rows, max_seq_len=5)
    ignore = data.IGNORE_INDEX
    assert packed.sequences == [
        {"input_ids": [1, 2, 3, 4], "attention_mask": [1] * 4, "labels": [ignore, ignore, 3, 4]},
        {"input_ids": [5, 6, 7], "attention_mask": [1] * 3, "labels": [ignore, 6, 7]},
        {"input_ids": [8, 9, 10, 11, 12], "attention_mask": [1] * 5, "labels": [ignore, ignore, 10, 11, 12]},
    ]
    assert (packed.truncated, packed.dropped, packed.trained_tokens, packed.tokens) == (2, 2, 7, 12)
    together = data.pack(rows[:2], max_seq_len=16).sequences
    assert together == [
        {"input_ids": [1, 2, 3, 4, 5, 6, 7], "attention_mask": [1] * 7, "labels": [ignore, ignore, 3, 4, ignore, 6, 7]}
    ]


def test_importing_data_imports_no_torch():
    script = "import sys; from stages import data; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]"
