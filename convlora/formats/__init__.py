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
from pathlib import Path

from convlora.formats.detect import FORMATS, detect_format, lora_file_of
from convlora.formats.diffusers import WEIGHT_NAME as DIFFUSERS_WEIGHT_NAME
from convlora.formats.diffusers import from_diffusers, to_diffusers
from convlora.formats.kohya import from_kohya, to_kohya
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
    "load_peft_adapter",
    "load_weights_into_model",
    "read_lora_file",
    "save_peft_adapter",
    "weights_from_model",
    "write_lora_file",
]

_READERS = {"native": from_native, "diffusers": from_diffusers, "kohya": from_kohya}


def read_lora_file(path: str | os.PathLike) -> tuple[str, LoRAWeights]:
    """Read any supported LoRA file (or PEFT adapter folder) into neutral weights.

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
    return fmt, _READERS[fmt](tensors, header, source=str(file))


def write_lora_file(
    weights: LoRAWeights, path: str | os.PathLike, fmt: str, base_model_version: str = "sd_v1", ldm_names: LDMNames | None = None
) -> Path:
    """Write neutral weights as ``fmt``; returns the file (or, for PEFT, folder) written.

    For ``"diffusers"`` a folder path (or one without a suffix) gets diffusers' file name
    ``pytorch_lora_weights.safetensors`` inside it; ``"peft"`` always writes a folder.
    ``base_model_version`` is kohya's ``ss_base_model_version`` unless the metadata already has one.
    ``ldm_names`` (kohya only): name UNet modules by their LDM names in that layout (see
    :func:`convlora.formats.kohya.to_kohya`).

    Raises:
        LoRAFormatError: modules recorded as convs those formats' loaders would compute differently
            (dilation, non-zero padding modes; groups except for PEFT), named; nothing is written.
    """
    if ldm_names is not None and fmt != "kohya":
        raise ValueError(f"LDM module names are a kohya spelling; {fmt} files name modules by their diffusers paths")
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
        tensors, header = to_kohya(weights, base_model_version=base_model_version, ldm_names=ldm_names)
    elif fmt == "native":
        tensors, header = to_native(weights)
    else:
        raise ValueError(f"unknown LoRA format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return write_safetensors(tensors, path, header)


def convert_lora_file(
    src: str | os.PathLike, dst: str | os.PathLike, fmt: str, component: str | None = None, ldm_names: LDMNames | None = None
) -> tuple[str, Path]:
    """Convert ``src`` (any format) to ``fmt`` at ``dst``.

    Args:
        component: for a single-model source (native ``save_lora`` / PEFT) going to diffusers or
            kohya, the pipeline component it adapts (``"unet"`` or ``"text_encoder"``); for a
            one-component pipeline file going to PEFT, ``None`` strips the prefix.
        ldm_names: kohya only: UNet modules by their LDM names in this layout.

    Returns:
        ``(source format, written path)``.
    """
    src_fmt, weights = read_lora_file(src)
    if fmt in ("diffusers", "kohya") and weights.unprefixed():
        if component is None:
            raise LoRAFormatError(
                f"{src} adapts a single model; say which pipeline component it is (--component unet or text_encoder)"
            )
        weights = LoRAWeights(
            {f"{component}.{p}": m for p, m in weights.modules.items()}, weights.use_rslora, weights.metadata
        )
    elif fmt == "peft" and weights.components():
        names = weights.components()
        if len(names) != 1 and component is None:
            raise LoRAFormatError(f"{src} has components {names}; choose one with --component")
        weights = LoRAWeights(weights.component(component or names[0]), weights.use_rslora, weights.metadata)
    return src_fmt, write_lora_file(weights, dst, fmt, ldm_names=ldm_names)
