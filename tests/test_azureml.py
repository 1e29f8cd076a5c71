"""push / pull against the real azure-ai-ml and azure-identity, with Azurite for blobs and a local HTTPS stand-in for
the Azure ML control plane (tests/azureml_standin.py). Each command runs in its own process, as a user runs it.

Needs Azurite's blob service: scripts/install-azurite.sh installs it under .ci/node (or set AZURITE_BLOB). Without
it these tests fail rather than skip, so CI cannot pass them silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from contract import volume

sys.path.insert(0, str(Path(__file__).resolve().parent))
from azureml_standin import CONTAINER, StandIn, blob_container, make_certs  # noqa: E402
from azurite import Azurite, find_azurite  # noqa: E402

pytestmark = pytest.mark.azure

REPO = Path(__file__).resolve().parent.parent
WORKSPACE = {"AZURE_SUBSCRIPTION_ID": "sub-1", "AZURE_RESOURCE_GROUP": "rg-1", "AZUREML_WORKSPACE_NAME": "ws-1"}
# Variables that would let the credential chain or the SDK reach a real Azure from the test processes.
SCRUBBED_PREFIXES = ("AZURE_", "AZUREML_", "IDENTITY_", "MSI_", "ARM_", "MSAL_")
SCRUBBED = {"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "REQUESTS_CA_BUNDLE"}


@dataclass
class Rig:
    standin: StandIn
    azurite: Azurite
    ca: Path
    container: object
    home_base: Path

    def env(self, credentials: bool = True, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED and not k.startswith(SCRUBBED_PREFIXES)}
        env["HOME"] = str(self.home_base / "user-home")  # no ~/.azure token cache from the machine
        env["PYTHONPATH"] = str(REPO)  # this checkout's olivepress, whatever the venv has installed
        env.update(WORKSPACE)
        if credentials:
            env.update(self.standin.env(self.ca))
        else:
            # No credentials at all. The managed-identity probe (IMDS) goes to a closed loopback port through
            # HTTP_PROXY, so it fails at once and nothing leaves the machine.
            env["HTTP_PROXY"] = f"http://127.0.0.1:{_closed_port()}"
            env["NO_PROXY"] = ""
        env.update(extra)
        return env

    def run(self, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "olivepress.azureml", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=120,
        )

    def blobs(self, prefix: str) -> dict[str, bytes]:
        return {
            b.name[len(prefix) :]: self.container.download_blob(b.name).readall()  # type: ignore[attr-defined]
            for b in self.container.list_blobs(name_starts_with=prefix)  # type: ignore[attr-defined]
        }


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_rig(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Rig]:
    """The control-plane stand-in, Azurite and a throwaway CA, up for the block (shared with the pipeline tests)."""
    binary = find_azurite()
    assert binary, "azurite-blob not found: run scripts/install-azurite.sh (or set AZURITE_BLOB)"
    base = tmp_path_factory.mktemp(name)
    ca, cert, key = make_certs(base / "certs")
    azurite = Azurite(binary, cert, key, base / "azurite")
    standin = StandIn(cert, key, azurite.port)
    try:
        container = blob_container(azurite.account_url, ca)
        (base / "user-home").mkdir()
        yield Rig(standin, azurite, ca, container, base)
    finally:
        standin.close()
        azurite.stop()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with running_rig(tmp_path_factory, "azureml") as started:
        yield started


def make_volume(home: Path, seed: str = "a") -> Path:
    """A volume with quantize, finetune and optimize manifests in the contract's schema and a small model."""
    optimize = home / "optimize"
    files = {
        "model/model.onnx": (seed * 1000).encode(),
        "model/model.onnx.data": os.urandom(300_000),
        "model/genai_config.json": b'{"model": {"type": "llama"}}',
        "model/tokenizer.json": b'{"version": "1.0"}',
        "adapters/travel.onnx_adapter": os.urandom(50_000),
    }
    for rel, data in files.items():
        (optimize / rel).parent.mkdir(parents=True, exist_ok=True)
        (optimize / rel).write_bytes(data)
    (optimize / "log.txt").write_text("local log, not pushed\n")
    common = {"schema": 1, "started": "2026-01-01T00:00:00+00:00", "ended": "2026-01-01T00:01:00+00:00"}
    manifests = {
        "quantize": {
            **common,
            "stage": "quantize",
            "base_model": "microsoft/Phi-3.5-mini-instruct",
            "dtype": "float32",
            "inputs": {"model": {"hub_id": "microsoft/Phi-3.5-mini-instruct"}},
            "parameters": {"algorithm": "gptq", "bits": 4, "group_size": 128},
            "versions": {"olive-ai": "0.13.0", "torch": "2.6.0"},
            "outputs": {},
        },
        "finetune": {
            **common,
            "stage": "finetune",
            "inputs": {"data_files": {"path": "/data/travel.jsonl", "sha256": "d" * 64}},
            "parameters": {
                "method": "lora",
                "max_steps": 20,
                "rank": 8,
                "alpha": 16,
                "learning_rate": 0.0002,
                "seed": 0,
            },
            "versions": {"peft": "0.17.0"},
            "metrics": {"finetuned": {"loss": 1.25, "perplexity": 3.49, "tokens": 40}},
            "outputs": {},
        },
    }
    for stage, manifest in manifests.items():
        (home / stage).mkdir(parents=True, exist_ok=True)
        (home / stage / "manifest.json").write_text(json.dumps(manifest))
    optimize_manifest = {
        **common,
        "stage": "optimize",
        "inputs": {},
        "parameters": {"precision": "int4", "adapter_name": "travel"},
        "versions": {"onnxruntime-genai": "0.14.1"},
        "outputs": volume.tree_hashes(optimize),
        "adapters": ["travel"],
    }
    (optimize / "manifest.json").write_text(json.dumps(optimize_manifest))
    return optimize


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_prefix(version: dict) -> str:
    uri = version["properties"]["modelUri"]
    return uri.split("/paths/", 1)[1].rstrip("/") + "/"


def test_dry_run_prints_the_registration_without_credentials(rig: Rig, tmp_path: Path) -> None:
    make_volume(tmp_path)
    before = len(rig.standin.state.requests)
    result = rig.run("push", "--home", str(tmp_path), "--dry-run", env=rig.env(credentials=False))
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    base, adapter = plan["registrations"]  # the base once, each adapter on its own
    assert base["asset"] == "base" and base["name"] == "ft-for-travel-base"
    assert adapter["name"] == "ft-for-travel-travel" and adapter["type"] == "custom_model"
    assert plan["target"].endswith("/workspaces/ws-1")
    tags = adapter["tags"]
    assert tags["base_model"] == "microsoft/Phi-3.5-mini-instruct"
    assert tags["quantize.algorithm"] == "gptq" and tags["quantize.bits"] == "4"
    assert tags["finetune.max_steps"] == "20" and tags["finetune.data_sha256"] == "d" * 64
    assert tags["version.olive-ai"] == "0.13.0" and tags["version.onnxruntime-genai"] == "0.14.1"
    assert tags["metric.finetune.finetuned.loss"] == "1.25"
    assert "gptq" in adapter["description"]
    assert len(rig.standin.state.requests) == before  # no service contacted

    # The workspace from a config.json, as the portal's "Download config.json" gives it.
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"subscription_id": "s", "resource_group": "g", "workspace_name": "w"}))
    no_env = {k: v for k, v in rig.env(credentials=False).items() if k not in WORKSPACE}
    result = rig.run("push", "--home", str(tmp_path), "--dry-run", "--config", str(config), env=no_env)
    assert json.loads(result.stdout)["target"] == "azureml://subscriptions/s/resourcegroups/g/workspaces/w"


def test_push_uploads_the_files_and_registers_the_tags(rig: Rig, tmp_path: Path) -> None:
    optimize = make_volume(tmp_path)
    result = rig.run("push", "--home", str(tmp_path), "--name", "m-push", env=rig.env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "registered m-push-travel:1" in result.stdout

    registered = rig.standin.state.models["m-push-travel"]["1"]
    tags = registered["properties"]["tags"]
    manifest = json.loads((optimize / "manifest.json").read_text())
    assert tags["olivepress.content"] == volume.digest_of(manifest["outputs"])
    assert tags["finetune.rank"] == "8" and tags["adapters"] == "travel"
    assert "Base model: microsoft/Phi-3.5-mini-instruct" in registered["properties"]["description"]

    blobs = rig.blobs(model_prefix(registered))
    base_blobs = rig.blobs(model_prefix(rig.standin.state.models["m-push-base"]["1"]))
    both = {**base_blobs, **{rel: data for rel, data in blobs.items() if rel != "manifest.json"}}
    assert {rel: sha(data) for rel, data in both.items() if rel in manifest["outputs"]} == manifest["outputs"]
    assert blobs["manifest.json"] == (optimize / "manifest.json").read_bytes()
    assert set(blobs) == {
        "adapters/travel.onnx_adapter",
        "manifest.json",
        "lineage/quantize.json",
        "lineage/finetune.json",
    }
    model_files = {rel for rel in manifest["outputs"] if rel.startswith("model/")}
    assert set(base_blobs) == {*model_files, "manifest.json", "lineage/quantize.json"}
    assert "log.txt" not in blobs and "log.txt" not in base_blobs


def test_second_push_uploads_nothing_and_new_content_gets_the_next_version(rig: Rig, tmp_path: Path) -> None:
    optimize = make_volume(tmp_path)
    env = rig.env()
    assert rig.run("push", "--home", str(tmp_path), "--name", "m-again", env=env).returncode == 0
    tunnels, requests = rig.standin.blob_tunnels, len(rig.standin.state.requests)

    again = rig.run("push", "--home", str(tmp_path), "--name", "m-again", env=env)
    assert again.returncode == 0, again.stderr
    assert "already registered as m-again-travel:1" in again.stdout and "nothing uploaded" in again.stdout
    assert rig.standin.blob_tunnels == tunnels  # not one connection to blob storage
    assert not [r for r in rig.standin.state.requests[requests:] if r[0] == "PUT"]
    assert list(rig.standin.state.models["m-again-travel"]) == ["1"]

    # Same version number, other content: refused, since Azure ML versions are immutable.
    make_volume(tmp_path, seed="b")
    clash = rig.run("push", "--home", str(tmp_path), "--name", "m-again", "--version", "1", env=env)
    assert clash.returncode == 2 and "already exists" in clash.stderr and "next free one (2)" in clash.stderr
    bumped = rig.run("push", "--home", str(tmp_path), "--name", "m-again", env=env)
    assert bumped.returncode == 0 and "registered m-again-travel:2" in bumped.stdout, bumped.stderr
    assert json.loads((optimize / "manifest.json").read_text())["outputs"]["model/model.onnx"] == sha(b"b" * 1000)


def test_missing_credentials_give_the_sign_in_message_and_exit_3(rig: Rig, tmp_path: Path) -> None:
    optimize = make_volume(tmp_path)
    # A corrupt file would be caught by hashing (exit 2): exit 3 shows the credentials are checked first.
    (optimize / "model" / "model.onnx").write_bytes(b"changed")
    before = len(rig.standin.state.requests)
    result = rig.run("push", "--home", str(tmp_path), env=rig.env(credentials=False))
    assert result.returncode == 3, result.stdout + result.stderr
    for way in ("az login", "AZURE_CLIENT_SECRET", "managed identity", "--verbose"):
        assert way in result.stderr
    assert "EnvironmentCredential" not in result.stderr and "Traceback" not in result.stderr
    assert len(rig.standin.state.requests) == before

    verbose = rig.run("push", "--home", str(tmp_path), "--verbose", env=rig.env(credentials=False))
    assert verbose.returncode == 3
    # The SDK's detail once: its duplicate WARNING log line is silenced.
    assert verbose.stderr.count("Attempted credentials") == 1, verbose.stderr
    assert "pull" in rig.run("--help", env=rig.env(credentials=False)).stdout
    assert "3 no usable Azure credentials" in rig.run("push", "--help", env=rig.env(credentials=False)).stdout


def test_a_failed_push_registers_nothing_and_a_transient_error_is_retried(rig: Rig, tmp_path: Path) -> None:
    make_volume(tmp_path)
    env = rig.env()
    rig.standin.fail("PUT", r"/models/m-fail-travel/versions/", 400, count=1)
    failed = rig.run("push", "--home", str(tmp_path), "--name", "m-fail", env=env)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "Nothing was registered" in failed.stderr and "Run the same command again" in failed.stderr
    assert "m-fail-travel" not in rig.standin.state.models

    rig.standin.fail("PUT", r"/models/m-fail-travel/versions/", 503, count=1)
    retried = rig.run("push", "--home", str(tmp_path), "--name", "m-fail", env=env)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert list(rig.standin.state.models["m-fail-travel"]) == ["1"]
    rig.standin.clear_faults()


def test_pull_restores_the_same_files(rig: Rig, tmp_path: Path) -> None:
    source = make_volume(tmp_path / "laptop-a")
    env = rig.env()
    assert rig.run("push", "--home", str(tmp_path / "laptop-a"), "--name", "m-pull", env=env).returncode == 0

    target = tmp_path / "laptop-b"
    pulled = rig.run("pull", "m-pull-travel:1", "--home", str(target), env=env)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert volume.tree_hashes(target / "optimize", exclude=("log.txt",)) == {
        **volume.tree_hashes(source, exclude=("log.txt",)),
        "lineage/quantize.json": volume.sha256_file(target / "optimize" / "lineage" / "quantize.json"),
        "lineage/finetune.json": volume.sha256_file(target / "optimize" / "lineage" / "finetune.json"),
    }
    assert json.loads((target / "optimize" / "lineage" / "finetune.json").read_text())["parameters"]["rank"] == 8
    assert not list(target.glob(".optimize*"))

    again = rig.run("pull", "m-pull-travel", "--home", str(target), env=env)  # latest: the same version
    assert again.returncode == 0 and "nothing downloaded" in again.stdout, again.stderr
    # A pulled model pushes again as the same content (lineage travels with it).
    repush = rig.run("push", "--home", str(target), "--name", "m-pull", env=env)
    assert "already registered as m-pull-travel:1" in repush.stdout, repush.stderr

    missing = rig.run("pull", "m-pull-travel:9", "--home", str(target), env=env)
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_pull_refuses_tampered_blobs_and_leaves_the_volume_alone(rig: Rig, tmp_path: Path) -> None:
    make_volume(tmp_path / "a")
    env = rig.env()
    assert rig.run("push", "--home", str(tmp_path / "a"), "--name", "m-tamper", env=env).returncode == 0
    prefix = model_prefix(rig.standin.state.models["m-tamper-base"]["1"])
    rig.container.upload_blob(prefix + "model/model.onnx", b"tampered", overwrite=True)  # type: ignore[attr-defined]

    other = make_volume(tmp_path / "b", seed="z")
    before = volume.tree_hashes(other)
    refused = rig.run("pull", "m-tamper-travel:1", "--home", str(tmp_path / "b"), env=env)
    assert refused.returncode == 2 and "--force" in refused.stderr  # another model is there
    forced = rig.run("pull", "m-tamper-travel:1", "--home", str(tmp_path / "b"), "--force", env=env)
    assert forced.returncode == 1 and "does not match its sha256" in forced.stderr, forced.stderr
    assert volume.tree_hashes(other) == before
    assert not list((tmp_path / "b").glob(".optimize*"))
    assert CONTAINER  # the container the stand-in's datastore names


def test_the_pipeline_output_pushes_pulls_and_runs(rig: Rig, tiny_run: Path, tmp_path: Path) -> None:
    """The real `olivepress run` volume (conftest's tiny_run, shared with test_run.py): push, pull, infer."""
    env = rig.env()
    pushed = rig.run("push", "--home", str(tiny_run), "--name", "m-real", env=env)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    tags = rig.standin.state.models["m-real-travel"]["1"]["properties"]["tags"]
    assert tags["quantize.algorithm"] == "gptq" and tags["optimize.precision"] == "int4"
    assert tags["adapters"] == "travel" and tags["finetune.data_sha256"]
    assert not list((tiny_run / "cache" / "tmp").glob("push-*")), "push left its staging folder behind"

    laptop = tmp_path / "laptop"
    pulled = rig.run("pull", "m-real-travel", "--home", str(laptop), env=env)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    source = volume.read_manifest(tiny_run / "optimize")
    assert volume.read_manifest(laptop / "optimize") == source
    for rel, digest in source["outputs"].items():
        assert volume.sha256_file(laptop / "optimize" / rel) == digest

    answer = subprocess.run(
        [sys.executable, "-m", "olivepress.cli", "infer", "--home", str(laptop), "--adapter", "travel"]
        + ["--max-new-tokens", "4", "--prompt", "Where should I eat in Rome?"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert volume.read_manifest(laptop / "infer")["inputs"]["model"]["sha256"] == volume.digest_of(source["outputs"])
