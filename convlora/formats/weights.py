"""The format-free view of a LoRA adapter that every importer produces and every exporter consumes.

An adapter is a mapping ``path -> LoRAModule(lora_A, lora_B, alpha)`` with tensors in convlora's
own layout (the README's LoRA math section): Linear ``A (r, in)``, ``B (out, r)``; ConvNd ``A (r, C_in/g, *k)``,
``B (C_out, r, *1s)``. Adapters of other kinds (LoHa, LoKr, DoRA: :mod:`convlora.kinds`) carry their
tensors by parameter name in ``LoRAModule.factors`` (DoRA's ``magnitude (out,)`` too). For a whole pipeline the paths start with the component name
(``unet.``, ``text_encoder.``); for a single model they are the model's own module paths.

Getting one adapter's weights *out of* a model (:func:`weights_from_model`) and *into* a model
(:func:`load_weights_into_model`: path resolution here, then the one loader,
:func:`convlora.loading.load_adapter`) live here, so each file format only translates keys.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from convlora.errors import LoRAFileError
from convlora.inject import get_config, lora_layers, resolve_adapter_name
from convlora.kinds import LORA, AdapterBase, AdapterKind, expected_shapes
from convlora.layers import conv_geometry_record, lora_class_for
from convlora.loading import AdapterLoad, ModuleLoad, load_adapter

#: Component names a pipeline file may hold, in the order they are written.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

#: Top-level children of a transformers-5 ``CLIPTextModel`` (older versions nest them under ``text_model``).
_CLIP_TEXT_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm.")


class LoRAFormatError(LoRAFileError):
    """A LoRA file or adapter cannot be read, written or loaded in the requested format."""


@dataclass
class LoRAModule:
    """One adapted module: ``W + (alpha / r) * B @ A`` (``alpha / sqrt(r)`` with rsLoRA), or another
    kind's update (``kind``, ``factors``)."""

    lora_A: torch.Tensor | None
    """``(r, in)`` for Linear, ``(r, C_in/groups, *k)`` for ConvNd (LoRA and DoRA; ``None`` for LoHa / LoKr)."""
    lora_B: torch.Tensor | None
    """``(out, r)`` for Linear, ``(C_out, r, *1s)`` for ConvNd."""
    alpha: float
    geometry: dict[str, Any] | None = None
    """What of the base conv's ``groups`` / ``dilation`` / ``padding_mode`` the source recorded
    (models and convlora files: all three; PEFT files: ``groups``); ``None`` for Linear or unknown."""
    kind: AdapterKind = LORA
    """The adapter kind (:mod:`convlora.kinds`)."""
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    """The kind's other tensors by parameter name: ``hada_w1_a`` ... for LoHa, ``lokr_w1`` ... for LoKr,
    ``magnitude (out,)`` with DoRA; empty for plain LoRA."""
    base_shape: tuple[int, ...] | None = None
    """The base weight's delta-layout shape ``(out, in/g, *k)`` where the source knows it (LoHa's
    flattened factors do not tell a conv from a Linear)."""

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Parameter name -> tensor (the adapter's :attr:`~convlora.kinds.AdapterBase.param_names`)."""
        pair = {"lora_A": self.lora_A, "lora_B": self.lora_B} if self.kind.name == "lora" else {}
        return {**pair, **self.factors}

    @property
    def is_plain_lora(self) -> bool:
        return self.kind.name == "lora" and not self.kind.use_dora

    @property
    def r(self) -> int:
        if self.kind.name == "lora":
            return int(self.lora_A.shape[0])
        if self.kind.name == "loha":
            return int(self.factors["hada_w1_b"].shape[0])
        factorised = self.factors.get("lokr_w2_a", self.factors.get("lokr_w1_a"))
        return int(factorised.shape[1]) if factorised is not None else 1

    @property
    def is_conv(self) -> bool:
        """Whether the base is a conv: from :attr:`base_shape`, else from tensors that keep the kernel
        (LoRA's A, LoKr's whole ``lokr_w2``, DoRA's ``magnitude`` does not); flattened factors with no
        recorded shape count as not a conv."""
        if self.base_shape is not None:
            return len(self.base_shape) > 2
        kept = self.lora_A if self.kind.name == "lora" else self.factors.get("lokr_w2")
        return kept is not None and kept.dim() > 2

    @property
    def is_spatial_conv(self) -> bool:
        """A conv whose kernel is larger than 1 (kohya's ``conv_dim`` layers); see :attr:`is_conv`."""
        if self.base_shape is not None:
            return any(k > 1 for k in self.base_shape[2:])
        kept = self.lora_A if self.kind.name == "lora" else self.factors.get("lokr_w2")
        return self.is_conv and any(k > 1 for k in kept.shape[2:])


@dataclass
class LoRAWeights:
    """A whole adapter, independent of any file format."""

    modules: dict[str, LoRAModule]
    """Module path (with a ``unet.`` / ``text_encoder.`` prefix for pipelines) -> its LoRA."""
    use_rslora: bool = False
    """Scaling ``alpha / sqrt(r)`` instead of ``alpha / r``."""
    metadata: dict[str, str] = field(default_factory=dict)
    """User metadata (training settings, base model, ...) carried from file to file."""

    def component(self, name: str) -> dict[str, LoRAModule]:
        """The modules of one pipeline component, with the ``name.`` prefix removed."""
        prefix = name + "."
        return {p[len(prefix):]: m for p, m in self.modules.items() if p.startswith(prefix)}

    def components(self) -> list[str]:
        """The pipeline components present (``[]`` when the paths carry no known component prefix)."""
        return [c for c in COMPONENTS if any(p.startswith(c + ".") for p in self.modules)]

    def unprefixed(self) -> list[str]:
        """Paths that belong to no known component."""
        return [p for p in self.modules if not any(p.startswith(c + ".") for c in COMPONENTS)]

    def most_common(self) -> tuple[int, float, int | None, float | None]:
        """``(rank, alpha, conv_rank, conv_alpha)`` occurring most often, for linear/1x1 and 3x3 modules.

        The conv values are ``None`` when no 3x3 conv is adapted.
        """
        linear = [m for m in self.modules.values() if not m.is_spatial_conv]
        spatial = [m for m in self.modules.values() if m.is_spatial_conv]
        rank, alpha = _most_common(linear or spatial)
        conv_rank, conv_alpha = _most_common(spatial) if spatial else (None, None)
        return rank, alpha, conv_rank, conv_alpha


def _most_common(modules: list[LoRAModule]) -> tuple[int, float]:
    rank = Counter(m.r for m in modules).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules).most_common(1)[0][0]
    return rank, alpha


def nested_clip_path(path: str) -> str:
    """A transformers-5 (flattened) ``CLIPTextModel`` path in the nested spelling files use.

    ``encoder.layers.0.self_attn.q_proj`` -> ``text_model.encoder.layers.0.self_attn.q_proj``;
    paths already nested, or not CLIP text-model paths, are returned unchanged.
    """
    return "text_model." + path if path.startswith(_CLIP_TEXT_CHILDREN) else path


# ---- out of a model ------------------------------------------------------------------------------
def model_adapter(model: nn.Module, adapter_name: str | None = None) -> dict[str, Any]:
    """``path -> LoRAAdapter`` of one adapter of ``model`` (``None``: its only adapter), in model order."""
    name = resolve_adapter_name(model, adapter_name)
    return {p: layer.lora_adapters[name] for p, layer in lora_layers(model).items() if name in layer.lora_adapters}


def weights_from_model(model: nn.Module, prefix: str = "", adapter_name: str | None = None) -> dict[str, LoRAModule]:
    """One adapter of ``model`` as ``prefix + path -> LoRAModule`` (tensors detached, on the CPU).

    Args:
        adapter_name: ``None``: the model's only adapter.

    Raises:
        ValueError: the model has no LoRA layers, several adapters and none named, or the adapter's
            config saves biases / ``modules_to_save``, which only convlora's native format carries.
    """
    if not lora_layers(model):
        raise ValueError(f"{type(model).__name__} has no LoRA layers: call convlora.inject_lora first")
    adapters = model_adapter(model, adapter_name)
    config = get_config(model, resolve_adapter_name(model, adapter_name))
    if config is not None and (config.bias != "none" or config.modules_to_save):
        raise LoRAFormatError(
            "this adapter also trains biases / modules_to_save; only convlora's native format holds those "
            "(save it with format='native' / convlora.save_lora)"
        )
    layers = lora_layers(model)
    return {prefix + path: module_from_adapter(layers[path], a) for path, a in adapters.items()}


def module_from_adapter(layer: nn.Module, adapter: AdapterBase) -> LoRAModule:
    """One adapter of a LoRA layer as a :class:`LoRAModule` (tensors detached, on the CPU)."""
    tensors = {n: t.detach().cpu() for n, t in zip(adapter.param_names, adapter.factors())}
    lora_A, lora_B = tensors.pop("lora_A", None), tensors.pop("lora_B", None)
    return LoRAModule(lora_A, lora_B, float(adapter.lora_alpha), conv_geometry_record(layer), kind=adapter.kind,
                      factors=tensors, base_shape=tuple(layer.delta_shape_for(layer)))


def uses_rslora(*models: nn.Module | None, adapter_name: str | None = None) -> bool:
    """Whether adapter ``adapter_name`` of ``models`` uses rsLoRA scaling; mixing both kinds raises."""
    kinds = {a.use_rslora for m in models if m is not None for a in model_adapter(m, adapter_name).values()}
    if len(kinds) > 1:
        raise LoRAFormatError("some LoRA layers use rsLoRA scaling and some do not; one file holds one kind")
    return kinds == {True}


#: The adapter kinds (:attr:`convlora.kinds.AdapterKind.label`) each format's files carry; the rule
#: every writer checks through :func:`check_kinds_for_format`.
FORMAT_KINDS: dict[str, frozenset[str]] = {
    "native": frozenset({"lora", "dora", "loha", "lokr", "loha+dora", "lokr+dora"}),
    "diffusers": frozenset({"lora", "dora"}),
    "kohya": frozenset({"lora", "dora", "loha", "lokr", "loha+dora", "lokr+dora"}),
    "peft": frozenset({"lora", "dora", "loha", "lokr"}),
}


#: Why a format lacks the kinds it lacks (from its loader's source), added to the refusal.
FORMAT_KIND_LIMITS: dict[str, str] = {
    "diffusers": (
        "diffusers' StableDiffusion / SDXL load_lora_weights refuses every key without 'lora' in it, as LoHa's "
        "hada_* and LoKr's lokr_* keys are (loaders/lora_pipeline.py), and loads LoRA and DoRA only"
    ),
    "peft": "PEFT's LoHaConfig / LoKrConfig have no weight decomposition (DoRA)",
}


def check_kinds_for_format(modules: Mapping[str, LoRAModule], fmt: str) -> None:
    """Refuse adapter kinds ``fmt``'s files do not carry.

    Raises:
        LoRAFormatError: naming the kinds, a few of their modules, the formats that do carry them and
            why ``fmt`` does not (:data:`FORMAT_KIND_LIMITS`).
    """
    if fmt not in FORMAT_KINDS:
        return  # an unknown format is the writer's error to name
    allowed = FORMAT_KINDS[fmt]
    bad: dict[str, list[str]] = {}
    for path, module in modules.items():
        if module.kind.label not in allowed:
            bad.setdefault(module.kind.label, []).append(path)
    if bad:
        detail = "; ".join(
            f"{label} ({_short(paths, 3)}; carried by {', '.join(f for f, k in FORMAT_KINDS.items() if label in k)})"
            for label, paths in sorted(bad.items())
        )
        why = f". {FORMAT_KIND_LIMITS[fmt]}" if fmt in FORMAT_KIND_LIMITS else ""
        raise LoRAFormatError(f"{fmt} files do not carry these adapter kinds: {detail}{why}")


def conv_geometry_problems(geometries: Mapping[str, dict[str, Any] | None], allow_groups: bool = False) -> list[str]:
    """``"path: what"`` for each conv whose LoRA foreign loaders compute differently.

    ``geometries`` maps paths to :func:`convlora.layers.conv_geometry_record` dicts (keys may be missing where a source did
    not record them). PEFT, diffusers and kohya/A1111/ComfyUI run ``lora_down`` with the base conv's
    kernel, stride and padding only: no dilation, zero padding. For ``groups > 1`` they use a dense
    A, which is not convlora's shared-A grouped LoRA (PEFT's files can still carry it exactly:
    ``allow_groups``).
    """
    problems = []
    for path, geometry in geometries.items():
        geometry = geometry or {}
        if geometry.get("groups", 1) > 1 and not allow_groups:
            problems.append(f"{path}: groups={geometry['groups']}")
        if any(d != 1 for d in geometry.get("dilation", ())):
            problems.append(f"{path}: dilation={tuple(geometry['dilation'])}")
        if geometry.get("padding_mode", "zeros") != "zeros":
            problems.append(f"{path}: padding_mode={geometry['padding_mode']!r}")
    return problems


def check_portable_geometry(source: nn.Module | LoRAWeights, fmt: str, allow_groups: bool = False) -> None:
    """Refuse conv LoRA that PEFT / diffusers / kohya loaders would compute differently.

    ``source`` is a model with LoRA or neutral weights (whose modules carry what their file
    recorded). Exporting such layers would give a file those loaders accept and get wrong (see
    :func:`conv_geometry_problems`).

    Raises:
        LoRAFormatError: naming every such layer and what is wrong with it.
    """
    if isinstance(source, LoRAWeights):
        geometries = {path: m.geometry for path, m in source.modules.items()}
    else:
        geometries = {path: conv_geometry_record(layer) for path, layer in lora_layers(source).items()}
    problems = conv_geometry_problems(geometries, allow_groups)
    if problems:
        raise LoRAFormatError(
            f"cannot export to {fmt}: its loaders compute conv LoRA without "
            + ("" if allow_groups else "groups, ")
            + "dilation or non-zero padding modes, so they would get these layers wrong: "
            + "; ".join(problems)
            + ". Save them with format='native' (convlora.save_lora) instead."
        )


# ---- into a model --------------------------------------------------------------------------------
def resolve_paths(paths: list[str], model: nn.Module) -> tuple[dict[str, str], list[str]]:
    """Map file module paths onto ``model``'s module paths.

    A path matches exactly; or with ``text_model.`` added / removed (CLIP text encoders are
    flattened in transformers 5, while files and A1111/ComfyUI use the nested names); or, for
    names that lost their dots (kohya), when it equals a module path with every ``.`` read as ``_``
    and exactly one module has that spelling.

    Returns:
        ``(file path -> model path, file paths that match no module)``.
    """
    names = [n for n, _ in model.named_modules() if n]
    name_set = set(names)
    by_underscores: dict[str, list[str]] = {}
    for n in names:
        by_underscores.setdefault(n.replace(".", "_"), []).append(n)
    nested = hasattr(model, "text_model")
    resolved, unknown = {}, []
    for path in paths:
        candidates = [path]
        if path.startswith("text_model.") and not nested:
            candidates.append(path[len("text_model."):])
        elif nested and path.startswith(_CLIP_TEXT_CHILDREN):
            candidates.append("text_model." + path)
        hit = next((c for c in candidates if c in name_set), None)
        if hit is None:
            hits = {h for c in candidates for h in by_underscores.get(c.replace(".", "_"), [])}
            hit = hits.pop() if len(hits) == 1 else None
        if hit is None:
            unknown.append(path)
        else:
            resolved[path] = hit
    return resolved, unknown


def load_weights_into_model(
    model: nn.Module,
    modules: Mapping[str, LoRAModule],
    use_rslora: bool = False,
    strict: bool = True,
    source: str = "file",
    adapter_name: str | None = None,
) -> list[str]:
    """Put ``modules`` into ``model`` as adapter ``adapter_name``: resolve the file's module paths onto the
    model's, then load through the one loader, :func:`convlora.loading.load_adapter` (which checks
    everything first, adds the adapter where the model lacks it, sets each module's alpha and rsLoRA
    flag from the file, and rolls back on failure).

    With ``strict`` every module of the file must land on a module of the model and, if the model
    already carries the adapter, on exactly its modules.

    Returns:
        The model module paths that were loaded.

    Raises:
        LoRAFormatError: modules of the file that the model does not have (named), or several entries
            landing on one module.
        ValueError: modules the model has but LoRA cannot wrap, or whose conv geometry differs.
        StateDictMismatchError: a rank / shape mismatch (named, with both shapes), or, when strict,
            modules of the model's adapter the file does not cover.
    """
    if not modules:
        raise LoRAFormatError(f"{source} has no LoRA modules for {type(model).__name__}")
    resolved, unknown = resolve_paths(list(modules), model)
    if unknown and strict:
        raise LoRAFormatError(
            f"{source}: {len(unknown)} LoRA module(s) match no module of {type(model).__name__}: "
            + _short(unknown)
        )
    by_model_path = {resolved[p]: m for p, m in modules.items() if p in resolved}
    if len(by_model_path) < len(resolved):
        seen: dict[str, list[str]] = {}
        for p, target in resolved.items():
            seen.setdefault(target, []).append(p)
        twice = [f"{target} ({' and '.join(ps)})" for target, ps in seen.items() if len(ps) > 1]
        raise LoRAFormatError(f"{source}: several LoRA entries land on the same module: {_short(twice)}")
    tensors = {f"{path}.{name}": t for path, module in by_model_path.items() for name, t in module.tensors.items()}
    load = AdapterLoad(
        {p: ModuleLoad(m.r, m.alpha, use_rslora, geometry=m.geometry, kind=m.kind) for p, m in by_model_path.items()},
        tensors,
        source,
    )
    return load_adapter(model, load, adapter_name=adapter_name, strict=strict)


def fits_module(base: nn.Module, module: LoRAModule) -> bool:
    """Whether ``module``'s tensors have the shapes an adapter of its kind on ``base`` would have (the
    layer class and :func:`convlora.kinds.expected_shapes` say)."""
    cls = lora_class_for(base)
    if cls is None:
        return False
    lokr = {n: tuple(t.shape) for n, t in module.factors.items() if n.startswith("lokr_")} if module.kind.name == "lokr" else None
    try:
        expected = expected_shapes(module.kind, cls.delta_shape_for(base), cls.lora_shapes_for(base, module.r), module.r, lokr)
    except ValueError:
        return False
    tensors = module.tensors
    return tensors.keys() == expected.keys() and all(tuple(tensors[n].shape) == tuple(s) for n, s in expected.items())


def _short(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
