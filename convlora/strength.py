"""LoRA strength: scale every adapter's update of a model by ``s`` at inference.

``set_lora_scale(model, s)`` makes each LoRA layer compute ``W x + s * (alpha / r) * B A x``;
merge-on-eval then merges exactly ``s * ΔW`` (the layer's own ``delta_weight()``), and
``train()`` still restores the base weight bit-exactly. ``s = 0`` gives exactly the base outputs,
``s = 1`` is the adapter as trained. The strength is an inference setting: ``lora_A``, ``lora_B``,
rank and alpha are untouched, so a file saved at any strength is the same file (loading an adapter
starts it at strength 1).

The strength is applied through the one number every LoRA code path already multiplies by, the
layer's ``scaling``: it becomes ``scaling_for(r, alpha, use_rslora) * s``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

from torch import nn

from convlora.inject import lora_layers, temporarily_unmerged
from convlora.layers import LoRALayer
from convlora.state import scaling_for

__all__ = ["set_lora_scale", "get_lora_scale", "lora_scale"]


def _trained_scaling(layer: LoRALayer) -> float:
    return scaling_for(layer.r, layer.lora_alpha, layer.use_rslora)


def _layers(model: nn.Module) -> list[LoRALayer]:
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to scale")
    return layers


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Set the strength of every LoRA layer in ``model`` (merged layers are re-merged at it).

    Raises:
        ValueError: ``scale`` is not a finite number, or the model has no LoRA layers (nothing changed).
    """
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"LoRA scale must be a finite number, got {scale}")
    layers = _layers(model)
    with temporarily_unmerged(layers):
        for layer in layers:
            layer.scaling = _trained_scaling(layer) * scale


def get_lora_scale(model: nn.Module) -> float:
    """The strength of ``model``'s LoRA layers.

    Raises:
        ValueError: the model has no LoRA layers, or its layers are at different strengths.
    """
    scales = {round(layer.scaling / _trained_scaling(layer), 12) for layer in _layers(model)}
    if len(scales) != 1:
        raise ValueError(f"the LoRA layers are at different strengths: {sorted(scales)}")
    return scales.pop()


@contextlib.contextmanager
def lora_scale(model: nn.Module, scale: float) -> Iterator[nn.Module]:
    """Inside the block ``model``'s LoRA runs at strength ``scale``; on exit every layer is back at
    exactly the scaling it had (and merged or not as it was)."""
    layers = _layers(model)
    before = [layer.scaling for layer in layers]
    set_lora_scale(model, scale)
    try:
        yield model
    finally:
        with temporarily_unmerged(layers):
            for layer, scaling in zip(layers, before):
                layer.scaling = scaling
