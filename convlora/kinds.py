"""Adapter kinds: what one adapter of a LoRA layer adds to its base weight.

Every kind gives an update ``ΔW`` in the *delta layout*, the base weight's ``(out, in/g, *k)`` (GPT-2's
``Conv1D`` keeps its weight as ``(in, out)``; its layer transposes). With ``s = alpha / r`` (``alpha /
sqrt(r)`` with rsLoRA):

    lora  ``ΔW = s · B @ A``                           ``lora_A (r, in/g, *k)``, ``lora_B (out, r, *1s)``
    loha  ``ΔW = s · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``   ``hada_w?_a (out, r)``, ``hada_w?_b (r, in/g·∏k)``
    lokr  ``ΔW = s · W1 ⊗ W2``                         ``W1 (a, c)``: ``lokr_w1``, or ``lokr_w1_a (a, r) @ lokr_w1_b (r, c)``;
                                                       ``W2 (b, d, *k)``: ``lokr_w2``, or ``lokr_w2_a (b, r) @ lokr_w2_b (r, d·∏k)``

For LoKr ``out = a·b`` and ``in/g = c·d`` come from :func:`factorization` (LyCORIS's rule, ``a <= b``,
``c <= d``); W2 is factorised when ``r < max(b, d) / 2``, W1 only with ``decompose_both`` and ``r <
max(a, c) / 2``; with neither factorised ``s = 1`` (alpha has no rank to divide, as in LyCORIS and
ComfyUI). These are LyCORIS's parameter names, shapes and products (its ``LohaModule`` / ``LokrModule``
without Tucker), so a file's tensors are the module's tensors.

**DoRA** (``use_dora``, any kind): the adapter also holds ``magnitude`` ``m (out,)``, initialised to the
row norms ``||W||`` of the base weight (so a fresh adapter changes nothing). As trained, the weight is
``W_d = m / ||W + ΔW|| · (W + ΔW)``, row norms over everything but the output axis, the norm detached
in training (PEFT's rule and the DoRA paper's §4.3). The adapter's update is ``D = W_d - W``, and an
adapter weight (LoRA strength) ``w`` gives ``W + w·D``: strength 0 is exactly the base and 1 exactly the
trained weight, linear between (as ComfyUI applies a DoRA's strength). Unmerged, the same is
``y = base(x) + w·((g - 1)·(x ∗ W) + g·branch(x))`` with ``g = m / ||W + ΔW||`` per output channel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from convlora.state import checked_alpha, checked_rank, delta_weight, scaling_for

#: The adapter kinds a layer can hold (``LoRAConfig.kind`` adds ``"dora"``: LoRA with ``use_dora``).
KINDS = ("lora", "loha", "lokr")


@dataclass(frozen=True)
class AdapterKind:
    """The kind of one adapter and its kind-specific options (LyCORIS's names).

    Attributes:
        name: ``"lora"``, ``"loha"`` or ``"lokr"``.
        use_dora: weight decomposition (a trained per-output-channel magnitude) on top of the kind.
        factor: LoKr only: the Kronecker factor size to aim for (``-1``: the most balanced split).
        decompose_both: LoKr only: factorise W1 too (when ``r < max(a, c) / 2``).
    """

    name: str = "lora"
    use_dora: bool = False
    factor: int = -1
    decompose_both: bool = False

    def __post_init__(self) -> None:
        if self.name not in KINDS:
            raise ValueError(f"unknown adapter kind {self.name!r}: use one of {', '.join(KINDS)} (or 'dora')")
        for flag in ("use_dora", "decompose_both"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if isinstance(self.factor, bool) or not isinstance(self.factor, int) or (self.factor < 1 and self.factor != -1):
            raise ValueError(f"factor must be -1 or an integer >= 1, got {self.factor!r}")
        if self.name != "lokr" and (self.factor != -1 or self.decompose_both):
            raise ValueError(f"factor and decompose_both are LoKr options; this adapter is {self.name}")

    @property
    def label(self) -> str:
        """``"lora"``, ``"dora"``, ``"loha"``, ``"lokr"``, or ``"loha+dora"`` / ``"lokr+dora"``."""
        if self.name == "lora":
            return "dora" if self.use_dora else "lora"
        return f"{self.name}+dora" if self.use_dora else self.name


LORA = AdapterKind()


def checked_adapter_weight(value: object, what: str = "adapter weight") -> float:
    """``value`` as a float if it is a usable adapter weight (LoRA strength): a finite real number.

    Raises:
        ValueError: naming ``what`` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n == dimension`` and ``m <= n``: LyCORIS's rule for LoKr's Kronecker factors.

    ``factor > 0`` dividing ``dimension``: ``(factor, dimension / factor)`` (ordered). Otherwise the most
    balanced split whose smaller side does not pass ``factor`` (``-1``: no limit), growing ``m`` from 1
    while ``m + n`` shrinks. E.g. 128 -> (8, 16), 320 -> (16, 20), 127 -> (1, 127); 128 with factor 4 -> (4, 32).
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > limit:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def dora_gain(magnitude: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``m / ||weight||`` per output channel: ``magnitude (out,)``, ``weight (out, ...)`` -> ``(out,)``.

    The norm is taken over everything but axis 0 and detached (so only ``m`` and, through the branch,
    the factors get gradients); a zero row divides by the smallest normal float instead of 0.
    """
    norm = weight.detach().flatten(1).norm(dim=1)
    return magnitude / norm.clamp_min(torch.finfo(norm.dtype).tiny).to(magnitude.dtype)


class AdapterBase(nn.Module):
    """What every adapter kind shares: rank, alpha, rsLoRA flag, weight (strength), input dropout and,
    with DoRA, the magnitude. Subclasses hold their factors and define :meth:`delta`.

    Attributes:
        kind: the :class:`AdapterKind`.
        r: rank.
        lora_alpha: scaling numerator (a finite number > 0).
        use_rslora: ``alpha / sqrt(r)`` instead of ``alpha / r``.
        weight: the adapter's weight in the layer's sum (LoRA strength; 1 as trained).
        scaling: ``weight * trained_scaling``.
        lora_dropout: dropout on the adapter's input while training (``nn.Identity`` for p = 0).
        magnitude: DoRA's ``(out,)`` magnitude, or ``None``.
    """

    kind: AdapterKind
    factor_names: tuple[str, ...] = ()  # the kind's factor parameters, in file order

    def _init_common(self, kind: AdapterKind, r: int, lora_alpha: float | None, dropout: float, use_rslora: bool,
                     owner: str) -> None:
        r = checked_rank(int(r), f"rank r of {owner}")
        if isinstance(dropout, bool) or not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"lora_dropout must be in [0, 1), got {dropout!r}")
        if not isinstance(use_rslora, bool):
            raise ValueError(f"use_rslora must be True or False, got {use_rslora!r}")
        self.kind = kind
        self._owner = owner
        self.r = r
        self._use_rslora = use_rslora
        self._lora_alpha = checked_alpha(r if lora_alpha is None else lora_alpha, f"lora_alpha of {owner}")
        self._weight = 1.0
        # nn.Identity, not a lambda: module state must be a module (and p = 0 costs nothing).
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.magnitude: nn.Parameter | None = None

    def _init_magnitude(self, base_weight: torch.Tensor | None, factory: dict[str, Any]) -> None:
        """DoRA: ``m = ||W||`` per output channel of ``base_weight`` (delta layout, dense)."""
        if not self.kind.use_dora:
            return
        if base_weight is None:
            raise ValueError(f"DoRA on {self._owner} needs its base weight")
        norms = base_weight.detach().float().flatten(1).norm(dim=1)  # (out,)
        self.magnitude = nn.Parameter(norms.to(**factory))

    @property
    def lora_alpha(self) -> float:
        return self._lora_alpha

    @lora_alpha.setter
    def lora_alpha(self, value: float) -> None:
        self._lora_alpha = checked_alpha(value, f"lora_alpha of {self._owner}")

    @property
    def use_rslora(self) -> bool:
        return self._use_rslora

    @use_rslora.setter
    def use_rslora(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"use_rslora of {self._owner} must be True or False, got {value!r}")
        self._use_rslora = value

    @property
    def weight(self) -> float:
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        self._weight = checked_adapter_weight(value, f"adapter weight of {self._owner}")

    @property
    def trained_scaling(self) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA): the scaling at weight 1."""
        return scaling_for(self.r, self._lora_alpha, self._use_rslora)

    @property
    def scaling(self) -> float:
        return self.trained_scaling * self._weight

    @property
    def is_plain_lora(self) -> bool:
        """LoRA without DoRA: the kind the fused path, the low-rank tools and every format know."""
        return self.kind.name == "lora" and not self.kind.use_dora

    @property
    def param_names(self) -> tuple[str, ...]:
        """The adapter's trained tensors: :attr:`factor_names`, then ``"magnitude"`` with DoRA (the
        ``<path>.<name>`` keys of an adapter state dict and of a native file)."""
        return self.factor_names + (("magnitude",) if self.magnitude is not None else ())

    def factors(self) -> tuple[nn.Parameter, ...]:
        """The tensors named by :attr:`param_names`, in that order."""
        return tuple(getattr(self, n) for n in self.param_names)

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``ΔW`` at the trained scaling, in the delta layout, differentiable in the factors (cast to
        ``dtype`` first when given, so a bf16 adapter's update can be computed in float32)."""
        raise NotImplementedError

    def merged_update(self, base: torch.Tensor | None) -> torch.Tensor:
        """What this adapter adds to the base weight at its current weight, float32, delta layout, detached.

        ``base``: the dense base weight in the delta layout (float32); only DoRA reads it.
        """
        with torch.no_grad():
            if self.magnitude is None:
                return self.delta(torch.float32) * self._weight
            delta = self.delta(torch.float32)
            adapted = base + delta
            gain = dora_gain(self.magnitude.float(), adapted).view(-1, *(1,) * (base.dim() - 1))
            return (adapted * gain - base) * self._weight

    def extra_repr(self) -> str:
        return (f"kind={self.kind.label}, r={self.r}, lora_alpha={self._lora_alpha:g}, "
                f"use_rslora={self._use_rslora}, weight={self._weight:g}")


class LoRAAdapter(AdapterBase):
    """One LoRA adapter: ``w * s * B @ A`` with ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); with
    DoRA, also ``magnitude``.

    Attributes (besides :class:`AdapterBase`'s):
        lora_A: ``(r, in)`` for Linear / GPT-2 Conv1D, ``(r, C_in/g, *k)`` for ConvNd.
        lora_B: ``(out, r)``, ``(C_out, r, *1s)``.
    """

    factor_names = ("lora_A", "lora_B")

    def __init__(self, a_shape: Sequence[int], b_shape: Sequence[int], lora_alpha: float | None, dropout: float,
                 use_rslora: bool, init: str, factory: dict[str, Any], owner: str = "LoRA layer",
                 kind: AdapterKind = LORA, base_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if kind.name != "lora":
            raise ValueError(f"LoRAAdapter is the 'lora' kind, got {kind.name!r}")
        self._init_common(kind, int(a_shape[0]), lora_alpha, dropout, use_rslora, owner)
        self.lora_A = nn.Parameter(torch.empty(tuple(a_shape), **factory))
        self.lora_B = nn.Parameter(torch.zeros(tuple(b_shape), **factory))
        self.reset_parameters(init)
        self._init_magnitude(base_weight, factory)

    def reset_parameters(self, init: str = "kaiming") -> None:
        """A: Kaiming-uniform (a=sqrt(5), as ``nn.Linear``) or N(0, 1/r²); B: zeros, so ΔW = 0."""
        with torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            elif init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                raise ValueError(f"unknown LoRA init {init!r}: use 'kaiming' or 'gaussian'")
            nn.init.zeros_(self.lora_B)

    def delta(self, dtype=None):
        a, b = self.lora_A, self.lora_B
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        return (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:]) * self.trained_scaling

    def merged_update(self, base):
        if self.magnitude is None:  # the formula LoRA merges have always used
            return delta_weight(self.lora_A, self.lora_B, self.scaling)
        return super().merged_update(base)


def _check_kind_init(kind: AdapterKind, init: str) -> None:
    if init != "kaiming":
        raise ValueError(f"init={init!r} is LoRA's; {kind.name} adapters use LyCORIS's initialisation (init='kaiming')")


class LoHaAdapter(AdapterBase):
    """LyCORIS's LoHa: ``ΔW = s · (hada_w1_a @ hada_w1_b) ⊙ (hada_w2_a @ hada_w2_b)``, reshaped to the delta layout.

    ``hada_w1_a``, ``hada_w2_a``: ``(out, r)``; ``hada_w1_b``, ``hada_w2_b``: ``(r, in/g · ∏k)``. Init as
    LyCORIS: ``w?_b ~ N(0, 1)``, ``w1_a ~ N(0, 0.1²)``, ``w2_a = 0`` (so ΔW = 0). Trainable parameters
    ``2 r (out + in/g · ∏k)``; the update's rank is at most ``r²``.
    """

    factor_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def __init__(self, delta_shape: Sequence[int], r: int, lora_alpha: float | None, dropout: float, use_rslora: bool,
                 init: str, factory: dict[str, Any], owner: str, kind: AdapterKind,
                 base_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        _check_kind_init(kind, init)
        self._init_common(kind, r, lora_alpha, dropout, use_rslora, owner)
        self.delta_shape = tuple(int(s) for s in delta_shape)
        n_out, n_in = self.delta_shape[0], math.prod(self.delta_shape[1:])
        self.hada_w1_a = nn.Parameter(torch.empty(n_out, self.r, **factory))
        self.hada_w1_b = nn.Parameter(torch.empty(self.r, n_in, **factory))
        self.hada_w2_a = nn.Parameter(torch.empty(n_out, self.r, **factory))
        self.hada_w2_b = nn.Parameter(torch.empty(self.r, n_in, **factory))
        self.reset_parameters()
        self._init_magnitude(base_weight, factory)

    def reset_parameters(self, init: str = "kaiming") -> None:
        _check_kind_init(self.kind, init)
        with torch.no_grad():
            nn.init.normal_(self.hada_w1_b, std=1.0)
            nn.init.normal_(self.hada_w1_a, std=0.1)
            nn.init.normal_(self.hada_w2_b, std=1.0)
            nn.init.zeros_(self.hada_w2_a)

    def delta(self, dtype=None):
        w1a, w1b, w2a, w2b = (t if dtype is None else t.to(dtype) for t in self.factors()[:4])
        return ((w1a @ w1b) * (w2a @ w2b) * self.trained_scaling).view(self.delta_shape)


def lokr_shapes(
    delta_shape: Sequence[int], r: int, factor: int = -1, decompose_both: bool = False, factorize=None
) -> dict[str, tuple[int, ...]]:
    """LoKr's parameter shapes for a delta-layout shape ``(out, in/g, *k)``, as LyCORIS's ``LokrModule`` builds them.

    ``(a, b) = factorize(out, factor)``, ``(c, d) = factorize(in/g, factor)`` (default :func:`factorization`,
    LyCORIS's; PEFT's LoKr splits with its own, same rule otherwise); keys are the parameter names present.
    """
    factorize = factorization if factorize is None else factorize
    n_out, n_in, *kernel = (int(s) for s in delta_shape)
    a, b = factorize(n_out, factor)
    c, d = factorize(n_in, factor)
    shapes: dict[str, tuple[int, ...]] = {}
    if decompose_both and r < max(a, c) / 2:
        shapes["lokr_w1_a"], shapes["lokr_w1_b"] = (a, r), (r, c)
    else:
        shapes["lokr_w1"] = (a, c)
    if r < max(b, d) / 2:
        shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (b, r), (r, d * math.prod(kernel))
    else:
        shapes["lokr_w2"] = (b, d, *kernel)
    return shapes


class LoKrAdapter(AdapterBase):
    """LyCORIS's LoKr: ``ΔW = s · W1 ⊗ W2`` (see the module docstring for the shapes, :func:`lokr_shapes`).

    Init as LyCORIS: W1's tensors and ``lokr_w2_a`` Kaiming-uniform, ``lokr_w2_b`` (or a full ``lokr_w2``)
    zero, so ΔW = 0. ``s = alpha / r`` when a side is factorised, else 1.
    """

    ALL_FACTOR_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

    def __init__(self, delta_shape: Sequence[int], r: int, lora_alpha: float | None, dropout: float, use_rslora: bool,
                 init: str, factory: dict[str, Any], owner: str, kind: AdapterKind,
                 base_weight: torch.Tensor | None = None, shapes: dict[str, tuple[int, ...]] | None = None) -> None:
        super().__init__()
        _check_kind_init(kind, init)
        self._init_common(kind, r, lora_alpha, dropout, use_rslora, owner)
        self.delta_shape = tuple(int(s) for s in delta_shape)
        shapes = shapes or lokr_shapes(self.delta_shape, self.r, kind.factor, kind.decompose_both)
        self.factor_names = tuple(n for n in self.ALL_FACTOR_NAMES if n in shapes)
        for name in self.factor_names:
            setattr(self, name, nn.Parameter(torch.empty(shapes[name], **factory)))
        self.reset_parameters()
        self._init_magnitude(base_weight, factory)

    @property
    def is_factorised(self) -> bool:
        """Whether W1 or W2 is a product of rank-``r`` factors (else alpha / r does not apply)."""
        return "lokr_w2_a" in self.factor_names or "lokr_w1_a" in self.factor_names

    @property
    def trained_scaling(self) -> float:
        return super().trained_scaling if self.is_factorised else 1.0

    def reset_parameters(self, init: str = "kaiming") -> None:
        _check_kind_init(self.kind, init)
        with torch.no_grad():
            for name in self.factor_names:
                if name in ("lokr_w2", "lokr_w2_b"):
                    nn.init.zeros_(getattr(self, name))
                else:
                    nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))

    def delta(self, dtype=None):
        t = {n: (p if dtype is None else p.to(dtype)) for n, p in zip(self.factor_names, self.factors())}
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]  # (a, c)
        b, d = self._w2_shape()
        w2 = t["lokr_w2"] if "lokr_w2" in t else (t["lokr_w2_a"] @ t["lokr_w2_b"]).view(b, d, *self.delta_shape[2:])
        w1 = w1.view(*w1.shape, *(1,) * (w2.dim() - 2))  # (a, c, *1s): the kernel comes from W2
        return torch.kron(w1, w2) * self.trained_scaling  # (a*b, c*d, *k)

    def _w2_shape(self) -> tuple[int, int]:
        """``(b, d)``: W2's output and input sizes."""
        if "lokr_w2" in self.factor_names:
            return tuple(self.lokr_w2.shape[:2])
        return self.lokr_w2_a.shape[0], self.lokr_w2_b.shape[1] // math.prod(self.delta_shape[2:])


def kind_from_label(label: str) -> AdapterKind:
    """Inverse of :attr:`AdapterKind.label` (LoKr's factor options are not in a label: a loaded LoKr
    adapter takes its shapes from its tensors)."""
    name, _, extra = label.partition("+")
    if label == "dora":
        return AdapterKind("lora", use_dora=True)
    if name not in KINDS or extra not in ("", "dora") or (name == "lora" and extra):
        raise ValueError(f"unknown adapter kind {label!r}: use lora, dora, loha, lokr, loha+dora or lokr+dora")
    return AdapterKind(name, use_dora=extra == "dora")


def lokr_rank_of(delta_shape: Sequence[int], shapes: Mapping[str, Sequence[int]]) -> int | None:
    """Check that ``shapes`` (LoKr parameter name -> shape) are a Kronecker factorisation of a
    ``delta_shape`` weight, and return the adapter's rank (``None`` when neither side is factorised).

    W1 is ``lokr_w1 (a, c)`` or ``lokr_w1_a (a, r) / lokr_w1_b (r, c)``; W2 is ``lokr_w2 (b, d, *k)`` or
    ``lokr_w2_a (b, r) / lokr_w2_b (r, d·∏k)``; ``a·b`` must be ``out`` and ``c·d`` must be ``in/g``.

    Raises:
        ValueError: naming what does not fit.
    """
    n_out, n_in, *kernel = (int(s) for s in delta_shape)
    names = set(shapes)
    w1 = [n for n in (("lokr_w1",), ("lokr_w1_a", "lokr_w1_b")) if names.issuperset(n)]
    w2 = [n for n in (("lokr_w2",), ("lokr_w2_a", "lokr_w2_b")) if names.issuperset(n)]
    if len(w1) != 1 or len(w2) != 1 or names - set(w1[0]) - set(w2[0]):
        raise ValueError(f"LoKr tensors {sorted(names)} are not one W1 (lokr_w1 or lokr_w1_a/_b) and one W2 "
                         "(lokr_w2 or lokr_w2_a/_b)")
    ranks = set()
    if w1[0] == ("lokr_w1",):
        a, c = _shape2(shapes["lokr_w1"], "lokr_w1")
    else:
        (a, r1), (r2, c) = _shape2(shapes["lokr_w1_a"], "lokr_w1_a"), _shape2(shapes["lokr_w1_b"], "lokr_w1_b")
        ranks |= {r1, r2}
    if n_out % a or n_in % c:
        raise ValueError(f"LoKr W1 {(a, c)} does not divide the weight's (out, in) = {(n_out, n_in)}")
    b, d = n_out // a, n_in // c
    if w2[0] == ("lokr_w2",):
        if tuple(shapes["lokr_w2"]) != (b, d, *kernel):
            raise ValueError(f"lokr_w2 is {tuple(shapes['lokr_w2'])}, expected {(b, d, *kernel)} for W1 {(a, c)}")
    else:
        (b2, r1), (r2, dk) = _shape2(shapes["lokr_w2_a"], "lokr_w2_a"), _shape2(shapes["lokr_w2_b"], "lokr_w2_b")
        if (b2, dk) != (b, d * math.prod(kernel)):
            raise ValueError(f"lokr_w2_a / lokr_w2_b give W2 {(b2, dk)}, expected {(b, d * math.prod(kernel))} for W1 {(a, c)}")
        ranks |= {r1, r2}
    if len(ranks) > 1:
        raise ValueError(f"LoKr factors disagree on the rank: {sorted(ranks)}")
    return ranks.pop() if ranks else None


def _shape2(shape: Sequence[int], name: str) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"{name} must be a matrix, got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def expected_shapes(kind: AdapterKind, delta_shape: Sequence[int], lora_shapes: tuple[Sequence[int], Sequence[int]],
                    r: int, lokr: Mapping[str, Sequence[int]] | None = None) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of a rank-``r`` adapter of ``kind`` on a ``delta_shape`` weight (``lokr``:
    a LoKr adapter's own shapes, as a file gives them; checked by :func:`lokr_rank_of`)."""
    n_out = int(delta_shape[0])
    if kind.name == "lora":
        shapes = {"lora_A": tuple(lora_shapes[0]), "lora_B": tuple(lora_shapes[1])}
    elif kind.name == "loha":
        n_in = math.prod(int(s) for s in delta_shape[1:])
        shapes = {"hada_w1_a": (n_out, r), "hada_w1_b": (r, n_in), "hada_w2_a": (n_out, r), "hada_w2_b": (r, n_in)}
    elif lokr is not None:
        lokr_rank_of(delta_shape, lokr)
        shapes = {n: tuple(int(s) for s in v) for n, v in lokr.items()}
    else:
        shapes = lokr_shapes(delta_shape, r, kind.factor, kind.decompose_both)
    if kind.use_dora:
        shapes["magnitude"] = (n_out,)
    return shapes


def make_adapter(kind: AdapterKind, *, delta_shape: Sequence[int], lora_shapes: tuple[Sequence[int], Sequence[int]],
                 r: int, lora_alpha: float | None, dropout: float, use_rslora: bool, init: str,
                 factory: dict[str, Any], owner: str, base_weight: torch.Tensor | None,
                 lokr: Mapping[str, Sequence[int]] | None = None) -> AdapterBase:
    """A new adapter of ``kind`` whose update is zero. ``lora_shapes``: ``(A, B)`` shapes for the lora kind;
    ``base_weight``: the dense base in the delta layout (DoRA's magnitude starts at its row norms);
    ``lokr``: a LoKr adapter's parameter shapes (a loaded file's), instead of deriving them from ``r``."""
    common = dict(lora_alpha=lora_alpha, dropout=dropout, use_rslora=use_rslora, init=init, factory=factory,
                  owner=owner, kind=kind, base_weight=base_weight)
    if kind.name == "lora":
        return LoRAAdapter(*lora_shapes, **common)
    if kind.name == "loha":
        return LoHaAdapter(delta_shape, r, **common)
    shapes = None
    if lokr is not None:
        shapes = {n: tuple(int(s) for s in v) for n, v in lokr.items()}
        r = lokr_rank_of(delta_shape, shapes) or r
    return LoKrAdapter(delta_shape, r, shapes=shapes, **common)
