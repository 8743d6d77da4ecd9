"""Native adapter files: one ``.safetensors`` file, strict on load, never unpickled.

Header metadata (all strings, as safetensors requires):
    ``convlora_format``       ``"1"``
    ``convlora_config``       the LoRAConfig as JSON
    ``convlora_modules``      JSON ``{path: {"type", "r", "alpha", "base_shape"[, conv geometry][, "use_rslora"][, "kind"]}}``
                              (``use_rslora`` where a module's differs from the config's; ``kind`` for
                              adapters other than plain LoRA: ``dora``, ``loha``, ``lokr``, ``loha+dora``, ``lokr+dora``)
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
from convlora.inject import get_config, list_adapters, lora_layers, lora_state_dict, resolve_adapter_name, unchanged_on_error
from convlora.kinds import kind_from_label
from convlora.layers import CONV_GEOMETRY_KEYS, conv_geometry_record
from convlora.loading import AdapterLoad, ModuleLoad, load_adapter
from convlora.quant import frozen_weight
from convlora.state import check_finite, fingerprint

__all__ = [
    "LoRAFileError",
    "load_all_adapters",
    "load_lora",
    "read_safetensors",
    "replace_folder",
    "save_all_adapters",
    "save_lora",
    "write_safetensors",
]

FORMAT_VERSION = "1"
RESERVED_KEYS = ("convlora_format", "convlora_config", "convlora_modules", "convlora_fingerprint")
#: The file name of each adapter in a :func:`save_all_adapters` folder: ``<adapter name>.safetensors``.
ADAPTER_SUFFIX = ".safetensors"


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


def save_lora(
    model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None, adapter_name: str | None = None
) -> Path:
    """Save one adapter of ``model`` (tensors + config, per-module rank/alpha, base fingerprint).

    Args:
        metadata: extra string -> string entries for the header (keys may not start with ``convlora_``).
        adapter_name: the adapter to save; ``None``: the model's only adapter.

    Raises:
        ValueError: the model has no LoRA layers, several adapters and none named, an unknown name, an
            adapter tensor is non-finite, or ``metadata`` uses a reserved key or a non-string value.
    """
    extra = headers.user_metadata(metadata)
    name = resolve_adapter_name(model, adapter_name)
    adapters = {p: layer.lora_adapters[name] for p, layer in lora_layers(model).items() if name in layer.lora_adapters}
    layers = {p: layer for p, layer in lora_layers(model).items() if p in adapters}
    tensors = lora_state_dict(model, adapter_name=name)
    config = get_config(model, name)
    header = {
        "convlora_format": FORMAT_VERSION,
        "convlora_modules": json.dumps(_module_table(layers, adapters, config), sort_keys=True),
        "convlora_fingerprint": fingerprint(_base_shapes(layers)),
        **extra,
    }
    if config is not None:
        header["convlora_config"] = config.to_json()
    return write_safetensors(tensors, path, header)


def save_all_adapters(model: nn.Module, folder: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Save every adapter of ``model`` as ``<folder>/<adapter name>.safetensors`` (each a :func:`save_lora` file).

    The folder is written atomically (:func:`convlora.atomic.replace_folder`): a failure leaves the
    previous folder, never some of the files. :func:`load_all_adapters` reads it back.

    Returns:
        ``folder``.
    """
    names = list_adapters(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to save")

    def write(tmp: Path) -> None:
        for name in names:
            save_lora(model, tmp / f"{name}{ADAPTER_SUFFIX}", metadata, adapter_name=name)

    return replace_folder(folder, write)


def load_all_adapters(model: nn.Module, folder: str | os.PathLike, strict: bool = True) -> list[str]:
    """Load every ``<name>.safetensors`` of ``folder`` (as :func:`save_all_adapters` writes it) as adapter
    ``name``, all or nothing; returns the adapter names, in file-name order.

    Raises:
        FileNotFoundError: no such folder, or no ``.safetensors`` file in it.
        What :func:`load_lora` raises for any file (nothing in ``model`` is changed then).
    """
    folder = Path(folder)
    files = sorted(folder.glob(f"*{ADAPTER_SUFFIX}")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no adapter files (*{ADAPTER_SUFFIX}) in {folder}")
    with unchanged_on_error(model):
        for file in files:
            load_lora(model, file, strict=strict, adapter_name=file.name[: -len(ADAPTER_SUFFIX)])
    return [file.name[: -len(ADAPTER_SUFFIX)] for file in files]


def load_lora(model: nn.Module, path: str | os.PathLike, strict: bool = True, adapter_name: str | None = None) -> list[str]:
    """Load a native convlora file into ``model`` (through :func:`convlora.loading.load_adapter`).

    The adapter it loads into: ``adapter_name`` (added if the model does not have it yet, exactly as
    the file describes: paths, ranks, alphas, rsLoRA); ``None``: the model's only adapter, or a new
    ``"default"`` one if it has none. Into an existing adapter the file must describe the same adapted
    modules on the same base shapes (the fingerprint), unless ``strict=False``.

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
    modules = {
        p: ModuleLoad(
            m["r"], m["alpha"], m.get("use_rslora", default_rslora),
            geometry={k: m[k] for k in CONV_GEOMETRY_KEYS if k in m} or None, base_shape=tuple(m["base_shape"]),
            kind=kind_from_label(m.get("kind", "lora")),
        )
        for p, m in table.items()
    }
    load = AdapterLoad(modules, tensors, str(path), config=config or _config_for_table(table), bias=None,
                       fingerprint=header.get("convlora_fingerprint"))
    return load_adapter(model, load, adapter_name=adapter_name, strict=strict)


def _module_table(layers, adapters, config: LoRAConfig | None) -> dict[str, dict]:
    """Per module: kind, rank, alpha, base weight shape and, for convs, ``groups`` / ``dilation`` /
    ``padding_mode`` (so a file converted without its model can still be checked for export); plus
    ``use_rslora`` where the module's scaling rule differs from the config's (mixed adapters)."""
    default_rslora = config.use_rslora if config is not None else False
    return {
        path: {
            "type": type(layer).__name__,
            "r": adapters[path].r,
            "alpha": adapters[path].lora_alpha,
            "base_shape": list(frozen_weight(layer).shape),
            **(conv_geometry_record(layer) or {}),
            **({"use_rslora": adapters[path].use_rslora} if adapters[path].use_rslora != default_rslora else {}),
            **({"kind": adapters[path].kind.label} if not adapters[path].is_plain_lora else {}),
        }
        for path, layer in layers.items()
    }


def _base_shapes(layers) -> dict[str, tuple[int, ...]]:
    return {path: tuple(frozen_weight(layer).shape) for path, layer in layers.items()}


def _config_for_table(table: Mapping[str, dict]) -> LoRAConfig:
    return LoRAConfig(r=max(m["r"] for m in table.values()), target_modules=sorted(table))
