"""Injection into whole models: target matching, errors that change nothing, training, disable, unload."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import convlora
from convlora.testing import randomize_lora_, relative_error


class Block(nn.Module):
    """A small model whose names exercise segment matching (to_out.0 vs to_out.01, conv1 vs xconv1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.xconv1 = nn.Conv2d(8, 8, 1)
        self.norm = nn.GroupNorm(2, 8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.to_out = nn.ModuleList([nn.Linear(8, 8)] + [nn.Identity()] * 9 + [nn.Linear(8, 8)])  # to_out.0 / to_out.10
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.dw(self.norm(self.xconv1(torch.relu(self.conv1(x)))))
        h = h.mean(dim=(2, 3))
        h = self.to_out[10](self.to_out[0](h))
        return self.head(h)


def make_model(seed: int = 0) -> Block:
    torch.manual_seed(seed)
    return Block()


def snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_segment_matching_is_on_whole_dotted_segments():
    model = make_model()
    names = convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["conv1", "to_out.0"]))
    # "conv1" must not match "xconv1"; "to_out.0" must not match "to_out.10" (nor would "to_out.1").
    assert names == ["conv1", "to_out.0"]
    model = make_model()
    with pytest.raises(ValueError, match="to_out.1 \\(torch.nn.modules.linear.Identity\\)"):
        convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["to_out.1"]))


def test_inject_returns_paths_in_model_order_and_keeps_outputs():
    model = make_model()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    names = convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["head", "conv1", "to_out.0", "dw"]))
    assert names == ["conv1", "dw", "to_out.0", "head"]
    assert isinstance(model.conv1, convlora.Conv2d) and isinstance(model.head, convlora.Linear)
    assert torch.equal(model(x), expected)


def test_regex_targets_and_exclude():
    model = make_model()
    names = convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=r".*conv1|to_out\.(0|10)", exclude_modules=["to_out.10"]))
    assert names == ["conv1", "xconv1", "to_out.0"]


def test_rank_and_alpha_patterns_and_conv_rank():
    model = make_model()
    cfg = convlora.LoRAConfig(
        r=4, alpha=4, conv_rank=2, conv_alpha=1, target_modules=["conv1", "xconv1", "dw", "head", "to_out.0"],
        rank_pattern={"head": 6}, alpha_pattern={r"to_out\.\d": 12},
    )
    convlora.inject_lora(model, cfg)
    ranks = {p: (m.r, m.lora_alpha) for p, m in convlora.lora_layers(model).items()}
    # conv1 and dw are 3x3 (conv_rank); xconv1 is 1x1 so it takes r like a linear layer (kohya's rule).
    assert ranks == {"conv1": (2, 1.0), "xconv1": (4, 4.0), "dw": (2, 1.0), "to_out.0": (4, 12.0), "head": (6, 4.0)}


def test_unmatched_targets_raise_naming_each_and_change_nothing():
    model = make_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match="matched no module for: to_q, attn1"):
        convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["conv1", "to_q", "attn1"]))
    assert not convlora.lora_layers(model)
    assert snapshot(model).keys() == before.keys()


def test_unwrappable_target_raises_naming_module_and_type():
    model = make_model()
    with pytest.raises(ValueError, match=r"norm \(torch.nn.modules.normalization.GroupNorm\)"):
        convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["conv1", "norm"]))
    assert not convlora.lora_layers(model), "a failed injection must not leave a half-adapted model"


def test_unused_rank_pattern_and_double_injection_raise():
    with pytest.raises(ValueError, match="rank_pattern key\\(s\\) match no adapted module: mid_block"):
        convlora.inject_lora(make_model(), convlora.LoRAConfig(r=2, target_modules=["conv1"], rank_pattern={"mid_block": 4}))
    model = make_model()
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["conv1"]))
    with pytest.raises(ValueError, match="already carry LoRA: conv1"):
        convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["conv1"]))


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_only_adapter_params_train(bias):
    model = make_model()
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["conv1", "dw", "head"], bias=bias))
    convlora.mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {f"{m}.lora_adapters.default.{w}" for m in ("conv1", "dw", "head") for w in ("lora_A", "lora_B")}
    expected = {
        "none": lora,
        "all": lora | {n for n, _ in model.named_parameters() if n.endswith(".bias")},
        "lora_only": lora | {"conv1.bias", "dw.bias", "head.bias"},
    }[bias]
    assert trainable == expected
    # the adapter's own keys are <path>.lora_A / .lora_B (the file keys), whatever adapter holds them
    assert set(convlora.lora_state_dict(model)) == {k.replace(".lora_adapters.default.", ".") for k in expected}

    before = snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(4, 3, 8, 8), torch.randn(4, 4)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    after = model.state_dict()
    for name, value in before.items():
        changed = not torch.equal(after[name], value)
        assert changed == (name in expected), f"{name}: changed={changed}"


def test_modules_to_save_train_and_save():
    model = make_model()
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["conv1"], modules_to_save=["norm"]))
    convlora.mark_only_lora_as_trainable(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"conv1.lora_adapters.default.lora_A", "conv1.lora_adapters.default.lora_B", "norm.weight", "norm.bias"}


def test_disable_lora_gives_base_output_and_restores():
    model = make_model()
    x = torch.randn(2, 3, 8, 8)
    base_out = model(x)
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["conv1", "dw", "head"]))
    randomize_lora_(model)
    adapted = model(x)
    assert relative_error(adapted, base_out) > 1e-3
    with convlora.disable_lora(model):
        assert torch.equal(model(x), base_out)
    assert torch.equal(model(x), adapted)
    model.eval()
    merged = model(x)
    with convlora.disable_lora(model):
        assert torch.equal(model(x), base_out)
    assert all(layer.merged for layer in convlora.lora_layers(model).values())
    assert torch.equal(model(x), merged)


def test_merge_and_unload_and_unload():
    model = make_model()
    base = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    convlora.inject_lora(model, convlora.LoRAConfig(r=3, alpha=6, target_modules=["conv1", "dw", "to_out.0", "head"]))
    randomize_lora_(model)
    adapted = model(x)
    merged_model = convlora.merge_and_unload(copy.deepcopy(model))
    assert not convlora.lora_layers(merged_model) and type(merged_model.conv1) is nn.Conv2d
    assert set(merged_model.state_dict()) == set(base.state_dict())
    assert relative_error(merged_model(x), adapted) < 1e-5
    unloaded = convlora.unload(model)
    assert type(unloaded.head) is nn.Linear
    assert torch.equal(unloaded(x), base(x))


def test_merge_and_unload_is_all_or_nothing():
    model = make_model()
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["conv1", "head"]))
    randomize_lora_(model)
    before = snapshot(model)
    with torch.no_grad():
        model.head.lora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="head \\(Linear\\) gives non-finite"):
        convlora.merge_and_unload(model)
    assert isinstance(model.conv1, convlora.Conv2d) and not model.conv1.merged
    assert torch.equal(model.conv1.weight, before["conv1.weight"])


def test_base_checkpoint_loads_into_injected_model():
    base = make_model(seed=1)
    model = make_model(seed=0)
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["conv1", "head"]))
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert sorted(result.missing_keys) == [f"{m}.lora_adapters.default.{w}" for m in ("conv1", "head") for w in ("lora_A", "lora_B")]
    assert result.unexpected_keys == []
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(model(x), base(x))


def test_load_lora_state_dict_strict_errors_change_nothing():
    model = make_model()
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["conv1", "head"]))
    good = {k: torch.randn_like(v) for k, v in convlora.lora_state_dict(model).items()}
    before = snapshot(model)
    missing = {k: v for k, v in good.items() if k != "head.lora_B"}
    with pytest.raises(convlora.StateDictMismatchError, match="missing key\\(s\\) head.lora_B"):
        convlora.load_lora_state_dict(model, missing)
    with pytest.raises(convlora.StateDictMismatchError, match="unexpected key\\(s\\) conv2.lora_A"):
        convlora.load_lora_state_dict(model, {**good, "conv2.lora_A": torch.zeros(1)})
    wrong = {**good, "conv1.lora_A": torch.zeros(3, 3, 3, 3)}
    with pytest.raises(convlora.StateDictMismatchError, match=r"conv1.lora_A: state dict has \(3, 3, 3, 3\), model expects \(2, 3, 3, 3\)"):
        convlora.load_lora_state_dict(model, wrong)
    for key, value in snapshot(model).items():
        assert torch.equal(value, before[key])
    convlora.load_lora_state_dict(model, missing, strict=False)
    assert torch.equal(model.conv1.lora_A, good["conv1.lora_A"])


def test_eval_model_injection_is_merged_and_consistent():
    model = make_model().eval()
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["conv1"]))
    assert model.conv1.merged
    randomize_lora_(model)
    x = torch.randn(1, 3, 8, 8)
    model.train()
    assert relative_error(model.eval()(x), model.train()(x)) < 1e-5


def test_fsdp_sharded_weights_skip_merge_with_one_warning():
    """A real FSDP2 shard (gloo, world size 1): eval() must not merge into FSDP-managed weights."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import socket

    with socket.socket() as probe:  # a free port: a fixed one collides with other runs on the machine
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["0", "2"]))
        randomize_lora_(model)
        fully_shard(model)
        x = torch.randn(3, 8)
        expected = model(x)
        from convlora import layers as layers_module

        layers_module._WARNED.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.eval()
            model.train()
            model.eval()
        messages = [str(w.message) for w in caught if "merge-on-eval skipped" in str(w.message)]
        assert messages == ["convlora: merge-on-eval skipped because weights are sharded (FSDP); LoRA layers run unmerged (same outputs, slightly slower)."]
        assert not model[0].merged and not model[2].merged
        assert relative_error(model(x), expected) < 1e-6
        with pytest.raises(RuntimeError, match="its weight is sharded \\(FSDP\\)"):
            model[0].merge()
    finally:
        dist.destroy_process_group()


def test_training_through_a_merged_layer_still_trains():
    """Gradients in eval mode: the layer stays merged, outputs are the merged ones, A and B get the
    same gradients as unmerged (no dropout here)."""
    model = make_model()
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["conv1", "head"]))
    convlora.mark_only_lora_as_trainable(model)
    randomize_lora_(model)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    model(x).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    expected_x_grad = x.grad.clone()
    model.zero_grad()
    x.grad = None
    model.eval()
    with torch.no_grad():
        merged_out = model(x)
    out = model(x)
    assert model.conv1.merged and torch.equal(out, merged_out)
    out.square().sum().backward()
    for name, grad in expected.items():
        assert relative_error(dict(model.named_parameters())[name].grad, grad) < 1e-5, name
    assert relative_error(x.grad, expected_x_grad) < 1e-5
