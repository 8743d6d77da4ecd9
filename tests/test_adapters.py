"""Several named adapters per LoRA layer: weighted merges, activation, deletion, training one, saving."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D as HFConv1D

import convlora
from convlora import fused
from convlora.testing import randomize_lora_, relative_error

STYLE = convlora.LoRAConfig(r=2, alpha=3, target_modules=["0"])
SUBJECT = convlora.LoRAConfig(r=3, alpha=2, use_rslora=True, target_modules=["0"])

# name -> (base layer, input); every kind of layer convlora adapts, grouped convs included
KINDS = {
    "linear": (lambda: nn.Linear(6, 5), (4, 6)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 7)),
    "conv2d-groups": (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1, stride=2), (2, 4, 7, 6)),
    "conv3d": (lambda: nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1)), (1, 2, 3, 5, 5)),
    "gpt2-conv1d": (lambda: HFConv1D(5, 6), (3, 6)),
}


def two_adapters(kind: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """``Sequential(base)`` with adapters "style" and "subject" (other rank, alpha and rsLoRA), random A and B."""
    make, shape = KINDS[kind]
    torch.manual_seed(seed)
    model = nn.Sequential(make())
    convlora.inject_lora(model, STYLE, adapter_name="style")
    convlora.inject_lora(model, SUBJECT, adapter_name="subject")
    randomize_lora_(model, seed=seed + 1, std=0.3)
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(seed + 2))


def expected_weight(layer: convlora.LoRALayer, base: torch.Tensor, weights: dict[str, float]) -> torch.Tensor:
    """``W + Σ w_i s_i B_i A_i`` in float64, straight from the tensors (not through the layer's code)."""
    total = base.double().clone()
    for name, w in weights.items():
        a = layer.lora_adapters[name]
        s = a.lora_alpha / (a.r ** 0.5 if a.use_rslora else a.r)
        delta = a.lora_B.detach().double().flatten(1) @ a.lora_A.detach().double().flatten(1)  # (out, in/g * prod(k))
        delta = delta.view(a.lora_B.shape[0], *a.lora_A.shape[1:])
        total += w * s * (delta.t() if isinstance(layer, HFConv1D) else delta)
    return total


def functional(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The base layer's own function with another weight (float64)."""
    x, bias = x.double(), layer.bias.detach().double()
    if isinstance(layer, HFConv1D):
        return x @ weight + bias
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    return layer._conv_forward(x, weight, bias)


@pytest.mark.parametrize("kind", KINDS)
def test_two_weighted_adapters_merge_exactly_the_weighted_sum(kind):
    model, x = two_adapters(kind)
    layer = model[0]
    base = layer.weight.detach().clone()
    weights = {"style": 0.7, "subject": 1.0}
    convlora.set_adapters(model, ["style", "subject"], weights=[0.7, 1.0])
    assert convlora.active_adapters(model) == ["style", "subject"]
    with torch.no_grad():
        unmerged = model(x)
        model.eval()
        merged = model(x)
    assert layer.merged
    assert relative_error(merged, unmerged) < 1e-5
    assert relative_error(layer.weight, expected_weight(layer, base, weights)) < 1e-6
    assert relative_error(unmerged, functional(layer, x, expected_weight(layer, base, weights))) < 1e-5
    model.train()
    assert torch.equal(layer.weight, base), "train() must restore the base weight bit-exactly"


@pytest.mark.parametrize("kind", ["linear", "conv2d-groups", "gpt2-conv1d"])
def test_set_adapters_on_a_merged_model_re_merges_from_the_saved_base(kind):
    model, x = two_adapters(kind)
    layer = model[0]
    base = layer.weight.detach().clone()
    model.eval()
    for names, weights in [(["subject"], [1.0]), (["style", "subject"], [0.3, -0.5]), (["style"], [2.0]),
                           (["subject", "style"], [0.7, 1.0])]:
        convlora.set_adapters(model, names, weights)
        assert layer.merged
    # the same final setting made once on a copy that never merged: bit-identical merged weights
    fresh, _ = two_adapters(kind)
    convlora.set_adapters(fresh, ["subject", "style"], [0.7, 1.0])
    fresh.eval()
    assert torch.equal(layer.weight, fresh[0].weight)
    assert relative_error(layer.weight, expected_weight(layer, base, {"subject": 0.7, "style": 1.0})) < 1e-6
    model.train()
    assert torch.equal(layer.weight, base)


def test_one_active_adapter_keeps_the_fused_path_and_several_sum_their_branches(monkeypatch):
    model, x = two_adapters("conv2d-groups")
    calls = []
    original = fused.conv_lora_forward
    monkeypatch.setattr(fused, "conv_lora_forward", lambda *a: calls.append(a[2]) or original(*a))
    convlora.mark_only_lora_as_trainable(model, adapter_name="subject")  # a frozen base weight: fused applies
    convlora.set_adapters(model, "subject")
    one = model(x)
    assert calls == [model[0].lora_adapters["subject"]]
    convlora.set_adapters(model, ["style", "subject"])
    both = model(x)
    assert len(calls) == 1, "several active adapters run their branches unfused"
    convlora.set_adapters(model, "style")
    style = model(x)
    with convlora.disable_lora(model):
        base = model(x)
    assert relative_error(both, one + style - base) < 1e-5


def test_delete_adapter_leaves_the_other_bit_identical_and_the_last_one_leaves_a_base_layer():
    model, x = two_adapters("conv1d")
    layer = model[0]
    subject = {k: v.clone() for k, v in convlora.lora_state_dict(model, adapter_name="subject").items()}
    convlora.set_adapters(model, "subject")
    with torch.no_grad():
        subject_out = model(x)
        with convlora.disable_lora(model):
            base_out = model(x)
    convlora.set_adapters(model, ["style", "subject"], [0.5, 1.0])
    model.eval()
    convlora.delete_adapter(model, "style")
    assert convlora.list_adapters(model) == ["subject"] and convlora.active_adapters(model) == ["subject"]
    assert list(layer.lora_adapters) == ["subject"]
    after = convlora.lora_state_dict(model)
    assert after.keys() == subject.keys() and all(torch.equal(after[k], subject[k]) for k in subject)
    model.train()
    with torch.no_grad():
        assert torch.equal(model(x), subject_out)
    convlora.delete_adapter(model, "subject")
    assert isinstance(layer, convlora.Conv1d) and not hasattr(layer, "lora_A") and len(layer.lora_adapters) == 0
    assert convlora.list_adapters(model) == [] and convlora.get_config(model) is None
    with torch.no_grad():
        assert torch.equal(model(x), base_out)
    convlora.unload(model)
    assert type(model[0]) is nn.Conv1d
    with pytest.raises(ValueError, match="the model has no adapter 'style' \\(it has 'subject'\\)"):
        m, _ = two_adapters("linear")
        convlora.delete_adapter(m, "style")
        convlora.delete_adapter(m, "style")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_training_one_adapter_leaves_the_other_bit_identical(mode):
    model, x = two_adapters("conv2d-groups")
    convlora.set_adapters(model, ["style", "subject"], [0.7, 1.0])
    convlora.mark_only_lora_as_trainable(model, adapter_name="subject")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_adapters.subject.lora_A", "0.lora_adapters.subject.lora_B"}
    style = {k: v.clone() for k, v in convlora.lora_state_dict(model, adapter_name="style").items()}
    subject = {k: v.clone() for k, v in convlora.lora_state_dict(model, adapter_name="subject").items()}
    getattr(model, mode)()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    now = convlora.lora_state_dict(model, adapter_name="style")
    assert all(torch.equal(now[k], style[k]) for k in style)
    moved = convlora.lora_state_dict(model, adapter_name="subject")
    assert all(not torch.equal(moved[k], subject[k]) for k in subject)
    with pytest.raises(ValueError, match="several adapters \\('style', 'subject'\\); name one with adapter_name="):
        convlora.mark_only_lora_as_trainable(model)


def test_save_one_or_all_and_load_back_under_names(tmp_path):
    model, x = two_adapters("conv2d-groups")
    convlora.set_adapters(model, ["style", "subject"], [0.7, 1.0])
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(ValueError, match="several adapters \\('style', 'subject'\\); name one"):
        convlora.save_lora(model, tmp_path / "which.safetensors")
    assert not (tmp_path / "which.safetensors").exists()
    style_file = convlora.save_lora(model, tmp_path / "style_only.safetensors", adapter_name="style")
    tensors, _ = convlora.read_safetensors(style_file)
    assert set(tensors) == {"0.lora_A", "0.lora_B"} and tensors["0.lora_A"].shape[0] == 2  # today's keys
    folder = convlora.save_all_adapters(model, tmp_path / "adapters")
    assert sorted(p.name for p in folder.iterdir()) == ["style.safetensors", "subject.safetensors"]

    fresh = convlora.unload(copy.deepcopy(model))  # the same base, no LoRA
    assert convlora.load_all_adapters(fresh, folder) == ["style", "subject"]
    convlora.set_adapters(fresh, ["style", "subject"], [0.7, 1.0])
    with torch.no_grad():
        assert relative_error(fresh(x), expected) < 1e-6
    other = convlora.unload(copy.deepcopy(model))
    convlora.load_lora(other, tmp_path / "adapters" / "subject.safetensors", adapter_name="b")
    convlora.load_lora(other, style_file, adapter_name="a")
    assert convlora.list_adapters(other) == ["b", "a"] and convlora.active_adapters(other) == ["a"]
    convlora.set_adapters(other, ["a", "b"], [0.7, 1.0])
    with torch.no_grad():
        assert relative_error(other(x), expected) < 1e-6


def _state(model: nn.Module) -> dict:
    layers = convlora.lora_layers(model)
    return {
        "types": {p: type(m) for p, m in model.named_modules()},
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "adapters": {p: (list(l.lora_adapters), l.active_adapters, l.merged, l.weight.detach().clone(),
                         [(a.lora_alpha, a.use_rslora, a.weight) for a in l.lora_adapters.values()])
                     for p, l in layers.items()},
    }


def _assert_same(model: nn.Module, before: dict) -> None:
    now = _state(model)
    assert now["types"] == before["types"]
    assert now["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(now["tensors"][k], v) for k, v in before["tensors"].items())
    for p, (names, active, merged, weight, settings) in before["adapters"].items():
        n_names, n_active, n_merged, n_weight, n_settings = now["adapters"][p]
        assert (n_names, n_active, n_merged, n_settings) == (names, active, merged, settings)
        assert torch.equal(n_weight, weight), "the (merged) weight must be bit-identical"


def test_bad_file_under_a_new_name_leaves_the_model_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["0"]))
    randomize_lora_(model)
    model.eval()  # merged
    donor = copy.deepcopy(model)
    convlora.unload(donor)
    convlora.inject_lora(donor, convlora.LoRAConfig(r=3, target_modules=["0", "2"]))  # "2" is new to the model
    randomize_lora_(donor, seed=4)
    tensors, header = convlora.read_safetensors(convlora.save_lora(donor, tmp_path / "good.safetensors"))
    tensors["2.lora_B"][0, 0] = float("nan")  # found after the new layer on "2" was injected
    # (convlora's own writer refuses non-finite tensors, so the bad files are written with safetensors')
    save_file(tensors, tmp_path / "nan.safetensors", metadata=header)
    misshaped = dict(tensors, **{"2.lora_A": torch.zeros(3, 5)})
    misshaped["2.lora_B"] = torch.zeros(4, 3)
    save_file(misshaped, tmp_path / "misshaped.safetensors", metadata=header)
    before = _state(model)
    with pytest.raises(ValueError, match="non-finite values .*2.lora_B"):
        convlora.load_lora(model, tmp_path / "nan.safetensors", adapter_name="new")
    _assert_same(model, before)
    with pytest.raises(convlora.StateDictMismatchError, match=r"2.lora_A: .* has \(3, 5\), model expects \(3, 6\)"):
        convlora.load_lora(model, tmp_path / "misshaped.safetensors", adapter_name="new")
    _assert_same(model, before)
    assert convlora.list_adapters(model) == ["default"] and type(model[2]) is nn.Linear


def test_set_adapters_bad_calls_are_named_and_change_nothing():
    model, _ = two_adapters("linear")
    convlora.set_adapters(model, ["style", "subject"], [0.7, 1.0])
    model.eval()
    before = _state(model)
    bad = [
        ((["style", "nope"], [1.0, 1.0]), "set_adapters: no adapter\\(s\\) 'nope' in the model \\(it has 'style', 'subject'\\)"),
        ((["style", "subject"], [1.0]), "set_adapters: 1 weight\\(s\\) for 2 adapter\\(s\\)"),
        ((["style"], [float("nan")]), "weight of adapter 'style' must be a finite number, got nan"),
        ((["style"], [float("inf")]), "must be a finite number, got inf"),
        ((["style", "style"], None), "distinct adapter names"),
        (([], None), "distinct adapter names"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            convlora.set_adapters(model, *args)
        _assert_same(model, before)
    with pytest.raises(ValueError, match="single active adapter, and Sequential has 2 active \\('style', 'subject'\\)"):
        convlora.set_lora_scale(model, 0.5)
    _assert_same(model, before)
    with pytest.raises(ValueError, match="several active adapters \\('style', 'subject'\\); name one: layer.adapter"):
        model[0].lora_A
    convlora.set_adapters(model, "subject", 0.25)
    assert convlora.get_lora_scale(model) == 0.25 and model[0].scaling == pytest.approx(0.25 * 2 / 3 ** 0.5)


def test_injecting_names_extends_adds_and_refuses():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["0"]), adapter_name="a")
    paths = convlora.inject_lora(model, convlora.LoRAConfig(r=4, target_modules=["0", "2"]), adapter_name="b")
    assert paths == ["0", "2"] and list(model[0].lora_adapters) == ["a", "b"] and list(model[2].lora_adapters) == ["b"]
    assert convlora.active_adapters(model) == ["b"]
    assert convlora.get_config(model, "a").r == 2 and convlora.get_config(model, "b").r == 4
    with pytest.raises(ValueError, match="these modules already carry LoRA: 0 \\(adapter 'a'\\)"):
        convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["0"]), adapter_name="a")
    with pytest.raises(ValueError, match="adapter\\(s\\) 'c' train biases / modules_to_save"):
        convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["0"], bias="all"), adapter_name="c")
    with pytest.raises(ValueError, match="adapter name must be a non-empty string without"):
        convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["0"]), adapter_name="x.y")
    assert convlora.list_adapters(model) == ["a", "b"]
