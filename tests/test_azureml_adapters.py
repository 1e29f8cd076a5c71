"""Adapters as their own Azure ML assets (olivepress/azureml/assets.py): the base is registered once and found again by
its content, so a second adapter uploads only itself, and a laptop that has the base downloads only the adapter.

Same rig as tests/test_azureml.py (real azure-ai-ml and azure-identity in their own processes, Azurite, the
control-plane stand-in); bytes are counted at the stand-in's blob proxy, TLS included.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from contract import volume

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import olivepress  # noqa: E402
from test_azureml import REPO, Rig, make_volume, model_prefix, running_rig  # noqa: E402

pytestmark = pytest.mark.azure


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with running_rig(tmp_path_factory, "azureml-adapters") as started:
        yield started


def second_adapter(source: Path, home: Path, adapter: str = "other") -> Path:
    """A copy of ``source``'s volume as `olivepress finetune --seed 1` and `olivepress optimize --adapter-name other`
    leave it: the same base files, another adapter, its own finetune lineage and held-out figures."""
    shutil.copytree(source, home)
    optimize = home / "optimize"
    for old in (optimize / "adapters").iterdir():
        old.unlink()
    (optimize / "adapters" / f"{adapter}.onnx_adapter").write_bytes(os.urandom(40_000))
    manifest = json.loads((optimize / "manifest.json").read_text())
    manifest["outputs"] = volume.tree_hashes(optimize)
    manifest["adapters"] = [adapter]
    manifest["parameters"]["adapter_name"] = adapter
    manifest["metrics"] = {"onnx_adapter": {"loss": 2.5, "perplexity": 12.18, "tokens": 40}}
    (optimize / "manifest.json").write_text(json.dumps(manifest))
    finetune = json.loads((home / "finetune" / "manifest.json").read_text())
    finetune["parameters"]["seed"] = 1
    finetune["inputs"]["data_files"]["sha256"] = "e" * 64
    (home / "finetune" / "manifest.json").write_text(json.dumps(finetune))
    return optimize


def launcher(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``olivepress ...`` in its own process with the rig's environment (the workspace, the stand-in's sign-in)."""
    command = [sys.executable, "-m", "olivepress.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def model_bytes(optimize: Path) -> int:
    return sum(p.stat().st_size for p in (optimize / "model").rglob("*") if p.is_file())


def blob_names(rig: Rig) -> set[str]:
    return {b.name for b in rig.container.list_blobs()}  # type: ignore[attr-defined]


@dataclass
class Pair:
    """Two adapters for one base, pushed as m-pair from two build volumes (travel first, then other)."""

    first: Path  # the build volume of travel
    second: Path  # the build volume of other
    second_push: subprocess.CompletedProcess
    sent: int  # bytes the second push sent to blob storage
    new_blobs: set[str]  # the blobs the second push created


@pytest.fixture(scope="module")
def pair(rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    base = tmp_path_factory.mktemp("pair")
    first = base / "gpu-travel"
    make_volume(first)
    env = rig.env()
    pushed = rig.run("push", "--home", str(first), "--name", "m-pair", env=env)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert "registered m-pair-base:1" in pushed.stdout and "registered m-pair-travel:1" in pushed.stdout

    second = base / "gpu-other"
    second_adapter(first, second)
    blobs, (sent, _) = blob_names(rig), rig.standin.blob_bytes
    pushed = rig.run("push", "--home", str(second), "--name", "m-pair", env=env)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    return Pair(first, second, pushed, rig.standin.blob_bytes[0] - sent, blob_names(rig) - blobs)


def test_a_second_adapter_for_the_same_base_uploads_only_the_adapter(rig: Rig, pair: Pair) -> None:
    out = pair.second_push.stdout
    assert "already registered as m-pair-base:1" in out and "registered m-pair-other:1" in out, out
    assert list(rig.standin.state.models["m-pair-base"]) == ["1"]

    # No base bytes: what went to blob storage is the adapter (40 kB) and its manifests, not the base (300 kB).
    base_size = model_bytes(pair.second / "optimize")
    assert base_size > 300_000 and pair.sent < 40_000 + 20_000 < base_size, pair.sent
    other = rig.standin.state.models["m-pair-other"]["1"]
    prefix = model_prefix(other)
    assert {name.removeprefix(prefix) for name in pair.new_blobs} == {
        "adapters/other.onnx_adapter",
        "manifest.json",
        "lineage/quantize.json",
        "lineage/finetune.json",
    }

    # The adapter names its base and carries its own lineage.
    tags = other["properties"]["tags"]
    manifest = volume.read_manifest(pair.second / "optimize")
    base_files = {rel: d for rel, d in manifest["outputs"].items() if rel.startswith("model/")}
    assert tags["olivepress.asset"] == "adapter" and tags["olivepress.adapter"] == "other"
    assert tags["olivepress.base.name"] == "m-pair-base" and tags["olivepress.base.version"] == "1"
    assert tags["olivepress.base.content"] == volume.digest_of(base_files)
    assert tags["olivepress.content"] == volume.digest_of(manifest["outputs"])
    assert tags["finetune.seed"] == "1" and tags["finetune.data_sha256"] == "e" * 64
    assert tags["metric.optimize.onnx_adapter.loss"] == "2.5" and tags["optimize.adapter_name"] == "other"
    assert tags["quantize.algorithm"] == "gptq" and int(tags["olivepress.bytes"]) == 40_000
    base_tags = rig.standin.state.models["m-pair-base"]["1"]["properties"]["tags"]
    assert base_tags["olivepress.asset"] == "base" and base_tags["olivepress.content"] == volume.digest_of(base_files)
    assert "optimize.adapter_name" not in base_tags and not any(t.startswith("finetune.") for t in base_tags)

    # Both pushed again: nothing uploaded at all.
    sent = rig.standin.blob_bytes[0]
    again = rig.run("push", "--home", str(pair.first), "--name", "m-pair", env=rig.env())
    assert again.returncode == 0 and again.stdout.count("nothing uploaded") == 2, again.stdout + again.stderr
    assert rig.standin.blob_bytes[0] == sent


def test_an_adapter_onto_a_laptop_that_has_its_base_downloads_only_the_adapter(
    rig: Rig, pair: Pair, tmp_path: Path
) -> None:
    env = rig.env()
    laptop = tmp_path / "laptop"
    first = rig.run("pull", "m-pair-travel", "--home", str(laptop), env=env)
    assert first.returncode == 0 and "with its base m-pair-base:1" in first.stdout, first.stdout + first.stderr
    assert volume.read_manifest(laptop / "optimize") == volume.read_manifest(pair.first / "optimize")

    received = rig.standin.blob_bytes[1]
    second = rig.run("pull", "m-pair-other:1", "--home", str(laptop), env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "onto its base already there (m-pair-base:1, not downloaded)" in second.stdout
    assert "restart it to serve other" in second.stdout
    downloaded = rig.standin.blob_bytes[1] - received
    assert downloaded < 40_000 + 20_000 < model_bytes(laptop / "optimize"), downloaded

    # One folder: the base, both adapters, a manifest listing every file, which `olivepress verify` checks.
    optimize = laptop / "optimize"
    manifest = volume.read_manifest(optimize)
    assert manifest["adapters"] == ["other", "travel"]
    assert volume.changed_outputs(optimize, manifest, full=True) == {}
    files = volume.tree_hashes(optimize)
    assert set(manifest["outputs"]) == {rel for rel in files if not rel.startswith("lineage/")}
    assert manifest["outputs"]["adapters/other.onnx_adapter"] == volume.sha256_file(
        pair.second / "optimize" / "adapters" / "other.onnx_adapter"
    )
    verify = olivepress("verify", home=laptop, check=False)
    assert verify.returncode == 0 and "optimize  ok: " in verify.stdout, verify.stdout
    assert (
        json.loads((optimize / "lineage" / "adapters" / "other" / "finetune.json").read_text())["parameters"]["seed"]
        == 1
    )
    assert not list(laptop.glob(".optimize*")) and not list((laptop / "cache" / "tmp").glob("pull-*"))

    # Again: nothing; the laptop's two adapters push as what is registered.
    again = rig.run("pull", "m-pair-other", "--home", str(laptop), env=env)
    assert again.returncode == 0 and "nothing downloaded" in again.stdout, again.stderr
    sent = rig.standin.blob_bytes[0]
    repush = rig.run("push", "--home", str(laptop), "--name", "m-pair", env=env)
    assert repush.returncode == 0 and repush.stdout.count("nothing uploaded") == 3, repush.stdout + repush.stderr
    assert rig.standin.blob_bytes[0] == sent

    # `olivepress adapters`: the volume's, with their lineage; with the workspace, the registry's for this base.
    local = olivepress("adapters", "--home", str(laptop), "--json", home=laptop)
    rows = json.loads(local.stdout)["adapters"]
    assert [(r["adapter"], r["registered"], r["bytes"]) for r in rows] == [
        ("other", None, 40_000),
        ("travel", None, 50_000),
    ]
    assert rows[0]["tags"]["finetune.seed"] == "1" and rows[1]["tags"]["finetune.rank"] == "8"
    table = olivepress("adapters", "--home", str(laptop), home=laptop).stdout
    assert "other" in table and "travel" in table and "eeeeeeeeeeee" in table and "2.500" in table
    listed = launcher("adapters", "--home", str(laptop), "--name", "m-pair", "--json", env=env)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    registered = [r for r in json.loads(listed.stdout)["adapters"] if r["registered"]]
    assert [(r["registered"], r["on_volume"]) for r in registered] == [
        ("m-pair-other:1", True),
        ("m-pair-travel:1", True),
    ]


def test_an_adapter_for_another_base_is_refused(rig: Rig, pair: Pair, tmp_path: Path) -> None:
    env = rig.env()
    other_base = make_volume(tmp_path / "laptop", seed="z")
    before = volume.tree_hashes(other_base)
    received = rig.standin.blob_bytes[1]
    refused = rig.run("pull", "m-pair-other:1", "--home", str(tmp_path / "laptop"), env=env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "is an adapter for the base m-pair-base:1" in refused.stderr
    assert "an adapter runs only on the base it was trained for" in refused.stderr and "--force" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert volume.tree_hashes(other_base) == before and rig.standin.blob_bytes[1] == received

    # --force replaces the folder with the adapter's base and the adapter.
    forced = rig.run("pull", "m-pair-other:1", "--home", str(tmp_path / "laptop"), "--force", env=env)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert volume.read_manifest(other_base) == volume.read_manifest(pair.second / "optimize")


def merge(optimize: Path) -> None:
    """``optimize`` as `olivepress optimize --adapter-mode merged` leaves it: no adapters/, the adapter in the graph."""
    shutil.rmtree(optimize / "adapters")
    (optimize / "model" / "olivepress_merged_adapter.txt").write_text("travel\n")
    manifest = json.loads((optimize / "manifest.json").read_text())
    manifest["parameters"]["adapter_mode"] = "merged"
    manifest["outputs"] = volume.tree_hashes(optimize)
    (optimize / "manifest.json").write_text(json.dumps(manifest))


def test_a_merged_build_is_still_one_model(rig: Rig, pair: Pair, tmp_path: Path) -> None:
    optimize = make_volume(tmp_path / "gpu")
    merge(optimize)
    env = rig.env()
    dry = rig.run("push", "--home", str(tmp_path / "gpu"), "--name", "m-merged", "--dry-run", env=env)
    (plan,) = json.loads(dry.stdout)["registrations"]
    assert plan["asset"] == "model" and plan["name"] == "m-merged"

    pushed = rig.run("push", "--home", str(tmp_path / "gpu"), "--name", "m-merged", env=env)
    assert pushed.returncode == 0 and "registered m-merged:1" in pushed.stdout, pushed.stdout + pushed.stderr
    assert "m-merged-base" not in rig.standin.state.models and "m-merged-travel" not in rig.standin.state.models
    registered = rig.standin.state.models["m-merged"]["1"]
    manifest = volume.read_manifest(optimize)
    tags = registered["properties"]["tags"]
    assert tags["olivepress.asset"] == "model" and tags["olivepress.content"] == volume.digest_of(manifest["outputs"])
    blobs = rig.blobs(model_prefix(registered))
    assert set(blobs) == {*manifest["outputs"], "manifest.json", "lineage/quantize.json", "lineage/finetune.json"}

    laptop = tmp_path / "laptop"
    pulled = rig.run("pull", "m-merged", "--home", str(laptop), env=env)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert volume.read_manifest(laptop / "optimize") == manifest
    assert "nothing downloaded" in rig.run("pull", "m-merged:1", "--home", str(laptop), env=env).stdout

    # An adapter cannot go onto a merged build: its graph is not the adapter's base.
    refused = rig.run("pull", "m-pair-travel", "--home", str(laptop), env=env)
    assert refused.returncode == 2 and "a merged build" in refused.stderr, refused.stderr


def test_a_real_second_adapter_shares_the_base_and_runs_on_the_laptop(rig: Rig, tiny_run: Path, tmp_path: Path) -> None:
    """The tiny run's volume, finetuned again with another seed and optimized as `other`: the ONNX base is the same
    file for file, so the second push uploads only the adapter, and the laptop runs both."""
    gpu = tmp_path / "gpu"
    shutil.copytree(tiny_run, gpu, ignore=shutil.ignore_patterns("cache"))
    env = rig.env()
    assert rig.run("push", "--home", str(gpu), "--name", "m-tiny", env=env).returncode == 0
    laptop = tmp_path / "laptop"
    assert rig.run("pull", "m-tiny-travel", "--home", str(laptop), env=env).returncode == 0

    olivepress("finetune", "--seed", "1", "--max-steps", "5", home=gpu)
    olivepress("optimize", "--adapter-name", "other", home=gpu)
    assert volume.read_manifest(gpu / "optimize")["adapters"] == ["other"]
    sent = rig.standin.blob_bytes[0]
    pushed = rig.run("push", "--home", str(gpu), "--name", "m-tiny", env=env)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert "already registered as m-tiny-base:1" in pushed.stdout and "registered m-tiny-other:1" in pushed.stdout
    assert rig.standin.blob_bytes[0] - sent < model_bytes(gpu / "optimize") / 2

    received = rig.standin.blob_bytes[1]
    pulled = rig.run("pull", "m-tiny-other", "--home", str(laptop), env=env)
    assert pulled.returncode == 0 and "not downloaded" in pulled.stdout, pulled.stdout + pulled.stderr
    assert rig.standin.blob_bytes[1] - received < model_bytes(laptop / "optimize") / 2
    for adapter in ("travel", "other"):
        answer = olivepress(
            "infer",
            "--adapter",
            adapter,
            "--max-new-tokens",
            "4",
            "--prompt",
            "Where should I eat in Rome?",
            home=laptop,
        )
        assert answer.returncode == 0
    assert olivepress("verify", home=laptop, check=False).returncode == 0
