"""Recipes: named functions that build stage configs (configuration as code).

``quickstart`` is the embedded default (local Ray, the sample photos, the ``tiny`` preset, 64² crops, CPU).
The paper settings (DESIGN sections 3, 4, 7) take their data location from ``--set data.source=...`` or
``--set data.source=none --set data.manifest=...``; the placeholders below are not real buckets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from oftsr.ema import half_life_from_decay
from oftsr.training import OptimConfig
from pipelines.cache.config import TrajectoryConfig
from pipelines.data.config import DataConfig
from pipelines.train.config import DistillLossConfig, StageConfig

SAMPLE_PHOTOS = "outputs/sample_photos"  # export_sample_split() writes train/ and heldout/ below it
PAPER_EMA_HALF_LIFE = half_life_from_decay(0.9999, 32)  # EMA 0.9999 at batch 32, about 221,800 images


def _quickstart(stage: str) -> StageConfig:
    # two decode tasks at a time: one machine, which the two training workers share with them
    data = DataConfig(
        source=f"{SAMPLE_PHOTOS}/train", crop=64, crops_per_image=8, batch_size=4, num_cpus=0.25, concurrency=2
    )
    common = dict(
        data=data,
        preset="tiny",
        sigma_p=0.2,
        batch_per_worker=8,
        workers=2,
        cpus_per_worker=0.5,
        log_every_images=128,
        storage_path="outputs/ray_results",
    )
    if stage == "teacher":
        return StageConfig(
            stage="teacher",
            run_name="quickstart-teacher",
            total_images=6_400,
            optim=OptimConfig(lr=5e-4, warmup_images=800),
            ema_half_life_images=1_000,
            checkpoint_every_images=1_600,
            **common,
        )
    return StageConfig(
        stage="distill",
        run_name="quickstart-distill",
        teacher="outputs/ray_results/quickstart-teacher",
        total_images=1_280,
        optim=OptimConfig(lr=1e-4, warmup_images=320),
        ema_half_life_images=500,
        checkpoint_every_images=640,
        **common,
    )


def _paper(
    stage: str,
    name: str,
    *,
    preset: str,
    sigma_p: float,
    source: str,
    degradation: str = "bicubic",
    sigma_y: float = 0.0,
    crops_per_image: int = 1,
) -> StageConfig:
    data = DataConfig(
        source=source,
        crop=256,
        crops_per_image=crops_per_image,
        degradation=degradation,
        sigma_y=sigma_y,
        dtype="float16",
        batch_size=16,
    )
    common = dict(
        data=data,
        preset=preset,
        sigma_p=sigma_p,
        batch_per_worker=4,
        workers=8,
        use_gpu=True,
        cpus_per_worker=4.0,
        ema_half_life_images=PAPER_EMA_HALF_LIFE,
        checkpoint_every_images=64_000,
        log_every_images=3_200,
        storage_path=f"s3://my-bucket/oftsr/{name}",
    )
    if stage == "teacher":
        return StageConfig(
            stage="teacher",
            run_name=f"{name}-teacher",
            total_images=6_400_000,
            optim=OptimConfig(lr=1e-4, warmup_images=32_000),
            **common,
        )
    return StageConfig(
        stage="distill",
        run_name=f"{name}-distill",
        teacher=f"s3://my-bucket/oftsr/{name}/{name}-teacher",
        total_images=1_600_000,
        optim=OptimConfig(lr=2e-5, warmup_images=16_000),
        loss=DistillLossConfig(),
        **common,
    )


RECIPES: dict[str, Callable[[str], StageConfig]] = {
    "quickstart": _quickstart,
    "ffhq_x4": lambda s: _paper(s, "ffhq_x4", preset="ffhq", sigma_p=0.1, source="s3://my-bucket/ffhq256"),
    "ffhq_x4_noisy": lambda s: _paper(
        s,
        "ffhq_x4_noisy",
        preset="ffhq",
        sigma_p=0.5,
        degradation="avgpool",
        sigma_y=0.05,
        source="s3://my-bucket/ffhq256",
    ),
    "div2k_x4": lambda s: _paper(
        s, "div2k_x4", preset="ffhq", sigma_p=0.2, source="s3://my-bucket/div2k-train-hr", crops_per_image=8
    ),
    "imagenet_x4": lambda s: _paper(
        s, "imagenet_x4", preset="imagenet", sigma_p=0.2, source="s3://my-bucket/imagenet256"
    ),
}


def trajectories(name: str) -> TrajectoryConfig:
    """The trajectory-cache config of recipe ``name``: same data, degradation and sigma_p as its distill stage."""
    distill = recipe(name, "distill")
    small = name == "quickstart"
    data = dataclasses.replace(distill.data, crops_per_image=4 if small else 16, p_vflip=distill.data.p_vflip)
    return TrajectoryConfig(
        run_name=f"{name}-trajectories",
        data=data,
        teacher=distill.teacher,
        sigma_p=distill.sigma_p,
        out="outputs/cache" if small else f"s3://my-bucket/oftsr/{name}/cache",
        keys_per_shard=2 if small else 64,
        batch=8,
        concurrency=2 if small else 8,
        use_gpu=not small,
        cpus_per_actor=0.5 if small else 4.0,
        points_per_sample=0 if small else 6,
    )


def recipe(name: str, stage: str) -> StageConfig | TrajectoryConfig:
    """The ``stage`` (``teacher``, ``trajectories`` or ``distill``) config of recipe ``name``."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {sorted(RECIPES)}")
    if stage == "trajectories":
        return trajectories(name)
    if stage not in ("teacher", "distill"):
        raise ValueError(f"unknown stage {stage!r}")
    return RECIPES[name](stage)


__all__ = ["RECIPES", "recipe"]


def pipeline(name: str):
    """The whole pipeline of recipe ``name`` (``oftsr run``): its stages plus evaluation and registration."""
    from pipelines.pipeline import EvalConfig, PipelineConfig

    small = name == "quickstart"
    distill = recipe(name, "distill")
    evaluate = (
        EvalConfig(source=f"{SAMPLE_PHOTOS}/heldout", crop=64, crops_per_image=8)
        if small
        else EvalConfig(source=f"s3://my-bucket/{name}-heldout", crop=256, crops_per_image=1)
    )
    return PipelineConfig(
        name=name,
        teacher=recipe(name, "teacher"),
        distill=distill,
        trajectories=trajectories(name),
        evaluate=evaluate,
        out="outputs/quickstart" if small else f"outputs/{name}",
    )
