"""Held-out evaluation where the accelerators are: the crops in shards (:func:`oftsr.evaluation.shard_bounds`), each
a Ray task that asks for what one of the distillation's training workers asks for (a GPU on a GPU cluster, CPUs
otherwise) and runs :func:`oftsr.evaluation.evaluate_shard` there: the teacher's ODE, the student over the knob
grid, the metrics. The driver only orchestrates: it sends the crops and the networks through the object store once,
merges the parts (:func:`oftsr.evaluation.combine`: the same table as one pass) and draws the strip from the
outputs that the first shard returns."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from oftsr.evaluation import EvalSettings, combine, evaluate_shard, shard_bounds
from oftsr.method import Method

#: How often a shard whose node died is run again elsewhere.
RETRIES = 2


def strip_outputs(
    student: nn.Module, hr: torch.Tensor, method: Method | EvalSettings, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """The strip's images for crops ``hr``: LR (nearest-neighbour enlarged), the student at t = 0 and t = 1 (on
    ``device``; the degradation and the noise are drawn on the CPU, so they are the same everywhere)."""
    from oftsr.degrade import SEEDED_KINDS, degrade
    from oftsr.flow import conditioned, noisy_start
    from oftsr.infer import evaluating, one_step

    settings = method if isinstance(method, EvalSettings) else EvalSettings(method=method)
    method = settings.method
    if method.degradation in SEEDED_KINDS:
        seeds = list(range(1, hr.shape[0] + 1))
        lr, x_lr = degrade(hr, method.sf, method.degradation, seeds=seeds, settings=settings.realesrgan.on_crops())
    else:
        lr, x_lr = degrade(hr, method.sf, method.degradation, method.sigma_y, torch.Generator().manual_seed(1))
    x0 = noisy_start(x_lr, method.sigma_p, torch.Generator().manual_seed(0))
    nearest = torch.nn.functional.interpolate(lr, scale_factor=method.sf, mode="nearest")
    x_lr, x0 = x_lr.to(device), x0.to(device)
    with torch.no_grad(), evaluating(student):
        v = conditioned(student, x_lr)
        trained = (method.t_min, method.t_max)
        lo, hi = one_step(v, x0, 0.0, trained), one_step(v, x0, 1.0, trained)
    return {"lr": nearest, "t0": lo.cpu(), "t1": hi.cpu()}


def _shard(
    hr: torch.Tensor,
    start: int,
    stop: int,
    settings: EvalSettings,
    student: nn.Module | None,
    teacher: nn.Module | None,
    use_gpu: bool,
    strip: int,
) -> dict[str, Any]:
    import ray

    device = "cuda" if use_gpu else "cpu"
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    student = student.to(device) if student is not None else None
    teacher = teacher.to(device) if teacher is not None else None
    began = time.perf_counter()
    part = evaluate_shard(
        hr[start:stop], settings, student=student, teacher=teacher, device=device, offset=start, progress=False
    )
    if strip and student is not None:
        part["strip"] = strip_outputs(student, hr[:strip], settings, device)
    ctx = ray.get_runtime_context()
    part["node"] = {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address()}
    part["seconds"] = time.perf_counter() - began
    return part


def evaluate_distributed(
    hr: torch.Tensor,
    settings: EvalSettings,
    *,
    student: nn.Module | None,
    teacher: nn.Module | None,
    shards: int,
    use_gpu: bool,
    cpus_per_shard: float,
    strip: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The report of :func:`oftsr.evaluation.evaluate` on ``hr``, computed by up to ``shards`` Ray tasks with
    ``cpus_per_shard`` CPUs and (``use_gpu``) one GPU each. The report also says where each shard ran (``shards``:
    start, stop, node, seconds) and, with ``strip`` > 0, carries the strip's images for the first ``strip`` crops."""
    import ray

    from pipelines.raycluster import ensure_ray

    ensure_ray()
    bounds = shard_bounds(hr.shape[0], settings.batch, shards)
    hr_ref = ray.put(hr.contiguous())
    student_ref = ray.put(student.cpu() if student is not None else None)
    teacher_ref = ray.put(teacher.cpu() if teacher is not None else None)
    task = ray.remote(_shard).options(
        num_cpus=cpus_per_shard, num_gpus=1 if use_gpu else 0, max_retries=RETRIES, name="oftsr-evaluate-shard"
    )
    pending = {
        task.remote(hr_ref, a, b, settings, student_ref, teacher_ref, use_gpu, strip if a == 0 else 0): (a, b)
        for a, b in bounds
    }
    parts = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        a, b = pending.pop(done[0])
        part = ray.get(done[0])
        parts.append(part)
        log(
            f"evaluate: shard {len(parts)}/{len(bounds)} (crops {a}-{b - 1}) done on {part['node']['ip']} "
            f"in {part['seconds']:.0f} s"
        )
    parts.sort(key=lambda p: p["offset"])
    report = combine(parts, settings)
    report["shards"] = [
        {"start": p["offset"], "stop": p["offset"] + p["n"], "seconds": p["seconds"], **p["node"]} for p in parts
    ]
    if "strip" in parts[0]:
        report["strip"] = parts[0]["strip"]
    return report
