"""Diffusion integration: UNet / text-encoder target presets and whole-pipeline LoRA files.

>>> from convlora.diffusion import unet_lora_config, text_encoder_lora_config
>>> cfg = unet_lora_config("full", rank=8, conv_rank=4)
>>> inject_pipeline_lora(pipe, unet_config=cfg)                              # doctest: +SKIP
>>> save_pipeline_lora("pytorch_lora_weights.safetensors", unet=pipe.unet)   # doctest: +SKIP
"""

from convlora.diffusion.pipeline import (
    TRAINING_METADATA,
    build_pipeline_skeleton,
    inject_pipeline_lora,
    load_pipeline_lora,
    save_pipeline_lora,
)
from convlora.diffusion.presets import (
    TEXT_ENCODER_PRESETS,
    UNET_PRESETS,
    lora_parameter_count,
    text_encoder_lora_config,
    unet_lora_config,
)

__all__ = [
    "TEXT_ENCODER_PRESETS",
    "TRAINING_METADATA",
    "UNET_PRESETS",
    "build_pipeline_skeleton",
    "inject_pipeline_lora",
    "load_pipeline_lora",
    "lora_parameter_count",
    "save_pipeline_lora",
    "text_encoder_lora_config",
    "unet_lora_config",
]
