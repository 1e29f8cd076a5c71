"""The volume: one home folder holding every stage's published folder, each with its manifest.

Layout under one root (``--home``, env ``OLIVEPRESS_HOME``, default ``./artifacts``)::

    tiny-model/          the embedded default base model (make-tiny-model)
    tiny-model-<family>/ the tiny model of another family (--model tiny:<family>)
    <stage>/             manifest.json, log.txt and the stage's outputs (contract.registry names them)
    <stage>.failed.log   the log of a failed attempt, until the stage succeeds
    logs/                console output of `olivepress run`, per stage
    cache/               Hugging Face and Olive caches, and scratch folders (cache/tmp)

A stage builds its folder as ``.<stage>.partial`` and renames it into place only
on success, so a crash or Ctrl-C never leaves a half-written stage.  This module
is imported by the slim inference image: it must not import torch or transformers.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import click

from contract import exits, families, lock, registry
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
    path = Path(root or os.environ.get(HOME_ENV) or DEFAULT_HOME).resolve()
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise BadInput(f"--home {path} is under {folder}, which is a file; point --home at a folder")
            break
    return path


def stage_dir(root: Path, stage: str) -> Path:
    return root / stage


def output(root: Path, stage: str, key: str) -> Path:
    """A named output of a stage on the volume, e.g. ``output(root, "quantize", "dequantized")``."""
    return stage_dir(root, stage) / registry.STAGES[stage].outputs[key]


def tiny_model_dir(root: Path, architecture: str = families.DEFAULT) -> Path:
    """Where make-tiny-model builds the tiny model of a family: ``tiny-model`` is the default family's."""
    return root / ("tiny-model" if architecture == families.DEFAULT else f"tiny-model-{architecture}")


def use_volume_caches(root: Path) -> None:
    """Point the Hugging Face and Olive caches into the volume, unless the user set them."""
    cache = root / "cache"
    os.environ.setdefault("HF_HOME", str(cache / "huggingface"))
    os.environ.setdefault("OLIVE_CACHE_DIR", str(cache / "olive"))
    os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")


class ManifestError(BadInput):
    """A manifest.json that exists but cannot be read as one: the stage's output can no longer be trusted."""


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """A stage folder's manifest, None where there is none, ManifestError where it is unreadable or corrupt."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as error:
        raise ManifestError(
            f"{path} is unreadable or corrupt ({type(error).__name__}); run `olivepress {folder.name}` again to "
            f"remake the stage"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("outputs"), dict):
        raise ManifestError(f"{path} is not an olivepress manifest; run `olivepress {folder.name}` again")
    return manifest


def manifest_or_none(folder: Path) -> dict[str, Any] | None:
    """read_manifest, with a corrupt manifest counted as none (the stage then runs again)."""
    try:
        return read_manifest(folder)
    except ManifestError as error:
        log.warning("%s", error.message)
        return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_hashes(folder: Path, exclude: tuple[str, ...] = (MANIFEST, LOG)) -> dict[str, str]:
    """sha256 of every file below ``folder``, by posix path relative to it, sorted.

    Files are hashed on several threads (hashlib lets go of the GIL): a quantize output holds two multi-GB models.
    """
    if folder.is_file():
        return {folder.name: sha256_file(folder)}
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).as_posix() not in exclude]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(sha256_file, files))
    return {p.relative_to(folder).as_posix(): digest for p, digest in zip(files, digests, strict=True)}


def tree_bytes(folder: Path) -> int:
    if folder.is_file():
        return folder.stat().st_size
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def digest_of(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def describe_input(value: str | Path | dict[str, Any], root: Path) -> dict[str, Any]:
    """Identify an input by content and by where it is relative to the home, never by absolute path, so a copied
    or moved volume (or one seen at /workspace in a container) is the same volume:

    - a stage's output on the volume: its stage, its path in the home and the digest of its manifest's hashes;
    - another file or folder in the home: its path in the home and content hash;
    - a file or folder elsewhere (a data file, a local model): its name and content hash;
    - a dict: already described (a hub model by id and revision);
    - anything else: a Hugging Face hub id.
    """
    if isinstance(value, dict):
        return value
    path = Path(value)
    if not path.exists():
        return {"hub_id": str(value)}
    path = path.resolve()
    try:
        where = {"path": path.relative_to(root).as_posix()}
    except ValueError:
        where = {"name": path.name}
    for parent in (path, *path.parents):
        manifest = manifest_or_none(parent)
        if manifest and manifest.get("schema") == SCHEMA:
            rel = path.relative_to(parent).as_posix()
            outputs = {
                k: v for k, v in manifest["outputs"].items() if rel == "." or k == rel or k.startswith(rel + "/")
            }
            return {**where, "sha256": digest_of(outputs), "stage": manifest["stage"]}
    return {**where, "sha256": digest_of(tree_hashes(path))}


def file_stats(folder: Path, names: Iterable[str]) -> dict[str, list[int]]:
    """[size, mtime in ns] of each named file: what the fast check before a skip compares."""
    stats = {}
    for name in names:
        st = (folder / name).stat()
        stats[name] = [st.st_size, st.st_mtime_ns]
    return stats


def changed_outputs(folder: Path, manifest: dict[str, Any], full: bool = False) -> dict[str, str]:
    """The published files that no longer match the manifest, each with why: missing, another size, or (where
    the size matches but the modification time does not, or with ``full``) another sha256."""
    changed = {}
    stats = manifest.get("stats", {})
    for name, digest in manifest["outputs"].items():
        path = folder / name
        try:
            st = path.stat()
        except OSError:
            changed[name] = "missing"
            continue
        size, mtime = stats.get(name, (None, None))
        if size is not None and st.st_size != size:
            changed[name] = f"{st.st_size} bytes, published with {size}"
        elif (full or st.st_mtime_ns != mtime) and sha256_file(path) != digest:
            changed[name] = "content differs from its sha256"
    return changed


def check_published(root: Path, stage: str) -> dict[str, Any]:
    """A stage's manifest once its files are checked against it (sizes and mtimes, hashing what was touched);
    BadInput naming the file, the stage and the command that remakes it otherwise."""
    folder = stage_dir(root, stage)
    manifest = read_manifest(folder)
    if manifest is None:
        raise BadInput(f"no {stage} output under {root}: run `olivepress {stage}` first")
    changed = changed_outputs(folder, manifest)
    if changed:
        name, why = next(iter(changed.items()))
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise BadInput(
            f"{folder / name} is corrupt or changed since {stage} published it ({why}){more}; run "
            f"`olivepress {stage}` again to remake it (or `olivepress run`, which reruns what depends on it)"
        )
    return manifest


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _reusable(folder: Path, inputs: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any] | None:
    """The published manifest when the same work is already done and its files are intact, else None (saying
    why, when a published stage must run again)."""
    manifest = manifest_or_none(folder)
    if not manifest or manifest.get("inputs") != inputs or manifest.get("parameters") != parameters:
        return None
    changed = changed_outputs(folder, manifest)
    if changed:
        name, why = next(iter(changed.items()))
        log.warning("%s: %s changed since it was published (%s); running the stage again", folder.name, name, why)
        return None
    return manifest


def clean_leftovers(root: Path) -> None:
    """Remove what killed writers left behind: partial stage folders and the stages' scratch folders.
    Only under the writer lock: nobody else can be writing them."""
    for leftover in [*root.glob(".*.partial"), *root.glob(".*.old")]:
        shutil.rmtree(leftover, ignore_errors=True)
    for writer in (*registry.NAMES, "pull"):  # not push's: a push reads the volume while writers run
        for leftover in (root / "cache" / "tmp").glob(f"{writer}-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def run_stage(
    stage: str,
    root: Path,
    inputs: dict[str, str | Path | dict[str, Any]],
    parameters: dict[str, Any],
    work: Callable[[Path], dict[str, Any] | None],
    *,
    force: bool = False,
    packages: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run ``work(partial_folder)`` and publish the folder with its manifest, or skip if nothing changed.

    ``work`` returns extra manifest fields (metrics, answers) or None. Skipping needs no lock; running takes the
    home's writer lock (contract.lock) and checks again under it, since another writer may have just done it.
    """
    final = stage_dir(root, stage)
    described = {name: describe_input(value, root) for name, value in inputs.items()}
    if not force and (existing := _reusable(final, described, parameters)):
        log.info("%s: inputs and parameters unchanged, skipped (--force reruns it)", stage)
        return existing
    with lock.writer(root) as took:
        if took:
            clean_leftovers(root)
        if not force and (existing := _reusable(final, described, parameters)):
            log.info("%s: done meanwhile by another writer, skipped", stage)
            return existing
        manifest = _run_and_record(stage, root, described, inputs, parameters, work, packages)
        publish(root / f".{stage}.partial", final)
        (root / f"{stage}.failed.log").unlink(missing_ok=True)
    log.info("%s: done in %.1f s -> %s", stage, manifest["wall_s"], final)
    return manifest


def _run_and_record(
    stage: str,
    root: Path,
    described: dict[str, Any],
    inputs: dict[str, Any],
    parameters: dict[str, Any],
    work: Callable[[Path], dict[str, Any] | None],
    packages: tuple[str, ...],
) -> dict[str, Any]:
    """``work`` in ``.<stage>.partial`` with its log, and the manifest written last; on any failure the partial
    folder is removed and the traceback kept in ``<stage>.failed.log``."""
    partial = root / f".{stage}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir()
    except OSError as error:
        raise lock.unwritable(root, error) from None
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
            "bytes_in": sum(
                tree_bytes(Path(v)) for v in inputs.values() if not isinstance(v, dict) and Path(v).exists()
            ),
            "bytes_out": tree_bytes(partial),
            "outputs": outputs,
            "stats": file_stats(partial, outputs),
            **extra,
        }
        _write_atomically(partial / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    except BaseException as error:
        written = tree_bytes(partial) if partial.exists() else 0
        # The traceback goes to the log file only; the log is kept beside the volume, the partial output is not.
        try:
            handler.stream.write(f"{stage} failed:\n{traceback.format_exc()}")
            handler.flush()
        except OSError:
            pass  # a full disk: the log keeps what it had
        failed_log = root / f"{stage}.failed.log"
        try:
            shutil.move(partial / LOG, failed_log)
        except OSError:
            failed_log = partial / LOG
        shutil.rmtree(partial, ignore_errors=True)
        log.warning("%s failed: nothing was published; its log is %s", stage, failed_log)
        with contextlib.suppress(AttributeError, TypeError):
            setattr(error, exits.LOGGED_TO, str(failed_log))
        if _out_of_space(error, failed_log):
            raise NoSpace(root, stage, written) from error
        raise
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()
    return manifest


def _out_of_space(error: BaseException, log_file: Path) -> bool:
    """Whether a failure came from a full disk: ENOSPC anywhere in the exception's chain, or in the stage's log
    (libraries such as Olive catch the OSError and report their own failure)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return "No space left on device" in log_file.read_text(errors="replace")
    except OSError:
        return False


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.rename(path)


class NoSpace(click.ClickException):
    """The disk under the home filled up while a stage wrote; nothing was published."""

    def __init__(self, root: Path, stage: str, written: int) -> None:
        free = shutil.disk_usage(root).free if root.exists() else 0
        super().__init__(
            f"no space left on the device holding {root}: {stage} had written {written / 1e9:.2f} GB when it "
            f"stopped and {free / 1e9:.2f} GB are free. Nothing was published; free some space (or point --home "
            f"at a bigger disk) and run it again"
        )


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
    """A stage's published folder, its files checked against its manifest; or a BadInput saying how to (re)make
    it."""
    check_published(root, stage)
    return stage_dir(root, stage)


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
