"""The fused LoRA path (convlora.fused) equals the straightforward formula, and never does base-weight work.

Every comparison runs the same layer twice: once with ``convlora.fused.ENABLED = False`` (the layer's
own ``base(x) + s * B(A(x))`` through autograd) and once through the fused autograd functions, both
with a random non-zero A and B, and compares the output and every gradient (input, A, B, bias).
Both fused formulations (``fold`` and ``branch``, normally chosen by ``use_fold``) are forced in turn.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import convlora
from convlora import fused
from convlora.testing import relative_error

FP32_TOL = 1e-5  # relative to max|expected| (float32, same math in another order)
BF16_TOL = 2e-2  # bfloat16 keeps 8 mantissa bits (eps 3.9e-3); outputs and grads are rounded per op

CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SPATIAL = {1: (15,), 2: (9, 8), 3: (6, 5, 7)}

# (in, out, kernel, conv kwargs); "tuple" is filled per dimension count below.
GEOMETRIES = {
    "plain": (4, 6, 3, {"padding": 1}),
    "unpadded": (4, 6, 3, {}),
    "tuple-kernel-padding": (4, 6, "tuple", {"padding": "tuple"}),
    "stride-2": (4, 6, 3, {"stride": 2, "padding": 1}),
    "same": (4, 6, 3, {"padding": "same"}),
    "same-even-kernel": (4, 6, 4, {"padding": "same"}),
    "same-dilated": (4, 6, 3, {"padding": "same", "dilation": 2}),
    "dilation-stride": (4, 6, 3, {"dilation": 2, "padding": 1, "stride": 2}),
    "reflect": (4, 6, 3, {"padding": 1, "padding_mode": "reflect"}),
    "replicate-same": (4, 6, 3, {"padding": "same", "padding_mode": "replicate"}),
    "circular": (4, 6, 3, {"padding": 2, "padding_mode": "circular"}),
    "groups-2": (4, 6, 3, {"groups": 2, "padding": 1}),
    "depthwise": (6, 6, 3, {"groups": 6, "padding": 1}),
    "depthwise-multiplier-stride": (4, 8, 3, {"groups": 4, "padding": 1, "stride": 2}),
    "no-bias": (4, 6, 3, {"padding": 1, "bias": False}),
    "pointwise": (4, 6, 1, {}),
    "pointwise-no-bias": (4, 6, 1, {"bias": False}),
    "pointwise-strided": (4, 6, 1, {"stride": 2}),
}
CASES = [(d, g) for d in (1, 2, 3) for g in GEOMETRIES]
CASE_IDS = [f"conv{d}d-{g}" for d, g in CASES]


def make_conv(dims: int, geometry: str, r: int = 2, dtype=torch.float32) -> nn.Module:
    c_in, c_out, kernel, kwargs = GEOMETRIES[geometry]
    kwargs = dict(kwargs)
    if kernel == "tuple":
        kernel = (3, 1, 2)[:dims] if dims > 1 else (2,)
    if kwargs.get("padding") == "tuple":
        kwargs["padding"] = (1, 0, 2)[:dims] if dims > 1 else (1,)
    base = CONV_CLASSES[dims](c_in, c_out, kernel, **kwargs)
    return _lora_from(base, r, dtype)


def make_linear(r: int = 2, bias: bool = True, dtype=torch.float32) -> nn.Module:
    return _lora_from(nn.Linear(12, 10, bias=bias), r, dtype)


def _lora_from(base: nn.Module, r: int, dtype) -> nn.Module:
    layer = convlora.layers.LORA_CLASSES[type(base)].from_module(base, r=r, alpha=3 * r)
    layer.weight.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)  # B = 0 at init would hide every B-side mistake
    if layer.bias is not None:
        layer.bias.requires_grad_(True)  # a trainable bias is the harder case (bias="all")
    return layer.to(dtype).train()


@contextlib.contextmanager
def forced_path(path: str | None):
    """``"fold"`` / ``"branch"``: force that formulation; ``"plain"``: the straightforward formula."""
    old_enabled, old_rule = fused.ENABLED, fused.use_fold
    fused.ENABLED = path != "plain"
    if path in ("fold", "branch"):
        fused.use_fold = lambda *args, **kwargs: path == "fold"
    try:
        yield
    finally:
        fused.ENABLED, fused.use_fold = old_enabled, old_rule


def run(layer: nn.Module, x: torch.Tensor, grad_out_seed: int = 1) -> dict[str, torch.Tensor]:
    """Output and every gradient of ``sum(y * G)`` for a fixed random ``G``."""
    for p in layer.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_out_seed)).to(y.dtype)
    (y * weights).sum().backward()
    result = {"y": y.detach(), "x.grad": x.grad, "A.grad": layer.lora_A.grad, "B.grad": layer.lora_B.grad}
    if layer.bias is not None and layer.bias.requires_grad:
        result["bias.grad"] = layer.bias.grad
    assert layer.weight.grad is None
    return result


def assert_same(got: dict, expected: dict, tol: float) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] is not None, key
        err = relative_error(got[key], expected[key])
        assert err <= tol, f"{key}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("path", ["fold", "branch"])
@pytest.mark.parametrize("dims,geometry", CASES, ids=CASE_IDS)
def test_conv_fused_equals_formula(dims, geometry, path):
    torch.manual_seed(0)
    layer = make_conv(dims, geometry)
    x = torch.randn(2, layer.in_channels, *SPATIAL[dims])
    assert fused.fused_supported(layer, x)
    with forced_path("plain"):
        expected = run(layer, x)
    with forced_path(path):
        got = run(layer, x)
    assert_same(got, expected, FP32_TOL)


@pytest.mark.parametrize("path", ["fold", "branch"])
@pytest.mark.parametrize("shape", [(5, 12), (2, 7, 12), (2, 3, 4, 12), (12,)], ids=["2d", "3d", "4d", "1d"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_fused_equals_formula(shape, bias, path):
    torch.manual_seed(0)
    layer = make_linear(bias=bias)
    x = torch.randn(shape)
    with forced_path("plain"):
        expected = run(layer, x)
    with forced_path(path):
        got = run(layer, x)
    assert_same(got, expected, FP32_TOL)


@pytest.mark.parametrize("dims,geometry", [(1, "same"), (2, "plain"), (2, "groups-2"), (2, "pointwise"), (3, "stride-2")])
def test_bf16_fused_equals_formula(dims, geometry):
    """bfloat16 runs the branch formulation (fold would round s*ΔW into W); tolerance BF16_TOL."""
    torch.manual_seed(0)
    layer = make_conv(dims, geometry, dtype=torch.bfloat16)
    x = torch.randn(2, layer.in_channels, *SPATIAL[dims], dtype=torch.bfloat16)
    assert not fused.use_fold(layer.weight, 10**9, 10**9, spatial=True)
    with forced_path("plain"):
        expected = run(layer, x)
    got = run(layer, x)
    assert_same(got, expected, BF16_TOL)
    linear = make_linear(dtype=torch.bfloat16)
    xl = torch.randn(3, 5, 12, dtype=torch.bfloat16)
    with forced_path("plain"):
        expected = run(linear, xl)
    assert_same(run(linear, xl), expected, BF16_TOL)


@pytest.mark.parametrize("path", ["fold", "branch"])
def test_partial_requires_grad(path):
    """Input without grad (a first layer), frozen A (only B trains), frozen bias: only what is asked."""
    torch.manual_seed(0)
    for layer, x in [(make_conv(2, "plain"), torch.randn(2, 4, 9, 8)), (make_linear(), torch.randn(3, 12))]:
        layer.lora_A.requires_grad_(False)
        layer.bias.requires_grad_(False)
        outs = {}
        for mode in ("plain", path):
            with forced_path(mode):
                layer.lora_B.grad = None
                y = layer(x)
                y.square().sum().backward()
                outs[mode] = (y.detach(), layer.lora_B.grad)
            assert layer.lora_A.grad is None and layer.bias.grad is None
        for got, expected in zip(outs[path], outs["plain"]):
            assert relative_error(got, expected) <= FP32_TOL


@pytest.mark.parametrize("path", ["fold", "branch"])
def test_no_grad_and_merge_weights_false_inference(path):
    torch.manual_seed(0)
    layer = make_conv(2, "stride-2")
    layer.merge_weights = False
    layer.eval()  # not merged (merge_weights=False): the unmerged forward runs
    x = torch.randn(2, 4, 9, 8)
    with torch.no_grad():
        with forced_path("plain"):
            expected = layer(x)
        with forced_path(path):
            got = layer(x)
    assert relative_error(got, expected) <= FP32_TOL


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func, args, out))
        return out


_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.baddbmm.default}


@pytest.mark.parametrize("path", ["fold", "branch"])
@pytest.mark.parametrize("dims,geometry", [(2, "plain"), (2, "depthwise"), (1, "pointwise"), (3, "groups-2"), (0, "linear")])
def test_backward_never_computes_the_frozen_weight_gradient(dims, geometry, path):
    """No weight-gradient convolution except A's (r * groups output channels), and no matrix product
    shaped like the weight except ``W + s*B@A`` (whose inner dimension is r)."""
    torch.manual_seed(0)
    r = 3
    layer = make_linear(r=r) if dims == 0 else make_conv(dims, geometry, r=r)
    x = torch.randn(4, 12) if dims == 0 else torch.randn(2, layer.in_channels, *SPATIAL[dims])
    x.requires_grad_(True)
    weight_2d = layer.weight.shape[0], layer.weight[0].numel()
    with forced_path(path):
        y = layer(x)
        recorder = _RecordOps()
        with recorder:
            y.sum().backward()
    groups = getattr(layer, "groups", 1)
    for func, args, out in recorder.calls:
        if func is torch.ops.aten.convolution_backward.default and args[-1][1]:
            assert args[2].shape[0] == groups * r, f"weight gradient of a {tuple(args[2].shape)} weight"
        if func in _MATMULS:
            a, b = (args[1], args[2]) if func in (torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default) else args[:2]
            if tuple(out.shape[-2:]) == weight_2d:
                assert a.shape[-1] == r, f"{func}: {tuple(a.shape)} @ {tuple(b.shape)} is a weight gradient"
    assert layer.weight.grad is None and x.grad is not None


def test_fallbacks_run_the_formula():
    """Cases the fused functions do not cover take the plain path (and still compute the right thing)."""
    torch.manual_seed(0)
    conv = make_conv(2, "plain")
    x = torch.randn(2, 4, 9, 8)
    assert fused.fused_supported(conv, x)
    assert not fused.fused_supported(conv, x[0])  # unbatched
    assert not fused.fused_supported(conv, x.contiguous(memory_format=torch.channels_last))
    assert not fused.fused_supported(conv, x.double())  # dtype differs from the layer's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused.fused_supported(conv, x)
    conv.weight.requires_grad_(True)  # full fine-tuning plus LoRA: the base weight needs its gradient
    assert not fused.fused_supported(conv, x)
    y = conv(x)
    y.sum().backward()
    assert conv.weight.grad is not None
    conv.weight.requires_grad_(False)
    dropout = convlora.Conv2d(4, 6, 3, r=2, lora_dropout=0.5).train()
    assert not fused.fused_supported(dropout, x)
    dropout.merge_weights = False
    dropout.eval()  # dropout inactive (and not merged): the fused forward applies again
    assert fused.fused_supported(dropout, x)
    with forced_path("plain"):
        assert not fused.fused_supported(conv, x)


def test_fold_rule():
    w = torch.empty(64, 64, 3, 3)  # 36864 elements
    assert fused.use_fold(w, 10_000, 10_000, spatial=True)  # 2 * 20000 >= 36864
    assert not fused.use_fold(w, 10_000, 10_000, spatial=False)
    assert not fused.use_fold(w.bfloat16(), 10**6, 10**6, spatial=True)  # never in half precision


@pytest.mark.parametrize("geometry", ["same-even-kernel", "replicate-same", "circular", "dilation-stride", "tuple-kernel-padding"])
def test_conv_geometry_matches_conv_forward(geometry):
    """conv_geometry reproduces ``_conv_forward`` exactly (pre-padding + symmetric padding)."""
    torch.manual_seed(0)
    layer = make_conv(2, geometry)
    x = torch.randn(2, layer.in_channels, *SPATIAL[2])
    geo = fused.conv_geometry(layer)
    padded = x if geo.pre_pad is None else torch.nn.functional.pad(x, geo.pre_pad, mode=geo.pre_pad_mode)
    got = torch.nn.functional.conv2d(padded, layer.weight, layer.bias, geo.stride, geo.padding, geo.dilation, geo.groups)
    expected = nn.Conv2d._conv_forward(layer, x, layer.weight, layer.bias)
    assert torch.equal(got, expected)


def test_unet_step_matches_formula():
    """A whole tiny UNet (attention, resnet convs, up/down samplers, 1x1 projections) trains the same."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2,
    )
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
               "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
    convlora.inject_lora(unet, convlora.LoRAConfig(r=4, alpha=8, target_modules=targets))
    convlora.mark_only_lora_as_trainable(unet)
    convlora.testing.randomize_lora_(unet, std=0.3)
    unet.train()
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8)
    results = {}
    for mode in ("plain", None):
        with forced_path(mode):
            unet.zero_grad(set_to_none=True)
            x = sample.clone().requires_grad_(True)
            out = unet(x, torch.tensor([3, 700]), text).sample
            out.square().mean().backward()
            grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
            results[mode] = (out.detach(), x.grad, grads)
    (y0, gx0, g0), (y1, gx1, g1) = results["plain"], results[None]
    assert relative_error(y1, y0) <= FP32_TOL and relative_error(gx1, gx0) <= FP32_TOL
    assert g0.keys() == g1.keys() and len(g0) == 2 * len(convlora.lora_layers(unet))
    worst = max(relative_error(g1[k], g0[k]) for k in g0)
    assert worst <= 1e-4, worst  # per-parameter grads sum many more terms; still ~1e-6 in practice
