"""Pure functions over LoRA tensors and state dicts: ΔW, key checks, finiteness, fingerprints.

Nothing here touches a module; every function returns new tensors / dicts or raises.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch

LORA_PARAM_NAMES = ("lora_A", "lora_B")


class StateDictMismatchError(ValueError):
    """A state dict's keys or shapes do not match what the model expects."""


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The LoRA update ``ΔW = scaling * B @ A`` in the base weight's ``(out, in/groups, *k)`` layout.

    One formula serves Linear and every ConvNd: A and B are flattened to matrices,
    ``(out, r) @ (r, in/groups * prod(k)) -> (out, in/groups * prod(k))``, and reshaped.

    Args:
        lora_A: ``(r, in)`` for Linear, ``(r, C_in/groups, *k)`` for ConvNd.
        lora_B: ``(out, r)`` for Linear, ``(C_out, r, *1s)`` for ConvNd.
        scaling: ``alpha / r`` (or ``alpha / sqrt(r)``).

    Returns:
        ``(out, in)`` or ``(C_out, C_in/groups, *k)``, computed and returned in float32.
    """
    a = lora_A.detach().float().flatten(1)  # (r, in/groups * prod(k))
    b = lora_B.detach().float().flatten(1)  # (out, r)
    if a.shape[0] != b.shape[1]:
        raise ValueError(f"rank mismatch: lora_A {tuple(lora_A.shape)} vs lora_B {tuple(lora_B.shape)}")
    delta = (b @ a) * scaling  # (out, in/groups * prod(k))
    return delta.view(lora_B.shape[0], *lora_A.shape[1:])


def scaling_for(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def checked_alpha(value: object, what: str = "alpha") -> float:
    """``value`` as a float if it is a usable LoRA alpha: a finite real number > 0.

    The one rule for every alpha that reaches a layer (configs, layers, file headers, kohya
    ``.alpha`` tensors): NaN / inf make every output NaN, 0 switches the module off and a negative
    alpha inverts it — none of them is a trained adapter.

    Raises:
        ValueError: naming ``what`` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


def checked_rank(value: object, what: str = "rank") -> int:
    """``value`` if it is a usable LoRA rank: an integer >= 1 (not a bool).

    Raises:
        ValueError: naming ``what`` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def split_lora_key(key: str) -> tuple[str, str]:
    """``"down.0.conv1.lora_A"`` -> ``("down.0.conv1", "lora_A")``."""
    path, _, name = key.rpartition(".")
    return path, name


def check_state_dict(
    expected: Mapping[str, tuple[int, ...] | torch.Size],
    given: Mapping[str, torch.Tensor],
    strict: bool = True,
    source: str = "state dict",
) -> None:
    """Raise if ``given`` does not fit ``expected``: every problem is named, with both shapes.

    Args:
        expected: key -> shape the model needs.
        given: key -> tensor offered.
        strict: also refuse missing and unexpected keys (shape mismatches are always refused).
        source: how to name ``given`` in the message (e.g. a file path).

    Raises:
        StateDictMismatchError: listing missing keys, unexpected keys and shape mismatches.
    """
    problems = []
    mismatched = [
        f"{k}: {source} has {tuple(given[k].shape)}, model expects {tuple(expected[k])}"
        for k in sorted(set(expected) & set(given))
        if tuple(given[k].shape) != tuple(expected[k])
    ]
    if mismatched:
        problems.append("shape mismatch for " + "; ".join(mismatched))
    if strict:
        missing = sorted(set(expected) - set(given))
        unexpected = sorted(set(given) - set(expected))
        if missing:
            problems.append(f"missing key(s) {_short_list(missing)}")
        if unexpected:
            problems.append(f"unexpected key(s) {_short_list(unexpected)}")
    if problems:
        raise StateDictMismatchError(f"{source} does not fit the model: " + " | ".join(problems))


def check_adapter_tensors(
    tensors: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype], source: str = "state dict"
) -> None:
    """The gate for every tensor entering a model: floating point, and finite in the dtype it will be stored in.

    A float64 value beyond float32's range would become inf when copied into a float32 parameter,
    and an fp32 value beyond 65504 would in a float16 one, so the check is made after the cast.

    Args:
        tensors: key -> tensor offered.
        dtypes: key -> dtype of the parameter it will be copied into (keys missing here are skipped).

    Raises:
        StateDictMismatchError: integer / bool / complex tensors, named with their dtype.
        ValueError: tensors holding NaN / inf once cast, named.
    """
    wrong_kind = [
        f"{k} ({str(t.dtype).replace('torch.', '')})"
        for k, t in tensors.items()
        if k in dtypes and not (isinstance(t, torch.Tensor) and t.is_floating_point())
    ]
    if wrong_kind:
        raise StateDictMismatchError(f"{source}: adapter tensors must be floating point; not so: {_short_list(sorted(wrong_kind))}")
    cast = {k: t.to(dtypes[k]) for k, t in tensors.items() if k in dtypes}
    check_finite(cast, source=f"{source} (cast to the parameters' dtypes)")


def check_finite(tensors: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Raise ``ValueError`` naming every tensor that holds NaN or inf."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{source} has non-finite values (NaN/inf) in {_short_list(sorted(bad))}")


def fingerprint(base_shapes: Mapping[str, tuple[int, ...]]) -> str:
    """A short hash of the adapted modules' paths and base weight shapes.

    Two models get the same fingerprint exactly when the same module paths are adapted and their
    base weights have the same shapes, so an adapter file can tell it is being loaded onto a
    different base.
    """
    text = "\n".join(f"{path}:{list(shape)}" for path, shape in sorted(base_shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _short_list(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
