"""Configuration and content key of a teacher-trajectory cache (DESIGN section 5)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from typing import Any, Literal

from oftsr.method import Method
from pipelines.data.config import DataConfig
from pipelines.tracking import TrackingConfig

#: 0.01, then every 0.05 from 0.05 to 0.95, then 0.99: 21 points.
DEFAULT_GRID: tuple[float, ...] = (0.01, *[round(0.05 * i, 2) for i in range(1, 20)], 0.99)


@dataclasses.dataclass(frozen=True)
class TrajectoryConfig:
    """The ``trajectories`` stage: run the teacher ODE once per (crop, seed) and store its targets."""

    run_name: str
    data: DataConfig
    teacher: str | None = (
        None  # teacher checkpoint folder / run folder / URI, or a registered model (models:/NAME@ALIAS)
    )
    out: str = "outputs/cache"  # caches live under OUT/trajectories/<hash>/
    storage_shared: bool = False  # a local OUT that every node mounts
    method: Method = dataclasses.field(default_factory=Method)  # sigma_p, t_min, t_max; in a recipe tree, its method
    crops_per_image: int = 4  # crops cached per image (data.crops_per_image is for online training)
    grid: tuple[float, ...] = DEFAULT_GRID
    points_per_sample: int = 0  # grid points stored per sample (0: all), chosen from the sample's seed
    dt: float = 0.05  # teacher step for v_bar (as in the online loss)
    r: float = 0.5
    solver: Literal["euler", "midpoint", "heun"] = "midpoint"
    steps_per_interval: int = 1  # solver steps between consecutive grid points
    seeds_per_crop: int = 1
    seed: int = 0
    dtype: Literal["float16", "bfloat16"] = "float16"
    keys_per_shard: int = 16
    batch: int = 8  # crops per teacher call
    concurrency: int = 2  # actors, each holding one teacher replica
    use_gpu: bool = False
    cpus_per_actor: float = 0.5
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if not self.run_name:
            raise ValueError("run_name must not be empty")
        grid = tuple(float(t) for t in self.grid)
        if not grid or any(b <= a for a, b in itertools.pairwise(grid)) or grid[0] <= 0 or grid[-1] > 1:
            raise ValueError(f"grid must be strictly increasing in (0, 1], got {self.grid}")
        object.__setattr__(self, "grid", grid)
        if not 0 <= self.points_per_sample <= len(grid):
            raise ValueError(f"points_per_sample must lie in [0, {len(grid)}], got {self.points_per_sample}")
        if not self.method.sigma_p > 0.0:
            raise ValueError(f"sigma_p must be > 0 (the cache regenerates the noise), got {self.method.sigma_p}")
        names = ("steps_per_interval", "seeds_per_crop", "crops_per_image", "keys_per_shard", "batch", "concurrency")
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in ("float16", "bfloat16"):
            raise ValueError(f"dtype must be 'float16' or 'bfloat16', got {self.dtype!r}")
        if not 0.0 < self.dt < 1.0 or not 0.0 < self.r <= 1.0:
            raise ValueError(f"dt must lie in (0, 1) and r in (0, 1], got dt={self.dt}, r={self.r}")

    @property
    def stored_points(self) -> int:
        return self.points_per_sample or len(self.grid)


def cache_key(cfg: TrajectoryConfig, *, teacher_version: str, manifest_hash: str) -> dict[str, Any]:
    """Everything that changes the cache's content (and nothing that does not, such as the pool size)."""
    d = cfg.data
    return {
        "format": 1,
        "teacher_version": teacher_version,
        "manifest_hash": manifest_hash,
        "degradation": {
            "kind": d.degradation,
            "sf": d.sf,
            "sigma_y": d.sigma_y,
            # the chain's settings where the degradation is drawn per sample (its LR is stored, not regenerated)
            **({"realesrgan": d.realesrgan.to_dict()} if d.seeded else {}),
        },
        "crop": d.crop,
        "crops_per_image": cfg.crops_per_image,
        "sigma_p": cfg.method.sigma_p,
        "grid": list(cfg.grid),
        "points_per_sample": cfg.points_per_sample,
        "solver": {
            "method": cfg.solver,
            "steps_per_interval": cfg.steps_per_interval,
            "dt": cfg.dt,
            "r": cfg.r,
            "t_min": cfg.method.t_min,
            "t_max": cfg.method.t_max,
        },
        "seeds": {"seed": cfg.seed, "seeds_per_crop": cfg.seeds_per_crop},
        "dtype": cfg.dtype,
        "keys_per_shard": cfg.keys_per_shard,
    }


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
