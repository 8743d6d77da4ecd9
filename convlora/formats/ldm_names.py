"""The original (LDM / "compvis") module names of a diffusers ``UNet2DConditionModel``.

Stable Diffusion checkpoints, AUTOMATIC1111 and ComfyUI name UNet modules as the original
``ldm.modules.diffusionmodules.openaimodel.UNetModel`` does; diffusers renamed them. The LDM UNet
is one flat list of ``input_blocks``, one ``middle_block`` and a flat list of ``output_blocks``::

    input_blocks.0.0                      conv_in
    input_blocks.N.0 / .N.1               down_blocks.i.resnets.j / .attentions.j
    input_blocks.N.0.op                   down_blocks.i.downsamplers.0.conv   (its own N)
    middle_block.0 / .1 / .2              mid_block.resnets.0 / .attentions.0 / .resnets.1
    output_blocks.N.0 / .N.1              up_blocks.i.resnets.j / .attentions.j
    output_blocks.N.1.conv or .N.2.conv   up_blocks.i.upsamplers.0.conv  (after the block's
                                          last resnet, and after its attention if it has one)
    time_embed.0 / .2, label_emb.0.0 / .2, out.0 / .2
                                          time_embedding.linear_1 / _2, add_embedding.linear_1 / _2,
                                          conv_norm_out / conv_out

so the numbers depend on the layout: ``N`` counts every resnet (and sampler) before it, which is
why one fixed formula (SD-1.x's ``1 + 3 * i + j``) is right only for bases shaped like SD-1.x.
Inside a resnet the LDM names are ``in_layers.0`` (norm1), ``in_layers.2`` (conv1),
``emb_layers.1`` (time_emb_proj), ``out_layers.0`` (norm2), ``out_layers.3`` (conv2) and
``skip_connection`` (conv_shortcut); inside a transformer (``proj_in``, ``transformer_blocks.t...``)
they are the diffusers names. The numbering is the one diffusers' own checkpoint conversion
(``convert_ldm_unet_checkpoint``) reads, and the tests check it against that.

>>> names = LDMNames.from_config(tiny_unet_config())                    # doctest: +SKIP
>>> names.to_ldm("up_blocks.0.upsamplers.0.conv")                       # doctest: +SKIP
'output_blocks.2.2.conv'
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["LDM_FLAT_NAME", "LDMNames"]

#: How an LDM UNet module name starts once its dots are ``_`` (as in kohya files).
LDM_FLAT_NAME = re.compile(r"^(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_\d")

# Blocks whose LDM counterpart has a transformer (index 1) after each resnet (index 0).
_DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
_UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)

_RESNET_INNER = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


@dataclass(frozen=True)
class LDMNames:
    """Both ways between diffusers UNet module paths and LDM module paths, for one UNet layout.

    ``blocks`` maps each diffusers block prefix (``down_blocks.1.attentions.0``,
    ``up_blocks.0.upsamplers.0``, ``conv_in``, ...) to its LDM prefix (``input_blocks.4.1``,
    ``output_blocks.2.2``, ``input_blocks.0.0``, ...).
    """

    blocks: Mapping[str, str]
    layout: Mapping[str, Any]
    """The config fields the names depend on (JSON-ready; :meth:`from_config` of it gives these names)."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LDMNames:
        """From a ``UNet2DConditionModel`` config (``unet.config`` or its kwargs).

        Reads ``down_block_types``, ``up_block_types``, ``mid_block_type`` and ``layers_per_block``
        (an int or one per down block; up blocks have one resnet more, in reverse order).
        ``transformer_layers_per_block`` does not change any LDM number: transformer blocks keep
        their index inside their ``input_blocks.N.1``.

        Raises:
            ValueError: a block type the LDM UNet has no counterpart for (named), or block lists
                of different lengths.
        """
        down = tuple(config.get("down_block_types", ()))
        up = tuple(config.get("up_block_types", ()))
        if not down or len(down) != len(up):
            raise ValueError(f"UNet config needs as many up_block_types as down_block_types, got {down} and {up}")
        for kind, known in ((down, _DOWN_TYPES), (up, _UP_TYPES)):
            unknown = sorted({t for t in kind if t not in known})
            if unknown:
                raise ValueError(f"no LDM names for UNet block type(s) {unknown}: known are {sorted(known)}")
        mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid not in _MID_TYPES:
            raise ValueError(f"no LDM names for mid_block_type {mid!r}: known are {_MID_TYPES}")
        layers = _per_block(config.get("layers_per_block", 2), len(down))
        blocks = dict(_down_blocks(down, layers))
        if mid is not None:
            blocks.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1"})
            blocks["mid_block.resnets.1"] = "middle_block.2"
        blocks.update(_up_blocks(up, [n + 1 for n in reversed(layers)]))
        blocks.update(_TOP_LEVEL)
        layout = {"down_block_types": list(down), "up_block_types": list(up), "mid_block_type": mid, "layers_per_block": layers}
        return cls(blocks, layout)

    def to_ldm(self, path: str) -> str:
        """``down_blocks.0.resnets.1.conv1`` -> ``input_blocks.2.0.in_layers.2``.

        Raises:
            ValueError: a path outside every block this layout has (named).
        """
        prefix = _longest_prefix(path, self.blocks)
        if prefix is None:
            raise ValueError(f"UNet module {path!r} has no LDM name in this layout")
        inner = path[len(prefix) + 1 :]
        if ".resnets." in f".{prefix}.":
            head, _, rest = inner.partition(".")
            inner = ".".join(s for s in (_RESNET_INNER.get(head, head), rest) if s)
        elif ".downsamplers." in prefix and (inner == "conv" or inner.startswith("conv.")):
            inner = "op" + inner[len("conv") :]
        return ".".join(s for s in (self.blocks[prefix], inner) if s)

    def from_ldm(self, path: str) -> str:
        """``input_blocks.2.0.in_layers.2`` -> ``down_blocks.0.resnets.1.conv1`` (inverse of :meth:`to_ldm`).

        Raises:
            ValueError: a path outside every block this layout has (named).
        """
        inverse = {ldm: diffusers for diffusers, ldm in self.blocks.items()}
        prefix = _longest_prefix(path, inverse)
        if prefix is None:
            raise ValueError(f"LDM UNet module {path!r} does not exist in this layout")
        diffusers_prefix = inverse[prefix]
        inner = path[len(prefix) + 1 :]
        if ".resnets." in f".{diffusers_prefix}.":
            back = {ldm: name for name, ldm in _RESNET_INNER.items()}
            head = next((ldm for ldm in back if inner == ldm or inner.startswith(ldm + ".")), None)
            if head is not None:
                inner = back[head] + inner[len(head) :]
        elif ".downsamplers." in diffusers_prefix and (inner == "op" or inner.startswith("op.")):
            inner = "conv" + inner[len("op") :]
        return ".".join(s for s in (diffusers_prefix, inner) if s)


    def from_flat_ldm(self, flat: str) -> str:
        """An LDM name with every ``.`` as ``_`` (kohya's spelling) -> the diffusers module path.

        ``output_blocks_2_2_conv`` -> ``up_blocks.0.upsamplers.0.conv``; inside a transformer the
        dots come back from kohya's vocabulary of diffusers names.

        Raises:
            ValueError: no block of this layout starts the name (named).
        """
        from convlora.formats.kohya import restore_dots

        by_flat = {ldm.replace(".", "_"): ldm for ldm in self.blocks.values()}
        parts = flat.split("_")
        for end in range(len(parts), 0, -1):
            ldm = by_flat.get("_".join(parts[:end]))
            if ldm is None:
                continue
            rest = "_".join(parts[end:])
            inner = next((name for name in (*_RESNET_INNER.values(), "op") if name.replace(".", "_") == rest), None)
            return self.from_ldm(".".join(s for s in (ldm, inner or restore_dots(rest)) if s))
        raise ValueError(f"LDM UNet name {flat!r} starts with no block of this layout")


def _per_block(value: int | Sequence[int], n_blocks: int) -> list[int]:
    layers = [int(value)] * n_blocks if isinstance(value, int) else [int(v) for v in value]
    if len(layers) != n_blocks:
        raise ValueError(f"layers_per_block {value} does not give one number per down block ({n_blocks})")
    return layers


def _down_blocks(types: Sequence[str], layers: Sequence[int]) -> dict[str, str]:
    """input_blocks: each down block's resnets (+ transformers), then its downsampler but the last's."""
    blocks, n = {}, 1
    for i, (kind, count) in enumerate(zip(types, layers)):
        for j in range(count):
            blocks[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{n}.0"
            if _DOWN_TYPES[kind]:
                blocks[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
            n += 1
        if i < len(types) - 1:
            blocks[f"down_blocks.{i}.downsamplers.0"] = f"input_blocks.{n}.0"
            n += 1
    return blocks


def _up_blocks(types: Sequence[str], layers: Sequence[int]) -> dict[str, str]:
    """output_blocks: one per up-block resnet; the upsampler joins the block's last one."""
    blocks, n = {}, 0
    for i, (kind, count) in enumerate(zip(types, layers)):
        has_attention = _UP_TYPES[kind]
        for j in range(count):
            blocks[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{n}.0"
            if has_attention:
                blocks[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{n}.1"
            if j == count - 1 and i < len(types) - 1:
                blocks[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{n}.{2 if has_attention else 1}"
            n += 1
    return blocks


def _longest_prefix(path: str, prefixes: Mapping[str, str]) -> str | None:
    """The longest key of ``prefixes`` that is ``path`` or a whole-segment start of it."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in prefixes:
            return candidate
    return None
