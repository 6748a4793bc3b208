"""The trajectory stage killed (SIGKILL, driver and its actors) while shards are being written: no partial shard
is ever visible, the cache is not readable as complete, and running again completes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

from oftsr.nets import build_unet
from oftsr.samples import export_sample_photos
from tests.helpers import save_net_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(750)]  # 241 s measured on a slow 2-core machine
CROPS = 2


def test_a_stage_killed_mid_shard_shows_no_partial_shard_and_completes_on_rerun(tmp_path, ray_cluster):
    import ray

    photos = export_sample_photos(tmp_path / "photos")
    torch.manual_seed(0)
    net = build_unet("tiny").eval()
    save_net_checkpoint(tmp_path / "teacher", net, {"stage": "teacher"})
    args = [sys.executable, "-m", "pipelines.cli", "trajectories", "quickstart"]
    for s in (
        f"data.source={tmp_path / 'photos'}",
        f"teacher={tmp_path / 'teacher'}",
        f"out={tmp_path / 'out'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        f"crops_per_image={CROPS}",
        "keys_per_shard=1",
    ):
        args += ["--set", s]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with open(tmp_path / "first.log", "w") as log:  # the killed process's output, read if it ends on its own
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline and not list((tmp_path / "out").glob("trajectories/*/shard-*.parquet")):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]  # ended before any shard
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, mid-way through the shards
        proc.wait(timeout=30)

    (prefix,) = (tmp_path / "out" / "trajectories").iterdir()
    visible = sorted(prefix.glob("shard-*.parquet"))
    assert 1 <= len(visible) < len(photos), visible
    for shard in visible:
        assert pq.read_table(shard).num_rows == CROPS  # whole, or not there at all
    assert not (prefix / "manifest.json").exists()
    out = subprocess.run([*args[:3], "cache", "verify", str(prefix)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "incomplete" in out.stderr  # never readable as a cache

    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads(again.stdout.strip().splitlines()[-1])
    assert result["complete"] and result["rows"] == CROPS * len(photos)
    out = subprocess.run([*args[:3], "cache", "verify", str(prefix)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and f"{len(photos)} shards, {CROPS * len(photos)} rows" in out.stdout
    assert not [p.name for p in prefix.iterdir() if p.name.endswith(".tmp")]  # writers' leftovers removed
