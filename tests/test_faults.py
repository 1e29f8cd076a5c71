"""The fault suite: what a user can do to a volume, or what can happen to it, and what olivepress does then.

Each case asserts outcomes, not wording: the exit code, that no traceback reached the terminal, that nothing
half-written was published, that nothing finished was redone, and that no leftovers remain. Cases that need root
(a read-only bind mount, a small tmpfs for a full disk) skip without it; CI runs as root.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_STEPS, olivepress

from contract import lock, registry, volume

pytestmark = pytest.mark.slow


def no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr


def copy_volume(source: Path, target: Path) -> Path:
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)
    return target


def manifests(home: Path) -> dict[str, dict | None]:
    return {stage: volume.manifest_or_none(home / stage) for stage in registry.NAMES}


def leftovers(home: Path) -> list[str]:
    found = [p.name for p in home.glob(".*") if p.name != lock.LOCK_FILE]
    found += [p.name for p in (home / "cache" / "tmp").glob("*")] if (home / "cache" / "tmp").is_dir() else []
    return found


def verified(home: Path) -> None:
    result = olivepress("verify", home=home, check=False)
    assert result.returncode == 0, result.stdout


# --- relocation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["cp -a", "mv"])
def test_a_copied_or_moved_volume_skips_every_stage(tiny_run, tmp_path, how):
    copied = copy_volume(tiny_run, tmp_path / "copy")
    if how == "mv":
        copied = copied.rename(tmp_path / "moved")
    before = manifests(copied)
    result = olivepress("run", "--max-steps", TINY_STEPS, home=copied)
    assert result.stderr.count("skipped") == len(registry.NAMES), result.stderr
    assert manifests(copied) == before


# --- corrupted and truncated outputs ------------------------------------------------------------------------------


def biggest_output(home: Path, stage: str) -> Path:
    outputs = volume.read_manifest(home / stage)["outputs"]
    return max((home / stage / name for name in outputs), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("stage", registry.NAMES)
def test_a_corrupted_output_reruns_its_stage_and_the_volume_verifies_again(tiny_run, tmp_path, stage):
    home = copy_volume(tiny_run, tmp_path / "home")
    before = manifests(home)
    damaged = biggest_output(home, stage)
    with damaged.open("r+b") as f:
        f.truncate(damaged.stat().st_size // 2)
    assert olivepress("verify", home=home, check=False).returncode == 1
    result = olivepress("run", "--max-steps", TINY_STEPS, home=home)
    no_traceback(result)
    after = manifests(home)
    assert after[stage]["started"] >= before[stage]["started"] and after[stage] != before[stage], "not rerun"
    assert after[stage]["outputs"] == before[stage]["outputs"], "the rerun made other files"
    earlier = registry.NAMES[: registry.NAMES.index(stage)]
    assert all(after[s] == before[s] for s in earlier), "a stage before the damaged one was redone"
    verified(home)


@pytest.mark.parametrize("stage", ["quantize", "optimize"])
def test_a_truncated_manifest_reruns_its_stage(tiny_run, tmp_path, stage):
    home = copy_volume(tiny_run, tmp_path / "home")
    manifest = home / stage / volume.MANIFEST
    manifest.write_bytes(manifest.read_bytes()[:100])
    status = olivepress("status", "--json", home=home)
    assert "corrupt" in json.loads(status.stdout)[registry.NAMES.index(stage)]["state"]
    result = olivepress("run", "--max-steps", TINY_STEPS, home=home)
    no_traceback(result)
    verified(home)


def test_a_stage_reading_a_corrupted_upstream_names_the_file_and_the_fix(tiny_run, tmp_path):
    home = copy_volume(tiny_run, tmp_path / "home")
    adapter = home / "finetune" / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    result = olivepress("optimize", "--force", home=home, check=False)
    no_traceback(result)
    assert result.returncode == 2
    assert "adapter_model.safetensors" in result.stderr and "olivepress finetune" in result.stderr


# --- one writer at a time -----------------------------------------------------------------------------------------


def test_a_second_writer_is_told_who_writes_and_can_wait(tiny_run, tmp_path):
    home = copy_volume(tiny_run, tmp_path / "home")
    with lock.writer(home):
        busy = olivepress("infer", "--force", home=home, check=False)
        assert busy.returncode == 5 and f"PID {os.getpid()}" in busy.stderr, busy.stderr
        no_traceback(busy)
        assert olivepress("status", home=home).returncode == 0  # readers are never blocked
        assert olivepress("infer", home=home).returncode == 0  # nor is a stage that skips
        waiting = subprocess.Popen(
            [sys.executable, "-m", "olivepress.cli", "infer", "--force", "--wait"],
            env=dict(os.environ, OLIVEPRESS_HOME=str(home)),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(3)
        assert waiting.poll() is None, "--wait did not wait"
    out, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, err
    assert not (home / lock.LOCK_FILE).exists()


def test_two_runs_started_together_publish_one_valid_volume(tmp_path):
    home = tmp_path / "home"
    env = dict(os.environ, OLIVEPRESS_HOME=str(home))
    command = [sys.executable, "-m", "olivepress.cli", "run", "--max-steps", "5"]
    first = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    second = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    _, first_err = first.communicate(timeout=900)
    codes = sorted([first.returncode, second.returncode])
    assert codes == [0, 5], (codes, first_err, second.stderr)
    no_traceback(second)
    verified(home)
    assert not leftovers(home)


# --- killed at any moment -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", registry.NAMES)
def test_kill_9_at_a_random_moment_then_a_rerun_finishes_without_redoing_anything(tiny_run, tmp_path, stage):
    """The whole process tree is killed (as by the OOM killer or a power cut) while ``stage`` runs; the rerun
    redoes only that stage and what follows, and its outputs are the same bytes as an uninterrupted run's."""
    home = copy_volume(tiny_run, tmp_path / "home")
    later = registry.NAMES[registry.NAMES.index(stage) :]
    for name in later:
        shutil.rmtree(home / name)
    before = manifests(home)
    process = subprocess.Popen(
        [sys.executable, "-m", "olivepress.cli", "run", "--max-steps", TINY_STEPS],
        env=dict(os.environ, OLIVEPRESS_HOME=str(home)),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # A seeded moment inside the stage: wait for its partial folder, then a random share of a few seconds.
    rng = random.Random(f"kill-{stage}")
    deadline = time.monotonic() + 300
    while not (home / f".{stage}.partial").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(rng.uniform(0, 3))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    published = volume.manifest_or_none(home / stage)
    if published is not None:  # it finished before the kill: then it must be whole
        verified(home)
    result = olivepress("run", "--max-steps", TINY_STEPS, home=home)
    no_traceback(result)
    after = manifests(home)
    assert all(after[s] == before[s] for s in before if s not in later), "a finished stage was redone"
    for name in later:
        assert after[name]["outputs"] == volume.read_manifest(tiny_run / name)["outputs"], name
    assert not leftovers(home), leftovers(home)
    verified(home)


# --- where the home cannot be written ------------------------------------------------------------------------------


def mounted(*args: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def test_a_read_only_home_runs_while_everything_skips_and_says_so_when_it_must_write(tiny_run, tmp_path):
    home = copy_volume(tiny_run, tmp_path / "home")
    view = tmp_path / "read-only"
    view.mkdir()
    if not (mounted("--bind", str(home), str(view)) and mounted("-o", "remount,bind,ro", str(view))):
        pytest.skip("needs root and mount for a read-only bind mount")
    try:
        result = olivepress("run", "--max-steps", TINY_STEPS, home=view)
        no_traceback(result)
        assert result.stderr.count("skipped") == len(registry.NAMES)
        changed = olivepress("run", "--max-steps", "7", home=view, check=False)
        no_traceback(changed)
        assert changed.returncode == 2 and "not writable" in changed.stderr
    finally:
        subprocess.run(["umount", str(view)], check=False)


def test_a_home_under_a_file_is_one_message(tmp_path):
    (tmp_path / "file").write_text("x")
    for verb in (["run"], ["quantize"], ["status"]):
        result = olivepress(*verb, home=tmp_path / "file" / "home", check=False)
        assert result.returncode == 2, (verb, result.stderr)
        assert "is a file" in result.stderr
        no_traceback(result)


def test_a_full_disk_is_one_message_and_publishes_nothing(tiny_run, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if not mounted("-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)):
        pytest.skip("needs root and mount for a small tmpfs")
    try:
        shutil.copytree(tiny_run / "tiny-model", small / "tiny-model")
        result = olivepress("quantize", home=small, check=False)
        no_traceback(result)
        assert result.returncode == 1 and "no space left" in result.stderr, result.stderr
        assert not (small / "quantize").exists() and not leftovers(small)
    finally:
        subprocess.run(["umount", str(small)], check=False)


# --- bad data, through the whole pipeline --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b'{"prompt": "a", "response": null}\n' * 3,
        b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n',
        b'{"prompt": "only one row", "response": "b"}\n',
    ],
    ids=["null", "invalid-utf8", "one-row"],
)
def test_bad_data_stops_the_run_before_any_compute(tmp_path, content):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    result = olivepress("run", "--data-files", str(data), home=tmp_path / "home", check=False)
    no_traceback(result)
    assert result.returncode == 2
    assert not (tmp_path / "home" / "quantize").exists()
