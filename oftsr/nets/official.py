"""Checkpoints of the official OFTSR code (github.com/yuanzhi-zhu/OFTSR), read into our ADM UNet.

What the official training and distillation scripts save (their ``fm/utils.py``, ``models/ema.py``), and what we read:

* ``checkpoints/checkpoint_N.pth`` (the released files): ``{"ema": {"decay", "num_updates", "shadow_params"},
  "step"}``, where ``shadow_params`` is a **list** of tensors in the order of the network's ``parameters()``;
* ``checkpoints-meta/checkpoint.pth`` (for resuming): the same plus ``"model"`` (the state dict of the network
  wrapped in ``DistributedDataParallel``, so every key starts with ``module.``, and ``module._orig_mod.`` when it was
  compiled) and ``"optimizer"``.

Their network is guided-diffusion's ``UNetModel`` with ``learn_sigma`` (6 output channels, the first 3 used) and,
for the conditional models, its input convolution replaced by one of 6 input channels (``change_input_conv``). Its
module names are guided-diffusion's, which ours keep (:mod:`oftsr.nets.unet`): a ``model`` state dict loads with
its prefixes removed, and the EMA list maps onto our ``named_parameters()`` in order (the registration orders are
the same: time embedding, input blocks, middle block, output blocks, output head; in a residual block its input
layers, time projection, output layers, skip; in an attention block its norm, qkv and output projection). The
tests check this against a functional forward written from the official configuration alone.

Files are read with ``torch.load(weights_only=True)``: a pickle that needs anything beyond tensors and plain
containers is refused.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oftsr.nets.unet import UNetConfig

_PREFIXES = ("module.", "_orig_mod.")

#: The ``network`` sections of the official configs (``configs/ir_fm_*.yml``, same in ``dis_fm_*.yml``) with
#: ``fm_model.use_cond`` and ``dataset.img_size``; the official model factory adds ``learn_sigma``, 64-channel
#: attention heads and scale-shift norm.
OFFICIAL_NETWORKS: dict[str, dict[str, Any]] = {
    "ffhq": {
        "model_arch": "guided_unet",
        "img_size": 256,
        "in_channels": 3,
        "out_channels": 3,
        "num_channels": 128,
        "num_res_blocks": 1,
        "attention_resolutions": "16",
        "num_heads": 4,
        "dropout": 0.1,
        "channel_mult": "1, 1, 2, 2, 4, 4",
        "resblock_updown": True,
        "use_group_norm": True,
        "use_attention": True,
        "use_input_skip": False,
        "use_cond": True,
    },
}
OFFICIAL_NETWORKS["div2k"] = dict(OFFICIAL_NETWORKS["ffhq"])
OFFICIAL_NETWORKS["imagenet"] = {
    **OFFICIAL_NETWORKS["ffhq"],
    "num_channels": 256,
    "num_res_blocks": 2,
    "attention_resolutions": "32,16,8",
}

#: The official task name in a checkpoint's file name (``...-FFHQ-checkpoint_10.pth``) -> our recipe, by
#: degradation (the noisy FFHQ models use ``sr_avp``).
TASK_RECIPES = {
    ("FFHQ", "bicubic"): "ffhq_x4",
    ("FFHQ", "avgpool"): "ffhq_x4_noisy",
    ("DIV2K", "bicubic"): "div2k_x4",
    ("ImageNet", "bicubic"): "imagenet_x4",
}


def unet_config_from_official(network: Mapping[str, Any]) -> UNetConfig:
    """Our :class:`UNetConfig` for an official ``network`` config section (plus ``img_size`` and ``use_cond``).

    Switches our network does not implement (an input skip, no group norm, no attention, class labels, no
    condition, fractional channel multipliers) are refused, naming the field."""

    def need(field: str, value: Any) -> None:
        if network.get(field, value) != value:
            found = network.get(field)
            raise ValueError(f"official network field {field}={found!r} is not supported (needs {value!r})")

    need("model_arch", "guided_unet")
    need("use_input_skip", False)
    need("use_group_norm", True)
    need("use_attention", True)
    need("use_cond", True)
    need("num_classes", None)
    size = int(network.get("img_size", 256))
    mult_text = str(network.get("channel_mult", "")).strip()
    if mult_text:
        mults = [float(m) for m in mult_text.split(",")]
    else:  # the official factory's defaults by image size
        defaults = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
        if size not in defaults:
            raise ValueError(f"official network: no default channel_mult for img_size={size}")
        mults = list(defaults[size])
    if any(m != int(m) for m in mults):
        raise ValueError(f"official network field channel_mult={mult_text!r}: fractional multipliers not supported")
    channels = 3 * (2 if network.get("use_cond", True) else 1)
    return UNetConfig(
        image_size=size,
        in_channels=int(network.get("in_channels", 3)) * channels // 3,
        out_channels=2 * int(network.get("out_channels", 3)),  # learn_sigma
        model_channels=int(network["num_channels"]),
        channel_mult=tuple(int(m) for m in mults),
        num_res_blocks=int(network["num_res_blocks"]),
        attention_resolutions=tuple(int(r) for r in str(network["attention_resolutions"]).split(",")),
        num_head_channels=64,
        dropout=float(network.get("dropout", 0.0)),
        resblock_updown=bool(network.get("resblock_updown", True)),
        use_scale_shift_norm=True,
    )


def method_from_checkpoint_name(name: str) -> dict[str, Any]:
    """What an official checkpoint's file name says about it, e.g.
    ``sr_avp-sf4-sigmay_0.05-guided_unet-sigma0.5-bs128-loss_l1-lr0.0001-FFHQ-checkpoint_23.pth`` ->
    ``{"degradation": "avgpool", "sf": 4, "sigma_y": 0.05, "sigma_p": 0.5, "task": "FFHQ", "kind": "teacher",
    "recipe": "ffhq_x4_noisy"}``. Fields the name does not give are left out."""
    stem = Path(name).name
    tokens = stem.removesuffix(".pth").removesuffix(".pt").split("-")
    out: dict[str, Any] = {}
    for token in tokens:
        if token in ("sr_bicubic", "sr_interp"):
            out["degradation"] = "bicubic"
        elif token == "sr_avp":
            out["degradation"] = "avgpool"
        elif m := re.fullmatch(r"sf(\d+)", token):
            out["sf"] = int(m.group(1))
        elif m := re.fullmatch(r"sigmay_([0-9.]+)", token):
            out["sigma_y"] = float(m.group(1))
        elif m := re.fullmatch(r"sigma([0-9.]+)", token):
            out["sigma_p"] = float(m.group(1))
        elif m := re.fullmatch(r"(FFHQ|DIV2K|ImageNet)(_DIS)?", token):
            out["task"] = m.group(1)
        elif token == "distil":
            out["kind"] = "student"
    if "degradation" in out:
        out.setdefault("sigma_y", 0.0)
    if "task" in out:
        out.setdefault("kind", "teacher")
        recipe = TASK_RECIPES.get((out["task"], out.get("degradation", "bicubic")))
        if recipe:
            out["recipe"] = recipe
    return out


def read_official_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict of an official ``.pth`` file, loaded with ``weights_only=True``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # refused by the weights-only unpickler, truncated, or not a torch file
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: cannot be read as a weights-only checkpoint: {reason}") from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not the official checkpoint dict")
    return dict(obj)


def official_state_dict(
    checkpoint: Mapping[str, Any], net: nn.Module, *, raw: bool = False, where: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """Our state dict for ``net`` from an official checkpoint dict: its EMA weights (``shadow_params``, in the
    order of ``net.named_parameters()``), or with ``raw`` its ``model`` state dict (prefixes removed).

    Raises ``ValueError`` naming what does not fit: a missing entry, the number of EMA tensors, missing or
    unexpected keys, or the first tensor of the wrong shape (with its index and our name for it)."""
    own = dict(net.named_parameters())
    if raw:
        model = checkpoint.get("model")
        if not isinstance(model, Mapping):
            raise ValueError(
                f"{where} has no 'model' state dict (entries: {sorted(checkpoint)}); the released files hold the EMA"
                " weights only: import without --raw"
            )
        state = {}
        for key, value in model.items():
            while key.startswith(_PREFIXES):
                key = key.split(".", 1)[1]
            state[key] = value
        expected = net.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise ValueError(f"{where}: 'model' has missing keys {missing[:5]} and unexpected keys {unexpected[:5]}")
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.shape != expected[key].shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"{where}: 'model' tensor {key} has shape {shape}, the network needs {tuple(expected[key].shape)}"
                )
        return state
    ema = checkpoint.get("ema")
    shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
    if not isinstance(shadow, (list, tuple)):
        raise ValueError(f"{where} has no 'ema' entry with a 'shadow_params' list (entries: {sorted(checkpoint)})")
    if len(shadow) != len(own):
        raise ValueError(f"{where}: 'ema' holds {len(shadow)} tensors, the network has {len(own)} parameters")
    state = {}
    for i, ((name, param), value) in enumerate(zip(own.items(), shadow, strict=True)):
        if not isinstance(value, torch.Tensor) or value.shape != param.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"{where}: EMA tensor {i} ({name}) has shape {shape}, the network needs {tuple(param.shape)}"
            )
        state[name] = value
    return state


__all__ = [
    "OFFICIAL_NETWORKS",
    "TASK_RECIPES",
    "method_from_checkpoint_name",
    "official_state_dict",
    "read_official_checkpoint",
    "unet_config_from_official",
]
