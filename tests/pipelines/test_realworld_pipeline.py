"""``oftsr run realworld_quickstart`` end to end on the sample photos, at a fraction of its budget: the Real-ESRGAN
chain feeds the teacher in the training workers (``data.degrade_on=worker``; the Ray Data path is the default and
is tested in tests/pipelines/data/test_realworld.py and by the trajectory stage, which degrades in its actors and
stores each LR), a cached distillation, the evaluation on real-world-degraded held-out crops, the registry, and
``oftsr upscale`` of a real low-resolution photo (no HR) with the registered real-world student."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests.helpers import quickstart_command

pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def realworld_run(tmp_path_factory, ray_cluster):
    import ray

    root = tmp_path_factory.mktemp("realworld")
    args = quickstart_command(
        root,
        "realworld_quickstart",
        data__degrade_on="worker",
        teacher__total_images=64,
        teacher__checkpoint_every_images=64,
        distill__total_images=64,
        distill__checkpoint_every_images=64,
        trajectories__crops_per_image=2,
        evaluate__crops_per_image=2,
    )
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1400, cwd=root)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return root, done


def test_every_stage_ran_on_the_chain_and_recorded_its_settings(realworld_run):
    from pipelines.cache.store import read_manifest
    from pipelines.recipes import pipeline
    from pipelines.tracking import client

    root, _ = realworld_run
    c = client(f"sqlite:///{root / 'mlflow.db'}")
    exp = c.get_experiment_by_name("oftsr")
    runs = {r.data.tags.get("oftsr.stage"): r for r in c.search_runs([exp.experiment_id])}
    assert {"pipeline", "teacher", "trajectories", "distill"} <= set(runs)
    params = runs["pipeline"].data.params
    assert params["method.degradation"] == "realesrgan" and params["data.degrade_on"] == "worker"
    assert params["data.realesrgan.second_order_prob"] == "0.5" and params["data.realesrgan.gt_size"] == "64"
    caches = list((root / "cache" / "trajectories").iterdir())
    manifest = read_manifest(str(caches[0]))
    assert manifest["lr_shape"] == [3, 16, 16] and manifest["key"]["degradation"]["kind"] == "realesrgan"
    for name in ("oftsr-realworld-teacher", "oftsr-realworld-student"):
        version = c.get_model_version_by_alias(name, "champion")
        assert version.tags["oftsr.degradation"] == "realesrgan"
        chain = json.loads(version.tags["oftsr.realesrgan"])  # the settings it was trained on, as the recipe set them
        assert chain == json.loads(json.dumps(pipeline("realworld_quickstart").data.realesrgan.to_dict()))
        assert chain["second_order_prob"] == 0.5 and chain["crop_pad_size"] == 76


def test_the_evaluation_degrades_held_out_crops_with_the_chain(realworld_run):
    """The report's bicubic row is the chain's condition of the held-out crops (recomputed here), not a clean
    bicubic down-sampling of them."""
    import dataclasses

    from oftsr.evaluation import held_out_condition
    from oftsr.metrics import psnr
    from pipelines.pipeline import held_out_crops
    from pipelines.recipes import pipeline

    root, _ = realworld_run
    report = json.loads((root / "out" / "evaluation" / "evaluation.json").read_text())
    assert report["settings"]["method"]["degradation"] == "realesrgan"
    assert report["settings"]["realesrgan"]["second_order_prob"] == 0.5
    cfg = dataclasses.replace(pipeline("realworld_quickstart").evaluate, crops_per_image=2)
    cfg = dataclasses.replace(cfg, source=str(root / cfg.source))
    hr, _ = held_out_crops(cfg)
    assert report["n"] == hr.shape[0] >= 4
    settings = dataclasses.replace(cfg, batch=report["settings"]["batch"])
    chain = [psnr(held_out_condition(hr[i : i + 8], settings, i)[1], hr[i : i + 8]) for i in range(0, len(hr), 8)]
    clean = dataclasses.replace(settings, method=dataclasses.replace(settings.method, degradation="bicubic"))
    plain = [psnr(held_out_condition(hr[i : i + 8], clean, i)[1], hr[i : i + 8]) for i in range(0, len(hr), 8)]
    bicubic = next(r for r in report["rows"] if r["method"] == "bicubic")
    assert abs(float(torch.cat(chain).mean()) - bicubic["psnr"]) < 1e-3
    assert float(torch.cat(plain).mean()) > bicubic["psnr"] + 0.5  # the chain's inputs are worse
    assert {r["t"] for r in report["rows"] if r["method"] == "student"} >= {0.0, 1.0}


def test_a_real_low_resolution_photo_is_upscaled_by_the_registered_real_world_student(realworld_run, tmp_path):
    from oftsr.samples import available_photos

    root, _ = realworld_run
    _, path = available_photos()[1]
    with Image.open(path) as im:  # a small, JPEG-compressed photo: a real low-resolution input, no HR
        small = im.convert("RGB").resize((im.width // 6, im.height // 6), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=40)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "phone.jpg").write_bytes(buf.getvalue())
    cmd = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "upscale",
        str(tmp_path / "in"),
        "-o",
        str(tmp_path / "out"),
        "--t",
        "0.5",
        "--model",
        "models:/oftsr-realworld-student@champion",
        "--tracking-uri",
        f"sqlite:///{root / 'mlflow.db'}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with Image.open(tmp_path / "out" / "phone_t0.5.png") as im:
        assert im.size == (small.width * 4, small.height * 4)
