"""Training losses as per-sample callables (DESIGN sections 3-5). Each returns ``(B,)`` tensors; the training loop
reduces (batch mean) and logs every term on its own.

``student`` and ``teacher`` are velocity callables ``(x, t) -> v`` with the condition bound
(:func:`oftsr.flow.conditioned`). Both accept ``k`` stacked copies of the batch in one call, which is how the
evaluations that can share a call are batched. The teacher is only ever evaluated under ``torch.no_grad``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from oftsr.flow import as_time, interpolate
from oftsr.solvers import rk2_velocity

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _mean_pix(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def _hi(x: torch.Tensor) -> torch.Tensor:
    """Half precision (autocast outputs) up to fp32; fp32 and fp64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def teacher_loss(
    velocity: Velocity, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, kind: str = "l1"
) -> torch.Tensor:
    """Rectified-flow loss ``d(v(x_t, t), x1 - x0)`` per sample ``(B,)``, ``x_t = t x1 + (1 - t) x0``.

    ``kind`` is ``"l1"`` (mean absolute error, the paper's choice) or ``"l2"`` (mean squared error).
    """
    if kind not in ("l1", "l2"):
        raise ValueError(f"teacher loss kind must be 'l1' or 'l2', got {kind!r}")
    t = as_time(t, x0.shape[0], x0.device)
    diff = velocity(interpolate(x0, x1, t), t) - (x1 - x0)
    return _mean_pix(diff.abs() if kind == "l1" else diff.square())


def sample_distill_times(
    batch: int,
    *,
    t_min: float = 0.01,
    t_max: float = 0.99,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``t ~ U[t_min, t_max]``, ``(batch,)``."""
    u = torch.rand(batch, generator=generator, device=device)
    return t_min + (t_max - t_min) * u


def _check_t(t: torch.Tensor, t_min: float, t_max: float) -> None:
    if t.ndim != 1:
        raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
    inside = ((t >= t_min - 1e-6) & (t <= t_max + 1e-6)).all()
    if t.is_cuda:  # checked on the device: reading the flag back would stall the step on a host sync
        torch._assert_async(inside, f"distillation times must lie in [{t_min}, {t_max}]")
    elif not bool(inside):
        raise ValueError(f"distillation times must lie in [{t_min}, {t_max}]")


def distill_online(
    student: Velocity,
    teacher: Velocity,
    x0: torch.Tensor,
    t: torch.Tensor,
    *,
    dt: float = 0.05,
    r: float = 0.5,
    t_min: float = 0.01,
    t_max: float = 0.99,
    w_distil: float = 1.0,
    w_bound: float = 0.1,
    w_align: float = 0.01,
    fp32_targets: bool = True,
) -> dict[str, torch.Tensor]:
    """OFTSR's one-step distillation loss with online teacher targets, per sample (DESIGN section 4).

    With ``s = min(t + dt, t_max)``, ``D = s - t``, ``vt = v_phi(x0, t)``, ``vs = v_phi(x0, s)``,
    ``xt = x0 + t sg(vt)`` and the teacher's RK2 step ``vbar`` from ``xt`` over ``D`` (no grad)::

        distil = mean_pix((vs - sg(vt + (D / s)(vbar - vt)))^2)
        align  = (1 - t)^2 mean_pix((vt - vbar)^2)
        bound  = mean_pix((v_phi(x0, t_min) - sg(v_theta(x0, t_min)))^2)
        total  = w_distil distil + w_bound bound + w_align align

    Gradients reach the student through ``vs`` (distil), ``vt`` (align) and the boundary call (bound); the
    target of ``distil`` is detached. The three student calls share one batched call, and so do the teacher's
    first RK2 evaluation and its boundary evaluation.

    ``fp32_targets``: under autocast, the teacher's calls (its step and boundary velocity) run in fp32 and the
    targets are formed in fp32, as in the official code (which trains in fp32). The useful part of the target is a
    small correction (``D / s`` times the difference of two velocities), which bf16 outputs of the teacher would
    round (measured: ``benchmarks/distill_precision.py``). ``False`` lets autocast run the teacher in low precision.

    Args:
        x0: noisy starts ``(B, 3, H, W)``; t: ``(B,)`` in ``[t_min, t_max]``.

    Returns:
        ``{"distil", "align", "bound", "total"}``, each ``(B,)``.
    """
    _check_t(t, t_min, t_max)
    if not 0.0 < r <= 1.0:
        raise ValueError(f"rk2 parameter r must lie in (0, 1], got {r}")
    b = x0.shape[0]
    t = t.to(device=x0.device, dtype=_hi(x0).dtype)
    s = torch.clamp(t + dt, max=t_max)
    delta = s - t
    t_bound = torch.full_like(t, t_min)

    v_all = student(torch.cat([x0, x0, x0]), torch.cat([t, s, t_bound]))
    vt, vs, v_bound_student = v_all[:b], v_all[b : 2 * b], v_all[2 * b :]

    col = lambda z: z.view(-1, 1, 1, 1)  # noqa: E731
    exact = torch.autocast(x0.device.type, enabled=False) if fp32_targets else contextlib.nullcontext()
    with torch.no_grad(), exact:
        xt = _hi(x0) + col(t) * _hi(vt.detach())
        first = _hi(teacher(torch.cat([xt, _hi(x0)]), torch.cat([t, t_bound])))
        v1, v_bound_teacher = first[:b], first[b:]
        v_bar = _hi(rk2_velocity(teacher, xt, t, delta, r, v1=v1))
        target = _hi(vt.detach()) + col(delta / s) * (v_bar - _hi(vt.detach()))

    distil = _mean_pix((_hi(vs) - target).square())
    align = (1.0 - t).square() * _mean_pix((_hi(vt) - v_bar).square())
    bound = _mean_pix((_hi(v_bound_student) - v_bound_teacher).square())
    total = w_distil * distil + w_bound * bound + w_align * align
    return {"distil": distil, "align": align, "bound": bound, "total": total}


def distill_cached(
    student: Velocity,
    x0: torch.Tensor,
    t: torch.Tensor,
    u_bar: torch.Tensor,
    v_bar: torch.Tensor,
    v_bound: torch.Tensor,
    *,
    t_min: float = 0.01,
    t_max: float = 0.99,
    w_distil: float = 1.0,
    w_bound: float = 0.1,
    w_align: float = 0.01,
) -> dict[str, torch.Tensor]:
    """Distillation from precomputed teacher trajectories, per sample (DESIGN section 5).

    ``t`` ``(B,)`` are cached grid times ``t_k``; ``u_bar = (x_theta(t_k) - x0) / t_k`` is the teacher's average
    velocity from the start, ``v_bar`` its step velocity at ``x_theta(t_k)``, ``v_bound = v_theta(x0, t_min)``::

        distil = mean_pix((v_phi(x0, t) - u_bar)^2)
        align  = (1 - t)^2 mean_pix((v_phi(x0, t) - v_bar)^2)
        bound  = mean_pix((v_phi(x0, t_min) - v_bound)^2)

    No teacher call. Returns ``{"distil", "align", "bound", "total"}``, each ``(B,)``.
    """
    _check_t(t, t_min, t_max)
    b = x0.shape[0]
    t = t.to(device=x0.device, dtype=_hi(x0).dtype)
    v_all = _hi(student(torch.cat([x0, x0]), torch.cat([t, torch.full_like(t, t_min)])))
    vt, vb = v_all[:b], v_all[b:]
    distil = _mean_pix((vt - _hi(u_bar)).square())
    align = (1.0 - t).square() * _mean_pix((vt - _hi(v_bar)).square())
    bound = _mean_pix((vb - _hi(v_bound)).square())
    total = w_distil * distil + w_bound * bound + w_align * align
    return {"distil": distil, "align": align, "bound": bound, "total": total}
