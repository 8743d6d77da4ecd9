"""LoRA on a whole Stable Diffusion (1.x/2.x or XL) pipeline: UNet and optionally its text encoders
(``text_encoder``, and SDXL's ``text_encoder_2``), saved as one file.

>>> cfg = unet_lora_config("full", rank=8, conv_rank=4)
>>> inject_pipeline_lora(pipe, unet_config=cfg)                          # doctest: +SKIP
>>> save_pipeline_lora("pytorch_lora_weights.safetensors", unet=pipe.unet)  # doctest: +SKIP
>>> pipe2.load_lora_weights("pytorch_lora_weights.safetensors")          # diffusers itself, same outputs
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from convlora.config import LoRAConfig
from convlora.diffusion.families import SD, SDXL, family_of_pipeline
from convlora.formats.ldm_names import LDMNames
from convlora.formats import FORMATS, LoRAFormatError, LoRAWeights, read_lora_file, write_lora_file
from convlora.formats.weights import (
    check_portable_geometry,
    load_weights_into_model,
    resolve_paths,
    uses_rslora,
    weights_from_model,
)
from convlora.header import user_metadata
from convlora.inject import inject_lora, unchanged_on_error
from convlora.layers import DEFAULT_ADAPTER

__all__ = [
    "TRAINING_METADATA",
    "build_pipeline_skeleton",
    "stored_dtypes",
    "inject_pipeline_lora",
    "load_pipeline_lora",
    "save_pipeline_lora",
]

_RESERVED_METADATA = ("format", "lora_adapter_metadata")

#: Plain header keys a training run writes (all values strings) and what they mean; ``convlora
#: inspect`` shows them first, in this order. ``convlora.training.metadata.training_metadata`` writes
#: them, plus kohya's ``ss_*`` spellings (``ss_sd_model_name``, ``ss_steps``, ...) that A1111 and
#: ComfyUI display.
TRAINING_METADATA: dict[str, str] = {
    "base_model": "pipeline folder or hub id the LoRA was trained on",
    "unet_preset": "convlora UNet preset: attn | attn-ff | full",
    "text_encoder_preset": "convlora text-encoder preset (attn | attn-mlp); absent if not trained",
    "rank": "rank of linear / 1x1-conv layers",
    "alpha": "alpha of linear / 1x1-conv layers",
    "conv_rank": "rank of 3x3 convs",
    "conv_alpha": "alpha of 3x3 convs",
    "steps": "optimizer steps trained",
    "epochs": "epochs started",
    "resolution": "training image side in pixels",
    "num_train_images": "number of training images",
    "train_data": "data folder or dataset name",
    "learning_rate": "peak learning rate",
    "train_batch_size": "batch size per device",
    "seed": "training seed",
    "mixed_precision": "no | fp16 | bf16",
    "trainer": "what wrote the file",
}


def inject_pipeline_lora(
    pipe: Any,
    unet_config: LoRAConfig | None = None,
    text_encoder_config: LoRAConfig | None = None,
    text_encoder_2_config: LoRAConfig | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
) -> dict[str, list[str]]:
    """Inject adapter ``adapter_name`` into ``pipe.unet`` and/or its text encoders (:func:`convlora.inject_lora`
    for each); returns the adapted paths per component.

    ``text_encoder_2_config`` is for SDXL's second encoder; ``None`` there with a
    ``text_encoder_config`` on an SDXL pipeline adapts both encoders with that config.

    Raises:
        ValueError: no config given, a config for an encoder the pipeline lacks, or what
            :func:`convlora.inject_lora` raises.
    """
    if text_encoder_2_config is None and getattr(pipe, "text_encoder_2", None) is not None:
        text_encoder_2_config = text_encoder_config
    configs = {"unet": unet_config, "text_encoder": text_encoder_config, "text_encoder_2": text_encoder_2_config}
    configs = {name: config for name, config in configs.items() if config is not None}
    if not configs:
        raise ValueError("give unet_config and/or text_encoder_config")
    missing = [name for name in configs if getattr(pipe, name, None) is None]
    if missing:
        raise ValueError(f"the pipeline has no {', '.join(missing)}")
    return {name: inject_lora(getattr(pipe, name), config, adapter_name) for name, config in configs.items()}


def save_pipeline_lora(
    path: str | os.PathLike,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    format: str = "diffusers",
    metadata: Mapping[str, str] | None = None,
    text_encoder_2: nn.Module | None = None,
    base_model_version: str | None = None,
    adapter_name: str | None = None,
) -> Path:
    """Save one adapter of a UNet and/or text encoder(s) as one file (``adapter_name``: ``None`` is each
    model's only adapter).

    Args:
        path: the ``.safetensors`` file to write (a folder gets diffusers' file name
            ``pytorch_lora_weights.safetensors`` inside it, for ``format="diffusers"``).
        format: ``"diffusers"`` (``StableDiffusionPipeline.load_lora_weights`` loads it),
            ``"kohya"`` (A1111 / ComfyUI, and diffusers too) or ``"native"`` (convlora's own file,
            modules prefixed ``unet.`` / ``text_encoder.``).
        metadata: string entries for the file header (e.g. ``base_model``, ``steps``; see README).
        text_encoder_2: SDXL's second text encoder (``text_encoder_2.`` keys; kohya ``lora_te2_``).
        base_model_version: kohya's ``ss_base_model_version``; ``None``: the family's
            (``sdxl_base_v1-0`` with an SDXL UNet or a second text encoder, else ``sd_v1``).

    Returns:
        The file written (atomically: a crash leaves no partial file).

    Raises:
        ValueError: no model given, a model without LoRA, bad metadata, an unknown format.
        LoRAFormatError: conv LoRA that diffusers / kohya loaders would compute differently
            (groups > 1, dilation, non-zero padding mode; use ``format="native"``).
    """
    if format not in FORMATS or format == "peft":
        raise ValueError(f"format must be 'diffusers', 'kohya' or 'native', got {format!r}")
    models = {name: m for name, m in (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2))
              if m is not None}
    if not models:
        raise ValueError("save_pipeline_lora needs unet= and/or text_encoder=")
    extra = _checked_metadata(metadata)
    modules = {}
    for name, model in models.items():
        if format != "native":
            check_portable_geometry(model, format)
        modules.update(weights_from_model(model, prefix=f"{name}.", adapter_name=adapter_name))
    weights = LoRAWeights(modules, use_rslora=uses_rslora(*models.values(), adapter_name=adapter_name), metadata=extra)
    if base_model_version is None:
        is_xl = text_encoder_2 is not None or (unet is not None and family_of_pipeline(unet) is SDXL)
        base_model_version = (SDXL if is_xl else SD).kohya_base_model_version
    ldm_names = None
    if format == "kohya" and base_model_version.startswith("sdxl") and unet is not None and hasattr(unet, "config"):
        ldm_names = LDMNames.from_config(unet.config)  # SDXL kohya files: LDM names in this UNet's layout
    return write_lora_file(weights, path, format, base_model_version=base_model_version, ldm_names=ldm_names)


def load_pipeline_lora(
    path: str | os.PathLike,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    strict: bool = True,
    text_encoder_2: nn.Module | None = None,
    adapter_name: str | None = None,
) -> dict[str, Any]:
    """Load a LoRA file of any format into a UNet and/or text encoder(s) (SDXL: ``text_encoder_2`` too)
    as adapter ``adapter_name``.

    The format is detected (convlora native, diffusers, kohya, PEFT folder). Each component goes
    through the one loader (:func:`convlora.loading.load_adapter`): a model without the adapter gets it
    added exactly as the file describes (paths, ranks, alphas); ``None`` names the model's only adapter
    (a new ``"default"`` one if it has none), and an existing adapter must sit on exactly the file's modules. A file for a single model (no ``unet.`` /
    ``text_encoder.`` prefixes) loads into the UNet, or the text encoder if its names fit only there.

    Returns:
        ``{"format": str, "metadata": dict[str, str], "unet": [paths], "text_encoder": [paths],
        "text_encoder_2": [paths]}``.

    Raises:
        LoRAFormatError: no LoRA keys; keys the format's reader does not understand; with ``strict``
            a component the file has but no model was given for, or modules the model lacks — all
            named. Nothing is changed in either model when it raises.
        StateDictMismatchError: rank / shape mismatches, or (strict) LoRA modules of the model that the
            file does not cover.
    """
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    if all(model is None for model in models.values()):
        raise ValueError("load_pipeline_lora needs unet= and/or text_encoder= (text_encoder_2=)")
    fmt, weights = read_lora_file(path, unet_config=getattr(unet, "config", None) if unet is not None else None)
    parts = _split_by_component(weights, models, path)
    absent = [name for name in parts if models.get(name) is None]
    if absent and strict:
        raise LoRAFormatError(
            f"{path} holds LoRA for {', '.join(absent)} ({sum(len(parts[a]) for a in absent)} modules) but no such "
            "model was given; pass it, or strict=False to skip it"
        )
    result: dict[str, Any] = {"format": fmt, "metadata": dict(weights.metadata), "unet": [], "text_encoder": [],
                              "text_encoder_2": []}
    with unchanged_on_error(*(models[name] for name in parts if models.get(name) is not None)):
        for name, modules in parts.items():
            if models.get(name) is not None:
                result[name] = load_weights_into_model(
                    models[name], modules, weights.use_rslora, strict=strict, source=f"{path} [{name}]",
                    adapter_name=adapter_name,
                )
    return result


def build_pipeline_skeleton(folder: str | os.PathLike) -> dict[str, nn.Module]:
    """The UNet and text encoder(s) of a diffusers pipeline folder, built from their configs on the
    ``meta`` device: module names and shapes without reading (or allocating) any weight.

    Returns:
        ``{"unet": model, "text_encoder": model, "text_encoder_2": model}`` for the components the
        folder has (SDXL pipelines have ``text_encoder_2``).

    Raises:
        FileNotFoundError: the folder has neither ``unet/config.json`` nor ``text_encoder/config.json``.
    """
    import json

    import diffusers
    import torch
    import transformers

    folder = Path(folder)
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    defaults = {"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    models: dict[str, nn.Module] = {}
    with torch.device("meta"):
        for name, default in defaults.items():
            if not (folder / name / "config.json").is_file():
                continue
            library, class_name = index.get(name) or default
            if library == "diffusers":
                cls = getattr(diffusers, class_name)
                models[name] = cls.from_config(cls.load_config(folder / name))
            else:
                cls = getattr(transformers, class_name)
                models[name] = cls(cls.config_class.from_pretrained(folder / name))
    if not models:
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no unet/ or text_encoder/ config.json)")
    return models


_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def stored_dtypes(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The dtype each floating tensor of each component is stored in: ``{"unet": {"conv_in.weight": torch.float16, ...}}``.

    Read from the safetensors headers of the component folders (no tensor is loaded); components
    without safetensors weights are left out.
    """
    import torch
    from safetensors import safe_open

    dtypes: dict[str, dict[str, Any]] = {}
    for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        for file in sorted(sub.glob("*.safetensors")):
            try:
                with safe_open(str(file), framework="pt") as f:
                    kinds = {k: f.get_slice(k).get_dtype() for k in f.keys()}
            except Exception as err:  # safetensors raises its own error kinds
                raise LoRAFormatError(f"{file} is not a readable safetensors file: {err}") from None
            found = {k: getattr(torch, _SAFETENSORS_DTYPES[v]) for k, v in kinds.items() if v in _SAFETENSORS_DTYPES}
            dtypes.setdefault(sub.name, {}).update(found)
    return dtypes


def _split_by_component(weights: LoRAWeights, models: Mapping[str, nn.Module | None], path) -> dict[str, dict]:
    stray = weights.unprefixed()
    if not stray:
        return {name: weights.component(name) for name in weights.components()}
    if weights.components():
        raise LoRAFormatError(
            f"{path} mixes paths with and without a pipeline component prefix (e.g. {stray[0]}); cannot tell them apart"
        )
    # A single-model file: the UNet, unless only the text encoder has these modules.
    if models.get("unet") is not None and not resolve_paths(stray, models["unet"])[1]:
        return {"unet": weights.modules}
    te = models.get("text_encoder")
    if te is not None and not resolve_paths(stray, te)[1]:
        return {"text_encoder": weights.modules}
    return {"unet" if models.get("unet") is not None else "text_encoder": weights.modules}


def _checked_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    return user_metadata(metadata, reserved=_RESERVED_METADATA)
