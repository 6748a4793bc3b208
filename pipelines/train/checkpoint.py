"""Training checkpoints: weights as safetensors, the rest (optimizer, counters, RNG) as a ``weights_only`` torch
file, every file's SHA-256 in ``checksums.json`` (written last) and verified on load.

Layout of a checkpoint folder::

    model.safetensors   ema.safetensors   state.pt   unet.json   stage.json   checksums.json
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from oftsr.nets import UNetConfig, save_weights
from pipelines.data.storage import filesystem, join_uri, protocol_of

FILES = ("model.safetensors", "ema.safetensors", "state.pt", "unet.json", "stage.json")


class CheckpointCorrupt(ValueError):
    """A checkpoint file is missing or does not match its recorded checksum."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(
    folder: str | os.PathLike,
    *,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    unet: UNetConfig,
    state: dict[str, Any],
    stage: dict[str, Any],
) -> Path:
    """Write a checkpoint into ``folder``; ``state`` holds tensors, numbers and plain containers only."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(model, folder / "model.safetensors")
    save_weights(ema, folder / "ema.safetensors")
    torch.save(state, folder / "state.pt")
    (folder / "unet.json").write_text(json.dumps(unet.to_dict(), indent=2))
    (folder / "stage.json").write_text(json.dumps(stage, indent=2, default=str))
    sums = {name: _sha256(folder / name) for name in FILES}
    tmp = folder / "checksums.json.tmp"
    tmp.write_text(json.dumps(sums, indent=2))
    os.replace(tmp, folder / "checksums.json")
    return folder


def verify_checkpoint(folder: str | os.PathLike) -> None:
    folder = Path(folder)
    sums_file = folder / "checksums.json"
    if not sums_file.is_file():
        raise CheckpointCorrupt(f"{folder}: no checksums.json (incomplete checkpoint)")
    sums = json.loads(sums_file.read_text())
    for name in FILES:
        path = folder / name
        if not path.is_file():
            raise CheckpointCorrupt(f"{path}: missing")
        if _sha256(path) != sums.get(name):
            raise CheckpointCorrupt(f"{path}: checksum mismatch (corrupt or partially written)")


def load_checkpoint(folder: str | os.PathLike, *, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify and read a checkpoint: ``{"model", "ema", "state", "unet", "stage"}``."""
    folder = Path(folder)
    verify_checkpoint(folder)
    return {
        "model": load_file(str(folder / "model.safetensors"), device=str(device)),
        "ema": load_file(str(folder / "ema.safetensors"), device=str(device)),
        "state": torch.load(folder / "state.pt", map_location=device, weights_only=True),
        "unet": UNetConfig.from_dict(json.loads((folder / "unet.json").read_text())),
        "stage": json.loads((folder / "stage.json").read_text()),
    }


def latest_checkpoint(fs, path: str) -> str:
    """``path`` itself when it is a checkpoint, else its newest complete ``checkpoint_*`` sub-folder (a Ray Train
    run folder)."""
    path = path.rstrip("/")
    if fs.exists(f"{path}/checksums.json"):
        return path
    if not fs.isdir(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    candidates = sorted(
        (e for e in fs.ls(path, detail=False) if e.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_")),
        reverse=True,
    )
    for c in candidates:
        if fs.exists(f"{c.rstrip('/')}/checksums.json"):
            return c.rstrip("/")
    raise FileNotFoundError(f"no complete checkpoint under {path}")


def local_copy(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[Path, bool]:
    """A local folder holding the checkpoint at ``uri`` (a checkpoint folder, or a run folder whose latest
    checkpoint is taken), downloaded to a temporary folder when remote. Returns ``(path, is_temporary)``.
    """
    fs, path = filesystem(uri, storage_options)
    path = latest_checkpoint(fs, path)
    if protocol_of(uri) == "file":
        return Path(path), False
    tmp = Path(tempfile.mkdtemp(prefix="oftsr-ckpt-"))
    try:
        for name in (*FILES, "checksums.json"):
            fs.get(f"{path.rstrip('/')}/{name}", str(tmp / name))
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, True


def resolve_checkpoint(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """The URI of the checkpoint ``uri`` names: itself, or a run folder's newest complete checkpoint."""
    fs, path = filesystem(uri, storage_options)
    return join_uri(uri, latest_checkpoint(fs, path))


def read_checkpoint(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`load_checkpoint` for a local folder or an object-storage URI (a run folder: its latest checkpoint);
    a remote checkpoint is downloaded to a temporary folder that is removed afterwards."""
    path, temporary = local_copy(uri, storage_options)
    try:
        return load_checkpoint(path)
    finally:
        if temporary:
            shutil.rmtree(path, ignore_errors=True)


def load_teacher(
    uri: str, storage_options: dict[str, Any] | None = None, tracking_uri: str | None = None
) -> tuple[UNetConfig, dict[str, torch.Tensor]]:
    """The EMA weights and network config of a teacher checkpoint (local folder or object-storage URI), or of a
    registered teacher (``models:/NAME@ALIAS``, ``models:/NAME/N``, ``runs:/...``: trained or imported)."""
    if uri.startswith(("models:/", "runs:/")):
        from pipelines.registry import load_model, require_kind

        net, meta = load_model(uri, tracking_uri=tracking_uri)
        require_kind(uri, meta, "teacher", "a teacher is needed here")
        return net.config, net.state_dict()
    ckpt = read_checkpoint(uri, storage_options)
    return ckpt["unet"], ckpt["ema"]
