"""LoRA layers: shapes for every conv geometry, exact merge / bit-exact unmerge, dtypes, drop-in use."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import convlora
from convlora import layers as layers_module
from convlora.testing import randomize_lora_, relative_error

TOL = 1e-5  # fp32 relative tolerance for merged vs unmerged (PEFT's own conv tests accept atol 0.3)

CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
LORA_CONV = {1: convlora.Conv1d, 2: convlora.Conv2d, 3: convlora.Conv3d}
SPATIAL = {1: (13,), 2: (11, 9), 3: (7, 6, 5)}

# (in, out, kernel, conv kwargs) — each a geometry torch allows; kernels given per dim count below.
GEOMETRIES = {
    "plain": (4, 6, 3, {}),
    "tuple-kernel": (4, 6, "tuple", {"padding": 1}),
    "stride-2": (4, 6, 3, {"stride": 2, "padding": 1}),
    "padding-tuple": (4, 6, 3, {"padding": "tuple"}),
    "padding-same": (4, 6, 3, {"padding": "same"}),
    "same-even-kernel": (4, 6, 2, {"padding": "same"}),
    "dilation-2": (4, 6, 3, {"dilation": 2, "padding": 2}),
    "reflect": (4, 6, 3, {"padding": 1, "padding_mode": "reflect"}),
    "replicate": (4, 6, 3, {"padding": 1, "padding_mode": "replicate"}),
    "circular": (4, 6, 3, {"padding": 1, "padding_mode": "circular"}),
    "same-reflect-dilated": (4, 6, 3, {"padding": "same", "padding_mode": "reflect", "dilation": 2}),
    "groups-2": (4, 6, 3, {"groups": 2, "padding": 1}),
    "depthwise": (6, 6, 3, {"groups": 6, "padding": 1}),
    "depthwise-multiplier": (4, 8, 3, {"groups": 4, "padding": 1, "stride": 2}),
    "no-bias": (4, 6, 3, {"bias": False, "padding": 1}),
    "pointwise": (4, 6, 1, {}),
}


def make_conv(dims: int, geometry: str) -> nn.Module:
    c_in, c_out, kernel, kwargs = GEOMETRIES[geometry]
    kwargs = dict(kwargs)
    if kernel == "tuple":
        kernel = (3, 1, 2)[:dims] if dims > 1 else (3,)
    if kwargs.get("padding") == "tuple":
        kwargs["padding"] = (1, 0, 2)[:dims]
    return CONV_CLASSES[dims](c_in, c_out, kernel, **kwargs)


def conv_input(dims: int, conv: nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, conv.in_channels, *SPATIAL[dims])


ALL_CONVS = [(d, g) for d in (1, 2, 3) for g in GEOMETRIES]


@pytest.mark.parametrize("dims,geometry", ALL_CONVS, ids=[f"conv{d}d-{g}" for d, g in ALL_CONVS])
def test_conv_lora_shapes_and_exact_merge(dims, geometry):
    torch.manual_seed(0)
    base = make_conv(dims, geometry)
    x = conv_input(dims, base)
    expected_base = base(x)
    layer = LORA_CONV[dims].from_module(base, r=3, alpha=5)

    # Shapes per the README's LoRA math: A (r, C_in/groups, *k), B (C_out, r, *1s).
    assert layer.lora_A.shape == (3, base.in_channels // base.groups, *base.kernel_size)
    assert layer.lora_B.shape == (base.out_channels, 3, *(1,) * dims)
    # Freshly injected (B = 0): bit-identical to the base.
    assert torch.equal(layer(x), expected_base)

    randomize_lora_(layer, seed=1, std=0.3)
    unmerged = layer(x)
    assert relative_error(unmerged, expected_base) > 1e-3, "the random adapter must change the output"
    # Reference: a plain conv with W + s·ΔW, via torch's own conv (independent of the LoRA branch code).
    reference = copy.deepcopy(base)
    with torch.no_grad():
        reference.weight += layer.scaling * (layer.lora_B.flatten(1) @ layer.lora_A.flatten(1)).view_as(base.weight)
    assert relative_error(unmerged, reference(x)) < TOL

    layer.eval()
    assert layer.merged
    assert relative_error(layer(x), unmerged) < TOL
    layer.train()
    assert not layer.merged
    assert torch.equal(layer(x), unmerged)

    plain = layer.to_base_layer(merge=True)
    assert type(plain) is CONV_CLASSES[dims]
    assert relative_error(plain(x), unmerged) < TOL


@pytest.mark.parametrize("kind", ["linear", "gpt2-conv1d"])
def test_linear_kinds_shapes_and_merge(kind):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.Linear(10, 7) if kind == "linear" else Conv1D(7, 10)  # Conv1D(nf=out, nx=in)
    x = torch.randn(3, 5, 10)
    expected_base = base(x)
    cls = convlora.Linear if kind == "linear" else convlora.GPT2Conv1D
    layer = cls.from_module(base, r=4, alpha=2)
    assert layer.lora_A.shape == (4, 10) and layer.lora_B.shape == (7, 4)
    assert torch.equal(layer(x), expected_base)
    randomize_lora_(layer, seed=2)
    unmerged = layer(x)
    delta = layer.scaling * layer.lora_B @ layer.lora_A  # (out, in)
    reference = expected_base + x @ delta.T
    assert relative_error(unmerged, reference) < TOL
    layer.eval()
    assert layer.merged and relative_error(layer(x), unmerged) < TOL
    assert relative_error(layer.to_base_layer(merge=True)(x), unmerged) < TOL


def test_from_module_shares_base_tensors_and_keeps_identity():
    base = nn.Conv2d(4, 8, 3, padding=1)
    layer = convlora.Conv2d.from_module(base, r=2)
    assert isinstance(layer, nn.Conv2d)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert set(base.state_dict()) == {"weight", "bias"}, "the base module must not gain LoRA parameters"
    assert set(layer.state_dict()) == {"weight", "bias", "lora_adapters.default.lora_A", "lora_adapters.default.lora_B"}


def test_from_module_refuses_other_types():
    with pytest.raises(TypeError, match="needs a torch.nn.modules.conv.Conv2d, got torch.nn.modules.conv.Conv1d"):
        convlora.Conv2d.from_module(nn.Conv1d(2, 2, 3))


def test_loralib_style_constructor():
    torch.manual_seed(0)
    layer = convlora.Conv2d(16, 32, 3, r=4, lora_alpha=8, lora_dropout=0.0, merge_weights=True, stride=2)
    assert isinstance(layer, nn.Conv2d)
    assert layer.stride == (2, 2) and layer.scaling == 2.0
    assert not layer.weight.requires_grad, "like loralib, the constructor freezes the pretrained weight"
    assert layer.lora_A.shape == (4, 16, 3, 3) and layer.lora_B.shape == (32, 4, 1, 1)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    linear = convlora.Linear(8, 4, r=2)
    assert linear.lora_alpha == 2.0 and linear.scaling == 1.0, "lora_alpha=None means alpha = r"
    conv1d, conv3d = convlora.Conv1d(3, 5, 3, r=2), convlora.Conv3d(3, 5, 3, r=2)
    assert conv1d(torch.randn(1, 3, 9)).shape == (1, 5, 7)
    assert conv3d(torch.randn(1, 3, 5, 5, 5)).shape == (1, 5, 3, 3, 3)


def test_kaiming_and_gaussian_init():
    torch.manual_seed(0)
    layer = convlora.Conv2d.from_module(nn.Conv2d(8, 8, 3), r=4)
    fan_in = 8 * 9
    bound = (1 / fan_in) ** 0.5  # kaiming_uniform with a=sqrt(5) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.5 * bound
    torch.manual_seed(0)
    big = convlora.Linear.from_module(nn.Linear(4000, 4), r=4, init="gaussian")
    assert abs(big.lora_A.std().item() - 1 / 4) < 0.01
    with pytest.raises(ValueError, match="unknown LoRA init 'xavier'"):
        convlora.Linear.from_module(nn.Linear(4, 4), r=2, init="xavier")
    with pytest.raises(ValueError, match="rank r must be an integer >= 1, got 0"):
        convlora.Linear.from_module(nn.Linear(4, 4), r=0)


def test_rslora_scaling():
    layer = convlora.Linear.from_module(nn.Linear(4, 4), r=16, alpha=8, use_rslora=True)
    assert layer.scaling == pytest.approx(8 / 4)


def test_eval_forward_does_no_lora_work():
    layer = randomize_lora_(convlora.Conv2d.from_module(nn.Conv2d(4, 4, 3), r=2))
    x = torch.randn(1, 4, 8, 8)
    layer.eval()

    def forbidden(*_):
        raise AssertionError("the LoRA branch ran although the layer is merged")

    layer._lora_branch = forbidden
    with torch.no_grad():
        layer(x)
    layer.requires_grad_(False)  # a frozen adapter (inference after loading) does no LoRA work either
    layer(x)
    original = layer._unmerged_weight.clone()
    assert not torch.equal(layer.weight, original), "eval() must change the weight"


def test_merge_twice_is_noop():
    layer = randomize_lora_(convlora.Linear.from_module(nn.Linear(6, 6), r=2))
    layer.merge()
    once = layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.weight, once)
    layer.eval()
    assert torch.equal(layer.weight, once)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_100_eval_train_cycles_restore_weights_bit_exactly(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv1d(8, 8, 1), nn.Linear(8, 8)).to(dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    convlora.inject_lora(model, convlora.LoRAConfig(r=4, alpha=7, target_modules=["0", "1", "2"]))
    randomize_lora_(model, seed=3, std=0.5)
    for _ in range(100):
        model.eval()
        assert all(layer.merged for layer in convlora.lora_layers(model).values())
        model.train()
    for key, value in original.items():
        assert torch.equal(model.state_dict()[key], value), f"{key} drifted after 100 merge/unmerge cycles"
        assert model.state_dict()[key].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_merge_math_is_fp32_then_cast(dtype):
    torch.manual_seed(0)
    layer = randomize_lora_(convlora.Linear.from_module(nn.Linear(32, 32).to(dtype), r=4), seed=4)
    expected = (layer.weight.float() + layer.scaling * (layer.lora_B.float() @ layer.lora_A.float())).to(dtype)
    layer.merge()
    assert torch.equal(layer.weight, expected)


def test_non_finite_merge_raises_and_leaves_base_untouched():
    layer = randomize_lora_(convlora.Conv2d.from_module(nn.Conv2d(3, 3, 3), r=2))
    before = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite weights.*left unchanged"):
        layer.merge()
    assert torch.equal(layer.weight, before) and not layer.merged
    # eval() is a mode switch and never raises half-way through a model: the layer runs unmerged.
    layers_module._WARNED.clear()
    with pytest.warns(UserWarning, match="merge-on-eval skipped: merging LoRA into Conv2d gives non-finite"):
        layer.eval()
    assert torch.equal(layer.weight, before) and not layer.merged and not layer.training


def test_lora_params_fp32_on_half_base():
    for dtype in (torch.float16, torch.bfloat16):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 36, 5)).to(dtype)
        convlora.inject_lora(model, convlora.LoRAConfig(r=4, target_modules=["0", "2"]))
        convlora.cast_lora_params(model, torch.float32)
        randomize_lora_(model, seed=5)
        assert model[0].weight.dtype == dtype and model[0].lora_A.dtype == torch.float32
        x = torch.randn(2, 4, 6, 6, dtype=dtype)
        unmerged = model(x)
        assert unmerged.dtype == dtype
        unmerged.float().sum().backward()
        assert model[0].lora_B.grad is not None and model[0].lora_B.grad.dtype == torch.float32
        model.eval()
        merged = model(x)
        # Half-precision outputs: the merged weight is rounded once to the base dtype.
        assert relative_error(merged, unmerged) < (2e-2 if dtype == torch.bfloat16 else 3e-3)


def test_state_dict_while_merged_reports_base_weight():
    torch.manual_seed(0)
    base = nn.Conv2d(4, 4, 3)
    original = base.weight.detach().clone()
    layer = randomize_lora_(convlora.Conv2d.from_module(base, r=2))
    layer.eval()
    assert torch.equal(layer.state_dict()["weight"], original)
    # Loading a state dict into a merged layer keeps it consistent (unmerge, load, re-merge).
    x = torch.randn(1, 4, 6, 6)
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    out_before = layer(x)
    layer.load_state_dict(sd)
    assert layer.merged and torch.allclose(layer(x), out_before)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = randomize_lora_(convlora.Linear.from_module(nn.Linear(64, 64), r=4, dropout=0.5))
    x = torch.randn(4, 64)
    layer.train()
    assert not torch.equal(layer(x), layer(x)), "dropout should make two training forwards differ"
    layer.merge_weights = False
    layer.eval()
    assert torch.equal(layer(x), layer(x))
