"""The volume: one home folder holding every stage's published folder, each with its manifest.

Layout under one root (``--home``, env ``OLIVEPRESS_HOME``, default ``./artifacts``)::

    tiny-model/          the embedded default base model (make-tiny-model)
    <stage>/             manifest.json, log.txt and the stage's outputs (contract.registry names them)
    <stage>.failed.log   the log of a failed attempt, until the stage succeeds
    logs/                console output of `olivepress run`, per stage
    cache/               Hugging Face and Olive caches, and scratch folders (cache/tmp)

A stage builds its folder as ``.<stage>.partial`` and renames it into place only
on success, so a crash or Ctrl-C never leaves a half-written stage.  This module
is imported by the slim inference image: it must not import torch or transformers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import click

from contract import registry
from contract.exits import BadInput

HOME_ENV = "OLIVEPRESS_HOME"
DEFAULT_HOME = "artifacts"
MANIFEST = "manifest.json"
LOG = "log.txt"
SCHEMA = 1

log = logging.getLogger("olivepress")


def home_option(help_text: str = "Volume root holding every stage's folder") -> Callable:
    """The --home option (env OLIVEPRESS_HOME) that every command on the volume takes, as a click decorator."""
    return click.option(
        "--home",
        "root",
        envvar=HOME_ENV,
        show_envvar=True,
        type=click.Path(file_okay=False, path_type=Path),
        help=f"{help_text} [default: ./{DEFAULT_HOME}].",
    )


def home(root: str | os.PathLike | None = None) -> Path:
    return Path(root or os.environ.get(HOME_ENV) or DEFAULT_HOME).resolve()


def stage_dir(root: Path, stage: str) -> Path:
    return root / stage


def output(root: Path, stage: str, key: str) -> Path:
    """A named output of a stage on the volume, e.g. ``output(root, "quantize", "dequantized")``."""
    return stage_dir(root, stage) / registry.STAGES[stage].outputs[key]


def tiny_model_dir(root: Path) -> Path:
    return root / "tiny-model"


def use_volume_caches(root: Path) -> None:
    """Point the Hugging Face and Olive caches into the volume, unless the user set them."""
    cache = root / "cache"
    os.environ.setdefault("HF_HOME", str(cache / "huggingface"))
    os.environ.setdefault("OLIVE_CACHE_DIR", str(cache / "olive"))
    os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_hashes(folder: Path, exclude: tuple[str, ...] = (MANIFEST, LOG)) -> dict[str, str]:
    """sha256 of every file below ``folder``, by posix path relative to it, sorted."""
    if folder.is_file():
        return {folder.name: sha256_file(folder)}
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() not in exclude
    }


def tree_bytes(folder: Path) -> int:
    if folder.is_file():
        return folder.stat().st_size
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def digest_of(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def describe_input(value: str | Path) -> dict[str, Any]:
    """Identify an input by content: a stage's output by its manifest, a folder or file by hashing it,
    anything else (a Hugging Face hub id) by name."""
    path = Path(value)
    if not path.exists():
        return {"hub_id": str(value)}
    path = path.resolve()
    for parent in (path, *path.parents):
        manifest = read_manifest(parent)
        if manifest and manifest.get("schema") == SCHEMA:
            rel = path.relative_to(parent).as_posix()
            outputs = {
                k: v for k, v in manifest["outputs"].items() if rel == "." or k == rel or k.startswith(rel + "/")
            }
            return {"path": str(path), "sha256": digest_of(outputs), "stage": manifest["stage"]}
    return {"path": str(path), "sha256": digest_of(tree_hashes(path))}


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _same_work(manifest: dict[str, Any] | None, inputs: dict[str, Any], parameters: dict[str, Any]) -> bool:
    return bool(manifest) and manifest.get("inputs") == inputs and manifest.get("parameters") == parameters


def run_stage(
    stage: str,
    root: Path,
    inputs: dict[str, str | Path],
    parameters: dict[str, Any],
    work: Callable[[Path], dict[str, Any] | None],
    *,
    force: bool = False,
    packages: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run ``work(partial_folder)`` and publish the folder with its manifest, or skip if nothing changed.

    ``work`` returns extra manifest fields (metrics, answers) or None.
    """
    final = stage_dir(root, stage)
    described = {name: describe_input(value) for name, value in inputs.items()}
    existing = read_manifest(final)
    if not force and _same_work(existing, described, parameters):
        log.info("%s: inputs and parameters unchanged, skipped (--force reruns it)", stage)
        return existing  # type: ignore[return-value]

    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".{stage}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    handler = logging.FileHandler(partial / LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # Olive's logger does not propagate to the root logger: give it the file too.
    loggers = [logging.getLogger(), logging.getLogger("olive")]
    for logger in loggers:
        logger.addHandler(handler)
    started = datetime.now(timezone.utc)
    clock = time.perf_counter()
    try:
        extra = work(partial) or {}
        outputs = tree_hashes(partial)
        manifest = {
            "schema": SCHEMA,
            "stage": stage,
            "inputs": described,
            "parameters": parameters,
            "versions": package_versions(packages),
            "started": started.isoformat(timespec="seconds"),
            "ended": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - clock, 2),
            "bytes_in": sum(tree_bytes(Path(d["path"])) for d in described.values() if "path" in d),
            "bytes_out": tree_bytes(partial),
            "outputs": outputs,
            **extra,
        }
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        # The traceback goes to the log file only; the log is kept beside the volume, the partial output is not.
        handler.stream.write(f"{stage} failed:\n{traceback.format_exc()}")
        handler.flush()
        failed_log = root / f"{stage}.failed.log"
        shutil.move(partial / LOG, failed_log)
        shutil.rmtree(partial, ignore_errors=True)
        log.warning("%s failed: nothing was published; its log is %s", stage, failed_log)
        raise
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()
    publish(partial, final)
    (root / f"{stage}.failed.log").unlink(missing_ok=True)
    log.info("%s: done in %.1f s -> %s", stage, manifest["wall_s"], final)
    return manifest


def publish(partial: Path, final: Path) -> None:
    """Swap ``partial`` into ``final``; the old folder is removed only once the new one is in place."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def upstream(root: Path, stage: str, need: str, key: str | None = None) -> Path:
    """The published folder (or one named output) of a stage that ``stage`` needs, or a BadInput saying how to
    make it. Only the stages the registry lists as ``stage``'s needs can be read."""
    if need not in registry.STAGES[stage].needs:
        raise ValueError(f"{stage} reads {need}, which contract/registry.py does not list among its needs")
    folder = published(root, need)
    return folder if key is None else output(root, need, key)


def published(root: Path, stage: str) -> Path:
    """A stage's published folder, or a BadInput saying how to make it."""
    folder = stage_dir(root, stage)
    if read_manifest(folder) is None:
        raise BadInput(f"no {stage} output under {root}: run `olivepress {stage}` first")
    return folder


def _scratch_base(root: Path) -> Path:
    return root / "cache" / "tmp"


@contextmanager
def scratch(root: Path, prefix: str) -> Iterator[Path]:
    """A temporary folder on the volume (not /tmp: real models do not fit there), removed afterwards."""
    base = _scratch_base(root)
    base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def scratch_placeholder(root: Path, prefix: str) -> Path:
    """The folder ``scratch(root, prefix)`` would make, for a dry run to show: its random part drawn at run time
    is shown as XXXXXXXX. Nothing is created."""
    return _scratch_base(root) / f"{prefix}XXXXXXXX"
