"""Put LoRA layers into any model, and take them out again.

Injection is planned first and applied second: every target is resolved and checked before a
single module is replaced, so a bad config raises and leaves the model exactly as it was. Loads are
all-or-nothing too: :func:`load_lora_state_dict` checks every tensor (keys, shapes, dtype,
finiteness) before writing one, and :func:`unchanged_on_error` puts models back as they were when a
multi-step load fails part-way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from convlora.config import LoRAConfig, key_matches, path_matches, pattern_matches
from convlora.layers import LORA_CLASSES, LoRALayer, is_spatial_conv
from convlora.state import LORA_PARAM_NAMES, check_adapter_tensors, check_state_dict

CONFIG_ATTR = "convlora_config"  # the LoRAConfig used to inject a model is kept on its root module


@dataclass(frozen=True)
class LayerSpec:
    """How one module is adapted."""

    r: int
    alpha: float
    use_rslora: bool | None = None
    """``alpha / sqrt(r)`` scaling for this module; ``None`` means the config's ``use_rslora``."""


def plan_injection(model: nn.Module, config: LoRAConfig) -> dict[str, LayerSpec]:
    """Resolve ``config`` against ``model``: module path -> rank/alpha, without changing anything.

    Raises:
        ValueError: a target (or a ``rank_pattern`` / ``alpha_pattern`` key) matches no module — each
            such name is listed; or a target matches a module LoRA cannot wrap (named, with its type);
            or a targeted module already carries LoRA.
    """
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
        if isinstance(module, LoRALayer):
            already.append(path)
        elif type(module) not in LORA_CLASSES:
            unwrappable.append(f"{path} ({type(module).__module__}.{type(module).__name__})")
        else:
            plan[path] = LayerSpec(*config.rank_and_alpha(path, is_spatial_conv(module)))
    if already:
        raise ValueError(f"these modules already carry LoRA: {', '.join(already)}")
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


def inject_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Replace every targeted layer of ``model`` (in place) by its LoRA version.

    The new layers share the base layers' weight and bias tensors; ``lora_A`` is initialised per
    ``config.init`` and ``lora_B`` is zero, so the model's outputs are unchanged. Parameters'
    ``requires_grad`` is not touched: call :func:`mark_only_lora_as_trainable` to freeze the base.

    Returns:
        The adapted module paths, in model order.
    """
    plan = plan_injection(model, config)
    apply_plan(model, plan, config)
    return list(plan)


def apply_plan(model: nn.Module, plan: Mapping[str, LayerSpec], config: LoRAConfig) -> None:
    """Replace the modules named in ``plan`` (as made by :func:`plan_injection`).

    A module whose weight is shared with another parameter of ``model`` (GPT-2's ``lm_head`` tied
    to ``wte``) gets LoRA that never merges into that shared tensor: merge-on-eval skips it with a
    warning and :func:`merge_and_unload` refuses it, both naming the parameters it is tied to.
    """
    modules = dict(model.named_modules())
    tied = tied_weights(model, list(plan))
    new_layers = {}
    for path, spec in plan.items():
        base = modules[path]
        layer = LORA_CLASSES[type(base)].from_module(
            base,
            r=spec.r,
            alpha=spec.alpha,
            dropout=config.dropout,
            merge_weights=config.merge_on_eval,
            init=config.init,
            use_rslora=config.use_rslora if spec.use_rslora is None else spec.use_rslora,
        )
        layer._lora_path = path
        layer._tied_to = tied.get(path)
        if not base.training:
            # An injected model in eval mode behaves as eval() would have left it: merged.
            layer.train(False)
        new_layers[path] = layer
    for path, layer in new_layers.items():
        _set_submodule(model, path, layer)
    setattr(model, CONFIG_ATTR, config)


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


def get_config(model: nn.Module) -> LoRAConfig | None:
    """The LoRAConfig ``model`` was injected with, if any."""
    return getattr(model, CONFIG_ATTR, None)


def mark_only_lora_as_trainable(model: nn.Module, bias: str | None = None) -> None:
    """Freeze everything except the adapter: ``lora_A``/``lora_B``, biases per ``bias`` and ``modules_to_save``.

    Args:
        bias: ``"none"`` (no bias trains), ``"all"`` (every bias in the model), ``"lora_only"``
            (the biases of LoRA layers). ``None`` means the injected config's ``bias``.
    """
    trainable = {id(p) for p in adapter_parameters(model, bias).values()}
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)


def adapter_parameters(model: nn.Module, bias: str | None = None) -> dict[str, nn.Parameter]:
    """Name -> parameter for everything that belongs to the adapter (what trains and what is saved).

    Decided by structure, not by ``"lora" in name``: the LoRA layers' own ``lora_A`` / ``lora_B``,
    then biases per ``bias``, then every parameter of the config's ``modules_to_save``.
    """
    config = get_config(model)
    bias = bias if bias is not None else (config.bias if config is not None else "none")
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: call convlora.inject_lora(model, config) first")
    params: dict[str, nn.Parameter] = {}
    for path, layer in layers.items():
        for name in LORA_PARAM_NAMES:
            params[f"{path}.{name}"] = getattr(layer, name)
        if bias == "lora_only" and layer.bias is not None:
            params[f"{path}.bias"] = layer.bias
    if bias == "all":
        for name, param in model.named_parameters():
            if name.rpartition(".")[2] == "bias":
                params[name] = param
    to_save = config.modules_to_save if config is not None else None
    if to_save:
        matched = False
        for path, module in model.named_modules():
            if path and any(path_matches(t, path) for t in to_save):
                matched = True
                for name, param in module.named_parameters():
                    params[f"{path}.{name}"] = param
        if not matched:
            raise ValueError(f"modules_to_save {to_save} match no module of the model")
    return params


def lora_state_dict(model: nn.Module, bias: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors only (detached): ``<path>.lora_A``, ``<path>.lora_B``, saved biases/modules.

    While a layer is merged its ``bias`` is unaffected (only the weight is merged), so the result is
    the same in train and eval mode.
    """
    return {name: param.detach() for name, param in adapter_parameters(model, bias).items()}


def load_lora_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict: bool = True,
    bias: str | None = None,
    source: str = "state dict",
) -> None:
    """Copy adapter tensors into ``model``; everything is checked before anything is written.

    Merged layers are unmerged, updated and merged again, so the model stays consistent.

    Raises:
        StateDictMismatchError: naming missing / unexpected keys (when ``strict``), every shape
            mismatch with both shapes, and integer / bool tensors. Nothing is changed.
        ValueError: tensors that hold NaN / inf once cast to their parameter's dtype (a float64
            ``1e300`` for a float32 parameter), named. Nothing is changed.
    """
    params = adapter_parameters(model, bias)
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


def _lora_snapshot(model: nn.Module) -> tuple[dict[str, tuple], LoRAConfig | None]:
    state = {
        path: (layer, layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.lora_alpha, layer.use_rslora, layer.merged)
        for path, layer in lora_layers(model).items()
    }
    return state, get_config(model)


def _restore_lora(model: nn.Module, snapshot: tuple[dict[str, tuple], LoRAConfig | None]) -> None:
    state, config = snapshot
    if not state and lora_layers(model):
        unload(model)  # the block injected these layers
    for layer, lora_A, lora_B, alpha, use_rslora, merged in state.values():
        layer.unmerge()
        with torch.no_grad():
            layer.lora_A.copy_(lora_A)
            layer.lora_B.copy_(lora_B)
        layer.lora_alpha, layer.use_rslora = alpha, use_rslora
        if merged:
            layer.merge()  # these A, B merged before, so they merge again to the same weight
    if config is not None:
        setattr(model, CONFIG_ATTR, config)
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


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by its plain torch layer with ``s * ΔW`` merged in (fp32 math).

    Every merge is checked (finite in the weight's own dtype) before any layer is replaced; a
    failure leaves every layer as it was. Returns ``model``.

    Raises:
        ValueError: a merged weight would hold NaN / inf in its dtype (the layer is named).
        RuntimeError: a weight that cannot take a merge: sharded, quantized, or tied to another
            parameter (named; merging would change that parameter too).
    """
    layers = lora_layers(model)
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
    """Cast only the adapter's parameters (e.g. keep them fp32 on an fp16/bf16 base)."""
    for param in adapter_parameters(model).values():
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

