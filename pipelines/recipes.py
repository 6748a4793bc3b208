"""Recipes: named functions that build a pipeline's recipe tree (:class:`pipelines.tree.PipelineConfig`).

``quickstart`` is the embedded default (local Ray, the sample photos, the ``tiny`` preset, 64² crops, CPU).
The paper settings (DESIGN sections 3, 4, 7) take their data location from ``--set data.source=...`` or
``--set data.source=none --set data.manifest=...``; the placeholders below are not real buckets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from oftsr.ema import half_life_from_decay
from oftsr.method import Method
from oftsr.realesrgan import OFTSR_REALSR
from oftsr.training import OptimConfig
from pipelines.cache.config import TrajectoryConfig
from pipelines.data.config import DataConfig
from pipelines.train.config import DistillLossConfig, StageConfig
from pipelines.tree import EvalConfig, PipelineConfig

SAMPLE_PHOTOS = "outputs/sample_photos"  # export_sample_split() writes train/ and heldout/ below it
PAPER_EMA_HALF_LIFE = half_life_from_decay(0.9999, 32)  # EMA 0.9999 at batch 32, about 221,800 images


def _train(stage: str, name: str, total_images: int, lr: float, warmup_images: int, **fields) -> StageConfig:
    """A training stage of recipe ``name``: its length, learning rate and warm-up, counted in images."""
    optim = OptimConfig(lr=lr, warmup_images=warmup_images)
    return StageConfig(stage=stage, run_name=f"{name}-{stage}", total_images=total_images, optim=optim, **fields)


def quickstart() -> PipelineConfig:
    """The embedded default, sized to show the knob on two CPU cores in minutes: the teacher stage warm-starts from
    the shipped ``tiny`` teacher (:mod:`pipelines.shipped`: made beforehand by ``oftsr local-teacher``, the exact
    command in its record) and fine-tunes it briefly; the trajectory stage caches its ODE on the training crops;
    the one-step student is distilled from that cache (``--set distill.targets=online`` distils online instead)."""
    from pipelines.shipped import shipped_uri

    method = Method(
        sf=4, degradation="bicubic", sigma_p=0.2, crop=64, preset="tiny", t_max=QUICKSTART["knob_trained_max"]
    )
    # two decode tasks at a time: one machine, which the two training workers share with them
    data = DataConfig(source=f"{SAMPLE_PHOTOS}/train", crops_per_image=8, batch_size=4, num_cpus=0.25, concurrency=2)
    common = dict(
        data=data,
        batch_per_worker=8,
        workers=2,
        cpus_per_worker=0.5,
        log_every_images=128,
        storage_path="outputs/ray_results",
    )
    return PipelineConfig(
        name="quickstart",
        method=method,
        data=data,
        teacher=_train(
            "teacher",
            "quickstart",
            QUICKSTART["teacher_images"],
            QUICKSTART["teacher_lr"],
            0,
            pretrained=shipped_uri("quickstart_teacher"),
            ema_half_life_images=QUICKSTART["teacher_images"] / 4,
            checkpoint_every_images=QUICKSTART["teacher_images"],
            **common,
        ),
        trajectories=TrajectoryConfig(
            run_name="quickstart-trajectories",
            data=data,
            out="outputs/cache",
            crops_per_image=QUICKSTART["cached_crops_per_image"],
            grid=QUICKSTART["grid"],
            dt=QUICKSTART["grid_step"],  # v_bar's step is the solver's own step: no extra teacher call
            keys_per_shard=2,
            batch=16,
            concurrency=2,
            cpus_per_actor=0.5,
        ),
        distill=_train(
            "distill",
            "quickstart",
            QUICKSTART["distill_images"],
            QUICKSTART["distill_lr"],
            64,
            targets="cached",
            loss=DistillLossConfig(w_bound=QUICKSTART["distill_w_bound"]),
            ema_half_life_images=QUICKSTART["distill_images"] / 8,
            checkpoint_every_images=QUICKSTART["distill_images"],
            **common,
        ),
        # batches of 8: the 16 held-out crops in two Ray tasks, one per core (sigma_y = 0: the numbers of one batch)
        evaluate=EvalConfig(source=f"{SAMPLE_PHOTOS}/heldout", crops_per_image=8, batch=8),
        out="outputs/quickstart",
    )


#: The quickstart's budget and the settings that make its knob work at that budget (measured: docs/quickstart.md).
QUICKSTART = {
    "teacher_images": 256,  # a short fine-tune of the shipped teacher: every stage runs
    "teacher_lr": 1e-4,
    "cached_crops_per_image": 16,  # 7 photos: 112 cached trajectories
    # The knob's trained range ends at 0.6 here (the paper's 0.99 in the paper recipes): at 960 distillation images
    # (the paper runs about 1.6 M) the student is not yet trained at its high end. With the range to 0.99 its
    # ST-LPIPS rose from 0.094 at t = 0.7 to 0.103 at 0.99; with the range to 0.8 it still turned back after network
    # time ~0.5 (one-process runs: 0.088 at knob 0.7, 0.095 at 1; a CI run: 0.096 at 0.6, 0.118 at 1, the verdict
    # lost). With 0.6, three one-process runs (seeds 0-2, same teacher and cache) gave ST-LPIPS t=0 / t=1 of
    # 0.114 / 0.087, 0.109 / 0.082, 0.110 / 0.080, each curve monotone within noise: the same realism at its end
    # for fewer grid points to learn (docs/quickstart.md). The knob's [0, 1] spans the trained range
    # (oftsr.infer.network_time).
    "knob_trained_max": 0.6,
    "grid": tuple(round(0.1 * i, 1) if i else 0.01 for i in range(7)),  # 0.01, 0.1, ..., 0.6
    "grid_step": 0.1,  # v_bar's step: the solver's own step wherever the grid spacing is 0.1 (no extra teacher call)
    "distill_images": 960,
    "distill_lr": 1e-3,
    # L_bound pins the fidelity end (DESIGN section 4: weight 0.1). The teacher's own trajectory rises in PSNR from
    # t = 0.01 to 0.3 (its average velocity from the start gains 0.2 dB there: the tiny teacher is least accurate at
    # t near 0), and the student inherits that start; measured (one run each, same teacher and cache), PSNR from
    # t = 0 to its peak: +0.13 dB with weight 0.1, +0.03 dB with 1, none with 3 (t = 0 at 35.76, 35.95, 36.06 dB),
    # the realism end unchanged (ST-LPIPS at t = 1: 0.091, 0.089, 0.089).
    "distill_w_bound": 3.0,
}


def realworld_quickstart() -> PipelineConfig:
    """The quickstart on real-world degradations: the official OFTSR real-world chain (:data:`OFTSR_REALSR`, its
    300-pixel region and 256 crop scaled to the 64 crop: 76 and 64), a longer teacher fine-tune (the shipped teacher
    was trained on bicubic inputs), the same trajectory cache (which stores each crop's LR) and distillation.
    Registered as ``oftsr-realworld-teacher`` / ``oftsr-realworld-student`` beside the bicubic quickstart's."""
    base = quickstart()
    name, n = "realworld_quickstart", REALWORLD_QUICKSTART["teacher_images"]
    settings = dataclasses.replace(OFTSR_REALSR, gt_size=64, crop_pad_size=76)
    return dataclasses.replace(
        base,
        name=name,
        method=dataclasses.replace(base.method, degradation="realesrgan"),
        data=dataclasses.replace(base.data, realesrgan=settings),
        teacher=dataclasses.replace(
            base.teacher,
            run_name=f"{name}-teacher",
            total_images=n,
            ema_half_life_images=n / 4,
            checkpoint_every_images=n,
        ),
        trajectories=dataclasses.replace(base.trajectories, run_name=f"{name}-trajectories"),
        distill=dataclasses.replace(base.distill, run_name=f"{name}-distill"),
        out=f"outputs/{name}",
        teacher_model="oftsr-realworld-teacher",
        student_model="oftsr-realworld-student",
    )


#: What the real-world quickstart changes from :data:`QUICKSTART`.
REALWORLD_QUICKSTART = {"teacher_images": 1024}


def paper(name: str, method: Method, source: str, *, crops_per_image: int = 1, **data_fields) -> PipelineConfig:
    data = DataConfig(source=source, crops_per_image=crops_per_image, dtype="float16", batch_size=16, **data_fields)
    common = dict(
        data=data,
        batch_per_worker=4,
        workers=8,
        use_gpu=True,
        cpus_per_worker=4.0,
        ema_half_life_images=PAPER_EMA_HALF_LIFE,
        checkpoint_every_images=64_000,
        log_every_images=3_200,
        storage_path=f"s3://my-bucket/oftsr/{name}",
    )
    return PipelineConfig(
        name=name,
        method=method,
        data=data,
        teacher=_train("teacher", name, 6_400_000, 1e-4, 32_000, **common),
        trajectories=TrajectoryConfig(
            run_name=f"{name}-trajectories",
            data=data,
            out=f"s3://my-bucket/oftsr/{name}/cache",
            crops_per_image=16,
            keys_per_shard=64,
            batch=8,
            concurrency=8,
            use_gpu=True,
            cpus_per_actor=4.0,
            points_per_sample=6,
        ),
        distill=_train("distill", name, 1_600_000, 2e-5, 16_000, **common),
        evaluate=EvalConfig(source=f"s3://my-bucket/{name}-heldout", crops_per_image=1),
        out=f"outputs/{name}",
    )


RECIPES: dict[str, Callable[[], PipelineConfig]] = {
    "quickstart": quickstart,
    "ffhq_x4": lambda: paper("ffhq_x4", Method(sigma_p=0.1, preset="ffhq"), "s3://my-bucket/ffhq256"),
    "ffhq_x4_noisy": lambda: paper(
        "ffhq_x4_noisy",
        Method(sigma_p=0.5, degradation="avgpool", sigma_y=0.05, preset="ffhq"),
        "s3://my-bucket/ffhq256",
    ),
    "div2k_x4": lambda: paper(
        "div2k_x4", Method(sigma_p=0.2, preset="ffhq"), "s3://my-bucket/div2k-train-hr", crops_per_image=8
    ),
    "imagenet_x4": lambda: paper("imagenet_x4", Method(sigma_p=0.2, preset="imagenet"), "s3://my-bucket/imagenet256"),
    # the official real-world setting: DIV2K's teacher settings (sigma_p 0.2, the ffhq/DIV2K network) on the
    # Real-ESRGAN chain of its configs/ir_fm_DIV2K.yml (300-pixel regions degraded, then 256 crops)
    "realworld_x4": lambda: paper(
        "realworld_x4",
        Method(sigma_p=0.2, degradation="realesrgan", preset="ffhq"),
        "s3://my-bucket/div2k-train-hr",
        crops_per_image=8,
        realesrgan=OFTSR_REALSR,
    ),
    "realworld_quickstart": realworld_quickstart,
}


def pipeline(name: str) -> PipelineConfig:
    """The recipe tree of ``name``."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {sorted(RECIPES)}")
    return RECIPES[name]()


def recipe(name: str, stage: str) -> StageConfig | TrajectoryConfig:
    """The runtime config of ``stage`` (``teacher``, ``trajectories`` or ``distill``) in recipe ``name``."""
    return pipeline(name).stage(stage)


__all__ = ["RECIPES", "pipeline", "recipe"]
