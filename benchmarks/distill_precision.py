"""Precision of the distillation targets and of the bf16 student, measured with CPU bf16 autocast.

1. The online distillation loss (``oftsr.losses.distill_online``) and its gradient on one batch, three ways:
   fp32 throughout (the reference: the official code trains in fp32); bf16 autocast with the teacher's calls and the
   targets in fp32 (``fp32_targets=True``, our default); bf16 autocast with the teacher in bf16 too (``False``).
   Reported: the relative error of each loss term and of the gradient (L2 norm of the difference over the norm of
   the reference, and the cosine).
2. The one-step output of the inference engine in bf16 against fp32 on held-out crops (PSNR of each against the
   HR crops, and their difference).

Networks: the shipped quickstart teacher (``pipelines/assets``) as the teacher; as the student, the same weights
plus 1 % noise (a student at the start of distillation differs from its teacher by about that). 64x64 crops of the
held-out sample photos. Core only (torch): also runs on the GPU machine (``--device cuda``).

Run: ``.venv/bin/python benchmarks/distill_precision.py`` (about a minute on 2 cores). Writes
``benchmarks/results/distill_precision.json`` with the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine import describe  # noqa: E402
from PIL import Image  # noqa: E402

from oftsr.degrade import degrade  # noqa: E402
from oftsr.engine import EngineConfig, fast_student  # noqa: E402
from oftsr.flow import conditioned, noisy_start  # noqa: E402
from oftsr.infer import one_step  # noqa: E402
from oftsr.losses import distill_online, sample_distill_times  # noqa: E402
from oftsr.metrics import psnr  # noqa: E402
from oftsr.nets import UNet, load_weights, preset_config  # noqa: E402
from oftsr.samples import export_sample_split  # noqa: E402
from oftsr.training import autocast  # noqa: E402

SIGMA_P = 0.2


def crops(folder: Path, size: int, per_image: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    out = []
    for path in sorted(folder.glob("*.png")):
        img = np.asarray(Image.open(path).convert("RGB"))
        for _ in range(per_image):
            y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
            out.append(torch.from_numpy(img[y : y + size, x : x + size].copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 127.5 - 1.0


def loss_and_grad(student, teacher, x_lr, x0, t, device, precision, fp32_targets):
    student.zero_grad(set_to_none=True)
    with autocast(device, precision):
        terms = distill_online(conditioned(student, x_lr), conditioned(teacher, x_lr), x0, t, fp32_targets=fp32_targets)
    terms["total"].float().mean().backward()
    grad = torch.cat([p.grad.flatten() for p in student.parameters()])
    return {k: float(v.detach().float().mean()) for k, v in terms.items()}, grad.clone()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distill_precision.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    from pipelines.shipped import shipped_weights

    teacher = UNet(preset_config("tiny", image_size=64))
    load_weights(teacher, shipped_weights("quickstart_teacher"))
    teacher = teacher.to(device).eval().requires_grad_(False)
    student = UNet(preset_config("tiny", image_size=64)).to(device)
    student.load_state_dict(teacher.state_dict())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * p.abs().mean() * torch.randn(p.shape, generator=g).to(device))
    student.eval()  # no dropout: the three runs see the same network

    with tempfile.TemporaryDirectory() as tmp:
        train, heldout = export_sample_split(Path(tmp) / "photos")
        train_hr = crops(train, 64, 4, seed=1).to(device)
        held_hr = crops(heldout, 64, 8, seed=2).to(device)

    rows = []
    for i in range(args.batches):
        hr = train_hr[i * args.batch : (i + 1) * args.batch]
        _, x_lr = degrade(hr, 4, "bicubic")
        gen = torch.Generator(device=device).manual_seed(100 + i)
        x0 = noisy_start(x_lr, SIGMA_P, gen)
        t = sample_distill_times(hr.shape[0], t_min=0.01, t_max=0.99, generator=gen, device=device)
        ref, ref_grad = loss_and_grad(student, teacher, x_lr, x0, t, device, "fp32", True)
        row = {"batch": i, "fp32": ref}
        for name, fp32_targets in (("bf16_fp32_targets", True), ("bf16_bf16_targets", False)):
            terms, grad = loss_and_grad(student, teacher, x_lr, x0, t, device, "bf16", fp32_targets)
            row[name] = {
                "terms": terms,
                "rel_err": {k: abs(terms[k] - ref[k]) / abs(ref[k]) for k in ref},
                "grad_rel_err": float((grad - ref_grad).norm() / ref_grad.norm()),
                "grad_cosine": float(torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0)),
            }
        rows.append(row)
        print(json.dumps(row))

    def mean(name, key):
        return float(np.mean([r[name][key] for r in rows]))

    def mean_term(name, term):
        return float(np.mean([r[name]["rel_err"][term] for r in rows]))

    summary = {
        name: {
            "distil_rel_err": mean_term(name, "distil"),
            "total_rel_err": mean_term(name, "total"),
            "grad_rel_err": mean(name, "grad_rel_err"),
            "grad_cosine": mean(name, "grad_cosine"),
        }
        for name in ("bf16_fp32_targets", "bf16_bf16_targets")
    }

    # the engine's bf16 student against fp32 on the held-out crops, at the knob's ends
    _, x_lr = degrade(held_hr, 4, "bicubic")
    x0 = noisy_start(x_lr, SIGMA_P, torch.Generator(device=device).manual_seed(7))
    engine = {}
    for precision in ("fp32", "bf16"):
        fast = fast_student(student.eval(), device, EngineConfig(precision=precision, compile=False))
        with torch.inference_mode():
            engine[precision] = {
                f"t{k}": one_step(conditioned(fast, x_lr), x0, float(k)).clamp(-1, 1).float() for k in (0, 1)
            }
    evaluation = {}
    for k in ("t0", "t1"):
        p32 = psnr(engine["fp32"][k], held_hr).mean().item()
        p16 = psnr(engine["bf16"][k], held_hr).mean().item()
        evaluation[k] = {
            "psnr_fp32": p32,
            "psnr_bf16": p16,
            "psnr_diff_db": p16 - p32,
            "max_abs_diff": float((engine["fp32"][k] - engine["bf16"][k]).abs().max()),
        }
    result = {
        "benchmark": "distill_precision",
        "command": "benchmarks/distill_precision.py " + " ".join(argv or sys.argv[1:]),
        "device": str(device),
        "batch": args.batch,
        "batches": args.batches,
        "loss_vs_fp32": summary,
        "per_batch": rows,
        "engine_bf16_vs_fp32_heldout": {"crops": held_hr.shape[0], **evaluation},
        "machine": describe(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({"loss_vs_fp32": summary, "engine": evaluation}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
