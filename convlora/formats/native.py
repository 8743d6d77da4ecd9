"""convlora's own files (see :mod:`convlora.io`) as neutral weights, and back.

A single-model file (``convlora.save_lora``) names modules by their path in the model; a pipeline
file (``save_pipeline_lora(..., format="native")``) prefixes them with ``unet.`` /
``text_encoder.``. The header layout is :mod:`convlora.io`'s: ``convlora_modules`` gives each
module's rank, alpha, base weight shape and, for convs, ``groups`` / ``dilation`` / ``padding_mode``
(absent in older files), ``convlora_config`` the LoRAConfig.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from convlora.config import LoRAConfig
from convlora.formats.pairing import pair_modules, raise_on_leftovers, split_lora_keys
from convlora.formats.weights import LoRAFormatError, LoRAModule, LoRAWeights
from convlora.header import header_config, module_table
from convlora.io import FORMAT_VERSION, RESERVED_KEYS
from convlora.kinds import AdapterKind, LoHaAdapter, LoKrAdapter, kind_from_label
from convlora.layers import CONV_GEOMETRY_KEYS, Conv1d, Conv2d, Conv3d, Linear
from convlora.state import fingerprint


def from_native(tensors: Mapping[str, torch.Tensor], header: Mapping[str, str], source: str = "file") -> LoRAWeights:
    """Neutral weights from a convlora file; alpha from the header's module table.

    Raises:
        LoRAFormatError: keys other than ``<path>.lora_A`` / ``.lora_B`` (saved biases or
            ``modules_to_save``, which only :func:`convlora.load_lora` restores), or modules the
            table does not describe.
    """
    table = module_table(header, source)
    if table is None:
        raise LoRAFormatError(f"{source} has no convlora header")
    config = header_config(header, source)
    default_rslora = bool(config and config.use_rslora)
    rslora = {entry.get("use_rslora", default_rslora) for entry in table.values()}
    if len(rslora) > 1:
        raise LoRAFormatError(
            f"{source} mixes rsLoRA and plain LoRA modules; other formats hold one kind per file, so only "
            "convlora.load_lora reads it"
        )
    kinds = {p: kind_from_label(e.get("kind", "lora")) for p, e in table.items()}
    tensors, other_kinds = _take_kind_tensors(tensors, table, kinds)
    groups, leftovers = split_lora_keys(tensors, {".lora_A": "A", ".lora_B": "B"}, source)
    raise_on_leftovers(
        leftovers, source, " (biases / modules_to_save: load this file with convlora.load_lora, other formats cannot hold them)"
    )
    undescribed = sorted((set(groups) | set(other_kinds)) ^ set(table))
    if undescribed:
        raise LoRAFormatError(f"{source}: tensors and the convlora_modules header disagree on: {', '.join(undescribed[:12])}")
    modules = pair_modules(groups, lambda path, rank, _: table[path]["alpha"], source)
    for path, factors in other_kinds.items():
        lora_A, lora_B = factors.pop("lora_A", None), factors.pop("lora_B", None)
        modules[path] = LoRAModule(lora_A, lora_B, table[path]["alpha"], kind=kinds[path], factors=factors)
    for path, module in modules.items():
        geometry = {k: table[path][k] for k in CONV_GEOMETRY_KEYS if k in table[path]}
        module.geometry = geometry or None  # files written before convlora recorded it have none
        module.base_shape = tuple(table[path]["base_shape"])
    metadata = {k: v for k, v in header.items() if k not in RESERVED_KEYS}
    return LoRAWeights(modules, use_rslora=rslora == {True}, metadata=metadata)


def to_native(weights: LoRAWeights, config: LoRAConfig | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header of a convlora file, in :func:`convlora.save_lora`'s layout.

    The base weight shape of each module is implied by A and B (``(out, in)`` for Linear,
    ``(C_out, C_in/groups, *k)`` for convs); ``config`` defaults to one naming exactly these modules.
    """
    bad = [k for k in weights.metadata if k.startswith("convlora_")]
    if bad:
        raise LoRAFormatError(f"metadata keys starting with 'convlora_' are reserved: {bad}")
    tensors: dict[str, torch.Tensor] = {}
    table: dict[str, dict] = {}
    for path, module in weights.modules.items():
        tensors.update({f"{path}.{name}": t for name, t in module.tensors.items()})
        table[path] = {
            "type": _layer_type(module), "r": module.r, "alpha": module.alpha, "base_shape": _base_shape(module, path),
            **(module.geometry or {}), **({} if module.is_plain_lora else {"kind": module.kind.label}),
        }  # fmt: skip
    if config is None:
        rank = weights.most_common()[0]
        config = LoRAConfig(r=rank, target_modules=sorted(weights.modules), use_rslora=weights.use_rslora)
    header = {
        "convlora_format": FORMAT_VERSION,
        "convlora_modules": json.dumps(table, sort_keys=True),
        "convlora_fingerprint": fingerprint({p: tuple(e["base_shape"]) for p, e in table.items()}),
        "convlora_config": config.to_json(),
        **weights.metadata,
    }
    return tensors, header


def _layer_type(module: LoRAModule) -> str:
    dims = len(module.base_shape) if module.base_shape is not None else module.lora_A.dim()
    return f"Conv{dims - 2}d" if module.is_conv else "Linear"


def _base_shape(module: LoRAModule, path: str) -> list[int]:
    """The base weight shape: recorded, or implied by A and B as the LoRA layer class computes it:
    Linear ``(out, in)``, ConvNd ``(C_out, C_in/groups, *k)``."""
    if module.base_shape is not None:
        return list(module.base_shape)
    if module.kind.name != "lora":
        raise LoRAFormatError(f"{path}: a {module.kind.label} module's base weight shape is not known, so no "
                              "convlora header can be written for it; load it into its model and save from there")
    cls = Linear if not module.is_conv else _CONV_CLASSES[module.lora_A.dim() - 2]
    return list(cls.base_shape_for(module.lora_A.shape, module.lora_B.shape))


def _take_kind_tensors(tensors: Mapping[str, torch.Tensor], table: Mapping[str, dict], kinds: Mapping[str, AdapterKind]):
    """Split off the tensors of modules whose kind is not plain LoRA: ``(the rest, {path: {name: tensor}})``
    (every ``<path>.<name>`` whose name is one of the kind's parameter names)."""
    other = {p for p, k in kinds.items() if k.name != "lora" or k.use_dora}
    rest, taken = dict(tensors), {}
    for key in list(rest):
        path, _, name = key.rpartition(".")
        if path in other and name in _KIND_PARAMS[kinds[path].name] + ("magnitude",):
            taken.setdefault(path, {})[name] = rest.pop(key)
    return rest, taken


_KIND_PARAMS = {"lora": ("lora_A", "lora_B"), "loha": LoHaAdapter.factor_names, "lokr": LoKrAdapter.ALL_FACTOR_NAMES}


_CONV_CLASSES = {1: Conv1d, 2: Conv2d, 3: Conv3d}
