"""``olivepress docker build|up|infer``: the images, the pipeline under compose, the infer image on a folder.

``olivepress build`` and ``olivepress up`` are the same commands under shorter names.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from contract import exits
from olivepress.docker import build as images
from olivepress.docker import compose, container, engine

if TYPE_CHECKING:
    from rich.console import Console


def _console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


@click.command("build", epilog=exits.epilog())
@click.argument("names", nargs=-1, type=click.Choice(list(images.IMAGES)))
@click.option(
    "--base-image",
    envvar="BASE_IMAGE",
    default=images.DEFAULT_BASE_IMAGE,
    show_default=True,
    help="Base of every image (e.g. local/debian:bookworm-slim from scripts/make-base-image.sh, with no registry).",
)
@click.option(
    "--extra-ca",
    envvar="OLIVEPRESS_EXTRA_CA",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="PEM file of an extra CA for pip at build time (a TLS-intercepting proxy). No image keeps it.",
)
@click.option("--tag", envvar="OLIVEPRESS_TAG", default="latest", show_default=True, help="Tag of every image.")
@click.option(
    "--repository",
    envvar="OLIVEPRESS_IMAGES",
    default=images.DEFAULT_REPOSITORY,
    show_default=True,
    help="Images are named REPOSITORY/<image>:TAG.",
)
@click.option("--progress", type=click.Choice(["auto", "plain", "tty", "quiet"]), default="auto", show_default=True)
@click.option("--no-cache", is_flag=True, help="Rebuild every layer.")
@click.option(
    "--push",
    "push_registry",
    metavar="REGISTRY",
    help="Then push each image as REGISTRY/olivepress/<image>:TAG, e.g. an Azure ML workspace's ACR for "
    "`olivepress run --on azureml` (log in first: `az acr login` or `docker login`).",
)
def build(
    names: tuple[str, ...],
    base_image: str,
    extra_ca: Path | None,
    tag: str,
    repository: str,
    progress: str,
    no_cache: bool,
    push_registry: str | None,
) -> None:
    """Build the images: all of them, in this order, or those named.

    \b
    quantize, finetune, optimize  the CUDA stage images (one shared torch layer, built once)
    infer                         the slim CPU runtime running the infer stage (the pipeline's last)
    server                        the same runtime serving the OpenAI-compatible API on port 8000
    push                          olivepress push / pull to Azure ML (compose's push and pull services)
    One build at a time. Example (no registry, behind a proxy):
      scripts/make-base-image.sh
      olivepress docker build --base-image local/debian:bookworm-slim --extra-ca /etc/ssl/certs/ca-certificates.crt
    """
    client = engine.client()
    engine.require_cli("buildx")
    console = _console()
    labels = images.provenance()
    rows = []
    for name in names or tuple(images.IMAGES):
        image, ref = images.IMAGES[name], images.image_ref(name, repository, tag)
        console.print(f"[bold]build[/] {ref}  ({image.dockerfile} --target {image.target})")
        cmd = images.build_command(
            image, ref, base_image=base_image, extra_ca=extra_ca, labels=labels, progress=progress, no_cache=no_cache
        )
        started = time.monotonic()
        code = subprocess.run(cmd).returncode
        seconds = time.monotonic() - started
        if code != 0:
            raise click.ClickException(f"building {ref} failed (docker buildx exit {code}): see the build log above")
        size = client.images.get(ref).attrs["Size"]
        rows.append((ref, seconds, size))
        console.print(f"[green]built[/] {ref} in {seconds:.1f} s, {images.human_size(size)}")
        if push_registry:
            target = images.image_ref(name, f"{push_registry.rstrip('/')}/{images.DEFAULT_REPOSITORY}", tag)
            images.push_image(client, ref, target, console.print)
    from rich.table import Table

    table = Table("image", "build s", "size", title=f"revision {labels['REVISION'][:12]}")
    for ref, seconds, size in rows:
        table.add_row(ref, f"{seconds:.1f}", images.human_size(size))
    console.print(table)


@click.command("up", epilog=exits.epilog())
@click.option("--cpu", is_flag=True, help="No GPU: the tiny model and the CPU quantizer (adds compose.cpu.yaml).")
@click.option(
    "-f",
    "--file",
    "files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Another compose file layered on top (repeatable).",
)
@click.option("-p", "--project-name", default="olivepress", show_default=True, help="Compose project name.")
@click.option(
    "--project-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Where compose.yaml is."
)
@click.option("--fresh", is_flag=True, help="Remove the project's volumes first (start from an empty volume).")
@click.option("--tag", envvar="OLIVEPRESS_TAG", default="latest", show_default=True, help="Tag of the images to run.")
def up(cpu: bool, files: tuple[Path, ...], project_name: str, project_dir: Path | None, fresh: bool, tag: str) -> None:
    """Run the pipeline with docker compose: quantize -> finetune -> optimize -> infer, one image each.

    Each stage starts only after the one before it exited 0; the stages' logs stream as they run and a table of
    each stage's result follows. The exit code is the first failed stage's (1 or 2), 0 if all succeeded.
    Build the images first (`olivepress docker build`); settings come from .env (see .env.example).
    """
    client = engine.client()
    engine.require_cli("compose")
    console = _console()
    project_dir = project_dir or compose.project_dir()
    base = ["docker", "compose", "--project-directory", str(project_dir), "-p", project_name]
    for f in compose.compose_files(cpu, files, project_dir):
        base += ["-f", str(f)]
    env = dict(os.environ, OLIVEPRESS_TAG=tag)
    if fresh:
        subprocess.run([*base, "down", "--volumes", "--remove-orphans"], env=env, check=False)
    console.print(f"[bold]compose up[/] project {project_name}{' (CPU)' if cpu else ''}")
    started = time.monotonic()
    # --force-recreate: no container keeps a previous run's exit code; stages skip work whose inputs are unchanged.
    # --pull never: images come from `olivepress docker build` (or compose's build), not from a registry.
    code = subprocess.run(
        [*base, "up", "--force-recreate", "--remove-orphans", "--pull", "never", "--no-color"], env=env
    ).returncode
    wall = time.monotonic() - started
    results = compose.stage_results(client, project_name)
    logs_hint = " ".join([*base[:2], *base[4:6]])
    sys.exit(compose.report(results, console, wall, compose_code=code, logs_hint=logs_hint))


def _default_infer_image() -> str:
    return images.image_ref(
        "infer",
        os.environ.get("OLIVEPRESS_IMAGES", images.DEFAULT_REPOSITORY),
        os.environ.get("OLIVEPRESS_TAG", "latest"),
    )


@click.command(
    "infer",
    context_settings={"ignore_unknown_options": True},
    epilog=exits.epilog(),
)
@click.option(
    "--image",
    default=_default_infer_image,
    help="The infer image to run, from `olivepress docker build infer` "
    "[default: $OLIVEPRESS_IMAGES/infer:$OLIVEPRESS_TAG, olivepress/infer:latest when unset].",
)
@click.option(
    "--home",
    envvar="OLIVEPRESS_HOME",
    default="artifacts",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The volume root on this host (holding optimize/), mounted at /workspace; infer/ is written there.",
)
@click.option(
    "--model-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A model folder on this host (model/ and adapters/) to use instead of HOME's optimize/; mounted read-only.",
)
@click.argument("stage_args", nargs=-1, type=click.UNPROCESSED)
def infer(image: str, home: Path, model_dir: Path | None, stage_args: tuple[str, ...]) -> None:
    """Run the infer stage in its image on a host folder; STAGE_ARGS go to the stage unchanged.

    \b
    olivepress docker infer --home ./artifacts --prompt "Where should I eat in Rome?"
    The stage's options: docker run --rm olivepress/infer --help
    """
    sys.exit(container.run_infer(image, home, stage_args, model_dir=model_dir))


@click.group("docker", context_settings={"help_option_names": ["-h", "--help"]})
def docker() -> None:
    """The images and the pipeline in containers: build them, run the pipeline under compose, run infer in its image."""


docker.add_command(build)
docker.add_command(up)
docker.add_command(infer)
