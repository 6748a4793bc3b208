"""Evaluation of bicubic, the teacher and the one-step student over a grid of knob values (DESIGN sections 6, 8).

Plain PyTorch (plus matplotlib for the plot): the pipeline layer feeds it crops and logs what it returns. Metrics
per method: PSNR and SSIM (RGB in [0, 1]), ST-LPIPS (shipped weights, always), LPIPS when its ImageNet backbone is
on this machine, and FID against the HR crops (:mod:`oftsr.fid`) when the Inception weights are. The
fidelity-realism curve plots distortion (PSNR) against perceptual distance, one point per t.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from oftsr.degrade import SEEDED_KINDS, degrade
from oftsr.fid import InceptionFeatures, fid_from_features
from oftsr.flow import conditioned, noise_from_seed, noisy_start
from oftsr.infer import evaluating, one_step
from oftsr.method import Method
from oftsr.metrics import LPIPS, STLPIPS, PerceptualWeightsMissing, psnr, ssim
from oftsr.realesrgan import RealESRGANSettings
from oftsr.solvers import solve

DEFAULT_KNOBS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """The protocol: the method's parameters (σp, scale, degradation, σy: those the models were trained with), the
    knob grid, the teacher's solver, the batch and the noise seed."""

    method: Method = dataclasses.field(default_factory=Method)
    knobs: tuple[float, ...] = DEFAULT_KNOBS
    teacher_method: str = "rk45"
    teacher_steps: int | None = None
    batch: int = 16
    seed: int = 0
    # the paper's protocol (oftsr.paper): the one-step output x0 + scale v, unclamped outputs for PSNR and LPIPS,
    # and inputs larger than split_above squared restored in four quadrants (0: whole)
    one_step_scale: float = 1.0
    clamp: bool = True
    split_above: int = 0
    # the realesrgan chain (method.degradation = realesrgan), drawn per crop from the evaluation seed
    realesrgan: RealESRGANSettings = dataclasses.field(default_factory=RealESRGANSettings)

    def __post_init__(self) -> None:
        if any(not 0.0 <= t <= 1.0 for t in self.knobs):
            raise ValueError(f"evaluate.knobs must lie in [0, 1], got {self.knobs}")
        if self.batch < 1:
            raise ValueError(f"evaluate.batch must be >= 1, got {self.batch}")


def held_out_condition(hr: torch.Tensor, settings: EvalSettings, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lr, x_lr)`` of held-out crops ``offset ..``: the method's degradation with its noise (or, for realesrgan,
    each crop's chain) drawn from the evaluation seed and the crops' positions, never from the batch split."""
    m = settings.method
    if m.degradation in SEEDED_KINDS:
        seeds = [settings.seed * 1_000_003 + offset + j for j in range(hr.shape[0])]
        return degrade(hr, m.sf, m.degradation, seeds=seeds, settings=settings.realesrgan.on_crops())
    gen = torch.Generator().manual_seed(settings.seed * 100_003 + offset)
    return degrade(hr, m.sf, m.degradation, m.sigma_y, gen)


class Perceptual:
    """ST-LPIPS always; LPIPS (AlexNet) and FID's Inception network only when their weights are already on this
    machine (never downloaded)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.st = STLPIPS().to(device)
        try:
            self.lpips: nn.Module | None = LPIPS(download=False).to(device)
        except PerceptualWeightsMissing:
            self.lpips = None
        try:
            self.inception: nn.Module | None = InceptionFeatures().to(device)
        except PerceptualWeightsMissing:
            self.inception = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"st_lpips": self.st(x, y)}
        if self.lpips is not None:
            out["lpips"] = self.lpips(x, y)
        return out


def _metrics(
    pred: torch.Tensor, hr: torch.Tensor, perceptual: Perceptual, clamp: bool = True
) -> dict[str, torch.Tensor]:
    """PSNR, SSIM and the perceptual distances; ``clamp=False`` (the paper's protocol) measures PSNR and LPIPS on the
    output as the network gives it (SSIM and the saved images are clamped either way)."""
    clamped = pred.clamp(-1, 1)
    raw = clamped if clamp else pred
    return {"psnr": psnr(raw, hr, clamp=clamp), "ssim": ssim(clamped, hr), **perceptual(raw, hr)}


@torch.no_grad()
def evaluate(
    hr: torch.Tensor,
    settings: EvalSettings,
    *,
    student: nn.Module | None = None,
    teacher: nn.Module | None = None,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
) -> dict[str, Any]:
    """Evaluate on HR crops ``(N, 3, H, W)`` in [-1, 1]; fixed noise (``settings.seed``) for every method.

    Returns ``{"rows": [{"method", "t", "nfe", "psnr", "ssim", "st_lpips"[, "lpips"][, "fid"], "per_crop"}],
    "n": N}``: the metrics averaged over the crops, and each crop's own (``per_crop``, for paired comparisons);
    ``fid`` (between each method's outputs and the HR crops, N >= 2) only when the Inception weights are on this
    machine. A progress bar when ``progress`` (by default: stderr is a terminal). The same as
    :func:`combine` of :func:`evaluate_shard` over any split of the crops at multiples of ``settings.batch``.
    """
    part = evaluate_shard(hr, settings, student=student, teacher=teacher, device=device, progress=progress)
    return combine([part], settings)


def shard_bounds(n: int, batch: int, shards: int) -> list[tuple[int, int]]:
    """``[(start, stop)]``: ``n`` crops in at most ``shards`` nearly equal parts that start at multiples of
    ``batch`` (so that every part draws the same batches, and the same noise, as one pass over all of them)."""
    batches = -(-n // batch)
    shards = max(1, min(shards, batches))
    per, extra = divmod(batches, shards)
    bounds, start = [], 0
    for k in range(shards):
        stop = min(n, start + (per + (k < extra)) * batch)
        bounds.append((start, stop))
        start = stop
    return bounds


@torch.no_grad()
def evaluate_shard(
    hr: torch.Tensor,
    settings: EvalSettings,
    *,
    student: nn.Module | None = None,
    teacher: nn.Module | None = None,
    device: torch.device | str = "cpu",
    offset: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """The per-crop metrics (and Inception features) of crops ``offset .. offset + N`` of a held-out set, ``hr``
    being those crops: one part for :func:`combine`. ``offset`` must be a multiple of ``settings.batch``: the noise
    and degradation of a crop depend on its batch, so shards at batch boundaries give exactly one pass's numbers."""
    if offset % settings.batch:
        raise ValueError(f"offset {offset} is not a multiple of the evaluation batch ({settings.batch})")
    perceptual = Perceptual(device)
    if student is not None and torch.device(device).type == "cuda":
        from oftsr.engine import fast_student

        student = fast_student(student, device)  # bf16, compiled, CUDA graphs: what `oftsr upscale` serves
    per_crop: dict[tuple[str, float | None], dict[str, list[float]]] = {}  # means, and paired comparisons
    features: dict[tuple[str, float | None] | None, list[torch.Tensor]] = {}  # None: the HR crops
    nfe: dict[str, int] = {}
    batches = range(0, hr.shape[0], settings.batch)
    for i in tqdm(batches, desc="evaluate", disable=not (sys.stderr.isatty() if progress is None else progress)):
        x1 = hr[i : i + settings.batch].to(device)
        b, at = x1.shape[0], offset + i
        m = settings.method
        _, x_lr = held_out_condition(x1.cpu(), settings, at)
        x_lr = x_lr.to(device)
        eps = noise_from_seed(x1.shape[1:], [settings.seed * 1_000_003 + at + j for j in range(b)], device=device)
        x0 = noisy_start(x_lr, m.sigma_p, noise=eps)
        results: dict[tuple[str, float | None], torch.Tensor] = {("bicubic", None): x_lr}
        if teacher is not None:
            with evaluating(teacher):
                results[("teacher", None)] = _restored(_sampler(teacher, settings, nfe), x0, x_lr, settings)
        if student is not None:
            with evaluating(student):
                for t in settings.knobs:
                    out = _restored(_one_step(student, float(t), (m.t_min, m.t_max)), x0, x_lr, settings)
                    if settings.one_step_scale != 1.0:
                        out = x0 + settings.one_step_scale * (out - x0)
                    results[("student", float(t))] = out
        for key, pred in results.items():
            crops = per_crop.setdefault(key, {})
            for name, values in _metrics(pred, x1, perceptual, settings.clamp).items():
                crops.setdefault(name, []).extend(values.flatten().tolist())
        if perceptual.inception is not None:
            for key, images in ((None, x1), *results.items()):
                features.setdefault(key, []).append(perceptual.inception(images.clamp(-1, 1)).double().cpu())
    return {
        "offset": offset,
        "n": hr.shape[0],
        "per_crop": per_crop,
        "features": {k: torch.cat(v) for k, v in features.items()},
        "nfe": nfe,
        "perceptual": "lpips" if perceptual.lpips is not None else "st_lpips",
    }


def _restored(restore, x0: torch.Tensor, x_lr: torch.Tensor, settings: EvalSettings) -> torch.Tensor:
    """``restore(x0, x_lr)``, whole or (the paper's protocol) in quadrants (:func:`oftsr.paper.quadrant_split`)."""
    if settings.split_above:
        from oftsr.paper import quadrant_split

        return quadrant_split(restore, x0, x_lr, min_size=settings.split_above)
    return restore(x0, x_lr)


def _sampler(teacher: nn.Module, settings: EvalSettings, nfe: dict[str, int]):
    def sample(start: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        sol = solve(conditioned(teacher, cond), start, method=settings.teacher_method, steps=settings.teacher_steps)
        nfe["teacher"] = max(nfe.get("teacher", 0), sol.nfe)
        return sol.x

    return sample


def _one_step(student: nn.Module, t: float, trained: tuple[float, float]):
    return lambda start, cond: one_step(conditioned(student, cond), start, t, trained)


def combine(parts: Sequence[dict[str, Any]], settings: EvalSettings) -> dict[str, Any]:
    """One report (see :func:`evaluate`) from the parts that :func:`evaluate_shard` computed for consecutive crops
    of one held-out set, in any order. Refuses parts that leave a gap or overlap, or that measured with different
    perceptual networks (LPIPS weights on some machines only); FID only when every part has Inception features."""
    parts = sorted(parts, key=lambda p: p["offset"])
    at = 0
    for p in parts:
        if p["offset"] != at:
            raise ValueError(f"evaluation parts do not tile the crops: one starts at {p['offset']}, expected {at}")
        at += p["n"]
    kinds = {p["perceptual"] for p in parts}
    if len(kinds) > 1:
        raise ValueError(
            f"evaluation parts measured with different perceptual networks ({', '.join(sorted(kinds))}): the LPIPS "
            "weights are on some machines only; put them on every node (torch hub cache) or on none"
        )
    n = at
    per_crop: dict[tuple[str, float | None], dict[str, list[float]]] = {}
    for p in parts:
        for key, metrics in p["per_crop"].items():
            crops = per_crop.setdefault(key, {})
            for name, values in metrics.items():
                crops.setdefault(name, []).extend(values)
    with_features = all(p["features"] for p in parts) and n >= 2
    nfe = {k: max(p["nfe"].get(k, 0) for p in parts) for p in parts for k in p["nfe"]}
    rows = []
    for (method, t), crops in per_crop.items():
        row: dict[str, Any] = {
            "method": method,
            "t": t,
            "nfe": {"bicubic": 0, "student": 1}.get(method, nfe.get(method)),
        }
        row.update({k: sum(v) / n for k, v in crops.items()})
        row["per_crop"] = crops
        if with_features:
            feats = [torch.cat([p["features"][key] for p in parts]) for key in ((method, t), None)]
            row["fid"] = fid_from_features(*feats)
        rows.append(row)
    return {"rows": rows, "n": n, "perceptual": kinds.pop(), "settings": dataclasses.asdict(settings)}


def markdown_table(report: dict[str, Any]) -> str:
    metrics = ["psnr", "ssim", "st_lpips"] + (["lpips"] if report["perceptual"] == "lpips" else [])
    metrics += ["fid"] if report["rows"] and all("fid" in r for r in report["rows"]) else []
    head = "| method | t | NFE | " + " | ".join(m.upper().replace("_", "-") for m in metrics) + " |"
    lines = [head, "|" + "---|" * (3 + len(metrics))]
    for r in report["rows"]:
        t = "" if r["t"] is None else f"{r['t']:.1f}"
        vals = " | ".join(f"{r[m]:.2f}" if m in ("psnr", "fid") else f"{r[m]:.4f}" for m in metrics)
        lines.append(f"| {r['method']} | {t} | {r['nfe'] if r['nfe'] is not None else ''} | {vals} |")
    return "\n".join(lines) + "\n"


def plot_curve(report: dict[str, Any], path: str | Path, title: str = "fidelity-realism curve") -> Path:
    """Distortion (PSNR, up is better) against perceptual distance (left is better), student points labelled t."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = report["perceptual"]
    label = "LPIPS" if metric == "lpips" else "ST-LPIPS"
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    student = sorted((r for r in report["rows"] if r["method"] == "student"), key=lambda r: r["t"])
    if student:
        ax.plot(
            [r[metric] for r in student], [r["psnr"] for r in student], "-o", color="tab:blue", label="one-step student"
        )
        for i, group in enumerate(_touching(student, metric, report["rows"])):
            t = f"{group[0]['t']:.1f}" + (f"–{group[-1]['t']:.1f}" if len(group) > 1 else "")
            at = (group[0][metric], group[0]["psnr"])
            offset = (4, 4) if i % 2 == 0 else (4, -11)  # alternately above and below the curve
            ax.annotate(f"t={t}", at, textcoords="offset points", xytext=offset, fontsize=7)
    for method, marker, color in (("teacher", "*", "tab:red"), ("bicubic", "s", "tab:gray")):
        for r in report["rows"]:
            if r["method"] == method:
                name = f"teacher ({r['nfe']} NFE)" if method == "teacher" else "bicubic"
                ax.scatter([r[metric]], [r["psnr"]], marker=marker, s=120, color=color, label=name, zorder=3)
    ax.set_xlabel(f"{label} (perceptual distance, lower is better)")
    ax.set_ylabel("PSNR dB (fidelity, higher is better)")
    ax.set_title(f"{title} ({report['n']} crops)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _touching(points: list[dict[str, Any]], metric: str, rows: list[dict[str, Any]], tol: float = 0.03):
    """Consecutive points (in t) within ``tol`` of the plot's extent of each other, grouped: one label per group
    instead of labels printed over each other."""
    xs, ys = [r[metric] for r in rows], [r["psnr"] for r in rows]
    x_span, y_span = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    groups: list[list[dict[str, Any]]] = []
    for r in points:
        last = groups[-1][-1] if groups else None
        if last and abs(r[metric] - last[metric]) < tol * x_span and abs(r["psnr"] - last["psnr"]) < tol * y_span:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def write_report(report: dict[str, Any], folder: str | Path, title: str = "fidelity-realism curve") -> dict[str, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "evaluation.json", "markdown": folder / "evaluation.md", "curve": folder / "curve.png"}
    paths["json"].write_text(json.dumps(report, indent=2))
    paths["markdown"].write_text(markdown_table(report))
    plot_curve(report, paths["curve"], title)
    return paths


def knob_trend(report: dict[str, Any]) -> dict[str, float]:
    """PSNR and perceptual distance at t = 0 and t = 1 (the two ends of the knob)."""
    metric = report["perceptual"]
    ends = {r["t"]: r for r in report["rows"] if r["method"] == "student" and r["t"] in (0.0, 1.0)}
    if 0.0 not in ends or 1.0 not in ends:
        return {}
    return {
        "psnr_t0": ends[0.0]["psnr"],
        "psnr_t1": ends[1.0]["psnr"],
        f"{metric}_t0": ends[0.0][metric],
        f"{metric}_t1": ends[1.0][metric],
    }


#: Floors of "monotone within noise" between neighbouring knob values: a rise smaller than this never counts. They
#: are the size of the wiggles in the flat stretches of the quickstart's curves (t = 0-0.2 in PSNR, the realism end
#: in perceptual distance) from one training run to the next of the same recipe.
KNOB_TOLERANCE = {"psnr": 0.15, "st_lpips": 0.005, "lpips": 0.005}


def _rise_noise(a: dict[str, Any], b: dict[str, Any], key: str, floor: float) -> float:
    """The noise of ``b[key] - a[key]``: twice the standard error of the per-crop paired differences (the same crops
    and noise for every knob value), at least ``floor``; ``floor`` alone without per-crop values."""
    xs, ys = a.get("per_crop", {}).get(key), b.get("per_crop", {}).get(key)
    if not xs or not ys or len(xs) != len(ys) or len(xs) < 2:
        return floor
    d = torch.tensor(ys, dtype=torch.float64) - torch.tensor(xs, dtype=torch.float64)
    return max(floor, 2.0 * float(d.std()) / len(xs) ** 0.5)


def knob_tradeoff(report: dict[str, Any], tolerance: dict[str, float] | None = None) -> dict[str, Any]:
    """Does the student's knob trade fidelity for realism? ``{"holds": bool, "checks": [{"name", "ok", "detail"}]}``:

    - the realism end: the perceptual distance at t = 1 is below the one at t = 0 and below bicubic's;
    - the fidelity end: PSNR at t = 0 is above PSNR at t = 1;
    - monotone within noise: from each knob value to the next, neither PSNR nor the perceptual distance rises by
      more than its noise (twice the standard error of the per-crop paired difference, at least
      ``tolerance[metric]``).
    """
    tol = {**KNOB_TOLERANCE, **(tolerance or {})}
    metric = report["perceptual"]
    curve = sorted((r for r in report["rows"] if r["method"] == "student"), key=lambda r: r["t"])
    ends = {r["t"]: r for r in curve if r["t"] in (0.0, 1.0)}
    bicubic = next((r for r in report["rows"] if r["method"] == "bicubic"), None)
    if 0.0 not in ends or 1.0 not in ends or bicubic is None:
        raise ValueError("knob_tradeoff needs the student at t = 0 and t = 1 and the bicubic row")
    lo, hi = ends[0.0], ends[1.0]
    beats = f"{metric} t=1 {hi[metric]:.4f} < bicubic {bicubic[metric]:.4f}"
    checks = [
        ("realism end", hi[metric] < lo[metric], f"{metric} t=1 {hi[metric]:.4f} < t=0 {lo[metric]:.4f}"),
        ("beats bicubic", hi[metric] < bicubic[metric], beats),
        ("fidelity end", lo["psnr"] > hi["psnr"], f"PSNR t=0 {lo['psnr']:.2f} > t=1 {hi['psnr']:.2f}"),
    ]
    for name, key in (("PSNR falls", "psnr"), (f"{metric} falls", metric)):
        rises = []
        for a, b in itertools.pairwise(curve):
            noise = _rise_noise(a, b, key, tol[key])
            if b[key] - a[key] > noise:
                rises.append(f"t {a['t']:.1f}->{b['t']:.1f} rises {b[key] - a[key]:.4g} (noise {noise:.3g})")
        checks.append((name, not rises, "; ".join(rises) or "no rise beyond the noise between neighbouring t"))
    out = [{"name": n, "ok": bool(ok), "detail": d} for n, ok, d in checks]
    return {"holds": all(c["ok"] for c in out), "checks": out}


def strip(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Side-by-side uint8 ``(3, H, sum W)`` of ``(3, H, W)`` images in [-1, 1]."""
    from oftsr.conventions import image_to_uint8

    return torch.cat([image_to_uint8(im.float()) for im in images], dim=-1)


__all__ = [
    "DEFAULT_KNOBS",
    "KNOB_TOLERANCE",
    "EvalSettings",
    "evaluate",
    "knob_tradeoff",
    "knob_trend",
    "markdown_table",
    "plot_curve",
    "strip",
    "write_report",
]
