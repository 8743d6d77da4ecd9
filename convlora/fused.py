"""The fast unmerged LoRA step: custom autograd functions for Linear and ConvNd layers.

A LoRA layer in training computes ``y = base(x; W) + s * B(A(x))``. Left to autograd (the way
PEFT runs it) that costs, beyond the frozen layer itself: a forward pass of ``A`` and of ``B``, an
extra output tensor and an add, two more ops for ``dL/dx`` plus an add, and weight gradients for
``A`` and ``B`` that autograd computes as skinny GEMMs in their slow orientation (on this CPU an
``(out, T) @ (T, r)`` product runs ~10x slower than the same numbers as ``(r, T) @ (T, out)``);
for 1x1 convolutions oneDNN's weight gradient with ``r`` output channels is slower still, and a
convolution with ``r = 8`` output channels costs ~20% of one with 128 (channels come in blocks of 16).

Two exact formulations are used here, chosen per layer and per call by :func:`use_fold`:

**fold** (the weight is small next to the activations: high-resolution layers, attention,
feed-forward)::

    forward:   W' = W + s * B @ A                  one (C_out, r) @ (r, C_in/g * k) GEMM
               [y; h] = base(x; [W'; A])           spatial convs: A rides along as r extra
                                                   output channels (h is kept for dL/dB)
               y = base(x; W')                     Linear / 1x1 convs: exactly the frozen cost
    backward:  dL/dx = base_input_grad(g; W')      exactly the frozen layer's cost (W' rebuilt)
               g_h   = s * B^T g                   (r, C_out) @ (C_out, L)
               dL/dA = weight_grad(x, g_h)         r output channels only
               dL/dB = s * (h g^T)^T               (r, L) @ (L, C_out), transposed
                                                   (Linear / 1x1: h = A x recomputed here)

**branch** (the weight is large next to the activations: low-resolution layers)::

    forward:   y = base(x; W);  h = A(x);  y += s * B h      in place, no extra output tensor
    backward:  g_h = s * B^T g
               dL/dx = base_input_grad(g; W) + A^T-grad(g_h)  accumulated in place
               dL/dA, dL/dB as above (h saved from the forward pass: r channels)

Neither ever computes the frozen weight's gradient; bias gradients are computed only when the bias
trains. Both save ``x`` and at most ``h`` (``r`` channels) — what PEFT's graph saves — and never
the folded weight, so peak memory is not higher. Fold is used in float32/float64 only: in half precision, rounding ``W + s*ΔW``
to 8 or 11 mantissa bits would swallow a small ``ΔW``.

Geometry comes from the layer itself in :func:`conv_geometry`: stride, dilation, groups and the
padding torch resolved at construction (``_reversed_padding_repeated_twice``, which also holds the
resolved ``"same"`` padding), applied exactly as ``nn.ConvNd._conv_forward`` applies them. Grouped
convs use the same ``ΔW[o, i] = Σ_r B[o, r] A[r, i]`` as the merge (A shared by the groups).

Where a call does not fit (dropout active, autocast, mixed dtypes, a trainable base weight,
channels-last or unbatched input, a non-CPU device, ``torch.compile``) the layer runs its
straightforward formula instead; :func:`fused_supported` says which.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

#: Master switch: False makes every layer run its straightforward formula (tests, benchmark).
ENABLED = True

_conv_backward = torch.ops.aten.convolution_backward.default
_FOLD_DTYPES = (torch.float32, torch.float64)


class ConvGeometry(NamedTuple):
    """What ``nn.ConvNd._conv_forward`` hands to ``F.convNd``, in numeric form.

    Attributes:
        pre_pad: ``F.pad`` widths applied to the input before the convolution (``None``: none).
        pre_pad_mode: the ``F.pad`` mode for ``pre_pad``.
        stride, padding, dilation: one int per spatial dimension; ``padding`` is symmetric.
        groups: the base layer's groups.
    """

    pre_pad: list[int] | None
    pre_pad_mode: str
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int


def conv_geometry(layer: nn.Module) -> ConvGeometry:
    """The base conv's geometry, resolved as ``nn.ConvNd._conv_forward`` resolves it.

    ``padding_mode != "zeros"``: the input is padded by ``_reversed_padding_repeated_twice`` in that
    mode and convolved with padding 0, as ``_conv_forward`` does. ``"zeros"``: symmetric padding
    goes to the convolution; the asymmetric remainder of ``"same"`` with an even kernel is padded
    onto the input first (right/bottom side), as ATen's ``_convolution_mode`` does.
    """
    nd = len(layer.kernel_size)
    rev = list(layer._reversed_padding_repeated_twice)  # F.pad order: last dim first, (left, right)
    left = [rev[2 * (nd - 1 - d)] for d in range(nd)]
    right = [rev[2 * (nd - 1 - d) + 1] for d in range(nd)]
    stride, dilation = list(layer.stride), list(layer.dilation)
    if layer.padding_mode != "zeros":
        return ConvGeometry(rev, layer.padding_mode, stride, [0] * nd, dilation, layer.groups)
    if left == right:
        return ConvGeometry(None, "constant", stride, left, dilation, layer.groups)
    extra = [0] * (2 * nd)
    for d in range(nd):
        extra[2 * (nd - 1 - d) + 1] = right[d] - left[d]
    return ConvGeometry(extra, "constant", stride, left, dilation, layer.groups)


def use_fold(weight: torch.Tensor, x_numel: int, y_numel: int, spatial: bool) -> bool:
    """Fold ``s * ΔW`` into the weight for this call, or run the separate low-rank branch?

    Fold costs two passes over the weight (``W'`` is built in the forward pass and again in the
    backward pass); the branch costs passes over the activations plus, for a spatial kernel, a
    forward and a transposed convolution with only ``r`` channels (slow per FLOP in oneDNN). Measured
    per layer on the SD-shaped UNet (benchmarks/), fold wins while ``|W| <= c * (|x| + |y|)`` (element
    counts) with ``c = 2`` for spatial kernels and ``c = 1`` for Linear and 1x1 convolutions.
    """
    budget = (2 if spatial else 1) * (x_numel + y_numel)
    return weight.dtype in _FOLD_DTYPES and weight.numel() <= budget


# ---- convolution ---------------------------------------------------------------------------------
def _folded_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W + s * B @ A`` in the weight's layout and dtype: (C_out, r) @ (r, C_in/g * prod(k))."""
    flat = torch.addmm(weight.reshape(weight.shape[0], -1), lora_B.reshape(lora_B.shape[0], -1),
                       lora_A.reshape(lora_A.shape[0], -1), alpha=scaling)
    return flat.view_as(weight)


def _folded_weight_and_A(weight, lora_A, lora_B, scaling: float, groups: int) -> torch.Tensor:
    """``[W_j + s * B_j @ A; A]`` for each group j: (g * (C_out/g + r), C_in/g, *k), one weight pass."""
    if groups > 1:
        return _cat_per_group(_folded_weight(weight, lora_A, lora_B, scaling), lora_A, groups)
    c_out, r = weight.shape[0], lora_A.shape[0]
    out = weight.new_empty((c_out + r, *weight.shape[1:]))
    torch.addmm(weight.reshape(c_out, -1), lora_B.reshape(c_out, r), lora_A.reshape(r, -1), alpha=scaling,
                out=out[:c_out].view(c_out, -1))
    out[c_out:] = lora_A
    return out


def _cat_per_group(weight: torch.Tensor, lora_A: torch.Tensor, groups: int) -> torch.Tensor:
    """``[W_j; A]`` for each group j: (g * (C_out/g + r), C_in/g, *k)."""
    if groups == 1:
        return torch.cat([weight, lora_A])
    rest = weight.shape[1:]
    per_group = weight.view(groups, -1, *rest)
    return torch.cat([per_group, lora_A.unsqueeze(0).expand(groups, *lora_A.shape)], 1).view(-1, *rest)


def _cat_bias_per_group(bias: torch.Tensor | None, r: int, groups: int) -> torch.Tensor | None:
    """``[b_j; 0]`` for each group j, matching :func:`_cat_per_group`."""
    if bias is None:
        return None
    per_group = bias.view(groups, -1)
    return torch.cat([per_group, per_group.new_zeros(groups, r)], 1).view(-1)


def _per_group_B(lora_B: torch.Tensor, groups: int, n: int) -> torch.Tensor:
    """``B`` as a batch of per-group matrices, repeated over the batch: (N*g, C_out/g, r)."""
    c_out, r = lora_B.shape[:2]
    b = lora_B.reshape(groups, c_out // groups, r)
    if groups == 1:
        return b.expand(n, c_out, r)  # no copy
    return b.repeat(n, 1, 1) if n > 1 else b


def _is_pointwise(lora_A: torch.Tensor, stride, padding, groups: int) -> bool:
    """A 1x1 (any nd), stride-1, unpadded, ungrouped conv: a plain matrix product per sample."""
    return groups == 1 and all(k == 1 for k in lora_A.shape[2:]) and all(s == 1 for s in stride) and not any(padding)


class _ConvLoRAFunction(torch.autograd.Function):
    """``y = conv(x, W, b) + s * conv1x1_g(conv_g(x, A repeated g times), B)`` (see module doc)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, geo, fold):
        stride, padding, dilation, groups = geo
        conv_args = (stride, padding, dilation, False, [0] * len(stride), groups)
        n, c_out, r = x.shape[0], weight.shape[0], lora_A.shape[0]
        pointwise = _is_pointwise(lora_A, stride, padding, groups)
        h = None
        if fold and not pointwise:
            # One conv for [W'; A] (per group): A's r extra output channels cost a fraction of a
            # separate conv with r outputs (oneDNN computes channels in blocks of 16).
            cg = c_out // groups
            out = _conv(
                x, _folded_weight_and_A(weight, lora_A, lora_B, scaling, groups),
                _cat_bias_per_group(bias, r, groups), *conv_args,
            )  # (N, g * (C_out/g + r), *S_out)
            spatial = out.shape[2:]
            out = out.view(n, groups, cg + r, -1)
            y = out[:, :, :cg].contiguous().view(n, c_out, *spatial)
            h = out[:, :, cg:].contiguous().view(n, groups * r, *spatial)
        elif fold:
            y = _conv(x, _folded_weight(weight, lora_A, lora_B, scaling), bias, *conv_args)
        else:
            y = _conv(x, weight, bias, *conv_args).contiguous()
            h = _lora_hidden(x, lora_A, conv_args, pointwise)  # (N, g*r, *S_out)
            # (N*g, C_out/g, L) += s * (N*g, C_out/g, r) @ (N*g, r, L)
            y.view(n * groups, c_out // groups, -1).baddbmm_(
                _per_group_B(lora_B, groups, n), h.view(n * groups, r, -1), alpha=scaling
            )
        ctx.save_for_backward(x, weight, lora_A, lora_B, h)
        ctx.conv_args, ctx.scaling, ctx.fold, ctx.pointwise = conv_args, scaling, fold, pointwise
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, h = ctx.saved_tensors
        conv_args, s, pointwise = ctx.conv_args, ctx.scaling, ctx.pointwise
        groups = conv_args[-1]
        need_x, _, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        n, c_out, r = x.shape[0], weight.shape[0], lora_A.shape[0]
        cg = c_out // groups
        g = grad_y.contiguous()
        g3 = g.view(n * groups, cg, -1)  # (N*g, C_out/g, L)
        grad_x = grad_bias = grad_A = grad_B = None
        g_h = None
        if need_A or (need_x and not ctx.fold):
            # (N*g, r, C_out/g) @ (N*g, C_out/g, L) -> (N*g, r, L)
            g_h = torch.bmm(_per_group_B(lora_B, groups, n).transpose(1, 2), g3).mul_(s)
            g_h = g_h.view(n, groups * r, *g.shape[2:])
        # The skinny reductions over g come first, while g (just written by the next layer's backward)
        # is still in cache; the wide input-gradient convolution last, since it evicts it (measured:
        # the whole SD-UNet step 1.2-1.4% faster than input gradient first).
        if need_B:
            if h is None:
                h = _lora_hidden(x, lora_A, conv_args, pointwise)
            # (N*g, r, L) @ (N*g, L, C_out/g) -> (N*g, r, C_out/g), summed over the batch
            grad_Bt = torch.bmm(h.view(n * groups, r, -1), g3.transpose(1, 2)).view(n, groups, r, cg).sum(0)
            grad_B = grad_Bt.transpose(1, 2).reshape(lora_B.shape).mul_(s)
        if need_bias:
            grad_bias = g.sum([0, *range(2, g.dim())])
        if need_A:
            grad_A = _lora_A_grad(x, g_h, lora_A, conv_args, pointwise)
        if need_x:
            if ctx.fold:
                grad_x = _input_grad(g, x, _folded_weight(weight, lora_A, lora_B, s), conv_args)
            else:
                grad_x = _input_grad(g, x, weight, conv_args)
                _add_lora_input_grad_(grad_x, g_h, x, lora_A, conv_args, pointwise)
        return grad_x, None, grad_bias, grad_A, grad_B, None, None, None


def _lora_hidden(x, lora_A, conv_args, pointwise):
    """``h = conv_g(x, A repeated per group)``: (N, g*r, *S_out)."""
    if pointwise:
        # (N, r, C_in) @ (N, C_in, L) -> (N, r, L); bmm, not matmul: matmul would fold this into the
        # slow (N*L, C_in) @ (C_in, r) orientation and copy x transposed first.
        n, r = x.shape[0], lora_A.shape[0]
        a = lora_A.reshape(1, r, -1).expand(n, r, x.shape[1])
        return torch.bmm(a, x.reshape(n, x.shape[1], -1)).view(n, r, *x.shape[2:])
    groups = conv_args[-1]
    a_rep = lora_A.repeat(groups, *(1,) * (lora_A.dim() - 1)) if groups > 1 else lora_A
    return _conv(x, a_rep, None, *conv_args)


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    """The forward convolution for ``conv_args``: F.convNd (half the dispatch cost of aten.convolution)."""
    return _CONV_FN[len(stride)](x, weight, bias, stride, padding, dilation, groups)


def _input_grad(g, x, weight, conv_args):
    return _conv_backward(g, x, weight, None, *conv_args, [True, False, False])[0]


def _add_lora_input_grad_(grad_x, g_h, x, lora_A, conv_args, pointwise):
    """``grad_x += conv_transpose_g(g_h, A repeated per group)``, in place."""
    if pointwise:
        # (N, C_in, L) += (C_in, r) @ (N, r, L)
        n, c_in, r = x.shape[0], x.shape[1], lora_A.shape[0]
        a_t = lora_A.reshape(r, c_in).t().expand(n, c_in, r)
        grad_x.view(n, c_in, -1).baddbmm_(a_t, g_h.reshape(n, r, -1))
        return
    groups = conv_args[-1]
    a_rep = lora_A.repeat(groups, *(1,) * (lora_A.dim() - 1)) if groups > 1 else lora_A
    grad_x += _input_grad(g_h, x, a_rep, conv_args)


def _lora_A_grad(x, g_h, lora_A, conv_args, pointwise):
    """``dL/dA``: the weight gradient of ``conv_g(x, A_rep)`` for ``g_h``, summed over the groups."""
    n, r = x.shape[0], lora_A.shape[0]
    if pointwise:
        # (N, r, L) @ (N, L, C_in) -> (N, r, C_in), summed over the batch
        grad = torch.bmm(g_h.reshape(n, r, -1), x.reshape(n, x.shape[1], -1).transpose(1, 2)).sum(0)
        return grad.view_as(lora_A)
    groups = conv_args[-1]
    a_rep = lora_A.repeat(groups, *(1,) * (lora_A.dim() - 1)) if groups > 1 else lora_A
    grad = _conv_backward(g_h, x, a_rep, None, *conv_args, [False, True, False])[1]
    return grad.view(groups, *lora_A.shape).sum(0) if groups > 1 else grad


# ---- linear --------------------------------------------------------------------------------------
class _LinearLoRAFunction(torch.autograd.Function):
    """``y = x W^T + b + s * (x A^T) B^T`` (see module doc); ``x`` is ``(..., in)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, fold):
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        h_t = None
        if fold:
            y = F.linear(x2, torch.addmm(weight, lora_B, lora_A, alpha=scaling), bias)
        else:
            y = F.linear(x2, weight, bias)
            h_t = torch.mm(lora_A, x2.t())  # (r, in) @ (in, T) -> (r, T)
            y.addmm_(h_t.t(), lora_B.t(), alpha=scaling)  # (T, out) += s * (T, r) @ (r, out)
        ctx.save_for_backward(x, weight, lora_A, lora_B, h_t)
        ctx.scaling, ctx.fold = scaling, fold
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, h_t = ctx.saved_tensors
        s = ctx.scaling
        need_x, _, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (T, out)
        grad_x = grad_bias = grad_A = grad_B = None
        g_h_t = None
        if need_A or (need_x and not ctx.fold):
            g_h_t = torch.mm(lora_B.t(), g.t()).mul_(s)  # (r, out) @ (out, T) -> (r, T)
        if need_x:
            if ctx.fold:
                grad_x = torch.mm(g, torch.addmm(weight, lora_B, lora_A, alpha=s))  # (T, out) @ (out, in)
            else:
                grad_x = torch.mm(g, weight).addmm_(g_h_t.t(), lora_A)  # ... + (T, r) @ (r, in)
            grad_x = grad_x.view(x.shape)
        if need_A:
            grad_A = torch.mm(g_h_t, x2)  # (r, T) @ (T, in) -> (r, in)
        if need_B:
            if h_t is None:
                h_t = torch.mm(lora_A, x2.t())  # (r, in) @ (in, T) -> (r, T)
            grad_B = torch.mm(h_t, g).t().mul(s)  # (r, T) @ (T, out) -> (r, out) -> (out, r)
        if need_bias:
            grad_bias = g.sum(0)
        return grad_x, None, grad_bias, grad_A, grad_B, None, None


# ---- entry points used by convlora.layers --------------------------------------------------------
def fused_supported(layer: nn.Module, x: torch.Tensor, adapter: nn.Module | None = None) -> bool:
    """Whether this call may take the fused path (where it computes what the plain formula does).

    ``layer`` is a LoRA Linear or ConvNd, ``adapter`` one of its :class:`convlora.layers.LoRAAdapter`
    (``lora_A``, ``lora_B``, ``lora_dropout``, ``scaling``); ``None``: the layer's single active adapter.
    """
    adapter = layer.adapter() if adapter is None else adapter
    weight, lora_A = layer.weight, adapter.lora_A
    dropout = adapter.lora_dropout
    if not (
        ENABLED
        and type(x) is torch.Tensor
        and x.device.type == "cpu"  # measured on CPU only; elsewhere the plain formula runs
        and type(weight) is nn.Parameter
        and not weight.requires_grad  # the fused path never computes the base weight's gradient
        and (isinstance(dropout, nn.Identity) or not dropout.training)
        and x.dtype == weight.dtype == lora_A.dtype == adapter.lora_B.dtype
        and (layer.bias is None or layer.bias.dtype == weight.dtype)
        and not torch.is_autocast_enabled(x.device.type)
        and not torch.compiler.is_compiling()
    ):
        return False
    if isinstance(layer, nn.Linear):
        return x.dim() >= 1
    # batched, default (channels-first) memory layout
    return x.dim() == len(layer.kernel_size) + 2 and x.is_contiguous()


def conv_lora_forward(layer: nn.Module, x: torch.Tensor, adapter: nn.Module) -> torch.Tensor:
    """``layer``'s output plus ``adapter``'s branch (unmerged) for ``x`` through :class:`_ConvLoRAFunction`."""
    geo = conv_geometry(layer)
    if geo.pre_pad is not None:
        x = F.pad(x, geo.pre_pad, mode=geo.pre_pad_mode)
    spatial_out = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, p, d, k, s in zip(x.shape[2:], geo.padding, geo.dilation, layer.kernel_size, geo.stride)
    ]
    y_numel = x.shape[0] * layer.out_channels * math.prod(spatial_out)
    fold = use_fold(layer.weight, x.numel(), y_numel, spatial=any(k > 1 for k in layer.kernel_size))
    return _ConvLoRAFunction.apply(
        x, layer.weight, layer.bias, adapter.lora_A, adapter.lora_B, adapter.scaling,
        (geo.stride, geo.padding, geo.dilation, geo.groups), fold,
    )


def linear_lora_forward(layer: nn.Module, x: torch.Tensor, adapter: nn.Module) -> torch.Tensor:
    """``layer``'s output plus ``adapter``'s branch (unmerged) for ``x`` through :class:`_LinearLoRAFunction`."""
    tokens = x.numel() // x.shape[-1]
    fold = use_fold(layer.weight, x.numel(), tokens * layer.out_features, spatial=False)
    return _LinearLoRAFunction.apply(x, layer.weight, layer.bias, adapter.lora_A, adapter.lora_B, adapter.scaling, fold)
