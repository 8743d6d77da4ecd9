"""LoRA layers that *are* their torch layers.

``convlora.Conv2d`` subclasses ``nn.Conv2d``: it owns the base ``weight`` / ``bias`` under their
original names and adds ``lora_A`` / ``lora_B``. The adapted weight is ``W + s * ΔW`` with
``ΔW = B @ A`` (flattened; see :func:`convlora.state.delta_weight`) and ``s = alpha / r``.

Shapes (the README's LoRA math section):
    Linear ``W (out, in)``:              ``lora_A (r, in)``,             ``lora_B (out, r)``
    ConvNd ``W (C_out, C_in/g, *k)``:    ``lora_A (r, C_in/g, *k)``,     ``lora_B (C_out, r, *1s)``
    GPT-2 ``Conv1D`` ``W (in, out)``:    ``lora_A (r, in)``,             ``lora_B (out, r)``

Merge-on-eval (loralib's contract, made exact): ``eval()`` merges ``s * ΔW`` into the weight (the
merge is computed in float32 and cast back; a result that is not finite *in the weight's own dtype*
is refused and changes nothing), ``train()`` restores the weight **bit-exactly** from a copy taken
at merge time, so no drift accumulates over any number of cycles in any dtype. While merged,
``state_dict()`` still reports the base weight, so a checkpoint taken in eval mode is a clean base +
adapter.

A merged layer stays true to its A, B and scaling: when any of them changed since the merge (an
optimizer step in eval mode, a load, a new alpha) the next forward merges again from the saved base
weight. ``eval()`` itself never raises: a layer that cannot be merged (sharded, quantized, tied to
another module's weight, or non-finite once merged) runs unmerged, with one warning naming why.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D as HFConv1D

from convlora import fused
from convlora.state import checked_alpha, checked_rank, delta_weight, scaling_for

_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """One warning per distinct message per process (merge-on-eval notices would repeat per layer)."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


class LoRALayer:
    """Behaviour shared by every LoRA layer; mixed in before the torch class it adapts.

    Attributes:
        r: rank of the update.
        lora_alpha: scaling numerator (a finite number > 0; setting it updates ``scaling``).
        use_rslora: ``alpha / sqrt(r)`` scaling instead of ``alpha / r`` (setting it updates ``scaling``).
        scaling: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), kept by the layer from the two above.
        merge_weights: whether ``eval()`` merges and ``train()`` unmerges.
        merged: whether ``s * ΔW`` is currently inside ``weight``.
        lora_disabled: when True the layer computes the base output only.
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
    ) -> None:
        checked_rank(r, "LoRA rank r")
        if isinstance(lora_dropout, bool) or not (isinstance(lora_dropout, (int, float)) and 0.0 <= lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if not isinstance(use_rslora, bool):
            raise ValueError(f"use_rslora must be True or False, got {use_rslora!r}")
        self.r = r
        self._use_rslora = use_rslora
        self._lora_alpha = float(r)
        self.lora_alpha = r if lora_alpha is None else lora_alpha  # checked; sets self.scaling
        self.merge_weights = merge_weights
        self.merged = False
        self.lora_disabled = False
        # nn.Identity, not a lambda: module state must be a module (and p = 0 costs nothing).
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        a_shape, b_shape = self._lora_shapes(r)
        weight = self.weight
        factory = {"dtype": weight.dtype, "device": weight.device}
        self.lora_A = nn.Parameter(torch.empty(a_shape, **factory))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, **factory))
        # The exact pre-merge weight while merged; non-persistent, so never saved.
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self._merged_lora: _MergeRecord | None = None  # the A, B and scaling the merge was made with
        self.reset_lora_parameters(init)

    # ---- alpha and rsLoRA: the layer owns its scaling -------------------------------------------
    @property
    def lora_alpha(self) -> float:
        return self._lora_alpha

    @lora_alpha.setter
    def lora_alpha(self, value: float) -> None:
        self._lora_alpha = checked_alpha(value, f"lora_alpha of {self._describe()}")
        self.scaling = scaling_for(self.r, self._lora_alpha, self._use_rslora)

    @property
    def use_rslora(self) -> bool:
        return self._use_rslora

    @use_rslora.setter
    def use_rslora(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"use_rslora of {self._describe()} must be True or False, got {value!r}")
        self._use_rslora = value
        self.scaling = scaling_for(self.r, self._lora_alpha, value)

    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """A: Kaiming-uniform (a=sqrt(5), as ``nn.Linear``) or N(0, 1/r²); B: zeros, so ΔW = 0."""
        if self.merged:
            raise RuntimeError("reset_lora_parameters on a merged layer: call train() or unmerge() first")
        with torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            elif init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                raise ValueError(f"unknown LoRA init {init!r}: use 'kaiming' or 'gaussian'")
            nn.init.zeros_(self.lora_B)

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
    ) -> "LoRALayer":
        """Wrap an existing layer, sharing its ``weight`` / ``bias`` tensors (nothing re-initialised).

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
        layer._init_lora(r, alpha, dropout, merge_weights, init=init, use_rslora=use_rslora)
        return layer

    def to_base_layer(self, merge: bool) -> nn.Module:
        """A plain torch layer sharing this layer's base tensors, with ``s * ΔW`` merged in or dropped.

        Used by :func:`convlora.merge_and_unload` and :func:`convlora.unload`.
        """
        if merge:
            self.merge()
        else:
            self.unmerge()
        state = _copy_module_state(self.__dict__)
        for name in ("lora_A", "lora_B"):
            state["_parameters"].pop(name)
        state["_modules"].pop("lora_dropout")
        state["_buffers"].pop("_unmerged_weight")
        state["_non_persistent_buffers_set"].discard("_unmerged_weight")
        for name in _LORA_ATTRIBUTES:
            state.pop(name, None)
        base = self.torch_class.__new__(self.torch_class)
        base.__dict__.update(state)
        return base

    # ---- the geometry of one kind of layer (overridden per class) ------------------------------
    def _lora_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def _lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        """``s * B(A(x))`` for an input already passed through dropout; output shaped like the base's."""
        raise NotImplementedError

    def _delta_to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """Turn ΔW from the ``(out, in/g, *k)`` convention into this layer's weight layout."""
        return delta

    # ---- ΔW, merge, unmerge --------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """``s * ΔW`` in this layer's weight layout, float32 (the one place ΔW is computed)."""
        return self._delta_to_weight_layout(delta_weight(self.lora_A, self.lora_B, self.scaling))

    def merge(self) -> None:
        """Add ``s * ΔW`` into ``weight`` (fp32 math, cast back). A no-op if merged with the current A, B
        and scaling; merged with older ones, the merge is redone from the saved base weight.

        Raises:
            ValueError: the merged weight would hold NaN/inf once cast to the weight's dtype (e.g. an
                fp16 weight whose merged value passes 65504); the layer is left unmerged, base weight intact.
            RuntimeError: the weight is sharded (FSDP), quantized or tied to another module's weight.
        """
        if self.merged:
            if not self._merge_is_stale(compare_values=True):
                return
            self.unmerge()
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
        """Whether A, B or the scaling changed since the merge (``compare_values``: also by value, which
        catches in-place writes through ``.data`` that bump no version counter)."""
        record = self._merged_lora
        return record is None or not record.matches(self, compare_values)

    def _merge_blocker(self) -> str | None:
        """Why this weight cannot be merged in place, or None."""
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
        if not self.merged:
            return self._adapted_forward(x)
        learning = torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad)
        if self._merge_is_stale(compare_values=learning):
            # A or B moved since the merge (e.g. an optimizer step in eval mode): merge them again.
            self.unmerge()
            self._merge_or_run_unmerged()
            if not self.merged:
                return self._adapted_forward(x)
        result = super().forward(x)  # the merged weight already carries s * ΔW
        if learning:
            # A merged forward alone gives A and B no gradient, so training in eval mode would
            # silently learn nothing. Add a branch whose value is exactly zero and whose gradient
            # w.r.t. A and B is the unmerged one; x is detached because the input gradient already
            # flows through the merged weight.
            branch = self._lora_branch(x.detach().to(self.lora_A.dtype))
            result = result + (branch - branch.detach()).to(result.dtype)
        return result

    def _adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the LoRA branch (the unmerged path)."""
        result = super().forward(x)
        lora = self._lora_branch(self.lora_dropout(x).to(self.lora_A.dtype))
        return result + lora.to(result.dtype)

    # ---- state dict: a merged layer still saves its base weight --------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            saved = self._unmerged_weight
            destination[prefix + "weight"] = saved if keep_vars else saved.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        was_merged = self.merged
        self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if was_merged:
            self.merge()

    def _describe(self) -> str:
        name = getattr(self, "_lora_path", None)
        return f"{name} ({type(self).__name__})" if name else type(self).__name__

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha:g}, merged={self.merged}"


class Linear(LoRALayer, nn.Linear):
    """LoRA ``nn.Linear``: ``y = x W^T + b + s * (x A^T) B^T``.

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

    def _lora_shapes(self, r):
        return (r, self.in_features), (self.out_features, r)

    def _lora_branch(self, x):
        # (..., in) @ (in, r) -> (..., r); (..., r) @ (r, out) -> (..., out)
        return F.linear(F.linear(x, self.lora_A) * self.scaling, self.lora_B)

    def _adapted_forward(self, x):
        if fused.fused_supported(self, x):
            return fused.linear_lora_forward(self, x)
        return super()._adapted_forward(x)


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

    In training on CPU the unmerged forward/backward runs through :mod:`convlora.fused` (one
    convolution for ``W`` and ``A`` together, no gradient for the frozen weight); it reads the same
    geometry from the layer (:func:`convlora.fused.conv_geometry`, resolved as ``_conv_forward``
    resolves it) and is tested equal to this formula for every geometry.
    """

    def _lora_shapes(self, r):
        kernel = tuple(self.kernel_size)
        return (r, self.in_channels // self.groups, *kernel), (self.out_channels, r, *(1,) * len(kernel))

    def _lora_branch(self, x):
        lora_A = self.lora_A
        if self.groups > 1:
            lora_A = lora_A.repeat(self.groups, *(1,) * (lora_A.dim() - 1))  # (g*r, C_in/g, *k)
        hidden = self._conv_forward(x, lora_A, None)  # (N, g*r, *spatial_out)
        return _CONV_FN[len(self.kernel_size)](hidden * self.scaling, self.lora_B, groups=self.groups)

    def _adapted_forward(self, x):
        if fused.fused_supported(self, x):
            return fused.conv_lora_forward(self, x)
        return super()._adapted_forward(x)

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

    ``y = x W + b + s * (x A^T) B^T``; ``lora_A (r, in)``, ``lora_B (out, r)`` as for Linear, and
    ΔW is transposed to ``(in, out)`` when merged.
    """

    torch_class = HFConv1D

    def __init__(self, nf: int, nx: int, r: int = 8, lora_alpha=None, lora_dropout=0.0, merge_weights=True) -> None:
        HFConv1D.__init__(self, nf, nx)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights)
        self.weight.requires_grad = False

    def _lora_shapes(self, r):
        n_in, n_out = self.weight.shape
        return (r, n_in), (n_out, r)

    def _lora_branch(self, x):
        return F.linear(F.linear(x, self.lora_A) * self.scaling, self.lora_B)

    def _delta_to_weight_layout(self, delta):
        return delta.t()  # (out, in) -> (in, out)


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

#: Instance attributes a LoRA layer adds to its torch layer's (dropped again by ``to_base_layer``).
_LORA_ATTRIBUTES = (
    "r", "_lora_alpha", "_use_rslora", "scaling", "merge_weights", "merged", "lora_disabled", "_merged_lora", "_tied_to",
)  # fmt: skip


class _MergeRecord:
    """What a merge was made with: A and B (their version counters, storage and values) and the scaling.

    The version counters move on every in-place write through autograd-visible tensors (optimizer
    steps, ``copy_``, ``load_state_dict``), so checking them costs almost nothing per forward; the
    value copies (the adapter's own size) catch writes through ``.data``, which move no counter.
    """

    __slots__ = ("key", "lora_A", "lora_B")

    def __init__(self, key: tuple, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        self.key, self.lora_A, self.lora_B = key, lora_A, lora_B

    @staticmethod
    def _key(layer: LoRALayer) -> tuple:
        a, b = layer.lora_A, layer.lora_B
        return (a._version, b._version, a.data_ptr(), b.data_ptr(), a.dtype, b.dtype, layer.scaling)

    @classmethod
    def of(cls, layer: LoRALayer) -> "_MergeRecord":
        return cls(cls._key(layer), layer.lora_A.detach().clone(), layer.lora_B.detach().clone())

    def matches(self, layer: LoRALayer, compare_values: bool) -> bool:
        if self._key(layer) != self.key:
            return False
        return not compare_values or (torch.equal(layer.lora_A, self.lora_A) and torch.equal(layer.lora_B, self.lora_B))

#: torch class -> LoRA class that adapts it (exact type match).
LORA_CLASSES: dict[type[nn.Module], type[LoRALayer]] = {
    nn.Linear: Linear,
    nn.Conv1d: Conv1d,
    nn.Conv2d: Conv2d,
    nn.Conv3d: Conv3d,
    HFConv1D: GPT2Conv1D,
}


def is_spatial_conv(module: nn.Module) -> bool:
    """True for a ConvNd whose kernel is larger than 1 in some dimension."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and any(k > 1 for k in module.kernel_size)


def _copy_module_state(state: dict[str, Any]) -> dict[str, Any]:
    """Shallow copy of a module's ``__dict__`` with its own parameter/buffer/module/hook containers
    (the tensors and submodules inside are shared, not copied)."""
    return {k: (v.copy() if isinstance(v, (dict, set)) else v) for k, v in state.items()}
