"""Small analytic networks and fields shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


def perturbed_unet(scale: float, preset: str = "tiny", **kw) -> nn.Module:
    """A ``preset`` UNet with ``scale``·N(0, 1) added to every parameter (from torch's global generator): a fresh
    one outputs zeros (zero-initialised output convolutions), which would hide most errors."""
    from oftsr.nets import build_unet

    net = build_unet(preset, **kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net


class PointwiseNet(nn.Module):
    """A per-pixel network (1x1 convolutions): each output pixel depends on that pixel alone."""

    downsample_factor = 1

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(torch.randn(8, 6, 1, 1, generator=g) * 0.5)
        self.b = nn.Parameter(torch.randn(6, 8, 1, 1, generator=g) * 0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(nn.functional.conv2d(x, self.a) + t.view(-1, 1, 1, 1) / 999.0)
        return nn.functional.conv2d(h, self.b)


class RecordingNet(nn.Module):
    """Records its inputs and returns a 6-channel output whose channels identify themselves."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), t.clone()))
        b, _, h, w = x.shape
        return torch.arange(6, dtype=x.dtype).view(1, 6, 1, 1).expand(b, 6, h, w).clone()


def save_net_checkpoint(folder, net: nn.Module, stage: dict) -> None:
    """A stage checkpoint in ``folder`` holding ``net`` as both its model and its EMA, one image seen: a teacher
    (or student) to load without training one."""
    from pipelines.train.checkpoint import save_checkpoint

    save_checkpoint(folder, model=net, ema=net, unet=net.config, state={"images_seen": 1}, stage=stage)


def start_mlflow_server(root, port: int, env: dict | None = None):
    """``mlflow server`` on 127.0.0.1:``port`` with a SQLite store in ``root`` (its own process group, log in
    ``root/mlflow.log``); returns the process. Stop it with :func:`stop_process_group`."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(root)
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'm.db'}",
            "--default-artifact-root",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=open(root / "mlflow.log", "a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_reachable(uri: str, proc, timeout_s: float = 120) -> None:
    import time

    from pipelines.tracking import check_reachable

    deadline = time.time() + timeout_s
    while True:
        try:
            check_reachable(uri)
            return
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.5)


def stop_process_group(proc, sig=None) -> None:
    import os
    import signal
    import subprocess

    os.killpg(proc.pid, sig or signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def quickstart_command(root, recipe: str = "quickstart", **extra) -> list[str]:
    """``oftsr run quickstart`` (or another ``recipe``) with its outputs moved below ``root`` (results, MLflow store,
    checkpoints, cache): nothing that changes what is trained or how it is evaluated, unless ``extra`` says so
    (``--set`` overrides, keys with ``__`` for dots)."""
    import sys
    from pathlib import Path

    root = Path(root)
    sets = {
        "out": root / "out",
        "tracking.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "teacher.storage_path": root / "ray",
        "distill.storage_path": root / "ray",
        "trajectories.out": root / "cache",
        **{k.replace("__", "."): v for k, v in extra.items()},
    }
    return [sys.executable, "-m", "pipelines.cli", "run", recipe, *(f"--set={k}={v}" for k, v in sets.items())]


def stage_config(stage: str, root, **sets):
    """The quickstart ``stage`` config on the sample photos under ``root`` (folder ``photos``), with Ray results
    under ``root/ray``, MLflow in ``root/mlflow.db``, and ``sets`` as ``--set`` overrides. Unless ``sets`` says
    otherwise, a teacher trains from scratch (not from the shipped weights) and a distillation runs online: the
    stage mechanics under test, whatever the quickstart's own budget (tests/pipelines/test_pipeline.py runs that)."""
    from pipelines.recipes import pipeline
    from pipelines.tree import with_overrides

    shared = {
        "data.source": str(root / "photos"),
        "data.crops_per_image": "4",
        "tracking.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
    }
    own = {"storage_path": str(root / "ray"), "log_every_images": "64", "sample_grid": "2"}
    if stage == "teacher":
        own["pretrained"] = "none"
    if stage == "distill":
        own["teacher"] = str(root / "ray" / "quickstart-teacher")
        own["targets"] = "online"
    own.update({k: str(v) for k, v in sets.items()})
    top = ("data.", "tracking.", "method.")
    base = {**shared, **{(k if k.startswith(top) else f"{stage}.{k}"): v for k, v in own.items()}}
    return with_overrides(pipeline("quickstart"), base, stage).stage(stage)


def photo_workdir(tmp_path_factory, name: str):
    """A fresh folder holding the sample photos in ``photos/`` (for a module's stage runs)."""
    from oftsr.samples import export_sample_photos

    root = tmp_path_factory.mktemp(name)
    export_sample_photos(root / "photos")
    return root


def register_student(folder, net: nn.Module, **method) -> str:
    """A SQLite MLflow store in ``folder`` with ``net`` registered as ``oftsr-student`` (a student of
    ``Method(**method)``, aliased ``candidate`` and ``champion``); returns its tracking URI."""
    from pathlib import Path

    from oftsr.method import Method
    from pipelines.registry import log_and_register
    from pipelines.tracking import client

    uri = f"sqlite:///{Path(folder) / 'mlflow.db'}"
    c = client(uri)
    run_id = c.create_run(c.create_experiment("oftsr-student")).info.run_id
    meta = {"kind": "student", **Method(**method).to_dict()}
    log_and_register(tracking_uri=uri, run_id=run_id, name="oftsr-student", net=net, meta=meta)
    return uri


def expected_one_step(net: nn.Module, lr_uint8, t: float, seed: int, meta: dict):
    """The one-step student's output for an HR-sized-multiple image, written out from the method's definition (not
    through ``oftsr.infer.upscale``, which every user-facing path calls): ``lr_uint8`` (h, w, 3) in RGB order, the
    knob ``t`` laid over the model's recorded range, the start ``sqrt(1 - sigma_p^2) x_lr + sigma_p eps`` with
    ``eps`` from ``seed``; returns uint8 (h sf, w sf, 3). The HR size must be a multiple of the network's
    down-sampling factor (no padding here)."""
    import math

    import numpy as np

    from oftsr.degrade import upsample
    from oftsr.flow import noise_from_seed

    sf, sigma_p = int(meta["sf"]), float(meta["sigma_p"])
    lr = torch.from_numpy(np.ascontiguousarray(lr_uint8)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    x_lr = upsample(lr, sf, meta["degradation"])
    assert x_lr.shape[-1] % net.downsample_factor == 0 and x_lr.shape[-2] % net.downsample_factor == 0
    eps = noise_from_seed(x_lr.shape[1:], seed)[None]
    x0 = math.sqrt(1 - sigma_p**2) * x_lr + sigma_p * eps
    time = float(meta["t_min"]) + t * (float(meta["t_max"]) - float(meta["t_min"]))
    with torch.no_grad():
        v = net.eval()(torch.cat([x0, x_lr], 1), torch.full((1,), 999.0 * time))[:, :3]
    out = ((x0 + v).clamp(-1, 1) + 1) * 127.5
    return out.round().to(torch.uint8)[0].permute(1, 2, 0).numpy()


def assert_same_pixels(got, want, what: str) -> None:
    """uint8 images equal within one grey level (the rounding of float sums in another order), on average within
    0.05: a wrong range, channel order, knob mapping or seed moves pixels by tens of levels."""
    import numpy as np

    diff = np.abs(np.asarray(got, np.int16) - np.asarray(want, np.int16))
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert diff.max() <= 1 and diff.mean() <= 0.05, (what, int(diff.max()), float(diff.mean()))
