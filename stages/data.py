"""The training data: a JSONL of {"prompt", "response"} rows rendered through a text template.

Validation happens before any compute, and names every bad line.  The held-out
split is deterministic (seeded), so every stage scores the same rows.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

from contract.exits import BadInput

# The lab's Phi-3 chat text template (olive finetune --text_template).
DEFAULT_TEMPLATE = "<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"
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
    rows, problems = [], []
    # splitlines() takes CRLF and a missing final newline alike.
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
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
        empty = [f for f in fields if f in row and not str(row[f]).strip()]
        if missing:
            problems.append(f"line {number}: missing field(s) {', '.join(missing)}")
        elif empty:
            problems.append(f"line {number}: empty field(s) {', '.join(empty)}")
        else:
            rows.append({f: str(row[f]) for f in fields})
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise BadInput(
            f"{path}: {len(problems)} bad row(s); each row must be a JSON object with non-empty "
            f"{', '.join(fields)} (the fields of the text template):\n  {shown}"
        )
    if not rows:
        raise BadInput(f"{path} has no rows; it needs JSON lines with {', '.join(fields)}")
    return Dataset(rows=rows, template=template, sha256=hashlib.sha256(raw).hexdigest())


def split(dataset: Dataset, heldout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train / held-out row indices."""
    if not 0 <= heldout_fraction < 1:
        raise BadInput(f"--heldout-fraction must be in [0, 1), got {heldout_fraction}")
    order = list(range(len(dataset.rows)))
    random.Random(seed).shuffle(order)
    n_heldout = round(len(order) * heldout_fraction)
    return sorted(order[n_heldout:]), sorted(order[:n_heldout])


def unescape(template: str) -> str:
    """Shells pass the lab's template with a literal backslash-n; it means a newline."""
    return template.replace("\\n", "\n")


def rows_sha256(dataset: Dataset, indices: list[int]) -> str:
    """A content hash of the chosen rows, so two runs can tell they scored the same held-out set."""
    payload = json.dumps([dataset.rows[i] for i in indices], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()
