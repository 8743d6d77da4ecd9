"""Mixed precision for LoRA training: frozen weights in half precision, adapter in float32.

The recipe (as diffusers' LoRA scripts, with the choice taken from accelerate, not from a flag):
the frozen base (UNet, VAE, text encoder) is stored in the accelerator's half dtype -- half the
memory, faster on GPUs -- while the LoRA parameters stay float32, so the optimizer updates and
the fp16 grad scaler act on float32 values ("Attempting to unscale FP16 gradients" cannot happen).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from convlora.inject import adapter_parameters, cast_lora_params, lora_layers
from convlora.quant import quantize_base, quantized_bytes

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: ``--base_precision``: how the frozen Linear / Conv weights of the UNet and text encoders are stored.
BASE_PRECISIONS = ("nf4", "int8", "fp8", "bf16", "fp16", "fp32")
_STORED_AS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def weight_dtype_for(mixed_precision: str | None) -> torch.dtype:
    """The dtype of frozen weights for accelerate's ``mixed_precision`` (``"no"``, ``"fp16"``, ``"bf16"``).

    Raises:
        ValueError: another value (e.g. ``"fp8"``), naming the supported ones.
    """
    key = "no" if mixed_precision in (None, "no") else str(mixed_precision)
    if key not in WEIGHT_DTYPES:
        raise ValueError(f"mixed precision {mixed_precision!r} is not supported here; use one of {', '.join(WEIGHT_DTYPES)}")
    return WEIGHT_DTYPES[key]


def check_mixed_precision(mixed_precision: str, device: torch.device) -> None:
    """Refuse combinations accelerate would run silently in a different precision.

    accelerate accepts ``fp16`` on the CPU but then uses neither autocast nor a grad scaler, so
    a half-precision base would run without loss scaling.

    Raises:
        ValueError: fp16 on a CPU.
    """
    if mixed_precision == "fp16" and device.type == "cpu":
        raise ValueError(
            "fp16 mixed precision needs a GPU: on the CPU accelerate runs it without autocast and without "
            "a grad scaler. Use mixed_precision 'bf16' or 'no' (in the accelerate config or --mixed_precision)."
        )


def cast_for_training(model: nn.Module, weight_dtype: torch.dtype, device: torch.device | str | None = None) -> None:
    """Move ``model`` to ``device`` with its frozen weights in ``weight_dtype`` and its LoRA parameters in float32."""
    if device is not None:
        model.to(device)
    if any(p.dtype != weight_dtype for p in model.parameters()):
        model.to(dtype=weight_dtype)  # only when needed: diffusers warns on every dtype cast
    if lora_layers(model):
        cast_lora_params(model, torch.float32)


def parameter_dtypes(model: nn.Module) -> dict[str, list[str]]:
    """``{"trainable": [...], "frozen": [...]}``: the dtypes found among each kind of parameter (for reports)."""
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    return {"trainable": sorted(str(d) for d in trainable), "frozen": sorted(str(d) for d in frozen)}


def adapter_dtypes(model: nn.Module) -> list[str]:
    """The dtypes of the adapter's parameters (``lora_A`` / ``lora_B``)."""
    return sorted({str(p.dtype) for p in adapter_parameters(model).values()})


def base_storage_mode(base_precision: str | None, weight_dtype: torch.dtype) -> str | None:
    """The :mod:`convlora.quant` mode ``--base_precision`` asks for under compute dtype ``weight_dtype``,
    or None when the frozen weights stay as :func:`cast_for_training` left them (unset, or the same dtype).

    nf4 / int8 / fp8 are quantized storage; bf16 / fp16 under another compute dtype are half-precision
    storage, upcast per layer. fp32 storage under half-precision compute is refused: the mixed-precision
    cast already stores the frozen weights in half precision.

    Raises:
        ValueError: an unknown value, or fp32 under half-precision compute (named).
    """
    if base_precision is None:
        return None
    if base_precision not in BASE_PRECISIONS:
        raise ValueError(f"--base_precision must be one of {', '.join(BASE_PRECISIONS)}, got {base_precision!r}")
    stored = _STORED_AS.get(base_precision)
    if stored is None:
        return base_precision
    if stored == weight_dtype:
        return None
    if stored == torch.float32:
        raise ValueError(
            f"--base_precision fp32 with mixed precision {str(weight_dtype).replace('torch.', '')}: the frozen weights "
            "are stored in the mixed-precision dtype; use --mixed_precision no for a float32 base"
        )
    return base_precision


def store_frozen_base(models: Mapping[str, nn.Module], mode: str, weight_dtype: torch.dtype) -> dict[str, int]:
    """Quantize the frozen Linear / Conv weights of each model (LoRA layers' base weights included)
    into ``mode``, computed in ``weight_dtype``; returns the stored bytes per model name."""
    stored = {}
    for name, model in models.items():
        quantize_base(model, mode, compute_dtype=weight_dtype)
        stored[name] = quantized_bytes(model)
    return stored
