"""Which LoRA format a file is, decided from its keys and header alone."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from convlora.formats.kohya import KOHYA_PREFIXES
from convlora.formats.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, KEY_PREFIX
from convlora.formats.weights import LoRAFormatError

FORMATS = ("native", "diffusers", "kohya", "peft")

_DIFFUSERS_MARKERS = (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", ".lora_linear_layer.", "_lora.down.", "_lora.up.")


def detect_format(keys: list[str] | Mapping[str, object], header: Mapping[str, str]) -> str:
    """``"native"``, ``"kohya"``, ``"peft"`` or ``"diffusers"`` for a safetensors file's keys and header.

    kohya when any key has the ``lora_unet_`` / ``lora_te*_`` spelling (the kohya importer then
    names keys that do not fit); PEFT when keys start ``base_model.model.``.

    Raises:
        LoRAFormatError: no key looks like LoRA (the first few keys are named).
    """
    keys = list(keys)
    if "convlora_modules" in header:
        return "native"
    if any(k.startswith(KOHYA_PREFIXES) or ".lora_down." in k for k in keys):
        return "kohya"
    if keys and all(k.startswith(KEY_PREFIX) for k in keys):
        return "peft"
    if any(marker in k for k in keys for marker in _DIFFUSERS_MARKERS):
        return "diffusers"
    shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
    raise LoRAFormatError(
        f"no LoRA keys found ({len(keys)} key(s): {shown or 'none'}); expected convlora (<path>.lora_A), "
        "diffusers (unet.<path>.lora_A.weight), kohya (lora_unet_<name>.lora_down.weight) or PEFT "
        "(base_model.model.<path>.lora_A.weight)"
    )


def lora_file_of(path: str | os.PathLike) -> tuple[Path, bool]:
    """The safetensors file behind ``path`` and whether it is a PEFT folder.

    A folder is a PEFT adapter (``adapter_config.json``) or holds exactly one ``*.safetensors``
    file (e.g. diffusers' ``pytorch_lora_weights.safetensors``).
    """
    path = Path(path)
    if not path.is_dir():
        if not path.exists():
            raise FileNotFoundError(f"LoRA file not found: {path}")
        return path, False
    if (path / ADAPTER_CONFIG).is_file():
        return path / ADAPTER_WEIGHTS, True
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise LoRAFormatError(
            f"{path} is a folder with {len(files)} .safetensors files and no {ADAPTER_CONFIG}; name the LoRA file itself"
        )
    return files[0], False
