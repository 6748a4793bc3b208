"""Configuration of the training stages (teacher and distill) as frozen, validated dataclasses.

Recipes in ``pipelines/recipes.py`` build them; ``--set group.field=value`` overrides them
(:mod:`pipelines.overrides`). Every schedule is counted in images, so changing the worker count or the batch does
not change the run's length, its EMA or its checkpoint cadence.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from oftsr.method import Method
from oftsr.training import OptimConfig
from pipelines.data.config import DataConfig
from pipelines.tracking import TrackingConfig


@dataclasses.dataclass(frozen=True)
class DistillLossConfig:
    """DESIGN section 4: step ``dt``, teacher RK2 parameter ``r`` and the term weights (the time range is the
    method's knob range, :class:`oftsr.method.Method`)."""

    dt: float = 0.05
    r: float = 0.5
    w_distil: float = 1.0
    w_bound: float = 0.1
    w_align: float = 0.01
    fp32_targets: bool = True  # online targets: the teacher's calls in fp32 under bf16 autocast (oftsr.losses)

    def __post_init__(self) -> None:
        if not 0.0 < self.dt < 1.0:
            raise ValueError(f"loss.dt must lie in (0, 1), got {self.dt}")
        if not 0.0 < self.r <= 1.0:
            raise ValueError(f"loss.r must lie in (0, 1], got {self.r}")


@dataclasses.dataclass(frozen=True)
class FaultInjection:
    """Failure drills: the worker of ``rank`` fails once when it reaches ``fail_at_images`` images (the
    ``marker`` file records that it fired, so the retry runs through). ``kind``: ``raise`` (an exception) or
    ``sigkill`` (the worker process is killed mid-step, as by the OOM killer or a lost node). Disabled when
    ``fail_at_images < 0``."""

    fail_at_images: int = -1
    rank: int = 0
    marker: str = ""
    kind: Literal["raise", "sigkill"] = "raise"

    def __post_init__(self):
        if self.kind not in ("raise", "sigkill"):
            raise ValueError(f"fault.kind must be 'raise' or 'sigkill', got {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One training stage: ``teacher`` (conditional rectified flow) or ``distill`` (one-step student)."""

    stage: Literal["teacher", "distill"]
    run_name: str
    data: DataConfig
    storage_path: str = "outputs/ray_results"
    storage_shared: bool = False  # a local storage_path that every node mounts (NFS, FSx, ...)
    method: Method = dataclasses.field(default_factory=Method)  # in a recipe tree: the tree's method (pipelines.tree)
    unet: dict[str, Any] = dataclasses.field(default_factory=dict)
    pretrained: str | None = None  # teacher: optional unconditional ADM weights to warm-start from
    teacher: str | None = None  # distill: the teacher checkpoint folder or URI (required)
    targets: Literal["online", "cached"] = "online"
    cache: str | None = None  # distill with targets=cached: the trajectory cache URI (`oftsr run`: its own stage's)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: DistillLossConfig = dataclasses.field(default_factory=DistillLossConfig)
    batch_per_worker: int = 8
    # Rows each worker mixes before it draws a batch (Ray Data's local shuffle buffer; 0: none). The data arrive in
    # runs of related rows (the crops of one image, the rows of one cache shard): without mixing, a batch holds the
    # crops of one photo and the steps cycle through the photos in the same order every pass. Memory per worker:
    # this many rows (a cached 256-pixel row in fp32 is about 4 MB).
    shuffle_buffer: int = 128
    total_images: int = 10_000
    ema_half_life_images: float = 5_000.0
    checkpoint_every_images: int = 2_000
    log_every_images: int = 256
    sample_grid: int = 4  # LR / output / HR rows logged to MLflow at checkpoints (0: none)
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # How Ray places the training workers (Ray Train's placement group strategy): PACK fills a node first (one
    # 8-GPU node: NVLink); SPREAD puts them on different nodes where it can.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # GPU speed (DESIGN section 10): None means "on CUDA only". fast_modules: SDPA attention and fused
    # GroupNorm + scale-shift + SiLU (same weights, same checkpoints); compile: torch.compile of the DDP model.
    fast_modules: bool | None = None
    compile: bool | None = None
    ddp_bucket_mb: int = 100  # DDP gradient bucket size; larger buckets mean fewer all-reduce calls
    max_failures: int = 2
    keep_checkpoints: int = 3
    seed: int = 0
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    fault: FaultInjection = dataclasses.field(default_factory=FaultInjection)

    def __post_init__(self) -> None:
        if self.stage not in ("teacher", "distill"):
            raise ValueError(f"stage must be 'teacher' or 'distill', got {self.stage!r}")
        if not self.run_name or "/" in self.run_name:
            raise ValueError(f"run_name must be a non-empty name without '/', got {self.run_name!r}")
        if self.stage == "teacher" and self.targets != "online":
            raise ValueError("targets: only the distill stage has targets")
        for name in ("batch_per_worker", "total_images", "checkpoint_every_images", "log_every_images", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0 rows (0: no shuffle), got {self.shuffle_buffer}")
        if self.total_images % self.workers:
            raise ValueError(f"total_images ({self.total_images}) must be a multiple of workers ({self.workers})")
        if self.ema_half_life_images <= 0:
            raise ValueError(f"ema_half_life_images must be > 0, got {self.ema_half_life_images}")
        if self.ddp_bucket_mb < 1:
            raise ValueError(f"ddp_bucket_mb must be >= 1, got {self.ddp_bucket_mb}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(
                "placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, "
                f"got {self.placement_strategy!r}"
            )
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if self.max_failures < -1:
            raise ValueError(f"max_failures must be >= -1 (-1: unlimited), got {self.max_failures}")

    @property
    def global_batch(self) -> int:
        return self.batch_per_worker * self.workers
