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


KUBERAY = ROOT / "cluster" / "kuberay"
JOBS = ["pipeline", "teacher", "distill"]


def test_launcher_yaml_validates_against_the_schema_shipped_with_ray():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    jsonschema.validate(config, schema)
    head, gpu = config["available_node_types"]["head"], config["available_node_types"]["gpu_8xh100"]
    assert gpu["node_config"]["InstanceType"] == "p5.48xlarge" and gpu["max_workers"] >= 1
    # the head keeps Ray's own role (the autoscaler's EC2 rights); the workers get S3 through an instance profile
    assert "IamInstanceProfile" not in head["node_config"] and "IamInstanceProfile" in gpu["node_config"]
    # every node runs the image; no set-up command may hide its failure
    assert config["docker"]["image"] and not config.get("file_mounts")
    commands = [
        *config["setup_commands"],
        *gpu.get("initialization_commands", []),
        *gpu.get("worker_setup_commands", []),
    ]
    assert commands and not any("|| true" in c or "; true" in c for c in commands)
    assert any("nvidia-smi" in c for c in gpu["initialization_commands"])
    assert any("device_count" in c for c in gpu["worker_setup_commands"])


# The fields of the KubeRay v1 CRDs (KubeRay 1.6 API reference) that a manifest here may use, by object.
KUBERAY_FIELDS = {
    "RayCluster": {"apiVersion", "kind", "metadata", "spec"},
    "RayJob": {"apiVersion", "kind", "metadata", "spec"},
    "RayClusterSpec": {
        "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
        "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs", "authOptions",
    },
    "AuthOptions": {"mode", "secretName", "enableK8sTokenAuth"},
    "HeadGroupSpec": {"template", "headService", "enableIngress", "rayStartParams", "serviceType"},
    "WorkerGroupSpec": {
        "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams",
        "template", "scaleStrategy", "numOfHosts",
    },
    "RayJobSpec": {
        "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
        "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML", "jobId",
        "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
        "shutdownAfterJobFinishes", "suspend", "schedule",
    },
}  # fmt: skip


def _kustomize(folder: Path) -> list[dict]:
    """The manifests as `kubectl apply -k` sends them (kubectl's built-in kustomize, offline)."""
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _image_component() -> str:
    images = yaml.safe_load((KUBERAY / "image" / "kustomization.yaml").read_text())["images"]
    assert [i["name"] for i in images] == ["oftsr"]
    return f"{images[0]['newName']}:{images[0]['newTag']}"


def _check_cluster_spec(spec: dict, image: str) -> None:
    def only(obj: dict, kind: str) -> None:
        extra = set(obj) - KUBERAY_FIELDS[kind]
        assert not extra, f"{kind} has fields that the KubeRay v1 CRDs do not: {sorted(extra)}"

    only(spec, "RayClusterSpec")
    assert spec["rayVersion"] == _pinned_ray()
    only(spec["authOptions"], "AuthOptions")
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    only(spec["headGroupSpec"], "HeadGroupSpec")
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # drivers only on the head
    pods = [spec["headGroupSpec"]["template"]["spec"]]
    for group in spec["workerGroupSpecs"]:
        only(group, "WorkerGroupSpec")
        assert group["groupName"] and group["maxReplicas"] >= group.get("minReplicas", 0)
        assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
        pods.append(group["template"]["spec"])
    for pod in pods:
        assert pod["serviceAccountName"] == "oftsr"  # S3 through a cloud role bound to it, or ...
        for container in pod["containers"]:
            assert container["image"] == image
            # ... the optional secret; never a key written in the manifest
            assert {"secretRef": {"name": "oftsr-s3", "optional": True}} in container["envFrom"]
            env = {e["name"]: e for e in container.get("env", [])}
            assert not any(k.startswith("AWS_") for k in env)
            assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"


def test_the_raycluster_renders_with_the_image_token_auth_and_credentials_from_the_namespace():
    (doc,) = _kustomize(KUBERAY / "raycluster")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert set(doc) <= KUBERAY_FIELDS["RayCluster"]
    _check_cluster_spec(doc["spec"], _image_component())


@pytest.mark.parametrize("job", JOBS)
def test_each_rayjob_runs_its_driver_on_the_head_and_can_be_rerun(job):
    (doc,) = _kustomize(KUBERAY / "jobs" / job)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    assert set(doc) <= KUBERAY_FIELDS["RayJob"]
    spec = doc["spec"]
    extra = set(spec) - KUBERAY_FIELDS["RayJobSpec"]
    assert not extra, f"RayJobSpec has fields that the KubeRay v1 CRDs do not: {sorted(extra)}"
    # reserving anything would let Ray place the driver on a GPU worker, whose loss kills the driver
    assert not {"entrypointNumCpus", "entrypointNumGpus", "entrypointResources"} & set(spec)
    assert spec["entrypoint"].startswith("oftsr ") and spec["backoffLimit"] >= 1
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert "working_dir" not in yaml.safe_load(spec["runtimeEnvYAML"])  # the image's code
    _check_cluster_spec(spec["rayClusterSpec"], _image_component())


def test_the_shared_manifests_give_an_mlflow_server_at_the_uri_the_pods_use():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _kustomize(KUBERAY / "shared")}
    service, deployment = docs["Service", "mlflow"], docs["Deployment", "mlflow"]
    assert ("ServiceAccount", "oftsr") in docs and ("PersistentVolumeClaim", "mlflow-db") in docs
    assert service["spec"]["ports"][0]["port"] == 5000
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == _image_component() and pod["serviceAccountName"] == "oftsr"
    assert deployment["spec"]["template"]["metadata"]["labels"].items() >= service["spec"]["selector"].items()
    args = container["command"]
    assert args[:2] == ["mlflow", "server"] and "--port=5000" in args
    hosts = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert "mlflow:5000" in hosts  # the Host header of http://mlflow:5000, or MLflow refuses the requests
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"


def test_the_launcher_and_kuberay_name_the_same_image():
    config = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    assert config["docker"]["image"] == _image_component()


def _pinned_ray() -> str:
    from tests.test_pins import pins

    return pins()["ray"]


@pytest.mark.parametrize("job", JOBS)
def test_each_job_entrypoint_resolves_and_its_dry_run_shows_mlflow_and_s3(job):
    """The shipped command lines must pass the CLI's own checks (a refused override would fail the job on start),
    and ``oftsr submit --dry-run`` of the same command shows the MLflow server and the S3 storage it will use."""
    import shlex

    entrypoint = yaml.safe_load((KUBERAY / "jobs" / job / "rayjob.yaml").read_text())["spec"]["entrypoint"]
    argv = shlex.split(entrypoint)[1:]
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *argv, "--dry-run"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "s3://my-bucket/ffhq256" in out.stdout and "http://mlflow:5000" in out.stdout
    submit_argv = ["submit", *(argv[1:] if argv[0] == "run" else argv)]  # `oftsr submit RECIPE | STAGE RECIPE`
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *submit_argv, "--address", "http://10.0.0.1:8265", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines())
    assert lines["MLflow"].strip() == "http://mlflow:5000"
    assert lines["driver"].strip().startswith("the head node")
    stages = [k for k in lines if k.endswith(" storage")]
    assert stages and all(lines[k].strip().startswith("s3://") and "<-" not in lines[k] for k in stages)
    assert "not contacted" in lines["job server"]


def test_a_dry_run_flags_local_storage_and_a_local_mlflow_store():
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "submit", "teacher", "quickstart", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MLFLOW_TRACKING_URI": ""},
    )
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines())
    assert "local to the driver" in lines["MLflow"] and "local path" in lines["teacher storage"]


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
