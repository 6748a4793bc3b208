"""Training faults with the real components: a Ray Train worker SIGKILLed mid-step, then a corrupt latest
checkpoint. Real local Ray cluster, 2 CPU workers, the tiny preset, 64² crops."""

from __future__ import annotations

import pytest

from pipelines.tracking import client
from pipelines.train.checkpoint import load_checkpoint
from tests.helpers import photo_workdir, stage_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]  # a fault drill: SIGKILL mid-step, then a corrupt checkpoint


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return photo_workdir(tmp_path_factory, "faults")


@pytest.fixture(scope="module")
def killed_run(workdir, ray_cluster):
    from pipelines.train.driver import run_stage

    cfg = stage_config(
        "teacher",
        workdir,
        run_name="killed",
        total_images=256,
        checkpoint_every_images=64,
        sample_grid=0,
        **{"fault.fail_at_images": 160, "fault.rank": 1, "fault.kind": "sigkill", "fault.marker": workdir / "fired"},
    )
    return run_stage(cfg)


def test_a_worker_killed_mid_step_resumes_from_the_checkpoint_and_counts_images_once(killed_run, workdir):
    assert (workdir / "fired").read_text() == "160"  # SIGKILL at 160 images, 32 after the checkpoint at 128
    assert killed_run["images_seen"] == 256
    # The newest checkpoint Ray Train had registered when the worker died: 128, or 64 when the kill came before
    # the controller took in the report of 128 (reports are processed asynchronously).
    assert killed_run["metrics"]["resumed_from"] in ("checkpoint_000000000064", "checkpoint_000000000128")
    state = load_checkpoint(killed_run["checkpoint"])["state"]
    assert state["images_seen"] == 256 and state["ema_updates"] == 256 // 16  # every image counted once
    c = client(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = c.search_runs(
        [c.get_experiment_by_name("oftsr").experiment_id], filter_string="attributes.run_name = 'teacher:killed'"
    )
    assert len(runs) == 1  # the restarted workers log into the same run


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one_with_a_warning(killed_run, workdir):
    from pipelines.train.driver import run_stage

    latest = workdir / "ray" / "killed" / "checkpoint_000000000256"
    weights = latest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the checksum no longer matches
    weights.write_bytes(bytes(data))

    cfg = stage_config("teacher", workdir, run_name="killed", total_images=320, checkpoint_every_images=64)
    result = run_stage(cfg)  # same run name and storage: resumes
    assert result["resumed"] and result["images_seen"] == 320
    assert result["metrics"]["resumed_from"] == "checkpoint_000000000192"
    (reason,) = result["metrics"]["corrupt_checkpoints"]
    assert "checkpoint_000000000256" in reason and "checksum mismatch" in reason
    state = load_checkpoint(result["checkpoint"])["state"]
    assert state["images_seen"] == 320 and state["ema_updates"] == 320 // 16  # 192 + 128 more, none twice
    tags = client(f"sqlite:///{workdir / 'mlflow.db'}").get_run(result["run_id"]).data.tags
    assert (
        tags["oftsr.resumed_from"] == "checkpoint_000000000192"
        and "checksum mismatch" in tags["oftsr.corrupt_checkpoints"]
    )
