"""``oftsr run RECIPE``: data -> teacher -> trajectories (cached targets only) -> distill -> evaluate -> register,
one parent MLflow run with a nested run per stage. A stage whose output exists is reused (a finished checkpoint,
a finished cache, a registered model of this pipeline), so the whole pipeline resumes after an interruption.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from oftsr.augment import random_box
from oftsr.conventions import uint8_to_image
from oftsr.evaluation import knob_tradeoff, knob_trend, shard_bounds, strip, write_report
from pipelines.data.decode import DecodeError
from pipelines.data.manifest import list_images
from pipelines.data.storage import filesystem, join_uri
from pipelines.data.transforms import crop_array, fetch_image
from pipelines.evaluation import evaluate_distributed
from pipelines.tracking import TrackingConfig, run_key
from pipelines.train.config import StageConfig
from pipelines.tree import EvalConfig, PipelineConfig


def _finished(cfg: StageConfig) -> str | None:
    """The final checkpoint of a stage that already reached its target, else ``None``."""
    from pipelines.train.checkpoint import read_checkpoint, resolve_checkpoint

    options = cfg.data.storage_options
    try:
        uri = resolve_checkpoint(f"{cfg.storage_path.rstrip('/')}/{cfg.run_name}", options)
        state = read_checkpoint(uri, options)["state"]
    except (FileNotFoundError, ValueError):
        return None
    return uri if int(state["images_seen"]) >= cfg.total_images else None


def held_out_crops(cfg: EvalConfig, storage_options=None) -> tuple[torch.Tensor, list[str]]:
    """``(N, 3, crop, crop)`` HR crops in [-1, 1] at positions fixed by ``(seed, name, index)``, where ``name`` is the
    image's path below ``source``: the same photos give the same crops wherever they are stored (another checkout,
    a bucket). Unusable images are skipped and named."""
    rows = list_images(cfg.source, storage_options)[: cfg.max_images]
    _, root = filesystem(cfg.source, storage_options)
    prefix = join_uri(cfg.source, root).rstrip("/") + "/"
    crops, skipped = [], []
    for r in rows:
        key = r["key"]
        try:
            img = fetch_image(key, storage_options)
        except DecodeError as err:
            skipped.append(f"{key}: {err}")
            continue
        if min(img.shape[:2]) < cfg.method.crop:
            skipped.append(f"{key}: smaller than {cfg.method.crop}")
            continue
        name = key[len(prefix) :] if key.startswith(prefix) else key.rsplit("/", 1)[-1]
        gen = torch.Generator().manual_seed(zlib.crc32(f"{cfg.seed}:{name}".encode()))  # torch keeps 32 bits
        for _ in range(cfg.crops_per_image):
            box = random_box(img.shape[0], img.shape[1], cfg.method.crop, p_hflip=0, p_vflip=0, generator=gen)
            crops.append(crop_array(img, box))
    if not crops:
        raise ValueError(f"no usable held-out images under {cfg.source}")
    return uint8_to_image(torch.stack(crops)), skipped


class Timeline:
    """Wall-clock seconds of the pipeline's phases, from ``started`` (the command's start, ``time.time()``):
    start-up (imports, Ray, MLflow), each stage, evaluation, registry; printed at the end and kept in the summary."""

    def __init__(self, started: float | None = None):
        self.started = time.time() if started is None else started
        self.mark, self.phases = self.started, {}

    def lap(self, phase: str) -> None:
        now = time.time()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.mark
        self.mark = now

    def line(self) -> str:
        total = time.time() - self.started
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in self.phases.items())
        return f"time: {parts}; total {int(total // 60)} min {total % 60:.0f} s"

    def as_dict(self) -> dict[str, float]:
        return {**{k: round(v, 1) for k, v in self.phases.items()}, "total": round(time.time() - self.started, 1)}


def run_pipeline(cfg: PipelineConfig, *, log=print, started: float | None = None) -> dict[str, Any]:
    """The whole pipeline; ``started`` (``time.time()`` when the command began) dates the time breakdown."""
    from pipelines.stage import prepare, tracked_run

    timeline = Timeline(started)
    tracking = cfg.tracking.resolved()
    prepare(tracking, None)
    shown = {k: v for k, v in cfg.shown().items() if not k.startswith(("teacher.", "distill.", "trajectories."))}
    # The resume key is the recipe and its output folder as configured: the same in a re-submitted job's new pod.
    with tracked_run(
        "pipeline",
        tracking,
        key=(cfg.name, cfg.out),
        run_name=cfg.name,
        params=shown,
        tags={"oftsr.recipe": cfg.name},
        log=log,
    ) as run:
        tracking = dataclasses.replace(tracking, parent_run_id=run.run_id)
        return _run(cfg, tracking, run_key("pipeline", cfg.name, cfg.out), log, timeline)


def _stage(cfg: StageConfig, log) -> tuple[str, str | None]:
    """``(final checkpoint, MLflow run id)``: a finished stage is reused (no run id), else run or resumed."""
    from pipelines.train.driver import run_stage

    done = _finished(cfg)
    if done:
        log(f"{cfg.stage}: reusing the finished checkpoint {done}")
        return done, None
    res = run_stage(cfg, log=log)
    return res["checkpoint"], res["run_id"]


def _run(cfg: PipelineConfig, tracking: TrackingConfig, key: str, log, timeline: Timeline) -> dict[str, Any]:
    from pipelines.metric_logger import MetricLogger
    from pipelines.train.checkpoint import read_checkpoint
    from pipelines.train.driver import absolute

    parent = tracking.parent_run_id
    out = Path(absolute(cfg.out))
    timeline.lap("start-up")
    teacher_ckpt, teacher_run = _stage(dataclasses.replace(cfg.stage("teacher"), tracking=tracking), log)
    timeline.lap("teacher")
    distill_cfg = dataclasses.replace(cfg.stage("distill"), teacher=teacher_ckpt, tracking=tracking)
    if distill_cfg.targets == "cached":
        from pipelines.cache.stage import run_trajectories

        tcfg = dataclasses.replace(cfg.stage("trajectories"), teacher=teacher_ckpt, tracking=tracking)
        distill_cfg = dataclasses.replace(distill_cfg, cache=run_trajectories(tcfg, log=log)["uri"])
        timeline.lap("trajectories")
    student_ckpt, distill_run = _stage(distill_cfg, log)
    timeline.lap("distill")

    from oftsr.nets import UNet

    nets = {}
    for name, path in (("teacher", teacher_ckpt), ("student", student_ckpt)):
        ckpt = read_checkpoint(path, cfg.data.storage_options)
        nets[name] = UNet(ckpt["unet"])
        nets[name].load_state_dict(ckpt["ema"])
    report, paths = _evaluate(cfg, nets, out, tracking, log)
    timeline.lap("evaluation")
    tradeoff = knob_tradeoff(report)
    verdict = "trades fidelity (t = 0) for realism (t = 1)"
    verdict = verdict if tradeoff["holds"] else "does NOT trade fidelity for realism"
    log(
        f"knob: {verdict}"
        + "".join(f"\n  {'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}" for c in tradeoff["checks"])
    )
    registered = _register(cfg, nets, report, tracking, key, {"teacher": teacher_run, "student": distill_run}, log)
    timeline.lap("registry")
    log(timeline.line())
    with contextlib.suppress(Exception):  # the models are registered: a tracking outage now costs this record only
        MetricLogger(tracking.tracking_uri, parent).log({f"time/{k}_s": v for k, v in timeline.as_dict().items()}, 0)
    summary = {
        "run_id": parent,
        "teacher": teacher_ckpt,
        "student": student_ckpt,
        "trend": knob_trend(report),
        "knob_tradeoff": tradeoff,
        "evaluation": str(paths["markdown"]),
        "curve": str(paths["curve"]),
        "registered": registered,
        "time_s": timeline.as_dict(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _evaluate(cfg: PipelineConfig, nets, out: Path, tracking: TrackingConfig, log):
    from pipelines.metric_logger import MetricLogger
    from pipelines.tracking import client

    parent = tracking.parent_run_id
    hr, skipped = held_out_crops(cfg.evaluate, cfg.data.storage_options)
    where = cfg.distill  # the evaluation asks for what one of the distillation's workers asks for
    shards = len(shard_bounds(hr.shape[0], cfg.evaluate.batch, where.workers))
    log(
        f"evaluate: {hr.shape[0]} held-out crops, knobs {list(cfg.evaluate.knobs)}, in {shards} Ray "
        + ("task" if shards == 1 else "tasks")
        + (" of 1 GPU" if where.use_gpu else f" of {where.cpus_per_worker:g} CPU")
    )
    report = evaluate_distributed(
        hr,
        cfg.evaluate,
        student=nets["student"],
        teacher=nets["teacher"],
        shards=shards,
        use_gpu=where.use_gpu,
        cpus_per_shard=where.cpus_per_worker,
        strip=min(4, hr.shape[0]),
        log=log,
    )
    report["skipped"] = skipped
    strip_images = report.pop("strip")
    folder = out / "evaluation"
    paths = write_report(report, folder, title=f"{cfg.name}: fidelity-realism curve")
    _strip_png(strip_images, hr[: strip_images["t0"].shape[0]], folder / "strip.png")
    metric = report["perceptual"]
    flat = {}
    for r in report["rows"]:
        label = r["method"] if r["t"] is None else f"student_t{r['t']:.1f}"
        flat.update({f"eval/{label}/{m}": r[m] for m in ("psnr", "ssim", metric, "fid") if m in r})
    MetricLogger(tracking.tracking_uri, parent).log(flat, step=0)
    c = client(tracking.tracking_uri)
    for p in (*paths.values(), folder / "strip.png"):
        c.log_artifact(parent, str(p), "evaluation")
    log((folder / "evaluation.md").read_text())
    return report, paths


def _register(cfg: PipelineConfig, nets, report, tracking: TrackingConfig, key: str, runs, log) -> dict[str, Any]:
    """Teacher and student in the registry, once per pipeline (a resumed pipeline finds its versions by ``key``)."""
    from pipelines.registry import log_and_register
    from pipelines.tracking import client

    if not cfg.register:
        return {}
    c = client(tracking.tracking_uri)
    metric, trend = report["perceptual"], knob_trend(report)
    teacher_row = next(r for r in report["rows"] if r["method"] == "teacher")
    registered = {}
    for kind, name, score in (
        ("teacher", cfg.teacher_model, teacher_row[metric]),
        ("student", cfg.student_model, trend.get(f"{metric}_t1")),
    ):
        existing = [v for v in c.search_model_versions(f"name = '{name}'") if v.tags.get("oftsr.pipeline_key") == key]
        if existing:
            registered[kind] = {"version": existing[0].version, "reused": True}
            continue
        meta = {
            "recipe": cfg.name,
            **cfg.method.to_dict(),
            "pipeline_key": key,
            "kind": kind,
            "knob_min": 0.0,
            "knob_max": 1.0,
            "nfe": teacher_row["nfe"] if kind == "teacher" else 1,
        }
        if cfg.data.seeded:  # what the model was trained on: the chain's settings, as `--set data.realesrgan.*` names
            meta["realesrgan"] = json.dumps(cfg.data.realesrgan.to_dict(), sort_keys=True)
        registered[kind] = log_and_register(
            tracking_uri=tracking.tracking_uri,
            run_id=runs[kind] or tracking.parent_run_id,
            name=name,
            net=nets[kind],
            meta=meta,
            score=score,
        )
        champion = " (champion)" if registered[kind]["champion"] else ""
        log(f"register: {name} version {registered[kind]['version']}{champion}")
    return registered


def _strip_png(images: dict[str, torch.Tensor], hr: torch.Tensor, path: Path) -> None:
    """Rows of LR (nearest) | t = 0 | t = 1 | HR."""
    from PIL import Image

    rows = [strip([images["lr"][i], images["t0"][i], images["t1"][i], hr[i]]) for i in range(hr.shape[0])]
    Image.fromarray(torch.cat(rows, dim=1).permute(1, 2, 0).numpy()).save(path)


__all__ = ["EvalConfig", "PipelineConfig", "held_out_crops", "run_pipeline"]
