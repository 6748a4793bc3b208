"""Planted fake credentials must appear in no output of a run: printed output and errors, MLflow params, tags
and artifacts, the checkpoints and Ray Train files in storage, and the Ray cluster's own logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.pipelines.data.images import photos

pytestmark = pytest.mark.timeout(420)
BUCKET = "oftsr-secrets"
PLANTED_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIAPLANTEDFAKE00001",
    "AWS_SECRET_ACCESS_KEY": "planted+Secret/AccessKey0000000000000FAKE",
    "AWS_SESSION_TOKEN": "PlantedSessionToken000000000000000000FAKE",
}
OPTION_KEY, OPTION_SECRET = "AKIAPLANTEDOPTION0002", "planted-option-secret-000000000FAKE"
PLANTED = [*PLANTED_ENV.values(), OPTION_KEY, OPTION_SECRET]


def leaks(text: str) -> list[str]:
    return [p for p in PLANTED if p in text]


def scan_tree(root: Path) -> dict[str, list[str]]:
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                hits = leaks(path.read_bytes().decode("utf-8", "replace"))
            except OSError:
                continue
            if hits:
                found[str(path)] = hits
    return found


@pytest.fixture(scope="module")
def secret_run(s3_client, s3_endpoint):
    s3_client.create_bucket(Bucket=BUCKET)
    for key, data in photos().items():
        s3_client.put_object(Bucket=BUCKET, Key=f"photos/{key}", Body=data)
    work = Path(tempfile.mkdtemp(prefix="sec"))
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {
        **os.environ,
        **PLANTED_ENV,
        "RAY_ADDRESS": "local",  # a new cluster that inherits the planted credentials, logging under ray_tmp
        "RAY_TMPDIR": str(ray_tmp),
        "OFTSR_SPOOL_DIR": str(work / "spool"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'm.db'}",
    }
    options = json.dumps({"endpoint_url": s3_endpoint, "key": OPTION_KEY, "secret": OPTION_SECRET})
    sets = [
        f"data.source=s3://{BUCKET}/photos",
        f"data.storage_options={options}",
        "data.crops_per_image=2",
        f"storage_path=s3://{BUCKET}/runs",
        f"tracking.tracking_uri=sqlite:///{work / 'm.db'}",
        "run_name=secrets",
        "total_images=64",
        "checkpoint_every_images=64",
        "log_every_images=32",
        "sample_grid=1",
    ]
    set_args = [a for s in sets for a in ("--set", s)]

    def oftsr(*args: str, timeout: int = 360) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pipelines.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
        )

    outputs = {
        "teacher": oftsr("teacher", "quickstart", *set_args),
        "dry-run": oftsr("teacher", "quickstart", "--dry-run", *set_args),
        "failing manifest": oftsr(
            "manifest",
            f"s3://{BUCKET}-missing/x",
            "-o",
            str(work / "m.parquet"),
            "--storage-option",
            f"endpoint_url={s3_endpoint}",
            "--storage-option",
            f"secret={OPTION_SECRET}",
            "--storage-option",
            f"key={OPTION_KEY}",
        ),
        "submit": oftsr(
            "submit",
            "teacher",
            "quickstart",
            "--address",
            "http://127.0.0.1:9",
            "--set",
            f"data.storage_options={options}",
        ),
    }
    yield {"work": work, "ray_tmp": ray_tmp, "outputs": outputs}
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_the_run_itself_works_with_its_checkpoints_on_s3(secret_run, s3_endpoint):
    """The run's checkpoints go to ``s3://`` (the stage's storage), and a teacher loads back from there."""
    from pipelines.train.checkpoint import load_teacher

    proc = secret_run["outputs"]["teacher"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["images_seen"] == 64
    assert result["checkpoint"] == f"s3://{BUCKET}/runs/secrets/checkpoint_000000000064"
    options = {"endpoint_url": s3_endpoint, "key": OPTION_KEY, "secret": OPTION_SECRET}
    unet, weights = load_teacher(f"s3://{BUCKET}/runs/secrets", options)
    assert unet.model_channels == 32 and "out.2.weight" in weights


def test_printed_output_and_errors_hold_no_credential(secret_run):
    outs = secret_run["outputs"]
    for name, proc in outs.items():
        assert not leaks(proc.stdout + proc.stderr), (name, leaks(proc.stdout + proc.stderr))
    assert '"data.storage_options"' in outs["dry-run"].stdout and "***" in outs["dry-run"].stdout
    assert outs["failing manifest"].returncode == 2 and f"s3://{BUCKET}-missing/x" in outs["failing manifest"].stderr
    assert outs["submit"].returncode == 2 and "credentials are not sent" in outs["submit"].stderr


def test_mlflow_params_tags_metrics_and_artifacts_hold_no_credential(secret_run):
    from pipelines.tracking import client

    work = secret_run["work"]
    c = client(f"sqlite:///{work / 'm.db'}")
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert runs
    for run in runs:
        text = json.dumps({"params": run.data.params, "tags": run.data.tags, "metrics": list(run.data.metrics)})
        assert not leaks(text), leaks(text)
        assert "***" in run.data.params["data.storage_options"]
    assert not scan_tree(work), scan_tree(work)  # the SQLite store, artifacts, spool files


def test_storage_and_ray_logs_hold_no_credential(secret_run, s3_client):
    objects = s3_client.list_objects_v2(Bucket=BUCKET, Prefix="runs/")["Contents"]
    assert any(o["Key"].endswith("checksums.json") for o in objects)
    for obj in objects:
        body = s3_client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read().decode("utf-8", "replace")
        assert not leaks(body), (obj["Key"], leaks(body))
    logs = list(secret_run["ray_tmp"].rglob("*.log"))
    assert logs  # the cluster did log under RAY_TMPDIR
    assert not scan_tree(secret_run["ray_tmp"]), scan_tree(secret_run["ray_tmp"])
