"""Low-rank algebra on neutral LoRA weights: SVD of ΔW, rank selection, resizing and merging.

Every function works on :class:`convlora.formats.LoRAWeights` / :class:`LoRAModule` (convlora's
layout, README "LoRA math") and returns new objects; nothing touches a model or a file.

One rule for convs of any dimension and any ``groups``: ΔW is the matrix
``(C_out, C_in/groups · ∏k)`` (Linear: ``(out, in)``), ``ΔW = s · B @ A`` with A and B flattened
and ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). A new rank-k factorisation is folded back
into the LoCon layout ``A (k, C_in/groups, *k)``, ``B (C_out, k, *1s)``.

SVD routes (measured in ``benchmarks/svd_routes.py``, README "SVD routes"):

* :func:`factored_svd` — ΔW given as ``B @ A`` has rank ≤ r, so QR of ``B`` and ``Aᵀ`` and a full
  SVD of the small ``r × r`` core give ΔW's exact thin SVD in ``O((m + n) r²)``; used by resize and
  merge-loras.
* :func:`dense_svd` — a dense ΔW (extract): LAPACK's full thin SVD, the exact route; the randomized
  ``torch.svd_lowrank`` misses the best rank-k approximation by more than 1e-4 on a full-rank
  difference (measured), so it is not used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from convlora.formats.weights import LoRAFormatError, LoRAModule, LoRAWeights
from convlora.state import checked_rank, scaling_for

__all__ = [
    "DYNAMIC_METHODS",
    "ModuleResize",
    "choose_rank",
    "dense_svd",
    "factored_svd",
    "lora_from_svd",
    "merge_loras",
    "resize_lora",
    "resize_module",
]

#: kohya's ``--dynamic_method`` names (sd-scripts ``networks/resize_lora.py``).
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")

#: A module whose largest singular value is at most this is zero (kohya's ``MIN_SV``): rank 1.
MIN_SINGULAR_VALUE = 1e-6


@dataclass(frozen=True)
class ModuleResize:
    """What resizing did to one module."""

    path: str
    old_rank: int
    new_rank: int
    fro_retained: float
    """``‖ΔW_new‖_F / ‖ΔW‖_F`` (1.0 for a module kept as it was)."""


# ---- SVD -----------------------------------------------------------------------------------------
def factored_svd(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact thin SVD of ``ΔW = scaling · B @ A`` without forming ΔW.

    ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (reduced QR), so ``ΔW = Q_B (scaling · R_B R_Aᵀ) Q_Aᵀ``
    and the SVD of the ``r × r`` core ``U_c S V_cᵀ`` gives ``U = Q_B U_c``, ``V = Q_A V_c``.
    Computed in float64 (the matrices are ``(m + n) × r``, cheap).

    Args:
        lora_A: ``(r, in)`` or ``(r, C_in/groups, *k)``.
        lora_B: ``(out, r)`` or ``(C_out, r, *1s)``.

    Returns:
        ``U (m, r)``, ``S (r,)`` descending, ``Vh (r, n)`` in float64, with ``m = out`` and
        ``n = in`` (``C_in/groups · ∏k``), ``U diag(S) Vh = ΔW`` flattened.
    """
    a = lora_A.detach().double().flatten(1)  # (r, n)
    b = lora_B.detach().double().flatten(1)  # (m, r)
    q_b, r_b = torch.linalg.qr(b)  # (m, r), (r, r)
    q_a, r_a = torch.linalg.qr(a.T)  # (n, r), (r, r)
    u_core, s, vh_core = torch.linalg.svd(scaling * (r_b @ r_a.T))  # (r, r) each
    return q_b @ u_core, s, vh_core @ q_a.T  # (m, r), (r,), (r, n)


def dense_svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of a dense ΔW ``(out, in)`` or ``(C_out, C_in/groups, *k)`` (flattened), in float32.

    Returns:
        ``U (m, q)``, ``S (q,)`` descending, ``Vh (q, n)`` with ``q = min(m, n)``.
    """
    matrix = delta.detach().float().flatten(1)  # (m, n)
    return torch.linalg.svd(matrix, full_matrices=False)


def lora_from_svd(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, scaling: float, a_tail: Sequence[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors of the rank-``rank`` truncation ``U_k diag(S_k) Vh_k``, for a layer with ``scaling``.

    The singular values are split evenly, ``B = U_k √(S_k/scaling)``, ``A = √(S_k/scaling) Vh_k``, so
    ``scaling · B @ A`` is the truncation and A and B have the same magnitude.

    Args:
        a_tail: A's shape after the rank: ``(in,)`` or ``(C_in/groups, *k)``.

    Returns:
        ``lora_A (rank, *a_tail)``, ``lora_B (m, rank)`` or ``(m, rank, *1s)`` for convs, in ``dtype``.
    """
    root = (s[:rank] / scaling).sqrt()  # (k,)
    lora_b = u[:, :rank] * root  # (m, k)
    lora_a = root[:, None] * vh[:rank]  # (k, n)
    ones = (1,) * (len(a_tail) - 1)
    return lora_a.reshape(rank, *a_tail).to(dtype), lora_b.reshape(u.shape[0], rank, *ones).to(dtype)


# ---- rank selection ------------------------------------------------------------------------------
def choose_rank(s: torch.Tensor, max_rank: int, method: str | None = None, param: float | None = None) -> int:
    """The rank kohya's ``resize_lora.py`` keeps for singular values ``s`` (descending).

    Without ``method``: ``max_rank``. With a method, ``k`` is the fewest singular values meeting
    its criterion and kohya keeps ``k + 1`` of them (its index functions count, then ``+ 1``):

    * ``sv_ratio``: ``k = #{σ_i > σ_1 / param}`` (``param`` ≥ 1, the largest ratio σ_1/σ_i kept);
    * ``sv_cumulative``: fewest ``k`` with ``Σ_{i≤k} σ_i / Σ σ_i ≥ param`` (``0 < param ≤ 1``);
    * ``sv_fro``: fewest ``k`` with ``√(Σ_{i≤k} σ_i²) / ‖σ‖ ≥ param`` (``0 < param ≤ 1``).

    Then, as kohya: ``max_rank`` caps the result, a zero matrix (``σ_1 ≤ 1e-6``) gets rank 1; and,
    beyond kohya, ``len(s)`` caps it (``s`` holds every non-zero singular value of a LoRA's ΔW, so
    the values kohya could add beyond it are zero).
    """
    n = len(s)
    if method is None:
        rank = max_rank
    elif method == "sv_ratio":
        rank = int((s > s[0] / param).sum()) + 1
    elif method == "sv_cumulative":
        rank = _fewest_reaching(torch.cumsum(s, 0) / s.sum(), param) + 1
    elif method == "sv_fro":
        rank = _fewest_reaching(torch.cumsum(s**2, 0) / (s**2).sum(), param**2) + 1
    else:
        raise ValueError(f"unknown dynamic method {method!r}: choose one of {', '.join(DYNAMIC_METHODS)}")
    if n == 0 or float(s[0]) <= MIN_SINGULAR_VALUE:
        return 1
    return max(1, min(rank, max_rank, n))


def _fewest_reaching(fractions: torch.Tensor, target: float) -> int:
    """The fewest leading entries whose cumulative fraction reaches ``target`` (all if none does)."""
    return min(int(torch.searchsorted(fractions, torch.tensor(target, dtype=fractions.dtype))) + 1, len(fractions))


def check_dynamic(method: str | None, param: float | None) -> None:
    """Refuse a dynamic method that is unknown, or a parameter outside its range.

    Raises:
        ValueError: naming the method and the parameter.
    """
    if method is None:
        if param is not None:
            raise ValueError("--dynamic_param needs --dynamic sv_ratio|sv_fro|sv_cumulative")
        return
    if method not in DYNAMIC_METHODS:
        raise ValueError(f"unknown dynamic method {method!r}: choose one of {', '.join(DYNAMIC_METHODS)}")
    if param is None or not math.isfinite(param):
        raise ValueError(f"--dynamic {method} needs a finite --dynamic_param")
    if method == "sv_ratio" and param < 1:
        raise ValueError(f"--dynamic sv_ratio: --dynamic_param is the largest ratio σ_1/σ_k kept and must be >= 1, got {param}")
    if method != "sv_ratio" and not 0 < param <= 1:
        raise ValueError(f"--dynamic {method}: --dynamic_param is a fraction and must be in (0, 1], got {param}")


# ---- resize --------------------------------------------------------------------------------------
def resize_module(
    module: LoRAModule, max_rank: int, use_rslora: bool, method: str | None = None, param: float | None = None
) -> tuple[LoRAModule, float]:
    """``module`` at the rank :func:`choose_rank` picks, as the best approximation of that rank (Eckart–Young).

    The scaling stays what it was (kohya's rule: new ``alpha = (alpha/r) · k``; with rsLoRA
    ``alpha/√r · √k``), the singular values are split evenly between A and B. A module whose rank
    is already at most the chosen one is returned unchanged (the same tensors).

    Returns:
        ``(new module, retained Frobenius share ‖ΔW_k‖_F / ‖ΔW‖_F)``.
    """
    scaling = scaling_for(module.r, module.alpha, use_rslora)
    u, s, vh = factored_svd(module.lora_A, module.lora_B, scaling)
    rank = choose_rank(s, max_rank, method, param)
    if rank >= module.r:
        return module, 1.0
    total = float(s.square().sum())
    retained = math.sqrt(float(s[:rank].square().sum()) / total) if total > 0 else 1.0
    alpha = scaling * (math.sqrt(rank) if use_rslora else rank)
    lora_a, lora_b = lora_from_svd(u, s, vh, rank, scaling, module.lora_A.shape[1:], module.lora_A.dtype)
    return LoRAModule(lora_a, lora_b, alpha, module.geometry), retained


def resize_lora(
    weights: LoRAWeights,
    rank: int,
    conv_rank: int | None = None,
    method: str | None = None,
    param: float | None = None,
) -> tuple[LoRAWeights, list[ModuleResize]]:
    """Every module of ``weights`` resized by :func:`resize_module`: linear and 1×1 convs to at most
    ``rank``, k×k convs to at most ``conv_rank`` (default ``rank``; kohya's ``--new_conv_rank``).

    Returns:
        ``(resized weights with the same metadata and rsLoRA flag, one report per module)``.
    """
    checked_rank(rank, "--rank")
    conv_rank = checked_rank(rank if conv_rank is None else conv_rank, "--conv-rank")
    check_dynamic(method, param)
    check_plain_lora(weights.modules, "resize")
    modules, report = {}, []
    for path, module in weights.modules.items():
        limit = conv_rank if module.is_spatial_conv else rank
        modules[path], retained = resize_module(module, limit, weights.use_rslora, method, param)
        report.append(ModuleResize(path, module.r, modules[path].r, retained))
    return LoRAWeights(modules, weights.use_rslora, dict(weights.metadata)), report


# ---- merge ---------------------------------------------------------------------------------------
def merge_loras(inputs: Sequence[tuple[LoRAWeights, float]], sources: Sequence[str] | None = None) -> LoRAWeights:
    """``Σ wᵢ ΔWᵢ`` per module, exactly, by concatenating ranks.

    For a module in files ``i = 1..n`` (weight ``wᵢ``, scaling ``sᵢ`` from its own alpha, rank and
    rsLoRA flag): ``A = [A₁; …; Aₙ]`` (rank ``R = Σ rᵢ``), ``B = [c₁B₁, …, cₙBₙ]`` with
    ``cᵢ = wᵢ sᵢ / s`` and ``s`` the scaling of the first contributing file's module; the new alpha
    gives that scaling at rank R (``s·R``, rsLoRA ``s·√R``). So ``s · B @ A = Σ wᵢ sᵢ Bᵢ Aᵢ``, and a
    module of one file with weight 1 keeps its tensors. A zero weight drops that file's modules.
    The rsLoRA flag, metadata and each module's geometry come from the first file.

    Raises:
        LoRAFormatError: one path with different shapes or conv geometries in two files, inputs that
            mix single-model and pipeline paths, or nothing left to merge — named.
    """
    sources = list(sources or [f"input {i + 1}" for i in range(len(inputs))])
    _check_same_kind(inputs, sources)
    for (weights, _), source in zip(inputs, sources):
        check_plain_lora(weights.modules, f"merge-loras ({source})")
    use_rslora = inputs[0][0].use_rslora
    parts: dict[str, list[tuple[LoRAModule, float, str]]] = {}
    for (weights, weight), source in zip(inputs, sources):
        if weight == 0:
            continue
        for path, module in weights.modules.items():
            parts.setdefault(path, []).append((module, weight * scaling_for(module.r, module.alpha, weights.use_rslora), source))
    if not parts:
        raise LoRAFormatError("nothing to merge: every weight is 0")
    modules = {path: _merged_module(path, contributions, use_rslora) for path, contributions in parts.items()}
    return LoRAWeights(modules, use_rslora, dict(inputs[0][0].metadata))


def _merged_module(path: str, contributions: list[tuple[LoRAModule, float, str]], use_rslora: bool) -> LoRAModule:
    """One module of :func:`merge_loras`; ``contributions`` are ``(module, wᵢ·sᵢ, source)``."""
    first, first_scaled, first_source = contributions[0]
    for module, _, source in contributions[1:]:
        if module.lora_A.shape[1:] != first.lora_A.shape[1:] or module.lora_B.shape[0] != first.lora_B.shape[0]:
            raise LoRAFormatError(
                f"{path}: {first_source} has lora_A {tuple(first.lora_A.shape)} / lora_B {tuple(first.lora_B.shape)}, "
                f"{source} has lora_A {tuple(module.lora_A.shape)} / lora_B {tuple(module.lora_B.shape)}: not the same layer"
            )
        if first.geometry and module.geometry and first.geometry != module.geometry:
            raise LoRAFormatError(f"{path}: conv geometry {first.geometry} in {first_source}, {module.geometry} in {source}")
    scaling = scaling_for(first.r, first.alpha, use_rslora)  # the merged module's scaling s
    if len(contributions) == 1 and first_scaled == scaling:
        return first  # one file, w·s₁ = s: its tensors and alpha as they are
    dtype = _common_dtype([m for m, _, _ in contributions])
    lora_a = torch.cat([m.lora_A.to(dtype) for m, _, _ in contributions])  # (R, *a_tail)
    lora_b = torch.cat([(m.lora_B.double() * (scaled / scaling)).to(dtype) for m, scaled, _ in contributions], dim=1)
    rank = lora_a.shape[0]
    alpha = scaling * (math.sqrt(rank) if use_rslora else rank)
    return LoRAModule(lora_a, lora_b, alpha, first.geometry or next((m.geometry for m, _, _ in contributions if m.geometry), None))


def check_plain_lora(modules: Mapping[str, LoRAModule], what: str) -> None:
    """The low-rank tools work on LoRA's ``B @ A``: refuse other adapter kinds (LoHa, LoKr, DoRA).

    Raises:
        LoRAFormatError: naming the kinds and a few of their modules.
    """
    other: dict[str, list[str]] = {}
    for path, module in modules.items():
        if not module.is_plain_lora:
            other.setdefault(module.kind.label, []).append(path)
    if other:
        found = "; ".join(f"{label}: {', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}" for label, paths in other.items())
        raise LoRAFormatError(f"{what} works on plain LoRA (B @ A); these modules are other adapter kinds: {found}")


def _common_dtype(modules: list[LoRAModule]) -> torch.dtype:
    dtype = modules[0].lora_A.dtype
    for module in modules:
        dtype = torch.promote_types(torch.promote_types(dtype, module.lora_A.dtype), module.lora_B.dtype)
    return dtype


def _check_same_kind(inputs: Sequence[tuple[LoRAWeights, float]], sources: Sequence[str]) -> None:
    """All inputs adapt a pipeline (component prefixes) or all a single model (none)."""
    kinds = {source: bool(weights.components()) for (weights, _), source in zip(inputs, sources)}
    if len(set(kinds.values())) > 1:
        single = [s for s, is_pipeline in kinds.items() if not is_pipeline]
        raise LoRAFormatError(
            f"{', '.join(single)} adapt(s) a single model, the other inputs a pipeline; convert it with "
            "`convlora convert --to native --component unet|text_encoder` first"
        )
    for (weights, _), source in zip(inputs, sources):
        if weights.components() and weights.unprefixed():
            raise LoRAFormatError(f"{source} mixes paths with and without a pipeline component prefix")


# ---- metadata ------------------------------------------------------------------------------------
#: Header keys that hash the tensors (kohya's); stale once the tensors change, so they are dropped.
TENSOR_HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")


def annotated(weights: LoRAWeights, note: str) -> LoRAWeights:
    """``weights`` with metadata that describes its new tensors.

    ``note`` is put in front of kohya's ``ss_training_comment`` (as kohya's resize does; A1111 and
    ComfyUI show it); rank / alpha entries already present (convlora's ``rank``, ``alpha``,
    ``conv_rank``, ``conv_alpha``, kohya's ``ss_network_dim`` / ``ss_network_alpha``) get the most
    common new values; tensor hashes (:data:`TENSOR_HASH_KEYS`) are dropped.
    """
    metadata = {k: v for k, v in weights.metadata.items() if k not in TENSOR_HASH_KEYS}
    comment = metadata.get("ss_training_comment", "")
    metadata["ss_training_comment"] = f"{note}; {comment}" if comment else note
    rank, alpha, conv_rank, conv_alpha = weights.most_common()
    described = {"rank": rank, "alpha": alpha, "ss_network_dim": rank, "ss_network_alpha": alpha,
                 "conv_rank": conv_rank, "conv_alpha": conv_alpha}  # fmt: skip
    for key, value in described.items():
        if key in metadata and value is not None:
            metadata[key] = f"{value:g}" if isinstance(value, float) else str(value)
    return LoRAWeights(weights.modules, weights.use_rslora, metadata)
