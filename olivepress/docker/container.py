"""The infer image run on a host folder: what ``olivepress docker infer`` does.

The folder (the volume root) is mounted at /workspace and the container runs as the folder's owner, so what it
writes (infer/answers.json) belongs to the user.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from olivepress.docker import engine

if TYPE_CHECKING:
    import docker

CONTAINER_HOME = "/workspace"
CONTAINER_MODEL_DIR = "/model"


def run_infer(
    image: str,
    home: Path,
    args: Sequence[str] = (),
    *,
    model_dir: Path | None = None,
    client: docker.DockerClient | None = None,
    echo: Callable[[str], None] | None = None,
) -> int:
    """Run the infer ``image`` on ``home`` with the stage's ``args``, stream its output; return its exit code.

    ``model_dir``, if given, is mounted read-only at /model and passed to the stage as its --model-dir.
    """
    import docker

    client = client or engine.client()
    echo = echo or (lambda text: click.echo(text, nl=False))
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise click.ClickException(f"No image {image}: build it with `olivepress docker build infer`.") from None
    volumes = {str(home): {"bind": CONTAINER_HOME, "mode": "rw"}}
    command = list(args)
    if model_dir is not None:
        volumes[str(Path(model_dir).resolve())] = {"bind": CONTAINER_MODEL_DIR, "mode": "ro"}
        command += ["--model-dir", CONTAINER_MODEL_DIR]
    owner = home.stat()
    container = client.containers.run(
        image,
        command=command or None,  # none: the image's own
        volumes=volumes,
        environment={"OLIVEPRESS_HOME": CONTAINER_HOME, "HOME": "/tmp"},
        user=f"{owner.st_uid}:{owner.st_gid}",
        detach=True,
    )
    try:
        for chunk in container.logs(stream=True, follow=True):
            echo(chunk.decode("utf-8", errors="replace"))
        return int(container.wait().get("StatusCode", 1))
    finally:
        container.remove(force=True)
