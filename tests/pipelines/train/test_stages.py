"""Teacher and distill stages on a real local Ray cluster: 2 CPU workers, the tiny preset, 64² crops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipelines.tracking import client
from pipelines.train.checkpoint import load_checkpoint, load_teacher
from tests.helpers import photo_workdir
from tests.helpers import stage_config as small

pytestmark = pytest.mark.timeout(660)  # 212 s measured on a slow 2-core machine


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return photo_workdir(tmp_path_factory, "train")


def history(root: Path, run_id: str, key: str) -> list[float]:
    c = client(f"sqlite:///{root / 'mlflow.db'}")
    return [m.value for m in sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def teacher_run(workdir, ray_cluster):
    from pipelines.train.driver import run_stage

    cfg = small(
        "teacher",
        workdir,
        total_images=768,
        checkpoint_every_images=384,
        **{"optim.lr": "1e-3", "optim.warmup_images": "64"},
    )
    return run_stage(cfg)


def test_teacher_loss_falls_and_the_run_ends_at_the_target(teacher_run, workdir):
    assert teacher_run["images_seen"] == 768
    losses = history(workdir, teacher_run["run_id"], "train/loss")
    assert len(losses) == 768 // 64
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    ckpt = load_checkpoint(teacher_run["checkpoint"])
    assert ckpt["state"]["images_seen"] == 768 and ckpt["state"]["ema_updates"] == 768 // 16


@pytest.mark.slow  # online targets, 158 s: the fast tier's pipeline test runs a cached distillation
def test_distillation_from_that_teacher_lowers_its_loss(teacher_run, workdir):
    from pipelines.train.driver import run_stage

    cfg = small(
        "distill",
        workdir,
        total_images=320,
        checkpoint_every_images=320,
        **{"optim.lr": "5e-4", "optim.warmup_images": "32"},
    )
    result = run_stage(cfg)
    assert result["images_seen"] == 320
    totals = history(workdir, result["run_id"], "train/total")
    assert sum(totals[-2:]) / 2 < sum(totals[:2]) / 2, totals
    for term in ("train/distil", "train/align", "train/bound"):
        assert len(history(workdir, result["run_id"], term)) == 320 // 64
    student_start = load_teacher(str(workdir / "ray" / "quickstart-teacher"))[1]
    student_end = load_checkpoint(result["checkpoint"])["model"]
    assert any(not torch.equal(student_start[k], student_end[k]) for k in student_start)


def test_mlflow_holds_one_run_per_stage_with_params_metrics_tags_and_images(teacher_run, workdir):
    c = client(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = c.get_experiment_by_name("oftsr")
    runs = c.search_runs([exp.experiment_id], filter_string="tags.`oftsr.stage` = 'teacher'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["method.preset"] == "tiny" and run.data.params["optim.lr"] == "0.001"
    assert run.data.params["data.crop"] == "64" and run.data.params["workers"] == "2"
    assert {"train/loss", "train/lr", "train/images_per_s", "train/grad_norm"} <= set(run.data.metrics)
    # the start-up, from the stage's call to its first step: after the workers and before the end of the stage
    startup = run.data.metrics["stage/startup_s"]
    assert 0 < startup < run.data.metrics["stage/seconds"] and startup == pytest.approx(teacher_run["startup_s"])
    assert len(run.data.tags["oftsr.git_commit"]) >= 7 and len(run.data.tags["oftsr.data_manifest_hash"]) == 16
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id, "samples")}
    assert artifacts == {"samples/checkpoint_000000000384.png", "samples/checkpoint_000000000768.png"}


@pytest.mark.slow
def test_killing_the_driver_and_running_again_resumes(workdir, ray_cluster):
    """SIGKILL: the driver gets no chance to clean up (the harder case of a Ctrl-C, which it survives the same)."""
    import ray

    name = "driver-killed"
    storage = workdir / "ray" / name
    args = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "teacher",
        "quickstart",
        "--set",
        f"data.source={workdir / 'photos'}",
        "--set",
        f"storage_path={workdir / 'ray'}",
        "--set",
        f"run_name={name}",
        "--set",
        f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
        "--set",
        "total_images=256",
        "--set",
        "checkpoint_every_images=64",
        "--set",
        "sample_grid=0",
        "--set",
        "data.crops_per_image=4",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list(storage.glob("checkpoint_*/checksums.json")):
        time.sleep(1)
    proc.send_signal(signal.SIGKILL)  # the driver's machine going away
    proc.wait(timeout=60)
    first = sorted(p.parent.name for p in storage.glob("checkpoint_*/checksums.json"))
    assert first and first[-1] < "checkpoint_000000000256", first

    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["images_seen"] == 256
    assert "(resumed)" in out.stdout
    names = sorted(p.parent.name for p in storage.glob("checkpoint_*/checksums.json"))
    assert names[-1] == "checkpoint_000000000256"
    state = load_checkpoint(storage / names[-1])["state"]
    assert state["ema_updates"] == 256 // 16  # resumed, not restarted: every image counted once
