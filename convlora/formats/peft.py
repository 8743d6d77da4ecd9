"""PEFT adapter folders (``adapter_model.safetensors`` + ``adapter_config.json``) for any model.

Keys are ``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight``; rank and alpha live in the
JSON config as ``r`` / ``lora_alpha`` plus per-module ``rank_pattern`` / ``alpha_pattern``. PEFT's
LoRA tensors have convlora's layout for Linear, ConvNd with ``groups == 1`` and GPT-2 ``Conv1D``
(``fan_in_fan_out``), so nothing is reshaped. For ``groups = g > 1`` PEFT uses a dense ``lora_A``
and a grouped 1x1 ``lora_B``; convlora's shared-A grouped LoRA is exactly that with rank ``g * r``
and a block-diagonal A (:func:`grouped_to_peft` / :func:`grouped_from_peft`).

The same ``r`` / ``lora_alpha`` / pattern dict is what diffusers keeps, per component, in the
``lora_adapter_metadata`` header of its files; :func:`lora_config_kwargs` and :func:`alpha_for`
serve both formats.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convlora.formats.peft_kinds import (
    LOHA_NAMES,
    LOKR_NAMES,
    MAGNITUDE,
    PEFT_TYPES,
    TUCKER_NAMES,
    dora_grouped_problems,
    lokr_base_shape,
    lokr_peft_ranks,
    lycoris_config,
    lycoris_module,
    lycoris_write_problems,
    magnitude_from_peft,
    magnitude_to_peft,
)
from convlora.formats.weights import (
    LoRAFormatError,
    LoRAModule,
    LoRAWeights,
    check_kinds_for_format,
    check_portable_geometry,
    conv_geometry_problems,
    load_weights_into_model,
    resolve_paths,
    uses_rslora,
    weights_from_model,
)
from convlora.atomic import write_text_atomic
from convlora.formats.pairing import pair_modules, raise_on_leftovers, split_lora_keys
from convlora.header import peft_config_file, peft_pattern
from convlora.inject import lora_layers
from convlora.io import read_safetensors, write_safetensors
from convlora.kinds import AdapterKind
from convlora.layers import GPT2Conv1D, conv_geometry_record

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
KEY_PREFIX = "base_model.model."
#: Header entry of the PEFT files convlora writes for LoHa / LoKr: ``{path: base weight shape}`` (their
#: flattened factors do not tell a conv's kernel from its channels). PEFT ignores the header.
BASE_SHAPES_KEY = "convlora_base_shapes"
#: adapter_config.json fields that describe the adapter's base, not its weights: kept in the metadata
#: (under these keys) when a folder is read, so a folder converted or resized into a folder keeps them.
CONFIG_METADATA_KEYS = {"base_model_name_or_path": "peft_base_model_name_or_path", "task_type": "peft_task_type"}
#: ``r`` and ``alpha`` of a PEFT ``LoHaConfig`` / ``LoKrConfig`` that does not name them.
LYCORIS_DEFAULT = 8


# ---- the config both PEFT and diffusers use -------------------------------------------------------
def lora_config_kwargs(modules: Mapping[str, LoRAModule], use_rslora: bool) -> dict[str, Any]:
    """PEFT ``LoraConfig`` arguments that give each module exactly its rank and alpha.

    ``r`` / ``lora_alpha`` are the most common values; every other module is named in
    ``rank_pattern`` / ``alpha_pattern`` by its full path (PEFT matches pattern keys as dotted-path
    suffixes, so a full path names one module). ``target_modules`` lists the full paths too.
    """
    rank = Counter(m.r for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
    return {
        "r": rank,
        "lora_alpha": _number(alpha),
        "target_modules": sorted(modules),
        "rank_pattern": {p: m.r for p, m in sorted(modules.items()) if m.r != rank},
        "alpha_pattern": {p: _number(m.alpha) for p, m in sorted(modules.items()) if m.alpha != alpha},
        "use_rslora": use_rslora,
    }


def alpha_for(path: str, rank: int, config: Mapping[str, Any] | None, field: str = "lora_alpha") -> float:
    """The alpha PEFT gives module ``path`` under ``config`` (``alpha = rank`` without a config; ``field``:
    the config's alpha, ``"alpha"`` in LoHa / LoKr configs).

    Pattern keys are matched as PEFT does: the first key ``k`` with
    ``re.match(rf"(.*\\.)?({k})$", path)`` wins. ``config`` has been checked by
    :func:`convlora.header.peft_lora_fields` (valid patterns and alphas).
    """
    if not config:
        return float(rank)
    for key, value in (config.get("alpha_pattern") or {}).items():
        if peft_pattern(key, "alpha_pattern key").match(path):
            return float(value)
    return float(config.get(field, rank))


def rank_for(path: str, config: Mapping[str, Any]) -> int | None:
    """The rank PEFT would build for ``path`` (``None`` when the config names no ``r``)."""
    for key, value in (config.get("rank_pattern") or {}).items():
        if peft_pattern(key, "rank_pattern key").match(path):
            return int(value)
    return config.get("r")


# ---- grouped convolutions -------------------------------------------------------------------------
def grouped_to_peft(module: LoRAModule, groups: int, use_rslora: bool) -> LoRAModule:
    """convlora's LoRA on a conv with ``groups = g`` as the PEFT adapter that computes the same.

    PEFT adapts such a conv with a dense ``lora_A`` ``(R, C_in, *k)`` and a grouped 1x1 ``lora_B``
    ``(C_out, R/g, *1s)`` whose group ``j`` reads hidden channels ``j*R/g .. (j+1)*R/g``. With
    ``R = g*r``, A placed block-diagonally (group ``j``'s rows see only group ``j``'s input channels)
    and B unchanged, that is convlora's ``ΔW_j = B_j @ A``. The scaling stays ``alpha / r``: alpha
    becomes ``g * alpha`` (``sqrt(g) * alpha`` with rsLoRA).

    Args:
        module: convlora's ``A (r, C_in/g, *k)``, ``B (C_out, r, *1s)``.

    Returns:
        ``A (g*r, C_in, *k)``, the same ``B``, the adjusted alpha.
    """
    a = module.lora_A
    r, c_in_g = a.shape[0], a.shape[1]
    dense = a.new_zeros((groups * r, groups * c_in_g, *a.shape[2:]))
    for j in range(groups):
        dense[j * r:(j + 1) * r, j * c_in_g:(j + 1) * c_in_g] = a
    return LoRAModule(dense, module.lora_B, module.alpha * (groups**0.5 if use_rslora else groups))


def grouped_from_peft(lora_A: torch.Tensor, lora_B: torch.Tensor, path: str, source: str) -> tuple[torch.Tensor, int]:
    """convlora's shared A back from PEFT's grouped-conv LoRA: the inverse of :func:`grouped_to_peft`.

    PEFT's files describe the grouping themselves: ``lora_A`` has ``R`` rows and the grouped
    ``lora_B`` ``R/g`` columns, so ``g = R / columns``.

    Returns:
        ``(A (R/g, C_in/g, *k), g)``; the caller divides alpha by ``g`` (``sqrt(g)`` with rsLoRA).

    Raises:
        LoRAFormatError: ``lora_A`` is not block-diagonal with ``g`` identical blocks: that LoRA mixes
            channels across groups and is no update of the grouped weight at all.
    """
    groups = lora_A.shape[0] // lora_B.shape[1]
    r, c_in_g = lora_B.shape[1], lora_A.shape[1] // groups
    block = lora_A[:r, :c_in_g]
    if lora_A.shape[1] % groups or not torch.equal(lora_A, grouped_to_peft(LoRAModule(block, lora_B, 0.0), groups, False).lora_A):
        raise LoRAFormatError(
            f"{source}: {path} is a conv with groups={groups} whose PEFT lora_A {tuple(lora_A.shape)} is not "
            f"block-diagonal with {groups} identical blocks: that LoRA mixes channels across groups, which no "
            "update of the grouped weight can express, so convlora cannot load it (PEFT cannot merge it either)"
        )
    return block.clone(), groups


def _is_grouped_conv_pair(lora_A: torch.Tensor | None, lora_B: torch.Tensor | None) -> bool:
    """PEFT conv LoRA whose B has a divisor of A's rank as columns: a conv with ``groups > 1``."""
    if lora_A is None or lora_B is None or lora_A.dim() < 3 or lora_B.dim() < 3:
        return False
    rank, columns = lora_A.shape[0], lora_B.shape[1]
    return columns != rank and columns > 0 and rank % columns == 0


# ---- folders -------------------------------------------------------------------------------------
def read_peft_folder(folder: str | os.PathLike) -> LoRAWeights:
    """Read a PEFT LoRA adapter folder into neutral weights (paths relative to the base model).

    Raises:
        FileNotFoundError: no ``adapter_config.json`` / ``adapter_model.safetensors`` there.
        LoRAFormatError: not a LoRA adapter, or keys convlora cannot carry (DoRA magnitudes, LoRA
            biases, embedding LoRA, ``modules_to_save``, ...), all named.
    """
    folder = Path(folder)
    config = read_peft_config(folder)
    weights_file = folder / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise FileNotFoundError(f"{folder} has no {ADAPTER_WEIGHTS} (convlora reads only safetensors adapters)")
    tensors, header = read_safetensors(weights_file)
    return from_peft(tensors, header, config, source=str(weights_file))


def _peft_metadata(header: Mapping[str, str], config: Mapping[str, Any] | None) -> dict[str, str]:
    """The header's user metadata plus the config's base fields (:data:`CONFIG_METADATA_KEYS`, when set).

    With a config, it alone says them: a header entry under those keys is not read."""
    skipped = {"format", BASE_SHAPES_KEY, *(CONFIG_METADATA_KEYS.values() if config is not None else ())}
    metadata = {k: v for k, v in header.items() if k not in skipped}
    for field, key in CONFIG_METADATA_KEYS.items():
        if isinstance((config or {}).get(field), str):
            metadata[key] = config[field]
    return metadata


def from_peft(
    tensors: Mapping[str, Any], header: Mapping[str, str], config: Mapping[str, Any] | None, source: str = "file"
) -> LoRAWeights:
    """Neutral weights from PEFT adapter tensors; alpha from ``config`` (``alpha = rank`` without one).

    LoRA (with DoRA's ``lora_magnitude_vector``), LoHa (``hada_w*``) and LoKr (``lokr_w*``) adapters; the
    kind is the config's ``peft_type`` or, without a config, what the keys are.
    """
    peft_type = _peft_type_of(tensors, config)
    if peft_type != "LORA":
        return _from_peft_lycoris(tensors, header, config, peft_type, source)
    unprefixed = [k for k in tensors if not k.startswith(KEY_PREFIX)]
    stripped = {k[len(KEY_PREFIX):]: v for k, v in tensors.items() if k.startswith(KEY_PREFIX)}
    groups, leftovers = split_lora_keys(
        stripped, {".lora_A.weight": "A", ".lora_B.weight": "B", f".{MAGNITUDE}": "magnitude"}, source
    )
    raise_on_leftovers(
        unprefixed + [KEY_PREFIX + k for k in leftovers],
        source,
        " (convlora imports LoRA, DoRA, LoHa and LoKr: no LoRA bias, embedding LoRA or modules_to_save)",
    )
    use_rslora = bool((config or {}).get("use_rslora", False))
    conv_groups: dict[str, int] = {}  # path -> groups of a grouped conv, in PEFT's dense-A form
    for path, pair in groups.items():
        if _is_grouped_conv_pair(pair.get("A"), pair.get("B")):
            pair["A"], conv_groups[path] = grouped_from_peft(pair["A"], pair["B"], path, source)

    def alpha_of(path: str, rank: int, _group) -> float:
        g = conv_groups.get(path, 1)  # PEFT's rank and alpha are g times convlora's (sqrt(g) with rsLoRA)
        return alpha_for(path, rank * g, config) / (g**0.5 if use_rslora else g)

    modules = pair_modules(groups, alpha_of, source)
    if not modules:
        raise LoRAFormatError(f"{source} holds no LoRA weights")
    for path, g in conv_groups.items():
        modules[path].geometry = {"groups": g}  # what the file tells; dilation / padding mode it does not
    _attach_magnitudes(modules, groups, config, conv_groups, source)
    metadata = _peft_metadata(header, config)
    return LoRAWeights(modules, use_rslora=use_rslora, metadata=metadata)


def _peft_type_of(tensors: Mapping[str, Any], config: Mapping[str, Any] | None) -> str:
    """The config's ``peft_type``; without a config, ``LOHA`` / ``LOKR`` when the keys are ``hada_`` / ``lokr_`` ones."""
    if config is not None:
        return config.get("peft_type", "LORA")
    names = {k.rpartition(".")[2] for k in tensors}
    if names & set(LOHA_NAMES):
        return "LOHA"
    return "LOKR" if names & set(LOKR_NAMES) else "LORA"


def _attach_magnitudes(modules: dict[str, LoRAModule], groups, config, conv_groups, source: str) -> None:
    """DoRA: each module's ``lora_magnitude_vector`` as its ``magnitude (out,)``, all modules or none
    (PEFT's ``use_dora`` is one flag; a config that says otherwise is refused)."""
    with_magnitude = sorted(p for p, g in groups.items() if "magnitude" in g)
    if not with_magnitude and not (config or {}).get("use_dora"):
        return
    if len(with_magnitude) != len(modules) or (config is not None and not config.get("use_dora")):
        without = sorted(set(modules) - set(with_magnitude))
        raise LoRAFormatError(
            f"{source}: PEFT's use_dora is {bool((config or {}).get('use_dora', True))} for the whole adapter but "
            f"{len(with_magnitude)} of {len(modules)} modules have a {MAGNITUDE}"
            + (f" (not: {', '.join(without[:6])})" if without else "")
        )
    grouped = sorted(set(conv_groups))
    if grouped:
        raise LoRAFormatError(f"{source}: DoRA on grouped convs ({', '.join(grouped[:6])}): PEFT's DoRA computes "
                              "B.view(-1, R) @ A.view(R, -1) of a grouped lora_B there, which is not the LoRA update")
    for path, module in modules.items():
        magnitude = magnitude_from_peft(groups[path]["magnitude"], module.lora_B, f"{path}.{MAGNITUDE}", source)
        module.kind = AdapterKind("lora", use_dora=True)
        module.factors = {"magnitude": magnitude}


def _from_peft_lycoris(tensors, header, config, peft_type: str, source: str) -> LoRAWeights:
    """A PEFT LoHa / LoKr adapter (``base_model.model.<path>.hada_w1_a`` ...) as neutral weights."""
    allowed = set(LOHA_NAMES if peft_type == "LOHA" else LOKR_NAMES) | set(TUCKER_NAMES)
    by_path: dict[str, dict[str, Any]] = {}
    leftovers = []
    for key, tensor in tensors.items():
        path, _, name = key[len(KEY_PREFIX):].rpartition(".")
        if not key.startswith(KEY_PREFIX) or name not in allowed or not path:
            leftovers.append(key)
        else:
            by_path.setdefault(path, {})[name] = tensor
    raise_on_leftovers(leftovers, source, f" (a PEFT {peft_type} adapter holds {', '.join(sorted(allowed - set(TUCKER_NAMES)))})")
    if not by_path:
        raise LoRAFormatError(f"{source} holds no {peft_type} weights")
    base_shapes = _recorded_base_shapes(header, source)
    modules = {}
    for path, factors in by_path.items():
        # PEFT's LycorisConfig defaults are r = alpha = 8; without a config, alpha = rank (scaling 1)
        r = (rank_for(path, config) or LYCORIS_DEFAULT) if config else None
        alpha = alpha_for(path, LYCORIS_DEFAULT, config, field="alpha") if config else None
        modules[path] = lycoris_module(path, factors, peft_type, r, alpha, base_shapes.get(path), source)
    metadata = _peft_metadata(header, config)
    return LoRAWeights(modules, metadata=metadata)


def _recorded_base_shapes(header: Mapping[str, str], source: str) -> dict[str, tuple[int, ...]]:
    """The base weight shapes convlora recorded in a PEFT file's header (LoHa / LoKr folders it wrote)."""
    if BASE_SHAPES_KEY not in header:
        return {}
    try:
        shapes = json.loads(header[BASE_SHAPES_KEY])
        return {str(p): tuple(int(s) for s in shape) for p, shape in shapes.items()}
    except (ValueError, TypeError, AttributeError):
        raise LoRAFormatError(f"{source}: header entry {BASE_SHAPES_KEY} is not a JSON object of shapes") from None


def read_peft_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of a PEFT folder; it must describe a LoRA (DoRA), LoHa or LoKr adapter."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: no {ADAPTER_CONFIG}")
    config = peft_config_file(path)
    if config.get("peft_type", "LORA") not in ("LORA", "LOHA", "LOKR"):
        raise LoRAFormatError(
            f"{path}: peft_type is {config.get('peft_type')!r}; convlora reads LORA (with or without use_dora), "
            "LOHA and LOKR adapters"
        )
    if config.get("lora_bias"):
        raise LoRAFormatError(f"{path}: lora_bias is set; convlora reads LoRA adapters without LoRA biases")
    if config.get("use_effective_conv2d"):
        raise LoRAFormatError(f"{path}: use_effective_conv2d is set: PEFT's Tucker form of LoHa / LoKr convs, "
                              "which convlora does not have")
    return config


def write_peft_folder(
    weights: LoRAWeights,
    folder: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    fan_in_fan_out: bool = False,
) -> Path:
    """Write neutral (unprefixed, single-model) weights as a PEFT adapter folder: ``LoraConfig`` for LoRA,
    ``LoraConfig(use_dora=True)`` for DoRA, ``LoHaConfig`` / ``LoKrConfig`` for LoHa / LoKr
    (:mod:`convlora.formats.peft_kinds`).

    Modules recorded as grouped convs are written in PEFT's dense-A form (:func:`grouped_to_peft`).
    ``base_model_name_or_path`` and ``task_type`` come from the weights' metadata when they were read
    from a PEFT folder (:data:`CONFIG_METADATA_KEYS`); an explicit ``base_model_name_or_path`` wins.

    Raises:
        LoRAFormatError: kinds PEFT does not carry (LoHa / LoKr with DoRA) or several kinds in one adapter;
            modules recorded as dilated or non-zero-padded convs (PEFT runs those without it); what PEFT's
            DoRA / LoHa / LoKr would compute differently (named by
            :func:`convlora.formats.peft_kinds.lycoris_write_problems`). Nothing is written then.
    """
    check_kinds_for_format(weights.modules, "peft")
    labels = sorted({m.kind.label for m in weights.modules.values()})
    if len(labels) > 1:
        by_label = "; ".join(f"{label}: {', '.join(sorted(p for p, m in weights.modules.items() if m.kind.label == label)[:3])}"
                             for label in labels)
        raise LoRAFormatError(f"a PEFT adapter folder holds one adapter type (LoraConfig with use_dora for all modules "
                              f"or none, LoHaConfig or LoKrConfig); this adapter has {', '.join(labels)} ({by_label})")
    check_portable_geometry(weights, "PEFT", allow_groups=True)
    if labels[0] in ("lora", "dora"):
        tensors, config, header = *_lora_folder_parts(weights, fan_in_fan_out, labels[0] == "dora"), {}
    else:
        tensors, config = _lycoris_folder_parts(weights, labels[0], fan_in_fan_out)
        shapes = {p: list(m.base_shape) for p, m in sorted(weights.modules.items()) if m.base_shape is not None}
        header = {BASE_SHAPES_KEY: json.dumps(shapes, sort_keys=True)} if shapes else {}
    carried = {field: weights.metadata.get(key) for field, key in CONFIG_METADATA_KEYS.items()}
    if base_model_name_or_path is not None:
        carried["base_model_name_or_path"] = base_model_name_or_path
    config = {**carried, **config, "inference_mode": True, "modules_to_save": None}
    folder = Path(folder)
    user_metadata = {k: v for k, v in weights.metadata.items() if k not in CONFIG_METADATA_KEYS.values()}  # in the config
    write_safetensors(tensors, folder / ADAPTER_WEIGHTS, {"format": "pt", **user_metadata, **header})
    write_text_atomic(folder / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def _lora_folder_parts(weights: LoRAWeights, fan_in_fan_out: bool, use_dora: bool) -> tuple[dict, dict]:
    """Tensors and ``LoraConfig`` fields of a LoRA / DoRA folder."""
    grouped = dora_grouped_problems(weights.modules)
    if grouped:
        raise LoRAFormatError(f"cannot export to PEFT: its DoRA computes B.view(-1, R) @ A.view(R, -1) of the grouped "
                              f"lora_B it uses on grouped convs, which is not the LoRA update: {'; '.join(grouped)}. "
                              "Save them with format='native' (convlora.save_lora) instead.")
    modules = {
        path: grouped_to_peft(m, m.geometry["groups"], weights.use_rslora) if (m.geometry or {}).get("groups", 1) > 1 else m
        for path, m in weights.modules.items()
    }
    tensors = {}
    for path, module in modules.items():
        tensors[f"{KEY_PREFIX}{path}.lora_A.weight"] = module.lora_A
        tensors[f"{KEY_PREFIX}{path}.lora_B.weight"] = module.lora_B
        if use_dora:
            tensors[f"{KEY_PREFIX}{path}.{MAGNITUDE}"] = magnitude_to_peft(weights.modules[path])
    config = {
        "peft_type": "LORA",
        **lora_config_kwargs(modules, weights.use_rslora),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        **({"use_dora": True} if use_dora else {}),
    }
    return tensors, config


def _lycoris_folder_parts(weights: LoRAWeights, label: str, fan_in_fan_out: bool) -> tuple[dict, dict]:
    """Tensors and ``LoHaConfig`` / ``LoKrConfig`` fields of a LoHa / LoKr folder (no dropout, no Tucker
    cores: ``use_effective_conv2d=False``)."""
    modules = weights.modules
    problems = lycoris_write_problems(modules, weights.use_rslora, fan_in_fan_out)
    if problems:
        raise LoRAFormatError(f"cannot export to PEFT: its {label} would compute this adapter differently: "
                              f"{'; '.join(problems)}. Save it with format='native' (convlora.save_lora) instead.")
    extra: dict[str, Any] = {}
    if label == "lokr":
        factor, decompose_both, ranks = lokr_peft_ranks(modules, {p: lokr_base_shape(m, p) for p, m in modules.items()})
        extra = {"decompose_both": decompose_both, "decompose_factor": factor, "rank_dropout_scale": False}
    else:
        ranks = {p: m.r for p, m in modules.items()}
    tensors = {f"{KEY_PREFIX}{p}.{name}": t for p, m in modules.items() for name, t in m.factors.items()}
    config = {
        "peft_type": PEFT_TYPES[label],
        **lycoris_config(modules, ranks),
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "use_effective_conv2d": False,
        "init_weights": True,
        **extra,
    }
    return tensors, config


def save_peft_adapter(
    model: nn.Module,
    folder: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    metadata: Mapping[str, str] | None = None,
    adapter_name: str | None = None,
) -> Path:
    """Save one adapter of ``model`` (``None``: its only one) as a folder ``peft.PeftModel.from_pretrained(base, folder)`` loads.

    Convs with ``groups > 1`` are written in PEFT's dense-A form (:func:`grouped_to_peft`), which
    PEFT runs exactly (unmerged: PEFT cannot merge grouped convs).

    Raises:
        LoRAFormatError: conv LoRA with dilation or a non-zero padding mode (PEFT computes those
            differently); a model mixing GPT-2 ``Conv1D`` and other LoRA layers (PEFT's
            ``fan_in_fan_out`` is one flag); biases / ``modules_to_save`` in the adapter.
    """
    check_portable_geometry(model, "PEFT", allow_groups=True)
    layers = lora_layers(model)
    gpt2 = {isinstance(layer, GPT2Conv1D) for layer in layers.values()}
    if gpt2 == {True, False}:
        raise LoRAFormatError("PEFT's fan_in_fan_out is one flag per adapter: this model mixes GPT-2 Conv1D and other LoRA layers")
    weights = LoRAWeights(weights_from_model(model, adapter_name=adapter_name),
                          use_rslora=uses_rslora(model, adapter_name=adapter_name), metadata=dict(metadata or {}))
    return write_peft_folder(weights, folder, base_model_name_or_path, fan_in_fan_out=gpt2 == {True})


def load_peft_adapter(
    model: nn.Module, folder: str | os.PathLike, strict: bool = True, adapter_name: str | None = None
) -> list[str]:
    """Load a PEFT LoRA adapter folder into ``model`` as adapter ``adapter_name`` (see
    :func:`convlora.formats.weights.load_weights_into_model`; ``None``: the model's only adapter, or a
    new ``"default"`` one).

    LoRA on convs with ``groups > 1`` is taken back from PEFT's dense-A form (:func:`grouped_from_peft`).

    Returns:
        The module paths loaded.

    Raises:
        LoRAFormatError: as :func:`read_peft_folder`; LoRA on a conv with dilation or a non-zero
            padding mode (PEFT ran it without them, so it is another function there); grouped LoRA
            that mixes channels across groups. Nothing is injected or changed then.
        StateDictMismatchError: as :func:`convlora.formats.weights.load_weights_into_model`.
    """
    source = str(folder)
    weights = read_peft_folder(folder)
    resolved, _ = resolve_paths(list(weights.modules), model)
    named = dict(model.named_modules())
    problems = conv_geometry_problems({p: conv_geometry_record(named[t]) for p, t in resolved.items()}, allow_groups=True)
    if problems:
        raise LoRAFormatError(
            f"{source}: PEFT computes conv LoRA without dilation or non-zero padding modes, so on these layers the "
            f"adapter is not the function it was trained as: {'; '.join(problems)}"
        )
    return load_weights_into_model(
        model, weights.modules, weights.use_rslora, strict=strict, source=source, adapter_name=adapter_name
    )


def _number(value: float) -> int | float:
    """16.0 -> 16 (JSON configs read better, and PEFT accepts either)."""
    return int(value) if float(value).is_integer() else float(value)
