"""The ADM UNet's building blocks, named as guided-diffusion names them (see :mod:`oftsr.nets.unet`).

GroupNorm(32) in fp32 (optionally fused with SiLU for inference), sinusoidal time embedding, scale-shift residual
blocks with optional up/down-sampling, and QKV attention (legacy einsum or ``scaled_dot_product_attention``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in fp32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight.float(), self.bias.float()  # bf16 networks keep the statistics in fp32
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int) -> nn.GroupNorm:
    return GroupNorm32(32, channels)


def group_norm_silu(
    x: torch.Tensor, norm: nn.GroupNorm, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
) -> torch.Tensor:
    """``SiLU(GroupNorm(x) [* (1 + scale) + shift])`` in one fp32 expression, cast back once.

    The same function as the module chain ``GroupNorm32 -> (scale-shift) -> SiLU`` (exactly so in fp32; in bf16
    it rounds once instead of three times). Written as one expression so that ``torch.compile`` emits one kernel
    for it: at 256² with 128 channels these element-wise passes are what bounds the network on a GPU.
    """
    h = F.group_norm(x.float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps)
    if scale is not None:
        h = h * (1 + scale.float()) + shift.float()
    return F.silu(h).type(x.dtype)


class GroupNormSiLU(GroupNorm32):
    """``GroupNorm32`` followed by SiLU as one module (same parameters and state-dict keys as ``GroupNorm32``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_silu(x, self)


def fuse_norm_act(net: nn.Module) -> nn.Module:
    """Fuse every ``GroupNorm32 -> [scale-shift ->] SiLU`` of an ADM UNet in place (see :func:`group_norm_silu`);
    returns ``net``. Weights and state-dict keys are unchanged, so checkpoints load either way."""
    for module in net.modules():
        if isinstance(module, ResBlock):
            module.fused = True
        chain = isinstance(module, nn.Sequential) and len(module) >= 2
        if chain and type(module[0]) is GroupNorm32 and isinstance(module[1], nn.SiLU):
            fused = GroupNormSiLU(module[0].num_groups, module[0].num_channels, module[0].eps)
            fused.load_state_dict(module[0].state_dict())
            module[0], module[1] = fused.to(module[0].weight.device, module[0].weight.dtype), nn.Identity()
    return net


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``(B,) -> (B, dim)``: ``[cos(t f), sin(t f)]`` with ``f_i = max_period^(-i / half)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepBlock(nn.Module):
    """A block whose forward takes the time embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest 2x up-sampling, optionally followed by a 3x3 convolution."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x down-sampling by a strided 3x3 convolution or a 2x2 average."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.op = (
            nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block with scale-shift time conditioning and optional up/down-sampling."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = True,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        self.fused = False  # set by fuse_norm_act

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            if self.fused:  # norm, scale-shift and SiLU as one expression; out_layers[1] is then an Identity
                h = self.out_layers[2:](group_norm_silu(h, self.out_layers[0], scale, shift))
            else:
                h = self.out_layers[0](h) * (1 + scale) + shift
                h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention with guided-diffusion's legacy head layout (heads split before q/k/v)."""

    def __init__(self, channels: int, num_head_channels: int, impl: str = "legacy"):
        super().__init__()
        if channels % num_head_channels:
            raise ValueError(f"attention channels {channels} not divisible by head channels {num_head_channels}")
        self.num_heads = channels // num_head_channels
        self.impl = impl
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        h = attention_sdpa(qkv, self.num_heads) if self.impl == "sdpa" else attention_legacy(qkv, self.num_heads)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


def attention_legacy(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(B, 3 H C, T) -> (B, H C, T)``: softmax(q k^T / sqrt(C)) v with einsum, softmax in fp32."""
    bs, width, length = qkv.shape
    ch = width // (3 * num_heads)
    q, k, v = qkv.reshape(bs * num_heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


def attention_sdpa(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Same as :func:`attention_legacy` through ``F.scaled_dot_product_attention`` (flash / memory-efficient)."""
    bs, width, length = qkv.shape
    ch = width // (3 * num_heads)
    q, k, v = qkv.reshape(bs, num_heads, ch * 3, length).transpose(-1, -2).split(ch, dim=-1)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, C)
    return out.transpose(-1, -2).reshape(bs, num_heads * ch, length)
