"""The data plane's configuration: where images come from and how training / evaluation crops are made."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from oftsr.degrade import KINDS
from oftsr.realesrgan import RealESRGANSettings
from pipelines.data.decode import DEFAULT_MAX_PIXELS

DTYPES = ("float16", "float32")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Images and their crops. Exactly one of ``source`` (folder or ``s3://bucket/prefix``) and ``manifest``.

    ``storage_options`` go to fsspec (e.g. ``{"endpoint_url": ...}``); put credentials in the environment, not here.
    """

    source: str | None = None
    manifest: str | None = None
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    crop: int = 256
    crops_per_image: int = 1
    sf: int = 4
    degradation: str = "bicubic"
    sigma_y: float = 0.0
    # The realesrgan chain's settings (defaults: the published Real-ESRGAN ones), and where it runs: in the Ray Data
    # CPU tasks ("data"), or batched in the training worker on its device ("worker"; the tasks then send the HR
    # crop and its seed).
    realesrgan: RealESRGANSettings = dataclasses.field(default_factory=RealESRGANSettings)
    degrade_on: Literal["data", "worker"] = "data"
    p_hflip: float = 0.5
    p_vflip: float = 0.0625
    dtype: str = "float32"
    keep_lr: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bad_fraction: float = 0.01
    min_seen_for_fraction: int = 100
    read_retries: int = 4
    seed: int | None = None
    shuffle: bool = True
    batch_size: int = 16  # images per map_batches call
    num_cpus: float = 0.5  # per decode task: fractional, so training workers cannot starve the reads
    # Most decode tasks at once (None: as many as the free CPUs allow). On a small machine each concurrent task
    # is one more Python process importing PyTorch beside the training workers: cap it there.
    concurrency: int | None = None

    def __post_init__(self) -> None:
        if (self.source is None) == (self.manifest is None):
            raise ValueError("DataConfig: set exactly one of 'source' and 'manifest'")
        if self.crop < 1 or self.crop % self.sf:
            raise ValueError(f"DataConfig.crop must be a positive multiple of sf={self.sf}, got {self.crop}")
        if self.crops_per_image < 1:
            raise ValueError(f"DataConfig.crops_per_image must be >= 1, got {self.crops_per_image}")
        if self.degradation not in KINDS:
            raise ValueError(f"DataConfig.degradation must be one of {KINDS}, got {self.degradation!r}")
        if self.sigma_y < 0:
            raise ValueError(f"DataConfig.sigma_y must be >= 0, got {self.sigma_y}")
        if self.degrade_on not in ("data", "worker"):
            raise ValueError(f"data.degrade_on must be 'data' or 'worker', got {self.degrade_on!r}")
        if self.degrade_on == "worker" and self.degradation != "realesrgan":
            raise ValueError("data.degrade_on=worker is for the realesrgan degradation (the others cost nothing)")
        gt = self.realesrgan.gt_size
        if self.degradation == "realesrgan" and gt is not None and gt != self.crop:
            raise ValueError(f"data.realesrgan.gt_size ({gt}) must be the training crop (method.crop = {self.crop})")
        for name in ("p_hflip", "p_vflip", "max_bad_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"DataConfig.{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"DataConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.max_pixels < 1 or self.batch_size < 1 or self.num_cpus <= 0:
            raise ValueError("DataConfig.max_pixels, batch_size and num_cpus must be positive")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"DataConfig.concurrency must be >= 1 or None, got {self.concurrency}")

    @property
    def seeded(self) -> bool:
        """Whether each crop's degradation is drawn from its own seed (the realesrgan chain)."""
        return self.degradation == "realesrgan"

    @property
    def region(self) -> int:
        """The side of the region cut from a photo: the crop, or the realesrgan chain's ``crop_pad_size`` (its
        paired crop then gives the training crop)."""
        return (self.realesrgan.crop_pad_size or self.crop) if self.seeded else self.crop
