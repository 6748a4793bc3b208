"""Image manifests: a Parquet file of keys (full URIs) and sizes, so that a stage never lists millions of keys
through Ray's file readers. ``oftsr manifest URI -o manifest.parquet`` builds one, listing sub-prefixes in
parallel threads.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.storage import filesystem, join_uri, protocol_of

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
SCHEMA = pa.schema([("key", pa.string()), ("size", pa.int64())])


def _is_image(path: str, extensions: Sequence[str]) -> bool:
    return path.lower().endswith(tuple(extensions))


def list_images(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    workers: int = 16,
) -> list[dict[str, Any]]:
    """All objects under ``uri`` whose name ends in an image extension, as ``{"key": URI, "size": bytes}``, sorted.

    The top level is listed once; each sub-prefix is then listed recursively in its own thread.
    """
    fs, root = filesystem(uri, storage_options)
    if not fs.exists(root):
        raise FileNotFoundError(f"no such folder or prefix: {uri}")
    if fs.isfile(root):
        entries = [fs.info(root)]
        prefixes: list[str] = []
    else:
        top = fs.ls(root, detail=True)
        entries = [e for e in top if e["type"] != "directory"]
        prefixes = [e["name"] for e in top if e["type"] == "directory"]

    def walk(prefix: str) -> list[dict[str, Any]]:
        return list(fs.find(prefix, detail=True).values())

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for found in pool.map(walk, prefixes):
            entries.extend(found)
    rows = [
        {"key": join_uri(uri, e["name"]), "size": int(e.get("size") or 0)}
        for e in entries
        if _is_image(e["name"], extensions)
    ]
    return sorted(rows, key=lambda r: r["key"])


def write_manifest(
    rows: Sequence[Mapping[str, Any]], out: str, storage_options: Mapping[str, Any] | None = None
) -> str:
    """Write rows to a Parquet manifest at ``out`` (local or object storage), atomically where the store allows."""
    table = pa.Table.from_pylist([{"key": r["key"], "size": int(r.get("size", 0))} for r in rows], schema=SCHEMA)
    fs, path = filesystem(out, storage_options)
    if protocol_of(out) == "file":
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = path + ".tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    else:  # an object PUT is atomic: readers see the old object or the whole new one
        with fs.open(path, "wb") as f:
            pq.write_table(table, f)
    return out


def read_manifest(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows of a manifest; a file without a ``key`` column is refused naming it."""
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    if "key" not in table.column_names:
        raise ValueError(f"manifest {uri} has no 'key' column (columns: {table.column_names})")
    if "size" not in table.column_names:
        table = table.append_column("size", pa.array([0] * table.num_rows, pa.int64()))
    return table.select(["key", "size"]).to_pylist()


def manifest_hash(rows: Sequence[Mapping[str, Any]]) -> str:
    """A short content hash of the keys and sizes (order-independent): keys caches and MLflow tags."""
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r["key"]):
        h.update(f"{r['key']}\t{int(r.get('size', 0))}\n".encode())
    return h.hexdigest()[:16]
