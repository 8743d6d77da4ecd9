"""A quantized frozen base: Linear and Conv1d/2d/3d weights stored in 4 or 8 bits, LoRA on top.

``quantize_base(model, "nf4")`` replaces the ``weight`` parameter of every chosen ``nn.Linear`` /
``nn.ConvNd`` (plain or already a convlora LoRA layer) by a :class:`QuantizedWeight` child module
holding the weight in compact form. The module's own ``forward`` is unchanged: a forward pre-hook
dequantizes the weight into the compute dtype just for that call, and a forward hook drops it again,
so at most one layer's full-precision weight exists at a time. Autograd would otherwise keep that
dequantized weight alive until backward (it needs ``W`` for the input gradient); a saved-tensor hook
stores a reference to the compact weight instead and dequantizes again in backward. The frozen
weight never gets a gradient; LoRA's ``lora_A`` / ``lora_B`` stay in full precision.

Modes (bytes per weight; the per-block / per-channel statistics come on top):
    ``nf4``   bitsandbytes NF4, blocks of 64, double quantization of the block scales (QLoRA):
              0.5 B + about 0.016 B per weight (uint8 block scales) + two small code books per tensor.
    ``int8``  symmetric per-output-channel absmax: ``q = round(w / s)``, ``s = max|w_o| / 127``; 1 B.
    ``fp8``   float8 e4m3 with a per-output-channel scale ``s = max|w_o| / 448`` (kohya's
              ``--fp8_base`` casts without a scale; the scale keeps small-magnitude channels exact
              to e4m3's 3 mantissa bits instead of flushing them toward zero); 1 B.
    ``bf16`` / ``fp16``  plain half-precision storage, upcast per call into the compute dtype (a bf16
              base under float32 LoRA math without autocast); 2 B.

Everything a quantized weight holds is a tensor buffer, so a quantized model's ``state_dict()`` is
plain tensors (safetensors-storable, no pickle), and ``.to(device)`` moves it.
"""

from __future__ import annotations

from collections.abc import Iterable

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QUANT_MODES", "QuantizedWeight", "is_quantized", "dequantize_base", "frozen_weight", "quantize_base", "quantized_bytes", "quantized_nbytes"]

QUANT_MODES = ("nf4", "int8", "fp8", "bf16", "fp16")
_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
_QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NF4_BLOCK = 64
_FP8_MAX = 448.0  # largest finite float8_e4m3fn


class QuantizationError(ValueError):
    """A module cannot be quantized as asked (unknown mode, no float weight, no bitsandbytes), named."""


class QuantizedWeight(nn.Module):
    """One frozen weight in compact form; :meth:`dequantize` gives it back in any float dtype.

    Shapes: ``shape`` is the original weight's (``(out, in)`` or ``(C_out, C_in/g, *k)``); for
    ``int8`` / ``fp8`` ``data`` has that shape and ``scale`` is ``(out, 1, ...)``; for ``nf4``
    ``data`` is the packed ``(ceil(numel / 2), 1)`` uint8 tensor of bitsandbytes and the statistics
    are the buffers of its ``QuantState.as_dict(packed=True)``.
    """

    def __init__(self, weight: torch.Tensor, mode: str) -> None:
        super().__init__()
        if mode not in QUANT_MODES:
            raise QuantizationError(f"unknown base precision {mode!r}: choose one of {', '.join(QUANT_MODES)}")
        self.mode = mode
        self.shape = tuple(weight.shape)
        self.compute_dtype = weight.dtype
        w = weight.detach()
        if mode == "nf4":
            self._quantize_nf4(w)
        elif mode in _HALF:
            self.register_buffer("data", w.to(_HALF[mode]))
        else:
            limit = 127.0 if mode == "int8" else _FP8_MAX
            absmax = w.float().abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
            scale = torch.where(absmax > 0, absmax / limit, torch.ones_like(absmax))
            scaled = w.float() / scale
            data = scaled.round().clamp(-127, 127).to(torch.int8) if mode == "int8" else scaled.to(torch.float8_e4m3fn)
            self.register_buffer("data", data)
            self.register_buffer("scale", scale)

    def _quantize_nf4(self, w: torch.Tensor) -> None:
        """bitsandbytes quantizes; the layout it returns is kept as plain buffers (see :meth:`_dequantize_nf4`)."""
        packed, state = _bitsandbytes_functional().quantize_4bit(
            w.float().contiguous(), blocksize=_NF4_BLOCK, compress_statistics=True, quant_type="nf4"
        )
        nested = state.state2
        self.register_buffer("data", packed)  # (ceil(numel / 2), 1) uint8: two 4-bit codes per byte, high nibble first
        self.register_buffer("absmax", state.absmax)  # (blocks,) uint8: each block's scale, itself quantized
        self.register_buffer("absmax_scale", nested.absmax)  # (ceil(blocks / 256),) float32
        self.register_buffer("absmax_offset", state.offset.reshape(1).float())  # the mean the scales were centred on
        # The two code books (NF4's 16 levels, the 256-level dynamic map of the scales) are the same for
        # every weight: one shared copy, not saved in state_dict().
        self.register_buffer("code_pairs", _shared(_nf4_pairs, state.code), persistent=False)
        self.register_buffer("absmax_code", _shared(_identity, nested.code), persistent=False)
        self.nested_block = int(nested.blocksize)

    def _dequantize_nf4(self) -> torch.Tensor:
        """bitsandbytes' ``dequantize_4bit`` in plain torch ops (tested bit-equal to it): its CPU kernel
        is compiled per weight shape, which costs minutes on a UNet's hundreds of shapes."""
        values = self.code_pairs.index_select(0, self.data.view(-1).long()).view(-1)  # (2 * bytes,)
        blocks = self.absmax.numel()
        outer = self.absmax_scale.repeat_interleave(self.nested_block)[:blocks]
        scales = self.absmax_code.index_select(0, self.absmax.long()) * outer + self.absmax_offset
        numel = math.prod(self.shape)
        values = F.pad(values, (0, max(0, blocks * _NF4_BLOCK - values.numel())))[: blocks * _NF4_BLOCK]
        return (values.view(blocks, _NF4_BLOCK) * scales[:, None]).view(-1)[:numel].view(self.shape)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight, ``shape``, in ``dtype`` (default: the dtype it had), freshly computed."""
        dtype = dtype or self.compute_dtype
        if self.mode == "nf4":
            return self._dequantize_nf4().to(dtype)
        if self.mode in _HALF:
            return self.data.to(dtype)
        return (self.data.float() * self.scale).to(dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (what :meth:`dequantize` returns), so code that sizes LoRA tensors by
        ``frozen_weight(module).dtype`` / ``.device`` / ``.shape`` reads a quantized weight like a tensor."""
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves the storage; ``.to(dtype)`` (a whole model cast to bf16, say) changes only
        the compute dtype, never the stored codes and scales (casting them would lose the format)."""
        target = fn(torch.zeros((), dtype=torch.float32, device=self.data.device))
        for name, buffer in self._buffers.items():
            if buffer is not None:
                self._buffers[name] = buffer.to(target.device)
        if target.dtype != torch.float32 and target.is_floating_point():
            self.compute_dtype = target.dtype
        return self

    @property
    def nbytes(self) -> int:
        """Bytes of storage this weight takes (data and statistics; the shared code books not counted)."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name not in _SHARED_BUFFERS)

    def extra_repr(self) -> str:
        return f"{self.mode}, shape={self.shape}, compute_dtype={str(self.compute_dtype).replace('torch.', '')}"


_SHARED_BUFFERS = ("code_pairs", "absmax_code")
_SHARED: dict[tuple, torch.Tensor] = {}


def _nf4_pairs(code: torch.Tensor) -> torch.Tensor:
    """``(256, 2)``: the two NF4 levels a packed byte holds (high nibble, low nibble)."""
    byte = torch.arange(256, device=code.device)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1)


def _identity(code: torch.Tensor) -> torch.Tensor:
    return code


def _shared(build, code: torch.Tensor) -> torch.Tensor:
    key = (build.__name__, code.device, tuple(code.tolist()))
    if key not in _SHARED:
        _SHARED[key] = build(code.float())
    return _SHARED[key]


def _bitsandbytes_functional():
    try:
        import bitsandbytes.functional as functional
    except ImportError:
        raise QuantizationError("base precision nf4 needs bitsandbytes: pip install bitsandbytes") from None
    return functional


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module``'s weight is held by a :class:`QuantizedWeight`."""
    return isinstance(getattr(module, "quantized_weight", None), QuantizedWeight)


def quantize_base(
    model: nn.Module, mode: str, targets: Iterable[str] | None = None, compute_dtype: torch.dtype | None = None
) -> list[str]:
    """Store the weights of ``model``'s Linear / ConvNd layers (LoRA layers included) in ``mode``.

    Args:
        model: modified in place.
        mode: one of :data:`QUANT_MODES`.
        targets: module paths to quantize (default: every Linear and ConvNd whose weight is not
            already quantized). A path that is not such a layer is an error, nothing changed.
        compute_dtype: the dtype the weight is dequantized into (default: the weight's own).

    Returns:
        The quantized module paths, sorted.

    Raises:
        QuantizationError: unknown mode, a target that is not a Linear/ConvNd, a weight that is not
            floating point, requires grad (a frozen base only) or holds NaN / inf, or missing
            bitsandbytes; the model is unchanged.
    """
    if mode not in QUANT_MODES:
        raise QuantizationError(f"unknown base precision {mode!r}: choose one of {', '.join(QUANT_MODES)}")
    chosen = _chosen_modules(model, targets)
    quantized = {path: QuantizedWeight(module.weight, mode) for path, module in chosen.items()}  # all first: nothing half-done
    for path, module in chosen.items():
        holder = quantized[path]
        if compute_dtype is not None:
            holder.compute_dtype = compute_dtype
        del module._parameters["weight"]
        module.quantized_weight = holder
        module.register_forward_pre_hook(_with_dequantized_weight)
        module.register_forward_hook(_drop_dequantized_weight, always_call=True)
    _leave_out_of_ddp_broadcasts(model, sorted(quantized))
    return sorted(quantized)


def _leave_out_of_ddp_broadcasts(model: nn.Module, paths: list[str]) -> None:
    """DDP broadcasts every buffer from rank 0 before each forward; the compact weights are frozen and
    quantized identically in every process, so they are left out (torch's own ignore list)."""
    names = [f"{p}.quantized_weight.{b}".lstrip(".") for p in paths for b, _ in model.get_submodule(p).quantized_weight.named_buffers()]
    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    model._ddp_params_and_buffers_to_ignore = sorted(ignored | set(names))


def _chosen_modules(model: nn.Module, targets: Iterable[str] | None) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    if targets is None:
        chosen = {p: m for p, m in modules.items() if isinstance(m, _QUANTIZABLE) and not is_quantized(m)}
    else:
        chosen = {}
        for path in targets:
            module = modules.get(path)
            if not isinstance(module, _QUANTIZABLE):
                what = "no such module" if module is None else type(module).__name__
                raise QuantizationError(f"cannot quantize {path!r}: {what}, not a Linear or Conv1d/2d/3d")
            chosen[path] = module
    for path, module in chosen.items():
        weight = module._parameters.get("weight")
        if weight is None or not weight.is_floating_point():
            raise QuantizationError(f"cannot quantize {path!r}: its weight is not a floating-point parameter")
        if weight.requires_grad:
            raise QuantizationError(
                f"cannot quantize {path!r}: its weight requires grad; only a frozen base is quantized "
                "(freeze it first, e.g. with mark_only_lora_as_trainable)"
            )
        if not torch.isfinite(weight).all():
            bad = int((~torch.isfinite(weight)).sum())
            raise QuantizationError(
                f"cannot quantize {path!r}: its weight holds {bad} non-finite value(s) (NaN or inf); "
                "a block scale taken over them would spoil the whole block"
            )
    return chosen


def frozen_weight(module: nn.Module) -> torch.Tensor | QuantizedWeight:
    """``module.weight``, or its :class:`QuantizedWeight` outside a forward call (both give ``shape``,
    ``dtype`` and ``device``; only the tensor can be merged into)."""
    holder = module.__dict__.get("_modules", {}).get("quantized_weight")
    return holder if isinstance(holder, QuantizedWeight) and "weight" not in module.__dict__ else module.weight


def dequantize_base(model: nn.Module) -> list[str]:
    """Undo :func:`quantize_base`: every quantized weight becomes a frozen parameter again, in its
    compute dtype (the values are the dequantized ones: quantization itself cannot be undone).

    Returns:
        The module paths changed, sorted.
    """
    changed = []
    for path, module in model.named_modules():
        if not is_quantized(module):
            continue
        holder = module.quantized_weight
        del module._modules["quantized_weight"]
        _remove_hooks(module)
        module.weight = nn.Parameter(holder.dequantize(), requires_grad=False)
        changed.append(path)
    return sorted(changed)


def _remove_hooks(module: nn.Module) -> None:
    """Drop this module's dequantization hooks (by function: a LoRA layer made from a quantized module
    holds copies of its hook dictionaries, which the original handles do not reach)."""
    for key in [k for k, hook in module._forward_pre_hooks.items() if hook is _with_dequantized_weight]:
        del module._forward_pre_hooks[key]
    for key in [k for k, hook in module._forward_hooks.items() if hook is _drop_dequantized_weight]:
        del module._forward_hooks[key]
        module._forward_hooks_always_called.pop(key, None)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by the quantized weights of ``model``."""
    return sum(m.nbytes for m in model.modules() if isinstance(m, QuantizedWeight))


# ---- the per-call dequantization ----------------------------------------------------------------
def _with_dequantized_weight(module: nn.Module, args) -> None:
    dtype = args[0].dtype if args and torch.is_tensor(args[0]) and args[0].is_floating_point() else None
    holder: QuantizedWeight = module.quantized_weight
    weight = holder.dequantize(dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else None)
    module.__dict__["weight"] = weight  # a plain attribute: never a parameter, never in state_dict()
    hooks = torch.autograd.graph.saved_tensors_hooks(*_saved_as_reference(weight, holder))
    hooks.__enter__()
    module.__dict__["_dequantized_hooks"] = hooks


def _drop_dequantized_weight(module: nn.Module, args, output) -> None:
    hooks = module.__dict__.pop("_dequantized_hooks", None)
    if hooks is not None:
        hooks.__exit__(None, None, None)
    module.__dict__.pop("weight", None)


class _CompactRef:
    """What autograd keeps instead of a dequantized weight: the compact weight and the view geometry."""

    __slots__ = ("holder", "dtype", "size", "stride", "offset")

    def __init__(self, holder: QuantizedWeight, tensor: torch.Tensor) -> None:
        self.holder, self.dtype = holder, tensor.dtype
        self.size, self.stride, self.offset = tensor.size(), tensor.stride(), tensor.storage_offset()

    def rebuild(self) -> torch.Tensor:
        return self.holder.dequantize(self.dtype).as_strided(self.size, self.stride, self.offset)


def _saved_as_reference(weight: torch.Tensor, holder: QuantizedWeight):
    """Saved-tensor hooks: a tensor sharing ``weight``'s storage is saved as a :class:`_CompactRef` and
    rebuilt by dequantizing in backward; every other tensor goes to the hooks that were active before
    (activation checkpointing's, a memory profiler's), or is saved as usual."""
    storage, dtype = weight.untyped_storage().data_ptr(), weight.dtype  # not ``weight``: the closures must not keep it
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)  # as torch.utils.checkpoint reads it
    outer_pack, outer_unpack = outer if outer is not None else (None, None)

    def pack(tensor: torch.Tensor):
        if tensor.untyped_storage().data_ptr() == storage and tensor.dtype == dtype:
            return _CompactRef(holder, tensor)
        return outer_pack(tensor) if outer_pack is not None else tensor

    def unpack(saved):
        if isinstance(saved, _CompactRef):
            return saved.rebuild()
        return outer_unpack(saved) if outer_unpack is not None else saved

    return pack, unpack


def quantized_nbytes(mode: str, shape: tuple[int, ...]) -> int:
    """The bytes :class:`QuantizedWeight` takes for a weight of ``shape`` in ``mode``, from the shape
    alone (tested equal to :attr:`QuantizedWeight.nbytes`), so reports can size models built on the
    meta device."""
    numel = math.prod(shape)
    if mode == "nf4":
        blocks = -(-numel // _NF4_BLOCK)
        return -(-numel // 2) + blocks + 4 * -(-blocks // 256) + 4
    if mode in ("int8", "fp8"):
        return numel + 4 * shape[0]
    if mode in _HALF:
        return 2 * numel
    raise QuantizationError(f"unknown base precision {mode!r}: choose one of {', '.join(QUANT_MODES)}")
