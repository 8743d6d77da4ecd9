"""Diffusion integration: UNet / text-encoder target presets and whole-pipeline LoRA files.

>>> from convlora.diffusion import unet_lora_config, text_encoder_lora_config
>>> cfg = unet_lora_config("full", rank=8, conv_rank=4)
"""

from convlora.diffusion.presets import (
    TEXT_ENCODER_PRESETS,
    UNET_PRESETS,
    lora_parameter_count,
    text_encoder_lora_config,
    unet_lora_config,
)

__all__ = [
    "TEXT_ENCODER_PRESETS",
    "UNET_PRESETS",
    "lora_parameter_count",
    "text_encoder_lora_config",
    "unet_lora_config",
]
