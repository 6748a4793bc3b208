"""The inference engine: the one-step student prepared for speed on the device it runs on.

``fast_student(net, device)`` returns a module with the network's call signature ``(x: (B, 6, H, W), t: (B,))``
that the tiling of :func:`oftsr.infer.upscale` (and anything else taking a velocity network) uses unchanged:

* attention through ``scaled_dot_product_attention`` (flash / memory-efficient kernels) instead of the legacy
  QKV einsum; the same weights;
* GroupNorm, scale-shift and SiLU fused into one expression (:func:`oftsr.nets.blocks.fuse_norm_act`);
* channels-last memory layout;
* on CUDA: bf16 weights and activations (GroupNorm statistics in fp32), ``torch.compile`` (default mode: the
  ``max-autotune`` mode takes longer to compile than it ever saves here) and CUDA graphs (the compile mode
  ``reduce-overhead``), fed with static shapes: a batch smaller than ``static_batch`` is padded up to it, so one
  graph serves every call at a given tile size;
* on CPU: fp32, all cores, no compile by default (compiling costs more than a CLI call saves).

The numerics against the fp32 eager network are checked by ``benchmarks/gpu_infer.py`` (max abs difference and
PSNR between the two outputs, at least 45 dB required) and, on CPU, by the tests.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Literal

import torch
from torch import nn

from oftsr.nets.blocks import AttentionBlock, fuse_norm_act
from oftsr.nets.unet import UNet

Precision = Literal["auto", "fp32", "bf16", "fp16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How :func:`fast_student` prepares a network; ``auto`` picks the best setting for the device."""

    precision: Precision = "auto"  # bf16 on CUDA, fp32 elsewhere
    channels_last: bool = True
    sdpa: bool = True
    fuse_norm: bool = True
    compile: bool | None = None  # None: on CUDA only
    cuda_graphs: bool | None = None  # None: when compiling on CUDA
    static_batch: int = 0  # pad batches up to a multiple of this (0: no padding, or 16 when graphs are on)

    def __post_init__(self):
        if self.precision not in ("auto", *DTYPES):
            raise ValueError(f"EngineConfig.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.static_batch < 0:
            raise ValueError(f"EngineConfig.static_batch must be >= 0, got {self.static_batch}")


class FastStudent(nn.Module):
    """A prepared copy of a velocity network (see the module docstring); ``forward`` returns fp32."""

    def __init__(self, net: UNet, device: torch.device, cfg: EngineConfig):
        super().__init__()
        cuda = device.type == "cuda"
        self.dtype = DTYPES["bf16" if cfg.precision == "auto" and cuda else cfg.precision.replace("auto", "fp32")]
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.net = prepare_network(net, sdpa=cfg.sdpa, fuse_norm=cfg.fuse_norm)
        self.net = self.net.to(device=device, dtype=self.dtype, memory_format=self.memory_format)
        self.net.eval().requires_grad_(False)
        compile_ = cuda if cfg.compile is None else cfg.compile
        graphs = (compile_ and cuda) if cfg.cuda_graphs is None else cfg.cuda_graphs
        self.static_batch = cfg.static_batch or (16 if graphs else 0)
        self.compiled = compile_
        self.cuda_graphs = graphs
        call = (
            torch.compile(self.net, mode="reduce-overhead" if graphs else "default", dynamic=False)
            if compile_
            else self.net
        )
        object.__setattr__(self, "call", call)  # not a second registered copy of the weights
        self.downsample_factor = net.downsample_factor
        super().train(False)

    def train(self, mode: bool = True) -> FastStudent:
        """Inference only: the network stays in eval mode (no dropout) whatever is asked."""
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if self.static_batch and b % self.static_batch:
            extra = self.static_batch - b % self.static_batch
            x = torch.cat([x, x[-1:].expand(extra, *x.shape[1:])])
            t = torch.cat([t, t[-1:].expand(extra)])
        x = x.to(dtype=self.dtype).contiguous(memory_format=self.memory_format)
        out = self.call(x, t.to(torch.float32))
        if self.cuda_graphs:
            out = out.clone()  # the graph's output buffer is overwritten by the next replay
        return out[:b].float()


def use_fast_modules(net: nn.Module, *, sdpa: bool = True, fuse_norm: bool = True) -> nn.Module:
    """In place: attention through SDPA and fused norm-activation. Both compute the same function with the same
    parameters and state-dict keys, so training with them writes ordinary checkpoints. Returns ``net``."""
    if sdpa:
        for module in net.modules():
            if isinstance(module, AttentionBlock):
                module.impl = "sdpa"
    if fuse_norm:
        fuse_norm_act(net)
    return net


def prepare_network(net: UNet, *, sdpa: bool = True, fuse_norm: bool = True) -> UNet:
    """A copy of ``net`` with :func:`use_fast_modules` applied (the original is left as it was)."""
    return use_fast_modules(copy.deepcopy(net), sdpa=sdpa, fuse_norm=fuse_norm)


def set_cpu_threads() -> int:
    """All the cores this process may use (its affinity mask, not the machine's count)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def fast_student(net: UNet, device: str | torch.device = "cpu", cfg: EngineConfig | None = None) -> FastStudent:
    """``net`` prepared for fast inference on ``device`` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cpu":
        set_cpu_threads()
    return FastStudent(net, device, cfg or EngineConfig())


__all__ = ["EngineConfig", "FastStudent", "fast_student", "prepare_network", "set_cpu_threads", "use_fast_modules"]
