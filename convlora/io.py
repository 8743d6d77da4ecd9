"""Native adapter files: one ``.safetensors`` file, strict on load, never unpickled.

Header metadata (all strings, as safetensors requires):
    ``convlora_format``       ``"1"``
    ``convlora_config``       the LoRAConfig as JSON
    ``convlora_modules``      JSON ``{path: {"type", "r", "alpha", "base_shape"[, conv geometry][, "use_rslora"]}}``
                              (``use_rslora`` where a module's differs from the config's)
    ``convlora_fingerprint``  hash of the adapted paths and base weight shapes
plus any user metadata (e.g. the training script's base model, steps, resolution). Headers are
read and checked by :mod:`convlora.header`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from convlora import header as headers
from convlora.atomic import replace_folder, write_file_atomic
from convlora.config import LoRAConfig
from convlora.errors import LoRAFileError
from convlora.inject import (
    LayerSpec,
    apply_plan,
    get_config,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    temporarily_unmerged,
    unchanged_on_error,
)
from convlora.layers import LORA_CLASSES, conv_geometry_record
from convlora.state import check_finite, fingerprint

__all__ = ["LoRAFileError", "load_lora", "read_safetensors", "replace_folder", "save_lora", "write_safetensors"]

FORMAT_VERSION = "1"
RESERVED_KEYS = ("convlora_format", "convlora_config", "convlora_modules", "convlora_fingerprint")


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file atomically (:func:`convlora.atomic.write_file_atomic`).

    A crash or an error part-way leaves no file (or the previous file) at ``path``, never half of one.
    Non-finite tensors are refused before anything is written. A failed write (a full disk, which
    safetensors reports as its own ``SafetensorError``) is an ``OSError`` naming ``path``.
    """
    path = Path(path)
    check_finite(tensors, source=f"tensors for {path}")
    prepared = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def save(tmp: Path) -> None:
        try:
            save_file(prepared, tmp, metadata=dict(metadata) if metadata else None)
        except SafetensorError as err:
            raise OSError(f"could not write {path}: {err}") from err

    return write_file_atomic(path, save)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the header metadata of a safetensors file.

    Raises:
        FileNotFoundError: no such file.
        LoRAFileError: the file is a pickle/zip checkpoint (never unpickled), truncated, or otherwise
            not safetensors — the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header's "{". The length's
    # low byte may itself be 0x80 or "P", so only a file without that "{" can be a pickle / zip.
    is_safetensors_layout = head[8:9] == b"{"
    if not is_safetensors_layout and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise LoRAFileError(
            f"{path} is a pickled PyTorch checkpoint, not safetensors; convlora never unpickles files. "
            "Convert it with safetensors in an environment you trust."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError / OSError kinds
        raise LoRAFileError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    return tensors, metadata


def save_lora(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Save the adapter of ``model`` (tensors + config, per-module rank/alpha, base fingerprint).

    Args:
        metadata: extra string -> string entries for the header (keys may not start with ``convlora_``).

    Raises:
        ValueError: the model has no LoRA layers, an adapter tensor is non-finite, or ``metadata``
            uses a reserved key or a non-string value.
    """
    extra = headers.user_metadata(metadata)
    layers = lora_layers(model)
    tensors = lora_state_dict(model)
    config = get_config(model)
    header = {
        "convlora_format": FORMAT_VERSION,
        "convlora_modules": json.dumps(_module_table(layers, config), sort_keys=True),
        "convlora_fingerprint": fingerprint(_base_shapes(layers)),
        **extra,
    }
    if config is not None:
        header["convlora_config"] = config.to_json()
    return write_safetensors(tensors, path, header)


def load_lora(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> list[str]:
    """Load a native convlora file into ``model``.

    If ``model`` has no LoRA layers yet, they are injected first exactly as the file describes
    (paths, ranks, alphas). If it has, the file must describe the same adapted modules on the same
    base shapes (the fingerprint), unless ``strict=False``.

    Returns:
        The module paths that were loaded.

    Raises:
        FileNotFoundError / LoRAFileError: unreadable file, or not a convlora file.
        StateDictMismatchError: missing / unexpected / mis-shaped keys (named, with both shapes).
        ValueError: the file was made for a different base model (the differing modules are named).
        Nothing in ``model`` is changed when any of these is raised.
    """
    tensors, header = read_safetensors(path)
    table = headers.module_table(header, str(path))
    if table is None:
        raise LoRAFileError(
            f"{path} has no convlora header (keys like {sorted(tensors)[:2]}); if it is a diffusers, "
            "kohya or PEFT file, import it with `convlora convert` or convlora.formats"
        )
    config = headers.header_config(header, str(path))
    default_rslora = config.use_rslora if config is not None else False
    layers = lora_layers(model)
    with unchanged_on_error(model):
        if not layers:
            _check_base_fits(model, table, path)
            plan = {p: LayerSpec(m["r"], m["alpha"], m.get("use_rslora", default_rslora)) for p, m in table.items()}
            apply_plan(model, plan, config or _config_for_table(table))
            layers = lora_layers(model)
        elif strict:
            _check_fingerprint(layers, table, header, path)
        loaded = [p for p in table if p in layers]
        with temporarily_unmerged([layers[p] for p in loaded]):
            load_lora_state_dict(model, tensors, strict=strict, source=str(path))
            for p in loaded:  # the layer keeps its scaling from these two
                layers[p].lora_alpha = table[p]["alpha"]
                layers[p].use_rslora = table[p].get("use_rslora", default_rslora)
    return loaded


def _module_table(layers, config: LoRAConfig | None) -> dict[str, dict]:
    """Per module: kind, rank, alpha, base weight shape and, for convs, ``groups`` / ``dilation`` /
    ``padding_mode`` (so a file converted without its model can still be checked for export); plus
    ``use_rslora`` where the module's scaling rule differs from the config's (mixed adapters)."""
    default_rslora = config.use_rslora if config is not None else False
    return {
        path: {
            "type": type(layer).__name__,
            "r": layer.r,
            "alpha": layer.lora_alpha,
            "base_shape": list(layer.weight.shape),
            **(conv_geometry_record(layer) or {}),
            **({"use_rslora": layer.use_rslora} if layer.use_rslora != default_rslora else {}),
        }
        for path, layer in layers.items()
    }


def _base_shapes(layers) -> dict[str, tuple[int, ...]]:
    return {path: tuple(layer.weight.shape) for path, layer in layers.items()}


def _check_base_fits(model: nn.Module, table: Mapping[str, dict], path) -> None:
    modules = dict(model.named_modules())
    problems = []
    for module_path, entry in table.items():
        module = modules.get(module_path)
        if module is None:
            problems.append(f"{module_path}: no such module")
        elif type(module) not in LORA_CLASSES:
            problems.append(f"{module_path}: is a {type(module).__name__}, not a layer LoRA can wrap")
        elif list(module.weight.shape) != list(entry["base_shape"]):
            problems.append(f"{module_path}: base weight is {tuple(module.weight.shape)}, file was made for {tuple(entry['base_shape'])}")
    if problems:
        raise ValueError(f"{path} was made for a different base model: " + "; ".join(problems[:12]))


def _check_fingerprint(layers, table: Mapping[str, dict], header: Mapping[str, str], path) -> None:
    if fingerprint(_base_shapes(layers)) == header.get("convlora_fingerprint"):
        return
    problems = [f"{p}: in the file, not adapted in the model" for p in table if p not in layers]
    problems += [f"{p}: adapted in the model, not in the file" for p in layers if p not in table]
    problems += [
        f"{p}: base weight is {tuple(layers[p].weight.shape)}, file was made for {tuple(table[p]['base_shape'])}"
        for p in table
        if p in layers and list(layers[p].weight.shape) != list(table[p]["base_shape"])
    ]
    raise ValueError(
        f"{path} was made for a different base model (fingerprint mismatch): "
        + ("; ".join(problems[:12]) or "base shapes differ")
    )


def _config_for_table(table: Mapping[str, dict]) -> LoRAConfig:
    return LoRAConfig(r=max(m["r"] for m in table.values()), target_modules=sorted(table))
