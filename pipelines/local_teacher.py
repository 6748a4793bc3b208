"""The local quickstart: train the ``tiny`` teacher on the sample photos in one process, then compare it with
bicubic up-sampling on held-out photos. Plain PyTorch, no cluster: the smallest complete use of the core.

Reads top to bottom: config -> data -> model -> training loop -> evaluation -> outputs
(``teacher.safetensors``, ``ema.safetensors``, ``config.json``, ``metrics.json``, ``comparison.png``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from oftsr.augment import apply_box, center_box, random_box
from oftsr.conventions import image_to_uint8, uint8_to_image
from oftsr.degrade import degrade
from oftsr.ema import EMA
from oftsr.infer import sample
from oftsr.metrics import STLPIPS, psnr
from oftsr.nets import build_unet, count_parameters, save_weights
from oftsr.samples import export_sample_photos
from oftsr.training import OptimConfig, lr_at, make_optimizer, teacher_step


@dataclasses.dataclass(frozen=True)
class LocalTeacherConfig:
    out_dir: str = "outputs/quickstart"
    photos_dir: str = "outputs/sample_photos"
    held_out: tuple[str, ...] = ("chelsea", "flower")
    preset: str = "tiny"
    crop: int = 64
    sf: int = 4
    degradation: str = "bicubic"
    sigma_p: float = 0.2
    batch: int = 16
    steps: int = 400
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=5e-4, warmup_images=800))
    ema_half_life_images: float = 1000.0
    sampler: str = "midpoint"
    sampler_steps: int = 10
    eval_crops: int = 4
    seed: int = 0
    threads: int = 0  # 0: torch's default

    def __post_init__(self) -> None:
        for name in ("crop", "sf", "batch", "steps", "sampler_steps", "eval_crops"):
            if getattr(self, name) < 1:
                raise ValueError(f"LocalTeacherConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.crop % self.sf:
            raise ValueError(f"LocalTeacherConfig.crop ({self.crop}) must be a multiple of sf ({self.sf})")
        if self.degradation not in ("bicubic", "avgpool"):
            raise ValueError(
                f"LocalTeacherConfig.degradation must be bicubic or avgpool, got {self.degradation!r} (the realesrgan "
                "chain trains through `oftsr run realworld_quickstart`, which fine-tunes the shipped teacher on it)"
            )


def _load_rgb(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def _grid_png(rows: list[list[torch.Tensor]], path: Path) -> None:
    """Save rows of ``(3, H, W)`` images in [-1, 1] as one PNG."""
    strips = [torch.cat([image_to_uint8(im) for im in row], dim=-1) for row in rows]
    arr = torch.cat(strips, dim=-2).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr).save(path)


def run(cfg: LocalTeacherConfig = LocalTeacherConfig(), log=print) -> dict:
    """Train, evaluate, write the outputs; returns the metrics dict (also in ``metrics.json``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # Data: sample photos, split by name into training and held-out images.
    paths = export_sample_photos(cfg.photos_dir)
    train = [_load_rgb(p) for p in paths if p.stem not in cfg.held_out]
    held = [_load_rgb(p) for p in paths if p.stem in cfg.held_out]
    if not train or not held:
        raise ValueError(f"need training and held-out photos; held_out={cfg.held_out} among {[p.stem for p in paths]}")

    def batch() -> torch.Tensor:
        idx = torch.randint(len(train), (cfg.batch,), generator=gen)
        crops = []
        for i in idx.tolist():
            im = train[i]
            crops.append(apply_box(im, random_box(im.shape[1], im.shape[2], cfg.crop, generator=gen)))
        return uint8_to_image(torch.stack(crops))

    # Model.
    net = build_unet(cfg.preset, image_size=cfg.crop)
    ema = EMA(net, cfg.ema_half_life_images)
    opt = make_optimizer(net.parameters(), cfg.optim)
    log(
        f"teacher: preset {cfg.preset}, {count_parameters(net) / 1e6:.2f} M parameters, {cfg.steps} steps "
        f"of {cfg.batch} crops {cfg.crop}x{cfg.crop}"
    )

    # Training loop, counted in images.
    images, losses, start = 0, [], time.perf_counter()
    for step in range(1, cfg.steps + 1):
        hr = batch()
        _, x_lr = degrade(hr, cfg.sf, cfg.degradation)
        stats = teacher_step(
            net,
            opt,
            hr,
            x_lr,
            sigma_p=cfg.sigma_p,
            lr=lr_at(images, cfg.optim),
            grad_clip=cfg.optim.grad_clip,
            generator=gen,
        )
        images += hr.shape[0]
        ema.update(net, hr.shape[0])
        losses.append(float(stats["loss"]))
        if step % 50 == 0 or step == cfg.steps:
            rate = images / (time.perf_counter() - start)
            log(f"step {step:5d}  images {images:7d}  l1 {np.mean(losses[-50:]):.4f}  {rate:.1f} images/s")
    train_seconds = time.perf_counter() - start

    # Evaluation on held-out photos: fixed crops, fixed noise.
    eval_gen = torch.Generator().manual_seed(cfg.seed + 1)
    crops = []
    for im in held:
        crops.append(apply_box(im, center_box(im.shape[1], im.shape[2], cfg.crop)))
        for _ in range(cfg.eval_crops - 1):
            crops.append(
                apply_box(im, random_box(im.shape[1], im.shape[2], cfg.crop, p_hflip=0, p_vflip=0, generator=eval_gen))
            )
    hr = uint8_to_image(torch.stack(crops))
    lr, x_lr = degrade(hr, cfg.sf, cfg.degradation)
    sol = sample(ema.module, x_lr, sigma_p=cfg.sigma_p, method=cfg.sampler, steps=cfg.sampler_steps, generator=eval_gen)
    st_lpips = STLPIPS()
    with torch.no_grad():
        st_bicubic, st_teacher = float(st_lpips(x_lr, hr).mean()), float(st_lpips(sol.x, hr).mean())
    metrics = {
        "train_images": images,
        "train_seconds": round(train_seconds, 1),
        "images_per_s": round(images / train_seconds, 2),
        "l1_first50": float(np.mean(losses[:50])),
        "l1_last50": float(np.mean(losses[-50:])),
        "psnr_bicubic": float(psnr(x_lr, hr).mean()),
        "psnr_teacher": float(psnr(sol.x, hr).mean()),
        "st_lpips_bicubic": st_bicubic,
        "st_lpips_teacher": st_teacher,
        "teacher_nfe": sol.nfe,
        "held_out": list(cfg.held_out),
    }

    # Outputs.
    save_weights(net, out / "teacher.safetensors")
    save_weights(ema.module, out / "ema.safetensors")
    (out / "config.json").write_text(
        json.dumps({"recipe": dataclasses.asdict(cfg), "unet": net.config.to_dict()}, indent=2, default=str)
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    nearest = torch.nn.functional.interpolate(lr, scale_factor=cfg.sf, mode="nearest")
    _grid_png([[nearest[i], x_lr[i], sol.x[i], hr[i]] for i in range(min(6, len(hr)))], out / "comparison.png")
    log(
        f"held-out PSNR / ST-LPIPS: bicubic {metrics['psnr_bicubic']:.2f} dB / {st_bicubic:.3f}, "
        f"teacher ({sol.nfe} NFE) {metrics['psnr_teacher']:.2f} dB / {st_teacher:.3f}"
    )
    log(f"wrote {out}/comparison.png (columns: LR, bicubic, teacher, HR), weights, config.json, metrics.json")
    return metrics
