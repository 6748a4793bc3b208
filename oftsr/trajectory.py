"""Teacher-trajectory targets for one batch of crops (plain PyTorch, DESIGN section 5).

Every sample is fully determined by its HR crop and its integer seed: the measurement noise and the start noise
``eps`` are regenerated from the seed (:func:`sample_inputs`), never stored. Along the teacher's ODE from the noisy
start (t = 0) to the HR end (t = 1) we keep, at each grid time ``t_k``, the average velocity from the start
``u_k = (x(t_k) - x0) / t_k`` and the teacher's RK2 step velocity ``v_bar_k`` from ``x(t_k)`` over
``min(t_k + dt, t_max) - t_k``; plus the boundary velocity ``v(x0, t_min)``, the endpoint and the NFE.
"""

from __future__ import annotations

import hashlib
import itertools

import torch
from torch import nn

from oftsr.conventions import uint8_to_image
from oftsr.degrade import SEEDED_KINDS, degrade, upsample
from oftsr.flow import conditioned, noise_from_seed, noisy_start
from oftsr.solvers import RK2_PARAMETER, rk2_velocity, solve


def sample_seed(cache_seed: int, key: str, crop_index: int, seed_index: int) -> int:
    """The integer seed of one cached sample, a pure function of where it came from."""
    digest = hashlib.blake2b(f"{cache_seed}\0{key}\0{crop_index}\0{seed_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def sample_inputs(
    hr_uint8: torch.Tensor,
    seeds: list[int],
    *,
    sf: int,
    kind: str,
    sigma_y: float,
    sigma_p: float,
    lr_uint8: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hr, x_lr, x0, eps)`` for uint8 crops ``(B, 3, H, W)`` and one seed per crop (CPU, deterministic). Kinds
    drawn per sample (realesrgan) are not regenerated: their stored LR ``lr_uint8`` (LR-sized, or HR-sized when the
    chain resized it back) gives the condition."""
    hr = uint8_to_image(hr_uint8)
    eps = noise_from_seed(hr.shape[1:], seeds)
    if lr_uint8 is not None:
        lr = uint8_to_image(lr_uint8)
        x_lr = lr if lr.shape[-2:] == hr.shape[-2:] else upsample(lr, sf, kind)
        return hr, x_lr, noisy_start(x_lr, sigma_p, noise=eps), eps
    if kind in SEEDED_KINDS:
        raise ValueError(f"the {kind} degradation is stored with the sample: pass its LR (lr_uint8)")
    x_lr = torch.cat(
        [
            degrade(
                hr[i : i + 1], sf, kind, sigma_y, torch.Generator().manual_seed(s ^ 0x5EED) if sigma_y > 0 else None
            )[1]
            for i, s in enumerate(seeds)
        ]
    )
    return hr, x_lr, noisy_start(x_lr, sigma_p, noise=eps), eps


def stored_indices(seed: int, grid_size: int, points: int) -> list[int]:
    """Which grid points a sample stores: all, or ``points`` of them chosen by its seed."""
    if points <= 0 or points >= grid_size:
        return list(range(grid_size))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(grid_size, generator=g)[:points].tolist())


@torch.no_grad()
def teacher_targets(
    net: nn.Module,
    x_lr: torch.Tensor,
    x0: torch.Tensor,
    grid: tuple[float, ...],
    *,
    method: str = "midpoint",
    steps_per_interval: int = 1,
    dt: float = 0.05,
    r: float = 0.5,
    t_min: float = 0.01,
    t_max: float = 0.99,
    chunk: int = 64,
) -> dict[str, torch.Tensor | int]:
    """Targets for ``(B, 3, H, W)`` starts: ``u_bar``/``v_bar`` ``(K, B, 3, H, W)``, ``states`` (the ODE states at
    the grid), ``v_bound`` and ``endpoint`` ``(B, 3, H, W)``, ``nfe`` (of the ODE solve)."""
    v = conditioned(net, x_lr)
    times = [0.0, *grid] + ([1.0] if grid[-1] < 1.0 else [])
    k, b = len(grid), x0.shape[0]
    steps_of = {}  # grid index -> the solver's step velocity from that grid point, where it is v_bar's own step
    if RK2_PARAMETER.get(method) == r and steps_per_interval == 1:
        # One RK2 step per interval, with v_bar's parameter r: where the interval from t_k is v_bar's step
        # (min(t_k + dt, t_max) - t_k), the solver's step velocity is v_bar_k itself; no second evaluation.
        x, nfe, kept = x0, 0, []
        for i, (ta, tb) in enumerate(itertools.pairwise(times)):
            step = rk2_velocity(v, x, ta, tb - ta, r)
            nfe += 2
            if i >= 1 and abs((tb - ta) - (max(0.0, min(ta + dt, t_max) - ta))) < 1e-9:
                steps_of[i - 1] = step
            x = x + (tb - ta) * step
            if i < k:
                kept.append(x)
        states, endpoint = torch.stack(kept), x
    else:
        sol = solve(v, x0, method=method, steps=steps_per_interval, time_grid=times, return_intermediates=True)
        states, endpoint, nfe = sol.states[1 : 1 + k], sol.x, sol.nfe  # (K, B, ...)
    t_k = torch.tensor(grid, device=x0.device, dtype=x0.dtype).view(k, 1, 1, 1, 1)
    u_bar = (states - x0.unsqueeze(0)) / t_k

    v_bar = torch.empty_like(states)
    for j, step in steps_of.items():
        v_bar[j] = step
    todo = [j for j in range(k) if j not in steps_of]
    if todo:
        flat = states[todo].reshape(len(todo) * b, *x0.shape[1:])
        t_flat = torch.tensor([grid[j] for j in todo], device=x0.device, dtype=x0.dtype).repeat_interleave(b)
        delta = torch.clamp(torch.clamp(t_flat + dt, max=t_max) - t_flat, min=0.0)
        out = torch.empty_like(flat)
        rows_per_call = max(b, (chunk // b) * b)
        for i in range(0, flat.shape[0], rows_per_call):
            xs, ts, ds = flat[i : i + rows_per_call], t_flat[i : i + rows_per_call], delta[i : i + rows_per_call]
            out[i : i + rows_per_call] = rk2_velocity(v, xs, ts, ds, r)
        v_bar[todo] = out.view(len(todo), b, *x0.shape[1:])
    v_bound = v(x0, torch.full((b,), t_min, device=x0.device))
    return {
        "u_bar": u_bar,
        "v_bar": v_bar,
        "states": states,
        "v_bound": v_bound,
        "endpoint": endpoint,
        "nfe": nfe,
    }
