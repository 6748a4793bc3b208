"""Reading batches inside Ray Train workers: ``iter_crops(ray.train.get_dataset_shard("train"), ...)`` yields the
numeric columns (``hr``, ``x_lr``[, ``lr``], ``box``, or the cached-target columns) as tensors, images on the
worker's device, and string columns (``key``) as lists."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

FLOAT_COLUMNS = ("hr", "x_lr", "lr", "x0", "t", "u_bar", "v_bar", "v_bound")


class CropCollate(NumpyBatchCollateFn):
    """Numeric columns to CPU tensors, string columns to lists."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, col in batch.items():
            if col.dtype.kind in "biuf":
                out[name] = torch.from_numpy(np.ascontiguousarray(col))
            else:
                out[name] = [str(v) for v in col]
        return out


def iter_crops(
    shard,
    batch_size: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    drop_last: bool = True,
    prefetch_batches: int = 2,
    shuffle_buffer: int = 0,
    shuffle_seed: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Batches from a Ray Data shard (or dataset), float columns cast to ``dtype`` on ``device``; with
    ``shuffle_buffer`` rows, each batch is drawn at random from that many (Ray Data's local shuffle)."""
    for batch in shard.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=CropCollate(),
        drop_last=drop_last,
        prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=shuffle_buffer or None,
        local_shuffle_seed=shuffle_seed if shuffle_buffer else None,
    ):
        for name in FLOAT_COLUMNS:
            if name in batch:
                batch[name] = batch[name].to(device=device, dtype=dtype, non_blocking=True)
        yield batch
