"""Same A and B, same numbers as PEFT: outputs and gradients (input, A, B) within 1e-5 relative.

This is what makes the benchmark's convlora-vs-PEFT timings a comparison of equal work. Each case
runs convlora through every path it has (the straightforward formula and both fused formulations).
Only geometries PEFT computes correctly are compared: PEFT builds its A conv from kernel size, stride
and padding only, so it ignores ``dilation`` (its branch then has the wrong shape) and
``padding_mode`` (its branch pads with zeros), and it cannot merge ``groups > 1``.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import convlora
from convlora import fused
from convlora.testing import randomize_lora_, relative_error

peft = pytest.importorskip("peft")
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

TOL = 1e-5
R, ALPHA = 4, 8.0
PATHS = ["plain", "fold", "branch"]


@contextlib.contextmanager
def convlora_path(path: str):
    """``plain``: the layers' own formula through autograd; ``fold`` / ``branch``: that fused formulation."""
    old_enabled, old_rule = fused.ENABLED, fused.use_fold
    fused.ENABLED = path != "plain"
    if path != "plain":
        fused.use_fold = lambda *args, **kwargs: path == "fold"
    try:
        yield
    finally:
        fused.ENABLED, fused.use_fold = old_enabled, old_rule


def adapt_both(base: nn.Module, targets) -> tuple[nn.Module, nn.Module]:
    """(convlora model, PEFT model) on copies of ``base``: same modules, same random A and B."""
    ours = copy.deepcopy(base)
    convlora.inject_lora(ours, convlora.LoRAConfig(r=R, alpha=ALPHA, target_modules=targets))
    convlora.mark_only_lora_as_trainable(ours)
    randomize_lora_(ours, seed=1, std=0.2)
    theirs = inject_adapter_in_model(LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets), copy.deepcopy(base))
    modules = dict(theirs.named_modules())
    layers = convlora.lora_layers(ours)
    assert {n for n, m in modules.items() if isinstance(m, LoraLayer)} == set(layers)
    with torch.no_grad():
        for path, layer in layers.items():
            modules[path].lora_A["default"].weight.copy_(layer.lora_A)
            modules[path].lora_B["default"].weight.copy_(layer.lora_B)
    for name, param in theirs.named_parameters():
        param.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return ours.train(), theirs.train()


def step(model: nn.Module, inputs: tuple, call=None) -> dict[str, torch.Tensor]:
    """Output, input gradient and every LoRA gradient (keyed ``<module path>.lora_A`` / ``.lora_B``)."""
    model.zero_grad(set_to_none=True)
    x = inputs[0].clone().requires_grad_(True)
    out = (call or (lambda m, a: m(*a)))(model, (x, *inputs[1:]))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weights).sum().backward()
    result = {"out": out.detach(), "x.grad": x.grad}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = name.replace(".lora_A.default.weight", ".lora_A").replace(".lora_B.default.weight", ".lora_B")
            key = key.replace(".lora_adapters.default.", ".")  # ours: <path>.lora_adapters.<name>.lora_A
            result[key] = param.grad
    return result


def assert_parity(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key in theirs:
        err = relative_error(ours[key], theirs[key])
        assert err <= TOL, f"{key}: relative error {err:.2e} vs PEFT"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(6, 16), (2, 5, 16)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_peft(shape, bias, path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12, bias=bias))
    ours, theirs = adapt_both(base, ["0"])
    x = torch.randn(shape)
    with convlora_path(path):
        got = step(ours, (x,))
    assert_parity(got, step(theirs, (x,)))


CONV_CASES = {
    "conv2d-3x3": (nn.Conv2d, (4, 6, 3), {"padding": 1}, (2, 4, 9, 8)),
    "conv2d-unpadded": (nn.Conv2d, (4, 6, 3), {}, (2, 4, 9, 8)),
    "conv2d-stride-2": (nn.Conv2d, (4, 6, 3), {"stride": 2, "padding": 1}, (2, 4, 9, 8)),
    "conv2d-rect-kernel": (nn.Conv2d, (4, 6, (3, 1)), {"padding": (1, 0)}, (2, 4, 9, 8)),
    "conv2d-same": (nn.Conv2d, (4, 6, 3), {"padding": "same"}, (2, 4, 9, 8)),
    "conv2d-same-even-kernel": (nn.Conv2d, (4, 6, 4), {"padding": "same"}, (2, 4, 9, 8)),
    "conv2d-no-bias": (nn.Conv2d, (4, 6, 3), {"padding": 1, "bias": False}, (2, 4, 9, 8)),
    "conv2d-1x1": (nn.Conv2d, (4, 6, 1), {}, (2, 4, 9, 8)),
    "conv2d-1x1-stride-2": (nn.Conv2d, (4, 6, 1), {"stride": 2}, (2, 4, 9, 8)),
    "conv1d-5": (nn.Conv1d, (4, 6, 5), {"padding": 2, "stride": 2}, (2, 4, 17)),
    "conv3d-3": (nn.Conv3d, (3, 5, 3), {"padding": 1}, (2, 3, 5, 6, 4)),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_matches_peft(case, path):
    torch.manual_seed(0)
    cls, args, kwargs, x_shape = CONV_CASES[case]
    base = nn.Sequential(cls(*args, **kwargs))
    ours, theirs = adapt_both(base, ["0"])
    x = torch.randn(x_shape)
    with convlora_path(path):
        got = step(ours, (x,))
    assert_parity(got, step(theirs, (x,)))


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]


def _tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2,
    )


def _unet_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 8, 8, generator=g).to(dtype), torch.tensor([3, 700]),
            torch.randn(2, 5, 8, generator=g).to(dtype))


def _unet_call(model, args):
    return model(*args).sample


@pytest.mark.parametrize("path", PATHS + ["auto"])
def test_tiny_unet_matches_peft_float64(path):
    """Every LoRA gradient of a whole tiny UNet (attention, feed-forward, 1x1 and 3x3 convs, time
    embedding, up/down samplers): in float64 the two libraries compute the same numbers (1e-10)."""
    ours, theirs = adapt_both(_tiny_unet().double(), UNET_TARGETS)
    inputs = _unet_inputs(torch.float64)
    with convlora_path(path) if path != "auto" else contextlib.nullcontext():  # auto: the per-layer rule
        got = step(ours, inputs, _unet_call)
    expected = step(theirs, inputs, _unet_call)
    assert len(expected) == 2 + 2 * len(convlora.lora_layers(ours))  # out, x.grad, then A and B per layer
    for key in expected:
        assert relative_error(got[key], expected[key]) <= 1e-10, key


def test_tiny_unet_float32_as_accurate_as_peft():
    """In float32 a deep network's gradients carry ~1e-5 relative rounding noise in *either* library
    (measured against float64: PEFT and convlora both ~5e-6 at worst on this UNet), so the two agree
    within 2e-5 of each other and each stays within 1.5e-5 of the float64 result."""
    unet = _tiny_unet()
    ours, theirs = adapt_both(unet, UNET_TARGETS)
    got = step(ours, _unet_inputs(torch.float32), _unet_call)
    expected = step(theirs, _unet_inputs(torch.float32), _unet_call)
    truth = step(copy.deepcopy(theirs).double(), _unet_inputs(torch.float64), _unet_call)
    for key in expected:
        assert relative_error(got[key], expected[key]) <= 2e-5, key
        assert relative_error(got[key], truth[key]) <= 1.5e-5, key
        assert relative_error(expected[key], truth[key]) <= 1.5e-5, key
