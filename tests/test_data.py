"""stages.data: every bad row named with its line number, CRLF accepted, a deterministic split."""

from __future__ import annotations

import pytest

from contract.exits import BadInput
from stages import data


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
