"""Gradient (activation) checkpointing that keeps LoRA's gradients: non-reentrant, asked for by name.

torch's reentrant checkpoint gives the parameters inside a checkpointed block no gradient when none
of the block's inputs requires grad -- which is exactly what a frozen base model feeds its blocks --
so a LoRA inside would silently stop learning. diffusers 0.42 (``enable_gradient_checkpointing``) and
transformers 5.23 (``activation_checkpointing_enable``) default to the non-reentrant one; it is
requested explicitly here so that a default changing under a version bump cannot switch it.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["enable_gradient_checkpointing"]


def enable_gradient_checkpointing(models: list[nn.Module]) -> None:
    """Recompute activations in backward, with torch's non-reentrant checkpoint: in a diffusers
    model's blocks (``ModelMixin``), in a transformers model's layers (``PreTrainedModel``).

    Raises:
        TypeError: a model that is neither.
    """
    import diffusers
    import transformers

    for model in models:
        if isinstance(model, diffusers.ModelMixin):
            model.enable_gradient_checkpointing(_non_reentrant_checkpoint)
        elif isinstance(model, transformers.PreTrainedModel):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            raise TypeError(f"gradient checkpointing of a {type(model).__name__}: not a diffusers or transformers model")


def _non_reentrant_checkpoint(module: nn.Module, *args):
    """diffusers' checkpoint-function signature: ``(block, *inputs) -> block(*inputs)``, recomputed in backward."""
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
