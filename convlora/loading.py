"""The one way adapter tensors enter a model: :func:`load_adapter`.

Every loader translates its file into an :class:`AdapterLoad` and calls :func:`load_adapter`:
native files (:func:`convlora.load_lora`, also the training script's resume), diffusers / kohya /
PEFT files through neutral weights (:func:`convlora.formats.weights.load_weights_into_model`,
:func:`convlora.formats.load_peft_adapter`) and whole pipelines
(:func:`convlora.diffusion.load_pipeline_lora`). It

1. chooses the adapter: the one named (loaded into if the model has it, added if not), or, when none
   is named, the model's only adapter (a new ``"default"`` one if it has none);
2. checks everything before writing anything: each module exists and LoRA can wrap it; for a new
   adapter the tensors have the shapes the layer class gives for its base
   (:meth:`convlora.layers.LoRALayer.lora_shapes_for`), the base weight shapes the file recorded
   match, and so does its conv geometry (``groups`` / ``dilation`` / ``padding_mode``); for an
   existing adapter the file's fingerprint (where the format has one) matches that adapter's modules;
3. adds the adapter where needed (:func:`convlora.inject.apply_plan`), injected unmerged, so a
   model in eval mode merges once, with the loaded tensors;
4. copies the tensors through :func:`convlora.inject.load_lora_state_dict` (keys, shapes and the
   dtype / finiteness gate of :mod:`convlora.state`) and sets each module's alpha and rsLoRA flag
   from the file (the layer derives its scaling from them);
5. puts the model back exactly as it was if any step fails (:func:`convlora.inject.unchanged_on_error`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from convlora.config import LoRAConfig, config_kind
from convlora.inject import (
    LayerSpec,
    apply_plan,
    list_adapters,
    load_lora_state_dict,
    lora_layers,
    resolve_adapter_name,
    temporarily_unmerged,
    unchanged_on_error,
)
from convlora.layers import CONV_GEOMETRY_KEYS, DEFAULT_ADAPTER, LoRALayer, conv_geometry_record, lora_class_for
from convlora.kinds import LORA, AdapterKind, expected_shapes
from convlora.quant import frozen_weight
from convlora.state import StateDictMismatchError, check_state_dict, fingerprint

__all__ = ["AdapterLoad", "ModuleLoad", "load_adapter"]


@dataclass(frozen=True)
class ModuleLoad:
    """What a file says about one adapted module (its tensors are in :attr:`AdapterLoad.tensors`)."""

    r: int
    alpha: float
    use_rslora: bool = False
    geometry: Mapping[str, Any] | None = None
    """The conv geometry the file recorded (any of :data:`convlora.layers.CONV_GEOMETRY_KEYS`), or None."""
    base_shape: tuple[int, ...] | None = None
    """The base weight shape the file recorded, or None."""
    kind: AdapterKind = LORA
    """The adapter kind (LoKr's factor options do not matter: its shapes come from the tensors)."""


@dataclass
class AdapterLoad:
    """An adapter as a file gives it, with module paths already resolved to ``model``'s own."""

    modules: dict[str, ModuleLoad]
    """Model module path -> its rank, alpha, rsLoRA flag and what the file recorded about its base."""
    tensors: dict[str, torch.Tensor]
    """``<path>.<name>`` for each of the adapter's :attr:`~convlora.kinds.AdapterBase.param_names`
    (``lora_A`` / ``lora_B`` for LoRA, convlora's layout) plus, for native files, saved biases /
    ``modules_to_save`` under their parameter names."""
    source: str
    config: LoRAConfig | None = None
    """The config to record for a new adapter; ``None``: one naming exactly these modules."""
    bias: str | None = "none"
    """Which biases the tensors hold (:func:`convlora.adapter_parameters`); ``None``: the config's."""
    fingerprint: str | None = None
    """The file's hash of adapted paths and base shapes (:func:`convlora.state.fingerprint`), if it has one."""


def load_adapter(model: nn.Module, load: AdapterLoad, adapter_name: str | None = None, strict: bool = True) -> list[str]:
    """Load ``load`` into ``model`` as adapter ``adapter_name`` (see the module docstring for the steps).

    Args:
        adapter_name: ``None``: the model's only adapter, or a new ``"default"`` one if it has none.
        strict: the file and an existing adapter must cover exactly the same modules and keys.

    Returns:
        The module paths that were loaded.

    Raises:
        ValueError: a module the model lacks or LoRA cannot wrap, a base or conv geometry other than the
            file's (naming the modules), ambiguous or unknown adapter names.
        StateDictMismatchError: missing / unexpected / mis-shaped keys, named with both shapes.
        Nothing in ``model`` is changed when any of these is raised.
    """
    name, is_new = _target_adapter(model, adapter_name)
    modules = dict(model.named_modules())
    if not strict:  # modules the model lacks are skipped, not loaded
        load = replace(load, modules={p: m for p, m in load.modules.items() if p in modules})
    _check_modules(modules, load)
    if is_new:
        _check_new_shapes(modules, load)
    elif strict and load.fingerprint is not None:
        _check_fingerprint(model, name, load)
    with unchanged_on_error(model):
        in_eval = _inject(model, modules, load, name) if is_new else []
        layers = lora_layers(model)
        loaded = [p for p in load.modules if p in layers and name in layers[p].lora_adapters]
        with temporarily_unmerged([layers[p] for p in loaded]):
            load_lora_state_dict(model, load.tensors, strict=strict, bias=load.bias, source=load.source, adapter_name=name)
            for p in loaded:  # the adapter derives its scaling from these two
                adapter = layers[p].lora_adapters[name]
                adapter.lora_alpha, adapter.use_rslora = load.modules[p].alpha, load.modules[p].use_rslora
    for p in in_eval:
        layers[p].train(False)  # merge-on-eval, once, with the loaded weights
    return loaded


def _target_adapter(model: nn.Module, adapter_name: str | None) -> tuple[str, bool]:
    """``(name, whether it is new)``; resolves ``None`` to the model's only adapter."""
    if adapter_name is None:
        if not list_adapters(model):
            return DEFAULT_ADAPTER, True
        return resolve_adapter_name(model, None), False
    return adapter_name, adapter_name not in list_adapters(model)


def _check_modules(modules: Mapping[str, nn.Module], load: AdapterLoad) -> None:
    """Each module exists, is one LoRA can wrap, and has the base shape and conv geometry the file recorded."""
    problems = []
    for path, entry in load.modules.items():
        module = modules.get(path)
        if module is None:
            problems.append(f"{path}: no such module")
        elif lora_class_for(module) is None:
            problems.append(f"{path}: is a {type(module).__name__}, not a layer LoRA can wrap")
        elif entry.base_shape is not None and tuple(frozen_weight(module).shape) != tuple(entry.base_shape):
            problems.append(f"{path}: base weight is {tuple(frozen_weight(module).shape)}, file was made for {tuple(entry.base_shape)}")
        else:
            problems += _geometry_problems(path, module, entry.geometry)
    if problems:
        raise ValueError(f"{load.source} was made for a different base model: " + "; ".join(problems[:12]))


def _geometry_problems(path: str, module: nn.Module, recorded: Mapping[str, Any] | None) -> list[str]:
    """``"path: key is X in the file, Y in the model"`` for each recorded conv setting the module differs in."""
    if not recorded:
        return []
    actual = conv_geometry_record(module) or {}
    return [
        f"{path}: {key} is {recorded[key]!r} in the file, {actual.get(key)!r} in the model"
        for key in CONV_GEOMETRY_KEYS
        if key in recorded and _plain(recorded[key]) != _plain(actual.get(key))
    ]


def _plain(value: Any) -> Any:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else value


def _check_new_shapes(modules: Mapping[str, nn.Module], load: AdapterLoad) -> None:
    """For a new adapter: the tensors have the shapes a rank-r adapter of each base and kind gets
    (:func:`convlora.kinds.expected_shapes`; a LoKr file's own factorisation is checked for fitting)."""
    expected, problems = {}, []
    for path, entry in load.modules.items():
        cls = lora_class_for(modules[path])
        try:
            shapes = expected_shapes(entry.kind, cls.delta_shape_for(modules[path]),
                                     cls.lora_shapes_for(modules[path], entry.r), entry.r, _lokr_shapes(load, path, entry))
        except ValueError as err:
            problems.append(f"{path}: {err}")
            continue
        expected.update({f"{path}.{name}": shape for name, shape in shapes.items()})
    if problems:
        raise StateDictMismatchError(f"{load.source}: " + "; ".join(problems[:12]))
    check_state_dict(expected, load.tensors, strict=False, source=load.source)


def _lokr_shapes(load: AdapterLoad, path: str, entry: ModuleLoad) -> dict[str, tuple[int, ...]] | None:
    """A LoKr module's parameter shapes as the file's tensors give them; None for other kinds."""
    if entry.kind.name != "lokr":
        return None
    prefix = f"{path}."
    return {k[len(prefix):]: tuple(v.shape) for k, v in load.tensors.items()
            if k.startswith(prefix) and k[len(prefix):].startswith("lokr_")}


def _check_fingerprint(model: nn.Module, name: str, load: AdapterLoad) -> None:
    """For an existing adapter: the file was made for exactly its modules on these base shapes."""
    layers = {p: layer for p, layer in lora_layers(model).items() if name in layer.lora_adapters}
    if fingerprint({p: tuple(frozen_weight(layer).shape) for p, layer in layers.items()}) == load.fingerprint:
        return
    problems = [f"{p}: in the file, not adapted in the model" for p in load.modules if p not in layers]
    problems += [f"{p}: adapted in the model, not in the file" for p in layers if p not in load.modules]
    raise ValueError(
        f"{load.source} was made for a different base model (fingerprint mismatch): "
        + ("; ".join(problems[:12]) or "base shapes differ")
    )


def _inject(model: nn.Module, modules: Mapping[str, nn.Module], load: AdapterLoad, name: str) -> list[str]:
    """Add adapter ``name`` on exactly ``load.modules`` (unmerged); returns the paths whose new layer
    must merge once loaded (their base was in eval mode)."""
    plan = {p: LayerSpec(m.r, m.alpha, m.use_rslora, kind=m.kind, lokr_shapes=_lokr_shapes(load, p, m))
            for p, m in load.modules.items()}
    config = load.config
    if config is None:
        rank = Counter(m.r for m in load.modules.values()).most_common(1)[0][0]
        rslora = {m.use_rslora for m in load.modules.values()} == {True}
        labels = {m.kind.label for m in load.modules.values()}
        kind = config_kind(labels.pop()) if len(labels) == 1 else {}
        config = LoRAConfig(r=rank, target_modules=sorted(plan), use_rslora=rslora, **kind)
    in_eval = [p for p in plan if not isinstance(modules[p], LoRALayer) and not modules[p].training]
    for p in in_eval:
        modules[p].training = True  # inject unmerged: merging a zero update now would be wasted work
    try:
        apply_plan(model, plan, config, name)
    finally:
        for p in in_eval:
            modules[p].training = False
    return in_eval
