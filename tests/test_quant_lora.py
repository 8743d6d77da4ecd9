"""LoRA on a quantized frozen base (QLoRA): outputs, gradients, merge rules, files, a UNet training loop."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convlora
from convlora import LoRAConfig, QuantizationError, inject_lora, mark_only_lora_as_trainable, quantize_base
from convlora.quant import QUANT_MODES, is_quantized
from convlora.testing import randomize_lora_, relative_error

KINDS = {
    "linear": (lambda: nn.Sequential(nn.Linear(24, 16)), lambda: torch.randn(3, 24)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(8, 12, 3, groups=4, padding=1)), lambda: torch.randn(2, 8, 9)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(6, 8, 3, padding=1)), lambda: torch.randn(2, 6, 7, 7)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(4, 6, (1, 3, 3), padding=(0, 1, 1))), lambda: torch.randn(2, 4, 3, 5, 5)),
}


def _lora(model: nn.Module, r: int = 4) -> nn.Module:
    inject_lora(model, LoRAConfig(r=r, alpha=8, target_modules=["0"]))
    mark_only_lora_as_trainable(model)
    randomize_lora_(model, seed=1)
    return model


def _reference(quantized: nn.Module) -> nn.Module:
    """The same LoRA on a plain base whose weight is the quantized one, dequantized."""
    reference = copy.deepcopy(quantized)
    convlora.dequantize_base(reference)
    return reference


@pytest.mark.parametrize("mode", QUANT_MODES)
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("order", ["quantize-then-inject", "inject-then-quantize"])
def test_lora_on_a_quantized_base_gives_the_outputs_and_grads_of_its_dequantized_base(mode, kind, order):
    torch.manual_seed(0)
    build, make_input = KINDS[kind]
    model = build().requires_grad_(False)
    if order == "quantize-then-inject":
        quantize_base(model, mode)
        _lora(model)
    else:
        _lora(model)
        quantize_base(model, mode)
    assert is_quantized(model[0]) and isinstance(model[0], convlora.LoRALayer)
    reference = _reference(model)
    x = make_input()
    out, ref = model(x), reference(x)
    assert relative_error(out, ref) < 1e-6
    out.square().sum().backward()
    ref.square().sum().backward()
    ref_params = dict(reference.named_parameters())
    assert set(ref_params) - set(dict(model.named_parameters())) == {"0.weight"}  # the frozen weight is no parameter
    for name, p in model.named_parameters():
        assert p.requires_grad == ref_params[name].requires_grad == ("lora_" in name)
        if p.requires_grad:
            assert relative_error(p.grad, ref_params[name].grad) < 1e-5, name


def test_eval_runs_unmerged_with_one_warning_and_the_same_outputs():
    torch.manual_seed(0)
    model = _lora(quantize_base_and_return(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1)).requires_grad_(False), "nf4"))
    x = torch.randn(1, 4, 5, 5)
    train_out = model(x)
    convlora.layers._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.eval()
    assert [str(w.message) for w in caught] == [
        "convlora: merge-on-eval skipped because weights are quantized (nf4); LoRA layers run unmerged "
        "(same outputs, slightly slower)."
    ]
    assert not model[0].merged and torch.equal(model(x), train_out)


def quantize_base_and_return(model: nn.Module, mode: str) -> nn.Module:
    quantize_base(model, mode)
    return model


def test_merge_and_unload_refuses_a_quantized_base_unless_asked_to_dequantize():
    torch.manual_seed(0)
    model = _lora(quantize_base_and_return(nn.Sequential(nn.Linear(8, 8)).requires_grad_(False), "int8"))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(QuantizationError, match=r"cannot merge LoRA into a quantized base \(1 layers, e.g. 0\)"):
        convlora.merge_and_unload(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and is_quantized(model[0])
    x = torch.randn(2, 8)
    expected = model(x)
    merged = convlora.merge_and_unload(model, dequantize=True)
    assert type(merged[0]) is nn.Linear and not is_quantized(merged[0])
    assert relative_error(merged(x), expected) < 1e-5


def test_unload_keeps_the_quantized_plain_layer():
    torch.manual_seed(0)
    model = quantize_base_and_return(nn.Sequential(nn.Conv2d(3, 5, 3)).requires_grad_(False), "fp8")
    x = torch.randn(1, 3, 6, 6)
    base_out = model(x)
    _lora(model)
    convlora.unload(model)
    assert type(model[0]) is nn.Conv2d and is_quantized(model[0]) and torch.equal(model(x), base_out)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_saved_files_are_those_of_the_unquantized_model(mode, tmp_path):
    torch.manual_seed(0)
    plain = _lora(nn.Sequential(nn.Conv2d(4, 6, 3)).requires_grad_(False))
    quantized = copy.deepcopy(plain)
    quantize_base(quantized, mode)
    convlora.save_lora(plain, tmp_path / "plain.safetensors")
    convlora.save_lora(quantized, tmp_path / "quantized.safetensors")
    (plain_tensors, plain_header), (tensors, header) = (convlora.read_safetensors(tmp_path / f"{n}.safetensors") for n in ("plain", "quantized"))
    assert header == plain_header and tensors.keys() == plain_tensors.keys()  # (safetensors orders its header at random)
    assert all(torch.equal(t, plain_tensors[k]) and t.dtype == plain_tensors[k].dtype for k, t in tensors.items())
    fresh = quantize_base_and_return(copy.deepcopy(plain).requires_grad_(False), mode)
    convlora.unload(fresh)
    convlora.load_lora(fresh, tmp_path / "quantized.safetensors")
    x = torch.randn(1, 4, 5, 5)
    assert torch.equal(fresh(x), quantized(x))


def test_two_weighted_adapters_on_a_quantized_base():
    torch.manual_seed(0)
    model = quantize_base_and_return(nn.Sequential(nn.Linear(8, 8)).requires_grad_(False), "nf4")
    inject_lora(model, LoRAConfig(r=2, target_modules=["0"]), adapter_name="style")
    inject_lora(model, LoRAConfig(r=3, target_modules=["0"]), adapter_name="subject")
    randomize_lora_(model, seed=2)
    convlora.set_adapters(model, ["style", "subject"], weights=[0.7, 1.0])
    x = torch.randn(2, 8)
    layer = model[0]
    weight = layer.quantized_weight.dequantize()
    expected = F.linear(x, weight + layer.delta_weight(), layer.bias)
    assert relative_error(model(x), expected) < 1e-5


def test_a_quantized_tiny_unet_trains_and_its_base_stays_bit_identical():
    from diffusers import UNet2DConditionModel

    from convlora.diffusion import unet_lora_config
    from convlora.diffusion.tiny import tiny_unet_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config()).requires_grad_(False)
    quantize_base(unet, "nf4")
    inject_lora(unet, unet_lora_config("full", rank=4))
    mark_only_lora_as_trainable(unet)
    stored = {k: v.clone() for k, v in unet.state_dict().items() if ".quantized_weight." in k}
    assert len({k.rsplit(".quantized_weight.", 1)[0] for k in stored}) == sum(is_quantized(m) for m in unet.modules())
    params = [p for p in unet.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    sample, text, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    losses = []
    for _ in range(4):
        loss = F.mse_loss(unet(sample, torch.tensor([10, 500]), text).sample, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(not torch.equal(p, s) for p, s in zip(params, start))  # every A and B moved
    current = unet.state_dict()
    assert all(torch.equal(current[k], v) for k, v in stored.items())
