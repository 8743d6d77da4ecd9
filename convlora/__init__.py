"""convlora: convolutional and diffusion LoRA with exact merge-on-eval.

>>> import convlora
>>> cfg = convlora.LoRAConfig(r=8, target_modules=["to_q", "conv1"])
>>> convlora.inject_lora(model, cfg)            # doctest: +SKIP
"""

from convlora.config import LoRAConfig
from convlora.inject import (
    adapter_parameters,
    cast_lora_params,
    disable_lora,
    get_config,
    inject_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_and_unload,
    plan_injection,
    temporarily_unmerged,
    unload,
)
from convlora.io import LoRAFileError, load_lora, read_safetensors, save_lora, write_safetensors
from convlora.layers import Conv1d, Conv2d, Conv3d, GPT2Conv1D, Linear, LoRALayer
from convlora.state import StateDictMismatchError, delta_weight
from convlora.strength import get_lora_scale, lora_scale, set_lora_scale

__version__ = "0.1.0"

__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "GPT2Conv1D",
    "Linear",
    "LoRAConfig",
    "LoRAFileError",
    "LoRALayer",
    "StateDictMismatchError",
    "adapter_parameters",
    "cast_lora_params",
    "delta_weight",
    "disable_lora",
    "get_config",
    "get_lora_scale",
    "inject_lora",
    "load_lora",
    "load_lora_state_dict",
    "lora_layers",
    "lora_scale",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_and_unload",
    "plan_injection",
    "read_safetensors",
    "save_lora",
    "set_lora_scale",
    "temporarily_unmerged",
    "unload",
    "write_safetensors",
]
