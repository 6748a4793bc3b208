"""``oftsr run quickstart`` end to end (smaller settings), the registry, and ``oftsr upscale`` from it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, ray_cluster):
    import ray

    root = tmp_path_factory.mktemp("pipeline")
    sets = {
        "out": root / "out",
        "tracking.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "teacher.storage_path": root / "ray",
        "distill.storage_path": root / "ray",
        "teacher.total_images": 256,  # the plumbing is under test here; training quality is in tests/pipelines/train
        "teacher.checkpoint_every_images": 128,
        "distill.total_images": 128,
        "distill.checkpoint_every_images": 128,
        "evaluate.crops_per_image": 2,
        "evaluate.knobs": "[0.0, 0.5, 1.0]",
        "evaluate.teacher_method": "midpoint",
        "evaluate.teacher_steps": 4,
    }
    args = [sys.executable, "-m", "pipelines.cli", "run", "quickstart"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    first = subprocess.run(args, env=env, capture_output=True, text=True, timeout=800, cwd=root)
    assert first.returncode == 0, first.stderr[-3000:]
    return root, args, env, first


def test_parent_and_stage_runs_exist_and_both_models_have_aliases(pipeline_run):
    from pipelines.tracking import client

    root, *_ = pipeline_run
    c = client(f"sqlite:///{root / 'mlflow.db'}")
    exp = c.get_experiment_by_name("oftsr")
    parents = c.search_runs([exp.experiment_id], filter_string="tags.`oftsr.stage` = 'pipeline'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    children = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.data.tags["oftsr.stage"] for r in children) == ["distill", "teacher"]
    assert "eval/student_t0.0/psnr" in parents[0].data.metrics
    artifacts = {a.path for a in c.list_artifacts(parent, "evaluation")}
    assert {"evaluation/curve.png", "evaluation/evaluation.md", "evaluation/evaluation.json"} <= artifacts
    for name in ("oftsr-teacher", "oftsr-student"):
        version = c.get_model_version_by_alias(name, "champion")
        assert c.get_model_version_by_alias(name, "candidate").version == version.version
        assert version.tags["oftsr.sigma_p"] == "0.2" and version.tags["oftsr.degradation"] == "bicubic"


def test_the_console_shows_each_stage_with_a_progress_line_and_no_library_logs(pipeline_run):
    *_, first = pipeline_run
    console = first.stdout + first.stderr
    for stage, total in (("teacher", 256), ("distill", 128)):
        assert re.search(rf"^{stage} +{total}/{total} images \(100%\) .* ETA 0:00$", console, re.M), console[-3000:]
    assert "| student | 1.0 |" in first.stdout  # the final table
    for noise in ("RayTrainWorker", "Warning", "INFO", "WARNING", "Token authentication"):
        assert noise not in console, noise


def test_the_curve_table_and_strip_are_written(pipeline_run):
    root, *_ = pipeline_run
    report = json.loads((root / "out" / "evaluation" / "evaluation.json").read_text())
    methods = sorted({(r["method"], r["t"]) for r in report["rows"]}, key=str)
    assert ("bicubic", None) in methods and ("teacher", None) in methods and ("student", 1.0) in methods
    assert all(np.isfinite(r["psnr"]) and r["st_lpips"] >= 0 for r in report["rows"])
    with Image.open(root / "out" / "evaluation" / "curve.png") as im:
        assert im.size[0] > 300
    with Image.open(root / "out" / "evaluation" / "strip.png") as im:
        assert im.size == (4 * 64, 4 * 64)


def test_rerunning_from_another_folder_reuses_the_runs_and_registers_nothing_twice(pipeline_run, tmp_path):
    """A retried cluster job starts in a new working directory: it must find the same parent run and models."""
    from pipelines.tracking import client

    root, args, env, _ = pipeline_run
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher: reusing the finished checkpoint" in again.stdout
    assert "distill: reusing the finished checkpoint" in again.stdout
    c = client(f"sqlite:///{root / 'mlflow.db'}")
    exp = c.get_experiment_by_name("oftsr")
    parents = c.search_runs([exp.experiment_id], filter_string="tags.`oftsr.stage` = 'pipeline'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    for name in ("oftsr-teacher", "oftsr-student"):
        assert len(c.search_model_versions(f"name = '{name}'")) == 1


def test_upscale_from_the_registry_writes_4x_images_and_refuses_to_overwrite(pipeline_run, tmp_path):
    root, *_ = pipeline_run
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (23, 37, 3), dtype=np.uint8)).save(src / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 16, 3), dtype=np.uint8)).save(src / "b.jpg")
    cmd = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "upscale",
        str(src),
        "-o",
        str(tmp_path / "out"),
        "--t",
        "0",
        "1",
        "--model",
        "models:/oftsr-student@champion",
        "--tracking-uri",
        f"sqlite:///{root / 'mlflow.db'}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with Image.open(tmp_path / "out" / "a_x4_t0.00.png") as im:
        assert im.size == (37 * 4, 23 * 4)
    with Image.open(tmp_path / "out" / "b_x4_t1.00.png") as im:
        assert im.size == (16 * 4, 20 * 4)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
    bad = subprocess.run([*cmd[:-4], "--t", "1.5"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "knob t" in bad.stderr
    missing = subprocess.run(
        [*cmd[:7], "--model", "models:/nope@champion", "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--force"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2 and "models:/nope@champion" in missing.stderr
