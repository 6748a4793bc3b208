"""The ADM ("guided-diffusion") UNet used by OFTSR for the teacher and the student (DESIGN section 7).

Module and parameter names follow guided-diffusion's ``UNetModel`` so that its published state dicts
(e.g. the DPS FFHQ model) load directly; see :func:`oftsr.nets.weights.widen_input_conv` for the 3 -> 6 channel
input. GroupNorm(32) computed in fp32, SiLU, scale-shift time conditioning, residual up/down-sampling, dropout,
zero-initialised output convolutions. Attention is the legacy QKV einsum or ``scaled_dot_product_attention``
(same parameters, same result up to rounding).

Input ``(B, in_channels, H, W)`` with H, W multiples of :attr:`UNet.downsample_factor`; time ``(B,)`` already
scaled (``999 t``); output ``(B, out_channels, H, W)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn

from oftsr.nets.blocks import (
    AttentionBlock,
    Downsample,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    normalization,
    timestep_embedding,
    zero_module,
)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of an ADM UNet. ``attention_resolutions`` are feature-map sizes at ``image_size``."""

    image_size: int = 256
    in_channels: int = 6
    out_channels: int = 6
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (16,)
    num_head_channels: int = 64
    dropout: float = 0.1
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True
    attention: Literal["legacy", "sdpa"] = "legacy"

    def __post_init__(self) -> None:
        for name in ("image_size", "in_channels", "out_channels", "model_channels", "num_res_blocks"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"UNetConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"UNetConfig.channel_mult must be positive integers, got {self.channel_mult!r}")
        if self.model_channels % 32:
            raise ValueError(
                f"UNetConfig.model_channels must be a multiple of 32 (GroupNorm), got {self.model_channels}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must lie in [0, 1), got {self.dropout}")
        if self.attention not in ("legacy", "sdpa"):
            raise ValueError(f"UNetConfig.attention must be 'legacy' or 'sdpa', got {self.attention!r}")
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UNetConfig fields: {sorted(unknown)}")
        return cls(**d)


class UNet(nn.Module):
    """ADM UNet: ``forward(x: (B, in_channels, H, W), t: (B,)) -> (B, out_channels, H, W)``."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch = cfg.model_channels
        emb_dim = ch * 4
        attn_ds = {cfg.image_size // r for r in cfg.attention_resolutions}
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(cin: int, cout: int, **kw: bool) -> ResBlock:
            return ResBlock(cin, emb_dim, cfg.dropout, cout, cfg.use_scale_shift_norm, **kw)

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(c, cfg.num_head_channels, cfg.attention)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        chans, ds = [ch], 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * cfg.model_channels)]
                ch = mult * cfg.model_channels
                if ds in attn_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = res(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch, True)
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch), res(ch, ch))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + chans.pop(), cfg.model_channels * mult)]
                ch = cfg.model_channels * mult
                if ds in attn_ds:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, True))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(cfg.model_channels, cfg.out_channels, 3, padding=1))
        )

    @property
    def downsample_factor(self) -> int:
        """H and W of the input must be multiples of this."""
        return 2 ** (len(self.config.channel_mult) - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        f = self.downsample_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"UNet input size {tuple(x.shape[-2:])} must be a multiple of {f}; pad it first")
        if x.shape[1] != self.config.in_channels:
            raise ValueError(f"UNet expects {self.config.in_channels} input channels, got {x.shape[1]}")
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
