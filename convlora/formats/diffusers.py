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

Reading also accepts diffusers' older spellings (``.lora.down.weight`` / ``.lora.up.weight``,
``.lora_linear_layer.down.weight``, ``.processor.to_q_lora.down.weight``) and ``<path>.alpha``
tensors as some tools write them; anything else is named in an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import torch

from convlora import header as headers
from convlora.formats.pairing import pair_modules, raise_on_leftovers, split_lora_keys
from convlora.formats.peft import alpha_for, lora_config_kwargs
from convlora.formats.weights import COMPONENTS, LoRAFormatError, LoRAWeights, nested_clip_path

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
        is_text = component.startswith("text_encoder")
        for path, module in modules.items():
            key = f"{component}.{nested_clip_path(path) if is_text else path}"
            tensors[f"{key}.lora_A.weight"] = module.lora_A
            tensors[f"{key}.lora_B.weight"] = module.lora_B
        # PEFT matches config names as path suffixes: the flattened CLIP name fits both spellings.
        names = {_flat_clip_path(p) if is_text else p: m for p, m in modules.items()}
        for field, value in lora_config_kwargs(names, weights.use_rslora).items():
            adapter_metadata[f"{component}.{field}"] = value
    header = {"format": "pt", METADATA_KEY: json.dumps(adapter_metadata, indent=2, sort_keys=True), **weights.metadata}
    return tensors, header


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
    raise_on_leftovers(leftovers, source, " (convlora imports plain LoRA: no DoRA, LoRA bias or LoKr)")
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
    rslora = {bool(c.get("use_rslora", False)) for c in configs.values()}
    if len(rslora) > 1:
        raise LoRAFormatError(f"{source}: components disagree on use_rslora; convlora loads one kind per file")
    metadata = {k: v for k, v in header.items() if k not in ("format", METADATA_KEY)}
    return LoRAWeights(modules, use_rslora=rslora == {True}, metadata=metadata)


def _flat_clip_path(path: str) -> str:
    return path[len("text_model.") :] if path.startswith("text_model.") else path
