"""The container verbs: ``olivepress build``, ``olivepress up`` and ``olivepress infer --image``.

The ``docker`` Python SDK does what it does well here: checking the engine, running a container and streaming
its logs, inspecting images, containers and exit codes. The ``docker buildx`` and ``docker compose`` CLIs do what
the SDK cannot: BuildKit builds with secrets, and compose files. A missing or stopped engine, or a missing CLI
plugin, is a one-paragraph message and exit code 3, never a traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from olivepress.diverting import DivertingCommand, pop_option

if TYPE_CHECKING:  # the SDK is imported lazily: `olivepress --help` must work without it
    import docker

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BASE_IMAGE = "debian:bookworm-slim"
DEFAULT_SOURCE = "https://github.com/olivepress/olivepress"
STAGE_ORDER = ("quantize", "finetune", "optimize", "infer")
CONTAINER_HOME = "/workspace"


@dataclass(frozen=True)
class Image:
    """One buildable image: which Dockerfile and target make it."""

    name: str
    dockerfile: str
    target: str


# Build order matters: quantize builds the shared torch layer the next two reuse.
IMAGES = {
    "quantize": Image("quantize", "docker/cuda.Dockerfile", "quantize"),
    "finetune": Image("finetune", "docker/cuda.Dockerfile", "finetune"),
    "optimize": Image("optimize", "docker/cuda.Dockerfile", "optimize"),
    "infer": Image("infer", "docker/cpu.Dockerfile", "infer"),
    # olivepress push / pull in a container (compose's push and pull services): the Azure SDK, no torch.
    "push": Image("push", "docker/cpu.Dockerfile", "push"),
}


class EngineError(click.ClickException):
    """No usable Docker engine or CLI: the message says what is missing and how to get it."""

    exit_code = 3


def _engine_help() -> str:
    where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    return (
        f"No Docker engine answers at {where}.\n"
        "Start it (Docker Desktop; `sudo systemctl start docker`; on Debian without systemd: "
        "`sudo scripts/install-docker.sh`, which installs and starts one), or point DOCKER_HOST at a running one."
    )


def engine() -> docker.DockerClient:
    """A client for a running engine, or an EngineError that says how to get one."""
    try:
        import docker
    except ImportError as exc:
        raise EngineError("The Docker SDK for Python is missing: pip install docker") from exc
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except docker.errors.DockerException as exc:
        reason = str(exc).splitlines()[0][:200]
        raise EngineError(f"{_engine_help()}\n(detail: {reason})") from exc
    return client


def require_cli(plugin: str | None = None) -> None:
    """The docker CLI (and a plugin: compose or buildx) must be installed, with a clear message if not."""
    if shutil.which("docker") is None:
        raise EngineError("The docker CLI is not on PATH. Install Docker (scripts/install-docker.sh on Debian).")
    if plugin is None:
        return
    probe = subprocess.run(["docker", plugin, "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise EngineError(
            f"`docker {plugin}` is not available (the {plugin} CLI plugin, v2). Install it: docker-{plugin} "
            "from your distribution or Docker's packages (scripts/install-docker.sh on Debian)."
        )


def image_ref(name: str, repository: str = "olivepress", tag: str = "latest") -> str:
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


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "kB") else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


@click.command("build")
@click.argument("names", nargs=-1, type=click.Choice(list(IMAGES)))
@click.option(
    "--base-image",
    envvar="BASE_IMAGE",
    default=DEFAULT_BASE_IMAGE,
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
    default="olivepress",
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
    """Build the images: all four, or those named (quantize, finetune, optimize, infer).

    \b
    The three CUDA images share one torch layer, built once. One build at a time.
    Example (no registry, behind a proxy):
      scripts/make-base-image.sh
      olivepress build --base-image local/debian:bookworm-slim --extra-ca /etc/ssl/certs/ca-certificates.crt
    """
    client = engine()
    require_cli("buildx")
    console = _console()
    labels = provenance()
    rows = []
    for name in names or tuple(IMAGES):
        image, ref = IMAGES[name], image_ref(name, repository, tag)
        console.print(f"[bold]build[/] {ref}  ({image.dockerfile} --target {image.target})")
        cmd = build_command(
            image, ref, base_image=base_image, extra_ca=extra_ca, labels=labels, progress=progress, no_cache=no_cache
        )
        started = time.monotonic()
        code = subprocess.run(cmd).returncode
        seconds = time.monotonic() - started
        if code != 0:
            raise click.ClickException(f"building {ref} failed (docker buildx exit {code}): see the build log above")
        size = client.images.get(ref).attrs["Size"]
        rows.append((ref, seconds, size))
        console.print(f"[green]built[/] {ref} in {seconds:.1f} s, {human_size(size)}")
        if push_registry:
            push_image(client, ref, image_ref(name, f"{push_registry.rstrip('/')}/olivepress", tag), console)
    from rich.table import Table

    table = Table("image", "build s", "size", title=f"revision {labels['REVISION'][:12]}")
    for ref, seconds, size in rows:
        table.add_row(ref, f"{seconds:.1f}", human_size(size))
    console.print(table)


def push_image(client: docker.DockerClient, ref: str, target: str, console: Any) -> None:  # noqa: ANN401
    """Tag ``ref`` as ``target`` and push it, turning the engine's streamed errors into one clear message."""
    client.images.get(ref).tag(target)
    for line in client.images.push(target, stream=True, decode=True):
        if "error" in line:
            raise click.ClickException(f"pushing {target} failed: {line['error']} (logged in to the registry?)")
    console.print(f"[green]pushed[/] {target}")


@dataclass
class StageResult:
    stage: str
    state: str  # "exited", "created" (never started), "running", "missing"
    exit_code: int | None
    seconds: float | None


def _parse_time(value: str) -> datetime | None:
    if not value or value.startswith("0001-"):
        return None
    # Docker gives nanoseconds; fromisoformat takes microseconds.
    head, _, frac = value.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac or '0')[:6]}+00:00")


def stage_results(client: docker.DockerClient, project: str) -> list[StageResult]:
    """Each stage's container state and exit code in a compose project, in pipeline order."""
    found: dict[str, Any] = {}
    for container in client.containers.list(all=True, filters={"label": f"com.docker.compose.project={project}"}):
        found[container.labels.get("com.docker.compose.service", "")] = container
    results = []
    for stage in STAGE_ORDER:
        container = found.get(stage)
        if container is None:
            results.append(StageResult(stage, "missing", None, None))
            continue
        state = container.attrs["State"]
        start, end = _parse_time(state.get("StartedAt", "")), _parse_time(state.get("FinishedAt", ""))
        seconds = (end - start).total_seconds() if start and end and end >= start else None
        status = state.get("Status", "unknown")
        results.append(StageResult(stage, status, state.get("ExitCode") if status == "exited" else None, seconds))
    return results


def compose_files(cpu: bool, extra: Sequence[Path], project_dir: Path) -> list[Path]:
    files = [project_dir / "compose.yaml"]
    if cpu:
        files.append(project_dir / "compose.cpu.yaml")
    return [*files, *extra]


def _project_dir() -> Path:
    for candidate in (Path.cwd(), REPO):
        if (candidate / "compose.yaml").is_file():
            return candidate
    raise click.ClickException("No compose.yaml here: run from a clone of olivepress (or pass --project-dir).")


@click.command("up")
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
    Build the images first (`olivepress build`); settings come from .env (see .env.example).
    """
    client = engine()
    require_cli("compose")
    console = _console()
    project_dir = project_dir or _project_dir()
    base = ["docker", "compose", "--project-directory", str(project_dir), "-p", project_name]
    for f in compose_files(cpu, files, project_dir):
        base += ["-f", str(f)]
    env = dict(os.environ, OLIVEPRESS_TAG=tag)
    if fresh:
        subprocess.run([*base, "down", "--volumes", "--remove-orphans"], env=env, check=False)
    console.print(f"[bold]compose up[/] project {project_name}{' (CPU)' if cpu else ''}")
    started = time.monotonic()
    # --force-recreate: no container keeps a previous run's exit code; stages skip work whose inputs are unchanged.
    # --pull never: images come from `olivepress build` (or compose's build), not from a registry.
    code = subprocess.run(
        [*base, "up", "--force-recreate", "--remove-orphans", "--pull", "never", "--no-color"], env=env
    ).returncode
    wall = time.monotonic() - started
    results = stage_results(client, project_name)
    exit_code = report(results, console, wall, compose_code=code, logs_hint=" ".join([*base[:2], *base[4:6]]))
    sys.exit(exit_code)


def report(results: Sequence[StageResult], console: Any, wall: float, compose_code: int, logs_hint: str) -> int:
    """Print the per-stage table; return the exit code for the whole run."""
    from rich.table import Table

    table = Table("stage", "result", "seconds", title=f"pipeline ({wall:.0f} s)")
    failed: StageResult | None = None
    for r in results:
        if failed is not None or r.state in ("created", "missing"):
            why = f"not run ({failed.stage} failed)" if failed else "not run"
            table.add_row(r.stage, f"[yellow]{why}[/]", "")
            continue
        if r.state == "exited" and r.exit_code == 0:
            table.add_row(r.stage, "[green]ok[/]", f"{r.seconds:.1f}" if r.seconds is not None else "")
        else:
            failed = r
            what = f"exit {r.exit_code}" if r.state == "exited" else r.state
            table.add_row(r.stage, f"[red]failed ({what})[/]", f"{r.seconds or 0:.1f}")
    console.print(table)
    if failed is not None:
        later = [r.stage for r in results[results.index(failed) + 1 :]]
        console.print(
            f"[red]Stage {failed.stage} failed (exit {failed.exit_code})"
            + (f"; {', '.join(later)} did not run" if later else "")
            + ".[/]",
        )
        console.print(f"Its log: {logs_hint} logs {failed.stage}", soft_wrap=True)
        return failed.exit_code or 1
    if any(r.state != "exited" for r in results) or compose_code != 0:
        console.print(f"[red]docker compose exited {compose_code} before every stage finished.[/]")
        return compose_code or 1
    return 0


def infer_image(
    image: str,
    home: Path,
    args: Sequence[str] = (),
    *,
    model_dir: Path | None = None,
    client: docker.DockerClient | None = None,
    echo: Callable[[str], None] | None = None,
) -> int:
    """Run the inference image on a host folder (the volume root) and stream its output; return its exit code.

    ``home`` is mounted at /workspace and the container runs as the folder's owner, so what it writes
    (infer/answers.json) belongs to the user. ``model_dir``, if given, is mounted read-only at /model.
    """
    import docker

    client = client or engine()
    echo = echo or (lambda line: click.echo(line, nl=False, err=False))
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise click.ClickException(f"No image {image}: build it with `olivepress build infer`.") from None
    volumes = {str(home): {"bind": CONTAINER_HOME, "mode": "rw"}}
    command = ["infer", *args]  # the image's default command is `serve`
    if model_dir is not None:
        volumes[str(Path(model_dir).resolve())] = {"bind": "/model", "mode": "ro"}
        command += ["--model-dir", "/model"]
    st = home.stat()
    container = client.containers.run(
        image,
        command=command,
        volumes=volumes,
        environment={"OLIVEPRESS_HOME": CONTAINER_HOME, "HOME": "/tmp"},
        user=f"{st.st_uid}:{st.st_gid}",
        detach=True,
    )
    try:
        for chunk in container.logs(stream=True, follow=True):
            echo(chunk.decode("utf-8", errors="replace"))
        return int(container.wait().get("StatusCode", 1))
    finally:
        container.remove(force=True)


class _ImageAwareCommand(DivertingCommand):
    """A stage command that, given ``--image IMAGE``, runs itself in that image instead of in this process.

    The raw arguments go to the container unchanged, except ``--home`` (mounted at /workspace) and
    ``--model-dir`` (mounted read-only), which are host paths.
    """

    def diverts(self, value: str | None, rest: list[str]) -> bool:
        return value is not None and not any(a in ("-h", "--help") for a in rest)

    def divert(self, ctx: click.Context, value: str, rest: list[str]) -> Any:
        home, rest = pop_option(rest, "--home")
        model_dir, rest = pop_option(rest, "--model-dir")
        home_dir = Path(home or os.environ.get("OLIVEPRESS_HOME") or "artifacts")
        code = infer_image(value, home_dir, rest, model_dir=Path(model_dir) if model_dir else None)
        ctx.exit(code)


def with_image_option(command: click.Command) -> click.Command:
    """``command`` plus ``--image IMAGE``: run it in that container image on the host's --home folder.

    For the infer stage: ``main.add_command(images.with_image_option(infer.command), "infer")`` gives
    ``olivepress infer --image olivepress/infer:latest --home ./artifacts``.
    """
    option = click.Option(
        ["--image"],
        metavar="IMAGE",
        help="Run this stage in IMAGE (e.g. olivepress/infer:latest) on the --home folder, instead of here.",
    )
    return _ImageAwareCommand(command, option)


@click.command("infer-image")
@click.argument("image")
@click.option(
    "--home",
    envvar="OLIVEPRESS_HOME",
    default="artifacts",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The volume root on this host (holding optimize/), mounted at /workspace.",
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def infer_image_command(image: str, home: Path, args: tuple[str, ...]) -> None:
    """Run the slim inference IMAGE on a model folder; ARGS go to the infer stage (see IMAGE --help)."""
    sys.exit(infer_image(image, home, args))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def images_main() -> None:
    """The container verbs alone: ``python -m olivepress.images build|up|infer-image``."""


images_main.add_command(build)
images_main.add_command(up)
images_main.add_command(infer_image_command)

if __name__ == "__main__":
    images_main()
