"""The optimized model in an Azure ML model registry: what push registers and what pull restores.

``push`` does what the lab's ``az ml model create --name ft-for-travel --version 1 --path ./models/phi/onnx-ao``
does, split as assets.py describes: the base once (found again by its content) and each adapter as its own model
version, with the lineage of the stage manifests as tags, and a content id that makes a second push of the same files
a no-op. ``pull`` brings a registered version back into ``<home>/optimize``, verified against the sha256 of every file
in its manifest; an adapter brings its base unless the same base is already there.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contract import lock, volume
from contract.exits import BadInput
from olivepress.azureml import assets, errors
from olivepress.azureml.assets import ADAPTER_KIND, BASE_KIND, CONTENT_TAG, MODEL_KIND, MODEL_STAGE, Asset

log = logging.getLogger("olivepress")

DEFAULT_NAME = "ft-for-travel"  # the lab's name
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,49}$")
# An adapter's version when none is given: the one already holding its content, else the next free one.
DECIDED_AT_PUSH = "(the version holding this content, else the next free one; decided at push time)"


def plan(root: Path, manifest: dict[str, Any], name: str, version: str | None, target: str) -> dict[str, Any]:
    """What push would register, for --dry-run: every asset with its name, version, tags and description."""
    registrations = []
    for asset in assets.assets_of(root, manifest, name):
        tags, description = assets.describe(asset)
        if asset.kind == ADAPTER_KIND:
            tags[assets.BASE_VERSION_TAG] = "(the base's version, decided at push time)"
        registrations.append(
            {
                "asset": asset.kind,
                "name": asset.name,
                "version": (None if asset.kind == BASE_KIND else version) or DECIDED_AT_PUSH,
                "type": "custom_model",
                "path": str(asset.folder),
                "files": sorted(asset.files),
                "bytes": asset.bytes,
                "description": description,
                "tags": tags,
            }
        )
    return {"target": target, "registrations": registrations}


# --- versions in the registry ---------------------------------------------------------------------------------


def list_versions(client: Any, name: str, *, archived: bool = True) -> list[Any]:
    """Every version of ``name`` (none if there is no such model); archived ones too unless ``archived`` is False:
    their numbers are taken, and one may hold the same content."""
    from azure.ai.ml.constants import ListViewType
    from azure.core.exceptions import ResourceNotFoundError

    view = ListViewType.ALL if archived else ListViewType.ACTIVE_ONLY
    try:
        return list(client.models.list(name=name, list_view_type=view))
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


def registered_adapters(client: Any, name: str, base: str | None) -> list[dict[str, Any]]:
    """The adapter versions registered as ``<name>-<adapter>`` (archived ones left out), for the base with content
    ``base`` (any base if None): each as {name, version, tags}."""
    found = []
    prefix = f"{name}-"
    for container in client.models.list():
        if not container.name.startswith(prefix) or container.name == assets.base_name(name):
            continue
        for version in list_versions(client, container.name, archived=False):
            tags = version.tags or {}
            if tags.get(assets.ASSET_TAG) == ADAPTER_KIND and base in (None, tags.get(assets.BASE_CONTENT_TAG)):
                found.append({"name": container.name, "version": str(version.version), "tags": tags})
    return sorted(found, key=lambda row: (row["name"], int(row["version"]) if row["version"].isdigit() else 0))


# --- push -----------------------------------------------------------------------------------------------------


def place(asset: Asset, versions: list[Any], version: str | None, target: object) -> tuple[str, str | None]:
    """The version ``asset`` goes to (``version`` if given) and, when that version already holds its content, the line
    that says so; a given version holding other content is refused (versions are immutable)."""
    same = [v for v in versions if (v.tags or {}).get(CONTENT_TAG) == asset.content]
    if version is not None:
        existing = next((v for v in versions if str(v.version) == version), None)
        if existing is not None and existing in same:
            return version, f"{asset.name}:{version} in {target} already holds this content; nothing uploaded"
        if existing is not None:
            raise BadInput(
                f"{asset.name}:{version} already exists in {target} with other content (model versions are "
                f"immutable): pick another --version, or leave it out for the next free one ({next_version(versions)})"
            )
        return version, None
    if same:
        found = ", ".join(f"{asset.name}:{v.version}" for v in same)
        return latest(same), f"already registered as {found} in {target}; nothing uploaded"
    return next_version(versions), None


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
    echo: Callable[[str], object],
) -> None:
    """Register ``<root>/optimize`` under ``name`` as assets.py splits it, ``echo``-ing a line per asset.

    ``version`` is the adapters' (a merged model's); the base's is the one already holding its content, else the
    next free one. Every version is decided before anything is uploaded, so a clash uploads nothing. A version
    already holding the same content (its ``olivepress.content`` tag) is reported, not uploaded again. Each version
    is created after its files are uploaded, so a failed push leaves no version pointing at a partial upload.
    """
    placed = []
    for asset in assets.assets_of(root, manifest, name):
        versions = errors.with_retries(
            f"listing versions of {asset.name}", lambda name=asset.name: list_versions(client, name), retries, 2.0
        )
        placed.append((asset, *place(asset, versions, None if asset.kind == BASE_KIND else version, target)))
    base_version = next((v for asset, v, _ in placed if asset.kind == BASE_KIND), None)
    for asset, asset_version, already in placed:
        if already:
            echo(already)
            continue
        tags, description = assets.describe(asset)
        if asset.kind == ADAPTER_KIND:
            tags[assets.BASE_VERSION_TAG] = str(base_version)
        echo(_register(client, target, root, asset, asset_version, tags, description, retries=retries, verbose=verbose))


def _register(
    client: Any,
    target: object,
    root: Path,
    asset: Asset,
    version: str,
    tags: dict[str, str],
    description: str,
    *,
    retries: int,
    verbose: bool,
) -> str:
    """Upload ``asset`` and create its version; retried, and a lost answer to the final PUT is checked."""
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import Model

    log.info("pushing the %s of %s to %s as %s:%s", asset.kind, asset.folder, target, asset.name, version)
    with assets.staged(root, asset) as path:
        model = Model(
            name=asset.name,
            version=version,
            path=str(path),
            type=AssetTypes.CUSTOM_MODEL,
            tags=tags,
            description=description,
        )

        def register() -> Any:
            try:
                with errors.sdk_console(verbose):
                    return client.models.create_or_update(model)
            except Exception:
                # The final PUT may have landed before its answer was lost: if our version is there, it is done.
                registered = _registered(client, asset.name, version)
                if registered is not None and (registered.tags or {}).get(CONTENT_TAG) == asset.content:
                    return registered
                raise

        registered = errors.with_retries("upload and register", register, retries, 5.0)
    return f"registered {registered.name}:{registered.version} in {target}\n  path: {registered.path}"


# --- pull -----------------------------------------------------------------------------------------------------


def pull(client: Any, target: object, root: Path, name: str, version: str | None, *, force: bool, verbose: bool) -> str:
    """Download ``name:version`` (the latest if None) into ``<root>/optimize``; return what happened.

    An adapter goes onto the base already there (by content) or comes with its base; a base or a whole model
    replaces the folder. The files land in a scratch folder of the volume and replace ``<root>/optimize`` only once
    every sha256 matches the manifest and the content tag. The same content already there downloads nothing; other
    content is replaced only with ``force``.
    """
    if version is None:
        versions = list_versions(client, name)
        if not versions:
            raise BadInput(f"no model named {name} in {target}")
        version = latest(versions)
    tags = client.models.get(name=name, version=version).tags or {}
    if tags.get(assets.ASSET_TAG) == ADAPTER_KIND:
        return _pull_adapter(client, target, root, name, version, tags, force=force, verbose=verbose)
    return _pull_folder(client, target, root, name, version, tags, force=force, verbose=verbose)


def _download(client: Any, name: str, version: str, into: Path, verbose: bool) -> Path:
    def download() -> None:
        with errors.sdk_console(verbose):
            client.models.download(name=name, version=version, download_path=str(into))

    errors.with_retries("download", download, 3, 5.0)
    return assets.downloaded(into)


def _pull_folder(
    client: Any,
    target: object,
    root: Path,
    name: str,
    version: str,
    tags: dict[str, str],
    *,
    force: bool,
    verbose: bool,
) -> str:
    """A whole model folder (merged, registered by a pipeline job, or pushed before adapters were assets) or a base."""
    kind = tags.get(assets.ASSET_TAG, MODEL_KIND)
    wanted = tags.get(CONTENT_TAG)
    final = volume.stage_dir(root, MODEL_STAGE)
    local = volume.read_manifest(final)
    if local is not None:
        here = assets.base_content(local) if kind == BASE_KIND else volume.digest_of(local["outputs"])
        if wanted and here == wanted:
            return f"{final} already holds {name}:{version}; nothing downloaded"
        if not force:
            raise BadInput(
                f"{final} holds another model (content {here[:12]}); pass --force to replace it, "
                f"or --home to pull into another volume"
            )
    with lock.writer(root), volume.scratch(root, "pull-") as partial:
        folder = _download(client, name, version, partial, verbose)
        manifest = assets.verify_download(folder, kind)
        if wanted and volume.digest_of(manifest["outputs"]) != wanted:
            raise errors.TransferFailed(
                f"{name}:{version}'s files do not match its {CONTENT_TAG} tag; it was changed after push"
            )
        volume.publish(folder, final)
    return (
        f"pulled {name}:{version} from {target} into {final} ({len(manifest['outputs'])} files verified)\n"
        f"next: olivepress infer"
    )


FRESH, ADD = "fresh", "add"  # how an adapter comes onto the volume: with its base, or onto the base already there


def _onto(final: Path, name: str, version: str, tags: dict[str, str], force: bool) -> str | None:
    """How adapter ``name:version`` (its ``tags``) comes into ``final``: FRESH, ADD, or None when it is there."""
    local = volume.read_manifest(final)
    if local is None:
        return FRESH
    adapter, base = tags[assets.ADAPTER_TAG], tags[assets.BASE_CONTENT_TAG]
    here = assets.base_content(local)
    if here != base:
        if force:
            return FRESH
        merged = " (a merged build: its adapter is in the graph)" if assets.is_merged(local) else ""
        raise BadInput(
            f"{name}:{version} is an adapter for the base {tags[assets.BASE_NAME_TAG]}:"
            f"{tags[assets.BASE_VERSION_TAG]} (content {base[:12]}), but {final} holds another base (content "
            f"{here[:12]}){merged}: an adapter runs only on the base it was trained for. Pull it into another volume "
            f"(--home), or pass --force to replace {final} with its base and this adapter"
        )
    rel = assets.adapter_path(adapter)
    if rel not in local["outputs"]:
        return ADD
    if volume.digest_of({**assets.model_files(local["outputs"]), rel: local["outputs"][rel]}) == tags.get(CONTENT_TAG):
        return None
    if force:
        return ADD
    raise BadInput(
        f"{final} already has an adapter named {adapter} with other content; pass --force to replace it (the base "
        f"and the other adapters stay), or --home to pull into another volume"
    )


def _pull_adapter(
    client: Any,
    target: object,
    root: Path,
    name: str,
    version: str,
    tags: dict[str, str],
    *,
    force: bool,
    verbose: bool,
) -> str:
    """An adapter, onto the same base already in ``<root>/optimize`` (only the adapter is downloaded) or with it."""
    needed = (assets.ADAPTER_TAG, assets.BASE_NAME_TAG, assets.BASE_VERSION_TAG, assets.BASE_CONTENT_TAG, CONTENT_TAG)
    missing = [tag for tag in needed if not tags.get(tag)]
    if missing:
        raise BadInput(
            f"{name}:{version} is tagged as an adapter but has no {', '.join(missing)}: not pushed by olivepress"
        )
    adapter, base, base_version = tags[assets.ADAPTER_TAG], tags[assets.BASE_NAME_TAG], tags[assets.BASE_VERSION_TAG]
    final = volume.stage_dir(root, MODEL_STAGE)
    if _onto(final, name, version, tags, force) is None:
        return f"{final} already holds {name}:{version}; nothing downloaded"
    with lock.writer(root), volume.scratch(root, "pull-") as scratch:
        how = _onto(final, name, version, tags, force)  # again under the lock: another writer may have been first
        if how is None:
            return f"{final} already holds {name}:{version}; nothing downloaded"
        folder = _download(client, name, version, scratch / "adapter", verbose)
        added = assets.verify_download(folder, ADAPTER_KIND)
        if (
            volume.digest_of(added["outputs"]) != tags[CONTENT_TAG]
            or assets.base_content(added) != tags[assets.BASE_CONTENT_TAG]
            or assets.adapter_path(adapter) not in added["outputs"]
        ):
            raise errors.TransferFailed(f"{name}:{version}'s files do not match its tags; it was changed after push")
        out = scratch / MODEL_STAGE
        if how == FRESH:
            base_folder = _download_base(client, target, name, version, tags, scratch / "base", verbose)
            assets.assemble(base_folder, folder, out)
        else:
            assets.add_adapter(final, volume.read_manifest(final) or {}, folder, added, adapter, out)
        volume.publish(out, final)
    if how == FRESH:
        return f"pulled {name}:{version} from {target} into {final}, with its base {base}:{base_version}\n" + (
            f"next: olivepress infer --adapter {adapter}"
        )
    return (
        f"pulled {name}:{version} from {target} into {final}, onto its base already there ({base}:{base_version}, "
        f"not downloaded)\nnext: olivepress infer --adapter {adapter}; a running `olivepress serve` loads the "
        f"adapters present when it starts: restart it to serve {adapter}"
    )


def _download_base(
    client: Any, target: object, name: str, version: str, tags: dict[str, str], into: Path, verbose: bool
) -> Path:
    """The base adapter ``name:version`` was pushed for, downloaded and verified against the adapter's tag."""
    from azure.core.exceptions import ResourceNotFoundError

    base, base_version = tags[assets.BASE_NAME_TAG], tags[assets.BASE_VERSION_TAG]
    try:
        folder = _download(client, base, base_version, into, verbose)
    except ResourceNotFoundError:
        raise BadInput(
            f"{name}:{version}'s base {base}:{base_version} is not in {target}: push it again from a volume that has "
            f"it (`olivepress push`)"
        ) from None
    manifest = assets.verify_download(folder, BASE_KIND)
    if assets.base_content(manifest) != tags[assets.BASE_CONTENT_TAG]:
        raise errors.TransferFailed(
            f"{base}:{base_version} is not the base {name}:{version} was pushed for (its content differs)"
        )
    return folder
