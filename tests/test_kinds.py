"""LoHa, LoKr and DoRA adapters: each kind's update against its formula written out here, exact merges,
bit-exact unmerges, strength, gradients, and LyCORIS's own modules on the same tensors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D as HFConv1D

import convlora
from convlora.kinds import AdapterKind, factorization, lokr_shapes

KINDS = {
    "loha": dict(kind="loha"),
    "lokr": dict(kind="lokr"),
    "lokr-both": dict(kind="lokr", decompose_both=True),
    "lokr-factor4": dict(kind="lokr", factor=4),
    "dora": dict(kind="dora"),
    "loha-dora": dict(kind="loha", weight_decompose=True),
    "lokr-dora": dict(kind="lokr", weight_decompose=True),
}

# name -> (base layer, input); ranks below are small enough that LoKr factorises W2.
LAYERS = {
    "linear": (lambda: nn.Linear(24, 32), (3, 24)),
    "conv1d": (lambda: nn.Conv1d(8, 12, 3, padding=1), (2, 8, 10)),
    "conv2d": (lambda: nn.Conv2d(16, 24, 3, padding=1, stride=2), (2, 16, 9, 9)),
    "conv2d-grouped": (lambda: nn.Conv2d(16, 24, 3, padding=1, groups=4), (2, 16, 7, 7)),
    "conv2d-depthwise": (lambda: nn.Conv2d(16, 16, 3, padding=1, groups=16), (2, 16, 7, 7)),
    "conv2d-1x1": (lambda: nn.Conv2d(32, 48, 1), (2, 32, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(4, 8, 3, padding=1), (1, 4, 5, 5, 5)),
    "gpt2-conv1d": (lambda: HFConv1D(32, 24), (3, 24)),  # nf=32 out, nx=24 in
}

REL = 1e-5  # merged vs unmerged vs the formula, relative to the output's largest value


def _adapted(layer_name: str, kind_name: str, r: int = 4, alpha: float = 3.0, seed: int = 0):
    """(base copy, model with the adapter injected and randomised, input)."""
    torch.manual_seed(seed)
    make, x_shape = LAYERS[layer_name]
    base = make()
    model = nn.Sequential(copy.deepcopy(base))
    convlora.inject_lora(model, convlora.LoRAConfig(r=r, alpha=alpha, target_modules=["0"], **KINDS[kind_name]))
    adapter = model[0].adapter()
    with torch.no_grad():
        for tensor in adapter.factors():
            if tensor is adapter.magnitude:
                tensor.mul_(1 + 0.2 * torch.rand_like(tensor))
            else:
                tensor.copy_(torch.randn_like(tensor) * 0.3)
    return base, model, torch.randn(x_shape)


def _delta_layout(base: nn.Module) -> torch.Tensor:
    return base.weight.detach().t() if isinstance(base, HFConv1D) else base.weight.detach()


def _expected_update(adapter, base_weight: torch.Tensor, detach_norm: bool = True) -> torch.Tensor:
    """The kind's update ``D`` from its tensors, written out independently of convlora.kinds."""
    out_shape = base_weight.shape
    kind = adapter.kind.name
    if kind == "lora":
        delta = adapter.lora_B.flatten(1) @ adapter.lora_A.flatten(1)
        delta = delta.view(out_shape) * adapter.lora_alpha / adapter.r
    elif kind == "loha":
        w1 = adapter.hada_w1_a @ adapter.hada_w1_b
        w2 = adapter.hada_w2_a @ adapter.hada_w2_b
        delta = (w1 * w2).view(out_shape) * adapter.lora_alpha / adapter.r
    else:
        names = adapter.factor_names
        w1 = adapter.lokr_w1 if "lokr_w1" in names else adapter.lokr_w1_a @ adapter.lokr_w1_b
        a, c = w1.shape
        b, d = out_shape[0] // a, out_shape[1] // c
        w2 = adapter.lokr_w2 if "lokr_w2" in names else (adapter.lokr_w2_a @ adapter.lokr_w2_b).view(b, d, *out_shape[2:])
        kron = torch.einsum("ac,bd...->abcd...", w1, w2).reshape(out_shape)  # [i*b+j, l*d+n] = W1[i,l] W2[j,n]
        factorised = "lokr_w2_a" in names or "lokr_w1_a" in names
        delta = kron * (adapter.lora_alpha / adapter.r if factorised else 1.0)
    if adapter.magnitude is None:
        return delta
    adapted = base_weight + delta
    norm = adapted.flatten(1).norm(dim=1)
    norm = norm.detach() if detach_norm else norm
    return adapter.magnitude.view(-1, *(1,) * (adapted.dim() - 1)) / norm.view(-1, *(1,) * (adapted.dim() - 1)) * adapted - base_weight


def _run(base: nn.Module, weight_delta_layout: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``base``'s operation with another weight (given in the delta layout)."""
    if isinstance(base, HFConv1D):
        return x @ weight_delta_layout.t() + base.bias
    if isinstance(base, nn.Linear):
        return F.linear(x, weight_delta_layout, base.bias)
    return base._conv_forward(x, weight_delta_layout, base.bias)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("layer_name", LAYERS)
@pytest.mark.parametrize("kind_name", KINDS)
def test_a_fresh_adapter_of_every_kind_leaves_the_output_exactly_unchanged(kind_name, layer_name):
    torch.manual_seed(1)
    make, x_shape = LAYERS[layer_name]
    base = make()
    model = nn.Sequential(copy.deepcopy(base))
    convlora.inject_lora(model, convlora.LoRAConfig(r=4, target_modules=["0"], **KINDS[kind_name]))
    x = torch.randn(x_shape)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
        model.eval()
        assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("layer_name", LAYERS)
@pytest.mark.parametrize("kind_name", KINDS)
def test_unmerged_merged_and_unloaded_outputs_are_the_kinds_formula_and_train_restores_bit_exactly(kind_name, layer_name):
    base, model, x = _adapted(layer_name, kind_name)
    layer = model[0]
    original = layer.weight.detach().clone()
    with torch.no_grad():
        expected = _run(base, _delta_layout(base) + _expected_update(layer.adapter(), _delta_layout(base)), x)
        unmerged = model(x)
        assert _rel(unmerged, expected) < REL
        model.eval()
        assert layer.merged
        assert _rel(model(x), expected) < REL
        model.train()
        assert not layer.merged and torch.equal(layer.weight, original)
        plain = convlora.merge_and_unload(copy.deepcopy(model))
        assert type(plain[0]) is type(base)
        assert _rel(plain[0](x), expected) < REL


@pytest.mark.parametrize("kind_name", KINDS)
def test_strength_zero_is_exactly_the_base_and_strength_is_linear_in_the_update(kind_name):
    base, model, x = _adapted("conv2d", kind_name)
    layer = model[0]
    update = _expected_update(layer.adapter(), _delta_layout(base)).detach()
    with torch.no_grad():
        convlora.set_lora_scale(model, 0.0)
        assert torch.equal(model(x), base(x))
        model.eval()
        assert torch.equal(layer.weight, base.weight)
        model.train()
        convlora.set_lora_scale(model, 0.5)
        assert _rel(model(x), _run(base, base.weight + 0.5 * update, x)) < REL
        model.eval()
        assert (layer.weight - (base.weight + 0.5 * update)).abs().max().item() < 1e-6


@pytest.mark.parametrize("layer_name", ["linear", "conv2d-grouped", "gpt2-conv1d"])
@pytest.mark.parametrize("kind_name", KINDS)
def test_every_factor_gets_the_gradient_of_the_formula_in_train_and_in_eval_mode(kind_name, layer_name):
    base, model, x = _adapted(layer_name, kind_name)
    layer = model[0]
    convlora.mark_only_lora_as_trainable(model)
    adapter = layer.adapter()
    target = torch.randn_like(base(x))

    def grads(run):
        for t in adapter.factors():
            t.grad = None
        (run() * target).sum().backward()
        return [t.grad.clone() for t in adapter.factors()]

    ours_train = grads(lambda: model(x))
    model.eval()  # merged: the zero-valued branch must carry the same gradients
    ours_eval = grads(lambda: model(x))
    model.train()
    reference = grads(lambda: _run(base, _delta_layout(base) + _expected_update(adapter, _delta_layout(base)), x))
    for name, a, b, ref in zip(adapter.param_names, ours_train, ours_eval, reference):
        scale = ref.abs().max().item()
        assert scale > 0, f"{name} has no gradient"
        assert (a - ref).abs().max().item() <= 1e-4 * scale, name
        assert (b - ref).abs().max().item() <= 1e-4 * scale, name


def test_adapters_of_different_kinds_add_their_updates():
    base, model, x = _adapted("conv2d", "loha")
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, alpha=1.0, target_modules=["0"], kind="dora"), adapter_name="d")
    layer = model[0]
    with torch.no_grad():
        layer.adapter("d").lora_B.normal_()
        layer.set_active_adapters(["default", "d"], weights={"default": 0.7, "d": -0.4})
        w = _delta_layout(base)
        total = 0.7 * _expected_update(layer.adapter("default"), w) - 0.4 * _expected_update(layer.adapter("d"), w)
        expected = _run(base, w + total, x)
        assert _rel(model(x), expected) < REL
        model.eval()
        assert layer.merged and _rel(model(x), expected) < REL


def _lycoris_module(kind_name: str, base: nn.Module, adapter):
    """LyCORIS's module for ``base`` built from our adapter's tensors, as LyCORIS loads a file."""
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    get = {n: getattr(adapter, n).detach() for n in adapter.factor_names}.get
    alpha = torch.tensor(adapter.lora_alpha)
    dora = None if adapter.magnitude is None else adapter.magnitude.detach().view(-1, *(1,) * (base.weight.dim() - 1))
    with torch.no_grad():
        if adapter.kind.name == "lora":
            return LoConModule.make_module_from_state_dict("m", base, get("lora_B"), get("lora_A"), None, alpha, dora)
        if adapter.kind.name == "loha":
            return LohaModule.make_module_from_state_dict(
                "m", base, get("hada_w1_a"), get("hada_w1_b"), get("hada_w2_a"), get("hada_w2_b"), None, None, alpha, dora)
        return LokrModule.make_module_from_state_dict(
            "m", base, get("lokr_w1"), get("lokr_w1_a"), get("lokr_w1_b"), get("lokr_w2"), get("lokr_w2_a"),
            get("lokr_w2_b"), None, None, alpha, dora)


@pytest.mark.parametrize("layer_name", ["linear", "conv1d", "conv2d", "conv2d-grouped", "conv3d"])
@pytest.mark.parametrize("kind_name", KINDS)
def test_lycoris_modules_on_the_same_tensors_give_the_same_outputs(kind_name, layer_name):
    base, model, x = _adapted(layer_name, kind_name)
    with torch.no_grad():
        ours, plain = model(x), base(x)
    theirs = _lycoris_module(kind_name, base, model[0].adapter())
    theirs.apply_to()  # from here base(x) runs LyCORIS's forward
    theirs.eval()
    with torch.no_grad():
        assert _rel(ours, plain) > 1e-3  # the adapter changes the output ...
        assert _rel(ours, base(x)) < REL  # ... and LyCORIS computes the same


def test_factorization_is_lycoris_rule():
    from lycoris.functional.general import factorization as theirs

    for dim in range(1, 1300):
        for factor in (-1, 1, 2, 3, 4, 8, 16, 64):
            assert factorization(dim, factor) == theirs(dim, factor), (dim, factor)


@pytest.mark.parametrize("shape", [(64, 64), (320, 768), (1280, 1280, 3, 3), (24, 16, 3, 3), (16, 1, 3, 3), (96, 127)])
@pytest.mark.parametrize("r", [1, 4, 16, 64])
@pytest.mark.parametrize("options", [dict(), dict(decompose_both=True), dict(factor=8), dict(factor=4, decompose_both=True)])
def test_lokr_shapes_are_the_ones_lycoris_builds(shape, r, options):
    from lycoris.modules.lokr import LokrModule

    base = nn.Linear(shape[1], shape[0]) if len(shape) == 2 else nn.Conv2d(shape[1], shape[0], shape[2:], padding=1)
    theirs = LokrModule("m", base, lora_dim=r, alpha=r, **options)
    expected = {n: tuple(p.shape) for n, p in theirs.named_parameters() if n.startswith("lokr_")}
    assert lokr_shapes(shape, r, options.get("factor", -1), options.get("decompose_both", False)) == expected


def test_kind_options_are_checked_by_name():
    with pytest.raises(ValueError, match=r"LoRAConfig.kind must be one of \('lora', 'dora', 'loha', 'lokr'\), got 'lokra'"):
        convlora.LoRAConfig(target_modules=["x"], kind="lokra")
    with pytest.raises(ValueError, match="factor and decompose_both are LoKr options; this adapter is loha"):
        convlora.LoRAConfig(target_modules=["x"], kind="loha", factor=4)
    with pytest.raises(ValueError, match="factor must be -1 or an integer >= 1, got 0"):
        convlora.LoRAConfig(target_modules=["x"], kind="lokr", factor=0)
    with pytest.raises(ValueError, match="init='gaussian' is LoRA's; loha uses LyCORIS's initialisation"):
        convlora.LoRAConfig(target_modules=["x"], kind="loha", init="gaussian")
    with pytest.raises(ValueError, match="weight_decompose is for loha / lokr; for LoRA with DoRA use kind='dora'"):
        convlora.LoRAConfig(target_modules=["x"], kind="lora", weight_decompose=True)


def test_plain_lora_configs_serialise_as_before_and_kinds_round_trip():
    plain = convlora.LoRAConfig(target_modules=["x"]).to_dict()
    assert not {"kind", "factor", "decompose_both", "weight_decompose"} & set(plain)
    lokr = convlora.LoRAConfig(target_modules=["x"], kind="lokr", factor=8, decompose_both=True)
    assert lokr.to_dict()["kind"] == "lokr" and convlora.LoRAConfig.from_json(lokr.to_json()) == lokr
    assert lokr.adapter_kind() == AdapterKind("lokr", factor=8, decompose_both=True)
    assert convlora.LoRAConfig(target_modules=["x"], kind="dora").adapter_kind() == AdapterKind("lora", use_dora=True)


def test_lokr_without_a_factorised_side_has_scale_one_whatever_alpha_says():
    _, model, x = _adapted("linear", "lokr", r=64, alpha=3.0)  # r >= max(b, d) / 2: W2 kept whole
    adapter = model[0].adapter()
    assert adapter.factor_names == ("lokr_w1", "lokr_w2") and adapter.trained_scaling == 1.0
    assert math.isclose(_adapted("linear", "lokr", r=2, alpha=3.0)[1][0].adapter().trained_scaling, 1.5)


def _mixed_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.Conv2d(24, 24, 3, padding=1, groups=4),
                         nn.Flatten(), nn.Linear(24 * 25, 32))


@pytest.mark.parametrize("kind_name", KINDS)
def test_native_files_of_every_kind_load_into_a_fresh_base_with_bit_equal_tensors_and_outputs(kind_name, tmp_path):
    model = _mixed_model()
    convlora.inject_lora(model, convlora.LoRAConfig(r=4, alpha=2.0, target_modules=["0", "1", "3"], **KINDS[kind_name]))
    with torch.no_grad():
        for t in convlora.lora_state_dict(model).values():
            t.add_(torch.randn_like(t) * 0.1)
    path = convlora.save_lora(model, tmp_path / "a.safetensors")
    fresh = _mixed_model()
    assert convlora.load_lora(fresh, path) == ["0", "1", "3"]
    theirs, ours = convlora.lora_state_dict(fresh), convlora.lora_state_dict(model)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert {layer.adapter().kind.label for layer in convlora.lora_layers(fresh).values()} == {
        convlora.LoRAConfig(target_modules=["x"], **KINDS[kind_name]).adapter_kind().label}


def test_a_lokr_file_whose_factors_do_not_fit_the_base_is_refused_and_nothing_changes(tmp_path):
    model = _mixed_model()
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["0"], kind="lokr"))
    path = convlora.save_lora(model, tmp_path / "a.safetensors")
    other = nn.Sequential(nn.Conv2d(16, 20, 3, padding=1))  # 20 output channels: W1 (4, 4) does not divide them
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"0: base weight is \(20, 16, 3, 3\), file was made for \(24, 16, 3, 3\)"):
        convlora.load_lora(other, path)
    tensors, header = convlora.read_safetensors(path)
    tensors["0.lokr_w1"] = torch.zeros(5, 4)
    bad = convlora.write_safetensors(tensors, tmp_path / "bad.safetensors", header)
    with pytest.raises(convlora.StateDictMismatchError, match=r"0: LoKr W1 \(5, 4\) does not divide the weight's \(out, in\) = \(24, 16\)"):
        convlora.load_lora(_mixed_model(), bad)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    assert not convlora.lora_layers(other)


def test_a_native_header_with_an_unknown_kind_is_a_named_file_error(tmp_path):
    model = _mixed_model()
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["0"], kind="loha"))
    path = convlora.save_lora(model, tmp_path / "a.safetensors")
    tensors, header = convlora.read_safetensors(path)
    header["convlora_modules"] = header["convlora_modules"].replace('"loha"', '"lokra"')
    bad = convlora.write_safetensors(tensors, tmp_path / "bad.safetensors", header)
    with pytest.raises(convlora.LoRAFileError, match=r"convlora_modules\['0'\].kind: unknown adapter kind 'lokra'"):
        convlora.load_lora(_mixed_model(), bad)


def _tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    from convlora.diffusion.tiny import tiny_unet_config

    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config())


@pytest.mark.parametrize("kind_name", ["loha", "lokr", "dora", "lokr-dora"])
def test_a_unet_adapter_of_every_kind_round_trips_through_a_native_pipeline_file(kind_name, tmp_path):
    from convlora.diffusion.pipeline import load_pipeline_lora, save_pipeline_lora

    unet = _tiny_unet()
    config = convlora.LoRAConfig(r=4, target_modules=["to_q", "to_v", "conv1", "conv2"], **KINDS[kind_name])
    paths = convlora.inject_lora(unet, config)
    with torch.no_grad():
        for t in convlora.lora_state_dict(unet).values():
            t.add_(torch.randn_like(t) * 0.05)
    path = save_pipeline_lora(tmp_path / "p.safetensors", unet=unet, format="native")
    fresh = _tiny_unet()
    load_pipeline_lora(path, unet=fresh)
    assert sorted(convlora.lora_layers(fresh)) == sorted(paths)
    ours, theirs = convlora.lora_state_dict(unet), convlora.lora_state_dict(fresh)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("fmt", ["diffusers"])
def test_formats_that_do_not_carry_a_kind_refuse_it_by_name_and_write_nothing(fmt, tmp_path):
    from convlora.diffusion.pipeline import save_pipeline_lora

    unet = _tiny_unet()
    convlora.inject_lora(unet, convlora.LoRAConfig(r=2, target_modules=["to_q"], kind="loha"))
    with pytest.raises(convlora.formats.LoRAFormatError, match=rf"{fmt} files do not carry these adapter kinds: loha \(unet\."):
        save_pipeline_lora(tmp_path / "p.safetensors", unet=unet, format=fmt)
    assert not list(tmp_path.iterdir())


def test_the_low_rank_tools_refuse_other_kinds_by_name(tmp_path):
    from convlora.formats import LoRAFormatError, read_lora_file
    from convlora.lowrank import merge_loras, resize_lora

    model = _mixed_model()
    convlora.inject_lora(model, convlora.LoRAConfig(r=4, target_modules=["0", "3"], kind="loha"))
    _, weights = read_lora_file(convlora.save_lora(model, tmp_path / "a.safetensors"))
    assert {m.kind.label for m in weights.modules.values()} == {"loha"}
    with pytest.raises(LoRAFormatError, match=r"resize works on plain LoRA \(B @ A\); these modules are other adapter kinds: loha: 0, 3"):
        resize_lora(weights, 2)
    with pytest.raises(LoRAFormatError, match=r"merge-loras \(a\) works on plain LoRA"):
        merge_loras([(weights, 1.0)], ["a"])


def test_randomize_gives_every_factor_values_and_keeps_doras_magnitude_near_its_start():
    from convlora.testing import randomize_lora_

    _, model, _ = _adapted("conv2d", "lokr-dora")
    adapter = model[0].adapter()
    start = adapter.magnitude.detach().clone()
    randomize_lora_(model, seed=3)
    assert all(bool((t != 0).any()) for t in adapter.factors())
    ratio = adapter.magnitude.detach() / start
    assert 0.5 < ratio.min().item() and ratio.max().item() < 1.5 and not torch.equal(ratio, torch.ones_like(ratio))


@pytest.mark.parametrize("kind_name", KINDS)
def test_fp32_adapters_of_every_kind_on_a_bf16_base_run_and_merge(kind_name):
    base, model, x = _adapted("conv2d", kind_name)
    expected = _run(base, _delta_layout(base) + _expected_update(model[0].adapter(), _delta_layout(base)), x).detach()
    model.to(torch.bfloat16)
    convlora.cast_lora_params(model, torch.float32)
    with torch.no_grad():
        unmerged = model(x.to(torch.bfloat16))
        model.eval()
        merged = model(x.to(torch.bfloat16))
    assert unmerged.dtype == merged.dtype == torch.bfloat16
    assert _rel(unmerged.float(), expected) < 2e-2 and _rel(merged.float(), expected) < 2e-2


@pytest.mark.parametrize("order", ["quantize-then-inject", "inject-then-quantize"])
@pytest.mark.parametrize("kind_name", ["loha", "lokr", "dora", "loha-dora"])
def test_every_kind_on_an_nf4_base_is_the_kind_on_the_dequantized_base(kind_name, order):
    from convlora.quant import dequantize_base, quantize_base
    from convlora.testing import randomize_lora_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.Flatten(), nn.Linear(24 * 25, 32))
    config = convlora.LoRAConfig(r=4, alpha=2.0, target_modules=["0", "2"], **KINDS[kind_name])
    if order == "quantize-then-inject":
        model.requires_grad_(False)
        quantize_base(model, "nf4")
        convlora.inject_lora(model, config)
    else:
        convlora.inject_lora(model, config)
        convlora.mark_only_lora_as_trainable(model)
        quantize_base(model, "nf4")
    randomize_lora_(model, seed=1)
    x = torch.randn(2, 16, 5, 5)
    reference = copy.deepcopy(model)
    dequantize_base(reference)
    convlora.mark_only_lora_as_trainable(model)
    out = model(x)
    out.square().sum().backward()
    with torch.no_grad():
        assert _rel(out, reference(x)) < 1e-5
    convlora.mark_only_lora_as_trainable(reference)
    reference(x).square().sum().backward()
    for (name, p), q in zip(convlora.adapter_parameters(model).items(), convlora.adapter_parameters(reference).values()):
        assert (p.grad - q.grad).abs().max().item() <= 1e-4 * q.grad.abs().max().item(), name


@pytest.mark.parametrize("kind_name", KINDS)
def test_a_kind_label_gives_back_the_config_fields_it_came_from(kind_name):
    from convlora.config import config_kind

    config = convlora.LoRAConfig(target_modules=["x"], **{k: v for k, v in KINDS[kind_name].items() if k in ("kind", "weight_decompose")})
    again = convlora.LoRAConfig(target_modules=["x"], **config_kind(config.adapter_kind().label))
    assert again.adapter_kind() == config.adapter_kind()
