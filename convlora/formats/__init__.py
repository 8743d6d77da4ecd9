"""LoRA file formats: convlora native, diffusers, kohya (A1111 / ComfyUI) and PEFT adapter folders.

Every format is read into one neutral :class:`LoRAWeights` (module path -> A, B, alpha in convlora's
layout) and written from it, so converting is read + write and every reader consumes every key
or raises naming the leftovers.

>>> from convlora.formats import read_lora_file, write_lora_file
>>> fmt, weights = read_lora_file("pytorch_lora_weights.safetensors")   # doctest: +SKIP
>>> write_lora_file(weights, "my_lora_kohya.safetensors", "kohya")      # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from convlora.formats.detect import FORMATS, detect_format, lora_file_of
from convlora.formats.diffusers import WEIGHT_NAME as DIFFUSERS_WEIGHT_NAME
from convlora.formats.diffusers import from_diffusers, to_diffusers
from convlora.formats.kohya import SDXL_BASE_MODEL_VERSION, SDXL_UNET_LAYOUT, from_kohya, to_kohya
from convlora.formats.ldm_names import LDMNames
from convlora.formats.native import from_native, to_native
from convlora.formats.peft import (
    from_peft,
    load_peft_adapter,
    read_peft_config,
    save_peft_adapter,
    write_peft_folder,
)
from convlora.formats.weights import (
    LoRAFormatError,
    LoRAModule,
    LoRAWeights,
    check_kinds_for_format,
    check_portable_geometry,
    load_weights_into_model,
    weights_from_model,
)
from convlora.io import read_safetensors, write_safetensors

__all__ = [
    "DIFFUSERS_WEIGHT_NAME",
    "FORMATS",
    "LoRAFormatError",
    "LoRAModule",
    "LoRAWeights",
    "convert_lora_file",
    "detect_format",
    "is_sdxl",
    "load_peft_adapter",
    "load_weights_into_model",
    "read_lora_file",
    "save_peft_adapter",
    "weights_for_format",
    "weights_from_model",
    "write_lora_file",
]

_READERS = {"native": from_native, "diffusers": from_diffusers, "kohya": from_kohya}


def read_lora_file(path: str | os.PathLike, unet_config: Mapping[str, object] | None = None) -> tuple[str, LoRAWeights]:
    """Read any supported LoRA file (or PEFT adapter folder) into neutral weights.

    ``unet_config`` (the base's UNet config) numbers LDM-named UNet modules of kohya files that
    record no layout (SDXL files from kohya's trainer); see :func:`convlora.formats.kohya.from_kohya`.

    Returns:
        ``(format, weights)`` with ``format`` one of :data:`FORMATS`.

    Raises:
        FileNotFoundError: nothing at ``path``.
        LoRAFormatError: no LoRA keys, or keys the detected format's reader cannot consume (named).
    """
    file, is_peft_folder = lora_file_of(path)
    tensors, header = read_safetensors(file)
    if is_peft_folder:
        return "peft", from_peft(tensors, header, read_peft_config(Path(path)), source=str(file))
    fmt = detect_format(tensors, header)
    if fmt == "peft":
        return fmt, from_peft(tensors, header, None, source=str(file))
    if fmt == "kohya":
        return fmt, from_kohya(tensors, header, source=str(file), unet_config=unet_config)
    return fmt, _READERS[fmt](tensors, header, source=str(file))


def is_sdxl(weights: LoRAWeights) -> bool:
    """Whether neutral weights adapt an SDXL pipeline, judged without the model: a second text
    encoder, metadata naming SDXL (``ss_base_model_version`` ``sdxl*``, ``model_family`` ``sdxl``),
    or UNet attentions more than one transformer block deep (SD-1.x/2.x UNets have exactly one)."""
    if "text_encoder_2" in weights.components():
        return True
    if str(weights.metadata.get("ss_base_model_version", "")).startswith("sdxl") or weights.metadata.get("model_family") == "sdxl":
        return True
    return any(".transformer_blocks." in p and p.split(".transformer_blocks.")[1].split(".")[0] != "0"
               for p in weights.component("unet"))


def write_lora_file(
    weights: LoRAWeights,
    path: str | os.PathLike,
    fmt: str,
    base_model_version: str | None = None,
    ldm_names: LDMNames | None = None,
    diffusers_names: bool = False,
) -> Path:
    """Write neutral weights as ``fmt``; returns the file (or, for PEFT, folder) written.

    For ``"diffusers"`` a folder path (or one without a suffix) gets diffusers' file name
    ``pytorch_lora_weights.safetensors`` inside it; ``"peft"`` always writes a folder.
    ``base_model_version`` is kohya's ``ss_base_model_version`` unless the metadata already has one;
    ``None``: ``sdxl_base_v1-0`` for SDXL weights (:func:`is_sdxl`), else ``sd_v1``.
    ``ldm_names`` (kohya only): name UNet modules by their LDM names in that layout (see
    :func:`convlora.formats.kohya.to_kohya`). SDXL kohya files get LDM names anyway (SDXL's
    standard layout when ``ldm_names`` is not given) unless ``diffusers_names``.

    Raises:
        LoRAFormatError: modules recorded as convs those formats' loaders would compute differently
            (dilation, non-zero padding modes; groups except for PEFT), named; nothing is written.
    """
    if ldm_names is not None and fmt != "kohya":
        raise ValueError(f"LDM module names are a kohya spelling; {fmt} files name modules by their diffusers paths")
    check_kinds_for_format(weights.modules, fmt)
    path = Path(path)
    if fmt == "peft":
        if weights.components():
            raise LoRAFormatError(
                "PEFT adapter folders hold one model; this adapter has pipeline components "
                f"{weights.components()} — use --to diffusers for pipelines"
            )
        return write_peft_folder(weights, path)
    if fmt in ("diffusers", "kohya"):
        check_portable_geometry(weights, fmt)
    if fmt == "diffusers":
        if path.is_dir() or not path.suffix:
            path = path / DIFFUSERS_WEIGHT_NAME
        tensors, header = to_diffusers(weights)
    elif fmt == "kohya":
        xl = str(base_model_version).startswith("sdxl") if base_model_version else is_sdxl(weights)
        version = base_model_version or (SDXL_BASE_MODEL_VERSION if xl else "sd_v1")
        if ldm_names is None and xl and not diffusers_names:
            ldm_names = LDMNames.from_config(SDXL_UNET_LAYOUT)
        tensors, header = to_kohya(weights, base_model_version=version, ldm_names=ldm_names)
    elif fmt == "native":
        tensors, header = to_native(weights)
    else:
        raise ValueError(f"unknown LoRA format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return write_safetensors(tensors, path, header)


def convert_lora_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    fmt: str,
    component: str | None = None,
    ldm_names: LDMNames | None = None,
    diffusers_names: bool = False,
) -> tuple[str, Path]:
    """Convert ``src`` (any format) to ``fmt`` at ``dst``.

    Args:
        component: for a single-model source (native ``save_lora`` / PEFT) going to diffusers or
            kohya, the pipeline component it adapts (``"unet"`` or ``"text_encoder"``); for a
            one-component pipeline file going to PEFT, ``None`` strips the prefix.
        ldm_names: kohya only: UNet modules by their LDM names in this layout.
        diffusers_names: kohya only: UNet modules by their diffusers paths even for SDXL.

    Returns:
        ``(source format, written path)``.
    """
    src_fmt, weights = read_lora_file(src)
    weights = weights_for_format(weights, fmt, component, source=str(src))
    return src_fmt, write_lora_file(weights, dst, fmt, ldm_names=ldm_names, diffusers_names=diffusers_names)


def weights_for_format(weights: LoRAWeights, fmt: str, component: str | None = None, source: str = "the adapter") -> LoRAWeights:
    """``weights`` with the paths ``fmt`` needs: diffusers / kohya name pipeline components, PEFT one model.

    Args:
        component: single-model weights going to diffusers / kohya: the component they adapt
            (``"unet"``, ``"text_encoder"``); pipeline weights going to PEFT: the one to keep
            (``None``: the only one there is).

    Raises:
        LoRAFormatError: no ``component`` where one is needed, naming ``source``.
    """
    if fmt in ("diffusers", "kohya") and weights.unprefixed():
        if component is None:
            raise LoRAFormatError(
                f"{source} adapts a single model; say which pipeline component it is (--component unet or text_encoder)"
            )
        return LoRAWeights({f"{component}.{p}": m for p, m in weights.modules.items()}, weights.use_rslora, weights.metadata)
    if fmt == "peft" and weights.components():
        names = weights.components()
        if len(names) != 1 and component is None:
            raise LoRAFormatError(f"{source} has components {names}; choose one with --component")
        return LoRAWeights(weights.component(component or names[0]), weights.use_rslora, weights.metadata)
    return weights
