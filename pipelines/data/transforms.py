"""Batch transforms for ``Dataset.map_batches`` (numpy batches in and out, torch CPU ops inside): fetch, decode,
crop, flip and degrade several images per call. Ray-free, so they run and test in a plain process too.

Output columns: ``key`` (source URI), ``box`` ``(N, 6)`` int32 ``[top, left, height, width, hflip, vflip]``, ``hr`` and
``x_lr`` ``(N, 3, crop, crop)`` in [-1, 1] as float16/float32, and ``lr`` when ``keep_lr``. With the realesrgan
degradation and ``degrade_on="worker"``, ``hr`` is the region to degrade and ``seed`` (int64) replaces ``x_lr``: the
training worker degrades the batch on its device (:func:`degrade_on_worker`). Objects that cannot be
used are skipped and reported to a ledger with their key and reason; they never fail the batch.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any, Protocol

import numpy as np
import torch

from oftsr.augment import CropBox, center_box, random_box
from oftsr.conventions import uint8_to_image
from oftsr.degrade import degrade
from oftsr.realesrgan import RealESRGANSettings, realesrgan
from pipelines.data.config import DataConfig
from pipelines.data.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from pipelines.data.storage import StorageError, filesystem, read_bytes


class Ledger(Protocol):
    def record(self, seen: int, skipped: list[tuple[str, str]]) -> None: ...


class TooManyBadImages(RuntimeError):
    """More than the configured fraction of objects could not be used."""


class LocalLedger:
    """Counts objects seen and skipped in one process; raises past ``max_fraction``."""

    def __init__(self, max_fraction: float = 1.0, min_seen: int = 0):
        self.max_fraction, self.min_seen = max_fraction, min_seen
        self.seen, self.skipped = 0, []

    def record(self, seen: int, skipped: list[tuple[str, str]]) -> None:
        self.seen += seen
        self.skipped.extend(skipped)
        check_fraction(self.seen, len(self.skipped), self.max_fraction, self.min_seen, self.skipped)

    def summary(self) -> dict[str, Any]:
        return summarise(self.seen, self.skipped)


def check_fraction(seen: int, bad: int, max_fraction: float, min_seen: int, skipped: list[tuple[str, str]]) -> None:
    if seen >= min_seen and seen and bad / seen > max_fraction:
        examples = "; ".join(f"{k}: {r}" for k, r in skipped[:3])
        raise TooManyBadImages(
            f"{bad} of {seen} objects unusable ({bad / seen:.1%} > max_bad_fraction {max_fraction:.1%}); "
            f"e.g. {examples}"
        )


def summarise(seen: int, skipped: list[tuple[str, str]], limit: int = 100) -> dict[str, Any]:
    reasons: dict[str, int] = {}
    for _, reason in skipped:
        reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "seen": seen,
        "skipped": len(skipped),
        "reasons": reasons,
        "items": [{"key": k, "reason": r} for k, r in skipped[:limit]],
    }


def _key_seed(seed: int, key: str, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{key}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class _Transform:
    def __init__(self, cfg: DataConfig, ledger: Ledger | None = None):
        self.cfg = cfg
        self.ledger = ledger if ledger is not None else LocalLedger(cfg.max_bad_fraction, cfg.min_seen_for_fraction)

    def _decode(self, key: str, data: bytes | None) -> np.ndarray:
        cfg = self.cfg
        return fetch_image(key, cfg.storage_options, retries=cfg.read_retries, max_pixels=cfg.max_pixels, data=data)

    def _boxes(self, key: str, height: int, width: int) -> list[CropBox]:
        raise NotImplementedError

    def _noise_generator(self, key: str) -> torch.Generator:
        raise NotImplementedError

    def _degradation_seed(self, key: str, index: int) -> int:
        """The seed of the ``index``-th crop of ``key``'s realesrgan chain."""
        raise NotImplementedError

    def _settings(self) -> RealESRGANSettings:
        return self.cfg.realesrgan

    def _seeds(self, keys: list[str]) -> list[int]:
        seen: dict[str, int] = {}
        out = []
        for k in keys:
            out.append(self._degradation_seed(k, seen.get(k, 0)))
            seen[k] = seen.get(k, 0) + 1
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["key"]]
        blobs = batch.get("bytes")
        keys_out, boxes, crops, skipped = [], [], [], []
        for i, key in enumerate(keys):
            try:
                img = self._decode(key, None if blobs is None else bytes(blobs[i]))
                chosen = self._boxes(key, img.shape[0], img.shape[1])
            except DecodeError as err:
                skipped.append((key, err.reason))
                continue
            except StorageError:  # storage is down: not the object's fault, so the stage stops here
                raise
            for box in chosen:
                keys_out.append(key)
                boxes.append([box.top, box.left, box.size, box.width, int(box.hflip), int(box.vflip)])
                crops.append(crop_array(img, box))
        self.ledger.record(len(keys), skipped)
        return self._finish(keys_out, boxes, crops)

    def _finish(self, keys: list[str], boxes: list[list[int]], crops: list[torch.Tensor]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        dtype = np.float16 if cfg.dtype == "float16" else np.float32
        on_worker = cfg.seeded and cfg.degrade_on == "worker"
        if not crops:
            s, lr_s = cfg.crop, cfg.crop // cfg.sf
            out = {"key": np.array([], dtype=object), "box": np.zeros((0, 6), np.int32)}
            if on_worker:
                return {**out, "hr": np.zeros((0, 3, cfg.region, cfg.region), dtype), "seed": np.zeros(0, np.int64)}
            out |= {"hr": np.zeros((0, 3, s, s), dtype), "x_lr": np.zeros((0, 3, s, s), dtype)}
            if cfg.keep_lr:
                out["lr"] = np.zeros((0, 3, lr_s, lr_s), dtype)
            return out
        if len({c.shape for c in crops}) > 1:  # full images of different sizes: one at a time, ragged columns
            parts = [self._finish([k], [b], [c]) for k, b, c in zip(keys, boxes, crops, strict=True)]
            ragged = {name: _object_array([p[name][0] for p in parts]) for name in parts[0] if name != "box"}
            return {**ragged, "box": np.asarray(boxes, dtype=np.int32)}
        hr = uint8_to_image(torch.stack(crops))
        if on_worker:
            seeds = np.asarray(self._seeds(keys), dtype=np.int64)
            return {
                "key": np.array(keys, dtype=object),
                "box": np.asarray(boxes, np.int32),
                "hr": hr.numpy().astype(dtype),
                "seed": seeds,
            }
        if cfg.seeded:
            hr, lr, x_lr = realesrgan(hr, self._seeds(keys), cfg.sf, self._settings())
        elif cfg.sigma_y > 0:  # per-sample noise so that each crop's degradation does not depend on its batch
            pairs = [
                degrade(hr[i : i + 1], cfg.sf, cfg.degradation, cfg.sigma_y, self._noise_generator(k))
                for i, k in enumerate(keys)
            ]
            lr, x_lr = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        else:
            lr, x_lr = degrade(hr, cfg.sf, cfg.degradation)
        out = {
            "key": np.array(keys, dtype=object),
            "box": np.asarray(boxes, dtype=np.int32),
            "hr": hr.numpy().astype(dtype),
            "x_lr": x_lr.numpy().astype(dtype),
        }
        if cfg.keep_lr:
            out["lr"] = lr.numpy().astype(dtype)
        return out


def fetch_image(
    key: str,
    storage_options: dict[str, Any] | None = None,
    *,
    retries: int = 4,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    data: bytes | None = None,
) -> np.ndarray:
    """Read the object ``key`` (unless ``data`` is given) and decode it to ``(H, W, 3)`` uint8. A missing object
    raises :class:`DecodeError` with reason ``missing``; storage failures past the retries raise ``StorageError``."""
    if data is None:
        fs, path = filesystem(key, storage_options)  # fsspec caches the instance
        try:
            data = read_bytes(fs, path, key=key, retries=retries)
        except FileNotFoundError as err:
            raise DecodeError(key, "missing", str(err)) from err
    return decode_image(data, key, max_pixels=max_pixels)


def crop_array(img: np.ndarray, box: CropBox) -> torch.Tensor:
    """``(H, W, 3)`` uint8 to the ``(3, h, w)`` crop of ``box`` (same result as :func:`oftsr.augment.apply_box`),
    copying only the crop."""
    out = img[box.top : box.top + box.size, box.left : box.left + box.width]
    if box.hflip:
        out = out[:, ::-1]
    if box.vflip:
        out = out[::-1]
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)


def _object_array(items: list[Any]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


class TrainTransform(_Transform):
    """Random crops (``crops_per_image`` per object) with flips. Randomness comes from OS entropy on every call,
    or, when ``cfg.seed`` is set, from ``(seed, key)`` alone (the same crop of a key every epoch)."""

    def _gen(self, key: str, index: int) -> torch.Generator:
        seed = secrets.randbits(63) if self.cfg.seed is None else _key_seed(self.cfg.seed, key, index)
        return torch.Generator().manual_seed(seed)

    def _boxes(self, key: str, height: int, width: int) -> list[CropBox]:
        cfg = self.cfg
        size = cfg.region
        if height < size or width < size:
            raise DecodeError(key, "too-small", f"{height}x{width} < crop {size}")
        gen = self._gen(key, 0)
        return [
            random_box(height, width, size, p_hflip=cfg.p_hflip, p_vflip=cfg.p_vflip, generator=gen)
            for _ in range(cfg.crops_per_image)
        ]

    def _noise_generator(self, key: str) -> torch.Generator:
        return self._gen(key, 1)

    def _degradation_seed(self, key: str, index: int) -> int:
        return secrets.randbits(62) if self.cfg.seed is None else _key_seed(self.cfg.seed, key, 100 + index)


class EvalTransform(_Transform):
    """Deterministic evaluation images: the centre ``crop`` of every image, or with ``full=True`` the whole image
    cropped (centred) to the largest size divisible by ``multiple`` (default ``sf``); no flips; measurement noise
    seeded by ``(seed, key)``. Full images of different sizes come out as ragged (object) columns."""

    def __init__(self, cfg: DataConfig, ledger: Ledger | None = None, *, full: bool = False, multiple: int = 0):
        super().__init__(cfg, ledger)
        self.full = full
        self.multiple = multiple or cfg.sf
        if self.multiple % cfg.sf:
            raise ValueError(f"EvalTransform multiple {self.multiple} must be a multiple of sf={cfg.sf}")

    def _boxes(self, key: str, height: int, width: int) -> list[CropBox]:
        if self.full:
            h, w = height - height % self.multiple, width - width % self.multiple
            if h == 0 or w == 0:
                raise DecodeError(key, "too-small", f"{height}x{width} < {self.multiple}")
            return [CropBox((height - h) // 2, (width - w) // 2, h, size_w=w)]
        if height < self.cfg.crop or width < self.cfg.crop:
            raise DecodeError(key, "too-small", f"{height}x{width} < crop {self.cfg.crop}")
        return [center_box(height, width, self.cfg.crop)]

    def _noise_generator(self, key: str) -> torch.Generator:
        return torch.Generator().manual_seed(_key_seed(self.cfg.seed or 0, key, 1))

    def _degradation_seed(self, key: str, index: int) -> int:
        return _key_seed(self.cfg.seed or 0, key, 100 + index)

    def _settings(self) -> RealESRGANSettings:
        return self.cfg.realesrgan.on_crops()  # the HR crop is the reference: no sharpening, no paired crop


def degrade_on_worker(cfg: DataConfig, batch: dict[str, Any]) -> dict[str, Any]:
    """A batch of ``degrade_on="worker"`` (HR regions and their seeds, tensors on the worker's device) degraded there:
    the same ``hr``/``x_lr``[/``lr``] columns as the CPU tasks give, computed in batched torch on that device."""
    seeds = [int(s) for s in batch["seed"].tolist()]
    hr, lr, x_lr = realesrgan(batch["hr"], seeds, cfg.sf, cfg.realesrgan)
    out = {**batch, "hr": hr, "x_lr": x_lr}
    if cfg.keep_lr:
        out["lr"] = lr
    return out
