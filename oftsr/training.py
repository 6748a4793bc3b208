"""Optimisation steps for the teacher and the online-distilled student, in plain PyTorch (DESIGN sections 3-4).

The training objective (teacher, online distillation, cached distillation) is built once before the loop, as EDM's
loss classes are: each is a callable ``objective(net, batch, generator) -> {term: (B,)}`` with one signature, so the
loop calls :func:`train_step` the same way for every stage and never branches on the stage kind. Schedules are
counted in images.
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


class TeacherObjective:
    """The teacher's rectified-flow loss on a batch ``{"hr", "x_lr"}``: ``t ~ U[t_min, 1]``, fresh start noise."""

    def __init__(self, *, sigma_p: float, t_min: float = 1e-3, kind: str = "l1"):
        self.sigma_p, self.t_min, self.kind = sigma_p, t_min, kind

    def __call__(self, net: nn.Module, batch: dict[str, torch.Tensor], generator=None) -> dict[str, torch.Tensor]:
        hr, x_lr = batch["hr"], batch["x_lr"]
        x0 = noisy_start(x_lr, self.sigma_p, generator)
        t = self.t_min + (1.0 - self.t_min) * torch.rand(hr.shape[0], generator=generator, device=hr.device)
        return {"loss": teacher_loss(conditioned(net, x_lr), x0, hr, t, kind=self.kind)}


class OnlineDistillObjective:
    """OFTSR's distillation loss with the frozen ``teacher`` queried in the step (DESIGN section 4) on a batch
    ``{"x_lr"}``: fresh start noise, ``t ~ U[t_min, t_max]``."""

    def __init__(self, teacher: nn.Module, *, sigma_p: float, t_min: float = 0.01, t_max: float = 0.99, **loss):
        self.teacher, self.sigma_p = teacher, sigma_p
        self.loss = {"t_min": t_min, "t_max": t_max, **loss}

    def __call__(self, net: nn.Module, batch: dict[str, torch.Tensor], generator=None) -> dict[str, torch.Tensor]:
        x_lr = batch["x_lr"]
        x0 = noisy_start(x_lr, self.sigma_p, generator)
        t = sample_distill_times(
            x0.shape[0], t_min=self.loss["t_min"], t_max=self.loss["t_max"], generator=generator, device=x0.device
        )
        return distill_online(conditioned(net, x_lr), conditioned(self.teacher, x_lr), x0, t, **self.loss)


class CachedDistillObjective:
    """Distillation from cached teacher targets (DESIGN section 5) on a batch ``{"x_lr", "x0", "t", "u_bar",
    "v_bar", "v_bound"}``: no teacher call."""

    def __init__(self, *, t_min: float = 0.01, t_max: float = 0.99, w_distil=1.0, w_bound=0.1, w_align=0.01, **_):
        self.loss = {"t_min": t_min, "t_max": t_max, "w_distil": w_distil, "w_bound": w_bound, "w_align": w_align}

    def __call__(self, net: nn.Module, batch: dict[str, torch.Tensor], generator=None) -> dict[str, torch.Tensor]:
        keys = ("x0", "t", "u_bar", "v_bar", "v_bound")
        return distill_cached(conditioned(net, batch["x_lr"]), *(batch[k] for k in keys), **self.loss)


Objective = TeacherObjective | OnlineDistillObjective | CachedDistillObjective


def train_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    objective: Objective,
    batch: dict[str, torch.Tensor],
    *,
    lr: float,
    grad_clip: float = 1.0,
    precision: str = "fp32",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """One update of ``net`` on ``objective``'s per-sample loss (its ``total`` term, or its only term), batch mean.

    Returns detached batch means of every term and the ``grad_norm`` (no host synchronisation).
    """
    device = next(net.parameters()).device
    with autocast(device, precision):
        terms = objective(net, batch, generator)
    loss = terms.get("total", next(iter(terms.values()))).float().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    out = {k: v.detach().float().mean() for k, v in terms.items()}
    out["grad_norm"] = grad_norm.detach()
    return out


def teacher_step(net, optimizer, hr, x_lr, *, sigma_p: float, lr: float, t_min: float = 1e-3, loss_kind="l1", **kw):
    """:func:`train_step` on :class:`TeacherObjective` (for scripts and benchmarks)."""
    objective = TeacherObjective(sigma_p=sigma_p, t_min=t_min, kind=loss_kind)
    return train_step(net, optimizer, objective, {"hr": hr, "x_lr": x_lr}, lr=lr, **kw)


def distill_step(student_net, teacher_net, optimizer, x_lr, *, sigma_p: float, lr: float, **kw):
    """:func:`train_step` on :class:`OnlineDistillObjective`; loss keywords (``dt``, ``r``, weights, range) pass on."""
    step_kw = {k: kw.pop(k) for k in ("grad_clip", "precision", "generator") if k in kw}
    objective = OnlineDistillObjective(teacher_net, sigma_p=sigma_p, **kw)
    return train_step(student_net, optimizer, objective, {"x_lr": x_lr}, lr=lr, **step_kw)
