"""Inference: the one-step student with its fidelity-realism knob, tiled upscaling, and the teacher's sampler.

One step (DESIGN section 6): ``x_hat(t) = x0 + v_phi(x0, t | x_lr)``. t -> 0 favours fidelity (PSNR), t -> 1
realism (LPIPS / FID). Images of any size are processed whole (reflect-padded to the network's multiple) or in
overlapping tiles blended with weights that ramp down over the overlap, so no seam shows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from oftsr.conventions import check_image
from oftsr.degrade import Kind, upsample
from oftsr.flow import Velocity, as_time, conditioned, noisy_start
from oftsr.solvers import Solution, solve


def check_knob(t: float | torch.Tensor) -> float | torch.Tensor:
    """Reject knob values that are not finite or lie outside [0, 1] (``ValueError``)."""
    tt = torch.as_tensor(t, dtype=torch.float64)
    if not bool(torch.isfinite(tt).all()):
        raise ValueError(f"knob t must be finite, got {t!r}")
    if bool((tt < 0).any()) or bool((tt > 1).any()):
        raise ValueError(f"knob t must lie in [0, 1] (0 = fidelity, 1 = realism), got {t!r}")
    return t


#: The knob's trained range when a model does not record its own (DESIGN section 4: distillation draws t in it).
TRAINED_RANGE: tuple[float, float] = (0.01, 0.99)


def network_time(t: float | torch.Tensor, trained: tuple[float, float] = TRAINED_RANGE) -> float | torch.Tensor:
    """The time at which the student is queried for knob ``t``: the knob's [0, 1] laid linearly over the range the
    student was distilled on, ``t_min + t (t_max - t_min)``, so that knob 0 and 1 are the trained end points (where
    the official code evaluates its students) and every knob value is a trained time (beyond ``t_max`` the time
    embedding is one that distillation never trained). With the paper's range (0.01, 0.99) the knob and the time
    differ by at most 0.01."""
    lo, hi = trained
    return lo + t * (hi - lo) if isinstance(t, torch.Tensor) else lo + float(t) * (hi - lo)


def one_step(
    student: Velocity, x0: torch.Tensor, t: float | torch.Tensor, trained: tuple[float, float] = TRAINED_RANGE
) -> torch.Tensor:
    """``x0 + v_phi(x0, t')``: the student's one-step output ``(B, 3, H, W)`` at knob ``t`` (scalar or ``(B,)``),
    with ``t'`` the knob laid over the ``trained`` range (:func:`network_time`)."""
    check_knob(t)
    return x0 + student(x0, as_time(network_time(t, trained), x0.shape[0], x0.device))


@contextlib.contextmanager
def evaluating(net: nn.Module) -> Iterator[nn.Module]:
    """Put ``net`` in eval mode under ``torch.inference_mode`` and restore its mode afterwards."""
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            yield net
    finally:
        net.train(was_training)


def _pad_to(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int, int]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, h, w
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), h, w


def _one_step_padded(net: nn.Module, x0: torch.Tensor, x_lr: torch.Tensor, t: float, trained) -> torch.Tensor:
    multiple = getattr(net, "downsample_factor", 1)
    x0p, h, w = _pad_to(x0, multiple)
    x_lrp, _, _ = _pad_to(x_lr, multiple)
    return one_step(conditioned(net, x_lrp), x0p, t, trained)[..., :h, :w]


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def _ramp(start: int, size: int, length: int, overlap: int, device: torch.device) -> torch.Tensor:
    """1-D blending weight of a tile: rises over ``overlap`` pixels at interior edges, 1 elsewhere, never 0."""
    i = torch.arange(size, device=device, dtype=torch.float32)
    w = torch.ones(size, device=device)
    if overlap > 0:
        if start > 0:
            w = torch.minimum(w, (i + 1) / (overlap + 1))
        if start + size < length:
            w = torch.minimum(w, (size - i) / (overlap + 1))
    return w


def upscale(
    net: nn.Module,
    lr_image: torch.Tensor,
    t: float,
    *,
    sigma_p: float,
    sf: int = 4,
    kind: Kind = "bicubic",
    tile: int | None = None,
    overlap: int | None = None,
    tile_batch: int = 16,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    trained: tuple[float, float] = TRAINED_RANGE,
) -> torch.Tensor:
    """Upscale LR images ``(B, 3, h, w)`` in [-1, 1] by ``sf`` with the one-step student at knob ``t``.

    Args:
        net: the student network ``net(cat([x, x_lr], 1), 999 t)``.
        lr_image: low-resolution input, any h x w.
        t: knob in [0, 1].
        sigma_p: noise level of the start (the model's training value).
        tile: HR tile size (a multiple of the network's down-sampling factor); ``None`` processes whole images.
        overlap: HR pixels shared by neighbouring tiles (default ``tile // 4``).
        tile_batch: tiles evaluated per network call.
        generator, noise: the start's noise (``noise`` has the HR shape ``(B, 3, h sf, w sf)``).
        trained: the model's trained knob range ``(t_min, t_max)`` (:func:`network_time`).

    Returns:
        ``(B, 3, h sf, w sf)`` in [-1, 1] (not clamped).
    """
    check_knob(t)
    check_image(lr_image, "lr_image")
    t = float(t)
    with evaluating(net):
        x_lr = upsample(lr_image, sf, kind)
        x0 = noisy_start(x_lr, sigma_p, generator, noise=noise)
        b, _, height, width = x0.shape
        if tile is None or (height <= tile and width <= tile):
            return _one_step_padded(net, x0, x_lr, t, trained)
        multiple = getattr(net, "downsample_factor", 1)
        if tile % multiple:
            raise ValueError(f"tile {tile} must be a multiple of the network's down-sampling factor {multiple}")
        overlap = tile // 4 if overlap is None else overlap
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap must lie in [0, tile), got overlap={overlap}, tile={tile}")
        boxes = [(y, x) for y in _starts(height, tile, overlap) for x in _starts(width, tile, overlap)]
        th, tw = min(tile, height), min(tile, width)
        out = torch.zeros_like(x0, dtype=torch.float32)
        weight = torch.zeros((height, width), device=x0.device)
        ramps = {}  # one blending weight per tile position, shared by every image
        for y, x in boxes:
            ramps[y, x] = _ramp(y, th, height, overlap, x0.device)[:, None] * _ramp(x, tw, width, overlap, x0.device)
            weight[y : y + th, x : x + tw] += ramps[y, x]
        jobs = [(i, y, x) for i in range(b) for (y, x) in boxes]
        for k in range(0, len(jobs), tile_batch):
            chunk = jobs[k : k + tile_batch]
            x0_t = torch.stack([x0[i, :, y : y + th, x : x + tw] for i, y, x in chunk])
            xl_t = torch.stack([x_lr[i, :, y : y + th, x : x + tw] for i, y, x in chunk])
            pred = _one_step_padded(net, x0_t, xl_t, t, trained).float()
            pred *= torch.stack([ramps[y, x] for _, y, x in chunk])[:, None]
            for (i, y, x), p in zip(chunk, pred, strict=True):
                out[i, :, y : y + th, x : x + tw] += p
        return (out / weight).to(x0.dtype)


def sample(
    net: nn.Module,
    x_lr: torch.Tensor,
    *,
    sigma_p: float,
    method: str = "rk45",
    steps: int | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    **solver_kwargs,
) -> Solution:
    """The teacher's multi-step sample: solve ``dx/dt = v_theta(x, t | x_lr)`` from the noisy start to t = 1.

    ``x_lr`` ``(B, 3, H, W)`` with H, W multiples of the network's factor. Returns the solver's
    :class:`~oftsr.solvers.Solution` (``x`` is the HR estimate, ``nfe`` the evaluations).
    """
    with evaluating(net):
        x0 = noisy_start(x_lr, sigma_p, generator, noise=noise)
        return solve(conditioned(net, x_lr), x0, method=method, steps=steps, **solver_kwargs)


def tile_count(height: int, width: int, tile: int, overlap: int) -> int:
    """Number of tiles :func:`upscale` uses for one HR image of ``height x width``."""
    return len(_starts(height, tile, overlap)) * len(_starts(width, tile, overlap))


__all__ = ["check_knob", "evaluating", "one_step", "sample", "tile_count", "upscale"]
