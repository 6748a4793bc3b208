"""Reading crops inside Ray Train workers: ``iter_crops(ray.train.get_dataset_shard("train"), ...)`` yields
``{"hr", "x_lr"[, "lr"], "box"}`` tensors on the worker's device and ``"key"`` as a list of source URIs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

TENSOR_COLUMNS = ("hr", "x_lr", "lr", "box")


class CropCollate(NumpyBatchCollateFn):
    """Numeric columns to CPU tensors, the string ``key`` column to a list."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {
            c: torch.from_numpy(np.ascontiguousarray(batch[c])) for c in TENSOR_COLUMNS if c in batch
        }
        if "key" in batch:
            out["key"] = [str(k) for k in batch["key"]]
        return out


def iter_crops(
    shard,
    batch_size: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    drop_last: bool = True,
    prefetch_batches: int = 2,
) -> Iterator[dict[str, Any]]:
    """Batches of crops from a Ray Data shard (or dataset), images cast to ``dtype`` on ``device``."""
    for batch in shard.iter_torch_batches(
        batch_size=batch_size, collate_fn=CropCollate(), drop_last=drop_last, prefetch_batches=prefetch_batches
    ):
        for name in ("hr", "x_lr", "lr"):
            if name in batch:
                batch[name] = batch[name].to(device=device, dtype=dtype, non_blocking=True)
        yield batch
