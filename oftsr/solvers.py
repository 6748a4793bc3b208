"""ODE solvers for ``dx/dt = velocity(x, t)``, one interface for evaluation, the trajectory cache and tests.

:func:`solve` integrates from ``t0`` to ``t1`` (forward in time: t = 0 noisy LR, t = 1 HR). Methods:

* ``euler``: ``x += dt v(x, t)``.
* ``rk2`` with parameter ``r`` (``midpoint`` is r = 0.5, ``heun`` is r = 1):
  ``v1 = v(x, t)``, ``v2 = v(x + r dt v1, t + r dt)``, ``x += dt (v1 + (v2 - v1) / (2 r))``.
* ``rk45``: adaptive Dormand-Prince 5(4) with error control ``rtol``/``atol``; one step size for the whole batch,
  set by the worst sample (each sample meets the tolerance). NFE is counted exactly, rejected steps included.

Fixed-step methods take ``steps`` equal steps from ``t0`` to ``t1``; with a ``time_grid`` they take ``steps`` equal
sub-steps (default 1) between consecutive grid points and record the state at each grid point. ``rk45`` stops at
every point of ``time_grid`` (and records the state there) without stepping past it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
METHODS: tuple[str, ...] = ("euler", "midpoint", "heun", "rk2", "rk45")
#: The RK2 parameter r of the named second-order methods (``rk2`` takes its own).
RK2_PARAMETER: dict[str, float] = {"midpoint": 0.5, "heun": 1.0}


@dataclasses.dataclass
class Solution:
    """Result of :func:`solve`: final state ``x`` ``(B, ...)``, network evaluations ``nfe``; with
    ``return_intermediates``, ``times`` ``(K,)`` and ``states`` ``(K, B, ...)`` (the initial state first)."""

    x: torch.Tensor
    nfe: int
    times: torch.Tensor | None = None
    states: torch.Tensor | None = None


def _tvec(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)


def _grid(t0: float, t1: float, steps: int | None, time_grid: Sequence[float] | torch.Tensor | None) -> list[float]:
    """The recording times: ``time_grid`` if given, else ``steps + 1`` equal points from ``t0`` to ``t1``."""
    if time_grid is not None:
        grid = [float(t) for t in (time_grid.tolist() if isinstance(time_grid, torch.Tensor) else time_grid)]
        if len(grid) < 2:
            raise ValueError("time_grid needs at least two points")
        if any(b <= a for a, b in itertools.pairwise(grid)):
            raise ValueError("time_grid must be strictly increasing")
        return grid
    if steps is None or steps < 1:
        raise ValueError(f"fixed-step solvers need steps >= 1 or a time_grid, got steps={steps!r}")
    return [t0 + (t1 - t0) * i / steps for i in range(steps + 1)]


def rk2_velocity(
    velocity: Velocity,
    x: torch.Tensor,
    t: float | torch.Tensor,
    dt: float | torch.Tensor,
    r: float,
    v1: torch.Tensor | None = None,
) -> torch.Tensor:
    """The velocity of one second-order Runge-Kutta step with parameter ``r``: ``v1 = v(x, t)``,
    ``v2 = v(x + r dt v1, t + r dt)``, ``v_bar = v1 + (v2 - v1) / (2 r)`` (the step is ``x + dt v_bar``).

    ``t`` and ``dt`` are scalars or ``(B,)`` tensors; ``v1`` may be given when it was already evaluated (it is then
    not evaluated again). The one teacher step of the solvers, the online distillation loss and the trajectory cache.
    """
    if isinstance(t, torch.Tensor):
        col = dt.view(-1, *([1] * (x.ndim - 1))) if isinstance(dt, torch.Tensor) else dt
        t_mid = t + r * dt
    else:
        col, t, t_mid = dt, _tvec(t, x), _tvec(t + r * dt, x)
    if v1 is None:
        v1 = velocity(x, t)
    v2 = velocity(x + (r * col) * v1, t_mid)
    return v1 + (v2 - v1) / (2.0 * r)


def rk2_step(velocity: Velocity, x: torch.Tensor, t: float, dt: float, r: float) -> torch.Tensor:
    """One second-order Runge-Kutta step with parameter ``r`` (2 evaluations): ``x + dt v_bar``."""
    return x + dt * rk2_velocity(velocity, x, t, dt, r)


def solve(
    velocity: Velocity,
    x0: torch.Tensor,
    *,
    method: str,
    steps: int | None = None,
    t0: float = 1e-3,
    t1: float = 1.0,
    r: float = 0.5,
    rtol: float = 1e-3,
    atol: float = 1e-3,
    time_grid: Sequence[float] | torch.Tensor | None = None,
    return_intermediates: bool = False,
) -> Solution:
    """Integrate ``dx/dt = velocity(x, t)``; ``velocity`` takes ``x`` ``(B, ...)`` and ``t`` ``(B,)``.

    Args:
        velocity: the field, e.g. :func:`oftsr.flow.conditioned`.
        x0: initial state ``(B, ...)`` at ``t0`` (or ``time_grid[0]``).
        method: one of :data:`METHODS`.
        steps: equal steps for fixed-step methods (with ``time_grid``: sub-steps per grid interval).
        t0, t1: start and end times, ``t0 < t1``.
        r: the ``rk2`` parameter (0 < r <= 1).
        rtol, atol: ``rk45`` tolerances.
        time_grid: increasing times at which states are recorded; integration starts at ``time_grid[0]``.
        return_intermediates: also return ``times`` and ``states``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown solver method {method!r}; expected one of {METHODS}")
    if method == "rk45":
        return _rk45(velocity, x0, t0, t1, rtol, atol, time_grid, return_intermediates)
    if time_grid is None and not t1 > t0:
        raise ValueError(f"solve integrates forward: need t0 < t1, got t0={t0}, t1={t1}")
    r = RK2_PARAMETER.get(method, r)
    if method != "euler" and not 0.0 < r <= 1.0:
        raise ValueError(f"rk2 parameter r must lie in (0, 1], got {r}")
    grid = _grid(t0, t1, steps, time_grid)
    sub = 1 if time_grid is None or steps is None else steps
    if sub < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x, nfe = x0, 0
    states = [x0] if return_intermediates else []
    for ta, tb in itertools.pairwise(grid):
        for j in range(sub):
            t, dt = ta + (tb - ta) * j / sub, (tb - ta) / sub
            if method == "euler":
                x = x + dt * velocity(x, _tvec(t, x))
                nfe += 1
            else:
                x = rk2_step(velocity, x, t, dt, r)
                nfe += 2
        if return_intermediates:
            states.append(x)
    if not return_intermediates:
        return Solution(x=x, nfe=nfe)
    return Solution(x=x, nfe=nfe, times=torch.tensor(grid), states=torch.stack(states))


# Dormand-Prince 5(4) tableau.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b5 - b4 for b5, b4 in zip(_B5, _B4, strict=True))


def _error_ratio(err: torch.Tensor, x: torch.Tensor, x_new: torch.Tensor, rtol: float, atol: float) -> float:
    """Worst per-sample RMS of ``err / (atol + rtol max(|x|, |x_new|))``; <= 1 means the step is accepted."""
    scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
    per_sample = (err / scale).float().pow(2).flatten(1).mean(dim=1).sqrt()
    return float(per_sample.max())


def _rk45(
    velocity: Velocity,
    x0: torch.Tensor,
    t0: float,
    t1: float,
    rtol: float,
    atol: float,
    time_grid: Sequence[float] | torch.Tensor | None,
    return_intermediates: bool,
) -> Solution:
    if rtol <= 0 or atol <= 0:
        raise ValueError(f"rk45 needs rtol > 0 and atol > 0, got rtol={rtol}, atol={atol}")
    stops = _grid(t0, t1, 1, time_grid)
    t, x = stops[0], x0
    k1 = velocity(x, _tvec(t, x))
    nfe = 1
    # Initial step (Hairer, Norsett & Wanner, II.4): one extra evaluation.
    scale = atol + rtol * x.abs()
    d0 = float((x / scale).pow(2).mean().sqrt())
    d1 = float((k1 / scale).pow(2).mean().sqrt())
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, stops[-1] - t)
    k_probe = velocity(x + h0 * k1, _tvec(t + h0, x))
    nfe += 1
    d2 = float(((k_probe - k1) / scale).pow(2).mean().sqrt()) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    h = min(100 * h0, h1)

    times, states = [t], [x]
    for target in stops[1:]:
        while t < target - 1e-12:
            if h < 1e-10:
                raise RuntimeError(
                    f"rk45 step size underflow at t={t:.6g} (rtol={rtol}, atol={atol}): non-finite field?"
                )
            h = min(h, target - t)
            ks = [k1]
            for i in range(1, 7):
                xi = x + h * sum(a * k for a, k in zip(_A[i], ks, strict=False))
                ks.append(velocity(xi, _tvec(t + _C[i] * h, x)))
            nfe += 6
            x_new = xi  # stage 7 state is the 5th-order solution (FSAL)
            err = h * sum(e * k for e, k in zip(_E, ks, strict=True))
            ratio = _error_ratio(err, x, x_new, rtol, atol)
            if ratio <= 1.0:
                t = target if abs(target - (t + h)) < 1e-12 else t + h
                x, k1 = x_new, ks[6]
            factor = 10.0 if ratio == 0 else min(10.0, max(0.2, 0.9 * ratio ** (-1 / 5)))
            if ratio > 1.0:
                factor = min(factor, 1.0)
            h = h * factor
        times.append(t)
        states.append(x)
    if not return_intermediates:
        return Solution(x=x, nfe=nfe)
    return Solution(x=x, nfe=nfe, times=torch.tensor(times), states=torch.stack(states))
