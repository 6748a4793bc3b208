"""Cluster configs, job submission to a real local Ray cluster (``ray start --head``), MLflow over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port
from tests.helpers import start_mlflow_server

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
pytestmark = pytest.mark.timeout(600)


def test_launcher_yaml_validates_against_the_schema_shipped_with_ray():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    jsonschema.validate(config, schema)
    gpu = config["available_node_types"]["gpu_8xh100"]
    assert gpu["node_config"]["InstanceType"] == "p5.48xlarge" and gpu["max_workers"] >= 1
    assert any("pip install" in c and "oftsr" in c for c in config["setup_commands"])


def _containers(spec):
    yield from spec["headGroupSpec"]["template"]["spec"]["containers"]
    for group in spec["workerGroupSpecs"]:
        yield from group["template"]["spec"]["containers"]


@pytest.mark.parametrize(
    "name", ["raycluster.yaml", "rayjob-pipeline.yaml", "rayjob-teacher.yaml", "rayjob-distill.yaml"]
)
def test_kuberay_manifests_carry_the_required_fields(name):
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    if doc["kind"] == "RayJob":
        spec = doc["spec"]
        assert spec["entrypoint"].startswith("oftsr ")
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert "working_dir" in yaml.safe_load(spec["runtimeEnvYAML"])
        cluster = spec["rayClusterSpec"]
    else:
        assert doc["kind"] == "RayCluster"
        cluster = doc["spec"]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and "maxReplicas" in group
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "8"
    for container in _containers(cluster):
        assert container["image"]
        env = {e["name"]: e for e in container.get("env", [])}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "secretKeyRef" in env[key]["valueFrom"] and "value" not in env[key]


@pytest.mark.parametrize("name", ["rayjob-pipeline.yaml", "rayjob-teacher.yaml", "rayjob-distill.yaml"])
def test_each_job_entrypoint_resolves_through_the_recipe_tree(name):
    """The shipped command lines must pass the CLI's own checks (a refused override would fail the job on start)."""
    import shlex

    entrypoint = yaml.safe_load((ROOT / "cluster" / "kuberay" / name).read_text())["spec"]["entrypoint"]
    argv = [*shlex.split(entrypoint)[1:], "--dry-run"]
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "s3://my-bucket/ffhq256" in out.stdout and "mlflow.mlflow.svc.cluster.local" in out.stdout


def test_a_local_storage_path_on_a_multi_node_cluster_is_refused():
    script = """
import ray
from ray.cluster_utils import Cluster
from pipelines.preflight import preflight
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address)
for args in (("/tmp/local", "http://127.0.0.1:9"), ("s3://b/p", "sqlite:////tmp/m.db")):
    try:
        preflight(*args)
        print("accepted", args)
    except ValueError as err:
        print("refused:", err)
ray.shutdown(); cluster.shutdown()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert "refused: storage_path /tmp/local is a local path, but the Ray cluster has 2 nodes" in out.stdout, out.stderr
    assert "refused: tracking.tracking_uri sqlite:////tmp/m.db is local to this machine" in out.stdout


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """A Ray head with its job server and an MLflow tracking server, both on 127.0.0.1."""
    from oftsr.samples import export_sample_photos

    root = tmp_path_factory.mktemp("cluster")
    export_sample_photos(root / "photos")
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, mlflow_port = free_port(), free_port(), free_port()
    # --block: the head lives as this child process, so stopping it never touches other Ray instances
    head = subprocess.Popen(
        [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=4",
            "--include-dashboard=true",
            "--disable-usage-stats",
            # every other port free too: the session's in-process cluster may hold Ray's default ports
            *(
                f"--{name}={free_port()}"
                for name in (
                    "dashboard-agent-listen-port",
                    "dashboard-agent-grpc-port",
                    "runtime-env-agent-port",
                    "metrics-export-port",
                    "node-manager-port",
                    "object-manager-port",
                    "ray-client-server-port",
                )
            ),
        ],
        env=env,
        stdout=open(root / "head.log", "w"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = start_mlflow_server(root, mlflow_port, env)
    address, tracking = f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{mlflow_port}"
    deadline = time.time() + 300
    from pipelines.tracking import check_reachable

    while True:
        try:
            check_reachable(tracking)
            from pipelines.submit import client as job_client

            job_client(address).list_jobs()
            break
        except Exception:
            if time.time() > deadline or head.poll() is not None:
                for proc in (server, head):
                    os.killpg(proc.pid, signal.SIGKILL)
                logs = {n: (root / n).read_text()[-1500:] for n in ("head.log", "mlflow.log")}
                raise RuntimeError(f"services did not come up: {logs}") from None
            time.sleep(1)
    try:
        yield {"root": root, "address": address, "tracking": tracking, "env": env}
    finally:
        # the head's graceful stop takes about 30 s; its processes share its process group, so SIGKILL ends them all
        os.killpg(head.pid, signal.SIGKILL)
        os.killpg(server.pid, signal.SIGTERM)
        for proc in (server, head):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        from pipelines.raycluster import forget_stale_cluster

        forget_stale_cluster()  # the head was killed, not `ray stop`ped: its record would outlive it


def submit(services, *sets, wait=True):
    cmd = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "submit",
        "teacher",
        "quickstart",
        "--address",
        services["address"],
        "--set",
        f"tracking.tracking_uri={services['tracking']}",
        "--set",
        "total_images=128",
        "--set",
        "checkpoint_every_images=64",
        "--set",
        "log_every_images=64",
        "--set",
        "sample_grid=1",
        "--set",
        f"storage_path={services['root'] / 'ray'}",
    ]
    for s in sets:
        cmd += ["--set", s]
    if wait:
        cmd += ["--wait", "--quiet"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=services["env"])


def test_a_submitted_stage_succeeds_and_its_run_is_on_the_mlflow_server(services):
    from pipelines.tracking import client

    out = submit(services, f"data.source={services['root'] / 'photos'}", "run_name=submitted")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    job_id = out.stdout.strip().splitlines()[0]
    assert "SUCCEEDED" in out.stderr
    status = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "jobs", "status", job_id, "--address", services["address"]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0 and status.stdout.strip() == "SUCCEEDED"
    logs = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "jobs", "logs", job_id, "--address", services["address"]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "teacher: done at 128 images" in logs.stdout
    c = client(services["tracking"])
    runs = c.search_runs(
        [c.get_experiment_by_name("oftsr").experiment_id], filter_string="tags.`oftsr.stage` = 'teacher'"
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and "train/loss" in runs[0].data.metrics


def test_a_failing_job_reports_failed_and_a_nonzero_exit(services):
    out = submit(services, f"data.source={services['root'] / 'no-such-folder'}", "run_name=failing")
    assert out.returncode == 1 and "FAILED" in out.stderr
