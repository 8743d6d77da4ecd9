"""LoRA strength: scale the active adapter's update of a model by ``s`` at inference.

The strength is the active adapter's *weight* (:class:`convlora.layers.LoRAAdapter`): each LoRA layer
computes ``W x + s * (alpha / r) * B A x``; merge-on-eval then merges exactly ``s * ΔW`` (the layer's
own ``delta_weight()``), and ``train()`` still restores the base weight bit-exactly. ``s = 0`` gives
exactly the base outputs, ``s = 1`` is the adapter as trained. The strength is an inference setting:
``lora_A``, ``lora_B``, rank and alpha are untouched, so a file saved at any strength is the same file
(loading an adapter starts it at strength 1).

These functions speak for a model with one active adapter; with several active, give each its weight
with :func:`convlora.set_adapters` (a named error says so).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

from torch import nn

from convlora.inject import active_adapters, lora_layers, set_adapters
from convlora.layers import LoRAAdapter

__all__ = ["set_lora_scale", "get_lora_scale", "lora_scale"]


def _active_adapter(model: nn.Module) -> tuple[str, list[LoRAAdapter]]:
    """The model's single active adapter: its name and its modules in every layer that has it."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to scale")
    names = active_adapters(model)
    if len(names) != 1:
        raise ValueError(
            f"the LoRA strength is the weight of the single active adapter, and {type(model).__name__} has "
            f"{len(names)} active ({', '.join(map(repr, names)) or 'none'}); set each weight with "
            "convlora.set_adapters(model, names, weights=...)"
        )
    return names[0], [layer.lora_adapters[names[0]] for layer in layers if names[0] in layer.active_adapters]


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Set the strength (the weight) of the active adapter of ``model``; merged layers are re-merged at it.

    Raises:
        ValueError: ``scale`` is not a finite number, the model has no LoRA layers, or several (or no)
            adapters are active (nothing changed).
    """
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"LoRA scale must be a finite number, got {scale}")
    name, _ = _active_adapter(model)
    set_adapters(model, [name], [scale])


def get_lora_scale(model: nn.Module) -> float:
    """The strength of ``model``'s active adapter.

    Raises:
        ValueError: no LoRA layers, not exactly one active adapter, or its layers at different strengths.
    """
    _, adapters = _active_adapter(model)
    scales = {round(adapter.weight, 12) for adapter in adapters}
    if len(scales) != 1:
        raise ValueError(f"the LoRA layers are at different strengths: {sorted(scales)}")
    return scales.pop()


@contextlib.contextmanager
def lora_scale(model: nn.Module, scale: float) -> Iterator[nn.Module]:
    """Inside the block ``model``'s active adapter runs at strength ``scale``; on exit every layer is back
    at exactly the weight it had (and merged or not as it was)."""
    name, _ = _active_adapter(model)
    layers = [layer for layer in lora_layers(model).values() if name in layer.active_adapters]
    before = [layer.lora_adapters[name].weight for layer in layers]
    set_lora_scale(model, scale)
    try:
        yield model
    finally:
        for layer, weight in zip(layers, before):
            layer.set_active_adapters(layer.active_adapters, {name: weight})
