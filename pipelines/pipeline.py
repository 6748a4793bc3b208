"""``oftsr run RECIPE``: data -> teacher -> trajectories (cached targets only) -> distill -> evaluate -> register,
one parent MLflow run with a nested run per stage. A stage whose output exists is reused (a finished checkpoint,
a finished cache, a registered model of this pipeline), so the whole pipeline resumes after an interruption.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path
from typing import Any

import torch

from oftsr.augment import random_box
from oftsr.conventions import uint8_to_image
from oftsr.evaluation import DEFAULT_KNOBS, EvalSettings, evaluate, knob_trend, strip, write_report
from pipelines.cache.config import TrajectoryConfig
from pipelines.data.decode import DecodeError
from pipelines.data.manifest import list_images
from pipelines.data.storage import filesystem, join_uri
from pipelines.data.transforms import crop_array, fetch_image
from pipelines.train.config import StageConfig, TrackingConfig


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: deterministic crops of the images under ``source``."""

    source: str
    crop: int = 64
    crops_per_image: int = 8
    max_images: int = 100
    knobs: tuple[float, ...] = DEFAULT_KNOBS
    teacher_method: str = "rk45"
    teacher_steps: int | None = None
    batch: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.crop < 1 or self.crops_per_image < 1 or self.max_images < 1:
            raise ValueError("evaluate.crop, evaluate.crops_per_image and evaluate.max_images must be >= 1")
        if any(not 0.0 <= t <= 1.0 for t in self.knobs):
            raise ValueError(f"evaluate.knobs must lie in [0, 1], got {self.knobs}")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    name: str
    teacher: StageConfig
    distill: StageConfig
    trajectories: TrajectoryConfig
    evaluate: EvalConfig
    out: str = "outputs/pipeline"
    register: bool = True
    teacher_model: str = "oftsr-teacher"
    student_model: str = "oftsr-student"
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)


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
        if min(img.shape[:2]) < cfg.crop:
            skipped.append(f"{key}: smaller than {cfg.crop}")
            continue
        name = key[len(prefix) :] if key.startswith(prefix) else key.rsplit("/", 1)[-1]
        gen = torch.Generator().manual_seed(zlib.crc32(f"{cfg.seed}:{name}".encode()))  # torch keeps 32 bits
        for _ in range(cfg.crops_per_image):
            box = random_box(img.shape[0], img.shape[1], cfg.crop, p_hflip=0, p_vflip=0, generator=gen)
            crops.append(crop_array(img, box))
    if not crops:
        raise ValueError(f"no usable held-out images under {cfg.source}")
    return uint8_to_image(torch.stack(crops)), skipped


def _with_parent(stage, tracking: TrackingConfig, parent: str):
    return dataclasses.replace(stage, tracking=dataclasses.replace(tracking, parent_run_id=parent))


def run_pipeline(cfg: PipelineConfig, *, log=print) -> dict[str, Any]:
    from pipelines.overrides import flatten
    from pipelines.registry import log_and_register
    from pipelines.stages import absolute, run_stage
    from pipelines.tracking import (
        MetricLogger,
        check_reachable,
        client,
        finish_run,
        git_commit,
        run_key,
        start_or_resume_run,
    )
    from pipelines.train.checkpoint import read_checkpoint

    tracking = cfg.tracking.resolved()
    check_reachable(tracking.tracking_uri)
    out = Path(absolute(cfg.out))
    key = run_key("pipeline", cfg.name, str(out))
    parent, resumed = start_or_resume_run(
        tracking.tracking_uri,
        tracking.experiment,
        key=key,
        run_name=f"pipeline:{cfg.name}",
        params={k: v for k, v in flatten(cfg).items() if not k.startswith(("teacher.", "distill.", "trajectories."))},
        tags={"oftsr.stage": "pipeline", "oftsr.git_commit": git_commit(), "oftsr.recipe": cfg.name},
    )
    log(f"pipeline {cfg.name}: MLflow run {parent} ({'resumed' if resumed else 'new'})")
    plog = MetricLogger(tracking.tracking_uri, parent)
    c = client(tracking.tracking_uri)

    def stage(stage_cfg: StageConfig) -> tuple[str, str | None]:
        """``(final checkpoint, MLflow run id)``: a finished stage is reused (no run id), else run or resumed."""
        done = _finished(stage_cfg)
        if done:
            log(f"{stage_cfg.stage}: reusing the finished checkpoint {done}")
            return done, None
        res = run_stage(stage_cfg, log=log)
        return res["checkpoint"], res["run_id"]

    # 1-2. teacher
    teacher_ckpt, teacher_run = stage(_with_parent(cfg.teacher, tracking, parent))

    # 3. trajectories (cached targets only)
    distill_cfg = dataclasses.replace(cfg.distill, teacher=teacher_ckpt)
    if distill_cfg.targets == "cached":
        from pipelines.cache.stage import run_trajectories

        tcfg = _with_parent(dataclasses.replace(cfg.trajectories, teacher=teacher_ckpt), tracking, parent)
        cache = run_trajectories(tcfg, log=log)
        distill_cfg = dataclasses.replace(distill_cfg, cache=cache["uri"])

    # 4. distill
    student_ckpt, distill_run = stage(_with_parent(distill_cfg, tracking, parent))

    # 5. evaluate
    from oftsr.nets import UNet

    nets = {}
    for name, path in (("teacher", teacher_ckpt), ("student", student_ckpt)):
        ckpt = read_checkpoint(path, cfg.distill.data.storage_options)
        nets[name] = UNet(ckpt["unet"])
        nets[name].load_state_dict(ckpt["ema"])
    hr, skipped = held_out_crops(cfg.evaluate, cfg.distill.data.storage_options)
    d = cfg.distill.data
    settings = EvalSettings(
        sigma_p=cfg.distill.sigma_p,
        sf=d.sf,
        degradation=d.degradation,
        sigma_y=d.sigma_y,
        knobs=cfg.evaluate.knobs,
        teacher_method=cfg.evaluate.teacher_method,
        teacher_steps=cfg.evaluate.teacher_steps,
        batch=cfg.evaluate.batch,
        seed=cfg.evaluate.seed,
    )
    log(f"evaluate: {hr.shape[0]} held-out crops, knobs {list(settings.knobs)}")
    report = evaluate(hr, settings, student=nets["student"], teacher=nets["teacher"])
    report["skipped"] = skipped
    paths = write_report(report, out / "evaluation", title=f"{cfg.name}: fidelity-realism curve")
    _strip_png(nets["student"], hr[:4], settings, out / "evaluation" / "strip.png")
    metric = report["perceptual"]
    flat = {}
    for r in report["rows"]:
        label = r["method"] if r["t"] is None else f"student_t{r['t']:.1f}"
        flat.update({f"eval/{label}/{m}": r[m] for m in ("psnr", "ssim", metric, "fid") if m in r})
    plog.log(flat, step=0)
    for p in (*paths.values(), out / "evaluation" / "strip.png"):
        c.log_artifact(parent, str(p), "evaluation")
    trend = knob_trend(report)
    log((out / "evaluation" / "evaluation.md").read_text())

    # 6. register
    registered = {}
    if cfg.register:
        teacher_row = next(r for r in report["rows"] if r["method"] == "teacher")
        meta_common = {
            "recipe": cfg.name,
            "sigma_p": cfg.distill.sigma_p,
            "degradation": d.degradation,
            "sf": d.sf,
            "crop": d.crop,
            "pipeline_key": key,
        }
        for kind, net, run_id, score, name in (
            ("teacher", nets["teacher"], teacher_run, teacher_row[metric], cfg.teacher_model),
            ("student", nets["student"], distill_run, trend.get(f"{metric}_t1"), cfg.student_model),
        ):
            existing = [
                v for v in c.search_model_versions(f"name = '{name}'") if v.tags.get("oftsr.pipeline_key") == key
            ]
            if existing:
                registered[kind] = {"version": existing[0].version, "reused": True}
                continue
            meta = {
                **meta_common,
                "kind": kind,
                "knob_min": 0.0,
                "knob_max": 1.0,
                "nfe": teacher_row["nfe"] if kind == "teacher" else 1,
            }
            registered[kind] = log_and_register(
                tracking_uri=tracking.tracking_uri, run_id=run_id or parent, name=name, net=net, meta=meta, score=score
            )
            log(
                f"register: {name} version {registered[kind]['version']}"
                f"{' (champion)' if registered[kind]['champion'] else ''}"
            )
    finish_run(tracking.tracking_uri, parent)
    summary = {
        "run_id": parent,
        "teacher": teacher_ckpt,
        "student": student_ckpt,
        "trend": trend,
        "evaluation": str(paths["markdown"]),
        "curve": str(paths["curve"]),
        "registered": registered,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _strip_png(student, hr: torch.Tensor, settings: EvalSettings, path: Path) -> None:
    """Rows of LR (nearest) | t = 0 | t = 1 | HR."""
    from PIL import Image

    from oftsr.degrade import degrade
    from oftsr.flow import conditioned, noisy_start
    from oftsr.infer import evaluating, one_step

    lr, x_lr = degrade(hr, settings.sf, settings.degradation)
    x0 = noisy_start(x_lr, settings.sigma_p, torch.Generator().manual_seed(0))
    nearest = torch.nn.functional.interpolate(lr, scale_factor=settings.sf, mode="nearest")
    with evaluating(student):
        v = conditioned(student, x_lr)
        lo, hi = one_step(v, x0, 0.0), one_step(v, x0, 1.0)
    rows = [strip([nearest[i], lo[i], hi[i], hr[i]]) for i in range(hr.shape[0])]
    Image.fromarray(torch.cat(rows, dim=1).permute(1, 2, 0).numpy()).save(path)


__all__ = ["EvalConfig", "PipelineConfig", "held_out_crops", "run_pipeline"]
