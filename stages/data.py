"""The training data: a JSONL of {"prompt", "response"} rows rendered through a text template.

Validation happens before any compute, and names every bad line.  The held-out
split is deterministic (seeded), so every stage scores the same rows.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

from contract import families
from contract.exits import BadInput

# The lab's Phi-3 chat text template (olive finetune --text_template): the default family's.
DEFAULT_TEMPLATE = families.BY_NAME[families.DEFAULT].text_template
RESPONSE_FIELD = "response"
# Fewest rows a run takes: one to train on and one held out to score on.
MIN_ROWS = 2
DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "data_sample_travel.jsonl"


@dataclass(frozen=True)
class Dataset:
    rows: list[dict[str, str]]
    template: str
    sha256: str

    def texts(self) -> list[str]:
        return [self.template.format(**row) for row in self.rows]


def template_fields(template: str) -> list[str]:
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise BadInput(f"text template {template!r} is malformed ({err}); use fields like {{prompt}}") from None
    if not fields or any(not f.isidentifier() for f in fields):
        raise BadInput(f"text template {template!r} must name row fields like {{prompt}} and {{response}}")
    return fields


def load_dataset(path: str | Path, template: str = DEFAULT_TEMPLATE) -> Dataset:
    """Parse and check every row; raise one BadInput that lists each bad line and the fix."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"data file {path} does not exist; pass --data-files with a JSONL file")
    raw = path.read_bytes()
    fields = template_fields(template)
    problems, rows = [], []
    # A UTF-8 byte-order mark (Windows Notepad writes one) is not part of the first row.
    lines = raw.removeprefix(codecs.BOM_UTF8).splitlines()  # CRLF and a missing final newline alike
    for number, line_bytes in enumerate(lines, start=1):
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as err:
            problems.append(
                f"line {number}: not valid UTF-8 (byte {line_bytes[err.start]:#04x}); save the file as UTF-8"
            )
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"line {number}: not valid JSON ({err.msg})")
            continue
        if not isinstance(row, dict):
            problems.append(f"line {number}: expected a JSON object, got {type(row).__name__}")
            continue
        missing = [f for f in fields if f not in row]
        not_text = [f"{f} ({_json_type(row[f])})" for f in fields if f in row and not isinstance(row[f], str)]
        empty = [f for f in fields if isinstance(row.get(f), str) and not row[f].strip()]
        if missing:
            problems.append(f"line {number}: missing field(s) {', '.join(missing)}")
        elif not_text:
            problems.append(f"line {number}: field(s) {', '.join(not_text)} must be text (a JSON string)")
        elif empty:
            problems.append(f"line {number}: empty field(s) {', '.join(empty)}")
        else:
            rows.append({f: row[f] for f in fields})
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise BadInput(
            f"{path}: {len(problems)} bad row(s); each row must be a JSON object with non-empty text in "
            f"{', '.join(fields)} (the fields of the text template):\n  {shown}"
        )
    if RESPONSE_FIELD not in fields:
        raise BadInput(
            f"the text template {template!r} names no {{{RESPONSE_FIELD}}} field: the response is what the model "
            f"learns and is scored on; use e.g. the lab's {DEFAULT_TEMPLATE!r}"
        )
    if not rows:
        raise BadInput(f"{path} has no rows; it needs JSON lines with {', '.join(fields)}")
    return Dataset(rows=rows, template=template, sha256=hashlib.sha256(raw).hexdigest())


def _json_type(value: object) -> str:
    return {type(None): "null", bool: "true/false", int: "a number", float: "a number", list: "a list"}.get(
        type(value), "an object"
    )


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
