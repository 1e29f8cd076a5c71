"""contract.registry: the one list of stages, and the places that must agree with it."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import yaml

from contract import registry, volume

REPO = Path(__file__).resolve().parent.parent


def test_every_stage_needs_only_stages_before_it():
    seen: set[str] = set()
    for stage in registry.PIPELINE:
        assert set(stage.needs) <= seen, f"{stage.name} needs a stage that does not run before it"
        seen.add(stage.name)


def test_compose_depends_on_matches_the_registry():
    services = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    for stage in registry.PIPELINE:
        assert set(services[stage.name].get("depends_on", {})) == set(stage.needs), stage.name
        assert bool(services[stage.name].get("deploy")) == stage.gpu, stage.name


def test_each_stage_is_a_module_with_a_command_of_its_name():
    for stage in registry.PIPELINE:
        module = importlib.import_module(stage.module)
        assert module.command.name == stage.name


def test_no_stage_module_imports_another_stage_module():
    names = set(registry.NAMES)
    for stage in registry.PIPELINE:
        tree = ast.parse((REPO / "stages" / f"{stage.name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "stages":
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stages."):
                imported.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                imported |= {a.name.split(".")[1] for a in node.names if a.name.startswith("stages.")}
        assert not (imported & names) - {stage.name}, f"stages/{stage.name}.py imports {imported & names}"


def test_a_stage_reads_only_the_stages_it_needs(tmp_path):
    volume.run_stage("quantize", tmp_path, {}, {}, lambda out: (out / "dequantized").mkdir() and None)
    assert volume.upstream(tmp_path, "finetune", "quantize", "dequantized") == tmp_path / "quantize" / "dequantized"
    try:
        volume.upstream(tmp_path, "infer", "quantize")
    except ValueError as error:
        assert "does not list" in str(error)
    else:
        raise AssertionError("infer read quantize, which it does not need")


def test_run_shortcuts_name_stage_settings():
    assert registry.run_shortcuts()["data_files"] == [
        "OLIVEPRESS_QUANTIZE_CALIBRATION_DATA",
        "OLIVEPRESS_FINETUNE_DATA_FILES",
    ]
