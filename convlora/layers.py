"""LoRA layers that *are* their torch layers, each holding one or more named adapters.

``convlora.Conv2d`` subclasses ``nn.Conv2d``: it owns the base ``weight`` / ``bias`` under their
original names and adds ``lora_adapters``, an ``nn.ModuleDict`` of :class:`LoRAAdapter` modules
(``"default"`` unless named otherwise), each with its own ``lora_A``, ``lora_B``, rank, alpha, rsLoRA
flag and ``weight``. The adapted weight is ``W + Σ_i w_i s_i ΔW_i`` over the *active* adapters, with
``ΔW_i = B_i @ A_i`` (flattened; see :func:`convlora.state.delta_weight`) and ``s_i = alpha_i / r_i``
(``/ sqrt(r_i)`` with rsLoRA). With one adapter this is today's ``W + s ΔW``; the layer's
``lora_A`` / ``lora_B`` / ``r`` / ``lora_alpha`` / ``use_rslora`` / ``scaling`` answer for its single
active adapter (a named error when several are active).

Adapters of other kinds (LoHa, LoKr, and DoRA on any kind: :mod:`convlora.kinds`) sit in the same
dict; each contributes ``w_i D_i``, its own update in the base weight's layout, so the sum, the
merge and the bit-exact unmerge below are the same for every kind.

Shapes (the README's LoRA math section; :meth:`LoRALayer.lora_shapes_for` is the one place they are computed):
    Linear ``W (out, in)``:              ``lora_A (r, in)``,             ``lora_B (out, r)``
    ConvNd ``W (C_out, C_in/g, *k)``:    ``lora_A (r, C_in/g, *k)``,     ``lora_B (C_out, r, *1s)``
    GPT-2 ``Conv1D`` ``W (in, out)``:    ``lora_A (r, in)``,             ``lora_B (out, r)``

Merge-on-eval (loralib's contract, made exact): ``eval()`` merges ``Σ w_i s_i ΔW_i`` into the weight
(the sum is computed in float32 in :meth:`LoRALayer.delta_weight` and cast back once; a result that is
not finite *in the weight's own dtype* is refused and changes nothing), ``train()`` restores the weight
**bit-exactly** from a copy taken at merge time, so no drift accumulates over any number of cycles in
any dtype. While merged, ``state_dict()`` still reports the base weight, so a checkpoint taken in eval
mode is a clean base + adapters.

A merged layer stays true to its adapters: when the active set, any active A, B, alpha, rsLoRA flag or
weight changed since the merge (an optimizer step in eval mode, a load, ``set_adapters``) the next
forward merges again from the saved base weight. ``eval()`` itself never raises: a layer that cannot be
merged (sharded, quantized, tied to another module's weight, or non-finite once merged) runs unmerged,
with one warning naming why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D as HFConv1D

from convlora import fused
from convlora.kinds import LORA, AdapterBase, AdapterKind, LoRAAdapter, checked_adapter_weight, dora_gain, make_adapter
from convlora.quant import QuantizedWeight, frozen_weight, is_quantized
from convlora.state import checked_rank

#: The name an adapter gets when none is given (as in PEFT and diffusers).
DEFAULT_ADAPTER = "default"

_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """One warning per distinct message per process (merge-on-eval notices would repeat per layer)."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def checked_adapter_name(name: object) -> str:
    """``name`` if it can name an adapter: a non-empty string without ``.``, ``/`` or ``\\`` (it becomes a
    module name and, in :func:`convlora.save_all_adapters`, a file name).

    Raises:
        ValueError: naming the value.
    """
    if not isinstance(name, str) or not name.strip() or any(c in name for c in "./\\"):
        raise ValueError(f"an adapter name must be a non-empty string without '.', '/' or '\\', got {name!r}")
    return name


class LoRALayer:
    """Behaviour shared by every LoRA layer; mixed in before the torch class it adapts.

    Attributes:
        lora_adapters: ``nn.ModuleDict`` name -> adapter (:class:`convlora.kinds.AdapterBase`: LoRA, LoHa,
            LoKr, with or without DoRA), in the order they were added.
        active_adapters: the names whose ``w * s * B A`` the layer adds (set with :meth:`set_active_adapters`).
        merge_weights: whether ``eval()`` merges and ``train()`` unmerges.
        merged: whether ``Σ w_i s_i ΔW_i`` of the active adapters is currently inside ``weight``.
        lora_disabled: when True the layer computes the base output only.

    ``lora_A``, ``lora_B``, ``r``, ``lora_alpha``, ``use_rslora``, ``scaling`` and ``lora_dropout`` are
    those of :meth:`adapter` (the single active adapter). Setting ``scaling`` sets that adapter's
    ``weight`` to ``scaling / (alpha / r)``; the layer never stores a scaling of its own.
    """

    torch_class: type[nn.Module]  # the plain torch class this LoRA class adapts

    # ---- construction -------------------------------------------------------------------------
    def _init_lora(
        self,
        r: int,
        lora_alpha: float | None,
        lora_dropout: float,
        merge_weights: bool,
        init: str = "kaiming",
        use_rslora: bool = False,
        adapter_name: str | None = DEFAULT_ADAPTER,
        kind: AdapterKind = LORA,
    ) -> None:
        self.merge_weights = merge_weights
        self.merged = False
        self.lora_disabled = False
        self.lora_adapters = nn.ModuleDict()
        self._active_adapters: tuple[str, ...] = ()
        # The exact pre-merge weight while merged; non-persistent, so never saved.
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self._merged_lora: _MergeRecord | None = None  # the adapters the merge was made with
        if adapter_name is not None:
            self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, init=init, use_rslora=use_rslora, kind=kind)

    @classmethod
    def lora_shapes_for(cls, base: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(lora_A shape, lora_B shape)`` of a rank-``r`` adapter on ``base`` (this class's torch
        layer, or a LoRA layer of this class); read from ``base.weight``'s shape, so a ``meta`` module works."""
        raise NotImplementedError

    @classmethod
    def base_shape_for(cls, a_shape: Sequence[int], b_shape: Sequence[int]) -> tuple[int, ...]:
        """The base weight shape implied by an adapter's A and B shapes (the inverse of :meth:`lora_shapes_for`):
        ``(out, in)`` for Linear, ``(C_out, C_in/g, *k)`` for ConvNd."""
        return (int(b_shape[0]), *(int(s) for s in a_shape[1:]))

    @classmethod
    def delta_shape_for(cls, base: nn.Module) -> tuple[int, ...]:
        """The delta layout of ``base``'s weight, ``(out, in/g, *k)`` (every kind's ΔW has this shape)."""
        return tuple(frozen_weight(base).shape)

    def _to_delta_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """This layer's weight layout -> ``(out, in/g, *k)`` (the inverse of :meth:`_delta_to_weight_layout`)."""
        return weight

    def dense_base_weight(self) -> torch.Tensor:
        """The base weight as a dense tensor in the delta layout (a quantized base dequantized; while
        merged, the saved pre-merge weight)."""
        weight = self._unmerged_weight if getattr(self, "merged", False) else frozen_weight(self)
        if isinstance(weight, QuantizedWeight):
            weight = weight.dequantize()
        return self._to_delta_layout(weight)

    @classmethod
    def from_module(
        cls,
        base: nn.Module,
        r: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        merge_weights: bool = True,
        init: str = "kaiming",
        use_rslora: bool = False,
        adapter_name: str | None = DEFAULT_ADAPTER,
        kind: AdapterKind = LORA,
    ) -> "LoRALayer":
        """Wrap an existing layer, sharing its ``weight`` / ``bias`` tensors (nothing re-initialised),
        with one adapter named ``adapter_name`` of ``kind`` (LoRA unless given; ``None``: no adapter yet,
        add one with :meth:`add_adapter`).

        The new layer takes over the base module's attributes, parameters, buffers and hooks; the
        base module itself is left as it was.

        Raises:
            TypeError: if ``base`` is not exactly ``cls.torch_class`` (a subclass may override
                ``forward`` in ways a LoRA layer cannot know about).
        """
        if type(base) is not cls.torch_class:
            raise TypeError(
                f"{cls.__module__}.{cls.__name__}.from_module needs a {cls.torch_class.__module__}."
                f"{cls.torch_class.__name__}, got {type(base).__module__}.{type(base).__name__}"
            )
        layer = cls.__new__(cls)
        layer.__dict__.update(_copy_module_state(base.__dict__))
        layer._init_lora(r, alpha, dropout, merge_weights, init=init, use_rslora=use_rslora, adapter_name=adapter_name,
                         kind=kind)
        return layer

    def to_base_layer(self, merge: bool) -> nn.Module:
        """A plain torch layer sharing this layer's base tensors, with the active adapters merged in or dropped.

        Used by :func:`convlora.merge_and_unload` and :func:`convlora.unload`.
        """
        if merge:
            self.merge()
        else:
            self.unmerge()
        state = _copy_module_state(self.__dict__)
        state["_modules"].pop("lora_adapters")
        state["_buffers"].pop("_unmerged_weight")
        state["_non_persistent_buffers_set"].discard("_unmerged_weight")
        for name in _LORA_ATTRIBUTES:
            state.pop(name, None)
        base = self.torch_class.__new__(self.torch_class)
        base.__dict__.update(state)
        return base

    # ---- adapters: add, delete, activate ----------------------------------------------------------
    def add_adapter(
        self, name: str, r: int, lora_alpha: float | None = None, lora_dropout: float = 0.0,
        init: str = "kaiming", use_rslora: bool = False, kind: AdapterKind = LORA,
        lokr_shapes: Mapping[str, Sequence[int]] | None = None,
    ) -> AdapterBase:
        """Add an adapter of ``kind`` (its update starts at zero, so outputs are unchanged) and make it
        the only active one. ``lokr_shapes``: a LoKr adapter's parameter shapes (as a file gives them).

        Raises:
            ValueError: a bad name, rank, alpha, dropout or kind option, or a name the layer already has.
        """
        checked_adapter_name(name)
        if name in self.lora_adapters:
            raise ValueError(f"{self._describe()} already has an adapter named {name!r}")
        r = checked_rank(r, "LoRA rank r")
        weight = frozen_weight(self)  # a quantized base gives its compute dtype
        factory = {"dtype": weight.dtype, "device": weight.device}
        adapter = make_adapter(
            kind, delta_shape=self.delta_shape_for(self), lora_shapes=self.lora_shapes_for(self, r), r=r,
            lora_alpha=lora_alpha, dropout=lora_dropout, use_rslora=use_rslora, init=init, factory=factory,
            owner=self._describe(), base_weight=self.dense_base_weight() if kind.use_dora else None,
            lokr=lokr_shapes,
        )
        self._set_active((name,), lambda: self.lora_adapters.__setitem__(name, adapter))
        return adapter

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (the others are untouched); a merged layer re-merges the rest."""
        if name not in self.lora_adapters:
            raise ValueError(f"{self._describe()} has no adapter {name!r} (it has {_names(self.lora_adapters)})")
        active = tuple(n for n in self._active_adapters if n != name)
        self._set_active(active, lambda: self.lora_adapters.pop(name))

    @property
    def active_adapters(self) -> tuple[str, ...]:
        return self._active_adapters

    def set_active_adapters(self, names: Iterable[str], weights: Mapping[str, float] | None = None) -> None:
        """Make exactly ``names`` active (in that order), optionally setting adapters' weights first; a
        merged layer (or one in eval mode that had nothing to merge) is merged again from its saved base.

        Raises:
            ValueError: a name the layer does not have, a name given twice, a non-finite weight; nothing changed.
        """
        names = tuple(names)
        weights = dict(weights or {})
        unknown = [n for n in (*names, *weights) if n not in self.lora_adapters]
        if unknown:
            raise ValueError(f"{self._describe()} has no adapter(s) {_names(unknown)} (it has {_names(self.lora_adapters)})")
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names given twice: {_names(names)}")
        for name, value in weights.items():
            checked_adapter_weight(value, f"weight of adapter {name!r}")

        def set_weights() -> None:
            for name, value in weights.items():
                self.lora_adapters[name].weight = value

        self._set_active(names, set_weights)

    def _set_active(self, names: tuple[str, ...], change: Callable[[], object] | None = None) -> None:
        """Set the active names (after running ``change``), unmerged while they change, merged again after
        if it was merged or, in eval mode with merge-on-eval, had no adapter to merge before."""
        remerge = self.merged or (
            not self._active_adapters and len(self.lora_adapters) > 0
            and self.merge_weights and not self.training and not self.lora_disabled
        )
        self.unmerge()
        if change is not None:
            change()
        self._active_adapters = names
        if remerge:
            self._merge_or_run_unmerged()

    def adapter(self, name: str | None = None) -> AdapterBase:
        """Adapter ``name``; ``None``: the single active adapter (or the only one, when none is active).

        Raises:
            AttributeError: the layer holds no adapter (so ``hasattr(layer, "lora_A")`` is False).
            ValueError: ``name`` is not one of the layer's adapters, or ``None`` is ambiguous (several active).
        """
        if name is not None:
            if name not in self.lora_adapters:
                raise ValueError(f"{self._describe()} has no adapter {name!r} (it has {_names(self.lora_adapters)})")
            return self.lora_adapters[name]
        names = self._active_adapters or tuple(self.lora_adapters)
        if len(names) == 1:
            return self.lora_adapters[names[0]]
        if not names:
            raise AttributeError(f"{self._describe()} holds no LoRA adapter")
        raise ValueError(
            f"{self._describe()} has several active adapters ({_names(names)}); name one: layer.adapter(name)"
        )

    def _active(self) -> list[AdapterBase]:
        modules = self.lora_adapters._modules
        return [modules[n] for n in self._active_adapters]

    # read-compatible views of the single active adapter
    lora_A = property(lambda self: self.adapter().lora_A, doc="``lora_A`` of :meth:`adapter`.")
    lora_B = property(lambda self: self.adapter().lora_B, doc="``lora_B`` of :meth:`adapter`.")
    r = property(lambda self: self.adapter().r, doc="rank of :meth:`adapter`.")
    lora_dropout = property(lambda self: self.adapter().lora_dropout, doc="dropout of :meth:`adapter`.")

    @property
    def lora_alpha(self) -> float:
        return self.adapter().lora_alpha

    @lora_alpha.setter
    def lora_alpha(self, value: float) -> None:
        self.adapter().lora_alpha = value

    @property
    def use_rslora(self) -> bool:
        return self.adapter().use_rslora

    @use_rslora.setter
    def use_rslora(self, value: bool) -> None:
        self.adapter().use_rslora = value

    @property
    def scaling(self) -> float:
        """``weight * alpha / r`` (``/ sqrt(r)`` with rsLoRA) of :meth:`adapter`."""
        return self.adapter().scaling

    @scaling.setter
    def scaling(self, value: float) -> None:
        adapter = self.adapter()
        adapter.weight = checked_adapter_weight(value, f"scaling of {self._describe()}") / adapter.trained_scaling

    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """Re-initialise every adapter: A per ``init``, B zeros (so ΔW = 0)."""
        if self.merged:
            raise RuntimeError("reset_lora_parameters on a merged layer: call train() or unmerge() first")
        for adapter in self.lora_adapters.values():
            adapter.reset_parameters(init)

    # ---- the geometry of one kind of layer (overridden per class) ------------------------------
    def _lora_branch(self, x: torch.Tensor, adapter: LoRAAdapter, scaling: float | None = None) -> torch.Tensor:
        """``s * B(A(x))`` of a LoRA ``adapter`` for an input already passed through dropout, shaped like
        the base output; ``s`` is ``scaling``, or the adapter's (weight included) when None."""
        raise NotImplementedError

    def _weight_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """This layer's operation with ``weight`` (this layer's layout) and no bias: ``x W^T``, the conv."""
        raise NotImplementedError

    def _channel_view(self, gain: torch.Tensor) -> torch.Tensor:
        """A per-output-channel ``(out,)`` tensor shaped to broadcast against this layer's output."""
        return gain

    def _adapter_branch(self, x: torch.Tensor, adapter: AdapterBase, base_out: dict) -> torch.Tensor:
        """What ``adapter`` adds to the base output for input ``x`` (unmerged), at its current weight.

        LoRA: ``w s B(A(x'))``; LoHa / LoKr: ``x' ∗ (w ΔW)``, with ``x'`` the dropped-out input. DoRA:
        ``w ((g - 1) (x ∗ W) + g · branch(x'))`` at the trained scaling, ``g = m / ||W + ΔW||`` per output
        channel (:mod:`convlora.kinds`); ``base_out`` caches ``x ∗ W`` between an input's adapters.
        """
        h = adapter.lora_dropout(x).to(adapter.factors()[0].dtype)
        if adapter.magnitude is None:
            if adapter.kind.name == "lora":
                return self._lora_branch(h, adapter)
            return self._weight_op(h, self._delta_to_weight_layout(adapter.delta() * adapter.weight))
        delta = adapter.delta()
        base = self.dense_base_weight().to(delta.dtype)
        gain = self._channel_view(dora_gain(adapter.magnitude, base + delta.detach()))
        if adapter.kind.name == "lora":
            inner = self._lora_branch(h, adapter, adapter.trained_scaling)
        else:
            inner = self._weight_op(h, self._delta_to_weight_layout(delta))
        if "value" not in base_out:
            base_out["value"] = self._weight_op(x.to(base.dtype), self._delta_to_weight_layout(base).detach())
        return adapter.weight * ((gain - 1) * base_out["value"].to(inner.dtype) + gain * inner)

    def _fused_forward(self, x: torch.Tensor, adapter: LoRAAdapter) -> torch.Tensor | None:
        """Base output plus ``adapter``'s branch through :mod:`convlora.fused`, or None where it does not apply."""
        return None

    def _delta_to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """Turn ΔW from the ``(out, in/g, *k)`` convention into this layer's weight layout."""
        return delta

    # ---- ΔW, merge, unmerge --------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """``Σ_i w_i D_i`` over the active adapters (``D = s B A`` for LoRA; each kind's update, see
        :mod:`convlora.kinds`), in this layer's weight layout, float32 (the one place the merged update
        is computed; zeros when none is active)."""
        total = None
        adapters = self._active()
        base = self.dense_base_weight().detach().float() if any(a.magnitude is not None for a in adapters) else None
        for adapter in adapters:
            delta = adapter.merged_update(base)  # (out, in/g, *k)
            total = delta if total is None else total.add_(delta.to(total.device))
        if total is None:
            weight = frozen_weight(self)
            return torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        return self._delta_to_weight_layout(total)

    def merge(self) -> None:
        """Add the active adapters' update into ``weight`` (fp32 math, cast back once). A no-op if merged
        with the current adapters (or none is active); merged with older ones, the merge is redone from
        the saved base weight.

        Raises:
            ValueError: the merged weight would hold NaN/inf once cast to the weight's dtype (e.g. an
                fp16 weight whose merged value passes 65504); the layer is left unmerged, base weight intact.
            RuntimeError: the weight is sharded (FSDP), quantized or tied to another module's weight.
        """
        if self.merged:
            if not self._merge_is_stale(compare_values=True):
                return
            self.unmerge()
        if not self._active_adapters:
            return
        blocker = self._merge_blocker()
        if blocker is not None:
            raise RuntimeError(f"cannot merge LoRA into {self._describe()}: its weight is {blocker}")
        weight = self.weight
        merged = (weight.detach().float() + self.delta_weight().to(weight.device)).to(weight.dtype)
        if not bool(torch.isfinite(merged).all()):
            raise ValueError(
                f"merging LoRA into {self._describe()} gives non-finite weights (NaN/inf) in "
                f"{str(weight.dtype).replace('torch.', '')}; the base weight was left unchanged"
            )
        self._unmerged_weight = weight.detach().clone()
        with torch.no_grad():
            weight.copy_(merged)
        self.merged = True
        self._merged_lora = _MergeRecord.of(self)

    def unmerge(self) -> None:
        """Restore the exact pre-merge weight (bit-identical). A no-op if not merged."""
        if not self.merged:
            return
        with torch.no_grad():
            self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self._merged_lora = None
        self.merged = False

    def train(self, mode: bool = True):
        """``train()`` unmerges, ``eval()`` merges (when ``merge_weights``); see module docstring."""
        super().train(mode)
        if self.merge_weights:
            if mode:
                self.unmerge()
            elif not self.lora_disabled and not self.merged:
                self._merge_or_run_unmerged()
        return self

    def _merge_or_run_unmerged(self) -> None:
        """Merge-on-eval: merge, or say once why not and leave the layer unmerged (same outputs)."""
        if not self._active_adapters:
            return
        blocker = self._merge_blocker()
        if blocker is not None:
            _warn_once(
                f"convlora: merge-on-eval skipped because weights are {blocker}; "
                "LoRA layers run unmerged (same outputs, slightly slower)."
            )
            return
        try:
            self.merge()
        except ValueError as err:
            _warn_once(f"convlora: merge-on-eval skipped: {err}; the layer runs unmerged.")

    def _merge_is_stale(self, compare_values: bool) -> bool:
        """Whether the active adapters or their A, B or scaling changed since the merge (``compare_values``:
        also by value, which catches in-place writes through ``.data`` that bump no version counter)."""
        record = self._merged_lora
        return record is None or not record.matches(self, compare_values)

    def _merge_blocker(self) -> str | None:
        """Why this weight cannot be merged in place, or None."""
        if is_quantized(self):  # convlora.quant: the weight exists only during a forward call
            return f"quantized ({self.quantized_weight.mode})"
        weight = self.weight
        kind = type(weight).__name__
        # FSDP (1 and 2) marks the modules it manages; after a forward their weights may be
        # temporary unsharded copies, so a merge there would be silently thrown away.
        if getattr(self, "_is_fsdp_managed_module", False) or kind in ("DTensor", "FlatParameter"):
            return "sharded (FSDP)"
        if not weight.is_floating_point() or kind in ("Params4bit", "Int8Params"):
            return "quantized"
        tied = getattr(self, "_tied_to", None)  # set by injection: merging would change those too
        if tied:
            return f"tied to {tied}"
        return None

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_disabled:
            return super().forward(x)
        if self.merged:
            return self._merged_forward(x)
        return self._adapted_forward(x)

    def _merged_forward(self, x: torch.Tensor) -> torch.Tensor:
        adapters = self._active()
        learning = torch.is_grad_enabled() and any(t.requires_grad for a in adapters for t in a.factors())
        if self._merge_is_stale(compare_values=learning):
            # An adapter moved since the merge (e.g. an optimizer step in eval mode): merge them again.
            self.unmerge()
            self._merge_or_run_unmerged()
            if not self.merged:
                return self._adapted_forward(x)
        result = super().forward(x)  # the merged weight already carries the adapters' update
        if learning:
            # A merged forward alone gives the factors no gradient, so training in eval mode would
            # silently learn nothing. Add a branch whose value is exactly zero and whose gradient
            # w.r.t. the factors is the unmerged one; x is detached because the input gradient already
            # flows through the merged weight.
            base_out: dict = {}
            for adapter in adapters:
                if any(t.requires_grad for t in adapter.factors()):
                    branch = self._adapter_branch(x.detach(), adapter, base_out)
                    result = result + (branch - branch.detach()).to(result.dtype)
        return result

    def _adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the active adapters' branches (the unmerged path); one adapter takes the fused path."""
        adapters = self._active()
        if len(adapters) == 1 and adapters[0].is_plain_lora:
            fast = self._fused_forward(x, adapters[0])
            if fast is not None:
                return fast
        result = super().forward(x)
        base_out: dict = {}
        for adapter in adapters:
            result = result + self._adapter_branch(x, adapter, base_out).to(result.dtype)
        return result

    # ---- state dict: a merged layer still saves its base weight --------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            saved = self._unmerged_weight
            destination[prefix + "weight"] = saved if keep_vars else saved.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The base weight loads into the unmerged layer; the adapters (child modules) load after this,
        # so the layer merges again on its next forward (their version counters moved).
        was_merged = self.merged
        self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if was_merged:
            self._merge_or_run_unmerged()

    def _describe(self) -> str:
        name = getattr(self, "_lora_path", None)
        return f"{name} ({type(self).__name__})" if name else type(self).__name__

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}{'*' if n in self._active_adapters else ''}" for n in self.lora_adapters)
        return f"{super().extra_repr()}, adapters=[{adapters}], merged={self.merged}"


class Linear(LoRALayer, nn.Linear):
    """LoRA ``nn.Linear``: ``y = x W^T + b + Σ_i s_i (x A_i^T) B_i^T``.

    ``Linear(in, out, r=8, lora_alpha=None, lora_dropout=0., merge_weights=True, **linear_kwargs)``
    is a drop-in for ``loralib.Linear`` (like loralib it freezes ``weight``; ``lora_alpha=None``
    means ``alpha = r``).
    """

    torch_class = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        merge_weights: bool = True,
        **kwargs: Any,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights)
        self.weight.requires_grad = False

    @classmethod
    def lora_shapes_for(cls, base, r):
        n_out, n_in = frozen_weight(base).shape  # (out, in)
        return (r, n_in), (n_out, r)

    def _lora_branch(self, x, adapter, scaling=None):
        # (..., in) @ (in, r) -> (..., r); (..., r) @ (r, out) -> (..., out)
        return F.linear(F.linear(x, adapter.lora_A) * (adapter.scaling if scaling is None else scaling), adapter.lora_B)

    def _weight_op(self, x, weight):
        return F.linear(x, weight)

    def _fused_forward(self, x, adapter):
        return fused.linear_lora_forward(self, x, adapter) if fused.fused_supported(self, x, adapter) else None


#: The keys of :func:`conv_geometry_record` (and of a conv's entry in a convlora file's module table).
CONV_GEOMETRY_KEYS = ("groups", "dilation", "padding_mode")


def conv_geometry_record(layer: nn.Module) -> dict[str, Any] | None:
    """``{"groups", "dilation", "padding_mode"}`` of a ConvNd (LoRA or plain); ``None`` for anything else.

    What foreign LoRA loaders ignore (they run ``lora_down`` with kernel, stride and padding only),
    so files record it and exporters check it.
    """
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return None
    return {"groups": int(layer.groups), "dilation": [int(d) for d in layer.dilation], "padding_mode": layer.padding_mode}


class _ConvLoRA(LoRALayer):
    """Shared by Conv1d/2d/3d: nothing here assumes a number of spatial dimensions.

    The A branch runs through the base conv's own ``_conv_forward``, so stride, padding (including
    ``"same"``), dilation, ``padding_mode`` and groups come from the base layer in this one place.
    For ``groups = g > 1`` A is shared by the groups: the A branch is a grouped conv with A repeated
    g times, ``(g*r, C_in/g, *k)``, and B a grouped 1×1 conv, ``(C_out, r, *1s)``; together they
    equal a conv with ``ΔW[o, i, ...] = Σ_r B[o, r] A[r, i, ...]`` — the same formula as the merge.

    In training on CPU the unmerged forward/backward of a single active adapter runs through
    :mod:`convlora.fused` (one convolution for ``W`` and ``A`` together, no gradient for the frozen
    weight); it reads the same geometry from the layer (:func:`convlora.fused.conv_geometry`,
    resolved as ``_conv_forward`` resolves it) and is tested equal to this formula for every geometry.
    """

    @classmethod
    def lora_shapes_for(cls, base, r):
        shape = tuple(frozen_weight(base).shape)  # (C_out, C_in/g, *k)
        return (r, *shape[1:]), (shape[0], r, *(1,) * (len(shape) - 2))

    def _lora_branch(self, x, adapter, scaling=None):
        lora_A = adapter.lora_A
        if self.groups > 1:
            lora_A = lora_A.repeat(self.groups, *(1,) * (lora_A.dim() - 1))  # (g*r, C_in/g, *k)
        hidden = self._conv_forward(x, lora_A, None)  # (N, g*r, *spatial_out)
        scaling = adapter.scaling if scaling is None else scaling
        return _CONV_FN[len(self.kernel_size)](hidden * scaling, adapter.lora_B, groups=self.groups)

    def _weight_op(self, x, weight):
        return self._conv_forward(x, weight, None)  # the base conv's stride, padding, dilation, groups

    def _channel_view(self, gain):
        return gain.view(-1, *(1,) * len(self.kernel_size))  # (C_out, *1s) against (N, C_out, *spatial)

    def _fused_forward(self, x, adapter):
        return fused.conv_lora_forward(self, x, adapter) if fused.fused_supported(self, x, adapter) else None

    @property
    def is_spatial(self) -> bool:
        """True when the kernel is larger than 1 in some dimension (kohya's "conv" layers)."""
        return any(k > 1 for k in self.kernel_size)


def _conv_init(self, torch_class, in_channels, out_channels, kernel_size, r, lora_alpha, lora_dropout, merge_weights, kwargs):
    torch_class.__init__(self, in_channels, out_channels, kernel_size, **kwargs)
    self._init_lora(r, lora_alpha, lora_dropout, merge_weights)
    self.weight.requires_grad = False


class Conv1d(_ConvLoRA, nn.Conv1d):
    """LoRA ``nn.Conv1d``; drop-in constructor ``Conv1d(in, out, k, r=8, lora_alpha=None, lora_dropout=0., merge_weights=True, **conv_kwargs)``."""

    torch_class = nn.Conv1d

    def __init__(self, in_channels, out_channels, kernel_size, r=8, lora_alpha=None, lora_dropout=0.0, merge_weights=True, **kwargs):
        _conv_init(self, nn.Conv1d, in_channels, out_channels, kernel_size, r, lora_alpha, lora_dropout, merge_weights, kwargs)


class Conv2d(_ConvLoRA, nn.Conv2d):
    """LoRA ``nn.Conv2d``; drop-in constructor ``Conv2d(in, out, k, r=8, lora_alpha=None, lora_dropout=0., merge_weights=True, **conv_kwargs)``."""

    torch_class = nn.Conv2d

    def __init__(self, in_channels, out_channels, kernel_size, r=8, lora_alpha=None, lora_dropout=0.0, merge_weights=True, **kwargs):
        _conv_init(self, nn.Conv2d, in_channels, out_channels, kernel_size, r, lora_alpha, lora_dropout, merge_weights, kwargs)


class Conv3d(_ConvLoRA, nn.Conv3d):
    """LoRA ``nn.Conv3d``; drop-in constructor ``Conv3d(in, out, k, r=8, lora_alpha=None, lora_dropout=0., merge_weights=True, **conv_kwargs)``."""

    torch_class = nn.Conv3d

    def __init__(self, in_channels, out_channels, kernel_size, r=8, lora_alpha=None, lora_dropout=0.0, merge_weights=True, **kwargs):
        _conv_init(self, nn.Conv3d, in_channels, out_channels, kernel_size, r, lora_alpha, lora_dropout, merge_weights, kwargs)


class GPT2Conv1D(LoRALayer, HFConv1D):
    """LoRA for transformers' GPT-2 ``Conv1D`` (a linear layer with a transposed ``(in, out)`` weight).

    ``y = x W + b + Σ_i s_i (x A_i^T) B_i^T``; ``lora_A (r, in)``, ``lora_B (out, r)`` as for Linear, and
    ΔW is transposed to ``(in, out)`` when merged.
    """

    torch_class = HFConv1D

    def __init__(self, nf: int, nx: int, r: int = 8, lora_alpha=None, lora_dropout=0.0, merge_weights=True) -> None:
        HFConv1D.__init__(self, nf, nx)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights)
        self.weight.requires_grad = False

    @classmethod
    def lora_shapes_for(cls, base, r):
        n_in, n_out = frozen_weight(base).shape  # (in, out)
        return (r, n_in), (n_out, r)

    @classmethod
    def base_shape_for(cls, a_shape, b_shape):
        return (int(a_shape[1]), int(b_shape[0]))  # (in, out)

    @classmethod
    def delta_shape_for(cls, base):
        n_in, n_out = frozen_weight(base).shape  # (in, out)
        return (n_out, n_in)

    def _lora_branch(self, x, adapter, scaling=None):
        return F.linear(F.linear(x, adapter.lora_A) * (adapter.scaling if scaling is None else scaling), adapter.lora_B)

    def _weight_op(self, x, weight):
        return x @ weight  # (..., in) @ (in, out)

    def _delta_to_weight_layout(self, delta):
        return delta.t()  # (out, in) -> (in, out)

    def _to_delta_layout(self, weight):
        return weight.t()  # (in, out) -> (out, in)


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

#: Instance attributes a LoRA layer adds to its torch layer's (dropped again by ``to_base_layer``).
_LORA_ATTRIBUTES = (
    "merge_weights", "merged", "lora_disabled", "_merged_lora", "_tied_to", "_active_adapters",
)  # fmt: skip


class _MergeRecord:
    """What a merge was made with: per active adapter, its factors (A and B for LoRA; each kind's
    tensors and DoRA's magnitude: their version counters, storage and values) and the scaling.

    The version counters move on every in-place write through autograd-visible tensors (optimizer
    steps, ``copy_``, ``load_state_dict``), so checking them costs almost nothing per forward; the
    value copies (the adapters' own size) catch writes through ``.data``, which move no counter.
    """

    __slots__ = ("key", "values")

    def __init__(self, key: tuple, values: list[tuple[torch.Tensor, ...]]) -> None:
        self.key, self.values = key, values

    @staticmethod
    def _key(layer: LoRALayer) -> tuple:
        return tuple(
            (name, a.scaling, *((t._version, t.data_ptr(), t.dtype) for t in a.factors()))
            for name, a in zip(layer._active_adapters, layer._active())
        )

    @classmethod
    def of(cls, layer: LoRALayer) -> "_MergeRecord":
        values = [tuple(t.detach().clone() for t in a.factors()) for a in layer._active()]
        return cls(cls._key(layer), values)

    def matches(self, layer: LoRALayer, compare_values: bool) -> bool:
        if self._key(layer) != self.key:
            return False
        return not compare_values or all(
            all(torch.equal(t, saved) for t, saved in zip(a.factors(), tensors))
            for a, tensors in zip(layer._active(), self.values)
        )


#: torch class -> LoRA class that adapts it (exact type match).
LORA_CLASSES: dict[type[nn.Module], type[LoRALayer]] = {
    nn.Linear: Linear,
    nn.Conv1d: Conv1d,
    nn.Conv2d: Conv2d,
    nn.Conv3d: Conv3d,
    HFConv1D: GPT2Conv1D,
}


def lora_class_for(module: nn.Module) -> type[LoRALayer] | None:
    """The LoRA class that adapts ``module`` (a plain torch layer or a LoRA layer); None if there is none."""
    if isinstance(module, LoRALayer):
        return type(module)
    return LORA_CLASSES.get(type(module))


def is_spatial_conv(module: nn.Module) -> bool:
    """True for a ConvNd whose kernel is larger than 1 in some dimension."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and any(k > 1 for k in module.kernel_size)


def _names(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names) or "none"


def _copy_module_state(state: dict[str, Any]) -> dict[str, Any]:
    """Shallow copy of a module's ``__dict__`` with its own parameter/buffer/module/hook containers
    (the tensors and submodules inside are shared, not copied)."""
    return {k: (v.copy() if isinstance(v, (dict, set)) else v) for k, v in state.items()}
