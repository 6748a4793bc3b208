"""The ``trajectories`` stage (Ray Data actor pool, one teacher replica per actor) and the cached-target dataset
that the distill stage streams with ``--set targets=cached --set cache=URI``."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import ray
import torch

from oftsr.augment import random_box
from oftsr.nets import UNet
from oftsr.trajectory import sample_inputs, sample_seed, stored_indices, teacher_targets
from pipelines.cache.config import TrajectoryConfig, cache_key, key_hash
from pipelines.cache.store import (
    existing_shards,
    read_manifest,
    remove_partial_files,
    shard_rows,
    tensor_bytes,
    write_manifest,
    write_shard,
)
from pipelines.data.decode import DecodeError
from pipelines.data.storage import filesystem
from pipelines.data.transforms import crop_array, fetch_image
from pipelines.progress import ProgressLine
from pipelines.train.checkpoint import latest_checkpoint, load_teacher


def is_model_uri(uri: str) -> bool:
    return uri.startswith(("models:/", "runs:/"))


def teacher_version(uri: str, storage_options=None, tracking_uri: str | None = None) -> tuple[str, str]:
    """``(resolved URI, version)``: for a checkpoint (or run folder), the newest complete checkpoint and its EMA
    weights' SHA-256; for an MLflow model URI (``models:/NAME@ALIAS``, ``models:/NAME/N``, ``runs:/...``), the
    pinned version and its weights' SHA-256."""
    if is_model_uri(uri):
        from pipelines.registry import pin_model_uri

        return pin_model_uri(uri, tracking_uri=tracking_uri)
    fs, path = filesystem(uri, storage_options)
    resolved = latest_checkpoint(fs, path)
    with fs.open(f"{resolved}/checksums.json", "rb") as f:
        sums = json.loads(f.read())
    prefix = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    return prefix + resolved, sums["ema.safetensors"][:16]


def realworld_pairs(hr_uint8: torch.Tensor, seeds: list[int], d) -> tuple[torch.Tensor, torch.Tensor]:
    """The realesrgan chain on uint8 regions: ``(hr, lr)`` as uint8, ``lr`` HR-sized when the chain resizes back."""
    from oftsr.conventions import image_to_uint8, uint8_to_image
    from oftsr.realesrgan import realesrgan

    out = realesrgan(uint8_to_image(hr_uint8), seeds, d.sf, d.realesrgan)
    lr = out.x_lr if d.realesrgan.resize_back else out.lr
    return image_to_uint8(out.hr), image_to_uint8(lr)


def realworld_lr_shape(d) -> list[int]:
    side = d.crop if d.realesrgan.resize_back else d.crop // d.sf
    return [3, side, side]


class ShardWriter:
    """Ray Data callable class: loads the teacher once, then computes and writes one shard per call."""

    def __init__(self, cfg: TrajectoryConfig, teacher_uri: str, prefix: str):
        self.cfg, self.prefix = cfg, prefix
        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        unet, weights = load_teacher(teacher_uri, cfg.data.storage_options, cfg.tracking.tracking_uri)
        self.net = UNet(unet)
        self.net.load_state_dict(weights)
        self.net.eval().requires_grad_(False).to(self.device)

    def _crops(self, keys: list[str]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        cfg, d = self.cfg, self.cfg.data
        samples, skipped = [], []
        for key in keys:
            try:
                img = fetch_image(key, d.storage_options, retries=d.read_retries, max_pixels=d.max_pixels)
                if img.shape[0] < d.region or img.shape[1] < d.region:
                    raise DecodeError(key, "too-small", f"{img.shape[0]}x{img.shape[1]} < crop {d.region}")
            except DecodeError as err:
                skipped.append((key, err.reason))
                continue
            for c in range(cfg.crops_per_image):
                gen = torch.Generator().manual_seed(sample_seed(cfg.seed, key, c, -1))
                box = random_box(
                    img.shape[0], img.shape[1], d.region, p_hflip=d.p_hflip, p_vflip=d.p_vflip, generator=gen
                )
                hr = crop_array(img, box)
                for s in range(cfg.seeds_per_crop):
                    samples.append(
                        {
                            "key": key,
                            "crop_index": c,
                            "seed": sample_seed(cfg.seed, key, c, s),
                            "hr": hr,
                            "box": [box.top, box.left, box.size, box.width, int(box.hflip), int(box.vflip)],
                        }
                    )
        return samples, skipped

    def _rows(self, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        cfg, d = self.cfg, self.cfg.data
        rows = []
        for i in range(0, len(samples), cfg.batch):
            part = samples[i : i + cfg.batch]
            seeds = [s["seed"] for s in part]
            hr, lr = torch.stack([s["hr"] for s in part]), None
            if d.seeded:  # drawn once here and stored: the chain is too costly to redraw every epoch
                hr, lr = realworld_pairs(hr, seeds, d)
                for s, h, low in zip(part, hr, lr, strict=True):
                    s["hr"], s["lr"] = h, low
            _, x_lr, x0, _ = sample_inputs(
                hr,
                seeds,
                sf=d.sf,
                kind=d.degradation,
                sigma_y=d.sigma_y,
                sigma_p=cfg.method.sigma_p,
                lr_uint8=lr,
            )
            out = teacher_targets(
                self.net,
                x_lr.to(self.device),
                x0.to(self.device),
                cfg.grid,
                method=cfg.solver,
                steps_per_interval=cfg.steps_per_interval,
                dt=cfg.dt,
                r=cfg.r,
                t_min=cfg.method.t_min,
                t_max=cfg.method.t_max,
                chunk=4 * cfg.batch,
            )
            for j, s in enumerate(part):
                idx = stored_indices(s["seed"], len(cfg.grid), cfg.points_per_sample)
                rows.append(
                    {
                        "key": s["key"],
                        "box": s["box"],
                        "crop_index": s["crop_index"],
                        "seed": s["seed"],
                        "t": [cfg.grid[k] for k in idx],
                        "hr": tensor_bytes(s["hr"], "uint8"),
                        "u_bar": tensor_bytes(out["u_bar"][idx, j], cfg.dtype),
                        "v_bar": tensor_bytes(out["v_bar"][idx, j], cfg.dtype),
                        "v_bound": tensor_bytes(out["v_bound"][j], cfg.dtype),
                        "endpoint": tensor_bytes(out["endpoint"][j], cfg.dtype),
                        "nfe": int(out["nfe"]),
                        "lr": tensor_bytes(s["lr"], "uint8") if "lr" in s else None,
                    }
                )
        return rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"shard": [], "uri": [], "rows": [], "bytes": [], "skipped": [], "seconds": [], "at": []}
        for shard, keys_json in zip(batch["shard"], batch["keys"], strict=True):
            start = time.perf_counter()
            out["at"].append(time.time())  # when its computation began (the first one ends the start-up)
            samples, skipped = self._crops(json.loads(str(keys_json)))
            rows = self._rows(samples)
            uri, size = write_shard(self.prefix, int(shard), rows, self.cfg.data.storage_options)
            for k, v in (
                ("shard", int(shard)),
                ("uri", uri),
                ("rows", len(rows)),
                ("bytes", size),
                ("skipped", json.dumps(skipped)),
                ("seconds", time.perf_counter() - start),
            ):
                out[k].append(v)
        return {k: np.array(v, dtype=object if k in ("uri", "skipped") else None) for k, v in out.items()}


def plan(cfg: TrajectoryConfig, rows: list[dict[str, Any]], teacher_uri_version: str) -> tuple[str, dict, list]:
    """``(prefix, key, shards)``: where the cache goes, its content key, and its shards of keys."""
    from pipelines.data.manifest import manifest_hash

    key = cache_key(cfg, teacher_version=teacher_uri_version, manifest_hash=manifest_hash(rows))
    prefix = f"{cfg.out.rstrip('/')}/trajectories/{key_hash(key)}"
    keys = sorted(r["key"] for r in rows)
    shards = [keys[i : i + cfg.keys_per_shard] for i in range(0, len(keys), cfg.keys_per_shard)]
    return prefix, key, shards


def run_trajectories(cfg: TrajectoryConfig, *, max_shards: int = 0, log=print) -> dict[str, Any]:
    """Compute (or finish, or reuse) the cache; returns ``{"uri", "rows", "complete", ...}``.

    ``max_shards`` > 0 stops after that many new shards (a time-boxed run; re-running continues).
    """
    from pipelines.data.dataset import source_rows
    from pipelines.metric_logger import MetricLogger
    from pipelines.overrides import flatten
    from pipelines.stage import prepare, tracked_run

    called = time.time()  # start-up (trajectories/startup_s): from here to the first shard's computation
    if not cfg.teacher:
        raise ValueError("trajectories.teacher: the trajectory stage needs a teacher (a checkpoint folder or models:/)")
    prepare(cfg.tracking, cfg.out, storage_shared=cfg.storage_shared, what="out")
    rows = source_rows(cfg.data)
    teacher_uri, version = teacher_version(cfg.teacher, cfg.data.storage_options, cfg.tracking.tracking_uri)
    prefix, key, shards = plan(cfg, rows, version)
    try:
        manifest = read_manifest(prefix, cfg.data.storage_options)
        log(f"trajectories: reusing the finished cache {prefix} ({manifest['rows']} rows)")
        return {"uri": prefix, "rows": manifest["rows"], "complete": True, "reused": True}
    except FileNotFoundError:
        pass
    tags = {
        "oftsr.cache_hash": key_hash(key),
        "oftsr.data_manifest_hash": key["manifest_hash"],
        "oftsr.teacher_version": version,
    }
    params = {**flatten(cfg), "cache.uri": prefix}
    with tracked_run(
        "trajectories", cfg.tracking, key=(prefix,), run_name=cfg.run_name, params=params, tags=tags
    ) as run:
        logger = MetricLogger(run.tracking_uri, run.run_id)
        return _compute(cfg, run, logger, prefix, key, shards, teacher_uri, max_shards, log, called)


def _compute(cfg, run, logger, prefix, key, shards, teacher_uri, max_shards, log, called) -> dict[str, Any]:
    """The shards still missing, then the manifest (last: the cache is complete once it exists)."""
    run_id = run.run_id
    done = existing_shards(prefix, cfg.data.storage_options)
    pending = [i for i in range(len(shards)) if i not in done]
    if max_shards > 0:
        pending = pending[:max_shards]
    log(f"trajectories: {len(shards)} shards ({len(done)} done, {len(pending)} to compute) -> {prefix}")
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    new_rows = 0
    if pending:
        items = [{"shard": i, "keys": json.dumps(shards[i])} for i in pending]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardWriter,
            fn_constructor_kwargs={"cfg": cfg, "teacher_uri": teacher_uri, "prefix": prefix},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(cfg.concurrency, len(items))),
            num_cpus=cfg.cpus_per_actor,
            num_gpus=1 if cfg.use_gpu else 0,
        )
        per_key = cfg.crops_per_image * cfg.seeds_per_crop  # rows of a shard: its images times their samples
        line = ProgressLine("trajectories", sum(len(shards[i]) for i in pending) * per_key, unit="rows")
        for row in ds.iter_rows():
            results.append(row)
            new_rows += int(row["rows"])
            line.update(new_rows, f"{len(results)}/{len(items)} shards")
        if len(results) == len(items):
            line.total = new_rows  # skipped images give fewer rows than planned
        line.update(new_rows, f"{len(results)}/{len(items)} shards", final=True)
    seconds = time.perf_counter() - start
    skipped = [tuple(s) for r in results for s in json.loads(r["skipped"])]
    metrics = {
        "trajectories/new_rows": new_rows,
        "trajectories/new_shards": len(results),
        "trajectories/seconds": seconds,
        "trajectories/skipped": len(skipped),
    }
    if new_rows:
        metrics["trajectories/rows_per_s"] = new_rows / seconds
    startup = min(float(r["at"]) for r in results) - called if results else None
    if startup is not None:
        metrics["trajectories/startup_s"] = startup
    logger.log(metrics, step=len(done) + len(results))
    all_done = existing_shards(prefix, cfg.data.storage_options)
    if len(all_done) < len(shards):
        log(f"trajectories: {len(all_done)}/{len(shards)} shards written; run again to finish")
        run.status = None  # left running: the next run resumes it
        return {"uri": prefix, "rows": None, "complete": False, "run_id": run_id, "skipped": skipped}

    fs_shards = []
    for i in range(len(shards)):
        uri = all_done[i]
        fs, path = filesystem(uri, cfg.data.storage_options)
        fs_shards.append({"uri": uri, "rows": shard_rows(uri, cfg.data.storage_options), "bytes": fs.size(path)})
    manifest = {
        "key": key,
        "hash": key_hash(key),
        "teacher": teacher_uri,
        "shape": [3, cfg.data.crop, cfg.data.crop],
        **({"lr_shape": realworld_lr_shape(cfg.data)} if cfg.data.seeded else {}),
        "shards": fs_shards,
        "rows": sum(s["rows"] for s in fs_shards),
        "bytes": sum(s["bytes"] for s in fs_shards),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_manifest(prefix, manifest, cfg.data.storage_options)  # last: the cache is now complete
    removed = remove_partial_files(prefix, cfg.data.storage_options)
    if removed:
        log(f"trajectories: removed {removed} partial file(s) left by an interrupted writer")
    logger.log(
        {
            "trajectories/rows": manifest["rows"],
            "trajectories/bytes": manifest["bytes"],
            "trajectories/bytes_per_sample": manifest["bytes"] / max(1, manifest["rows"]),
        },
        step=len(shards),
    )
    rate = f", {new_rows} new in {seconds:.0f} s ({new_rows / seconds:.2f} rows/s)" if new_rows else ""
    rate += f", first shard {startup:.0f} s after the start" if startup is not None else ""
    log(f"trajectories: complete, {manifest['rows']} rows{rate}, {manifest['bytes'] / 1e6:.1f} MB -> {prefix}")
    return {
        "uri": prefix,
        "rows": manifest["rows"],
        "complete": True,
        "run_id": run_id,
        "skipped": skipped,
        "reused": False,
        "startup_s": startup,
    }


__all__ = ["ShardWriter", "plan", "run_trajectories"]
