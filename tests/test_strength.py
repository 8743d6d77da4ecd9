"""LoRA strength: set_lora_scale / lora_scale on plain layers and a diffusers UNet."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convlora
from convlora.state import delta_weight
from convlora.testing import randomize_lora_


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2, padding=1), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 5))
    convlora.inject_lora(model, convlora.LoRAConfig(r=4, alpha=8, target_modules=["0", "2", "4"]))
    return randomize_lora_(model, seed=1)


def _base_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with convlora.disable_lora(model), torch.no_grad():
        return model(x)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_scale_zero_gives_exactly_the_base_output(mode):
    model = _model()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    getattr(model, mode)()
    base = _base_out(model, x)
    with convlora.lora_scale(model, 0.0), torch.no_grad():
        assert torch.equal(model(x), base)
    with torch.no_grad():
        assert not torch.equal(model(x), base)  # back at strength 1


def test_merge_on_eval_merges_exactly_s_times_delta_w_and_train_restores_the_base_bit_exactly():
    model = _model()
    layers = convlora.lora_layers(model)
    base = {p: layer.weight.detach().clone() for p, layer in layers.items()}
    convlora.set_lora_scale(model, 0.6)
    assert convlora.get_lora_scale(model) == pytest.approx(0.6, abs=1e-12)
    model.eval()
    for p, layer in layers.items():
        expected = layer._delta_to_weight_layout(delta_weight(layer.lora_A, layer.lora_B, 0.6 * layer.lora_alpha / layer.r))
        assert torch.equal(layer.weight, (base[p].float() + expected).to(base[p].dtype)), p
    convlora.set_lora_scale(model, 0.25)  # re-merged at the new strength while in eval
    for p, layer in layers.items():
        expected = layer._delta_to_weight_layout(delta_weight(layer.lora_A, layer.lora_B, 0.25 * layer.lora_alpha / layer.r))
        assert layer.merged and torch.equal(layer.weight, (base[p].float() + expected).to(base[p].dtype)), p
    model.train()
    assert all(torch.equal(layer.weight, base[p]) for p, layer in layers.items())


def test_scaled_forward_matches_the_formula_unmerged_and_merged():
    model = _model()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    conv = model[0]
    with torch.no_grad():
        base = nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
        lora = nn.functional.conv2d(nn.functional.conv2d(x, conv.lora_A, padding=1), conv.lora_B) * (8 / 4)
        convlora.set_lora_scale(model, 0.3)
        assert torch.allclose(conv(x), base + 0.3 * lora, rtol=0, atol=1e-6)
        conv.eval()
        assert torch.allclose(conv(x), base + 0.3 * lora, rtol=0, atol=1e-5)


def test_context_manager_restores_the_exact_previous_scaling_and_merge_state():
    model = _model()
    convlora.set_lora_scale(model, 0.7)
    model.eval()
    before = {p: (layer.scaling, layer.weight.detach().clone()) for p, layer in convlora.lora_layers(model).items()}
    with convlora.lora_scale(model, 1.5):
        pass
    for p, layer in convlora.lora_layers(model).items():
        assert layer.merged and layer.scaling == before[p][0] and torch.equal(layer.weight, before[p][1])


def test_saved_file_does_not_depend_on_the_strength(tmp_path):
    model = _model()
    convlora.save_lora(model, tmp_path / "a.safetensors")
    convlora.set_lora_scale(model, 0.2)
    model.eval()
    convlora.save_lora(model, tmp_path / "b.safetensors")
    ta, ha = convlora.read_safetensors(tmp_path / "a.safetensors")
    tb, hb = convlora.read_safetensors(tmp_path / "b.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert ha == hb
    fresh = _model(seed=5)
    convlora.load_lora(fresh, tmp_path / "b.safetensors")
    assert convlora.get_lora_scale(fresh) == 1.0  # a loaded adapter starts at strength 1


def test_bad_scales_and_models_without_lora_are_errors_that_change_nothing():
    model = _model()
    with pytest.raises(ValueError, match="finite number, got nan"):
        convlora.set_lora_scale(model, float("nan"))
    assert convlora.get_lora_scale(model) == 1.0
    with pytest.raises(ValueError, match="Linear has no LoRA layers"):
        convlora.set_lora_scale(nn.Linear(2, 2), 0.5)
    model[0].scaling *= 0.5
    with pytest.raises(ValueError, match="different strengths"):
        convlora.get_lora_scale(model)


def test_unet_at_scale_zero_is_the_base_unet():
    from convlora.diffusion import unet_lora_config
    from convlora.diffusion.tiny import build_tiny_pipeline

    unet = build_tiny_pipeline(seed=0).unet
    convlora.inject_lora(unet, unet_lora_config("full", rank=4))
    randomize_lora_(unet, seed=0, std=0.05)
    unet.eval()
    gen = torch.Generator().manual_seed(0)
    sample, states = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        with convlora.disable_lora(unet):
            base = unet(sample, 10, states).sample
        with convlora.lora_scale(unet, 0.0):
            assert torch.equal(unet(sample, 10, states).sample, base)
        assert not torch.allclose(unet(sample, 10, states).sample, base)
