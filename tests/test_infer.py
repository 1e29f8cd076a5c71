"""stages.infer: onnxruntime-genai generation, adapter by name, and no torch on this path."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from contract.model_folder import BASE
from runtime.engine import Engine
from stages import infer


def test_infer_never_imports_torch_or_transformers(tiny_run, tmp_path):
    code = (
        "import sys; from stages import infer; "
        "infer.command(['--home', sys.argv[1], '--model-dir', sys.argv[2], '--prompt', 'Hi', '--max-new-tokens', '4'],"
        " standalone_mode=False); "
        "bad = [m for m in ('torch', 'transformers', 'olive') if m in sys.modules]; "
        "print('IMPORTED', bad)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), str(tiny_run / "optimize")], capture_output=True, text=True
    )
    assert "IMPORTED []" in result.stdout, result.stdout + result.stderr


def test_an_adapter_changes_greedy_output_and_tokens_stream(tiny_run):
    engine = Engine(tiny_run / "optimize")
    assert engine.adapter_names == ["travel"]
    pieces = []
    on = engine.generate("Where to in Spain?", "travel", 16, echo=pieces.append)
    off = engine.generate("Where to in Spain?", BASE, 16)
    assert on.new_tokens == 16 and "".join(pieces) == on.text
    assert on.text != off.text
    assert engine.generate("Where to in Spain?", "travel", 16).text == on.text  # greedy: reproducible


def test_unknown_adapter_and_missing_model_are_clear_errors(tiny_run, tmp_path):
    result = CliRunner().invoke(
        infer.command, ["--home", str(tmp_path), "--model-dir", str(tiny_run / "optimize"), "--adapter", "cooking"]
    )
    assert result.exit_code == 2 and "no adapter named 'cooking'" in result.output and "travel" in result.output
    result = CliRunner().invoke(infer.command, ["--home", str(tmp_path), "--model-dir", str(tmp_path)])
    assert result.exit_code == 2 and "not an optimized model folder" in result.output


def test_answers_file_holds_text_and_manifest_holds_speed(tiny_run):
    answers = json.loads((tiny_run / "infer" / "answers.json").read_text())
    assert set(answers[0]) == {"prompt", "adapter", "text"}
    manifest = json.loads((tiny_run / "infer" / "manifest.json").read_text())
    assert all(a["decode_tokens_per_s"] > 0 for a in manifest["answers"])
