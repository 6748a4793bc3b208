"""Training-step throughput: the teacher step and the online distillation step (images/s per worker), and the
teacher step's 1 -> 2 worker scaling under Ray Train (DDP, gloo on CPU / NCCL on GPU).

Run: ``.venv/bin/python benchmarks/train_step.py`` (CPU: ``tiny`` preset, 64² crops). On a GPU machine:
``--preset ffhq --crop 256 --device cuda``. Writes ``benchmarks/results/train_step.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from machine import describe

from oftsr.degrade import degrade
from oftsr.nets import build_unet
from oftsr.training import OptimConfig, distill_step, make_optimizer, teacher_step


def _nets(preset: str, crop: int, device: str):
    torch.manual_seed(0)
    student = build_unet(preset, image_size=crop).to(device)
    teacher = build_unet(preset, image_size=crop).to(device)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return student, teacher.eval().requires_grad_(False)


def time_steps(kind: str, preset: str, crop: int, batch: int, device: str, precision: str, seconds: float) -> dict:
    net, teacher = _nets(preset, crop, device)
    opt = make_optimizer(net.parameters(), OptimConfig(lr=1e-4, warmup_images=0))
    hr = torch.rand(batch, 3, crop, crop, device=device) * 2 - 1
    x_lr = degrade(hr, 4)[1]

    def step():
        if kind == "teacher":
            return teacher_step(net, opt, hr, x_lr, sigma_p=0.2, lr=1e-4, precision=precision)
        return distill_step(net, teacher, opt, x_lr, sigma_p=0.2, lr=1e-4, precision=precision)

    for _ in range(2):
        step()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        out = step()
        n += 1
    float(out["grad_norm"])
    sync()
    elapsed = time.perf_counter() - start
    return {"steps": n, "seconds": round(elapsed, 2), "images_per_s": round(n * batch / elapsed, 2)}


def ray_scaling(workers: int, preset: str, crop: int, batch: int, seconds: float) -> float:
    """Total images/s of the teacher step with ``workers`` DDP workers (synthetic in-memory batches)."""
    import ray.train
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer, prepare_model

    def loop(cfg):
        torch.manual_seed(0)
        net = prepare_model(build_unet(cfg["preset"], image_size=cfg["crop"]))
        opt = make_optimizer(net.parameters(), OptimConfig(lr=1e-4, warmup_images=0))
        device = ray.train.torch.get_device()
        hr = torch.rand(cfg["batch"], 3, cfg["crop"], cfg["crop"], device=device) * 2 - 1
        x_lr = degrade(hr, 4)[1]
        for _ in range(2):
            teacher_step(net, opt, hr, x_lr, sigma_p=0.2, lr=1e-4)
        n, start = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - start < cfg["seconds"]:
            teacher_step(net, opt, hr, x_lr, sigma_p=0.2, lr=1e-4)
            n += 1
        return n * cfg["batch"] * ray.train.get_context().get_world_size() / (time.perf_counter() - start)

    trainer = TorchTrainer(
        loop,
        train_loop_config={"preset": preset, "crop": crop, "batch": batch, "seconds": seconds},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
    )
    return round(float(trainer.fit().return_value), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Train scaling runs")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    args = parser.parse_args()

    res: dict = {
        "machine": describe(),
        "preset": args.preset,
        "crop": args.crop,
        "batch_per_worker": args.batch,
        "device": args.device,
        "precision": args.precision,
        "command": "python benchmarks/train_step.py " + " ".join(sys.argv[1:]),
    }
    res["teacher"] = time_steps(
        "teacher", args.preset, args.crop, args.batch, args.device, args.precision, args.seconds
    )
    res["distill"] = time_steps(
        "distill", args.preset, args.crop, args.batch, args.device, args.precision, args.seconds
    )
    print(json.dumps({"teacher": res["teacher"], "distill": res["distill"]}))
    if not args.no_ray:
        import ray

        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        one = ray_scaling(1, args.preset, args.crop, args.batch, args.seconds)
        two = ray_scaling(2, args.preset, args.crop, args.batch, args.seconds)
        ray.shutdown()
        res["ray_teacher_scaling"] = {
            "workers_1_images_per_s": one,
            "workers_2_images_per_s": two,
            "speedup_2_over_1": round(two / one, 3),
        }
        print(json.dumps(res["ray_teacher_scaling"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
