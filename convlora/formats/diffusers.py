"""diffusers LoRA files: ``pytorch_lora_weights.safetensors`` with PEFT-style keys.

Keys: ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` and ``text_encoder.<path>...``. Rank comes
from the tensor shapes; alpha (and rsLoRA) from the JSON header entry ``lora_adapter_metadata``,
which diffusers turns into each component's ``peft.LoraConfig``:
``{"unet.r": 8, "unet.lora_alpha": 16, "unet.alpha_pattern": {...}, "text_encoder.r": ...}``.
Without that entry diffusers uses ``alpha = rank`` for every module.

Text-encoder paths are written in the nested CLIP spelling (``text_model.encoder.layers.0...``):
diffusers 0.42 strips ``text_model.`` for transformers-5 models that are flattened, older versions
and ComfyUI expect it. The LoraConfig in the header names the modules without it, which PEFT
matches as a suffix either way.

DoRA modules add ``<key>.lora_magnitude_vector`` in PEFT's layout (``(out,)``, ``(1, out, 1, 1)`` for
convs) and ``"<component>.use_dora": true`` to the header's config, which diffusers hands to
``peft.LoraConfig`` (``utils/peft_utils.py``: ``_create_lora_config``; without the header entry
``get_peft_kwargs`` sets ``use_dora`` when a key holds ``lora_magnitude_vector``). ``use_dora`` is one flag
per component, so a component is all DoRA or none. Text-encoder magnitudes are written as
``<key>.lora_magnitude_vector.weight``: diffusers loads text encoders through transformers'
``load_adapter``, whose key renaming (``peft/utils/transformers_weight_conversion.py``:
``build_peft_weight_mapping``) puts the adapter name after the ``lora_*`` segment, so only that spelling
lands on the parameter ``lora_magnitude_vector.<adapter>.weight`` (without ``.weight`` the magnitude is
reported unexpected and left at its initial value). Reading accepts both spellings. LoHa and LoKr are not written: diffusers' SD-1.x /
SDXL ``load_lora_weights`` (``loaders/lora_pipeline.py``) refuses any key without ``"lora"`` in it,
which their ``hada_*`` / ``lokr_*`` keys are (:data:`convlora.formats.weights.FORMAT_KIND_LIMITS`).

Reading also accepts diffusers' older spellings (``.lora.down.weight`` / ``.lora.up.weight``,
``.lora_linear_layer.down.weight``, ``.processor.to_q_lora.down.weight``) and ``<path>.alpha``
tensors as some tools write them; anything else is named in an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping

import torch

from convlora import header as headers
from convlora.formats.pairing import pair_modules, raise_on_leftovers, split_lora_keys
from convlora.formats.peft import alpha_for, lora_config_kwargs
from convlora.formats.peft_kinds import MAGNITUDE, magnitude_from_peft, magnitude_to_peft
from convlora.formats.weights import COMPONENTS, LoRAFormatError, LoRAModule, LoRAWeights, nested_clip_path
from convlora.kinds import AdapterKind

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"

_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora.down.weight": "A",
    ".lora.up.weight": "B",
    ".lora_linear_layer.down.weight": "A",
    ".lora_linear_layer.up.weight": "B",
    ".alpha": "alpha",
    f".{MAGNITUDE}": "magnitude",
    f".{MAGNITUDE}.weight": "magnitude",
}
# diffusers' attention-processor era: "...attn1.processor.to_out_lora.down.weight"
_PROCESSOR_KEY = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def to_diffusers(weights: LoRAWeights) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header of a diffusers LoRA file.

    Raises:
        LoRAFormatError: a path without a ``unet.`` / ``text_encoder.`` component prefix.
    """
    stray = weights.unprefixed()
    if stray:
        raise LoRAFormatError(
            "a diffusers LoRA file names each module by its pipeline component (unet., text_encoder.); "
            f"these paths have none: {', '.join(stray[:6])}"
        )
    tensors: dict[str, torch.Tensor] = {}
    adapter_metadata: dict[str, object] = {}
    for component in weights.components():
        modules = weights.component(component)
        use_dora = _component_uses_dora(component, modules)
        is_text = component.startswith("text_encoder")
        for path, module in modules.items():
            key = f"{component}.{nested_clip_path(path) if is_text else path}"
            tensors[f"{key}.lora_A.weight"] = module.lora_A
            tensors[f"{key}.lora_B.weight"] = module.lora_B
            if use_dora:
                tensors[f"{key}.{MAGNITUDE}{magnitude_suffix(component)}"] = magnitude_to_peft(module)
        # PEFT matches config names as path suffixes: the flattened CLIP name fits both spellings.
        names = {_flat_clip_path(p) if is_text else p: m for p, m in modules.items()}
        fields = {**lora_config_kwargs(names, weights.use_rslora), **({"use_dora": True} if use_dora else {})}
        for field, value in fields.items():
            adapter_metadata[f"{component}.{field}"] = value
    header = {"format": "pt", METADATA_KEY: json.dumps(adapter_metadata, indent=2, sort_keys=True), **weights.metadata}
    return tensors, header


def magnitude_suffix(component: str) -> str:
    """What follows ``lora_magnitude_vector`` in the key of a component's DoRA magnitude: ``.weight`` for
    text encoders (transformers' ``load_adapter``, see the module docstring), nothing for the UNet (whose
    ``set_peft_model_state_dict`` loads both spellings; tests/formats/test_doctor_kinds.py measures it)."""
    return ".weight" if component.startswith("text_encoder") else ""


def ignored_magnitude_keys(keys: Iterable[str]) -> list[str]:
    """The DoRA magnitude keys diffusers' ``load_lora_weights`` silently leaves unused: a text encoder's
    ``<key>.lora_magnitude_vector`` without ``.weight`` (the magnitude stays at PEFT's initial value)."""
    return sorted(k for k in keys if k.startswith("text_encoder") and k.endswith(f".{MAGNITUDE}"))


def from_diffusers(tensors: Mapping[str, torch.Tensor], header: Mapping[str, str], source: str = "file") -> LoRAWeights:
    """Neutral weights from a diffusers LoRA file (every key consumed, or an error naming the rest).

    Paths keep their component prefix (``unet.``, ``text_encoder.``); a file written for a single
    model (``unet.save_lora_adapter``) has none.
    """
    renamed = {}
    for key, tensor in tensors.items():
        match = _PROCESSOR_KEY.search(key)
        if match:
            target = "to_out.0" if match.group(1) == "to_out" else match.group(1)
            new_key = f"{key[: match.start()]}.{target}.lora.{match.group(2)}.weight"
            if new_key in tensors:
                raise LoRAFormatError(f"{source}: {key} and {new_key} are the same module's LoRA, twice")
            key = new_key
        renamed[key] = tensor
    groups, leftovers = split_lora_keys(renamed, _SUFFIXES, source)
    raise_on_leftovers(leftovers, source, " (convlora imports LoRA and DoRA from diffusers files: no LoRA bias or LoKr)")
    configs = headers.adapter_metadata(header, METADATA_KEY, COMPONENTS, source)

    def alpha_of(path: str, rank: int, group) -> float:
        if "alpha" in group:
            return headers.tensor_alpha(group["alpha"], f"{path}.alpha", source)
        component = next((c for c in COMPONENTS if path.startswith(c + ".")), "")
        name = path[len(component) + 1 :] if component else path
        if component.startswith("text_encoder"):
            name = _flat_clip_path(name)
        return alpha_for(name, rank, configs.get(component))

    modules = pair_modules(groups, alpha_of, source)
    if not modules:
        raise LoRAFormatError(f"{source} holds no LoRA weights")
    _attach_magnitudes(modules, groups, configs, source)
    rslora = {bool(c.get("use_rslora", False)) for c in configs.values()}
    if len(rslora) > 1:
        raise LoRAFormatError(f"{source}: components disagree on use_rslora; convlora loads one kind per file")
    metadata = {k: v for k, v in header.items() if k not in ("format", METADATA_KEY)}
    return LoRAWeights(modules, use_rslora=rslora == {True}, metadata=metadata)


def _flat_clip_path(path: str) -> str:
    return path[len("text_model.") :] if path.startswith("text_model.") else path


def _component_uses_dora(component: str, modules: Mapping[str, LoRAModule]) -> bool:
    """Whether a component's modules are DoRA: all or none (its ``LoraConfig`` has one ``use_dora``)."""
    dora = sorted(p for p, m in modules.items() if m.kind.use_dora)
    if dora and len(dora) != len(modules):
        plain = sorted(set(modules) - set(dora))
        raise LoRAFormatError(
            f"diffusers gives each pipeline component one LoraConfig, so {component} must be all DoRA or all plain "
            f"LoRA; it has DoRA on {', '.join(dora[:3])} and plain LoRA on {', '.join(plain[:3])}"
        )
    return bool(dora)


def _attach_magnitudes(modules: dict[str, LoRAModule], groups, configs: Mapping[str, Mapping], source: str) -> None:
    """DoRA modules: ``lora_magnitude_vector`` as ``magnitude (out,)``; per component all or none, and as
    the header's ``use_dora`` says when it says."""
    for component in {next((c for c in COMPONENTS if p.startswith(c + ".")), "") for p in modules}:
        paths = [p for p in modules if (p.startswith(component + ".") if component else not p.startswith(
            tuple(c + "." for c in COMPONENTS)))]
        with_magnitude = [p for p in paths if "magnitude" in groups[p]]
        said = (configs.get(component) or {}).get("use_dora")
        if not with_magnitude and not said:
            continue
        if len(with_magnitude) != len(paths) or said is False:
            shown = ", ".join(f"{p}.{MAGNITUDE}" for p in sorted(with_magnitude)[:3])
            raise LoRAFormatError(
                f"{source}: {component or 'the model'} has a {MAGNITUDE} on {len(with_magnitude)} of {len(paths)} "
                f"modules{f' ({shown})' if shown else ''}{' and use_dora false in its header' if said is False else ''}; "
                "DoRA is one flag per component"
            )
        for path in paths:
            key = f"{path}.{MAGNITUDE}"
            modules[path].factors = {"magnitude": magnitude_from_peft(groups[path]["magnitude"], modules[path].lora_B, key, source)}
            modules[path].kind = AdapterKind("lora", use_dora=True)
