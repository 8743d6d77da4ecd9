"""Small utilities for testing LoRA models (used by convlora's own tests; handy in yours)."""

from __future__ import annotations

import torch
from torch import nn

from convlora.inject import lora_layers


def randomize_lora_(model: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Give every adapter of every LoRA layer a random non-zero ``lora_B`` (and fresh ``lora_A``), so ΔW != 0;
    adapters of other kinds get random factors, and DoRA's magnitude a random factor ``1 + std * N(0, 1)``.

    Deterministic for a given seed; merged layers are handled (unmerged, filled, re-merged).
    """
    generator = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        was_merged = layer.merged
        layer.unmerge()
        with torch.no_grad():
            for adapter in layer.lora_adapters.values():
                for name, param in zip(adapter.param_names, adapter.factors()):
                    values = torch.randn(param.shape, generator=generator) * std
                    if name == "magnitude":
                        param.mul_((1 + values).to(param.dtype))
                    else:
                        param.copy_(values.to(param.dtype))
        if was_merged:
            layer.merge()
    return model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|`` (float64), the tolerance measure used in tests."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().clamp_min(1e-12)
    return float((actual - expected).abs().max() / scale)
