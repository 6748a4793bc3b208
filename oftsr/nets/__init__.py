"""Networks: the ADM UNet, its presets, and weight loading."""

from oftsr.nets.presets import PRESETS, build_unet, count_parameters, preset_config
from oftsr.nets.unet import UNet, UNetConfig
from oftsr.nets.weights import load_weights, save_weights, widen_input_conv

__all__ = [
    "PRESETS",
    "UNet",
    "UNetConfig",
    "build_unet",
    "count_parameters",
    "load_weights",
    "preset_config",
    "save_weights",
    "widen_input_conv",
]
