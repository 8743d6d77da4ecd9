"""DoRA, LoHa and LoKr in PEFT's tensors and configs (PEFT 0.21's ``tuners/lora``, ``loha``, ``lokr``).

What PEFT computes, read from its source, and how convlora's adapters map onto it:

* **DoRA** (``LoraConfig(use_dora=True)``): ``lora_A`` / ``lora_B`` as for LoRA, plus
  ``<path>.lora_magnitude_vector``: ``(out,)`` on Linear, ``(1, out, 1, ...)`` on ConvNd
  (``tuners/lora/dora.py``: ``_DoraConvNdLayer.get_weight_norm`` keeps the dims and transposes). Both
  divide by the norm of ``W + s·B@A`` over every axis but the output axis, detached: convlora's
  :func:`convlora.kinds.dora_gain`. ``use_dora`` is one flag per config, so a folder is all DoRA or none.
  On a grouped conv PEFT's DoRA reshapes ``B.view(-1, R) @ A.view(R, -1)`` of its grouped ``B`` into the
  weight's shape, which is another update: refused.
* **LoHa** (``LoHaConfig``): ``hada_w1_a (out, r)``, ``hada_w1_b (r, in/g·∏k)``, ``hada_w2_a``, ``hada_w2_b``
  with ``use_effective_conv2d=False``, ``ΔW = (alpha / r) · (w1a@w1b) ⊙ (w2a@w2b)`` reshaped to the base
  weight (``tuners/loha/layer.py``: ``update_layer``, ``get_delta_weight``): convlora's tensors and
  scaling. PEFT has it for Linear, Conv1d and Conv2d only, and no rsLoRA.
* **LoKr** (``LoKrConfig``): ``lokr_w1`` or ``lokr_w1_a/b``, ``lokr_w2`` or ``lokr_w2_a/b``, PEFT building
  the shapes from ``r``, ``decompose_factor`` and ``decompose_both`` (:func:`peft_lokr_shapes`, a copy of
  ``LoKrLayer.update_layer``). Two differences from LyCORIS: the scaling is ``alpha / r`` even with no
  side factorised (convlora, as LyCORIS: 1), and PEFT's ``factorization`` does not order
  ``(factor, dim / factor)``. On Conv1d PEFT's ``make_kron`` leaves a full ``lokr_w2 (b, d, k)`` 3-D and
  ``lokr_w1`` 2-D, so ``torch.kron`` gives another matrix than LyCORIS's: refused both ways.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from convlora.formats.weights import LoRAFormatError, LoRAModule
from convlora.kinds import AdapterKind, LoHaAdapter, LoKrAdapter, factorization, lokr_rank_of, lokr_shapes

MAGNITUDE = "lora_magnitude_vector"
LOHA_NAMES = LoHaAdapter.factor_names
LOKR_NAMES = LoKrAdapter.ALL_FACTOR_NAMES
#: PEFT's ``peft_type`` for each convlora kind label PEFT folders carry.
PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "loha": "LOHA", "lokr": "LOKR"}
#: The PEFT tensors convlora has no counterpart for (``use_effective_conv2d=True``'s Tucker cores).
TUCKER_NAMES = ("hada_t1", "hada_t2", "lokr_t2")


# ---- DoRA ----------------------------------------------------------------------------------------
def magnitude_to_peft(module: LoRAModule) -> torch.Tensor:
    """convlora's ``magnitude (out,)`` in PEFT's layout: ``(out,)`` for Linear, ``(1, out, 1, ...)`` for ConvNd."""
    magnitude = module.factors["magnitude"]
    if module.lora_A.dim() <= 2:
        return magnitude
    return magnitude.reshape(1, -1, *(1,) * (module.lora_A.dim() - 2))


def magnitude_from_peft(tensor: torch.Tensor, lora_B: torch.Tensor, key: str, source: str) -> torch.Tensor:
    """PEFT's ``lora_magnitude_vector`` as convlora's ``(out,)``; ``lora_B (out, r, ...)`` gives ``out``."""
    out = int(lora_B.shape[0])
    layouts = [(out,), (1, out, *(1,) * (lora_B.dim() - 2))]
    if tuple(tensor.shape) not in layouts:
        raise LoRAFormatError(f"{source}: {key} has shape {tuple(tensor.shape)}; PEFT's DoRA magnitude for this "
                              f"module is {layouts[1] if lora_B.dim() > 2 else layouts[0]}")
    return tensor.reshape(out)


def dora_grouped_problems(modules: Mapping[str, LoRAModule]) -> list[str]:
    """``"path: groups=g"`` for DoRA modules on grouped convs (PEFT's DoRA gets those wrong)."""
    return [f"{p}: groups={m.geometry['groups']}" for p, m in modules.items()
            if m.kind.use_dora and (m.geometry or {}).get("groups", 1) > 1]


# ---- LoHa / LoKr: writing ------------------------------------------------------------------------
def lycoris_write_problems(modules: Mapping[str, LoRAModule], use_rslora: bool, fan_in_fan_out: bool) -> list[str]:
    """What PEFT's LoHa / LoKr layers cannot compute as convlora does, one entry per cause."""
    kind = next(iter(modules.values())).kind.name
    problems = []
    if use_rslora:
        problems.append(f"rsLoRA scaling (PEFT's {kind.capitalize()}Config has no use_rslora)")
    if fan_in_fan_out:
        problems.append(f"GPT-2 Conv1D layers (PEFT's {kind} has no fan_in_fan_out)")
    conv3d = sorted(p for p, m in modules.items() if m.base_shape is not None and len(m.base_shape) > 4)
    if conv3d:
        problems.append(f"Conv3d layers {', '.join(conv3d[:6])} (PEFT's {kind} adapts Linear, Conv1d and Conv2d)")
    conv1d_kron = sorted(p for p, m in modules.items() if is_peft_conv1d_full_kron(m.factors))
    if conv1d_kron:
        problems.append(f"Conv1d layers {', '.join(conv1d_kron[:6])} with a full lokr_w2 (PEFT's make_kron "
                        "computes kron(lokr_w1, lokr_w2) for a 3-D lokr_w2 differently)")
    return problems


def is_peft_conv1d_full_kron(factors: Mapping[str, torch.Tensor]) -> bool:
    """A LoKr whose full ``lokr_w2`` is 3-D (a Conv1d) and whose W1 is not ``(1, 1)``."""
    w2 = factors.get("lokr_w2")
    if w2 is None or w2.dim() != 3:
        return False
    w1 = factors["lokr_w1"] if "lokr_w1" in factors else factors["lokr_w1_a"] @ factors["lokr_w1_b"]
    return w1.numel() > 1


def peft_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's ``factorization`` (``tuners/lokr/layer.py``): LyCORIS's (:func:`convlora.kinds.factorization`),
    except that ``(factor, dimension / factor)`` for a dividing ``factor`` is returned unordered, and that
    only ``-1`` means "no limit" (any other negative ``factor`` stops at ``(1, dimension)``, as 0 does)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    return factorization(dimension, factor if factor >= -1 else 0)


def peft_lokr_shapes(delta_shape: Sequence[int], r: int, factor: int, decompose_both: bool) -> dict[str, tuple[int, ...]]:
    """The LoKr parameter shapes PEFT's ``LoKrLayer.update_layer`` builds for a base weight ``(out, in/g, *k)``
    (``use_effective_conv2d=False``): LyCORIS's rule (:func:`convlora.kinds.lokr_shapes`) with PEFT's
    :func:`peft_factorization`."""
    return lokr_shapes(delta_shape, r, factor, decompose_both, factorize=peft_factorization)


def lokr_peft_ranks(modules: Mapping[str, LoRAModule], base_shapes: Mapping[str, tuple[int, ...]]
                    ) -> tuple[int, bool, dict[str, int]]:
    """``(decompose_factor, decompose_both, {path: r})`` under which PEFT builds exactly these LoKr modules.

    A factorised module's ``r`` is its rank; the unfactorised ones share one ``r`` large enough that PEFT
    factorises neither side (the factorised modules' most common rank where that is large enough). Tries
    ``decompose_factor = -1`` first, then every factor size the modules use.

    Raises:
        LoRAFormatError: no single ``decompose_factor`` / ``decompose_both`` fits every module (named).
    """
    shapes = {p: {n: tuple(t.shape) for n, t in m.factors.items() if n in LOKR_NAMES} for p, m in modules.items()}
    sizes = set()
    for path, table in shapes.items():
        a, c = _w1_shape(table)
        sizes |= {a, c, base_shapes[path][0] // a, base_shapes[path][1] // c}
    for factor in (-1, *sorted(sizes)):
        for decompose_both in (False, True):
            ranks = _peft_ranks(shapes, base_shapes, decompose_both)
            if all(peft_lokr_shapes(base_shapes[p], ranks[p], factor, decompose_both) == shapes[p] for p in modules):
                return factor, decompose_both, ranks
    ranks = _peft_ranks(shapes, base_shapes, False)
    off = sorted(p for p in modules if peft_lokr_shapes(base_shapes[p], ranks[p], -1, False) != shapes[p])
    raise LoRAFormatError(
        "cannot export to PEFT: it builds every LoKr module's shapes from one decompose_factor and decompose_both, "
        f"and no choice gives these modules' shapes: {', '.join((off or sorted(modules))[:6])}. Save them with "
        "format='native' (convlora.save_lora) instead."
    )


def _peft_ranks(shapes: Mapping[str, Mapping[str, tuple[int, ...]]], base_shapes: Mapping[str, Sequence[int]],
                decompose_both: bool) -> dict[str, int]:
    """Each module's PEFT ``r``: its rank if factorised, else one shared ``r >= max(b, d) / 2`` (and ``>= max(a,
    c) / 2`` with ``decompose_both``), for which PEFT keeps both sides full."""
    ranks = {p: lokr_rank_of(base_shapes[p], table) for p, table in shapes.items()}
    needed = 1
    for path, table in shapes.items():
        if ranks[path] is None:
            a, c = _w1_shape(table)
            b, d = table["lokr_w2"][:2]
            needed = max(needed, math.ceil(max(b, d) / 2), math.ceil(max(a, c) / 2) if decompose_both else 1)
    fixed = Counter(r for r in ranks.values() if r is not None).most_common(1)
    shared = fixed[0][0] if fixed and fixed[0][0] >= needed else needed
    return {p: shared if r is None else r for p, r in ranks.items()}


def _w1_shape(table: Mapping[str, tuple[int, ...]]) -> tuple[int, int]:
    """``(a, c)``: W1's shape from ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``."""
    if "lokr_w1" in table:
        return tuple(table["lokr_w1"])
    return table["lokr_w1_a"][0], table["lokr_w1_b"][1]


def lokr_base_shape(module: LoRAModule, path: str) -> tuple[int, ...]:
    """The base weight shape ``(out, in/g, *k)`` of a LoKr module: recorded, or implied by a full ``lokr_w2``.

    Raises:
        LoRAFormatError: neither (a factorised ``lokr_w2_b`` does not tell the kernel from the channels).
    """
    if module.base_shape is not None:
        return tuple(module.base_shape)
    table = {n: tuple(t.shape) for n, t in module.factors.items() if n in LOKR_NAMES}
    if "lokr_w2" not in table:
        raise LoRAFormatError(f"{path}: this LoKr module's base weight shape is not known (its source did not record "
                              "it), so its PEFT rank cannot be chosen; load it into its model and save from there")
    a, c = _w1_shape(table)
    b, d, *kernel = table["lokr_w2"]
    return (a * b, c * d, *kernel)


def lycoris_config(modules: Mapping[str, LoRAModule], ranks: Mapping[str, int]) -> dict[str, Any]:
    """``r`` / ``alpha`` / ``rank_pattern`` / ``alpha_pattern`` / ``target_modules`` of a LoHa / LoKr config
    giving each module its rank and scaling (a LoKr module with neither side factorised: ``alpha = r``,
    PEFT's scaling 1 being convlora's)."""
    alphas = {p: (float(ranks[p]) if _unfactorised_lokr(m) else m.alpha) for p, m in modules.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": rank,
        "alpha": _number(alpha),
        "target_modules": sorted(modules),
        "rank_pattern": {p: r for p, r in sorted(ranks.items()) if r != rank},
        "alpha_pattern": {p: _number(a) for p, a in sorted(alphas.items()) if a != alpha},
    }


def _unfactorised_lokr(module: LoRAModule) -> bool:
    return module.kind.name == "lokr" and not {"lokr_w1_a", "lokr_w2_a"} & set(module.factors)


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


# ---- LoHa / LoKr: reading ------------------------------------------------------------------------
def lycoris_module(path: str, tensors: Mapping[str, torch.Tensor], peft_type: str, r: int | None, alpha: float | None,
                   base_shape: tuple[int, ...] | None, source: str) -> LoRAModule:
    """One LoHa / LoKr module of a PEFT folder as neutral weights.

    ``r`` / ``alpha``: what the config gives this module (``None``: no config; alpha is then the rank). A LoKr module with
    neither side factorised runs at PEFT's ``alpha / r``; convlora's runs at 1, so ``lokr_w1`` is scaled
    by ``alpha / r`` when that is not exactly 1.

    Raises:
        LoRAFormatError: Tucker tensors (``use_effective_conv2d``), a LoKr Conv1d with a full
            ``lokr_w2`` (PEFT computes it differently), or a rank that disagrees with the config.
    """
    tucker = [n for n in TUCKER_NAMES if n in tensors]
    if tucker:
        raise LoRAFormatError(f"{source}: {path} has {', '.join(tucker)}: PEFT's use_effective_conv2d (Tucker) "
                              "form, which convlora does not have")
    not_float = [n for n, t in tensors.items() if not t.is_floating_point()]
    if not_float:
        raise LoRAFormatError(f"{source}: {path}: {', '.join(not_float)} must be floating point")
    factors = dict(tensors)
    if peft_type == "LOHA":
        return _loha_module(path, factors, r, alpha, base_shape, source)
    if is_peft_conv1d_full_kron(factors):
        raise LoRAFormatError(f"{source}: {path} is a Conv1d LoKr with a full lokr_w2 {tuple(factors['lokr_w2'].shape)}: "
                              "PEFT's make_kron computes kron(lokr_w1, lokr_w2) for it differently from LyCORIS, "
                              "so convlora cannot load it as the function PEFT runs")
    factorised = factors.get("lokr_w2_a", factors.get("lokr_w1_a"))
    rank = int(factorised.shape[1]) if factorised is not None else None
    if rank is not None and r is not None and rank != r:
        raise LoRAFormatError(f"{source}: {path} has LoKr rank {rank} but the config gives it r={r}")
    if rank is not None and alpha is None:
        alpha = float(rank)
    if rank is None and r is not None and alpha / r != 1.0:
        factors["lokr_w1"] = factors["lokr_w1"] * (alpha / r)  # PEFT's scaling, which convlora's unfactorised LoKr lacks
    return LoRAModule(None, None, alpha if rank is not None else 1.0, kind=AdapterKind("lokr"), factors=factors,
                      base_shape=base_shape)


def _loha_module(path, factors, r, alpha, base_shape, source) -> LoRAModule:
    missing = [n for n in LOHA_NAMES if n not in factors]
    if missing:
        raise LoRAFormatError(f"{source}: {path} is LoHa without {', '.join(missing)}")
    w1a, w1b, w2a, w2b = (factors[n] for n in LOHA_NAMES)
    rank = int(w1b.shape[0]) if w1b.dim() == 2 else -1
    if any(t.dim() != 2 for t in (w1a, w1b, w2a, w2b)) or w1a.shape != w2a.shape or w1b.shape != w2b.shape \
            or w1a.shape[1] != rank:
        raise LoRAFormatError(f"{source}: {path} LoHa factors {[tuple(t.shape) for t in (w1a, w1b, w2a, w2b)]} are "
                              "not hada_w?_a (out, r) and hada_w?_b (r, in) of one rank")
    if r is not None and rank != r:
        raise LoRAFormatError(f"{source}: {path} has LoHa rank {rank} but the config gives it r={r}")
    return LoRAModule(None, None, float(rank) if alpha is None else alpha, kind=AdapterKind("loha"), factors=factors, base_shape=base_shape)
