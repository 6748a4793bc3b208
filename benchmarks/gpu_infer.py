"""GPU check (DESIGN section 10, issue #8): one-step inference and training steps, eager fp32 against the
optimised paths, plus the numerics of the inference engine. Plain PyTorch: no Ray, no MLflow.

    benchmarks/gpu_check.sh                         # on a GPU machine: ffhq preset, 256², under 6 minutes
    python benchmarks/gpu_infer.py --device cpu --preset tiny --size 64 --batch 4 --quick   # smoke run

Writes JSON (``--out``) with ``inference.images_per_s``, ``inference.eager_images_per_s``,
``inference.speedup_over_eager``, ``numerics.max_abs_diff``, ``numerics.psnr_db``, ``train.*`` (images/s, peak
memory, host synchronisations counted in one optimised step), ``targets`` (issue #8's, each with ``ok``) and the
machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from machine import describe  # noqa: E402

from oftsr.degrade import degrade  # noqa: E402
from oftsr.engine import EngineConfig, fast_student, use_fast_modules  # noqa: E402
from oftsr.metrics import psnr  # noqa: E402
from oftsr.nets import build_unet  # noqa: E402
from oftsr.training import OptimConfig, distill_step, make_optimizer, teacher_step  # noqa: E402


def network(preset: str, size: int, device: str, seed: int = 0) -> torch.nn.Module:
    """Random weights with the zero-initialised layers perturbed, so the output is not trivially zero."""
    torch.manual_seed(seed)
    net = build_unet(preset, image_size=size).to(device)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net.eval()


def rate(fn, batch: int, seconds: float, device: str, min_iters: int = 3) -> float:
    """Images per second of ``fn`` over about ``seconds`` (after the caller's warm-up)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start, n = time.perf_counter(), 0
    while n < min_iters or time.perf_counter() - start < seconds:
        fn()
        n += 1
    sync()
    return n * batch / (time.perf_counter() - start)


def peak_gib(device: str) -> float | None:
    """Peak memory allocated by PyTorch on ``device`` since the last reset, in GiB (None on CPU)."""
    if not device.startswith("cuda"):
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def host_syncs(fn, device: str) -> int | None:
    """How many synchronising CUDA calls one ``fn()`` makes (torch's sync debug mode; None on CPU)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def inference(args) -> dict:
    net = network(args.preset, args.size, args.device)
    x = torch.randn(args.batch, 6, args.size, args.size, device=args.device)
    t = torch.full((args.batch,), 0.5 * 999, device=args.device)
    out: dict = {"batch": args.batch, "size": args.size, "preset": args.preset}
    with torch.inference_mode():
        eager = lambda: net(x, t)  # noqa: E731
        reset_peak(args.device)
        eager()
        out["eager_images_per_s"] = rate(eager, args.batch, args.seconds, args.device)
        out["eager_peak_gib"] = peak_gib(args.device)
        reset_peak(args.device)
        compile_start = time.perf_counter()
        fast = fast_student(net, args.device, EngineConfig(compile=args.compile, static_batch=args.batch))
        fast(x, t)
        fast(x, t)
        out["warmup_s"] = round(time.perf_counter() - compile_start, 1)
        out["images_per_s"] = rate(lambda: fast(x, t), args.batch, args.seconds, args.device)
        out["speedup_over_eager"] = out["images_per_s"] / out["eager_images_per_s"]
        out["peak_gib"] = peak_gib(args.device)
        out["engine"] = {"dtype": str(fast.dtype), "compiled": fast.compiled, "cuda_graphs": fast.cuda_graphs}
        # Numerics: the one-step output x0 + t v at t = 0.5, engine against fp32 eager (fresh inputs).
        x0 = torch.randn(args.batch, 3, args.size, args.size, device=args.device) * 0.2
        x_lr = torch.rand(args.batch, 3, args.size, args.size, device=args.device) * 2 - 1
        inp = torch.cat([x0, x_lr], 1)
        ref = (x0 + 0.5 * net(inp, t)[:, :3]).float()
        got = (x0 + 0.5 * fast(inp, t)[:, :3]).float()
    numerics = {
        "max_abs_diff": float((got - ref).abs().max()),
        "psnr_db": float(psnr(got.clamp(-1, 1), ref.clamp(-1, 1)).min()),
        "required_psnr_db": 45.0,
    }
    numerics["ok"] = numerics["psnr_db"] >= 45.0
    return {"inference": out, "numerics": numerics}


def training(args) -> dict:
    """Teacher and online-distillation steps: eager fp32 against bf16 autocast + fast modules + compile (GPU)."""
    results = {}
    cuda = args.device.startswith("cuda")
    hr = torch.rand(args.train_batch, 3, args.size, args.size, device=args.device) * 2 - 1
    x_lr = degrade(hr, 4)[1]
    for kind in ("teacher", "distill"):
        row = {}
        for mode in ("eager_fp32", "optimised"):
            net = network(args.preset, args.size, args.device).train()
            teacher = network(args.preset, args.size, args.device, seed=1).requires_grad_(False)
            precision = "bf16" if mode == "optimised" and cuda else "fp32"
            model, teach = net, teacher
            if mode == "optimised":
                use_fast_modules(net)
                use_fast_modules(teacher)
                if args.compile:
                    model, teach = torch.compile(net), torch.compile(teacher)
            opt = make_optimizer(net.parameters(), OptimConfig(lr=1e-4, warmup_images=0))

            def step(kind=kind, model=model, teach=teach, opt=opt, precision=precision):
                if kind == "teacher":
                    return teacher_step(model, opt, hr, x_lr, sigma_p=0.2, lr=1e-4, precision=precision)
                return distill_step(model, teach, opt, x_lr, sigma_p=0.2, lr=1e-4, precision=precision)

            reset_peak(args.device)
            start = time.perf_counter()
            for _ in range(2):
                step()
            row[f"{mode}_warmup_s"] = round(time.perf_counter() - start, 1)
            row[f"{mode}_images_per_s"] = rate(step, args.train_batch, args.seconds, args.device)
            row[f"{mode}_peak_gib"] = peak_gib(args.device)
            if mode == "optimised":
                row["optimised_host_syncs_per_step"] = host_syncs(step, args.device)
            del net, teacher, model, teach, opt
            if cuda:
                torch.cuda.empty_cache()
        row["speedup"] = row["optimised_images_per_s"] / row["eager_fp32_images_per_s"]
        results[kind] = row
    return {"train": results}


def targets(result: dict) -> dict:
    """Issue #8's targets against this run's figures (meaningful on one H100 or H200 only)."""
    inf, train = result["inference"], result.get("train", {})
    checks = {
        "inference_images_per_s": (inf["images_per_s"], 1000.0),
        "inference_speedup_over_eager": (inf["speedup_over_eager"], 3.7),
        "numerics_psnr_db": (result["numerics"]["psnr_db"], 45.0),
    }
    for kind in ("teacher", "distill"):
        if kind in train:
            checks[f"{kind}_step_speedup"] = (train[kind]["speedup"], 2.0)
    out = {k: {"value": round(v, 3), "at_least": need, "ok": v >= need} for k, (v, need) in checks.items()}
    out["all_ok"] = all(c["ok"] for c in out.values())
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="ffhq")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=64, help="inference batch (images of --size)")
    p.add_argument("--train-batch", type=int, default=8, help="training batch per step")
    p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per measurement")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: short timings")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.seconds = 0.2
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 baseline is true fp32
        torch.backends.cudnn.allow_tf32 = False
    started = time.perf_counter()
    result = {"machine": describe(), "command": " ".join(sys.argv), **inference(args)}
    if not args.skip_train:
        result.update(training(args))
    result["targets"] = targets(result)
    result["total_s"] = round(time.perf_counter() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
