"""The Ray Train worker loop shared by the teacher and the distill stage.

Reads top to bottom: context -> networks -> resume -> data -> steps (counted in images) -> logging (rank 0) ->
checkpoints. Every worker runs it; DDP keeps the replicas equal. Resuming restores the model, the EMA, the
optimizer, the images seen and rank 0's RNG, so no image is counted twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import ray.util
import torch
import torch.distributed as dist

from oftsr.conventions import image_to_uint8
from oftsr.ema import EMA
from oftsr.engine import use_fast_modules
from oftsr.flow import conditioned, noisy_start
from oftsr.infer import evaluating, one_step, sample
from oftsr.nets import UNet, load_weights, preset_config
from oftsr.training import (
    CachedDistillObjective,
    Objective,
    OnlineDistillObjective,
    TeacherObjective,
    lr_at,
    make_optimizer,
    train_step,
)
from pipelines.data.loader import iter_crops
from pipelines.data.transforms import degrade_on_worker
from pipelines.metric_logger import MetricLogger
from pipelines.train.checkpoint import CheckpointCorrupt, load_checkpoint, load_teacher, save_checkpoint
from pipelines.train.config import StageConfig


class InjectedFault(RuntimeError):
    """Raised by a failure drill (:class:`pipelines.train.config.FaultInjection`)."""


def _precision(cfg: StageConfig, device: torch.device) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if device.type == "cuda" else "fp32"


def _maybe_fault(cfg: StageConfig, rank: int, images_seen: int) -> None:
    f = cfg.fault
    if f.fail_at_images < 0 or rank != f.rank or images_seen < f.fail_at_images:
        return
    if f.marker and os.path.exists(f.marker):
        return
    if f.marker:
        Path(f.marker).write_text(str(images_seen))
    if f.kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"failure drill: rank {rank} raised at {images_seen} images")


def _networks(cfg: StageConfig) -> tuple[UNet, UNet | None]:
    if cfg.stage == "teacher":
        net = UNet(preset_config(cfg.method.preset, image_size=cfg.method.crop, **cfg.unet))
        if cfg.pretrained:
            from pipelines.shipped import resolve

            load_weights(net, resolve(cfg.pretrained))
        return net, None
    unet_cfg, weights = load_teacher(cfg.teacher, cfg.data.storage_options, cfg.tracking.tracking_uri)
    student = UNet(unet_cfg)
    student.load_state_dict(weights)
    if cfg.targets == "cached":  # the cache holds the teacher's targets: no teacher in memory
        return student, None
    teacher = UNet(unet_cfg)
    teacher.load_state_dict(weights)
    return student, teacher.eval().requires_grad_(False)


def _record_worker_nodes(cfg: StageConfig, run_id: str | None, logger: MetricLogger | None, world: int) -> None:
    """Tag the run with the Ray node addresses its training workers ran on (``oftsr.worker_nodes``: every attempt's,
    so a run that lost a node and resumed elsewhere names both). Every rank takes part; rank 0 writes."""
    here = ray.util.get_node_ip_address()
    nodes = [here] * world
    if world > 1 and dist.is_initialized():
        dist.all_gather_object(nodes, here)
    if logger is None or run_id is None:
        return
    with contextlib.suppress(Exception):  # a record, not a reason to stop training
        from pipelines.tracking import client

        before = client(cfg.tracking.tracking_uri).get_run(run_id).data.tags.get("oftsr.worker_nodes", "")
        seen = {n for n in before.split(",") if n} | set(nodes)
        logger.set_tags({"oftsr.worker_nodes": ",".join(sorted(seen)), "oftsr.workers_per_node": _per_node(nodes)})


def _per_node(nodes: list[str]) -> str:
    return ",".join(f"{n}={nodes.count(n)}" for n in sorted(set(nodes)))


def make_objective(cfg: StageConfig, teacher: torch.nn.Module | None) -> Objective:
    """The stage's training objective, built once: the loop calls it the same way whatever the stage."""
    m = cfg.method
    if cfg.stage == "teacher":
        return TeacherObjective(sigma_p=m.sigma_p)
    loss = {**dataclasses.asdict(cfg.loss), "t_min": m.t_min, "t_max": m.t_max}
    if cfg.targets == "cached":
        return CachedDistillObjective(**loss)
    return OnlineDistillObjective(teacher, sigma_p=m.sigma_p, **loss)


def _grid(cfg: StageConfig, net: torch.nn.Module, hr: torch.Tensor | None, x_lr: torch.Tensor) -> np.ndarray:
    """Rows of LR | output(s) | HR as one uint8 image: the teacher's 8-NFE sample, or the student at t=0 and 1."""
    gen = torch.Generator(device=x_lr.device).manual_seed(0)
    eps = torch.randn(x_lr.shape, generator=gen, device=x_lr.device, dtype=x_lr.dtype)  # the same noise every time
    with evaluating(net):
        if cfg.stage == "teacher":
            outs = [sample(net, x_lr, sigma_p=cfg.method.sigma_p, method="midpoint", steps=4, noise=eps).x]
        else:
            v = conditioned(net, x_lr)
            x0 = noisy_start(x_lr, cfg.method.sigma_p, noise=eps)
            outs = [one_step(v, x0, cfg.method.t_min), one_step(v, x0, cfg.method.t_max)]
    cols = [x_lr, *outs] + ([hr] if hr is not None else [])
    rows = torch.cat([torch.cat([image_to_uint8(c[i].float()) for c in cols], dim=-1) for i in range(x_lr.shape[0])], 1)
    return rows.permute(1, 2, 0).cpu().numpy()


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    cfg: StageConfig = config["cfg"]
    run_id: str | None = config.get("mlflow_run_id")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    precision = _precision(cfg, device)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank

    ckpt, resumed_from, passed_over = resume_checkpoint(ray.train.get_checkpoint())
    state: dict[str, Any] | None = ckpt["state"] if ckpt is not None else None
    images_seen = int(state["images_seen"]) if state is not None else 0
    # The first pass's data pipeline starts now, in a thread, while the networks, DDP and the logger are set up:
    # Ray Data's first batch (its tasks' processes starting) no longer waits for them (benchmarks/stage_startup.py).
    shard = ray.train.get_dataset_shard("train")

    def one_pass() -> Iterator[dict[str, Any]]:
        mix = cfg.seed * 1_000_003 + rank * 7919 + images_seen  # a fresh mix every pass and every attempt
        return iter_crops(
            shard, cfg.batch_per_worker, device=device, shuffle_buffer=cfg.shuffle_buffer, shuffle_seed=mix
        )

    first_pass: Iterable[dict[str, Any]] | None = FirstBatchEarly(one_pass)
    net, teacher = _networks(cfg)
    if teacher is not None:
        teacher.to(device)
    ema = EMA(net, cfg.ema_half_life_images)
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        ema.load_state_dict({"module": ckpt["ema"], "num_updates": state["ema_updates"]})
        torch.set_rng_state(state["torch_rng"])  # what the checkpoint saved, the resume restores
    ema.module.to(device)
    cuda = device.type == "cuda"
    if cfg.fast_modules if cfg.fast_modules is not None else cuda:
        use_fast_modules(net)  # same parameters and state-dict keys: checkpoints are unchanged
        if teacher is not None:
            use_fast_modules(teacher)
    ddp = {"broadcast_buffers": False, "gradient_as_bucket_view": True, "bucket_cap_mb": cfg.ddp_bucket_mb}
    model = ray.train.torch.prepare_model(net, parallel_strategy_kwargs=ddp)
    if cfg.compile if cfg.compile is not None else cuda:
        model = torch.compile(model)  # default mode; DDP's optimizer splits the graph at bucket boundaries
    optimizer = make_optimizer(net.parameters(), cfg.optim)
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank + images_seen)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if rank == 0 and "rng" in state and device.type == "cpu":
            gen.set_state(state["rng"])

    logger = MetricLogger(cfg.tracking.tracking_uri, run_id, background=True) if rank == 0 and run_id else None
    if logger and ckpt is not None:  # which checkpoint this attempt continued from (and any passed over)
        tags = {"oftsr.resumed_from": resumed_from, "oftsr.resumed_at_images": str(images_seen)}
        logger.set_tags({**tags, **({"oftsr.corrupt_checkpoints": " | ".join(passed_over)} if passed_over else {})})
    _record_worker_nodes(cfg, run_id, logger, world)
    objective = make_objective(cfg, teacher)
    next_log = (images_seen // cfg.log_every_images + 1) * cfg.log_every_images
    next_ckpt = (images_seen // cfg.checkpoint_every_images + 1) * cfg.checkpoint_every_images
    sums: dict[str, torch.Tensor] = {}
    steps, window_images = 0, 0
    last: dict[str, float] = {}
    # Rates: ``images_per_s`` is the wall-clock rate of this attempt (data wait, steps, logging, reports and
    # checkpoints included); ``step_images_per_s`` counts the optimisation steps alone.
    attempt_start, attempt_images = time.perf_counter(), images_seen
    step_timer = StepTimer(device)
    first_step_at = 0.0

    while images_seen < cfg.total_images:
        batches = 0
        # a resume does not replay the batches it already trained on: the mix depends on the images seen
        pass_batches, first_pass = first_pass or one_pass(), None
        for batch in pass_batches:
            batches += 1
            take = min(cfg.batch_per_worker, (cfg.total_images - images_seen) // world)
            batch = {k: v[:take] for k, v in batch.items()}
            if "seed" in batch and "x_lr" not in batch:  # data.degrade_on=worker: the chain runs here, batched
                batch = degrade_on_worker(cfg.data, batch)
            _maybe_fault(cfg, rank, images_seen)
            first_step_at = first_step_at or time.time()  # the stage's start-up ends here (driver: stage/startup_s)
            lr = lr_at(images_seen, cfg.optim)
            step_timer.start()
            stats = train_step(
                model,
                optimizer,
                objective,
                batch,
                lr=lr,
                grad_clip=cfg.optim.grad_clip,
                precision=precision,
                generator=gen,
            )
            step_timer.stop()
            images_seen += take * world
            window_images += take * world
            ema.update(net, take * world)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v.float()
            steps += 1
            done = images_seen >= cfg.total_images

            if images_seen >= next_log or done:
                names = sorted(sums)
                vec = torch.stack([sums[k] for k in names]) / steps
                if world > 1:
                    dist.all_reduce(vec)
                    vec /= world
                last = {f"train/{k}": float(v) for k, v in zip(names, vec.tolist(), strict=True)}
                wall = time.perf_counter() - attempt_start
                last.update(
                    {
                        "train/lr": lr,
                        "train/images_per_s": (images_seen - attempt_images) / max(wall, 1e-9),
                        "train/step_images_per_s": window_images / max(step_timer.take(), 1e-9),
                        "train/images_seen": images_seen,
                        "train/ema_decay": ema.decay(take * world),
                    }
                )
                if logger:
                    logger.log(last, step=images_seen)
                sums, steps, window_images = {}, 0, 0
                next_log = (images_seen // cfg.log_every_images + 1) * cfg.log_every_images

            if images_seen >= next_ckpt or done:
                _report(cfg, rank, net, ema, optimizer, gen, images_seen, last, logger, batch)
                next_ckpt = (images_seen // cfg.checkpoint_every_images + 1) * cfg.checkpoint_every_images
            if done:
                break
        if batches == 0:
            raise RuntimeError("the training dataset yielded no batch: fewer usable crops than batch_per_worker?")
    if logger:
        logger.close()
    out = {"images_seen": images_seen, "images_at_start": attempt_images, "first_step_at": first_step_at, **last}
    if resumed_from:
        out.update(resumed_from=resumed_from, corrupt_checkpoints=passed_over)
    if logger and logger.spool_file:
        out["mlflow_spool"] = logger.spool_file
    return out


class FirstBatchEarly:
    """Iterates ``make()``, whose first item is fetched in a thread started at construction, so that the wait for
    it overlaps whatever the caller does meanwhile. An error in that thread is raised where the item is taken."""

    def __init__(self, make: Callable[[], Iterable[Any]]):
        self._it: Iterator[Any] | None = None
        self._first: list[Any] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fetch, args=(make,), name="oftsr-first-batch", daemon=True)
        self._thread.start()

    def _fetch(self, make: Callable[[], Iterable[Any]]) -> None:
        try:
            self._it = iter(make())
            self._first = [next(self._it)]
        except StopIteration:
            pass
        except BaseException as err:  # re-raised in the caller's thread
            self._error = err

    def __iter__(self) -> Iterator[Any]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self._first
        if self._it is not None:
            yield from self._it


class StepTimer:
    """Seconds spent in optimisation steps: wall-clock on the CPU, CUDA events on a GPU (no synchronisation per
    step; :meth:`take` waits for the recorded steps when the metrics are read anyway)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds, self.events, self.t = 0.0, [], 0.0

    def start(self) -> None:
        if self.cuda:
            self.events.append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
            self.events[-1][0].record()
        else:
            self.t = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self.events[-1][1].record()
        else:
            self.seconds += time.perf_counter() - self.t

    def take(self) -> float:
        """The step seconds since the last call."""
        if self.cuda and self.events:
            self.events[-1][1].synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self.events) / 1000.0
            self.events = []
        out, self.seconds = self.seconds, 0.0
        return out


def resume_checkpoint(latest: ray.train.Checkpoint | None) -> tuple[dict[str, Any] | None, str, list[str]]:
    """The newest checkpoint of the run that verifies, starting from ``latest`` (what Ray Train restored).

    A corrupt checkpoint (checksum mismatch, missing file) is passed over with a warning and the previous one
    is tried, so one bad write costs one checkpoint interval, not the run. Returns ``(checkpoint or None,
    its folder name, [reasons for each passed-over checkpoint])``; raises :class:`CheckpointCorrupt` when none
    verifies (the run is never silently restarted from zero).
    """
    if latest is None:
        return None, "", []
    import pyarrow.fs

    fs, path = latest.filesystem, latest.path.rstrip("/")
    parent, name = path.rsplit("/", 1)
    older = [
        info.path
        for info in fs.get_file_info(pyarrow.fs.FileSelector(parent))
        if info.type == pyarrow.fs.FileType.Directory
        and info.base_name.startswith("checkpoint_")
        and info.base_name < name
    ]
    passed_over: list[str] = []
    for candidate in [path, *sorted(older, reverse=True)]:
        try:
            with ray.train.Checkpoint(candidate, filesystem=fs).as_directory() as folder:
                ckpt = load_checkpoint(folder)
        except (CheckpointCorrupt, OSError) as err:
            passed_over.append(f"{candidate}: {err}")
            warnings.warn(f"checkpoint {candidate} is unusable ({err}); trying the previous one", stacklevel=1)
            continue
        return ckpt, candidate.rsplit("/", 1)[-1], passed_over
    raise CheckpointCorrupt(f"no usable checkpoint under {parent}: " + "; ".join(passed_over))


def _report(cfg, rank, net, ema, optimizer, gen, images_seen, metrics, logger, batch) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (and logs the sample grid)."""
    name = f"checkpoint_{images_seen:012d}"
    if rank != 0:
        ray.train.report({**metrics, "images_seen": images_seen}, checkpoint=None, checkpoint_dir_name=name)
        return
    state = {
        "optimizer": optimizer.state_dict(),
        "images_seen": images_seen,
        "ema_updates": ema.num_updates,
        "torch_rng": torch.get_rng_state(),
    }
    if gen.device.type == "cpu":
        state["rng"] = gen.get_state()
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(
            tmp,
            model=net,
            ema=ema.module,
            unet=net.config,
            state=state,
            stage={
                "stage": cfg.stage,
                "run_name": cfg.run_name,
                "images_seen": images_seen,
                **cfg.method.to_dict(),
            },
        )
        ray.train.report(
            {**metrics, "images_seen": images_seen},
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=name,
        )
    if logger and cfg.sample_grid > 0:
        n = min(cfg.sample_grid, batch["x_lr"].shape[0])
        hr = batch["hr"][:n] if "hr" in batch else None
        logger.log_image(_grid(cfg, ema.module, hr, batch["x_lr"][:n]), f"samples/{name}.png")
