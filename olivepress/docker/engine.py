"""A client for a running Docker engine, and the docker CLI and plugin checks.

The SDK checks the engine, runs containers and inspects images; the ``docker buildx`` and ``docker compose`` CLIs
do what it cannot (BuildKit secrets, compose files). Anything missing is ``NoDocker`` (exit 4): one paragraph
naming what is missing and how to get it, never a traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import TYPE_CHECKING

from contract.exits import NoDocker

if TYPE_CHECKING:
    import docker

INSTALL_HINT = "scripts/install-docker.sh on Debian"


def _no_engine_help() -> str:
    where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    return (
        f"No Docker engine answers at {where}.\n"
        "Start it (Docker Desktop; `sudo systemctl start docker`; on Debian without systemd: "
        "`sudo scripts/install-docker.sh`, which installs and starts one), or point DOCKER_HOST at a running one."
    )


def client() -> docker.DockerClient:
    """A client for a running engine, or NoDocker saying how to get one."""
    try:
        import docker
    except ImportError as exc:
        raise NoDocker("The Docker SDK for Python is missing: pip install docker") from exc
    try:
        found = docker.from_env(timeout=30)
        found.ping()
    except docker.errors.DockerException as exc:
        reason = str(exc).splitlines()[0][:200]
        raise NoDocker(f"{_no_engine_help()}\n(detail: {reason})") from exc
    return found


def require_cli(plugin: str | None = None) -> None:
    """The docker CLI, and ``plugin`` (compose or buildx) if given, must be installed."""
    if shutil.which("docker") is None:
        raise NoDocker(f"The docker CLI is not on PATH. Install Docker ({INSTALL_HINT}).")
    if plugin is None:
        return
    probe = subprocess.run(["docker", plugin, "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise NoDocker(
            f"`docker {plugin}` is not available (the {plugin} CLI plugin, v2). Install it: docker-{plugin} "
            f"from your distribution or Docker's packages ({INSTALL_HINT})."
        )
