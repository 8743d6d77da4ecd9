"""The one reader of LoRA file headers: every JSON entry a loader uses is parsed and checked here.

safetensors headers are string -> string maps; convlora, diffusers and PEFT keep JSON inside some
entries (``convlora_modules``, ``convlora_config``, ``lora_adapter_metadata``; PEFT's
``adapter_config.json`` beside the weights) and kohya keeps each module's alpha in a tensor. A
malformed entry (a list where a dict belongs, ``null``, a missing ``alpha``, an invalid regex, an
alpha of NaN / 0 / -1, a two-element ``.alpha``) is a :class:`~convlora.errors.LoRAFileError` that
names the file, the entry and what was expected — raised before anything is written to a model.

Every format reads through these functions; nothing else calls ``json.loads`` on a header.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from convlora.config import LoRAConfig
from convlora.errors import LoRAFileError
from convlora.kinds import kind_from_label
from convlora.state import checked_alpha, checked_rank

MODULES_KEY = "convlora_modules"
CONFIG_KEY = "convlora_config"
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}


# ---- generic JSON entries --------------------------------------------------------------------------
def json_entry(header: Mapping[str, str], key: str, source: str) -> dict[str, Any] | None:
    """The JSON object in header entry ``key``, or ``None`` when the entry is absent.

    Raises:
        LoRAFileError: the entry is not valid JSON, or is JSON but not an object (a list, a number, null).
    """
    if key not in header:
        return None
    return parse_json_object(header[key], f"{source}: header entry {key!r}")


def parse_json_object(text: object, what: str) -> dict[str, Any]:
    """``text`` parsed as a JSON object (``what`` names it in errors)."""
    if not isinstance(text, str):
        raise LoRAFileError(f"{what} must be a JSON string, got {type(text).__name__}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise LoRAFileError(f"{what} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise LoRAFileError(f"{what} must be a JSON object, got {_json_type(value)}")
    return value


def _json_type(value: object) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"a number ({value!r})"
    return f"a JSON {_JSON_TYPE_NAMES.get(type(value), type(value).__name__)}"


def _checked(check: Callable[[Any, str], Any], value: Any, what: str) -> Any:
    """``check(value, what)`` with its ValueError turned into a LoRAFileError (a file is to blame)."""
    try:
        return check(value, what)
    except ValueError as err:
        raise LoRAFileError(str(err)) from None


# ---- convlora's own entries ------------------------------------------------------------------------
def module_table(header: Mapping[str, str], source: str) -> dict[str, dict[str, Any]] | None:
    """``convlora_modules``, checked entry by entry; ``None`` when the file has no such entry.

    Each entry is ``{"type": str, "r": int >= 1, "alpha": finite > 0, "base_shape": [int >= 1, ...]}``,
    optionally with a conv's ``groups`` / ``dilation`` / ``padding_mode`` and the module's own
    ``use_rslora`` (written where it differs from the file's config).

    Raises:
        LoRAFileError: naming the module and the field that is missing or wrong.
    """
    table = json_entry(header, MODULES_KEY, source)
    if table is None:
        return None
    if not table:
        raise LoRAFileError(f"{source}: header entry {MODULES_KEY!r} names no module")
    return {path: _module_entry(path, entry, f"{source}: {MODULES_KEY}[{path!r}]") for path, entry in table.items()}


def _module_entry(path: str, entry: object, where: str) -> dict[str, Any]:
    if not path:
        raise LoRAFileError(f"{where}: a module path may not be empty")
    if not isinstance(entry, dict):
        raise LoRAFileError(f"{where} must be a JSON object, got {_json_type(entry)}")
    missing = [k for k in ("r", "alpha", "base_shape") if k not in entry]
    if missing:
        raise LoRAFileError(f"{where} has no {', '.join(missing)}")
    checked = dict(entry)
    checked["r"] = _checked(checked_rank, entry["r"], f"{where}.r")
    checked["alpha"] = _checked(checked_alpha, entry["alpha"], f"{where}.alpha")
    checked["base_shape"] = _int_list(entry["base_shape"], f"{where}.base_shape")
    if "type" in entry and not isinstance(entry["type"], str):
        raise LoRAFileError(f"{where}.type must be a string, got {entry['type']!r}")
    if "groups" in entry:
        checked["groups"] = _checked(checked_rank, entry["groups"], f"{where}.groups")
    if "dilation" in entry:
        checked["dilation"] = _int_list(entry["dilation"], f"{where}.dilation")
    if "padding_mode" in entry and entry["padding_mode"] not in PADDING_MODES:
        raise LoRAFileError(f"{where}.padding_mode must be one of {PADDING_MODES}, got {entry['padding_mode']!r}")
    if "use_rslora" in entry and not isinstance(entry["use_rslora"], bool):
        raise LoRAFileError(f"{where}.use_rslora must be true or false, got {entry['use_rslora']!r}")
    if "kind" in entry:
        try:
            kind_from_label(entry["kind"] if isinstance(entry["kind"], str) else repr(entry["kind"]))
        except ValueError as err:
            raise LoRAFileError(f"{where}.kind: {err}") from None
    return checked


def _int_list(value: object, what: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise LoRAFileError(f"{what} must be a non-empty list of integers >= 1, got {value!r}")
    return [_checked(checked_rank, v, f"{what} element") for v in value]


def header_config(header: Mapping[str, str], source: str) -> LoRAConfig | None:
    """The ``convlora_config`` entry as a validated LoRAConfig; ``None`` when absent.

    Raises:
        LoRAFileError: not a JSON object, unknown fields, or values LoRAConfig refuses (named).
    """
    data = json_entry(header, CONFIG_KEY, source)
    if data is None:
        return None
    try:
        return LoRAConfig.from_dict(data)
    except ValueError as err:
        raise LoRAFileError(f"{source}: header entry {CONFIG_KEY!r} is not a valid LoRAConfig: {err}") from None


def user_metadata(metadata: object, reserved_prefix: str = "convlora_", reserved: tuple[str, ...] = ()) -> dict[str, str]:
    """Caller-given header metadata, checked: a mapping of strings to strings, no reserved keys.

    Raises:
        ValueError: listing every offending key.
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a mapping of strings to strings, got {type(metadata).__name__}")
    bad = [
        k
        for k, v in metadata.items()
        if not isinstance(k, str) or not isinstance(v, str) or k.startswith(reserved_prefix) or k in reserved
    ]
    if bad:
        names = ", ".join(repr(k) for k in (reserved_prefix + "*", *reserved))
        raise ValueError(f"metadata must map strings to strings, and {names} are reserved; offending keys: {bad}")
    return dict(metadata)


# ---- PEFT LoraConfig fields (PEFT's adapter_config.json and diffusers' lora_adapter_metadata) -------
def peft_lora_fields(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check the fields of a PEFT ``LoraConfig`` dict that decide ranks and alphas; returns it as a dict.

    ``r`` an integer >= 1, ``lora_alpha`` (LoHa / LoKr: ``alpha``) finite > 0, ``rank_pattern`` / ``alpha_pattern`` objects
    whose keys are valid PEFT patterns (regexes) and values valid ranks / alphas, ``use_rslora`` a
    boolean, ``target_modules`` a string, a list of strings or null. Other fields are left alone.

    Raises:
        LoRAFileError: naming ``where`` and the field.
    """
    if "r" in config:
        _checked(checked_rank, config["r"], f"{where}: r")
    for name in ("lora_alpha", "alpha"):  # LoraConfig's alpha, LoHaConfig's / LoKrConfig's
        if name in config:
            _checked(checked_alpha, config[name], f"{where}: {name}")
    for name, check in (("rank_pattern", checked_rank), ("alpha_pattern", checked_alpha)):
        patterns = config.get(name)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise LoRAFileError(f"{where}: {name} must be a JSON object, got {_json_type(patterns)}")
        for key, value in patterns.items():
            peft_pattern(key, f"{where}: {name} key")
            _checked(check, value, f"{where}: {name}[{key!r}]")
    if "use_rslora" in config and not isinstance(config["use_rslora"], bool):
        raise LoRAFileError(f"{where}: use_rslora must be true or false, got {config['use_rslora']!r}")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
        isinstance(targets, list) and all(isinstance(t, str) for t in targets)
    ):
        raise LoRAFileError(f"{where}: target_modules must be a string or a list of strings, got {targets!r}")
    return dict(config)


def peft_pattern(key: str, what: str) -> re.Pattern[str]:
    """PEFT's matcher for a ``rank_pattern`` / ``alpha_pattern`` key: ``(.*\\.)?(key)$``."""
    try:
        return re.compile(rf"(.*\.)?({key})$")
    except re.error as err:
        raise LoRAFileError(f"{what} {key!r} is not a valid regular expression ({err})") from None


def adapter_metadata(header: Mapping[str, str], key: str, components: tuple[str, ...], source: str) -> dict[str, dict[str, Any]]:
    """diffusers' ``lora_adapter_metadata`` split per component and checked: ``{"unet": {"r": ..}, "": {...}}``.

    Keys are ``<component>.<LoraConfig field>``; keys with no known component prefix go under ``""``.
    An absent entry gives ``{}`` (diffusers then uses ``alpha = rank``).
    """
    flat = json_entry(header, key, source)
    if flat is None:
        return {}
    configs: dict[str, dict[str, Any]] = {}
    for name, value in flat.items():
        component = next((c for c in components if name.startswith(c + ".")), "")
        field = name[len(component) + 1 :] if component else name
        configs.setdefault(component, {})[field] = value
    return {c: peft_lora_fields(fields, f"{source}: {key} ({c or 'unprefixed'})") for c, fields in configs.items()}


def peft_config_file(path: Path) -> dict[str, Any]:
    """A PEFT ``adapter_config.json``, parsed and checked (:func:`peft_lora_fields`).

    Raises:
        LoRAFileError: unreadable text, invalid JSON, not an object, or bad rank / alpha fields.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LoRAFileError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    return peft_lora_fields(parse_json_object(text, str(path)), str(path))


# ---- alpha kept in a tensor (kohya, some diffusers-style files) -------------------------------------
def tensor_alpha(tensor: torch.Tensor, key: str, source: str) -> float:
    """The alpha stored in a one-element tensor ``key``.

    A stored 0 is refused with its own message: loaders disagree on it. kohya's sd-scripts
    (``networks/lora.py``) read it as ``alpha = rank``; A1111, ComfyUI and diffusers scale by
    ``alpha / rank`` and so switch the module off. A file must mean one thing in every tool.

    Raises:
        LoRAFileError: not exactly one element, not a real number, 0, or not a valid alpha.
    """
    if tensor.numel() != 1:
        raise LoRAFileError(f"{source}: {key} must hold one number, it has shape {tuple(tensor.shape)}")
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise LoRAFileError(f"{source}: {key} must be a real number, it is {str(tensor.dtype).replace('torch.', '')}")
    value = float(tensor.reshape(()).item())
    if value == 0:
        raise LoRAFileError(
            f"{source}: {key} is 0, which loaders read differently (kohya's sd-scripts: alpha = rank; A1111, "
            "ComfyUI and diffusers: the module switched off); write the alpha you mean (the rank, for scale 1)"
        )
    return _checked(checked_alpha, value, f"{source}: {key}")
