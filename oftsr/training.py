"""Optimisation steps for the teacher and the online-distilled student, in plain PyTorch (DESIGN sections 3-4).

These are the bodies that the Ray Train loops and the local quickstart both call: one function per step, returning
detached tensors (no host synchronisation inside the step). Schedules are counted in images.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from oftsr.flow import conditioned, noisy_start
from oftsr.losses import distill_cached, distill_online, sample_distill_times, teacher_loss


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Adam with linear warm-up (in images) and gradient clipping."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_images: int = 16_000
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"OptimConfig.lr must be > 0, got {self.lr}")
        if self.warmup_images < 0:
            raise ValueError(f"OptimConfig.warmup_images must be >= 0, got {self.warmup_images}")
        if self.grad_clip <= 0:
            raise ValueError(f"OptimConfig.grad_clip must be > 0, got {self.grad_clip}")


def make_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Adam:
    params = list(params)
    fused = bool(params) and params[0].is_cuda
    return torch.optim.Adam(
        params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused or None
    )


def lr_at(images_seen: int, cfg: OptimConfig) -> float:
    """Learning rate after ``images_seen`` images: linear warm-up to ``cfg.lr``, then constant."""
    if cfg.warmup_images == 0:
        return cfg.lr
    return cfg.lr * min(1.0, (images_seen + 1) / cfg.warmup_images)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``bf16`` / ``fp16`` autocast on ``device``, or nothing for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _optimise(net: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float, clip: float):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return grad_norm


def teacher_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    hr: torch.Tensor,
    x_lr: torch.Tensor,
    *,
    sigma_p: float,
    lr: float,
    grad_clip: float = 1.0,
    t_min: float = 1e-3,
    loss_kind: str = "l1",
    precision: str = "fp32",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """One teacher update on ``hr`` / ``x_lr`` ``(B, 3, H, W)``: ``t ~ U[t_min, 1]``, fresh noise.

    Returns detached ``{"loss", "grad_norm"}``.
    """
    x0 = noisy_start(x_lr, sigma_p, generator)
    t = t_min + (1.0 - t_min) * torch.rand(hr.shape[0], generator=generator, device=hr.device)
    with autocast(hr.device, precision):
        loss = teacher_loss(conditioned(net, x_lr), x0, hr, t, kind=loss_kind).float().mean()
    grad_norm = _optimise(net, optimizer, loss, lr, grad_clip)
    return {"loss": loss.detach(), "grad_norm": grad_norm.detach()}


def distill_step(
    student_net: nn.Module,
    teacher_net: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_lr: torch.Tensor,
    *,
    sigma_p: float,
    lr: float,
    grad_clip: float = 1.0,
    precision: str = "fp32",
    generator: torch.Generator | None = None,
    **loss_kwargs,
) -> dict[str, torch.Tensor]:
    """One online distillation update (DESIGN section 4); the teacher must be frozen (eval, no grad).

    Returns detached batch means of ``distil``, ``align``, ``bound``, ``total`` and the ``grad_norm``.
    """
    x0 = noisy_start(x_lr, sigma_p, generator)
    t_min, t_max = loss_kwargs.get("t_min", 0.01), loss_kwargs.get("t_max", 0.99)
    t = sample_distill_times(x0.shape[0], t_min=t_min, t_max=t_max, generator=generator, device=x0.device)
    with autocast(x0.device, precision):
        terms = distill_online(conditioned(student_net, x_lr), conditioned(teacher_net, x_lr), x0, t, **loss_kwargs)
    loss = terms["total"].mean()
    grad_norm = _optimise(student_net, optimizer, loss, lr, grad_clip)
    out = {k: v.detach().mean() for k, v in terms.items()}
    out["grad_norm"] = grad_norm.detach()
    return out


def distill_cached_step(
    student_net: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    *,
    lr: float,
    grad_clip: float = 1.0,
    precision: str = "fp32",
    **loss_kwargs,
) -> dict[str, torch.Tensor]:
    """One distillation update from cached teacher targets (DESIGN section 5): no teacher call.

    ``batch`` holds ``x_lr``, ``x0``, ``t`` ``(B,)``, ``u_bar``, ``v_bar``, ``v_bound``.
    """
    loss_kwargs = {k: v for k, v in loss_kwargs.items() if k not in ("dt", "r")}
    with autocast(batch["x0"].device, precision):
        terms = distill_cached(
            conditioned(student_net, batch["x_lr"]),
            batch["x0"],
            batch["t"],
            batch["u_bar"],
            batch["v_bar"],
            batch["v_bound"],
            **loss_kwargs,
        )
    loss = terms["total"].mean()
    grad_norm = _optimise(student_net, optimizer, loss, lr, grad_clip)
    out = {k: v.detach().mean() for k, v in terms.items()}
    out["grad_norm"] = grad_norm.detach()
    return out
