"""Ray Data datasets of training and evaluation crops, streamed from object storage or local folders.

Keys come from a manifest (Parquet) or from listing the source; each ``map_batches`` task then fetches, decodes
(our own decoder: one bad object is skipped and counted, never fatal), crops, flips and degrades a batch of images
on CPU. Training workers read them with ``ray.train.get_dataset_shard("train").iter_torch_batches(...)``.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np
import ray

from pipelines.data.config import DataConfig
from pipelines.data.ledger import RayLedger
from pipelines.data.manifest import list_images, read_manifest
from pipelines.data.transforms import EvalTransform, TrainTransform


def source_rows(cfg: DataConfig) -> list[dict[str, Any]]:
    """The ``{"key", "size"}`` rows named by the config's manifest, or listed from its source."""
    if cfg.manifest is not None:
        return read_manifest(cfg.manifest, cfg.storage_options)
    return list_images(cfg.source, cfg.storage_options)


def _key_dataset(cfg: DataConfig, rows: list[dict[str, Any]] | None = None) -> ray.data.Dataset:
    rows = source_rows(cfg) if rows is None else rows
    if not rows:
        raise ValueError(f"no images found in {cfg.manifest or cfg.source}")
    keys = [r["key"] for r in rows]
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(keys)
    blocks = max(1, min(len(keys) // max(1, cfg.batch_size), 200))
    return ray.data.from_items([{"key": k} for k in keys], override_num_blocks=blocks)


def _apply(batch: dict[str, np.ndarray], transform) -> dict[str, np.ndarray]:
    return transform(batch)


def training_dataset(
    cfg: DataConfig, *, rows: list[dict[str, Any]] | None = None, ledger: RayLedger | None = None
) -> tuple[ray.data.Dataset, RayLedger]:
    """Stream of random training crops (columns of :mod:`pipelines.data.transforms`) and the ledger of skips."""
    ledger = ledger or RayLedger(cfg.max_bad_fraction, cfg.min_seen_for_fraction)
    ds = _key_dataset(cfg, rows).map_batches(
        _apply,
        fn_kwargs={"transform": TrainTransform(cfg, ledger)},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_cpus=cfg.num_cpus,
        compute=ray.data.TaskPoolStrategy(size=cfg.concurrency),
    )
    return ds, ledger


def evaluation_dataset(
    cfg: DataConfig,
    *,
    full: bool = False,
    rows: list[dict[str, Any]] | None = None,
    ledger: RayLedger | None = None,
) -> tuple[ray.data.Dataset, RayLedger]:
    """Deterministic evaluation crops (centre crop, or ``full`` images), in key order."""
    ledger = ledger or RayLedger(cfg.max_bad_fraction, cfg.min_seen_for_fraction)
    ordered = dataclasses.replace(cfg, shuffle=False)
    ds = _key_dataset(ordered, rows).map_batches(
        _apply,
        fn_kwargs={"transform": EvalTransform(ordered, ledger, full=full)},
        batch_size=1 if full else cfg.batch_size,
        batch_format="numpy",
        num_cpus=cfg.num_cpus,
        compute=ray.data.TaskPoolStrategy(size=cfg.concurrency),
    )
    return ds, ledger


def format_summary(summary: dict[str, Any]) -> str:
    """One paragraph for the end of a stage: counts, reasons, and the first keys."""
    if not summary["skipped"]:
        return f"data: {summary['seen']} objects read, none skipped"
    reasons = ", ".join(f"{r}: {n}" for r, n in sorted(summary["reasons"].items()))
    lines = [f"data: {summary['seen']} objects read, {summary['skipped']} skipped ({reasons})"]
    lines += [f"  skipped {item['key']}: {item['reason']}" for item in summary["items"][:20]]
    return "\n".join(lines)
