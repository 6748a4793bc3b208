"""Loading and saving network weights: safetensors, or ``torch.load(weights_only=True)`` (never arbitrary pickle).

Accepts guided-diffusion / DPS checkpoints (plain state dicts), our own checkpoints (``{"ema": ..., "model": ...}``),
and wrapped names (``module.``, ``_orig_mod.``). A pretrained unconditional ADM (3 input channels) is widened to our
6-channel input by :func:`widen_input_conv`, so the warm start begins exactly as the pretrained network.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

INPUT_CONV = "input_blocks.0.0.weight"
_WRAPPER_KEYS = ("ema", "state_dict", "model", "net")
_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: str | os.PathLike, prefer: str = "ema") -> dict[str, torch.Tensor]:
    """Read a state dict from a local ``.safetensors`` or torch file (weights only).

    For a checkpoint holding several state dicts, ``prefer`` picks one (``ema`` first, then ``model``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling refused or corrupt file: name the file and the reason
            raise ValueError(f"cannot load weights from {path}: {type(err).__name__}: {err}") from err
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    for key in (prefer, *_WRAPPER_KEYS):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        if isinstance(value, torch.Tensor):
            out[name] = value
    if not out:
        raise ValueError(f"{path} holds no tensors")
    return out


def widen_input_conv(state: dict[str, torch.Tensor], in_channels: int) -> dict[str, torch.Tensor]:
    """Copy a pretrained input conv into the first channels and zero the added (condition) channels."""
    w = state.get(INPUT_CONV)
    if w is None or w.shape[1] >= in_channels:
        return state
    wide = torch.zeros(w.shape[0], in_channels, *w.shape[2:], dtype=w.dtype)
    wide[:, : w.shape[1]] = w
    return {**state, INPUT_CONV: wide}


def load_weights(net: nn.Module, path: str | os.PathLike, *, widen: bool = True, prefer: str = "ema") -> nn.Module:
    """Load weights from ``path`` into ``net`` strictly; widen a 3-channel input conv when ``widen``."""
    state = read_state_dict(path, prefer=prefer)
    own = net.state_dict()
    if widen and INPUT_CONV in own:
        state = widen_input_conv(state, own[INPUT_CONV].shape[1])
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad_shapes = [
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if missing or unexpected or bad_shapes:
        raise ValueError(
            f"weights in {path} do not fit the network: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatch {bad_shapes[:3]}"
        )
    net.load_state_dict(state)
    return net


def save_weights(net: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Save a state dict as safetensors, atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = net.state_dict() if isinstance(net, nn.Module) else dict(net)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)
    return path
