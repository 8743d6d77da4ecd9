"""Named target sets for diffusers ``UNet2DConditionModel`` and transformers ``CLIPTextModel``.

UNet presets (each includes the one before it):

    ``"attn"``     ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every attention (diffusers' default)
    ``"attn-ff"``  + ``proj_in``, ``proj_out``, ``ff.net.0.proj``, ``ff.net.2``, ``add_k_proj``,
                   ``add_v_proj`` (kohya's default "LoRA" set: everything inside the transformer blocks)
    ``"full"``     + resnet ``conv1``, ``conv2``, ``conv_shortcut``, ``time_emb_proj`` and the
                   down/upsampler convs (kohya's "LoCon" set); ``conv_in`` / ``conv_out`` on request

Text-encoder presets: ``"attn"`` (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``) and
``"attn-mlp"`` (+ ``fc1``, ``fc2``).

A UNet preset names module kinds, not a fixed list: a kind the given UNet does not have (there
is no ``add_k_proj`` in SD-1.x, no ``conv_shortcut`` where channel counts never change) is simply
not adapted. That is why the preset becomes a full-path regular expression in
``LoRAConfig.target_modules``; a user's own *list* of targets is still checked name by name by
:func:`convlora.inject_lora`, so a typo there raises.
"""

from __future__ import annotations

import math
import re

from torch import nn

from convlora.config import LoRAConfig
from convlora.layers import lora_class_for

__all__ = [
    "TEXT_ENCODER_PRESETS",
    "UNET_CONV_IN_OUT",
    "UNET_PRESETS",
    "lora_parameter_count",
    "text_encoder_lora_config",
    "unet_lora_config",
]

_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
_ATTN_FF = _ATTN + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "add_k_proj", "add_v_proj")
_FULL = _ATTN_FF + (
    "resnets.*.conv1",
    "resnets.*.conv2",
    "resnets.*.conv_shortcut",
    "resnets.*.time_emb_proj",
    "downsamplers.*.conv",
    "upsamplers.*.conv",
)

#: UNet preset name -> module-path suffixes it targets (``*`` stands for a block index).
UNET_PRESETS: dict[str, tuple[str, ...]] = {"attn": _ATTN, "attn-ff": _ATTN_FF, "full": _FULL}
#: Added to any UNet preset by ``include_conv_in_out=True`` (the UNet's first and last 3x3 convs).
UNET_CONV_IN_OUT: tuple[str, ...] = ("conv_in", "conv_out")

#: Text-encoder preset name -> module names it targets (every CLIP encoder layer has all of them).
TEXT_ENCODER_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "attn-mlp": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}


def unet_lora_config(
    preset: str = "attn",
    rank: int = 8,
    alpha: float | None = None,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    dropout: float = 0.0,
    include_conv_in_out: bool = False,
) -> LoRAConfig:
    """A :class:`~convlora.LoRAConfig` for a diffusers ``UNet2DConditionModel``.

    Args:
        preset: ``"attn"``, ``"attn-ff"`` or ``"full"`` (see the module docstring).
        rank: rank of every linear and 1x1-conv update.
        alpha: scaling numerator for those; ``None`` means ``alpha = rank`` (scale 1).
        conv_rank: rank of the 3x3 convs (kohya's ``conv_dim``); ``None`` means ``rank``.
        conv_alpha: alpha of the 3x3 convs (kohya's ``conv_alpha``); ``None`` means ``conv_rank``.
        dropout: dropout on the LoRA branch's input while training.
        include_conv_in_out: also adapt ``conv_in`` and ``conv_out``.

    Returns:
        A config whose ``target_modules`` is a full-path regex built from the preset, so module
        kinds the UNet lacks are skipped (at least one module must match).

    Raises:
        ValueError: unknown preset, or ``conv_rank`` / ``conv_alpha`` given although the preset
            targets no 3x3 conv (they would silently do nothing).
    """
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}: choose one of {', '.join(UNET_PRESETS)}")
    targets = UNET_PRESETS[preset] + (UNET_CONV_IN_OUT if include_conv_in_out else ())
    has_spatial_convs = preset == "full" or include_conv_in_out
    if not has_spatial_convs and (conv_rank is not None or conv_alpha is not None):
        raise ValueError(
            f"conv_rank / conv_alpha apply to 3x3 convs, and UNet preset {preset!r} targets none; "
            "use preset='full' or include_conv_in_out=True"
        )
    return LoRAConfig(
        r=rank,
        alpha=alpha,
        dropout=dropout,
        target_modules=suffix_regex(targets),
        conv_rank=conv_rank,
        conv_alpha=conv_alpha,
    )


def text_encoder_lora_config(
    preset: str = "attn",
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
) -> LoRAConfig:
    """A :class:`~convlora.LoRAConfig` for a transformers ``CLIPTextModel``.

    Args:
        preset: ``"attn"`` (q/k/v/out projections) or ``"attn-mlp"`` (+ ``fc1``, ``fc2``).
        rank: rank of every update.
        alpha: scaling numerator; ``None`` means ``alpha = rank``.
        dropout: dropout on the LoRA branch's input while training.

    Raises:
        ValueError: unknown preset.
    """
    if preset not in TEXT_ENCODER_PRESETS:
        raise ValueError(
            f"unknown text-encoder preset {preset!r}: choose one of {', '.join(TEXT_ENCODER_PRESETS)}"
        )
    return LoRAConfig(r=rank, alpha=alpha, dropout=dropout, target_modules=list(TEXT_ENCODER_PRESETS[preset]))


def suffix_regex(suffixes: tuple[str, ...] | list[str]) -> str:
    """One full-path regex matching any of ``suffixes`` on whole dotted segments.

    ``*`` in a suffix stands for one numeric segment: ``"resnets.*.conv1"`` matches
    ``"down_blocks.0.resnets.1.conv1"`` but not ``"down_blocks.0.resnets.1.conv10"``.
    """
    alternatives = "|".join(re.escape(s).replace(r"\*", r"\d+") for s in suffixes)
    return rf"(?:.*\.)?(?:{alternatives})"


def lora_parameter_count(module: nn.Module, rank: int) -> int:
    """Number of LoRA parameters (``lora_A`` + ``lora_B``) a rank-``rank`` update of ``module`` has:
    the sizes of the shapes its LoRA class gives (:meth:`convlora.layers.LoRALayer.lora_shapes_for`).

    Raises:
        TypeError: ``module`` is not a layer convlora can adapt.
    """
    cls = lora_class_for(module)
    if cls is None:
        raise TypeError(f"{type(module).__name__} is not a layer convlora can adapt")
    return sum(math.prod(shape) for shape in cls.lora_shapes_for(module, rank))
