"""The teacher-trajectory cache: targets, storage, the Ray stage and cached distillation."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from oftsr.flow import conditioned, noise_from_seed
from oftsr.infer import one_step
from oftsr.method import Method
from oftsr.nets import build_unet
from oftsr.samples import export_sample_photos
from oftsr.trajectory import sample_inputs, sample_seed, stored_indices, teacher_targets
from pipelines.cache.config import TrajectoryConfig
from pipelines.cache.store import CacheIncomplete, bytes_tensor, read_manifest, read_rows, tensor_bytes
from pipelines.data.config import DataConfig
from pipelines.train.checkpoint import load_checkpoint
from tests.helpers import perturbed_unet, save_net_checkpoint

pytestmark = pytest.mark.timeout(1050)  # 336 s measured on a slow 2-core machine (see docs/testing.md)
GRID = (0.01, 0.5, 0.99)


def perturbed_tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return perturbed_unet(0.02).eval()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    export_sample_photos(root / "photos")
    for i in (1, 2):
        net = perturbed_tiny(i)
        save_net_checkpoint(root / f"teacher{i}" / "checkpoint_000000000001", net, {"stage": "teacher"})
    return root


def cfg_for(root, **kw) -> TrajectoryConfig:
    base = dict(
        run_name="t",
        data=DataConfig(source=str(root / "photos"), crop=64),
        crops_per_image=2,
        method=Method(crop=64),
        teacher=str(root / "teacher1"),
        out=str(root / "out"),
        grid=GRID,
        keys_per_shard=3,
        batch=6,
        concurrency=2,
        tracking=dataclasses.replace(_tracking(root)),
    )
    base.update(kw)
    return TrajectoryConfig(**base)


def _tracking(root):
    from pipelines.tracking import TrackingConfig

    return TrackingConfig(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def test_stored_bytes_read_back_bit_exact_in_their_dtype():
    x = torch.randn(2, 3, 8, 8) * 3
    for dtype in ("float16", "bfloat16"):
        back = bytes_tensor(tensor_bytes(x, dtype), dtype, (2, 3, 8, 8))
        assert back.dtype == getattr(torch, dtype) and torch.equal(back, x.to(getattr(torch, dtype)))


def test_inputs_are_a_pure_function_of_crop_and_seed():
    hr = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    seeds = [sample_seed(0, "k", 0, 0), sample_seed(0, "k", 0, 1)]
    a = sample_inputs(hr, seeds, sf=4, kind="avgpool", sigma_y=0.05, sigma_p=0.5)
    b = sample_inputs(hr, seeds, sf=4, kind="avgpool", sigma_y=0.05, sigma_p=0.5)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert torch.equal(a[3], noise_from_seed((3, 16, 16), seeds))
    assert stored_indices(seeds[0], 21, 6) == stored_indices(seeds[0], 21, 6) and len(stored_indices(1, 21, 6)) == 6


def test_average_velocities_reproduce_the_teacher_states():
    net = perturbed_tiny(0)
    hr = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    _, x_lr, x0, _ = sample_inputs(hr, [1, 2], sf=4, kind="bicubic", sigma_y=0.0, sigma_p=0.2)
    out = teacher_targets(net, x_lr, x0, GRID, steps_per_interval=2)
    t = torch.tensor(GRID).view(-1, 1, 1, 1, 1)
    stored = bytes_tensor(tensor_bytes(out["u_bar"], "float16"), "float16", tuple(out["u_bar"].shape)).float()
    recon = x0.unsqueeze(0) + t * stored
    assert (recon - out["states"]).abs().max() < 2e-3  # fp16 error of u_bar, times t <= 1
    assert out["nfe"] == 2 * 2 * (len(GRID) + 1)
    assert out["endpoint"].shape == x0.shape and torch.isfinite(out["v_bar"]).all()


def test_the_solver_step_serves_as_v_bar_where_it_is_the_same_step():
    """One midpoint step per interval of a 0.05 grid with dt = 0.05: v_bar is the solver's own step velocity
    (no second evaluation), equal to the RK2 velocity evaluated afresh at the stored states."""
    from oftsr.flow import conditioned
    from oftsr.solvers import rk2_velocity, solve

    net = perturbed_tiny(0).eval()
    hr = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    _, x_lr, x0, _ = sample_inputs(hr, [3, 4], sf=4, kind="bicubic", sigma_y=0.0, sigma_p=0.2)
    grid = (0.01, 0.05, 0.1, 0.15, 0.2, 0.4, 0.99)  # shared steps at 0.05, 0.1, 0.15; separate at 0.01, 0.2, 0.4, 0.99
    out = teacher_targets(net, x_lr, x0, grid, dt=0.05)
    assert out["nfe"] == 2 * (len(grid) + 1)  # the ODE alone: v_bar adds evaluations only where it is not shared
    v = conditioned(net, x_lr)
    ref = solve(v, x0, method="midpoint", steps=1, time_grid=[0.0, *grid, 1.0], return_intermediates=True)
    assert torch.equal(out["states"], ref.states[1:-1]) and torch.equal(out["endpoint"], ref.x)
    with torch.no_grad():
        for k, t in enumerate(grid):
            delta = max(0.0, min(t + 0.05, 0.99) - t)
            fresh = rk2_velocity(v, out["states"][k], t, delta, 0.5)
            assert torch.allclose(out["v_bar"][k], fresh, atol=1e-5), t


def test_two_teachers_or_two_sigmas_give_two_prefixes(workdir):
    from pipelines.cache.stage import plan

    rows = [{"key": "a", "size": 1}]
    base = cfg_for(workdir)
    p1 = plan(base, rows, "teacher-a")[0]
    assert p1 == plan(base, rows, "teacher-a")[0]
    assert plan(base, rows, "teacher-b")[0] != p1
    assert plan(dataclasses.replace(base, method=Method(crop=64, sigma_p=0.3)), rows, "teacher-a")[0] != p1
    assert plan(dataclasses.replace(base, concurrency=5), rows, "teacher-a")[0] == p1  # pool size is not content


@pytest.fixture(scope="module")
def cache(workdir, ray_cluster):
    from pipelines.cache.stage import run_trajectories

    cfg = cfg_for(workdir)
    half = run_trajectories(cfg, max_shards=1)  # stopped after one of three shards
    assert not half["complete"]
    with pytest.raises(CacheIncomplete, match=r"no manifest\.json"):
        read_manifest(half["uri"])
    first_shard = workdir / "out" / "trajectories" / half["uri"].rsplit("/", 1)[-1] / "shard-00000.parquet"
    before = first_shard.read_bytes()
    full = run_trajectories(cfg)
    assert full["complete"] and full["uri"] == half["uri"]
    assert first_shard.read_bytes() == before  # finished shards are skipped, not recomputed
    return full


def test_an_interrupted_stage_completes_on_rerun_without_duplicates(cache):
    rows = read_rows(cache["uri"])
    assert cache["rows"] == len(rows) == 9 * 2
    assert len({(r["key"], r["crop_index"], r["seed"]) for r in rows}) == len(rows)
    manifest = read_manifest(cache["uri"])
    assert len(manifest["shards"]) == 3 and manifest["key"]["grid"] == list(GRID)


def test_rows_hold_the_documented_targets(cache, workdir):
    rows = read_rows(cache["uri"])
    row = rows[0]
    assert row["u_bar"].dtype == torch.float16 and row["u_bar"].shape == (3, 3, 64, 64)
    assert row["hr"].dtype == torch.uint8 and row["nfe"] == 2 * (len(GRID) + 1)
    net = build_unet("tiny")
    net.load_state_dict(load_checkpoint(workdir / "teacher1" / "checkpoint_000000000001")["ema"])
    _, x_lr, x0, eps = sample_inputs(row["hr"][None], [row["seed"]], sf=4, kind="bicubic", sigma_y=0.0, sigma_p=0.2)
    assert torch.equal(eps[0], noise_from_seed((3, 64, 64), row["seed"]))  # eps regenerated from the seed
    again = teacher_targets(net.eval(), x_lr, x0, GRID)
    assert (again["u_bar"][:, 0].half().float() - row["u_bar"].float()).abs().max() < 2e-3
    assert (again["endpoint"][0] - row["endpoint"].float()).abs().max() < 2e-3


def test_cli_lists_and_verifies_and_catches_a_damaged_shard(cache, workdir, tmp_path):
    cli = [sys.executable, "-m", "pipelines.cli", "cache"]
    out = subprocess.run([*cli, "ls", str(workdir / "out")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and f"{cache['uri']}  18 rows" in out.stdout
    out = subprocess.run([*cli, "verify", cache["uri"]], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok: 3 shards, 18 rows" in out.stdout
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cache["uri"], copy)
    manifest = (copy / "manifest.json").read_text().replace(cache["uri"], str(copy))
    (copy / "manifest.json").write_text(manifest)
    shard = copy / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    out = subprocess.run([*cli, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "shard-00001.parquet" in out.stderr


@pytest.mark.parametrize("small", [True, False], ids=["in-memory", "streamed"])
def test_each_listing_of_the_cache_comes_in_its_own_order(cache, small):
    """A shard holds the crops of a few images: listed in the same order every time, the distillation's steps
    cycled through the same photos in the same order on every pass (on the quickstart, 2 dB of PSNR lost)."""
    from ray.data.context import DataContext

    from pipelines.cache.dataset import cached_dataset

    rows = cache["rows"]
    ctx = DataContext.get_current()
    before = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        ds, _ = cached_dataset(
            cache["uri"], min_epoch_rows=3 * rows, max_cached_bytes=1 << 30 if small else 0, seed=3, concurrency=1
        )
        keys = [str(k) for k in ds.select_columns(["key"]).to_pandas()["key"]]
    finally:
        ctx.execution_options.preserve_order = before
    once = Counter(str(r["key"]) for r in read_rows(cache["uri"]))
    assert Counter(keys) == {k: 3 * n for k, n in once.items()}  # the whole cache, three times
    listings = {tuple(keys[i : i + rows]) for i in range(0, len(keys), rows)}
    assert len(listings) > 1, keys  # not one order three times


def test_a_small_cache_is_read_with_one_footer_reader_and_a_users_setting_wins(cache, monkeypatch):
    """Ray Data 2.60 starts 32 footer-reading actors per Parquet read whatever the number of files: 7.2-8.4 s for a
    five-shard cache on 2 cores (benchmarks/cache_read.py), paid at every listing."""
    import ray
    from ray.util.state import list_actors

    from pipelines.cache.dataset import _read_shards
    from pipelines.data.storage import filesystem

    def footer_readers() -> int:
        actors = list_actors(
            address=ray.get_runtime_context().gcs_address,  # this cluster, whatever else runs on the machine
            filters=[("class_name", "=", "FooterReader")],
            limit=1000,
            raise_on_missing_output=False,
        )
        return len(actors)

    fs, _ = filesystem(cache["uri"])
    paths = sorted(fs.glob(cache["uri"] + "/shard-*.parquet"))
    before = footer_readers()
    assert len(_read_shards(paths, None).take_all()) == cache["rows"]
    assert footer_readers() - before == 1
    assert "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS" not in os.environ
    monkeypatch.setenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2")
    before = footer_readers()
    assert len(_read_shards(paths, None).take_all()) == cache["rows"]
    assert footer_readers() - before == 2 and os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] == "2"


def test_the_training_loader_mixes_rows_across_its_buffer(ray_cluster):
    import ray

    from pipelines.data.loader import iter_crops

    ds = ray.data.from_items([{"i": i} for i in range(64)], override_num_blocks=4)
    plain = [b["i"].tolist() for b in iter_crops(ds, 8)]
    assert all(b == list(range(b[0], b[0] + 8)) for b in plain)  # unmixed: batches of neighbours (blocks of 16)
    mixed = [b["i"].tolist() for b in iter_crops(ds, 8, shuffle_buffer=32, shuffle_seed=1)]
    assert sorted(i for b in mixed for i in b) == list(range(64))
    assert max(mixed[0]) - min(mixed[0]) > 8
    again = [b["i"].tolist() for b in iter_crops(ds, 8, shuffle_buffer=32, shuffle_seed=2)]
    assert again != mixed  # the seed is the mix


def test_a_cache_without_manifest_is_refused(tmp_path, ray_cluster):
    from pipelines.cache.dataset import cached_dataset

    (tmp_path / "shard-00000.parquet").write_bytes(b"x")
    with pytest.raises(CacheIncomplete, match="incomplete"):
        cached_dataset(str(tmp_path))


@pytest.mark.slow  # 1024 images, about 5 min: the pipeline test runs a cached distillation in the fast tier
def test_cached_distillation_lowers_its_loss_and_moves_toward_the_teacher_endpoint(cache, workdir):
    from pipelines.overrides import apply_overrides
    from pipelines.recipes import recipe
    from pipelines.tracking import client
    from pipelines.train.driver import run_stage

    cfg = apply_overrides(
        recipe("quickstart", "distill"),
        {
            "targets": "cached",
            "cache": cache["uri"],
            "teacher": str(workdir / "teacher1"),
            "data.source": str(workdir / "photos"),
            "storage_path": str(workdir / "ray"),
            "run_name": "cached",
            "tracking.tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
            "total_images": "1024",
            "log_every_images": "64",
            "optim.lr": "1e-3",  # 2e-3 overshoots: the endpoint distance then falls by only 5-15 % and varies
            "optim.warmup_images": "32",
            "sample_grid": "0",
            "method.t_max": "0.99",  # the cache's range (the quickstart's own trains the knob up to 0.6)
            "loss.w_bound": "0.1",
        },
    )
    result = run_stage(cfg)
    c = client(f"sqlite:///{workdir / 'mlflow.db'}")
    totals = [m.value for m in sorted(c.get_metric_history(result["run_id"], "train/total"), key=lambda m: m.step)]
    assert sum(totals[-3:]) / 3 < 0.85 * sum(totals[:3]) / 3, totals
    inputs = c.get_run(result["run_id"]).inputs.dataset_inputs
    assert [d.dataset.digest for d in inputs] == [read_manifest(cache["uri"])["hash"]]

    rows = read_rows(cache["uri"])
    hr = torch.stack([r["hr"] for r in rows])
    _, x_lr, x0, _ = sample_inputs(hr, [r["seed"] for r in rows], sf=4, kind="bicubic", sigma_y=0.0, sigma_p=0.2)
    endpoint = torch.stack([r["endpoint"].float() for r in rows])

    def distance(weights):
        net = build_unet("tiny")
        net.load_state_dict(weights)
        with torch.no_grad():
            return (one_step(conditioned(net.eval(), x_lr), x0, 0.99) - endpoint).square().mean().item()

    before = distance(load_checkpoint(workdir / "teacher1" / "checkpoint_000000000001")["ema"])
    after = distance(load_checkpoint(result["checkpoint"])["model"])
    assert after < 0.8 * before, (before, after)  # about 0.5 measured in-process at this learning rate


def test_a_registered_teacher_is_read_from_the_registry_with_the_same_content_key(cache, workdir):
    from pipelines.cache.stage import run_trajectories
    from pipelines.registry import log_and_register
    from pipelines.tracking import client

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    ckpt = load_checkpoint(workdir / "teacher1" / "checkpoint_000000000001")
    net = build_unet("tiny")
    net.load_state_dict(ckpt["ema"])
    c = client(uri)
    run_id = c.create_run(c.create_experiment("registry", str(workdir / "artifacts"))).info.run_id
    meta = {"kind": "teacher", "sigma_p": 0.2, "sf": 4, "degradation": "bicubic"}
    log_and_register(tracking_uri=uri, run_id=run_id, name="oftsr-teacher", net=net, meta=meta)

    cfg = cfg_for(workdir, teacher="models:/oftsr-teacher@candidate", out=str(workdir / "out-registered"))
    result = run_trajectories(cfg)
    assert result["complete"]
    # Same weights, same content key: the cache is addressed by what the teacher is, not where it is registered.
    assert result["uri"].rsplit("/", 1)[-1] == cache["uri"].rsplit("/", 1)[-1]
    tags = c.get_run(result["run_id"]).data.tags
    assert tags["oftsr.teacher_version"] == read_manifest(cache["uri"])["key"]["teacher_version"]
    ours = {(r["key"], r["crop_index"]): r for r in read_rows(result["uri"])}
    for r in read_rows(cache["uri"]):
        assert torch.equal(ours[r["key"], r["crop_index"]]["u_bar"], r["u_bar"])  # computed by the same network

    with pytest.raises(FileNotFoundError, match="models:/oftsr-teacher@nope"):
        run_trajectories(dataclasses.replace(cfg, teacher="models:/oftsr-teacher@nope"))


def test_the_realesrgan_settings_are_part_of_the_key_and_other_kinds_keys_are_unchanged(workdir):
    from oftsr.realesrgan import RealESRGANSettings
    from pipelines.cache.stage import plan

    rows = [{"key": "a", "size": 1}]
    base = cfg_for(workdir)
    key = plan(base, rows, "teacher-a")[1]
    assert "realesrgan" not in key["degradation"]  # bicubic caches made before keep their prefix
    data = DataConfig(source=str(workdir / "photos"), crop=64, degradation="realesrgan")
    real = cfg_for(workdir, data=data, method=Method(crop=64, degradation="realesrgan"))
    other = dataclasses.replace(
        real, data=dataclasses.replace(data, realesrgan=RealESRGANSettings(second_order_prob=0.5))
    )
    assert plan(real, rows, "teacher-a")[0] != plan(other, rows, "teacher-a")[0]
    assert plan(real, rows, "teacher-a")[1]["degradation"]["realesrgan"]["second_order_prob"] == 1.0
    # where the chain runs is not content
    worker = dataclasses.replace(real, data=dataclasses.replace(data, degrade_on="worker"))
    assert plan(worker, rows, "teacher-a")[0] == plan(real, rows, "teacher-a")[0]


def test_a_realworld_cache_stores_each_samples_lr_and_training_reads_its_condition_from_it(workdir, ray_cluster):
    import numpy as np
    import pyarrow.parquet as pq

    from oftsr.augment import CropBox, apply_box
    from oftsr.degrade import upsample
    from oftsr.realesrgan import RealESRGANSettings
    from pipelines.cache.dataset import CachedTargets
    from pipelines.cache.stage import realworld_pairs, run_trajectories
    from pipelines.data.decode import decode_image

    settings = RealESRGANSettings(gt_size=64, crop_pad_size=76)
    data = DataConfig(source=str(workdir / "photos"), crop=64, degradation="realesrgan", realesrgan=settings)
    cfg = cfg_for(workdir, data=data, method=Method(crop=64, degradation="realesrgan"), out=str(workdir / "out_rw"))
    done = run_trajectories(cfg)
    manifest = read_manifest(done["uri"])
    assert manifest["lr_shape"] == [3, 16, 16] and manifest["key"]["degradation"]["realesrgan"]["gt_size"] == 64
    rows = read_rows(done["uri"])
    assert len(rows) == 9 * 2 and all(r["lr"].shape == (3, 16, 16) and r["hr"].shape == (3, 64, 64) for r in rows)
    row = rows[0]
    top, left, h, w, hf, vf = row["box"]
    assert h == w == 76  # the region; the chain's paired crop gives the 64 crop
    with open(row["key"], "rb") as f:
        img = torch.from_numpy(np.array(decode_image(f.read()))).permute(2, 0, 1)
    region = apply_box(img, CropBox(top, left, h, bool(hf), bool(vf), size_w=w))[None]
    hr, lr = realworld_pairs(region, [row["seed"]], data)
    assert torch.equal(hr[0], row["hr"]) and torch.equal(lr[0], row["lr"])
    # the teacher's targets were computed from that LR, and distillation reads its condition from it
    net = build_unet("tiny")
    net.load_state_dict(load_checkpoint(workdir / "teacher1" / "checkpoint_000000000001")["ema"])
    _, x_lr, x0, _ = sample_inputs(
        row["hr"][None], [row["seed"]], sf=4, kind="realesrgan", sigma_y=0.0, sigma_p=0.2, lr_uint8=row["lr"][None]
    )
    assert torch.equal(x_lr, upsample(row["lr"][None].float() / 127.5 - 1, 4, "realesrgan"))
    again = teacher_targets(net.eval(), x_lr, x0, GRID)
    assert (again["endpoint"][0] - row["endpoint"].float()).abs().max() < 2e-3
    shard = manifest["shards"][0]["uri"]
    table = pq.read_table(shard).to_pydict()
    batch = {}
    for k, v in table.items():  # one object per row, as a numpy batch of Ray Data holds list and binary columns
        batch[k] = np.empty(len(v), dtype=object)
        for i, item in enumerate(v):
            batch[k][i] = item
    out = CachedTargets(manifest)(batch)
    first = next(i for i, k in enumerate(table["key"]) if k == row["key"] and table["seed"][i] == row["seed"])
    assert np.array_equal(out["x_lr"][first], x_lr[0].numpy())
    with pytest.raises(ValueError, match="pass its LR"):
        sample_inputs(row["hr"][None], [row["seed"]], sf=4, kind="realesrgan", sigma_y=0.0, sigma_p=0.2)
