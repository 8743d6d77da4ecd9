"""Put LoRA layers into any model, and take them out again.

A model can carry several named adapters (``"default"`` unless named): :func:`inject_lora` with
another ``adapter_name`` adds one to the existing LoRA layers (and creates layers where its config
targets new modules), :func:`set_adapters` chooses the active ones and their weights,
:func:`delete_adapter` removes one. The newest injected (or loaded) adapter is the only active one
until :func:`set_adapters` says otherwise.

Injection is planned first and applied second: every target is resolved and checked before a
single module is replaced, so a bad config raises and leaves the model exactly as it was. Loads are
all-or-nothing too: :func:`load_lora_state_dict` checks every tensor (keys, shapes, dtype,
finiteness) before writing one, and :func:`unchanged_on_error` puts models back as they were when a
multi-step load fails part-way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from convlora.config import LoRAConfig, key_matches, path_matches, pattern_matches
from convlora.kinds import AdapterKind
from convlora.layers import (
    DEFAULT_ADAPTER,
    LORA_CLASSES,
    LoRALayer,
    checked_adapter_name,
    checked_adapter_weight,
    is_spatial_conv,
)
from convlora.quant import QuantizationError, dequantize_base, is_quantized
from convlora.state import check_adapter_tensors, check_state_dict

CONFIG_ATTR = "convlora_configs"  # adapter name -> the LoRAConfig it was injected with, kept on the root module


@dataclass(frozen=True)
class LayerSpec:
    """How one module is adapted."""

    r: int
    alpha: float
    use_rslora: bool | None = None
    """``alpha / sqrt(r)`` scaling for this module; ``None`` means the config's ``use_rslora``."""
    kind: AdapterKind | None = None
    """This module's adapter kind; ``None`` means the config's (:meth:`LoRAConfig.adapter_kind`)."""
    lokr_shapes: Mapping[str, tuple[int, ...]] | None = None
    """A LoKr adapter's parameter shapes (a loaded file's); ``None``: derived from the rank and kind."""


def plan_injection(model: nn.Module, config: LoRAConfig, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, LayerSpec]:
    """Resolve ``config`` against ``model``: module path -> rank/alpha, without changing anything.

    A targeted module that already is a LoRA layer gets the new adapter added to it.

    Raises:
        ValueError: a target (or a ``rank_pattern`` / ``alpha_pattern`` key) matches no module — each
            such name is listed; or a target matches a module LoRA cannot wrap (named, with its type);
            or a targeted module already carries an adapter named ``adapter_name``; or biases /
            ``modules_to_save`` with several adapters.
    """
    checked_adapter_name(adapter_name)
    modules = dict(model.named_modules())
    inside_lora = {path for path, module in modules.items() if isinstance(module, LoRALayer)}
    candidates = [
        path
        for path in modules
        if path
        and not any(path.startswith(p + ".") for p in inside_lora)
        and pattern_matches(config.target_modules, path)
    ]
    _raise_on_unmatched_targets(config, candidates)
    if config.exclude_modules is not None:
        candidates = [p for p in candidates if not pattern_matches(config.exclude_modules, p)]
        if not candidates:
            raise ValueError(f"exclude_modules {config.exclude_modules!r} excludes every targeted module")

    unwrappable, already = [], []
    plan: dict[str, LayerSpec] = {}
    for path in candidates:
        module = modules[path]
        if isinstance(module, LoRALayer) and adapter_name in module.lora_adapters:
            already.append(path)
        elif not isinstance(module, LoRALayer) and type(module) not in LORA_CLASSES:
            unwrappable.append(f"{path} ({type(module).__module__}.{type(module).__name__})")
        else:
            plan[path] = LayerSpec(*config.rank_and_alpha(path, is_spatial_conv(module)))
    if already:
        raise ValueError(
            f"these modules already carry LoRA: {', '.join(already)} (adapter {adapter_name!r}); "
            "inject under another adapter_name, or delete_adapter first"
        )
    _check_new_adapter(model, config, adapter_name)
    if unwrappable:
        supported = ", ".join(f"{c.__module__}.{c.__name__}" for c in LORA_CLASSES)
        raise ValueError(
            f"target_modules match module(s) LoRA cannot wrap: {'; '.join(unwrappable)}. "
            f"Supported types: {supported}. Name the leaf layers instead."
        )
    for field_name in ("rank_pattern", "alpha_pattern"):
        unused = [
            key
            for key in getattr(config, field_name)
            if not any(key_matches(key, p) for p in plan)
        ]
        if unused:
            raise ValueError(f"{field_name} key(s) match no adapted module: {', '.join(unused)}")
    return plan


def inject_lora(model: nn.Module, config: LoRAConfig, adapter_name: str = DEFAULT_ADAPTER) -> list[str]:
    """Replace every targeted layer of ``model`` (in place) by its LoRA version, with one adapter
    named ``adapter_name``; targeted layers that already are LoRA layers get it added.

    A targeted module that already carries ``adapter_name`` is a named error. The same name on other
    modules extends that adapter (one adapter with per-module settings: a second call with its own
    rank, alpha or rsLoRA flag), and the model keeps the newest config for it.

    The new layers share the base layers' weight and bias tensors; ``lora_A`` is initialised per
    ``config.init`` and ``lora_B`` is zero, so the model's outputs are unchanged. The new adapter
    becomes the only active one. Parameters' ``requires_grad`` is not touched: call
    :func:`mark_only_lora_as_trainable` to freeze everything else.

    Returns:
        The adapted module paths, in model order.
    """
    plan = plan_injection(model, config, adapter_name)
    apply_plan(model, plan, config, adapter_name)
    return list(plan)


def _check_new_adapter(model: nn.Module, config: LoRAConfig, adapter_name: str) -> None:
    """Refuse biases / ``modules_to_save`` beside another adapter (those train in place, not per
    adapter, so two adapters would share and overwrite them)."""
    if not [n for n in list_adapters(model) if n != adapter_name]:
        return
    in_place = [n for n, c in {**_configs(model), adapter_name: config}.items() if c.bias != "none" or c.modules_to_save]
    if in_place:
        raise ValueError(
            f"adapter(s) {', '.join(map(repr, in_place))} train biases / modules_to_save, which are not per adapter; "
            "a model with several adapters cannot have them"
        )


def apply_plan(
    model: nn.Module, plan: Mapping[str, LayerSpec], config: LoRAConfig, adapter_name: str = DEFAULT_ADAPTER
) -> None:
    """Add adapter ``adapter_name`` on the modules named in ``plan`` (as made by :func:`plan_injection`),
    replacing plain layers by LoRA layers; it becomes the model's only active adapter.

    A module whose weight is shared with another parameter of ``model`` (GPT-2's ``lm_head`` tied
    to ``wte``) gets LoRA that never merges into that shared tensor: merge-on-eval skips it with a
    warning and :func:`merge_and_unload` refuses it, both naming the parameters it is tied to.
    """
    _check_new_adapter(model, config, adapter_name)
    modules = dict(model.named_modules())
    tied = tied_weights(model, [p for p in plan if not isinstance(modules[p], LoRALayer)])
    new_layers = {}
    for path, spec in plan.items():
        base = modules[path]
        if isinstance(base, LoRALayer):
            continue
        layer = LORA_CLASSES[type(base)].from_module(base, merge_weights=config.merge_on_eval, adapter_name=None)
        layer._lora_path = path
        _add_planned_adapter(layer, adapter_name, spec, config)
        layer._tied_to = tied.get(path)
        new_layers[path] = layer
    for path, spec in plan.items():
        if path not in new_layers:
            _add_planned_adapter(modules[path], adapter_name, spec, config)
    for path, layer in new_layers.items():
        _set_submodule(model, path, layer)
        if not modules[path].training:
            # An injected model in eval mode behaves as eval() would have left it: merged.
            layer.train(False)
    setattr(model, CONFIG_ATTR, {**_configs(model), adapter_name: config})
    for layer in lora_layers(model).values():
        layer.set_active_adapters([adapter_name] if adapter_name in layer.lora_adapters else [])


def _add_planned_adapter(layer: LoRALayer, name: str, spec: LayerSpec, config: LoRAConfig) -> None:
    use_rslora = config.use_rslora if spec.use_rslora is None else spec.use_rslora
    kind = config.adapter_kind() if spec.kind is None else spec.kind
    layer.add_adapter(name, spec.r, spec.alpha, config.dropout, config.init, use_rslora, kind=kind,
                      lokr_shapes=spec.lokr_shapes)


def tied_weights(model: nn.Module, paths: Iterable[str]) -> dict[str, str]:
    """``path -> "name, name"`` for each module in ``paths`` whose ``weight`` shares memory with
    another parameter of ``model`` (tied embeddings, a module registered twice, views of one buffer).

    Tensors on the ``meta`` device have no memory and are compared by identity only.
    """
    by_memory: dict[object, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_memory.setdefault(_memory_of(param), []).append(name)
    modules = dict(model.named_modules())
    tied = {}
    for path in paths:
        if is_quantized(modules[path]):
            continue  # its weight is its own compact storage, never a parameter another module holds
        others = [n for n in by_memory.get(_memory_of(modules[path].weight), []) if n != f"{path}.weight"]
        if others:
            tied[path] = ", ".join(sorted(others))
    return tied


def _memory_of(tensor: torch.Tensor) -> object:
    if tensor.device.type == "meta" or tensor.untyped_storage().data_ptr() == 0:
        return id(tensor)
    return (tensor.device, tensor.untyped_storage().data_ptr())


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA layer of ``model`` by module path, in model order."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALayer)}


def _configs(model: nn.Module) -> dict[str, LoRAConfig]:
    return dict(getattr(model, CONFIG_ATTR, None) or {})


def get_config(model: nn.Module, adapter_name: str | None = None) -> LoRAConfig | None:
    """The LoRAConfig adapter ``adapter_name`` was injected with (``None``: the model's only adapter);
    ``None`` if it has no config (layers built by hand) or the model has no adapter."""
    if adapter_name is None and not list_adapters(model):
        return None
    return _configs(model).get(resolve_adapter_name(model, adapter_name))


def list_adapters(model: nn.Module) -> list[str]:
    """Every adapter name of ``model``'s LoRA layers, in the order they were added."""
    present: dict[str, None] = {}
    for layer in lora_layers(model).values():
        present.update(dict.fromkeys(layer.lora_adapters))
    injected = [n for n in _configs(model) if n in present]  # the configs keep the order of injection
    return injected + [n for n in present if n not in injected]


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters that ``model``'s LoRA layers add (active in at least one layer), in the order they were added."""
    active = {n for layer in lora_layers(model).values() for n in layer.active_adapters}
    return [n for n in list_adapters(model) if n in active]


def resolve_adapter_name(model: nn.Module, adapter_name: str | None) -> str:
    """``adapter_name`` if the model has it; ``None``: the model's only adapter.

    Raises:
        ValueError: the model has no LoRA, no adapter of that name, or several adapters and none was named.
    """
    names = list_adapters(model)
    if not names:
        raise ValueError("the model has no LoRA layers: call convlora.inject_lora(model, config) first")
    if adapter_name is None:
        if len(names) > 1:
            raise ValueError(f"the model has several adapters ({', '.join(map(repr, names))}); name one with adapter_name=")
        return names[0]
    if adapter_name not in names:
        raise ValueError(f"the model has no adapter {adapter_name!r} (it has {', '.join(map(repr, names))})")
    return adapter_name


def set_adapters(model: nn.Module, adapter_names: str | Sequence[str], weights: float | Sequence[float] | None = None) -> None:
    """Make exactly ``adapter_names`` active, each at its weight: layers compute ``W + Σ_i w_i s_i B_i A_i``.

    Args:
        adapter_names: one name or a list (a layer without some of them adds the ones it has).
        weights: one weight per name, one number for all, or ``None`` (1 each).

    Merged layers are merged again from their saved base weight (never incrementally). Everything is
    checked first; a bad call changes nothing.

    Raises:
        ValueError: unknown or repeated names, no names, a weights list of another length, or a weight
            that is not a finite number.
    """
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    known = list_adapters(model)
    if not known:
        raise ValueError(f"{type(model).__name__} has no LoRA layers")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"set_adapters: no adapter(s) {', '.join(map(repr, unknown))} in the model (it has {', '.join(map(repr, known))})")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"set_adapters needs distinct adapter names, got {names!r} (for base outputs use disable_lora)")
    if weights is None or isinstance(weights, (int, float)):
        weights = [1.0 if weights is None else weights] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(f"set_adapters: {len(weights)} weight(s) for {len(names)} adapter(s) {names!r}")
    checked = {n: checked_adapter_weight(w, f"set_adapters: weight of adapter {n!r}") for n, w in zip(names, weights)}
    for layer in lora_layers(model).values():
        here = [n for n in names if n in layer.lora_adapters]
        layer.set_active_adapters(here, {n: checked[n] for n in here})


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter ``adapter_name`` from every layer; the other adapters are left bit-identical.

    The active adapters stay active; if ``adapter_name`` was the only active one, the remaining
    adapters become active. Layers left without adapters stay LoRA layers computing the base
    output (:func:`unload` turns the model back into plain torch layers).

    Raises:
        ValueError: the model has no adapter of that name (nothing changed).
    """
    resolve_adapter_name(model, adapter_name)
    active = [n for n in active_adapters(model) if n != adapter_name]
    if not active:
        active = [n for n in list_adapters(model) if n != adapter_name]
    for layer in lora_layers(model).values():
        if adapter_name in layer.lora_adapters:
            layer.delete_adapter(adapter_name)
        layer.set_active_adapters([n for n in active if n in layer.lora_adapters])
    configs = _configs(model)
    configs.pop(adapter_name, None)
    setattr(model, CONFIG_ATTR, configs)


def mark_only_lora_as_trainable(model: nn.Module, bias: str | None = None, adapter_name: str | None = None) -> None:
    """Freeze everything except one adapter: its ``lora_A``/``lora_B``, biases per ``bias`` and ``modules_to_save``.

    Args:
        bias: ``"none"`` (no bias trains), ``"all"`` (every bias in the model), ``"lora_only"``
            (the biases of LoRA layers). ``None`` means the injected config's ``bias``.
        adapter_name: the adapter that trains (``None``: the model's only adapter); the others are frozen.
    """
    trainable = {id(p) for p in adapter_parameters(model, bias, adapter_name).values()}
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)


def adapter_parameters(model: nn.Module, bias: str | None = None, adapter_name: str | None = None) -> dict[str, nn.Parameter]:
    """Name -> parameter for everything that belongs to one adapter (what trains and what is saved).

    Decided by structure, not by ``"lora" in name``: that adapter's tensors in each LoRA layer
    (``<path>.lora_A`` / ``<path>.lora_B``, or its kind's :attr:`~convlora.kinds.AdapterBase.param_names`:
    the adapter file's keys), then biases
    per ``bias``, then every parameter of the config's ``modules_to_save``.

    Args:
        adapter_name: ``None``: the model's only adapter (an error when it has several).
    """
    name = resolve_adapter_name(model, adapter_name)
    config = _configs(model).get(name)
    bias = bias if bias is not None else (config.bias if config is not None else "none")
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    params: dict[str, nn.Parameter] = {}
    for path, layer in lora_layers(model).items():
        if name not in layer.lora_adapters:
            continue
        adapter = layer.lora_adapters[name]
        for param_name, param in zip(adapter.param_names, adapter.factors()):
            params[f"{path}.{param_name}"] = param
        if bias == "lora_only" and layer.bias is not None:
            params[f"{path}.bias"] = layer.bias
    if bias == "all":
        for param_name, param in model.named_parameters():
            if param_name.rpartition(".")[2] == "bias":
                params[param_name] = param
    to_save = config.modules_to_save if config is not None else None
    if to_save:
        matched = False
        for path, module in model.named_modules():
            if path and any(path_matches(t, path) for t in to_save):
                matched = True
                for param_name, param in module.named_parameters():
                    params[f"{path}.{param_name}"] = param
        if not matched:
            raise ValueError(f"modules_to_save {to_save} match no module of the model")
    return params


def lora_state_dict(model: nn.Module, bias: str | None = None, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """One adapter's tensors only (detached): ``<path>.lora_A``, ``<path>.lora_B``, saved biases/modules.

    While a layer is merged its ``bias`` is unaffected (only the weight is merged), so the result is
    the same in train and eval mode.
    """
    return {name: param.detach() for name, param in adapter_parameters(model, bias, adapter_name).items()}


def load_lora_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict: bool = True,
    bias: str | None = None,
    source: str = "state dict",
    adapter_name: str | None = None,
) -> None:
    """Copy one adapter's tensors into ``model``; everything is checked before anything is written.

    Merged layers are unmerged, updated and merged again, so the model stays consistent.

    Raises:
        StateDictMismatchError: naming missing / unexpected keys (when ``strict``), every shape
            mismatch with both shapes, and integer / bool tensors. Nothing is changed.
        ValueError: tensors that hold NaN / inf once cast to their parameter's dtype (a float64
            ``1e300`` for a float32 parameter), named. Nothing is changed.
    """
    params = adapter_parameters(model, bias, adapter_name)
    check_state_dict({k: p.shape for k, p in params.items()}, state_dict, strict=strict, source=source)
    check_adapter_tensors(state_dict, {k: p.dtype for k, p in params.items()}, source=source)
    layers = lora_layers(model)
    touched = [layer for path, layer in layers.items() if any(key.startswith(path + ".") for key in state_dict)]
    with temporarily_unmerged(touched), torch.no_grad():
        for key, value in state_dict.items():
            if key in params:
                params[key].copy_(value.to(device=params[key].device, dtype=params[key].dtype))


@contextlib.contextmanager
def temporarily_unmerged(layers: Iterable[LoRALayer]) -> Iterator[None]:
    """Unmerge ``layers`` for the block (e.g. to change A, B or the scaling), re-merge those that were merged.

    Re-merging follows merge-on-eval's rule: a layer whose new merge would not be finite stays
    unmerged (one warning) rather than failing half-way through the list.
    """
    layers = list(layers)
    was_merged = [layer.merged for layer in layers]
    for layer in layers:
        layer.unmerge()
    try:
        yield
    finally:
        for layer, merged in zip(layers, was_merged):
            if merged:
                layer._merge_or_run_unmerged()


@contextlib.contextmanager
def unchanged_on_error(*models: nn.Module | None) -> Iterator[None]:
    """If the block raises, put every model's LoRA back exactly as it was, then re-raise.

    A model without LoRA before the block loses whatever LoRA the block injected; a model with LoRA
    gets back copies of its A, B, alpha, rsLoRA flag and merge state (a merged layer is merged
    again from its restored base weight, bit-identically). ``None`` entries are skipped.
    """
    saved = [(model, _lora_snapshot(model)) for model in models if model is not None]
    try:
        yield
    except BaseException:
        for model, snapshot in saved:
            _restore_lora(model, snapshot)
        raise


def _lora_snapshot(model: nn.Module) -> tuple[dict[str, tuple], dict[str, LoRAConfig] | None]:
    state = {}
    for path, layer in lora_layers(model).items():
        adapters = {
            name: (a, [t.detach().clone() for t in a.factors()], a.lora_alpha, a.use_rslora, a.weight)
            for name, a in layer.lora_adapters.items()
        }
        state[path] = (layer, adapters, layer.active_adapters, layer.merged)
    return state, getattr(model, CONFIG_ATTR, None)


def _restore_lora(model: nn.Module, snapshot: tuple[dict[str, tuple], dict[str, LoRAConfig] | None]) -> None:
    state, configs = snapshot
    for path, layer in lora_layers(model).items():
        if path not in state:  # the block injected this layer
            _set_submodule(model, path, layer.to_base_layer(merge=False))
    for path, (layer, adapters, active, merged) in state.items():
        layer.unmerge()
        if model.get_submodule(path) is not layer:
            _set_submodule(model, path, layer)
        layer.lora_adapters = nn.ModuleDict({name: saved[0] for name, saved in adapters.items()})
        for adapter, factors, alpha, use_rslora, weight in adapters.values():
            with torch.no_grad():
                for tensor, saved in zip(adapter.factors(), factors):
                    tensor.copy_(saved)
            adapter.lora_alpha, adapter.use_rslora, adapter.weight = alpha, use_rslora, weight
        layer._active_adapters = active
        if merged:
            layer.merge()  # these adapters merged before, so they merge again to the same weight
    if configs is not None:
        setattr(model, CONFIG_ATTR, configs)
    elif hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)


@contextlib.contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes exactly its base outputs; on exit LoRA is back as it was."""
    layers = lora_layers(model).values()
    with temporarily_unmerged(layers):
        for layer in layers:
            layer.lora_disabled = True
        try:
            yield model
        finally:
            for layer in layers:
                layer.lora_disabled = False


def merge_and_unload(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Replace every LoRA layer by its plain torch layer with ``s * ΔW`` merged in (fp32 math).

    Every merge is checked (finite in the weight's own dtype) before any layer is replaced; a
    failure leaves every layer as it was. Returns ``model``.

    Args:
        dequantize: for a quantized base (:func:`convlora.quantize_base`): first turn every quantized
            weight of ``model`` back into a full-precision parameter (its dequantized values, in the
            compute dtype), then merge. Without it a quantized base is refused.

    Raises:
        QuantizationError: LoRA layers on a quantized base and not ``dequantize`` (named; nothing changed).
        ValueError: a merged weight would hold NaN / inf in its dtype (the layer is named).
        RuntimeError: a weight that cannot take a merge: sharded, or tied to another parameter
            (named; merging would change that parameter too).
    """
    layers = lora_layers(model)
    quantized = sorted(path for path, layer in layers.items() if is_quantized(layer))
    if quantized and not dequantize:
        raise QuantizationError(
            f"cannot merge LoRA into a quantized base ({len(quantized)} layers, e.g. {quantized[0]}): the merged "
            "weight would need full precision; pass dequantize=True for a full-precision merged model, or unload()"
        )
    if quantized:
        dequantize_base(model)
    was_merged = {path: layer.merged for path, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.merge()
    except Exception:
        for path, layer in layers.items():
            if not was_merged[path]:
                layer.unmerge()
        raise
    return _replace_with_base_layers(model, layers, merge=True)


def unload(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by its plain torch layer with the original weight (ΔW dropped)."""
    return _replace_with_base_layers(model, lora_layers(model), merge=False)


def cast_lora_params(model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Cast only the adapters' parameters, every adapter's (e.g. keep them fp32 on an fp16/bf16 base)."""
    for name in list_adapters(model):
        for param in adapter_parameters(model, adapter_name=name).values():
            param.data = param.data.to(dtype)


def _replace_with_base_layers(model: nn.Module, layers: Mapping[str, LoRALayer], merge: bool) -> nn.Module:
    if not layers:
        raise ValueError("the model has no LoRA layers")
    for path, layer in layers.items():
        _set_submodule(model, path, layer.to_base_layer(merge=merge))
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def _raise_on_unmatched_targets(config: LoRAConfig, matched_paths: list[str]) -> None:
    targets = config.target_modules
    if isinstance(targets, str):
        if not matched_paths:
            raise ValueError(f"target_modules regex {targets!r} matches no module of the model")
        return
    unmatched = [t for t in targets if not any(path_matches(t, p) for p in matched_paths)]
    if unmatched:
        raise ValueError(f"target_modules matched no module for: {', '.join(unmatched)}")

