"""PEFT adapter folders: convlora -> PeftModel.from_pretrained and PEFT-trained -> convlora, same outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import convlora
from convlora.testing import randomize_lora_
from convlora.formats import LoRAFormatError, load_peft_adapter, save_peft_adapter

TOL = 1e-5


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_resnet_to_peft(resnet, tmp_path):
    base = copy.deepcopy(resnet)
    cfg = convlora.LoRAConfig(
        r=4, alpha=8, target_modules=["stem", "conv1", "conv2", "shortcut.0", "fc"],
        conv_rank=2, conv_alpha=3, rank_pattern={"layer2.conv2": 3}, alpha_pattern={"fc": 1.5},
    )  # fmt: skip
    convlora.inject_lora(resnet, cfg)
    randomize_lora_(resnet)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = resnet.eval()(x)
        assert _max_diff(expected, base(x)) > 1e-2  # the adapter really changes the outputs
    folder = save_peft_adapter(resnet, tmp_path / "adapter", base_model_name_or_path="tiny-resnet")

    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 3  # most common: the five 3x3 convs
    assert config["rank_pattern"] == {"fc": 4, "layer2.conv2": 3, "layer2.shortcut.0": 4}
    assert config["alpha_pattern"] == {"fc": 1.5, "layer2.shortcut.0": 8}
    peft_model = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        assert _max_diff(peft_model(x), expected) < TOL


def test_peft_resnet_to_convlora(resnet, tmp_path, randomize_peft_lora):
    base = copy.deepcopy(resnet)
    peft_config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["conv1", "conv2", "fc", "0"],
        rank_pattern={"layer1.conv1": 2}, alpha_pattern={"fc": 2},
    )  # fmt: skip
    peft_model = get_peft_model(copy.deepcopy(resnet), peft_config)
    randomize_peft_lora(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = peft_model.eval()(x)

    loaded = load_peft_adapter(base, tmp_path / "peft")
    assert set(loaded) == {
        "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2", "layer2.shortcut.0", "fc",
    }  # fmt: skip
    layers = convlora.lora_layers(base)
    assert (layers["layer1.conv1"].r, layers["layer1.conv1"].lora_alpha) == (2, 8.0)
    assert layers["fc"].lora_alpha == 2.0
    with torch.no_grad():
        assert _max_diff(base.eval()(x), expected) < TOL  # merged
        with convlora.temporarily_unmerged(layers.values()):  # (BatchNorm rules out train mode)
            assert _max_diff(base(x), expected) < TOL


def test_bert_both_ways(bert, tmp_path, randomize_peft_lora):
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    ours = copy.deepcopy(bert)
    convlora.inject_lora(ours, convlora.LoRAConfig(r=4, alpha=16, target_modules=["query", "value", "dense"], use_rslora=True))
    randomize_lora_(ours, std=0.05)
    with torch.no_grad():
        expected = ours.eval()(ids).last_hidden_state
    save_peft_adapter(ours, tmp_path / "to_peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(bert), tmp_path / "to_peft").eval()
    with torch.no_grad():
        assert _max_diff(peft_model(ids).last_hidden_state, expected) < TOL

    trained = get_peft_model(copy.deepcopy(bert), LoraConfig(r=8, lora_alpha=4, target_modules=["key", "intermediate.dense"]))
    randomize_peft_lora(trained, std=0.05)
    trained.save_pretrained(tmp_path / "from_peft")
    with torch.no_grad():
        expected = trained.eval()(ids).last_hidden_state
    back = copy.deepcopy(bert)
    assert len(load_peft_adapter(back, tmp_path / "from_peft")) == 4  # 2 layers x (key, intermediate.dense)
    with torch.no_grad():
        assert _max_diff(back.eval()(ids).last_hidden_state, expected) < TOL


def test_grouped_conv_export_refused(tmp_path):
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=4), nn.Conv2d(8, 8, 3, dilation=2))
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["0", "1"]))
    with pytest.raises(LoRAFormatError, match=r"0: groups=4; 1: dilation=\(2, 2\)"):
        save_peft_adapter(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_peft_folder_with_dora_is_named(resnet, tmp_path):
    peft_model = get_peft_model(copy.deepcopy(resnet), LoraConfig(r=2, target_modules=["fc"], use_dora=True))
    peft_model.save_pretrained(tmp_path / "dora")
    with pytest.raises(LoRAFormatError, match="use_dora is set"):
        load_peft_adapter(resnet, tmp_path / "dora")


def test_peft_leftover_keys_are_named(resnet, tmp_path):
    peft_model = get_peft_model(copy.deepcopy(resnet), LoraConfig(r=2, target_modules=["fc"], modules_to_save=["stem"]))
    peft_model.save_pretrained(tmp_path / "mts")
    with pytest.raises(LoRAFormatError, match=r"base_model\.model\.stem\.weight"):
        load_peft_adapter(resnet, tmp_path / "mts")
    assert not convlora.lora_layers(resnet)  # nothing injected


def test_peft_folder_converted_to_native_loads_with_core_load_lora(resnet, tmp_path, randomize_peft_lora):
    from convlora.formats import convert_lora_file

    peft_model = get_peft_model(copy.deepcopy(resnet), LoraConfig(r=3, lora_alpha=5, target_modules=["conv2", "fc"]))
    randomize_peft_lora(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = peft_model.eval()(x)
    assert convert_lora_file(tmp_path / "peft", tmp_path / "native.safetensors", "native")[0] == "peft"
    assert sorted(convlora.load_lora(resnet, tmp_path / "native.safetensors")) == ["fc", "layer1.conv2", "layer2.conv2"]
    with torch.no_grad():
        assert _max_diff(resnet.eval()(x), expected) < TOL
