"""The stages as an Azure ML pipeline job (olivepress/azureml/pipeline.py).

The job built from a tiny run is checked against the stages and the volume contract; each step's shell is run here
with a stand-in ``python`` to check the mounts, links and copies; then the real azure-ai-ml submits the job to the
local HTTPS stand-in of the control plane (tests/azureml_standin.py, as for push) and the PUT bodies are checked.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import yaml

from contract import registry
from olivepress.azureml import pipeline as ap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_azureml import REPO, Rig, running_rig  # noqa: E402

pytestmark = pytest.mark.azure

REGISTRY = "olivepressacr.azurecr.io"
TINY = {"OLIVEPRESS_FINETUNE_MAX_STEPS": "20", "OLIVEPRESS_QUANTIZE_ALGORITHM": "gptq"}
JOB = "olivepress-test-1"
STEPS = ["quantize", "finetune", "optimize", "infer"]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """The push tests' rig (test_azureml.py): the control-plane stand-in, Azurite, a throwaway CA."""
    with running_rig(tmp_path_factory, "azureml-pipeline") as started:
        yield started


def build(**kwargs: object) -> ap.PipelineJob:
    options = {"images": ap.stage_images(REGISTRY, "t1"), "compute": "cpu", "settings": TINY, "gpus": 1}
    options.update(kwargs)
    return ap.build_pipeline_job(job_name=JOB, **options)  # type: ignore[arg-type]


def root_path(stage: str) -> str:
    return f"azureml://datastores/workspaceblobstore/paths/olivepress/{JOB}/{stage}/"


def test_the_job_has_a_step_per_stage_in_its_image_chained_by_the_volume_contract() -> None:
    job = build()
    assert list(job.jobs) == STEPS and job.name == JOB and job.experiment_name == "olivepress"
    for stage, node in job.jobs.items():
        assert node.environment.image == f"{REGISTRY}/olivepress/{stage}:t1"
        assert node.compute == "cpu"
        command = node.component.command
        assert f'python -m stages.{stage} --home "$root"' in command
        # Each earlier stage's folder is an input named after it, linked into the root under that name ...
        assert sorted(node.inputs) == sorted(registry.STAGES[stage].needs)
        for need in registry.STAGES[stage].needs:
            assert f'ln -sfn "${{{{inputs.{need}}}}}" "$root/{need}"' in command
            binding = node.inputs[need]._data  # the producing step's output object
            assert binding._port_name == need and binding._owner.name == need
        # ... and the stage's own folder is its output, at <volume root of this job>/<stage>/ on the datastore.
        assert list(node.outputs) == [stage]
        assert f'cp -r "$root/{stage}/." "${{{{outputs.{stage}}}}}"/' in command
    paths = {stage: node.outputs[stage].path for stage, node in job.jobs.items() if stage != "optimize"}
    assert paths == {stage: root_path(stage) for stage in ("quantize", "finetune", "infer")}
    # The optimize folder is the registered model: a named custom_model output, in push's layout (lineage/).
    model = job._to_dict()["outputs"]["model"]
    assert (model["type"], model["name"], model["path"]) == ("custom_model", "ft-for-travel", root_path("optimize"))
    assert "lineage/finetune.json" in job.jobs["optimize"].component.command
    # Settings reach only their own stage, as environment variables (compose's .env), nothing else leaks in.
    assert job.jobs["finetune"].environment_variables == {"OLIVEPRESS_FINETUNE_MAX_STEPS": "20"}
    assert job.jobs["quantize"].environment_variables == {"OLIVEPRESS_QUANTIZE_ALGORITHM": "gptq"}
    assert job.jobs["optimize"].environment_variables == {} and job.jobs["infer"].environment_variables == {}
    assert "--processes" not in job.jobs["finetune"].component.command

    no_infer = build(images={k: v for k, v in ap.stage_images(REGISTRY).items() if k != "infer"})
    assert list(no_infer.jobs) == STEPS[:3]


def test_gpus_local_data_and_bad_settings(tmp_path: Path) -> None:
    data = tmp_path / "travel.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    job = build(gpus=4, settings={**TINY, "OLIVEPRESS_FINETUNE_DATA_FILES": str(data)})
    finetune = job.jobs["finetune"]
    assert "--processes 4" in finetune.component.command and finetune.distribution is None
    assert finetune.resources.shm_size == "16g"
    # A local file is an input of the step (uploaded at submission), passed as the option; not an env variable.
    assert (
        finetune.inputs["data_files"]._data.path == str(data) and finetune.inputs["data_files"]._data.type == "uri_file"
    )
    assert '--data-files "${{inputs.data_files}}"' in finetune.component.command
    assert "OLIVEPRESS_FINETUNE_DATA_FILES" not in finetune.environment_variables
    hub = build(settings={"OLIVEPRESS_QUANTIZE_MODEL": "microsoft/Phi-3.5-mini-instruct"})
    assert hub.jobs["quantize"].environment_variables == {
        "OLIVEPRESS_QUANTIZE_MODEL": "microsoft/Phi-3.5-mini-instruct"
    }

    with pytest.raises(click.UsageError, match="HF_TOKEN"):
        build(settings={"HF_TOKEN": "secret"})
    with pytest.raises(click.UsageError, match="finetune"):
        build(images={"quantize": "q"})


def fake_python(bin_dir: Path) -> None:
    """A ``python`` that plays ``python -m stages.<stage> --home ROOT``: it needs the stages before it under ROOT,
    as the real stages do (volume.require_stage), and publishes ROOT/<stage>/ with a manifest; FAIL=<stage> makes
    that stage fail the way a real one does (its log in ROOT/<stage>.failed.log, exit 2)."""
    needs = " ".join(f"[{s.name}]='{' '.join(s.needs)}'" for s in registry.PIPELINE)
    script = f"""#!/bin/bash
set -eu
stage=${{2#stages.}}; root=""
while [ $# -gt 0 ]; do [ "$1" = --home ] && root=$2; shift; done
declare -A needs=({needs})
for need in ${{needs[$stage]}}; do
  [ -f "$root/$need/manifest.json" ] || {{ echo "Error: no $need output under $root" >&2; exit 2; }}
done
if [ "${{FAIL:-}}" = "$stage" ]; then echo "the traceback" > "$root/$stage.failed.log"; exit 2; fi
mkdir -p "$root/$stage/model"
echo '{{"stage": "'$stage'"}}' > "$root/$stage/manifest.json"
echo "$stage" > "$root/$stage/model/weights"
"""
    path = bin_dir / "python"
    path.write_text(script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def run_step(command: str, mounts: dict[str, Path], workdir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """A step's shell as Azure ML runs it: ${{inputs.X}} / ${{outputs.X}} replaced by the mounted folders."""
    script = re.sub(r"\$\{\{(inputs|outputs)\.(\w+)\}\}", lambda m: str(mounts[m[2]]), command)
    workdir.mkdir(parents=True)
    return subprocess.run(["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True)


def test_each_step_sees_the_volume_layout_and_publishes_its_folder(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_python(bin_dir)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    job = build()
    datastore = tmp_path / "datastore"  # what the outputs upload to: one folder per stage, side by side
    for stage, node in job.jobs.items():
        mounts = {need: datastore / need for need in registry.STAGES[stage].needs} | {stage: datastore / stage}
        (datastore / stage).mkdir(parents=True)
        result = run_step(node.component.command, mounts, tmp_path / "nodes" / stage, env)
        assert result.returncode == 0, result.stderr
        assert json.loads((datastore / stage / "manifest.json").read_text()) == {"stage": stage}
        assert (datastore / stage / "model" / "weights").read_text() == f"{stage}\n"
    assert sorted(p.name for p in datastore.iterdir()) == sorted(STEPS)
    lineage = datastore / "optimize" / "lineage"
    assert json.loads((lineage / "quantize.json").read_text()) == {"stage": "quantize"}
    assert json.loads((lineage / "finetune.json").read_text()) == {"stage": "finetune"}
    assert not (datastore / "finetune" / "quantize").exists()  # the link to an input never reaches an output

    # A failed stage: its exit code, its log in the step's output, nothing copied.
    (datastore / "failed").mkdir()
    mounts = {"quantize": datastore / "quantize", "finetune": datastore / "failed"}
    failed = run_step(
        job.jobs["finetune"].component.command, mounts, tmp_path / "nodes" / "failed", env | {"FAIL": "finetune"}
    )
    assert failed.returncode == 2 and "the traceback" in failed.stderr
    assert not list((datastore / "failed").iterdir())


# --- against the stand-in, with the real SDK ------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "olivepress.azureml", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )


RUN = ("run", "--compute", "cpu", "--image-registry", REGISTRY, "--tag", "t1", "--max-steps", "20")


def test_dry_run_prints_the_job_yaml_without_credentials(rig: Rig, tmp_path: Path) -> None:
    before = len(rig.standin.state.requests)
    result = cli(
        *RUN, "--dry-run", "--job-name", JOB, "--env-file", str(tmp_path / "none.env"), env=rig.env(credentials=False)
    )
    assert result.returncode == 0, result.stderr
    spec = yaml.safe_load(result.stdout)
    assert spec["type"] == "pipeline" and spec["name"] == JOB and list(spec["jobs"]) == STEPS
    assert spec["jobs"]["finetune"]["environment_variables"] == {"OLIVEPRESS_FINETUNE_MAX_STEPS": "20"}
    assert spec["jobs"]["optimize"]["inputs"]["finetune"]["path"] == "${{parent.jobs.finetune.outputs.finetune}}"
    assert spec["outputs"]["model"]["name"] == "ft-for-travel"
    assert "experimental class" not in result.stderr and "nothing was submitted" in result.stderr
    assert len(rig.standin.state.requests) == before  # no service contacted

    # .env settings, as compose reads them; the command line's shortcut wins over them.
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# compose settings\nOLIVEPRESS_QUANTIZE_ALGORITHM=rtn\nOLIVEPRESS_FINETUNE_MAX_STEPS='5'\nHF_TOKEN=x\n"
    )
    result = cli(*RUN, "--dry-run", "--env-file", str(dotenv), env=rig.env(credentials=False))
    spec = yaml.safe_load(result.stdout)
    assert spec["jobs"]["quantize"]["environment_variables"] == {"OLIVEPRESS_QUANTIZE_ALGORITHM": "rtn"}
    assert spec["jobs"]["finetune"]["environment_variables"] == {"OLIVEPRESS_FINETUNE_MAX_STEPS": "20"}
    assert "HF_TOKEN" not in result.stdout


def test_submit_puts_environments_components_and_the_job(rig: Rig, tmp_path: Path) -> None:
    state = rig.standin.state
    env = rig.env()
    missing = cli(*RUN, "--job-name", "no-compute", env=env)
    assert missing.returncode == 2, missing.stderr  # the SDK checks the compute exists: bad input, named
    assert "jobs.finetune.compute: (ResourceNotFound) compute cpu not found" in missing.stderr
    assert not [p for p, _ in state.puts if p.startswith("/jobs/")]

    state.computes["cpu"] = {"vmSize": "STANDARD_D2_V2"}
    before = len(state.puts)
    data = REPO / "data" / "data_sample_travel.jsonl"  # a local file: uploaded by the SDK, then a step input
    result = cli(*RUN, "--job-name", JOB, "--data-files", str(data), "--env-file", str(tmp_path / "none.env"), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"submitted {JOB}" in result.stdout and f"azureml status {JOB}" in result.stdout
    puts = state.puts[before:]
    environments = [body for path, body in puts if path.startswith("/environments/")]
    components = {path: body for path, body in puts if path.startswith("/components/")}
    assert sorted(e["properties"]["image"] for e in environments) == sorted(ap.stage_images(REGISTRY, "t1").values())
    assert puts[-1][0] == f"/jobs/{JOB}"
    body = puts[-1][1]["properties"]
    assert body["jobType"] == "Pipeline" and body["experimentName"] == "olivepress"
    assert list(body["jobs"]) == STEPS
    for stage, node in body["jobs"].items():
        spec = components[node["componentId"].split("/workspaces/ws-1", 1)[1]]["properties"]["componentSpec"]
        assert f"python -m stages.{stage}" in spec["command"]
        assert spec["environment"].endswith(
            next(p for p, b in puts if b in environments and stage in b["properties"]["image"])
        )
        assert node["computeId"].endswith("/workspaces/ws-1/computes/cpu")
        assert {k: v["value"] for k, v in node.get("inputs", {}).items() if "value" in v} == {
            need: f"${{{{parent.jobs.{need}.outputs.{need}}}}}" for need in registry.STAGES[stage].needs
        }
    assert body["jobs"]["finetune"]["environment_variables"] == {"OLIVEPRESS_FINETUNE_MAX_STEPS": "20"}
    uploaded = body["jobs"]["finetune"]["inputs"]["data_files"]
    assert uploaded["job_input_type"] == "uri_file"
    assert re.fullmatch(
        r"azureml://datastores/workspaceblobstore/paths/(LocalUpload/\w+/data_sample_travel\.jsonl)", uploaded["uri"]
    )
    blob = uploaded["uri"].split("/paths/", 1)[1]
    assert rig.container.download_blob(blob).readall() == data.read_bytes()  # type: ignore[attr-defined]
    assert body["jobs"]["quantize"]["inputs"]["calibration_data"]["uri"] == uploaded["uri"]  # the same upload
    assert body["jobs"]["quantize"]["outputs"]["quantize"]["uri"] == root_path("quantize")
    assert body["jobs"]["optimize"]["outputs"]["optimize"]["value"] == "${{parent.outputs.model}}"
    model = body["outputs"]["model"]
    assert (model["jobOutputType"], model["assetName"], model["uri"]) == (
        "custom_model",
        "ft-for-travel",
        root_path("optimize"),
    )

    # azureml status: each step's state, and the exit code of the end state.
    rig.standin.set_job_status(JOB, "Running", {"quantize": "Completed", "finetune": "Running"})
    running = cli("status", JOB, "--once", env=env)
    assert running.returncode == 0, running.stderr
    lines = dict(line.split(None, 1) for line in running.stdout.splitlines())
    assert lines == {
        "quantize": "Completed", "finetune": "Running", "optimize": "NotStarted", "infer": "NotStarted",
        "pipeline": "Running",
    }  # fmt: skip
    rig.standin.set_job_status(JOB, "Failed", {"quantize": "Completed", "finetune": "Failed"})
    failed = cli("status", JOB, env=env)
    assert failed.returncode == 1 and "Failed" in failed.stdout


def test_submit_without_credentials_exits_3(rig: Rig) -> None:
    before = len(rig.standin.state.requests)
    result = cli(*RUN, env=rig.env(credentials=False))
    assert result.returncode == 3 and "az login" in result.stderr, result.stderr
    assert len(rig.standin.state.requests) == before


def test_olivepress_azureml_run_and_status_reach_the_pipeline_commands() -> None:
    """The launcher's wiring: `olivepress azureml run ...` / `olivepress azureml status JOB`."""
    from click.testing import CliRunner

    from olivepress.cli import main as launcher

    runner = CliRunner()
    args = [
        "--compute",
        "cpu",
        "--image-registry",
        REGISTRY,
        "--dry-run",
        "--job-name",
        JOB,
        "--env-file",
        "/nonexistent",
    ]
    dry = runner.invoke(launcher, ["azureml", "run", *args])
    assert dry.exit_code == 0, dry.output
    assert yaml.safe_load(dry.stdout)["name"] == JOB
    group_help = runner.invoke(launcher, ["azureml", "--help"]).output
    assert all(f"  {verb} " in group_help for verb in ("push", "pull", "run", "status")), group_help
    assert "--on" not in runner.invoke(launcher, ["run", "--help"]).output
    assert "--image-registry" in runner.invoke(launcher, ["azureml", "run", "--help"]).output
    missing = runner.invoke(launcher, ["azureml", "status"])
    assert missing.exit_code == 2 and "Missing argument 'JOB'" in missing.output
