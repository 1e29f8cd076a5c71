"""The training data: JSONL rows in one of two formats, checked, split, rendered and tokenized.

- prompt/response rows, ``{"prompt": ..., "response": ...}``, become text through a text template (the lab's by
  default);
- chat rows, ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`` (the format of
  OpenAI's and Azure OpenAI's fine-tuning, multi-turn), become text through the base model's own chat template,
  the one infer and serve use.

The format is chosen by content; ``--data-files`` may name one file or a folder of ``*.jsonl`` files.  Validation
happens before any compute and names every bad line.  The held-out split is deterministic (seeded), so every stage
scores the same rows.

A row renders to pieces of text, each marked as answer or not (``pieces``); its tokens carry that mark
(``example``), so training and every held-out score count the answer tokens only: the response of a
prompt/response row, every assistant turn of a chat row.  Nothing here imports torch.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from contract import families
from contract.exits import BadInput

log = logging.getLogger("olivepress")

# The lab's Phi-3 chat text template (olive finetune --text_template): the default family's.
DEFAULT_TEMPLATE = families.BY_NAME[families.DEFAULT].text_template
RESPONSE_FIELD = "response"
MESSAGES_FIELD = "messages"
ROLES = ("system", "user", "assistant")
PROMPT_RESPONSE, CHAT = "prompt/response", "chat"
# Fewest rows a run takes: one to train on and one held out to score on.
MIN_ROWS = 2
DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "data_sample_travel.jsonl"
# The label of a token the loss skips (PyTorch's cross-entropy ignore_index, which transformers uses).
IGNORE_INDEX = -100
SHOWN_PROBLEMS = 20

# (messages, add_generation_prompt) -> the text the base model's chat template makes of them.
ChatTemplate = Callable[[list[dict[str, str]], bool], str]
# A row's tokens and, per token, whether the loss counts it.
Example = tuple[list[int], list[bool]]


@dataclass(frozen=True)
class Tokenizer:
    """What turning rows into tokens needs of the base model's tokenizer: its encoder (no special tokens added)
    and its chat template (None where the model has none)."""

    encode: Callable[[str], Sequence[int]]
    chat_template: ChatTemplate | None = None


def hf_tokenizer(model: str | Path) -> Tokenizer:
    """The Hugging Face tokenizer of a model folder or hub id, as rendering needs it (imports transformers)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat_template(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    return Tokenizer(encode, chat_template if tokenizer.chat_template else None)


@dataclass(frozen=True)
class Dataset:
    rows: list[dict]  # {template field: text} rows, or {"messages": [{"role", "content"}, ...]} rows
    template: str  # the text template of prompt/response rows (chat rows use the model's chat template)
    sha256: str
    format: str = PROMPT_RESPONSE  # PROMPT_RESPONSE or CHAT

    def subset(self, indices: list[int]) -> Dataset:
        return replace(self, rows=[self.rows[i] for i in indices])

    def texts(self, chat_template: ChatTemplate | None = None) -> list[str]:
        """Each row's whole text, prompt and answer (``chat_template`` renders chat rows)."""
        return [text(row, self.template, chat_template) for row in self.rows]

    def examples(self, tokenizer: Tokenizer, train_on_inputs: bool = False) -> list[Example]:
        return [example(row, self.template, tokenizer, train_on_inputs) for row in self.rows]


def template_fields(template: str) -> list[str]:
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise BadInput(f"text template {template!r} is malformed ({err}); use fields like {{prompt}}") from None
    if not fields or any(not f.isidentifier() for f in fields):
        raise BadInput(f"text template {template!r} must name row fields like {{prompt}} and {{response}}")
    return fields


def jsonl_files(path: Path) -> list[Path]:
    """The file ``--data-files`` names, or the ``*.jsonl`` files of the folder it names, in name order."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".jsonl" and p.is_file())
        if not files:
            raise BadInput(f"data folder {path} holds no .jsonl files; put the JSONL files there, or name one file")
        return files
    raise BadInput(f"data file {path} does not exist; pass --data-files with a JSONL file or a folder of them")


def load_dataset(path: str | Path, template: str = DEFAULT_TEMPLATE) -> Dataset:
    """Parse and check every row of a file or folder; raise one BadInput that lists each bad line and the fix."""
    path = Path(path)
    files = jsonl_files(path)
    digest = hashlib.sha256()
    problems: list[str] = []
    parsed: list[tuple[str, dict]] = []  # (where, row) for every line that is a JSON object
    for file in files:
        raw = file.read_bytes()
        if path.is_dir():  # a folder's hash covers its file names too
            digest.update(f"{file.name}\n{len(raw)}\n".encode())
        digest.update(raw)
        prefix = f"{file.name} " if file != path else ""
        found, bad = _parse_lines(raw, prefix)
        parsed += found
        problems += bad
    chat = [where for where, row in parsed if MESSAGES_FIELD in row]
    other = [where for where, row in parsed if MESSAGES_FIELD not in row]
    if chat and other:
        raise BadInput(
            f"{path} mixes the two row formats: {len(chat)} chat row(s) with {MESSAGES_FIELD!r} (e.g. {chat[0]}) "
            f"and {len(other)} prompt/response row(s) (e.g. {other[0]}); use one format per file or folder"
        )
    if chat:
        rows, expected = _chat_rows(parsed, problems), 'a "messages" list of {"role", "content"} objects'
        fields: list[str] = []
    else:
        fields = template_fields(template)
        rows, expected = _template_rows(parsed, fields, problems), f"non-empty text in {', '.join(fields)}"
        expected += " (the fields of the text template)"
    if problems:
        raise BadInput(
            f"{path}: {len(problems)} bad row(s); each row must be a JSON object with {expected}:\n  "
            + _listing(problems)
        )
    if fields and RESPONSE_FIELD not in fields:
        raise BadInput(
            f"the text template {template!r} names no {{{RESPONSE_FIELD}}} field: the response is what the model "
            f"learns and is scored on; use e.g. the lab's {DEFAULT_TEMPLATE!r}"
        )
    if not rows:
        raise BadInput(
            f"{path} has no rows; it needs JSON lines with {', '.join(fields) or MESSAGES_FIELD} "
            f"(at least {MIN_ROWS}: one to train on, one held out)"
        )
    return Dataset(rows, template, digest.hexdigest(), CHAT if chat else PROMPT_RESPONSE)


def _parse_lines(raw: bytes, prefix: str) -> tuple[list[tuple[str, dict]], list[str]]:
    """The JSON objects of a JSONL file with where each is (``prefix`` + line number), and each line that is not one."""
    rows, problems = [], []
    # A UTF-8 byte-order mark (Windows Notepad writes one) is not part of the first row.
    lines = raw.removeprefix(codecs.BOM_UTF8).splitlines()  # CRLF and a missing final newline alike
    for number, line_bytes in enumerate(lines, start=1):
        where = f"{prefix}line {number}"
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as err:
            problems.append(f"{where}: not valid UTF-8 (byte {line_bytes[err.start]:#04x}); save the file as UTF-8")
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{where}: not valid JSON ({err.msg})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{where}: expected a JSON object, got {type(row).__name__}")
            continue
        rows.append((where, row))
    return rows, problems


def _template_rows(parsed: list[tuple[str, dict]], fields: list[str], problems: list[str]) -> list[dict]:
    rows = []
    for where, row in parsed:
        missing = [f for f in fields if f not in row]
        not_text = [f"{f} ({_json_type(row[f])})" for f in fields if f in row and not isinstance(row[f], str)]
        empty = [f for f in fields if isinstance(row.get(f), str) and not row[f].strip()]
        if missing:
            problems.append(f"{where}: missing field(s) {', '.join(missing)}")
        elif not_text:
            problems.append(f"{where}: field(s) {', '.join(not_text)} must be text (a JSON string)")
        elif empty:
            problems.append(f"{where}: empty field(s) {', '.join(empty)}")
        else:
            rows.append({f: row[f] for f in fields})
    return rows


def _chat_rows(parsed: list[tuple[str, dict]], problems: list[str]) -> list[dict]:
    rows = []
    for where, row in parsed:
        problem = chat_problem(row[MESSAGES_FIELD])
        if problem:
            problems.append(f"{where}: {problem}")
        else:
            rows.append({MESSAGES_FIELD: [{"role": m["role"], "content": m["content"]} for m in row[MESSAGES_FIELD]]})
    return rows


def chat_problem(messages: object) -> str | None:
    """What is wrong with a chat row's messages, or None: each an object with a known role and non-empty text,
    an optional system message first, then user and assistant turns alternating, ending with an assistant turn."""
    if not isinstance(messages, list) or not messages:
        return f"{MESSAGES_FIELD} must be a non-empty list of {{role, content}} objects, got {_json_type(messages)}"
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"message {number} must be an object with role and content"
        role, content = message["role"], message["content"]
        if role not in ROLES:
            return f"message {number} has unknown role {role!r}; use one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"message {number} ({role}) content must be text (a JSON string), got {_json_type(content)}"
        if not content.strip():
            return f"message {number} ({role}) has empty content"
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    if not turns or turns != ["user", "assistant"] * (len(turns) // 2) or len(turns) % 2:
        return (
            f"roles {', '.join(roles)} are not in a valid order: an optional system message first, then user "
            f"and assistant turns alternating, starting with user and ending with assistant"
        )
    return None


def _json_type(value: object) -> str:
    return {
        type(None): "null",
        bool: "true/false",
        int: "a number",
        float: "a number",
        list: "a list",
        str: "text",
    }.get(type(value), "an object")


def _listing(problems: list[str]) -> str:
    more = len(problems) - SHOWN_PROBLEMS
    return "\n  ".join(problems[:SHOWN_PROBLEMS]) + (f"\n  ... and {more} more" if more > 0 else "")


def split(dataset: Dataset, heldout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train / held-out row indices; neither is ever empty (unless ``heldout_fraction`` is 0)."""
    if not 0 <= heldout_fraction < 1:
        raise BadInput(f"--heldout-fraction must be in [0, 1), got {heldout_fraction}")
    needed = 2 if heldout_fraction > 0 else 1
    if len(dataset.rows) < needed:
        raise BadInput(
            f"the data has {len(dataset.rows)} row(s) and needs at least {MIN_ROWS}: one to train (and calibrate) on "
            f"and one held out, to score every model on (with --heldout-fraction 0, one row is enough, but nothing "
            f"is scored)"
        )
    order = list(range(len(dataset.rows)))
    random.Random(seed).shuffle(order)
    n_heldout = round(len(order) * heldout_fraction)
    if heldout_fraction > 0:
        n_heldout = min(max(n_heldout, 1), len(order) - 1)
    return sorted(order[n_heldout:]), sorted(order[:n_heldout])


def unescape(template: str) -> str:
    """Shells pass the lab's template with a literal backslash-n; it means a newline."""
    return template.replace("\\n", "\n")


def rows_sha256(dataset: Dataset, indices: list[int]) -> str:
    """A content hash of the chosen rows, so two runs can tell they scored the same held-out set."""
    payload = json.dumps([dataset.rows[i] for i in indices], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


# Rendering: a row as pieces of text marked answer or not, then as tokens marked the same way.

_RESPONSE_MARK = "\x00olivepress-response\x00"


def pieces(row: dict, template: str, chat_template: ChatTemplate | None) -> list[tuple[str, bool]]:
    """The row's text as consecutive pieces, each with whether it is answer: a prompt/response row's text
    template up to its response field is prompt, the rest answer; in a chat row each assistant turn is answer."""
    if MESSAGES_FIELD in row:
        return _chat_pieces(row[MESSAGES_FIELD], chat_template)
    full = template.format(**row)
    head = template.format(**{**row, RESPONSE_FIELD: _RESPONSE_MARK}).partition(_RESPONSE_MARK)[0]
    return [(head, False), (full[len(head) :], True)]


def text(row: dict, template: str, chat_template: ChatTemplate | None) -> str:
    return "".join(piece for piece, _ in pieces(row, template, chat_template))


def _chat_pieces(messages: list[dict[str, str]], chat_template: ChatTemplate | None) -> list[tuple[str, bool]]:
    """Where each assistant turn lies in the whole conversation's text: after the text that asks for it (the
    turns before it and the generation prompt), up to where the text of the conversation ending with it stops
    agreeing with the whole (its end-of-turn marker included)."""
    if chat_template is None:
        raise BadInput(
            "the data has chat rows (messages), and the base model's tokenizer has no chat template to render "
            "them with; use a model with one (an instruct or chat model), or prompt/response rows with "
            "--text-template"
        )
    full = chat_template(messages, False)
    result, done = [], 0
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        asking = chat_template(messages[:turn], True)
        if not full.startswith(asking) or len(asking) < done:
            raise BadInput(
                "the base model's chat template renders the earlier turns of a conversation differently once it "
                "goes on, so the assistant turns cannot be told apart in it; give each assistant turn its own row "
                "(the conversation up to it)"
            )
        ending_here = chat_template(messages[: turn + 1], False)
        end = next((i for i, (a, b) in enumerate(zip(full, ending_here, strict=False)) if a != b), None)
        end = min(len(full), len(ending_here)) if end is None else end
        result += [(full[done : len(asking)], False), (full[len(asking) : end], True)]
        done = end
    result.append((full[done:], False))
    return [(piece, answer) for piece, answer in result if piece]


def example(row: dict, template: str, tokenizer: Tokenizer, train_on_inputs: bool = False) -> Example:
    """The row's tokens (its whole text tokenized once, so merges match) and, per token, whether the loss counts
    it: answer tokens only, or every token with ``train_on_inputs``.

    A token that straddles the end of a piece belongs to the next piece.
    """
    parts = pieces(row, template, tokenizer.chat_template)
    whole = "".join(piece for piece, _ in parts)
    ids = [int(i) for i in tokenizer.encode(whole)]
    mask, start_char, start_token = [False] * len(ids), 0, 0
    for piece, answer in parts:
        end_char = start_char + len(piece)
        end_token = _tokens_before(tokenizer.encode, whole, ids, end_char)
        if answer or train_on_inputs:
            mask[start_token:end_token] = [True] * (end_token - start_token)
        start_char, start_token = end_char, max(start_token, end_token)
    return ids, mask


def _tokens_before(encode: Callable[[str], Sequence[int]], whole: str, ids: list[int], end: int) -> int:
    """How many of ``ids`` (the tokens of ``whole``) end at or before character ``end``."""
    if end >= len(whole):
        return len(ids)
    while end > 0:
        head = [int(i) for i in encode(whole[:end])]
        if ids[: len(head)] == head:
            return len(head)
        end -= 1  # a token straddles ``end``: it belongs after it
    return 0


@dataclass(frozen=True)
class Packed:
    """Training sequences: rows packed whole, in order, up to ``max_seq_len`` tokens each."""

    sequences: list[dict[str, list[int]]]  # input_ids, attention_mask, labels (IGNORE_INDEX where not trained)
    truncated: int  # rows longer than max_seq_len, cut to it
    dropped: int  # rows with no trained token in their first max_seq_len tokens, left out

    @property
    def tokens(self) -> int:
        return sum(len(s["input_ids"]) for s in self.sequences)

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for s in self.sequences for label in s["labels"])


def pack(examples: list[Example], max_seq_len: int) -> Packed:
    """Pack rows into sequences of at most ``max_seq_len`` tokens: a row starts a new sequence when it does not fit
    in the current one, so a row's answer stays with its prompt; a longer row is cut to ``max_seq_len``.

    Packing rather than padding each row to ``max_seq_len`` keeps a step's cost that of its tokens; a row's
    first token is never trained (nothing predicts it), so rows in one sequence do not train across each other.
    """
    sequences: list[dict[str, list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    truncated = dropped = 0
    for row_ids, mask in examples:
        if len(row_ids) > max_seq_len:
            row_ids, mask, truncated = row_ids[:max_seq_len], mask[:max_seq_len], truncated + 1
        if not any(mask[1:]):
            dropped += 1
            continue
        if len(ids) + len(row_ids) > max_seq_len:
            sequences.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
            ids, labels = [], []
        ids += row_ids
        labels += [IGNORE_INDEX] + [t if m else IGNORE_INDEX for t, m in zip(row_ids[1:], mask[1:], strict=True)]
    if ids:
        sequences.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return Packed(sequences, truncated, dropped)
