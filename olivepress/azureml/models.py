"""The optimized model in an Azure ML model registry: what push registers and what pull restores.

``push`` does what the lab's ``az ml model create --name ft-for-travel --version 1 --path ./models/phi/onnx-ao``
does, with the lineage of the stage manifests as tags, and a content id that makes a second push of the same files a
no-op. ``pull`` brings a registered version back into ``<home>/optimize``, verified against the sha256 of every file
in its manifest. The registered folder: the optimize stage's outputs, its ``manifest.json``, and the manifests of
the stages it was made from under ``lineage/``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from contract import lock, registry, volume
from contract.exits import BadInput
from olivepress.azureml import errors

log = logging.getLogger("olivepress")

# The stage whose published folder is the model (an optimized model folder, contract.model_folder).
MODEL_STAGE = "optimize"
# The stages it was made from: their manifests travel with it under lineage/.
LINEAGE_STAGES = registry.STAGES[MODEL_STAGE].needs
LINEAGE = "lineage"
CONTENT_TAG = "olivepress.content"  # digest of the optimize manifest's outputs: what makes two pushes "the same"
DEFAULT_NAME = "ft-for-travel"  # the lab's name
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,49}$")


# --- what to push: the optimize folder and its lineage ------------------------------------------------------------


def lineage_manifest(root: Path, stage: str) -> dict[str, Any] | None:
    """A stage's manifest from the volume, else the copy a pulled model carries in optimize/lineage/."""
    manifest = volume.read_manifest(volume.stage_dir(root, stage))
    if manifest is None:
        copy = volume.stage_dir(root, MODEL_STAGE) / LINEAGE / f"{stage}.json"
        manifest = json.loads(copy.read_text()) if copy.is_file() else None
    return manifest


def content_id(model_manifest: dict[str, Any]) -> str:
    return volume.digest_of(model_manifest["outputs"])


def describe(root: Path) -> tuple[dict[str, str], str]:
    """Tags (string to string, as Azure ML stores them) and a one-paragraph description, from the manifests.

    Each stage's parameters that contract.registry marks ``tagged`` become ``<stage>.<parameter>`` tags.
    """
    optimize = volume.read_manifest(volume.stage_dir(root, MODEL_STAGE)) or {}
    manifests = {stage: lineage_manifest(root, stage) or {} for stage in LINEAGE_STAGES} | {MODEL_STAGE: optimize}
    quantize, finetune = manifests.get("quantize", {}), manifests.get("finetune", {})
    tags: dict[str, str] = {CONTENT_TAG: content_id(optimize), "olivepress.schema": str(optimize.get("schema"))}
    base = quantize.get("base_model") or quantize.get("inputs", {}).get("model", {}).get("hub_id")
    if base:
        tags["base_model"] = str(base)
    for stage, manifest in manifests.items():
        parameters = manifest.get("parameters", {})
        for key in registry.STAGES[stage].tagged:
            if key in parameters:
                tags[f"{stage}.{key}"] = str(parameters[key])
    data = finetune.get("inputs", {}).get("data_files", {})
    if data.get("sha256"):
        tags["finetune.data_sha256"] = data["sha256"]
    if optimize.get("adapters"):
        tags["adapters"] = ",".join(optimize["adapters"])
    versions: dict[str, str] = {}
    for manifest in manifests.values():
        versions.update(manifest.get("versions", {}))
    for package, version in sorted(versions.items()):
        tags[f"version.{package}"] = str(version)
    for stage, manifest in manifests.items():
        for model, figures in (manifest.get("metrics") or {}).items():  # e.g. quantized: {loss, perplexity, tokens}
            for name in ("loss", "perplexity"):
                if name in figures:
                    tags[f"metric.{stage}.{model}.{name}"] = str(figures[name])

    q, f = quantize.get("parameters", {}), finetune.get("parameters", {})
    parts = ["int4 ONNX model for onnxruntime-genai, made by olivepress (Microsoft Olive)."]
    if base:
        parts.append(f"Base model: {base}.")
    if q:
        parts.append(
            f"Quantized with {q.get('algorithm', '?')} to {q.get('bits', '?')} bits (group {q.get('group_size', '?')})."
        )
    if f:
        parts.append(
            f"Fine-tuned with {f.get('method', 'LoRA')} for {f.get('max_steps', '?')} steps, "
            f"rank {f.get('rank', '?')}, on data sha256 {str(data.get('sha256', '?'))[:12]}."
        )
    if optimize.get("adapters"):
        parts.append(f"Adapters (.onnx_adapter, loaded by name): {', '.join(optimize['adapters'])}.")
    parts.append(f"Content id {tags[CONTENT_TAG][:12]}; the manifest.json inside lists every file's sha256.")
    return tags, " ".join(parts)


def require_optimized(root: Path) -> dict[str, Any]:
    """The optimize stage's manifest, or a BadInput saying how to make it."""
    folder = volume.stage_dir(root, MODEL_STAGE)
    manifest = volume.read_manifest(folder)
    if manifest is None:
        raise BadInput(
            f"nothing to push: {folder} has no manifest.json; run `olivepress optimize` (or `olivepress run`) first, "
            f"or point --home at the volume that has it"
        )
    if manifest.get("schema") != volume.SCHEMA or manifest.get("stage") != MODEL_STAGE or "outputs" not in manifest:
        raise BadInput(f"{folder / volume.MANIFEST} is not an olivepress optimize manifest (schema 1)")
    return manifest


def plan(root: Path, manifest: dict[str, Any], name: str, version: str | None, target: str) -> dict[str, Any]:
    """What push would register, for --dry-run."""
    folder = volume.stage_dir(root, MODEL_STAGE)
    tags, description = describe(root)
    return {
        "target": target,
        "name": name,
        "version": version or "(the next free one, decided at push time)",
        "type": "custom_model",
        "path": str(folder),
        "files": len(manifest["outputs"]) + 1,
        "bytes": sum((folder / rel).stat().st_size for rel in manifest["outputs"] if (folder / rel).is_file()),
        "description": description,
        "tags": tags,
    }


def verify_files(folder: Path, outputs: dict[str, str]) -> None:
    """Every file the manifest lists, with its sha256: a folder changed since the stage ran is not pushed."""
    for rel, expected in outputs.items():
        path = folder / rel
        if not path.is_file():
            raise BadInput(f"{path} is listed in the manifest but missing; rerun `olivepress optimize --force`")
        if volume.sha256_file(path) != expected:
            raise BadInput(
                f"{path} changed since optimize wrote it (sha256 differs from the manifest); "
                f"rerun `olivepress optimize --force`"
            )


@contextmanager
def staged(root: Path, manifest: dict[str, Any]) -> Iterator[Path]:
    """The folder to upload: the manifest's outputs, the manifest, and the upstream manifests under lineage/.

    Hard links (copies across file systems), so the upload never includes stray files or the stage log.
    """
    source = volume.stage_dir(root, MODEL_STAGE)
    with volume.scratch(root, "push-") as tmp:
        out = tmp / MODEL_STAGE  # the SDK names the uploaded folder after this one
        for rel in [*manifest["outputs"], volume.MANIFEST]:
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source / rel, target)
            except OSError:
                shutil.copy2(source / rel, target)
        for stage in LINEAGE_STAGES:
            upstream = lineage_manifest(root, stage)
            if upstream is not None:
                (out / LINEAGE).mkdir(exist_ok=True)
                (out / LINEAGE / f"{stage}.json").write_text(json.dumps(upstream, indent=2) + "\n")
        yield out


# --- versions in the registry ---------------------------------------------------------------------------------


def list_versions(client: Any, name: str) -> list[Any]:
    from azure.ai.ml.constants import ListViewType
    from azure.core.exceptions import ResourceNotFoundError

    try:
        # Archived versions too: their numbers are taken, and one may hold the same content.
        return list(client.models.list(name=name, list_view_type=ListViewType.ALL))
    except ResourceNotFoundError:
        return []


def latest(versions: list[Any]) -> str:
    """The highest numbered version; named ones (e.g. 'rc1') only when none is numbered."""
    numbered = [str(v.version) for v in versions if str(v.version).isdigit()]
    if numbered:
        return max(numbered, key=int)
    return max(str(v.version) for v in versions)


def next_version(versions: list[Any]) -> str:
    numbers = [int(v.version) for v in versions if str(v.version).isdigit()]
    return str(max(numbers, default=0) + 1)


def _registered(client: Any, name: str, version: str) -> Any | None:
    try:
        return client.models.get(name=name, version=version)
    except Exception:  # absent, or the service is down: either way, not known to be registered
        return None


# --- push -----------------------------------------------------------------------------------------------------


def push(
    client: Any,
    target: object,
    root: Path,
    manifest: dict[str, Any],
    name: str,
    version: str | None,
    *,
    retries: int,
    verbose: bool,
) -> str:
    """Register ``<root>/optimize`` as ``name:version`` (the next free version if None); return what happened.

    A version already holding the same content (its ``olivepress.content`` tag) is reported, not uploaded again.
    The version is created after every file is uploaded, so a failed push registers nothing.
    """
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import Model

    tags, description = describe(root)
    content = tags[CONTENT_TAG]
    versions = errors.with_retries("listing versions", lambda: list_versions(client, name), retries, 2.0)
    same = [v for v in versions if (v.tags or {}).get(CONTENT_TAG) == content]
    if version is not None:
        existing = next((v for v in versions if str(v.version) == version), None)
        if existing is not None and (existing.tags or {}).get(CONTENT_TAG) == content:
            return f"{name}:{version} in {target} already holds this content; nothing uploaded"
        if existing is not None:
            raise BadInput(
                f"{name}:{version} already exists in {target} with other content (model versions are immutable): "
                f"pick another --version, or leave it out for the next free one ({next_version(versions)})"
            )
    elif same:
        found = ", ".join(f"{name}:{v.version}" for v in same)
        return f"already registered as {found} in {target}; nothing uploaded"
    version = version or next_version(versions)
    log.info("pushing %s to %s as %s:%s", volume.stage_dir(root, MODEL_STAGE), target, name, version)
    with staged(root, manifest) as path:
        model = Model(
            name=name, version=version, path=str(path), type=AssetTypes.CUSTOM_MODEL, tags=tags, description=description
        )

        def register() -> Any:
            try:
                with errors.sdk_console(verbose):
                    return client.models.create_or_update(model)
            except Exception:
                # The final PUT may have landed before its answer was lost: if our version is there, it is done.
                registered = _registered(client, name, version)
                if registered is not None and (registered.tags or {}).get(CONTENT_TAG) == content:
                    return registered
                raise

        registered = errors.with_retries("upload and register", register, retries, 5.0)
    return f"registered {registered.name}:{registered.version} in {target}\n  path: {registered.path}"


# --- pull -----------------------------------------------------------------------------------------------------


def verify_download(folder: Path) -> dict[str, Any]:
    """The downloaded folder's manifest, once every file it lists is there with its sha256 and nothing else is."""
    manifest = volume.read_manifest(folder)
    if manifest is None or manifest.get("stage") != MODEL_STAGE or "outputs" not in manifest:
        raise BadInput(
            "the downloaded model has no olivepress optimize manifest.json: it was not pushed by `olivepress push`"
        )
    for rel, expected in manifest["outputs"].items():
        path = folder / rel
        if not path.is_file():
            raise errors.TransferFailed(
                f"download incomplete: {rel} is missing; nothing was changed, run `olivepress pull` again"
            )
        if volume.sha256_file(path) != expected:
            raise errors.TransferFailed(
                f"download corrupt: {rel} does not match its sha256; nothing was changed, try again"
            )
    allowed = set(manifest["outputs"]) | {volume.MANIFEST, volume.LOG}
    extra = [
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).as_posix() not in allowed and p.relative_to(folder).parts[0] != LINEAGE
    ]
    if extra:
        raise errors.TransferFailed(
            f"the registered model has files its manifest does not list: {', '.join(sorted(extra)[:5])}"
        )
    return manifest


def pull(client: Any, target: object, root: Path, name: str, version: str | None, *, force: bool, verbose: bool) -> str:
    """Download ``name:version`` (the latest if None) into ``<root>/optimize``; return what happened.

    The files land in a scratch folder of the volume and replace ``<root>/optimize`` only once every sha256 matches
    the manifest and the content tag. The same content already there downloads nothing; other content is replaced
    only with ``force``.
    """
    if version is None:
        versions = list_versions(client, name)
        if not versions:
            raise BadInput(f"no model named {name} in {target}")
        version = latest(versions)
    model = client.models.get(name=name, version=version)
    wanted = (model.tags or {}).get(CONTENT_TAG)
    final = volume.stage_dir(root, MODEL_STAGE)
    local = volume.read_manifest(final)
    if local and "outputs" in local:
        if wanted and content_id(local) == wanted:
            return f"{final} already holds {name}:{version}; nothing downloaded"
        if not force:
            raise BadInput(
                f"{final} holds another model (content {content_id(local)[:12]}); pass --force to replace it, "
                f"or --home to pull into another volume"
            )

    def download(into: Path) -> None:
        with errors.sdk_console(verbose):
            client.models.download(name=name, version=version, download_path=str(into))

    with lock.writer(root), volume.scratch(root, "pull-") as partial:
        errors.with_retries("download", lambda: download(partial), 3, 5.0)
        manifests = sorted(partial.rglob(volume.MANIFEST), key=lambda p: len(p.parts))
        folder = manifests[0].parent if manifests else partial
        manifest = verify_download(folder)
        if wanted and content_id(manifest) != wanted:
            raise errors.TransferFailed(
                f"{name}:{version}'s files do not match its {CONTENT_TAG} tag; it was changed after push"
            )
        volume.publish(folder, final)
    return (
        f"pulled {name}:{version} from {target} into {final} ({len(manifest['outputs'])} files verified)\n"
        f"next: olivepress infer"
    )
