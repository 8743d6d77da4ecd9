"""LoRAConfig: what to inject, with which rank and scaling.

The config is validated when it is built, serialises to plain JSON (it travels in the header of
every file convlora writes) and refuses unknown keys when read back.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from convlora.kinds import AdapterKind, kind_from_label
from convlora.state import checked_alpha, checked_rank

INIT_CHOICES = ("kaiming", "gaussian")
BIAS_CHOICES = ("none", "all", "lora_only")
#: ``LoRAConfig.kind``: ``"dora"`` is LoRA with weight decomposition (``lora`` + DoRA's magnitude).
KIND_CHOICES = ("lora", "dora", "loha", "lokr")
#: The kind fields and their defaults; a plain LoRA config leaves them out of :meth:`LoRAConfig.to_dict`,
#: so its files' headers are what they were before adapter kinds existed.
_KIND_DEFAULTS = {"kind": "lora", "factor": -1, "decompose_both": False, "weight_decompose": False}


def path_matches(pattern: str, path: str) -> bool:
    """Whether a module path matches a target pattern on whole dotted-path segments.

    ``"to_out.0"`` matches ``"mid.attn.to_out.0"`` and ``"to_out.0"`` but not ``"mid.attn.to_out.01"``
    nor ``"mid.attn.xto_out.0"``.

    Args:
        pattern: one or more dotted segments, e.g. ``"conv1"`` or ``"attn1.to_q"``.
        path: a full module path as given by ``model.named_modules()``.
    """
    return path == pattern or path.endswith("." + pattern)


def pattern_matches(pattern: str | list[str] | tuple[str, ...], path: str) -> bool:
    """Match a ``target_modules`` / ``exclude_modules`` value against a module path.

    A list (or tuple) matches on whole dotted-path segment suffixes (:func:`path_matches`); a single
    string is a regular expression that must match the *full* path (``re.fullmatch``), as in PEFT.
    """
    if isinstance(pattern, str):
        return re.fullmatch(pattern, path) is not None
    return any(path_matches(p, path) for p in pattern)


def key_matches(key: str, path: str) -> bool:
    """Match a ``rank_pattern`` / ``alpha_pattern`` key: a segment suffix, or a full-path regex."""
    if path_matches(key, path):
        return True
    try:
        return re.fullmatch(key, path) is not None
    except re.error:
        return False


@dataclass
class LoRAConfig:
    """Which modules get LoRA and how.

    The adapted weight is ``W + (alpha / r) * B @ A`` (``alpha / sqrt(r)`` with rsLoRA).
    """

    r: int = 8
    """Rank of the update for every targeted layer (unless ``rank_pattern`` / ``conv_rank`` say otherwise)."""
    alpha: float | None = None
    """Scaling numerator; ``None`` means ``alpha = r`` (scaling 1)."""
    dropout: float = 0.0
    """Dropout probability on the LoRA branch's input, in ``[0, 1)``; only active in training."""
    target_modules: list[str] | str = field(default_factory=list)
    """Module names to adapt. A list matches whole dotted-path suffixes (``"to_q"``, ``"to_out.0"``);
    a single string is a regex matched against the full module path."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted, even if targeted; same matching rules as ``target_modules``."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: key is a path suffix or full-path regex; the first matching key wins."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, same matching as ``rank_pattern``."""
    conv_rank: int | None = None
    """Rank for convolutions with a kernel larger than 1 (kohya's ``conv_dim``); ``None`` means ``r``."""
    conv_alpha: float | None = None
    """Alpha for those convolutions (kohya's ``conv_alpha``); ``None`` means ``conv_rank`` (or ``alpha``)."""
    init: str = "kaiming"
    """Init of A: ``"kaiming"`` (uniform, a=sqrt(5), as ``nn.Linear``) or ``"gaussian"`` (std 1/r). B is zero."""
    use_rslora: bool = False
    """Rank-stabilised scaling ``alpha / sqrt(r)`` instead of ``alpha / r``."""
    merge_on_eval: bool = True
    """``model.eval()`` merges ΔW into the weight, ``model.train()`` restores it bit-exactly."""
    bias: str = "none"
    """Which biases train and are saved with the adapter: ``"none"``, ``"all"`` or ``"lora_only"``."""
    modules_to_save: list[str] | None = None
    """Extra modules trained in full and saved with the adapter (segment-suffix match)."""
    kind: str = "lora"
    """The adapter kind: ``"lora"``, ``"dora"`` (LoRA + weight decomposition), ``"loha"`` or ``"lokr"``
    (LyCORIS's Hadamard and Kronecker products); the math is in :mod:`convlora.kinds`."""
    factor: int = -1
    """LoKr: the Kronecker factor size to aim for; ``-1``: the most balanced split (LyCORIS's ``factor``)."""
    decompose_both: bool = False
    """LoKr: factorise the smaller Kronecker factor too (LyCORIS's ``decompose_both``)."""
    weight_decompose: bool = False
    """DoRA's magnitude on a LoHa / LoKr adapter (LyCORIS's ``weight_decompose``, kohya's ``dora_wd``);
    ``kind="dora"`` is the same on LoRA."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        _check("r", checked_rank, self.r)
        if self.conv_rank is not None:
            _check("conv_rank", checked_rank, self.conv_rank)
        for name in ("alpha", "conv_alpha"):
            if getattr(self, name) is not None:
                _check(name, checked_alpha, getattr(self, name))
        if isinstance(self.dropout, bool) or not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ValueError("LoRAConfig.target_modules is empty: name at least one module to adapt")
        _check_targets("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            _check_targets("exclude_modules", self.exclude_modules)
        for name, check in (("rank_pattern", checked_rank), ("alpha_pattern", checked_alpha)):
            patterns = getattr(self, name)
            if not isinstance(patterns, dict) or not all(isinstance(k, str) and k for k in patterns):
                raise ValueError(f"LoRAConfig.{name} must be a dict keyed by non-empty module names, got {patterns!r}")
            for key, value in patterns.items():
                _check(f"{name}[{key!r}]", check, value)
        for name in ("use_rslora", "merge_on_eval"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LoRAConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.init, str) or self.init not in INIT_CHOICES:
            raise ValueError(f"LoRAConfig.init must be one of {INIT_CHOICES}, got {self.init!r}")
        if not isinstance(self.bias, str) or self.bias not in BIAS_CHOICES:
            raise ValueError(f"LoRAConfig.bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        if not isinstance(self.kind, str) or self.kind not in KIND_CHOICES:
            raise ValueError(f"LoRAConfig.kind must be one of {KIND_CHOICES}, got {self.kind!r}")
        if self.kind in ("lora", "dora") and self.weight_decompose:
            raise ValueError("LoRAConfig.weight_decompose is for loha / lokr; for LoRA with DoRA use kind='dora'")
        try:
            self.adapter_kind()
        except ValueError as err:
            raise ValueError(f"LoRAConfig: {err}") from None
        if self.kind not in ("lora", "dora") and self.init != "kaiming":
            raise ValueError(f"LoRAConfig.init={self.init!r} is LoRA's; {self.kind} uses LyCORIS's initialisation")
        if self.modules_to_save is not None and not (
            isinstance(self.modules_to_save, list) and all(isinstance(m, str) and m for m in self.modules_to_save)
        ):
            raise ValueError(f"LoRAConfig.modules_to_save must be None or a list of module names, got {self.modules_to_save!r}")

    def adapter_kind(self) -> AdapterKind:
        """The :class:`convlora.kinds.AdapterKind` each injected adapter gets."""
        name = "lora" if self.kind == "dora" else self.kind
        return AdapterKind(name, use_dora=self.kind == "dora" or self.weight_decompose, factor=self.factor,
                           decompose_both=self.decompose_both)

    def rank_and_alpha(self, path: str, is_spatial_conv: bool) -> tuple[int, float]:
        """Rank and alpha for one module path.

        Args:
            path: the module's full dotted path.
            is_spatial_conv: True for a convolution whose kernel is larger than 1 in some dimension.
        """
        rank = self.r
        alpha = self.alpha
        if is_spatial_conv and self.conv_rank is not None:
            rank = self.conv_rank
            alpha = self.conv_alpha
        elif is_spatial_conv and self.conv_alpha is not None:
            alpha = self.conv_alpha
        for key, value in self.rank_pattern.items():
            if key_matches(key, path):
                rank = value
                break
        for key, value in self.alpha_pattern.items():
            if key_matches(key, path):
                alpha = value
                break
        return rank, float(rank if alpha is None else alpha)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict of every field (the kind fields only where they differ from LoRA's)."""
        data = dataclasses.asdict(self)
        for name, default in _KIND_DEFAULTS.items():
            if data[name] == default:
                del data[name]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoRAConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"a LoRAConfig is read from a dict of its fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LoRAConfig field(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "LoRAConfig":
        return cls.from_dict(json.loads(text))


def config_kind(label: str) -> dict[str, Any]:
    """The :class:`LoRAConfig` kind fields for an adapter kind label (``"lora"``, ``"dora"``, ``"loha"``,
    ``"lokr"``, ``"loha+dora"``, ``"lokr+dora"``; :attr:`convlora.kinds.AdapterKind.label`)."""
    kind = kind_from_label(label)  # the one parser of labels
    if kind.name == "lora":
        return {"kind": "dora" if kind.use_dora else "lora"}
    return {"kind": kind.name, "weight_decompose": True} if kind.use_dora else {"kind": kind.name}


def _check(name: str, check, value: Any) -> None:
    """Run one of :mod:`convlora.state`'s value checks, naming the field ``LoRAConfig.<name>``."""
    check(value, f"LoRAConfig.{name}")


def _check_targets(name: str, value: Any) -> None:
    """``target_modules`` / ``exclude_modules``: a valid regex string, or a list of non-empty names."""
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"LoRAConfig.{name} is not a valid regex: {value!r} ({err})") from None
    elif not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
        raise ValueError(f"LoRAConfig.{name} must be a regex string or a list of non-empty names, got {value!r}")
