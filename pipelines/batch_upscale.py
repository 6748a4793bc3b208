"""``oftsr upscale``: images from folders, ``s3://`` prefixes or a manifest, 4x PNGs out, at one or more knob values.

Two engines, one result:

* **local** (a handful of local files): one process, no cluster start;
* **ray**: a streaming Ray Data pipeline: the listing -> fetch + decode (CPU tasks) -> the one-step student in an actor
  pool (the model is loaded once per actor; ``--workers``, ``--gpus-per-worker``, ``--batch-size``) -> PNG encode +
  write (CPU tasks). Blocks stream through: memory stays bounded whatever the number of inputs (the driver holds the
  listing and the counts).

Either way each output is ``DEST/<path of the input below its source, without extension>_t<t>.png``, written
atomically (a temporary file renamed, or one object PUT), so an output that exists is complete: a rerun skips the
images whose outputs all exist (``--force`` recomputes them). A bad input (unreadable, not an image, too many
pixels, corrupt) is skipped and counted by reason, never fatal to the run. The run ends with a summary (images
done, already done, skipped by reason, images/s) that is also written to ``DEST/_upscale_report.json``. Each image's
start noise comes from its own seed (``--seed`` and its relative path), so the two engines and any number of
workers give the same pixels.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from pipelines.data.decode import DEFAULT_MAX_PIXELS, DecodeError
from pipelines.data.manifest import IMAGE_EXTENSIONS, list_images, read_manifest
from pipelines.data.storage import filesystem, join_uri, protocol_of

REPORT = "_upscale_report.json"
#: At most this many pending local images run in the local engine when ``engine="auto"``.
LOCAL_LIMIT = 16


@dataclasses.dataclass(frozen=True)
class UpscaleJob:
    """What ``oftsr upscale`` runs (see the module docstring)."""

    sources: tuple[str, ...]
    dest: str
    knobs: tuple[float, ...] = (0.5,)
    model: str = "models:/oftsr-student@champion"
    tracking_uri: str | None = None
    engine: str = "auto"  # auto | local | ray
    workers: int = 0  # ray: actors (0: one per GPU, or 2 on CPU)
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    batch_size: int = 4  # images per actor call
    tile: int = 0  # HR tile (0: the model's training crop)
    seed: int = 0
    device: str = "cpu"  # local engine
    force: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    storage_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        from oftsr.infer import check_knob

        if not self.sources:
            raise ValueError("upscale: give at least one input (file, folder, s3:// prefix or manifest .parquet)")
        if not self.knobs:
            raise ValueError("upscale: give at least one knob value --t")
        for t in self.knobs:
            check_knob(t)
        if self.engine not in ("auto", "local", "ray"):
            raise ValueError(f"--engine must be auto, local or ray, got {self.engine!r}")
        if self.batch_size < 1 or self.workers < 0 or self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ValueError("--batch-size must be >= 1, --workers >= 0, --gpus-per-worker >= 0, CPUs per worker > 0")


def knob_name(t: float) -> str:
    """``0`` -> ``0``, ``0.5`` -> ``0.5``, ``1.0`` -> ``1``: the ``t`` part of an output name."""
    return f"{float(t):g}"


def output_rel(rel: str, t: float) -> str:
    """The output's path below DEST for the input at ``rel`` (below its source) and knob ``t``."""
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    return f"{stem}_t{knob_name(t)}.png"


def image_seed(seed: int, rel: str) -> int:
    return zlib.crc32(f"{seed}:{rel}".encode())


def list_inputs(sources: tuple[str, ...], storage_options=None) -> list[dict[str, str]]:
    """``[{"key": URI, "rel": path below its source}]`` for every image of every source, in order; a source is a
    file, a folder or prefix (every image below it, any depth), or a manifest (``.parquet``: its keys, named below
    their common folder). Errors name the source."""
    rows: list[dict[str, str]] = []
    for source in sources:
        fs, path = filesystem(source, storage_options)
        if source.endswith(".parquet"):
            keys = [r["key"] for r in read_manifest(source, storage_options)]
            common = os.path.commonpath([k.split("://", 1)[-1].rsplit("/", 1)[0] for k in keys]) if keys else ""
            for k in keys:
                bare = k.split("://", 1)[-1]
                rows.append({"key": k, "rel": bare[len(common) :].lstrip("/") if common else bare})
            continue
        if not fs.exists(path):
            raise FileNotFoundError(f"input not found: {source}")
        if fs.isfile(path):
            rows.append({"key": join_uri(source, path), "rel": path.rsplit("/", 1)[-1]})
            continue
        found = list_images(source, storage_options)
        if not found:
            raise FileNotFoundError(f"no images in {source} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        root = path.rstrip("/") + "/"
        for r in found:
            bare = r["key"].split("://", 1)[-1] if protocol_of(source) != "file" else r["key"]
            rows.append(
                {"key": r["key"], "rel": bare[len(root) :] if bare.startswith(root) else bare.rsplit("/", 1)[-1]}
            )
    return rows


def existing_outputs(dest: str, storage_options=None) -> set[str]:
    """The paths below ``dest`` that exist (complete outputs: they are written atomically)."""
    fs, path = filesystem(dest, storage_options)
    if not fs.exists(path):
        return set()
    root = path.rstrip("/") + "/"
    return {p[len(root) :] for p in fs.find(path) if p.startswith(root)}


def write_bytes_atomically(uri: str, data: bytes, storage_options=None) -> None:
    """Write ``data`` to ``uri`` so that readers see nothing or all of it."""
    fs, path = filesystem(uri, storage_options)
    if protocol_of(uri) == "file":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:  # one PUT (or a multipart upload completed at close): the object appears whole
        with fs.open(path, "wb") as f:
            f.write(data)


def encode_png(hr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(hr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class Student:
    """The registered student, loaded once: ``__call__(lr uint8 (h, w, 3), rel)`` gives one HR uint8
    ``(h sf, w sf, 3)`` per knob value."""

    def __init__(self, model: str, tracking_uri: str | None, knobs, tile: int, seed: int, device: str):
        import torch

        from oftsr.engine import fast_student
        from pipelines.registry import load_model, require_kind

        net, meta = load_model(model, tracking_uri=tracking_uri)
        require_kind(model, meta, "student", "upscale needs the one-step student")
        self.meta, self.knobs, self.seed = meta, tuple(knobs), seed
        self.device = torch.device(device)
        self.net = fast_student(net, self.device)  # CUDA: bf16, compiled, CUDA graphs; CPU: all cores
        self.tile = tile or int(meta.get("crop", 256))
        self.sf = int(meta["sf"])

    def __call__(self, lr: np.ndarray, rel: str) -> list[np.ndarray]:
        import torch

        from oftsr.conventions import image_to_uint8, uint8_to_image
        from oftsr.flow import noise_from_seed
        from oftsr.infer import TRAINED_RANGE, upscale

        m = self.meta
        x = uint8_to_image(torch.from_numpy(np.ascontiguousarray(lr)).permute(2, 0, 1))[None].to(self.device)
        shape = (3, lr.shape[0] * self.sf, lr.shape[1] * self.sf)
        noise = noise_from_seed(shape, image_seed(self.seed, rel), device=self.device)[None]  # same on any device
        outs = []
        for t in self.knobs:
            hr = upscale(
                self.net,
                x,
                t,
                sigma_p=float(m["sigma_p"]),
                sf=self.sf,
                kind=m["degradation"],
                tile=self.tile,
                overlap=self.tile // 4,
                noise=noise,
                trained=(float(m.get("t_min", TRAINED_RANGE[0])), float(m.get("t_max", TRAINED_RANGE[1]))),
            )
            outs.append(image_to_uint8(hr[0]).permute(1, 2, 0).cpu().numpy())
        return outs


class Tally:
    """Counts, the progress line and the report."""

    def __init__(self, job: UpscaleJob, total: int, already: int, engine: str, log: Callable[[str], None]):
        self.job, self.total, self.already, self.engine, self.log = job, total, already, engine, log
        self.done, self.outputs, self.reasons, self.items = 0, 0, Counter(), []
        self.started = time.perf_counter()
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def add(self, key: str, error: str | None, reason: str | None, outputs: int) -> None:
        if error:
            self.reasons[reason or "error"] += 1
            if len(self.items) < 1000:
                self.items.append(error)
        else:
            self.done += 1
            self.outputs += outputs
        self.progress()

    def progress(self, final: bool = False) -> None:
        now = time.perf_counter()
        if not final and now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        seen = self.done + sum(self.reasons.values())
        rate = self.done / max(now - self.started, 1e-9)
        eta = (self.total - seen) / rate if rate > 0 else float("nan")
        line = f"upscale: {seen}/{self.total} images ({self.done} done, {sum(self.reasons.values())} skipped)"
        line += f", {rate:.2f} images/s" + (f", ETA {eta:.0f} s" if not final and eta == eta else "")
        if self.tty and not final:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        else:
            print(("\r" if self.tty else "") + line, file=sys.stderr, flush=True)

    def report(self, model: str) -> dict[str, Any]:
        seconds = time.perf_counter() - self.started
        return {
            "sources": list(self.job.sources),
            "dest": self.job.dest,
            "model": model,
            "knobs": list(self.job.knobs),
            "engine": self.engine,
            "images_listed": self.total + self.already,
            "images_done": self.done,
            "images_already_done": self.already,
            "images_skipped": sum(self.reasons.values()),
            "skipped_by_reason": dict(self.reasons),
            "skipped": self.items,
            "outputs_written": self.outputs,
            "seconds": round(seconds, 3),
            "images_per_s": round(self.done / seconds, 4) if seconds > 0 else None,
        }


def run(job: UpscaleJob, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``job``; returns the report (also written to ``DEST/_upscale_report.json``)."""
    from pipelines.registry import pin_model_uri

    fs, dest_path = filesystem(job.dest, job.storage_options)
    if fs.isfile(dest_path):
        raise ValueError(f"output {job.dest} is a file, not a folder or prefix")
    dest_existed = fs.exists(dest_path)
    rows = list_inputs(job.sources, job.storage_options)
    have = set() if job.force else existing_outputs(job.dest, job.storage_options)
    pending = [r for r in rows if not all(output_rel(r["rel"], t) in have for t in job.knobs)]
    already = len(rows) - len(pending)
    local = all(protocol_of(s) == "file" for s in (*job.sources, job.dest))
    engine = job.engine
    if engine == "auto":
        engine = "local" if local and len(pending) <= LOCAL_LIMIT else "ray"
    model = job.model
    if engine == "ray" and pending and model.startswith(("models:/", "runs:/")):
        model, _ = pin_model_uri(model, tracking_uri=job.tracking_uri)  # every actor loads the same version
    log(
        f"upscale: {len(rows)} images listed, {already} already done, {len(pending)} to do at t = "
        f"{', '.join(knob_name(t) for t in job.knobs)} ({engine} engine, model {model})"
    )
    tally = Tally(job, len(pending), already, engine, log)
    if pending:
        (_run_local if engine == "local" else _run_ray)(job, model, pending, tally)
    tally.progress(final=True)
    report = tally.report(model)
    if report["outputs_written"] or dest_existed:  # no folder made for the report of a run that wrote nothing
        write_bytes_atomically(
            join_uri(job.dest, dest_path.rstrip("/") + "/" + REPORT),
            json.dumps(report, indent=2).encode(),
            job.storage_options,
        )
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(report["skipped_by_reason"].items()))
    log(
        f"upscale: {report['images_done']} images done ({report['outputs_written']} outputs), "
        f"{already} already done, {report['images_skipped']} skipped{f' ({reasons})' if reasons else ''}; "
        f"{report['images_per_s'] or 0:.2f} images/s; report {job.dest.rstrip('/')}/{REPORT}"
    )
    for item in report["skipped"][:20]:
        log(f"  skipped {item}")
    return report


def _fetch(key: str, job: UpscaleJob) -> np.ndarray:
    from pipelines.data.transforms import fetch_image

    return fetch_image(key, job.storage_options, max_pixels=job.max_pixels)


def _write_outputs(job: UpscaleJob, rel: str, images: list[np.ndarray]) -> int:
    root = filesystem(job.dest, job.storage_options)[1].rstrip("/")
    for t, hr in zip(job.knobs, images, strict=True):
        write_bytes_atomically(join_uri(job.dest, f"{root}/{output_rel(rel, t)}"), encode_png(hr), job.storage_options)
    return len(images)


def _reason(err: BaseException) -> str:
    if isinstance(err, DecodeError):
        return err.reason
    if isinstance(err, PermissionError):
        return "unreadable"
    return type(err).__name__


def _run_local(job: UpscaleJob, model: str, pending: list[dict[str, str]], tally: Tally) -> None:
    student = Student(model, job.tracking_uri, job.knobs, job.tile, job.seed, job.device)
    for r in pending:
        try:
            lr = _fetch(r["key"], job)
        except (DecodeError, OSError) as err:
            tally.add(r["key"], str(err) if r["key"] in str(err) else f"{r['key']}: {err}", _reason(err), 0)
            continue
        tally.add(r["key"], None, None, _write_outputs(job, r["rel"], student(lr, r["rel"])))


class _Decode:
    """Ray Data CPU task: fetch + decode, or the reason it failed."""

    def __init__(self, job: UpscaleJob):
        self.job = job

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        images, errors, reasons = [], [], []
        for key in batch["key"]:
            try:
                images.append(np.ascontiguousarray(_fetch(str(key), self.job)))
                errors.append("")
                reasons.append("")
            except (DecodeError, OSError) as err:
                images.append(np.zeros((1, 1, 3), np.uint8))
                errors.append(str(err) if str(key) in str(err) else f"{key}: {err}")
                reasons.append(_reason(err))
        return {"key": batch["key"], "rel": batch["rel"], "lr": _ragged(images), "error": errors, "reason": reasons}


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


class _Upscale:
    """Ray Data actor: the student loaded once per actor."""

    def __init__(self, job: UpscaleJob, model: str):
        import torch

        device = "cuda" if job.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        self.student = Student(model, job.tracking_uri, job.knobs, job.tile, job.seed, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        outs: list[list[np.ndarray]] = [[] for _ in self.student.knobs]
        for lr, rel, error in zip(batch["lr"], batch["rel"], batch["error"], strict=True):
            hrs = self.student(lr, str(rel)) if not error else [np.zeros((1, 1, 3), np.uint8)] * len(outs)
            for k, hr in enumerate(hrs):
                outs[k].append(hr)
        columns = {f"hr{k}": _ragged(images) for k, images in enumerate(outs)}
        return {"key": batch["key"], "rel": batch["rel"], "error": batch["error"], "reason": batch["reason"], **columns}


class _Write:
    """Ray Data CPU task: PNG encode + atomic write."""

    def __init__(self, job: UpscaleJob):
        self.job = job

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        written = []
        for i, (rel, error) in enumerate(zip(batch["rel"], batch["error"], strict=True)):
            if error:
                written.append(0)
                continue
            images = [batch[f"hr{k}"][i] for k in range(len(self.job.knobs))]
            written.append(_write_outputs(self.job, str(rel), images))
        return {"key": batch["key"], "error": batch["error"], "reason": batch["reason"], "written": written}


def _run_ray(job: UpscaleJob, model: str, pending: list[dict[str, str]], tally: Tally) -> None:
    import ray

    from pipelines.raycluster import ensure_ray

    ensure_ray()
    gpus, resources = job.gpus_per_worker, ray.cluster_resources()
    if job.workers:
        workers = job.workers
    elif gpus:  # one actor per GPU share
        workers = max(1, int(resources.get("GPU", 0) // gpus))
    else:  # leave CPUs to the decode and write tasks
        workers = max(1, int(resources.get("CPU", 1) // (job.cpus_per_worker + 1)))
    ds = ray.data.from_items(pending, override_num_blocks=max(1, min(len(pending), 4 * workers * 4)))
    pool = ray.data.ActorPoolStrategy
    ds = ds.map_batches(
        _Decode, fn_constructor_args=(job,), batch_size=job.batch_size, num_cpus=0.25, compute=pool(size=2)
    )
    ds = ds.map_batches(
        _Upscale,
        fn_constructor_args=(job, model),
        batch_size=job.batch_size,
        num_gpus=gpus,
        num_cpus=job.cpus_per_worker,
        compute=pool(size=workers),
    )
    ds = ds.map_batches(
        _Write, fn_constructor_args=(job,), batch_size=job.batch_size, num_cpus=0.25, compute=pool(size=2)
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key, error, reason, written in zip(
            batch["key"], batch["error"], batch["reason"], batch["written"], strict=True
        ):
            tally.add(str(key), str(error) or None, str(reason) or None, int(written))


__all__ = ["REPORT", "UpscaleJob", "list_inputs", "output_rel", "run"]
