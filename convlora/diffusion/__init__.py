"""Diffusion integration: UNet / text-encoder target presets and whole-pipeline LoRA files.

>>> from convlora.diffusion import unet_lora_config, text_encoder_lora_config
>>> cfg = unet_lora_config("full", rank=8, conv_rank=4)
>>> inject_pipeline_lora(pipe, unet_config=cfg)                              # doctest: +SKIP
>>> save_pipeline_lora("pytorch_lora_weights.safetensors", unet=pipe.unet)   # doctest: +SKIP
"""

from convlora.diffusion.pipeline import inject_pipeline_lora, load_pipeline_lora, save_pipeline_lora
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
    "inject_pipeline_lora",
    "load_pipeline_lora",
    "lora_parameter_count",
    "text_encoder_lora_config",
    "save_pipeline_lora",
    "unet_lora_config",
]
