"""The cached-target dataset that the distill stage streams with ``distill.targets=cached``: rows of a finished
trajectory cache turned into training tensors (``x_lr`` and ``x0`` regenerated from the HR crop and the seed)."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import ray
import torch

from oftsr.trajectory import sample_inputs
from pipelines.cache.store import decode_row, read_manifest
from pipelines.data.storage import filesystem


class CachedTargets:
    """Rows of a cache to training tensors: regenerates ``x_lr`` and ``x0`` from the HR crop and the seed, and
    picks one stored grid point per row (fresh randomness every epoch)."""

    def __init__(self, manifest: dict[str, Any]):
        self.manifest = manifest
        self.deg = manifest["key"]["degradation"]
        self.sigma_p = manifest["key"]["sigma_p"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        rows = [decode_row({k: batch[k][i] for k in batch}, self.manifest) for i in range(n)]
        seeds = [r["seed"] for r in rows]
        _, x_lr, x0, _ = sample_inputs(
            torch.stack([r["hr"] for r in rows]),
            seeds,
            sf=self.deg["sf"],
            kind=self.deg["kind"],
            sigma_y=self.deg["sigma_y"],
            sigma_p=self.sigma_p,
            lr_uint8=torch.stack([r["lr"] for r in rows]) if rows and rows[0]["lr"] is not None else None,
        )
        pick = [int(torch.randint(len(r["t"]), (1,))) for r in rows]
        f32 = lambda x: x.float().numpy()  # noqa: E731
        return {
            "key": np.array([r["key"] for r in rows], dtype=object),
            "x_lr": f32(x_lr),
            "x0": f32(x0),
            "t": np.array([float(r["t"][p]) for r, p in zip(rows, pick, strict=True)], dtype=np.float32),
            "u_bar": f32(torch.stack([r["u_bar"][p] for r, p in zip(rows, pick, strict=True)])),
            "v_bar": f32(torch.stack([r["v_bar"][p] for r, p in zip(rows, pick, strict=True)])),
            "v_bound": f32(torch.stack([r["v_bound"] for r in rows])),
        }


def cached_dataset(
    uri: str,
    storage_options=None,
    *,
    batch_size: int = 16,
    num_cpus: float = 0.5,
    concurrency: int | None = None,
    min_epoch_rows: int = 2048,
    max_cached_bytes: int = 1 << 30,
    seed: int = 0,
):
    """The cache as a Ray dataset of training tensors; refuses an incomplete cache.

    A small cache is listed several times per pass (each time with a fresh grid point per row), so that one pass
    holds at least ``min_epoch_rows`` rows and the per-pass start-up of Ray Data is paid rarely. Each listing comes
    in its own order, drawn from ``seed``: a small cache's rows, a large cache's shards (a shard holds the crops of a
    few images; the training workers mix rows within their shuffle buffer, ``StageConfig.shuffle_buffer``).
    ``num_cpus`` and ``concurrency`` are those of the map tasks (:class:`pipelines.data.config.DataConfig`).
    """
    import math
    import random

    import pyarrow.fs

    manifest = read_manifest(uri, storage_options)
    repeats = max(1, math.ceil(min_epoch_rows / max(1, manifest["rows"])))
    files = [s["uri"] for s in manifest["shards"]]
    fs, _ = filesystem(files[0], storage_options)
    paths = [filesystem(f, storage_options)[1] for f in files]
    arrow_fs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    order = random.Random(seed)
    if repeats > 1 and manifest["bytes"] <= max_cached_bytes:
        # Small: read once by the driver (pyarrow: Ray Data's read and repartition cost 10 s of task start-up on 2
        # cores), put in the object store in blocks of a few rows, and listed `repeats` times, each listing in its
        # own block order, as one dataset of block references: no re-reads, one operator (a union of 57 listings of
        # a 36-row cache took 47 s to its first batch on 2 cores: benchmarks/cache_read.py). Ray Data runs a task
        # for the metadata of each reference (2,000, a block a row, took 7 s), so all listings hold at most
        # _MAX_BLOCK_REFS; the training workers' shuffle buffer mixes rows across blocks. Each listing still gets
        # its own grid points in `_apply`.
        blocks = _small_cache_blocks(paths, arrow_fs, max(1, min(manifest["rows"], _MAX_BLOCK_REFS // repeats)))
        ds = ray.data.from_arrow_refs([b for _ in range(repeats) for b in order.sample(blocks, len(blocks))])
    else:
        # One read per listing: Ray Data reads a file that one read_parquet names twice only once.
        listings = [_read_shards(order.sample(paths, len(paths)), arrow_fs) for _ in range(repeats)]
        ds = listings[0].union(*listings[1:]) if len(listings) > 1 else listings[0]
    return ds.map_batches(
        _apply,
        fn_kwargs={"targets": CachedTargets(manifest)},
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus,
        compute=ray.data.TaskPoolStrategy(size=concurrency),
    ), manifest


_MAX_BLOCK_REFS = 256

#: Ray Data's Parquet reader (2.60) lists files through a pool of footer-reading actors, 32 of them whatever the
#: number of files; each is a process to start: 7.2-8.4 s per read of a five-shard cache on 2 cores, 1.6-2.1 s with
#: one (benchmarks/cache_read.py).
_FOOTER_ACTORS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
_FILES_PER_FOOTER_ACTOR = 10  # Ray's footer batch: one actor per ten shards, up to Ray's 32


def _read_shards(paths: list[str], filesystem):
    """``read_parquet`` of the cache's shards with as many footer readers as the shards need (a user's
    ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`` wins). Ray reads the variable when the read is planned, here."""
    import os

    if _FOOTER_ACTORS in os.environ:
        return ray.data.read_parquet(paths, filesystem=filesystem)
    os.environ[_FOOTER_ACTORS] = str(min(32, -(-len(paths) // _FILES_PER_FOOTER_ACTOR)))
    try:
        return ray.data.read_parquet(paths, filesystem=filesystem)
    finally:
        del os.environ[_FOOTER_ACTORS]


def _small_cache_blocks(paths: list[str], filesystem, n_blocks: int) -> list:
    """The shards read on the driver, in ``n_blocks`` nearly equal runs of rows, each put in the object store."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(p, filesystem=filesystem) for p in paths]).combine_chunks()
    bounds = [round(i * table.num_rows / n_blocks) for i in range(n_blocks + 1)]
    return [ray.put(table.slice(a, b - a)) for a, b in itertools.pairwise(bounds) if b > a]


def _apply(batch: dict[str, np.ndarray], targets: CachedTargets) -> dict[str, np.ndarray]:
    return targets(batch)


__all__ = ["CachedTargets", "cached_dataset"]
