"""The optimized model folder as Azure ML assets: one base and each adapter on its own, or one merged model.

A switchable build (contract.model_folder) is registered as
- a **base**, ``<name>-base``: ``model/``, a manifest listing only those files and ``lineage/quantize.json``. Its
  content id is the digest of the optimize manifest's outputs under ``model/``, so every adapter built on the same
  base shares one registered copy;
- an **adapter** per ``.onnx_adapter``, ``<name>-<adapter>``: the adapter file, the optimize manifest of the run
  that made it (its outputs: the base's files and this adapter, so the folder a pull rebuilds verifies) and
  ``lineage/quantize.json`` and ``lineage/finetune.json``; tagged with its base's name, version and content.

A merged build (the adapter in the graph, no base to switch to), or a folder registered by a pipeline job, is one
asset, ``<name>``: the whole folder.

Pull rebuilds ``<home>/optimize``: a base and an adapter as the folder they came from (the adapter's manifest, its
lineage under ``lineage/``); an adapter added onto a base already there joins the folder's manifest (``outputs`` and
``adapters``) and keeps the manifests it was made from under ``lineage/adapters/<adapter>/``.

Only the standard library and contract are imported: the Azure SDK is models.py's.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract import model_folder, registry, volume
from contract.exits import BadInput
from olivepress.azureml import errors

# The stage whose published folder is the model (an optimized model folder, contract.model_folder).
MODEL_STAGE = "optimize"
# The stages it was made from: their manifests travel with it under lineage/.
LINEAGE_STAGES = registry.STAGES[MODEL_STAGE].needs
LINEAGE = "lineage"

# What an asset is, in its ASSET_TAG: a base, an adapter for one, or a whole folder (merged, or registered by a job).
BASE_KIND, ADAPTER_KIND, MODEL_KIND = "base", "adapter", "model"
ASSET_TAG = "olivepress.asset"
CONTENT_TAG = "olivepress.content"  # digest of the asset's manifest outputs: what makes two pushes "the same"
BYTES_TAG = "olivepress.bytes"  # what the asset uploads
ADAPTER_TAG = "olivepress.adapter"  # the name an adapter is loaded under
BASE_NAME_TAG, BASE_VERSION_TAG, BASE_CONTENT_TAG = (
    "olivepress.base.name",
    "olivepress.base.version",
    "olivepress.base.content",
)
BASE_SUFFIX = "-base"


def base_name(name: str) -> str:
    return f"{name}{BASE_SUFFIX}"


def adapter_asset_name(name: str, adapter: str) -> str:
    return f"{name}-{adapter}"


# --- the folder's manifest, read as base and adapters ----------------------------------------------------------


def model_files(outputs: dict[str, str]) -> dict[str, str]:
    """The base's files among a manifest's outputs: everything under model/."""
    return {rel: digest for rel, digest in outputs.items() if rel.startswith(f"{model_folder.MODEL}/")}


def base_content(manifest: dict[str, Any]) -> str:
    """The base's content id: the digest of the optimize manifest's outputs under model/."""
    return volume.digest_of(model_files(manifest["outputs"]))


def adapter_path(adapter: str) -> str:
    return f"{model_folder.ADAPTERS}/{adapter}{model_folder.ADAPTER_SUFFIX}"


def adapters_listed(manifest: dict[str, Any]) -> list[str]:
    """The switchable adapters a folder's manifest lists among its outputs, sorted."""
    prefix, suffix = f"{model_folder.ADAPTERS}/", model_folder.ADAPTER_SUFFIX
    return sorted(
        rel[len(prefix) : -len(suffix)]
        for rel in manifest["outputs"]
        if rel.startswith(prefix) and rel.endswith(suffix)
    )


def is_merged(manifest: dict[str, Any]) -> bool:
    return f"{model_folder.MODEL}/{model_folder.MERGED_ADAPTER_FILE}" in manifest["outputs"]


def restricted(manifest: dict[str, Any], keep: set[str], adapters: list[str]) -> dict[str, Any]:
    """``manifest`` listing only the outputs in ``keep`` (and their stats) and ``adapters``."""
    narrowed = {**manifest, "outputs": {rel: d for rel, d in manifest["outputs"].items() if rel in keep}}
    if "stats" in manifest:
        narrowed["stats"] = {rel: s for rel, s in manifest["stats"].items() if rel in keep}
    narrowed["adapters"] = adapters
    return narrowed


def lineage_manifest(root: Path, stage: str) -> dict[str, Any] | None:
    """A stage's manifest from the volume, else the copy a pulled model carries in optimize/lineage/."""
    manifest = volume.read_manifest(volume.stage_dir(root, stage))
    if manifest is None:
        copy = volume.stage_dir(root, MODEL_STAGE) / LINEAGE / f"{stage}.json"
        manifest = json.loads(copy.read_text()) if copy.is_file() else None
    return manifest


def added_lineage(folder: Path, adapter: str) -> Path:
    """Where the manifests of an adapter added onto the folder's base by a pull are kept."""
    return folder / LINEAGE / model_folder.ADAPTERS / adapter


def adapter_manifests(root: Path, manifest: dict[str, Any], adapter: str) -> dict[str, dict[str, Any]]:
    """The manifests ``adapter`` of ``<root>/optimize`` was made from, by stage: optimize (narrowed to the base's
    files and this adapter), finetune and quantize (those found)."""
    own = added_lineage(volume.stage_dir(root, MODEL_STAGE), adapter)
    if (own / f"{MODEL_STAGE}.json").is_file():
        optimize = json.loads((own / f"{MODEL_STAGE}.json").read_text())
        finetune = json.loads((own / "finetune.json").read_text()) if (own / "finetune.json").is_file() else None
    else:
        optimize, finetune = manifest, lineage_manifest(root, "finetune")
    keep = {*model_files(manifest["outputs"]), adapter_path(adapter)}
    optimize = restricted(optimize, keep, [adapter])
    if optimize["outputs"] != {rel: manifest["outputs"][rel] for rel in keep}:
        raise BadInput(
            f"{own / f'{MODEL_STAGE}.json'} does not list this folder's base and {adapter_path(adapter)}: the folder "
            f"was changed by hand; pull the adapter again (`olivepress pull NAME-{adapter} --force`)"
        )
    found = {"quantize": lineage_manifest(root, "quantize"), "finetune": finetune}
    return {MODEL_STAGE: optimize, **{stage: m for stage, m in found.items() if m is not None}}


# --- the assets ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Asset:
    """One Azure ML model version to register: its name, what it uploads and what it says about itself."""

    kind: str
    name: str
    manifest: dict[str, Any]  # its manifest.json
    lineage: dict[str, dict[str, Any]]  # the upstream manifests it carries under lineage/, by stage
    folder: Path  # where its files are on the volume
    adapter: str | None = None  # an adapter's name
    base: str | None = None  # an adapter's base asset name

    @property
    def content(self) -> str:
        return volume.digest_of(self.manifest["outputs"])

    @property
    def files(self) -> list[str]:
        """The outputs it uploads: an adapter lists the base's files but carries only its own."""
        if self.kind == ADAPTER_KIND:
            return [rel for rel in self.manifest["outputs"] if rel not in model_files(self.manifest["outputs"])]
        return list(self.manifest["outputs"])

    @property
    def bytes(self) -> int:
        return sum((self.folder / rel).stat().st_size for rel in self.files if (self.folder / rel).is_file())


def assets_of(root: Path, manifest: dict[str, Any], name: str) -> list[Asset]:
    """What push registers for ``<root>/optimize``: the base and each adapter, or one model for a merged build."""
    folder = volume.stage_dir(root, MODEL_STAGE)
    lineage = {stage: m for stage in LINEAGE_STAGES if (m := lineage_manifest(root, stage)) is not None}
    if is_merged(manifest):
        return [Asset(MODEL_KIND, name, manifest, lineage, folder)]
    base_manifest = restricted(manifest, set(model_files(manifest["outputs"])), [])
    base_manifest.pop("metrics", None)  # the held-out figures are an adapter's, on its data
    base_manifest["parameters"] = {k: v for k, v in manifest.get("parameters", {}).items() if k != "adapter_name"}
    quantize = {stage: m for stage, m in lineage.items() if stage == "quantize"}
    assets = [Asset(BASE_KIND, base_name(name), base_manifest, quantize, folder)]
    for adapter in adapters_listed(manifest):
        manifests = adapter_manifests(root, manifest, adapter)
        optimize = manifests.pop(MODEL_STAGE)
        asset_name = adapter_asset_name(name, adapter)
        assets.append(Asset(ADAPTER_KIND, asset_name, optimize, manifests, folder, adapter, base_name(name)))
    return assets


def describe(asset: Asset) -> tuple[dict[str, str], str]:
    """Tags (string to string, as Azure ML stores them) and a one-paragraph description, from the manifests.

    Each stage's parameters that contract.registry marks ``tagged`` become ``<stage>.<parameter>`` tags. An
    adapter's base version is added at push time, once it is known.
    """
    manifests = {**asset.lineage, MODEL_STAGE: asset.manifest}
    optimize = asset.manifest
    quantize, finetune = manifests.get("quantize", {}), manifests.get("finetune", {})
    tags: dict[str, str] = {
        ASSET_TAG: asset.kind,
        CONTENT_TAG: asset.content,
        BYTES_TAG: str(asset.bytes),
        "olivepress.schema": str(optimize.get("schema")),
    }
    if asset.kind == ADAPTER_KIND:
        tags |= {
            ADAPTER_TAG: str(asset.adapter),
            BASE_NAME_TAG: str(asset.base),
            BASE_CONTENT_TAG: base_content(optimize),
        }
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
    parts = {
        MODEL_KIND: ["int4 ONNX model for onnxruntime-genai, made by olivepress (Microsoft Olive)."],
        BASE_KIND: [
            "int4 ONNX base model for onnxruntime-genai, made by olivepress (Microsoft Olive). Its LoRA adapters are "
            f"registered on their own, tagged {BASE_CONTENT_TAG}={tags[CONTENT_TAG][:12]}..."
        ],
        ADAPTER_KIND: [
            f"LoRA adapter '{asset.adapter}' (.onnx_adapter) for onnxruntime-genai, made by olivepress (Microsoft "
            f"Olive), for the base {asset.base} (content {tags.get(BASE_CONTENT_TAG, '')[:12]}); `olivepress pull` "
            f"brings the base too."
        ],
    }[asset.kind]
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
    if asset.kind == MODEL_KIND and optimize.get("adapters"):
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


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (the volume's files are never written in place), a copy across file systems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@contextmanager
def staged(root: Path, asset: Asset) -> Iterator[Path]:
    """The folder to upload: the asset's files, its manifest and the upstream manifests under lineage/.

    Hard links, so the upload never includes stray files or the stage log. The folder's own manifest.json is
    linked when it is the asset's (a single-adapter build's adapter, a merged model), so its bytes travel as they are.
    """
    with volume.scratch(root, "push-") as tmp:
        out = tmp / asset.kind  # the SDK names the uploaded folder after this one
        for rel in asset.files:
            link_or_copy(asset.folder / rel, out / rel)
        if volume.read_manifest(asset.folder) == asset.manifest:
            link_or_copy(asset.folder / volume.MANIFEST, out / volume.MANIFEST)
        else:
            (out / volume.MANIFEST).write_text(json.dumps(asset.manifest, indent=2) + "\n")
        for stage, upstream in asset.lineage.items():
            (out / LINEAGE).mkdir(exist_ok=True)
            (out / LINEAGE / f"{stage}.json").write_text(json.dumps(upstream, indent=2) + "\n")
        yield out


# --- pull: check what came down, and put the folder together ----------------------------------------------------


def downloaded(into: Path) -> Path:
    """The folder holding a downloaded asset's manifest (the SDK puts it under <name>/<folder>/)."""
    manifests = sorted(into.rglob(volume.MANIFEST), key=lambda p: len(p.parts))
    return manifests[0].parent if manifests else into


def verify_download(folder: Path, kind: str) -> dict[str, Any]:
    """The downloaded asset's manifest, once every file it carries is there with its sha256 and nothing else is.

    An adapter's manifest also lists its base's files, which it does not carry.
    """
    manifest = volume.read_manifest(folder)
    if manifest is None or manifest.get("stage") != MODEL_STAGE or "outputs" not in manifest:
        raise BadInput(
            "the downloaded model has no olivepress optimize manifest.json: it was not pushed by `olivepress push`"
        )
    carried = dict(manifest["outputs"])
    if kind == ADAPTER_KIND:
        carried = {rel: digest for rel, digest in carried.items() if rel not in model_files(carried)}
    for rel, expected in carried.items():
        path = folder / rel
        if not path.is_file():
            raise errors.TransferFailed(
                f"download incomplete: {rel} is missing; nothing was changed, run `olivepress pull` again"
            )
        if volume.sha256_file(path) != expected:
            raise errors.TransferFailed(
                f"download corrupt: {rel} does not match its sha256; nothing was changed, try again"
            )
    allowed = set(carried) | {volume.MANIFEST, volume.LOG}
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


def assemble(base: Path, adapter: Path, out: Path) -> None:
    """A model folder from a downloaded base and adapter: the adapter's manifest and lineage, the base's files."""
    out.mkdir(parents=True)
    shutil.move(base / model_folder.MODEL, out / model_folder.MODEL)
    shutil.move(adapter / model_folder.ADAPTERS, out / model_folder.ADAPTERS)
    shutil.move(adapter / volume.MANIFEST, out / volume.MANIFEST)
    if (adapter / LINEAGE).is_dir():
        shutil.move(adapter / LINEAGE, out / LINEAGE)


def add_adapter(
    folder: Path, manifest: dict[str, Any], adapter: Path, added: dict[str, Any], name: str, out: Path
) -> None:
    """``folder`` (its files linked, not copied) with the downloaded adapter ``name`` (manifest ``added``) joined to
    it, or replacing one of that name: its file, its entries in the manifest, its manifests under
    lineage/adapters/<name>/."""
    rel = adapter_path(name)
    own = added_lineage(folder, name)
    for path in folder.rglob("*"):
        if not path.is_file() or path in (folder / volume.MANIFEST, folder / rel) or own in path.parents:
            continue
        link_or_copy(path, out / path.relative_to(folder))
    link_or_copy(adapter / rel, out / rel)
    lineage = added_lineage(out, name)
    lineage.mkdir(parents=True)
    shutil.copy2(adapter / volume.MANIFEST, lineage / f"{MODEL_STAGE}.json")
    if (adapter / LINEAGE / "finetune.json").is_file():
        shutil.copy2(adapter / LINEAGE / "finetune.json", lineage / "finetune.json")
    joined = {**manifest, "outputs": {**manifest["outputs"], rel: added["outputs"][rel]}}
    if "stats" in manifest and rel in added.get("stats", {}):
        joined["stats"] = {**manifest["stats"], rel: added["stats"][rel]}
    joined["adapters"] = sorted({*manifest.get("adapters", []), name})
    (out / volume.MANIFEST).write_text(json.dumps(joined, indent=2) + "\n")
