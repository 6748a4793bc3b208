"""On-storage layout of a trajectory cache and its reader/writer (no Ray).

    OUT/trajectories/<hash>/shard-00000.parquet ... manifest.json

A shard appears only when complete (local: temporary file then rename; object stores: a single PUT), and
``manifest.json`` is written last: a cache without it is incomplete and is never read. Tensors are stored as raw
little-endian bytes (fp16 / bf16 / uint8) with their shapes in the manifest, so they read back bit-exact.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.data.storage import filesystem, join_uri, protocol_of

MANIFEST = "manifest.json"
SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("box", pa.list_(pa.int32())),
        ("crop_index", pa.int32()),
        ("seed", pa.int64()),
        ("t", pa.list_(pa.float32())),
        ("hr", pa.binary()),
        ("u_bar", pa.binary()),
        ("v_bar", pa.binary()),
        ("v_bound", pa.binary()),
        ("endpoint", pa.binary()),
        ("nfe", pa.int32()),
        ("lr", pa.binary()),  # uint8, for degradations drawn per sample (realesrgan); null otherwise
    ]
)


class CacheIncomplete(FileNotFoundError):
    """The cache has no manifest.json: it was never finished (or is still being written)."""


def tensor_bytes(x: torch.Tensor, dtype: str) -> bytes:
    """A tensor as raw bytes in ``dtype`` (``float16``, ``bfloat16`` or ``uint8``)."""
    if dtype == "bfloat16":
        return x.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    return x.detach().to("cpu", getattr(torch, dtype)).contiguous().numpy().tobytes()


def bytes_tensor(data: bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(np.frombuffer(data, dtype=np.int16).copy()).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(np.frombuffer(data, dtype=getattr(np, dtype)).copy()).reshape(shape)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def write_shard(prefix: str, index: int, rows: list[dict[str, Any]], storage_options=None) -> tuple[str, int]:
    """Write one shard atomically; returns ``(uri, bytes)``."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()
    uri = f"{prefix.rstrip('/')}/{shard_name(index)}"
    fs, path = filesystem(uri, storage_options)
    if protocol_of(uri) == "file":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)  # one PUT: visible whole or not at all
    return uri, len(data)


def existing_shards(prefix: str, storage_options=None) -> dict[int, str]:
    """Complete shards already under ``prefix``: ``{index: uri}``."""
    fs, path = filesystem(prefix, storage_options)
    if not fs.exists(path):
        return {}
    out = {}
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("shard-") and name.endswith(".parquet"):
            out[int(name[6:11])] = join_uri(prefix, entry)
    return out


def remove_partial_files(prefix: str, storage_options=None) -> int:
    """Delete the temporary files of writers that were killed mid-shard (never read: their names start with a dot
    and end in ``.tmp``). Called once the cache is complete, when no writer of this cache can still be running."""
    fs, path = filesystem(prefix, storage_options)
    if protocol_of(prefix) != "file" or not fs.exists(path):
        return 0
    stale = [e for e in fs.ls(path, detail=False) if e.endswith(".tmp")]
    for entry in stale:
        fs.rm_file(entry)
    return len(stale)


def write_manifest(prefix: str, manifest: dict[str, Any], storage_options=None) -> str:
    uri = f"{prefix.rstrip('/')}/{MANIFEST}"
    fs, path = filesystem(uri, storage_options)
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    if protocol_of(uri) == "file":
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)
    return uri


def read_manifest(prefix: str, storage_options=None) -> dict[str, Any]:
    """The manifest of a finished cache; :class:`CacheIncomplete` if it has none."""
    fs, path = filesystem(f"{prefix.rstrip('/')}/{MANIFEST}", storage_options)
    if not fs.exists(path):
        raise CacheIncomplete(f"{prefix}: no {MANIFEST}; the cache is incomplete (re-run the trajectories stage)")
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def shard_rows(uri: str, storage_options=None) -> int:
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def decode_row(row: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """One stored row as tensors: ``hr`` uint8 ``(3, H, W)``, ``u_bar``/``v_bar`` ``(P, 3, H, W)``, ``v_bound``,
    ``endpoint`` ``(3, H, W)``, ``t`` ``(P,)``, in the stored dtype; ``lr`` uint8 (``manifest["lr_shape"]``) or None."""
    shape = tuple(manifest["shape"])
    dtype = manifest["key"]["dtype"]
    p = len(row["t"])
    return {
        "key": row["key"],
        "box": list(row["box"]),
        "crop_index": int(row["crop_index"]),
        "seed": int(row["seed"]),
        "t": torch.tensor(row["t"], dtype=torch.float32),
        "nfe": int(row["nfe"]),
        "hr": bytes_tensor(row["hr"], "uint8", shape),
        "u_bar": bytes_tensor(row["u_bar"], dtype, (p, *shape)),
        "v_bar": bytes_tensor(row["v_bar"], dtype, (p, *shape)),
        "v_bound": bytes_tensor(row["v_bound"], dtype, shape),
        "endpoint": bytes_tensor(row["endpoint"], dtype, shape),
        "lr": bytes_tensor(row["lr"], "uint8", tuple(manifest["lr_shape"])) if row.get("lr") is not None else None,
    }


def read_rows(prefix: str, storage_options=None) -> list[dict[str, Any]]:
    """Every row of a finished cache, decoded (small caches and tests; training streams through Ray Data)."""
    manifest = read_manifest(prefix, storage_options)
    rows = []
    for shard in manifest["shards"]:
        fs, path = filesystem(shard["uri"], storage_options)
        with fs.open(path, "rb") as f:
            rows += [decode_row(r, manifest) for r in pq.read_table(f).to_pylist()]
    return rows


def list_caches(root: str, storage_options=None) -> list[dict[str, Any]]:
    """Caches under ``root`` (``OUT`` or ``OUT/trajectories``): hash, complete or not, rows, bytes, key."""
    base = root.rstrip("/")
    if not base.endswith("trajectories"):
        base = f"{base}/trajectories"
    fs, path = filesystem(base, storage_options)
    if not fs.exists(path):
        return []
    out = []
    for entry in sorted(fs.ls(path, detail=False)):
        prefix = join_uri(base, entry)
        item: dict[str, Any] = {"hash": entry.rstrip("/").rsplit("/", 1)[-1], "uri": prefix}
        try:
            m = read_manifest(prefix, storage_options)
            item.update(complete=True, rows=m["rows"], bytes=m["bytes"], key=m["key"])
        except CacheIncomplete:
            shards = existing_shards(prefix, storage_options)
            item.update(complete=False, shards_done=len(shards))
        out.append(item)
    return out


def verify_cache(prefix: str, storage_options=None) -> dict[str, Any]:
    """Check that every shard of the manifest exists with its recorded row count and size; raise ``ValueError``
    naming the first problem."""
    manifest = read_manifest(prefix, storage_options)
    total = 0
    for shard in manifest["shards"]:
        fs, path = filesystem(shard["uri"], storage_options)
        if not fs.exists(path):
            raise ValueError(f"{shard['uri']}: listed in the manifest but missing")
        size = fs.size(path)
        if size != shard["bytes"]:
            raise ValueError(f"{shard['uri']}: {size} bytes, manifest says {shard['bytes']}")
        n = shard_rows(shard["uri"], storage_options)
        if n != shard["rows"]:
            raise ValueError(f"{shard['uri']}: {n} rows, manifest says {shard['rows']}")
        total += n
    if total != manifest["rows"]:
        raise ValueError(f"{prefix}: {total} rows in shards, manifest says {manifest['rows']}")
    return {"uri": prefix, "shards": len(manifest["shards"]), "rows": total, "bytes": manifest["bytes"]}
