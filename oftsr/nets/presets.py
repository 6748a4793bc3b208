"""Named UNet presets (DESIGN section 7) and :func:`build_unet`."""

from __future__ import annotations

import dataclasses

import torch

from oftsr.nets.unet import UNet, UNetConfig

PRESETS: dict[str, UNetConfig] = {
    # DPS / guided-diffusion FFHQ 256 architecture (also used for DIV2K): 93.57 M parameters with 6 inputs.
    "ffhq": UNetConfig(),
    # guided-diffusion ImageNet 256 (unconditional) architecture: 552.8 M parameters with 6 inputs.
    "imagenet": UNetConfig(model_channels=256, num_res_blocks=2, attention_resolutions=(32, 16, 8)),
    # CPU-friendly: three levels, attention at the lowest.
    "tiny": UNetConfig(
        image_size=64,
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(16,),
        num_head_channels=32,
        dropout=0.0,
    ),
}


def preset_config(preset: str, **overrides) -> UNetConfig:
    """The :class:`UNetConfig` of ``preset`` with ``overrides`` applied (unknown fields raise ``ValueError``)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}; expected one of {sorted(PRESETS)}")
    known = {f.name for f in dataclasses.fields(UNetConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown UNet override(s) {sorted(unknown)} for preset {preset!r}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def build_unet(preset: str, *, device: torch.device | str | None = None, **overrides) -> UNet:
    """Build the UNet of ``preset``. ``device="meta"`` builds the graph without allocating weights."""
    config = preset_config(preset, **overrides)
    if device is None:
        return UNet(config)
    with torch.device(device):
        return UNet(config)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
