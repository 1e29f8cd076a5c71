"""The images and how to build them: the image table, the ``docker buildx build`` line, labels and pushing.

The stages' images come from ``contract.registry`` in pipeline order (quantize builds the torch layer that
finetune and optimize reuse); ``server`` (the OpenAI-compatible API on the slim runtime) and ``push`` (Azure ML
push / pull) follow, as no stage runs them.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import click

from contract import registry

if TYPE_CHECKING:
    import docker

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BASE_IMAGE = "debian:bookworm-slim"
DEFAULT_REPOSITORY = "olivepress"
DEFAULT_SOURCE = "https://github.com/olivepress/olivepress"
CPU_DOCKERFILE = "docker/cpu.Dockerfile"


@dataclass(frozen=True)
class Image:
    """One buildable image: which Dockerfile and target make it."""

    name: str
    dockerfile: str
    target: str


IMAGES: Mapping[str, Image] = MappingProxyType(
    {
        **{stage.image: Image(stage.image, stage.dockerfile, stage.target) for stage in registry.PIPELINE},
        "server": Image("server", CPU_DOCKERFILE, "server"),
        "push": Image("push", CPU_DOCKERFILE, "push"),
    }
)


def image_ref(name: str, repository: str = DEFAULT_REPOSITORY, tag: str = "latest") -> str:
    return f"{repository}/{name}:{tag}"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance() -> dict[str, str]:
    """The OCI label values: the repository's URL, its commit (``-dirty`` if edited) and the package version."""
    revision = _git("rev-parse", "HEAD") or "unknown"
    if revision != "unknown" and _git("status", "--porcelain", "--untracked-files=no"):
        revision += "-dirty"
    try:
        version = metadata.version("olivepress")
    except metadata.PackageNotFoundError:
        version = "0.0.0"
    return {"SOURCE": _git("remote", "get-url", "origin") or DEFAULT_SOURCE, "REVISION": revision, "VERSION": version}


def build_command(
    image: Image,
    ref: str,
    *,
    base_image: str,
    extra_ca: Path | None = None,
    labels: dict[str, str] | None = None,
    progress: str = "auto",
    no_cache: bool = False,
    context: Path = REPO,
) -> list[str]:
    """The ``docker buildx build`` line for one image (BuildKit: secrets and bind mounts need it)."""
    cmd = ["docker", "buildx", "build", "--load", "--progress", progress]
    cmd += ["-f", str(context / image.dockerfile), "--target", image.target, "-t", ref]
    cmd += ["--build-arg", f"BASE_IMAGE={base_image}"]
    for key, value in (labels or {}).items():
        cmd += ["--build-arg", f"{key}={value}"]
    if extra_ca is not None:
        cmd += ["--secret", f"id=extra_ca,src={Path(extra_ca).resolve()}"]
    if no_cache:
        cmd.append("--no-cache")
    return [*cmd, str(context)]


def push_image(client: docker.DockerClient, ref: str, target: str, echo: Callable[[str], None]) -> None:
    """Tag ``ref`` as ``target`` and push it, turning the engine's streamed errors into one clear message."""
    client.images.get(ref).tag(target)
    for line in client.images.push(target, stream=True, decode=True):
        if "error" in line:
            raise click.ClickException(f"pushing {target} failed: {line['error']} (logged in to the registry?)")
    echo(f"[green]pushed[/] {target}")


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "kB") else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
