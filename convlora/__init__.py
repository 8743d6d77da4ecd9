"""convlora: convolutional and diffusion LoRA with exact merge-on-eval.

>>> import convlora
>>> cfg = convlora.LoRAConfig(r=8, target_modules=["to_q", "conv1"])
>>> convlora.inject_lora(model, cfg)            # doctest: +SKIP
"""

from convlora.config import LoRAConfig
from convlora.inject import (
    active_adapters,
    adapter_parameters,
    cast_lora_params,
    delete_adapter,
    disable_lora,
    get_config,
    inject_lora,
    list_adapters,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_and_unload,
    plan_injection,
    set_adapters,
    temporarily_unmerged,
    unload,
)
from convlora.io import (
    LoRAFileError,
    load_all_adapters,
    load_lora,
    read_safetensors,
    save_all_adapters,
    save_lora,
    write_safetensors,
)
from convlora.layers import DEFAULT_ADAPTER, Conv1d, Conv2d, Conv3d, GPT2Conv1D, Linear, LoRAAdapter, LoRALayer
from convlora.quant import QuantizationError, dequantize_base, quantize_base
from convlora.state import StateDictMismatchError, delta_weight
from convlora.strength import get_lora_scale, lora_scale, set_lora_scale

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ADAPTER",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "GPT2Conv1D",
    "Linear",
    "LoRAAdapter",
    "LoRAConfig",
    "LoRAFileError",
    "LoRALayer",
    "QuantizationError",
    "StateDictMismatchError",
    "active_adapters",
    "adapter_parameters",
    "cast_lora_params",
    "delete_adapter",
    "delta_weight",
    "dequantize_base",
    "disable_lora",
    "get_config",
    "get_lora_scale",
    "inject_lora",
    "list_adapters",
    "load_all_adapters",
    "load_lora",
    "load_lora_state_dict",
    "lora_layers",
    "lora_scale",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_and_unload",
    "plan_injection",
    "quantize_base",
    "read_safetensors",
    "save_all_adapters",
    "save_lora",
    "set_adapters",
    "set_lora_scale",
    "temporarily_unmerged",
    "unload",
    "write_safetensors",
]
