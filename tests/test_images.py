"""The containers, for real: a Docker engine, buildx builds of every image, compose runs on CPU.

The tests marked `docker` need an engine; the others run without one. Those that need an engine start one
(scripts/install-docker.sh, as root) when none answers, and skip with the reason only when none can be started;
with OLIVEPRESS_REQUIRE_DOCKER=1 (CI) they fail instead of skipping. The images are built once per session with
`python -m olivepress.cli docker build` (BuildKit cache: seconds when CI already built them). BASE_IMAGE picks
the base (default: debian:bookworm-slim if present, else the debootstrap stand-in from
scripts/make-base-image.sh); OLIVEPRESS_EXTRA_CA an extra CA (default: the host's bundle, which is harmless where
no proxy intercepts TLS and needed where one does).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from contract import registry
from contract.exits import NoDocker
from olivepress.docker import build, commands, container, engine

REPO = Path(__file__).resolve().parent.parent
HOST_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
TAG = os.environ.get("OLIVEPRESS_TAG", "latest")
REFS = {name: build.image_ref(name, "olivepress", TAG) for name in build.IMAGES}
# What each image runs: a stage's image its stage module, the others their own.
ENTRYPOINTS = {s.image: s.module for s in registry.PIPELINE} | {"server": "runtime.serve", "push": "olivepress.azureml"}
SLIM_IMAGES = ("infer", "server")
SLIM_GOAL_BYTES = 200e6


def launcher(*args: str, env: dict | None = None, timeout: int = 1800) -> subprocess.CompletedProcess:
    """The container verbs as a user runs them (`olivepress docker ...`), in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "olivepress.cli", "docker", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, **(env or {})),
        timeout=timeout,
    )


# --- no engine needed -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args", [("build", "infer"), ("up", "--cpu"), ("infer", "--image", "olivepress/infer:latest", "--home", "x")]
)
def test_a_missing_engine_is_a_clear_message_not_a_traceback(args, tmp_path):
    result = launcher(*args, env={"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"})
    assert result.returncode == 4, result.stderr
    assert "No Docker engine answers" in result.stderr
    assert "scripts/install-docker.sh" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_every_lock_pins_every_package_with_hashes():
    for lock in sorted((REPO / "docker" / "requirements").glob("*.txt")):
        if lock.name == "constraints.txt":
            continue
        # One requirement per logical line: join the backslash continuations, drop comments.
        lines = [line.split("#")[0].strip() for line in lock.read_text().replace("\\\n", " ").splitlines()]
        requirements = [line for line in lines if line]
        assert requirements, lock
        for line in requirements:
            assert re.match(r"^[A-Za-z0-9_.\-]+(\[[^\]]*\])?==\S+ ", line), f"{lock.name}: not pinned: {line[:80]}"
            assert "--hash=sha256:" in line, f"{lock.name}: no hash: {line[:80]}"


def test_the_cuda_locks_agree_on_every_shared_package():
    def pins(name: str) -> dict[str, str]:
        text = (REPO / "docker" / "requirements" / f"{name}.txt").read_text()
        return dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", text, re.M))

    shared = pins("torch")
    for image in ("quantize", "finetune", "optimize"):
        lock = pins(image)
        assert {k: lock.get(k) for k in shared} == shared, f"{image}.txt moves a package of the shared torch layer"
    assert "torch" not in pins("infer") and "transformers" not in pins("infer")


def test_the_image_table_builds_the_stages_in_pipeline_order_then_server_and_push():
    assert list(build.IMAGES) == [*(s.image for s in registry.PIPELINE), "server", "push"]
    for stage in registry.PIPELINE:
        assert (build.IMAGES[stage.image].dockerfile, build.IMAGES[stage.image].target) == (
            stage.dockerfile,
            stage.target,
        )


def test_the_laptop_compose_file_serves_by_default_and_infers_on_request():
    services = yaml.safe_load((REPO / "compose.laptop.yaml").read_text())["services"]
    assert [name for name, service in services.items() if not service.get("profiles")] == ["serve"]
    assert "/server:" in services["serve"]["image"] and services["serve"]["build"]["target"] == "server"
    assert any(str(port).endswith(":8000") for port in services["serve"]["ports"])
    assert services["infer"]["build"]["target"] == "infer" and "command" not in services["infer"]


# --- engine fixtures --------------------------------------------------------------------------------------


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("OLIVEPRESS_REQUIRE_DOCKER") == "1":
        pytest.fail(f"OLIVEPRESS_REQUIRE_DOCKER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def client():
    try:
        return engine.client()
    except NoDocker as first:
        detail = str(first.message).splitlines()[0]
    script = REPO / "scripts" / "install-docker.sh"
    if os.geteuid() != 0 or not Path("/etc/debian_version").exists():
        _skip_or_fail(f"no Docker engine answers and none can be started here (not root on Debian): {detail}")
    started = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600)
    try:
        return engine.client()
    except NoDocker as second:
        _skip_or_fail(
            f"no Docker engine could be started: scripts/install-docker.sh exited {started.returncode}: "
            f"{started.stderr.strip()[-500:]} / {second.message.splitlines()[0]}"
        )


@pytest.fixture(scope="session")
def base_image(client) -> str:
    if os.environ.get("BASE_IMAGE"):
        return os.environ["BASE_IMAGE"]
    import docker

    try:
        client.images.get(build.DEFAULT_BASE_IMAGE)
        return build.DEFAULT_BASE_IMAGE
    except docker.errors.ImageNotFound:
        pass
    made = subprocess.run(["bash", str(REPO / "scripts" / "make-base-image.sh")], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    return "local/debian:bookworm-slim"


@pytest.fixture(scope="session")
def extra_ca() -> Path | None:
    given = os.environ.get("OLIVEPRESS_EXTRA_CA")
    if given:
        return Path(given)
    return HOST_BUNDLE if HOST_BUNDLE.is_file() else None


@pytest.fixture(scope="session")
def built(client, base_image, extra_ca) -> dict[str, str]:
    """Every image, built from this checkout (cached layers make a rebuild take seconds)."""
    args = ["build", "--base-image", base_image, "--tag", TAG, "--progress", "plain"]
    if extra_ca is not None:
        args += ["--extra-ca", str(extra_ca)]
    started = time.monotonic()
    result = launcher(*args)
    assert result.returncode == 0, result.stderr[-5000:]
    print(f"\n[images] build of every image: {time.monotonic() - started:.1f} s", file=sys.stderr)
    return REFS


def _compose_down(project: str, *files: str) -> None:
    cmd = ["docker", "compose", "-p", project]
    for f in files:
        cmd += ["-f", f]
    subprocess.run([*cmd, "down", "--volumes", "--remove-orphans"], cwd=REPO, capture_output=True)


@pytest.fixture(scope="session")
def cpu_run(built, client, tmp_path_factory):
    """`olivepress docker up --cpu` from an empty volume; yields the launcher's result and a host copy of the volume."""
    project = "olivepress-test"
    started = time.monotonic()
    result = launcher("up", "--cpu", "--fresh", "-p", project)
    wall = time.monotonic() - started
    print(f"\n[images] compose CPU pipeline: {wall:.1f} s", file=sys.stderr)
    copy = tmp_path_factory.mktemp("volume")
    if result.returncode == 0:
        # The infer image has cp and chown (coreutils): copy the named volume out, owned by us.
        client.containers.run(
            REFS["infer"],
            entrypoint=["sh", "-c", f"cp -a /src/. /dst/ && chown -R {os.getuid()}:{os.getgid()} /dst"],
            user="0",
            volumes={f"{project}_olivepress": {"bind": "/src", "mode": "ro"}, str(copy): {"bind": "/dst"}},
            remove=True,
        )
    yield result, copy
    _compose_down(project, "compose.yaml", "compose.cpu.yaml")


# --- the images -------------------------------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.parametrize("name", registry.NAMES)
def test_docker_run_image_help_teaches_the_stage(built, client, name):
    out = client.containers.run(built[registry.STAGES[name].image], command=["--help"], remove=True).decode()
    assert f"Usage: python -m stages.{name}" in out
    assert "--home" in out


@pytest.mark.docker
@pytest.mark.parametrize("name", list(build.IMAGES))
def test_images_run_as_non_root_with_oci_labels(built, client, name):
    attrs = client.images.get(built[name]).attrs["Config"]
    assert attrs["User"] and attrs["User"].split(":")[0] not in ("0", "root")
    labels = attrs["Labels"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert labels["org.opencontainers.image.revision"].startswith(head)
    assert labels["org.opencontainers.image.source"]
    assert labels["org.opencontainers.image.version"] not in ("", "0.0.0")
    assert attrs["Entrypoint"] == ["python", "-m", ENTRYPOINTS[name]]


@pytest.mark.docker
def test_only_the_server_image_listens_and_has_a_healthcheck(built, client):
    infer, server = (client.images.get(built[name]).attrs["Config"] for name in SLIM_IMAGES)
    assert not infer.get("ExposedPorts") and not infer.get("Healthcheck"), infer
    assert "8000/tcp" in server["ExposedPorts"] and server["Healthcheck"]["Test"][0] == "CMD", server
    assert {"OLIVEPRESS_SERVE_HOST=0.0.0.0", "OLIVEPRESS_SERVE_PORT=8000"} <= set(server["Env"])


@pytest.mark.docker
@pytest.mark.parametrize("name", SLIM_IMAGES)
def test_slim_images_stay_small(built, client, name):
    size = client.images.get(built[name]).attrs["Size"]
    assert size <= SLIM_GOAL_BYTES, build.human_size(size)


@pytest.mark.docker
@pytest.mark.parametrize("name", SLIM_IMAGES)
def test_inference_image_has_onnxruntime_genai_and_no_torch_transformers_or_compiler(built, client, name):
    probe = (
        "import importlib.util as u, shutil, onnxruntime_genai as og; "
        "print(og.__version__, [m for m in ('torch', 'transformers') if u.find_spec(m)], "
        "[c for c in ('cc', 'gcc', 'g++', 'clang', 'ld', 'pip') if shutil.which(c)])"
    )
    out = client.containers.run(built[name], entrypoint=["python", "-c", probe], remove=True).decode().strip()
    assert out.endswith("[] []"), out


@pytest.mark.docker
def test_cuda_images_share_the_torch_layer(built, client):
    layers = {n: client.images.get(built[n]).attrs["RootFS"]["Layers"] for n in ("quantize", "finetune", "optimize")}
    shared = os.path.commonprefix(list(layers.values()))
    sizes = {n: client.images.get(built[n]).attrs["Size"] for n in layers}
    assert len(shared) >= 3, "the three CUDA images share no layers"
    # Sharing the torch stack means what differs between them is small next to the whole image.
    assert max(sizes.values()) - min(sizes.values()) < 0.2 * min(sizes.values()), sizes


def _pem_blocks(text: str) -> set[str]:
    return set(re.findall(r"-----BEGIN CERTIFICATE-----\s+(.+?)\s+-----END CERTIFICATE-----", text, re.S))


@pytest.mark.docker
def test_no_image_holds_the_extra_ca(built, extra_ca, client):
    """The build's extra CA (the certificates in it that no public bundle has) is in no layer of any image."""
    if extra_ca is None:
        pytest.skip("no extra CA was given to the build (OLIVEPRESS_EXTRA_CA unset, no host bundle)")
    import certifi

    # Public roots (certifi's and Debian's Mozilla set) may be in images by design; the rest is the proxy's own.
    public = _pem_blocks(Path(certifi.where()).read_text())
    for crt in Path("/usr/share/ca-certificates").glob("**/*.crt"):
        public |= _pem_blocks(crt.read_text())
    private = _pem_blocks(extra_ca.read_text()) - public
    if not private:
        pytest.skip(f"{extra_ca} holds only public CAs: nothing private that could leak")
    # A distinctive line of each private certificate; PEM wraps base64 at 64 characters.
    markers = [block.split()[1].encode() for block in private if len(block.split()) > 2]
    save = subprocess.Popen(["docker", "save", *built.values()], stdout=subprocess.PIPE)
    hits, scanned = [], 0
    with tarfile.open(fileobj=save.stdout, mode="r|") as outer:
        for member in outer:
            if not (member.isfile() and member.name.endswith(".tar")):
                continue
            layer = outer.extractfile(member)
            with tarfile.open(fileobj=layer, mode="r|") as inner:
                for item in inner:
                    if not item.isfile():
                        continue
                    scanned += 1
                    data = inner.extractfile(item).read()
                    if any(m in data for m in markers):
                        hits.append(f"{member.name}:{item.name}")
    assert save.wait() == 0
    assert scanned > 1000
    assert not hits, f"the extra CA is inside an image: {hits}"


# --- compose ----------------------------------------------------------------------------------------------


@pytest.mark.docker
def test_compose_cpu_pipeline_runs_every_stage(cpu_run):
    result, volume = cpu_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("quantize", "finetune", "optimize", "infer"):
        assert re.search(rf"{stage}\s+│\s+ok", result.stderr), result.stderr[-3000:]
        assert (volume / stage / "manifest.json").is_file(), stage
    assert (volume / "optimize" / "model" / "genai_config.json").is_file()
    assert list((volume / "optimize" / "adapters").glob("*.onnx_adapter"))


def _manifests(home: Path) -> dict[str, dict]:
    return {stage: json.loads((home / stage / "manifest.json").read_text()) for stage in registry.NAMES}


@pytest.mark.docker
def test_a_volume_made_in_the_containers_skips_every_stage_on_the_host(cpu_run, tmp_path):
    result, volume = cpu_run
    assert result.returncode == 0, "the compose run failed; see test_compose_cpu_pipeline_runs_every_stage"
    home = tmp_path / "home"
    subprocess.run(["cp", "-a", str(volume), str(home)], check=True)
    before = _manifests(home)
    run = subprocess.run(
        [sys.executable, "-m", "olivepress.cli", "run", "--max-steps", "20", "--home", str(home)],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("skipped") == len(registry.NAMES), run.stderr[-3000:]
    assert _manifests(home) == before


@pytest.mark.docker
def test_a_volume_made_on_the_host_skips_every_stage_in_the_containers(built, client, tiny_run, tmp_path):
    project = "olivepress-relocated"
    _compose_down(project, "compose.yaml", "compose.cpu.yaml")
    client.volumes.create(f"{project}_olivepress", labels={"com.docker.compose.project": project,
                                                          "com.docker.compose.volume": "olivepress"})  # fmt: skip
    copy = "cp -a /src/. /dst/ && chown -R 1000:1000 /dst"
    client.containers.run(REFS["infer"], entrypoint=["sh", "-c", copy], user="0", remove=True,
                          volumes={str(tiny_run): {"bind": "/src", "mode": "ro"},
                                   f"{project}_olivepress": {"bind": "/dst"}})  # fmt: skip
    try:
        result = launcher("up", "--cpu", "-p", project)
        assert result.returncode == 0, result.stderr[-3000:]
        back = tmp_path / "back"
        back.mkdir()
        out = f"cp -a /src/. /dst/ && chown -R {os.getuid()} /dst"
        client.containers.run(REFS["infer"], entrypoint=["sh", "-c", out], user="0", remove=True,
                              volumes={f"{project}_olivepress": {"bind": "/src", "mode": "ro"},
                                       str(back): {"bind": "/dst"}})  # fmt: skip
        assert _manifests(back) == _manifests(tiny_run), "a stage ran again in the containers"
    finally:
        _compose_down(project, "compose.yaml", "compose.cpu.yaml")


def _check_answers(home: Path, since: float) -> list[dict]:
    answers_file = home / "infer" / "answers.json"
    assert answers_file.stat().st_mtime >= since - 1, "answers.json was not written by this run"
    answers = json.loads(answers_file.read_text())
    assert {a["adapter"] for a in answers} >= {"base"} and len({a["adapter"] for a in answers}) == 2
    assert all(a["text"].strip() for a in answers), answers
    return answers


@pytest.mark.docker
def test_inference_image_runs_alone_on_the_produced_folder(cpu_run, built, tmp_path):
    result, volume = cpu_run
    assert result.returncode == 0, "the compose run failed; see test_compose_cpu_pipeline_runs_every_stage"
    chunks: list[str] = []
    started = time.time()
    code = container.run_infer(
        built["infer"],
        volume,
        ["--force", "--prompt", "What should I pack for Lisbon?", "--max-new-tokens", "12"],
        echo=chunks.append,
    )
    assert code == 0, "".join(chunks)[-3000:]
    answers = _check_answers(volume, started)
    assert {a["prompt"] for a in answers} == {"What should I pack for Lisbon?"}


@pytest.mark.docker
def test_laptop_compose_runs_only_the_inference_image(cpu_run, built):
    result, volume = cpu_run
    assert result.returncode == 0, "the compose run failed; see test_compose_cpu_pipeline_runs_every_stage"
    project = "olivepress-test-laptop"
    env = dict(
        os.environ, OLIVEPRESS_MODEL_DIR=str(volume), OLIVEPRESS_UID=str(os.getuid()), OLIVEPRESS_GID=str(os.getgid())
    )
    started = time.time()
    cmd = ["docker", "compose", "-p", project, "-f", "compose.laptop.yaml"]
    run = subprocess.run(
        [*cmd, "run", "--rm", "--no-deps", "infer", "--force"], cwd=REPO, env=env, capture_output=True, text=True
    )
    _compose_down(project, "compose.laptop.yaml")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    _check_answers(volume, started)


@pytest.mark.docker
def test_a_failing_stage_stops_the_stages_after_it(built):
    project = "olivepress-test-fail"
    try:
        result = launcher("up", "--cpu", "--fresh", "-p", project, env={"OLIVEPRESS_QUANTIZE_ALGORITHM": "bogus"})
    finally:
        _compose_down(project, "compose.yaml", "compose.cpu.yaml")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Stage quantize failed (exit 2); finetune, optimize, infer did not run" in result.stderr
    assert "Traceback" not in result.stderr
    for stage in ("finetune", "optimize", "infer"):
        assert re.search(rf"{stage}\s+│\s+not run \(quantize failed\)", result.stderr), result.stderr[-3000:]


@pytest.mark.docker
def test_docker_infer_runs_the_stage_in_the_image(cpu_run, built):
    """What `olivepress docker infer` does: the stage's own options, run in the slim image on the host folder."""
    from click.testing import CliRunner

    result, volume = cpu_run
    assert result.returncode == 0, "the compose run failed; see test_compose_cpu_pipeline_runs_every_stage"
    assert "--image" in CliRunner().invoke(commands.docker, ["infer", "--help"]).output
    started = time.time()
    args = ["--image", built["infer"], "--home", str(volume), "--force", "--prompt", "Hi", "--max-new-tokens", "6"]
    run = CliRunner().invoke(commands.docker, ["infer", *args])
    assert run.exit_code == 0, run.output[-3000:]
    assert "infer: done" in run.output and "/workspace/infer" in run.output  # it ran in the container
    assert {a["prompt"] for a in _check_answers(volume, started)} == {"Hi"}


@pytest.mark.docker
def test_server_image_serves_the_openai_api_by_default(built, client, tiny_run):
    """`docker run IMAGE` (no command) serves; the real openai client streams from it; its HEALTHCHECK passes."""
    openai = pytest.importorskip("openai")
    attrs = client.images.get(built["server"]).attrs["Config"]
    assert not attrs["Cmd"] and "8000/tcp" in attrs["ExposedPorts"]
    folder = tiny_run / "optimize"
    st = folder.stat()
    server = client.containers.run(
        built["server"],
        volumes={str(folder): {"bind": "/model", "mode": "ro"}},
        environment={"OLIVEPRESS_SERVE_MODEL_DIR": "/model"},
        ports={"8000/tcp": ("127.0.0.1", None)},
        user=f"{st.st_uid}:{st.st_gid}",  # the folder's owner, as run_infer does (pytest's tmp is private)
        detach=True,
    )
    try:
        deadline, port = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            server.reload()
            assert server.status in ("created", "running"), server.logs().decode()[-3000:]
            bound = (server.attrs["NetworkSettings"]["Ports"] or {}).get("8000/tcp")
            if bound and "serve:" in server.logs().decode():
                port = bound[0]["HostPort"]
                break
            time.sleep(0.5)
        assert port, server.logs().decode()[-3000:]
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=2, timeout=60)
        assert [m.id for m in api.models.list()] == ["base", "travel"]
        messages = [{"role": "user", "content": "What should I pack for Lisbon?"}]
        whole = api.chat.completions.create(model="travel", messages=messages, max_tokens=10)
        assert whole.choices[0].message.content.strip() and whole.usage.completion_tokens <= 10
        chunks = list(api.chat.completions.create(model="travel", messages=messages, max_tokens=10, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
        with pytest.raises(openai.BadRequestError):
            api.chat.completions.create(model="cooking", messages=messages)
        # The image's own HEALTHCHECK command, run now rather than after its 30 s interval.
        check = attrs["Healthcheck"]["Test"]
        assert check[0] == "CMD"
        code, output = server.exec_run(check[1:])
        assert code == 0, output.decode()
        # The chat page and the metrics, from the image; then `docker stop` (SIGTERM) drains and exits 0.
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
            assert b"/v1/chat/completions" in page.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as metrics:
            assert b'olivepress_requests_total{model="travel",status="200"} 2' in metrics.read()
        started = time.monotonic()
        server.stop(timeout=20)
        assert server.wait(timeout=5)["StatusCode"] == 0 and time.monotonic() - started < 10, server.logs()
    finally:
        server.remove(force=True)


@pytest.mark.docker
def test_build_push_to_an_unreachable_registry_fails_clearly(built, base_image, extra_ca):
    # No registry runs here: a closed loopback port shows the push really happens, and that its failure is named.
    args = ["build", "infer", "--base-image", base_image, "--tag", TAG, "--progress", "quiet", "--push", "127.0.0.1:9"]
    if extra_ca is not None:
        args += ["--extra-ca", str(extra_ca)]
    result = launcher(*args)
    assert result.returncode == 1
    assert "pushing 127.0.0.1:9/olivepress/infer:" in result.stderr and "logged in to the registry?" in result.stderr


@pytest.mark.docker
def test_push_image_dry_runs_a_real_volume_and_needs_credentials_to_push(built, client, tiny_run):
    # No network in the container: the credential chain's managed-identity probe must not leave this machine.
    # The volume's owner runs it (pytest's folders are private to it), as compose's `user:` does on a laptop.
    volume_mount = {str(tiny_run): {"bind": "/workspace", "mode": "ro"}}
    run = {"volumes": volume_mount, "network_mode": "none", "user": str(os.getuid())}
    dry = client.containers.run(built["push"], command=["push", "--dry-run"], remove=True, **run).decode()
    assert "ft-for-travel" in dry and "quantize.algorithm" in dry
    workspace = {"AZURE_SUBSCRIPTION_ID": "sub", "AZURE_RESOURCE_GROUP": "rg", "AZUREML_WORKSPACE_NAME": "ws"}
    pushing = client.containers.run(built["push"], command=["push"], environment=workspace, detach=True, **run)
    try:
        assert pushing.wait(timeout=120)["StatusCode"] == 3
        assert "az login" in pushing.logs().decode()
    finally:
        pushing.remove(force=True)
    probe = "import importlib.util as u; print([m for m in ('torch', 'transformers') if u.find_spec(m)])"
    out = client.containers.run(built["push"], entrypoint=["python", "-c", probe], remove=True).decode()
    assert out.strip() == "[]"
