"""Pairing a file's tensors into LoRA modules: the step every format's reader shares.

A reader names its key endings (``{".lora_A.weight": "A", ".lora_B.weight": "B"}`` for PEFT,
``{".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"}`` for kohya, ...);
:func:`split_lora_keys` groups the keys by module path, :func:`pair_modules` checks each group has
both matrices of one rank and turns it into a :class:`~convlora.formats.weights.LoRAModule`, and
:func:`raise_on_leftovers` refuses keys the reader does not understand, naming them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from convlora.formats.weights import LoRAFormatError, LoRAModule

__all__ = ["pair_modules", "raise_on_leftovers", "split_lora_keys"]


def split_lora_keys(
    tensors: Mapping[str, Any], suffixes: Mapping[str, str], source: str = "file"
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Group ``<path><suffix>`` keys by path: ``{path: {"A": tensor, "B": tensor, ...}}``.

    Args:
        suffixes: key ending -> role (``{".lora_A.weight": "A", ".lora_B.weight": "B"}``).

    Returns:
        ``(groups, leftover keys that end in none of the suffixes)``.

    Raises:
        LoRAFormatError: two keys give the same module the same role (``X.lora_A.weight`` and
            ``X.lora.down.weight``): one of them would be dropped.
    """
    groups: dict[str, dict[str, Any]] = {}
    origin: dict[tuple[str, str], str] = {}
    leftovers, twice = [], []
    ordered = sorted(suffixes, key=len, reverse=True)  # longest first: ".lora.down.weight" before ".down.weight"
    for key, tensor in tensors.items():
        suffix = next((s for s in ordered if key.endswith(s)), None)
        if suffix is None:
            leftovers.append(key)
            continue
        path, role = key[: -len(suffix)], suffixes[suffix]
        if (path, role) in origin:
            twice.append(f"{origin[path, role]} and {key}")
        origin[path, role] = key
        groups.setdefault(path, {})[role] = tensor
    if twice:
        raise LoRAFormatError(f"{source}: the same module's LoRA is in the file twice, in two key styles: {'; '.join(sorted(twice)[:6])}")
    return groups, leftovers


def pair_modules(groups: Mapping[str, Mapping[str, Any]], alpha_of, source: str) -> dict[str, LoRAModule]:
    """Turn ``{path: {"A", "B"[, "alpha"]}}`` into LoRAModules; a lone A or B raises naming it.

    Args:
        alpha_of: ``(path, rank, group) -> alpha``.
    """
    incomplete = sorted(p for p, g in groups.items() if "A" not in g or "B" not in g)
    if incomplete:
        raise LoRAFormatError(f"{source}: module(s) without both LoRA matrices (A/down and B/up): {', '.join(incomplete[:12])}")
    not_float = sorted(
        f"{p} ({str(t.dtype).replace('torch.', '')})" for p, g in groups.items() for t in (g["A"], g["B"]) if not t.is_floating_point()
    )
    if not_float:
        raise LoRAFormatError(f"{source}: LoRA matrices must be floating point; not so: {', '.join(not_float[:12])}")
    modules = {}
    for path, group in groups.items():
        if group["A"].dim() < 2 or group["A"].shape[0] < 1:
            raise LoRAFormatError(f"{source}: {path} has down/A of shape {tuple(group['A'].shape)}: not a LoRA matrix of rank >= 1")
        rank = int(group["A"].shape[0])
        if group["B"].dim() < 2 or group["B"].shape[1] != rank:
            raise LoRAFormatError(
                f"{source}: {path} has down/A {tuple(group['A'].shape)} and up/B {tuple(group['B'].shape)}: ranks differ"
            )
        modules[path] = LoRAModule(group["A"], group["B"], float(alpha_of(path, rank, group)))
    return modules


def raise_on_leftovers(leftovers: list[str], source: str, hint: str = "") -> None:
    if leftovers:
        shown = ", ".join(sorted(leftovers)[:12]) + (f", ... ({len(leftovers) - 12} more)" if len(leftovers) > 12 else "")
        raise LoRAFormatError(f"{source}: {len(leftovers)} key(s) are not LoRA weights convlora understands: {shown}{hint}")
