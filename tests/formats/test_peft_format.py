"""PEFT adapter folders: convlora -> PeftModel.from_pretrained and PEFT-trained -> convlora, same outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import convlora
from convlora import read_safetensors
from convlora.testing import randomize_lora_
from convlora.formats import LoRAFormatError, load_peft_adapter, read_lora_file, save_peft_adapter, write_peft_folder

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


def test_dilated_or_padded_conv_export_refused(tmp_path):
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=4), nn.Conv2d(8, 8, 3, dilation=2),
                          nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"))  # fmt: skip
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["0", "1", "2"]))
    with pytest.raises(LoRAFormatError, match=r"without dilation.*: 1: dilation=\(2, 2\); 2: padding_mode='reflect'\."):
        save_peft_adapter(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _grouped_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(8, 12, 3, padding=1, groups=4), nn.SiLU(),  # grouped
        nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.SiLU(),  # depthwise
        nn.Conv2d(12, 6, 1, groups=2),  # grouped 1x1
    ).eval()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_grouped_convs_export_to_peft_exactly_and_back(tmp_path, use_rslora):
    base = _grouped_net()
    ours = copy.deepcopy(base)
    convlora.inject_lora(ours, convlora.LoRAConfig(r=2, alpha=3, target_modules=["0", "2", "4"], use_rslora=use_rslora))
    randomize_lora_(ours, std=0.2)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        expected = ours.eval()(x)
        assert _max_diff(expected, base(x)) > 1e-2
    folder = save_peft_adapter(ours, tmp_path / "grouped")

    config = json.loads((folder / "adapter_config.json").read_text())
    ranks = {"0": 2 * 4, "2": 2 * 12, "4": 2 * 2}  # g * r: A block-diagonal, one block per group
    alphas = {p: 3 * (g**0.5 if use_rslora else g) for p, g in {"0": 4, "2": 12, "4": 2}.items()}
    assert {p: config["rank_pattern"].get(p, config["r"]) for p in ranks} == ranks
    assert {p: config["alpha_pattern"].get(p, config["lora_alpha"]) for p in alphas} == pytest.approx(alphas)
    with pytest.warns(UserWarning, match="groups > 1"):
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    with torch.no_grad():
        assert _max_diff(peft_model(x), expected) < TOL  # PEFT runs it unmerged, and gets the same

    back = copy.deepcopy(base)
    assert sorted(load_peft_adapter(back, folder)) == ["0", "2", "4"]
    mine, theirs = convlora.lora_layers(ours), convlora.lora_layers(back)
    for path in ranks:
        assert theirs[path].r == 2 and theirs[path].lora_alpha == pytest.approx(3.0, rel=1e-12)  # 3*sqrt(g)/sqrt(g): last-bit rounding
        with convlora.temporarily_unmerged([mine[path], theirs[path]]):
            assert torch.equal(theirs[path].lora_A, mine[path].lora_A)  # bit-exact round trip
            assert torch.equal(theirs[path].lora_B, mine[path].lora_B)
    with torch.no_grad():
        assert _max_diff(back(x), expected) < TOL


def test_peft_grouped_lora_that_mixes_groups_is_refused(tmp_path, randomize_peft_lora):
    base = _grouped_net()
    trained = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["0"]))
    randomize_peft_lora(trained)  # a dense lora_A: group j's update reads every group's input
    trained.save_pretrained(tmp_path / "dense")
    with pytest.raises(LoRAFormatError, match=r"0 is a conv with groups=4 whose PEFT lora_A \(4, 8, 3, 3\) is not block-diagonal"):
        load_peft_adapter(base, tmp_path / "dense")
    assert not convlora.lora_layers(base)  # nothing injected


def test_peft_lora_on_a_dilated_conv_is_refused(tmp_path, randomize_peft_lora):
    base = nn.Sequential(nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.Conv2d(4, 4, 3, padding=1)).eval()
    trained = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["0", "1"]))
    randomize_peft_lora(trained)
    trained.save_pretrained(tmp_path / "dilated")
    with pytest.raises(LoRAFormatError, match=r"without dilation.*: 0: dilation=\(2, 2\)$"):
        load_peft_adapter(base, tmp_path / "dilated")
    assert not convlora.lora_layers(base)


def test_peft_folder_with_lora_bias_is_named(resnet, tmp_path):
    """DoRA folders load (tests/formats/test_peft_kinds.py); LoRA biases are still refused by name."""
    peft_model = get_peft_model(copy.deepcopy(resnet), LoraConfig(r=2, target_modules=["fc"], lora_bias=True))
    peft_model.save_pretrained(tmp_path / "bias")
    with pytest.raises(LoRAFormatError, match="lora_bias is set; convlora reads LoRA adapters without LoRA biases"):
        load_peft_adapter(resnet, tmp_path / "bias")
    assert not convlora.lora_layers(resnet)


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


def test_a_peft_folder_resized_or_converted_to_a_folder_keeps_its_base_model_and_task_type(resnet, tmp_path, randomize_peft_lora):
    from convlora.cli import main
    from convlora.formats import convert_lora_file

    peft_model = get_peft_model(copy.deepcopy(resnet), LoraConfig(r=3, lora_alpha=5, target_modules=["conv2", "fc"]))
    randomize_peft_lora(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    config_file = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(base_model_name_or_path="org/tiny-resnet", task_type="FEATURE_EXTRACTION")
    config_file.write_text(json.dumps(config))
    assert main(["resize", str(tmp_path / "peft"), str(tmp_path / "resized"), "--rank", "2"]) == 0
    convert_lora_file(tmp_path / "peft", tmp_path / "converted", "peft")
    convert_lora_file(tmp_path / "peft", tmp_path / "native.safetensors", "native")
    convert_lora_file(tmp_path / "native.safetensors", tmp_path / "via-native", "peft")  # carried in the header
    for out in ("resized", "converted", "via-native"):
        written = json.loads((tmp_path / out / "adapter_config.json").read_text())
        assert (written["base_model_name_or_path"], written["task_type"]) == ("org/tiny-resnet", "FEATURE_EXTRACTION"), out
    assert json.loads((tmp_path / "resized" / "adapter_config.json").read_text())["r"] == 2
    # in a folder the config alone says them: not copied into its header, and a config edited to null wins
    assert not {"peft_base_model_name_or_path", "peft_task_type"} & set(read_safetensors(tmp_path / "converted" / "adapter_model.safetensors")[1])
    edited = json.loads((tmp_path / "via-native" / "adapter_config.json").read_text())
    (tmp_path / "via-native" / "adapter_config.json").write_text(json.dumps({**edited, "base_model_name_or_path": None}))
    assert "peft_base_model_name_or_path" not in read_lora_file(tmp_path / "via-native")[1].metadata
    # a folder without them writes none; an explicit base model wins over the carried one
    weights = read_lora_file(tmp_path / "peft")[1]
    weights.metadata.clear()
    written = json.loads((write_peft_folder(weights, tmp_path / "plain") / "adapter_config.json").read_text())
    assert (written["base_model_name_or_path"], written["task_type"]) == (None, None)
    weights = read_lora_file(tmp_path / "peft")[1]
    written = json.loads((write_peft_folder(weights, tmp_path / "named", "other/base") / "adapter_config.json").read_text())
    assert (written["base_model_name_or_path"], written["task_type"]) == ("other/base", "FEATURE_EXTRACTION")


# ---- conversion without the model: the native header records conv geometry --------------------
def _saved_native(tmp_path, model: nn.Module, targets: list[str]):
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, alpha=3, target_modules=targets))
    randomize_lora_(model, std=0.2)
    return convlora.save_lora(model, tmp_path / "native.safetensors")


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "peft"])
def test_converting_a_native_file_refuses_what_the_target_loader_gets_wrong(tmp_path, fmt):
    from convlora.formats import convert_lora_file

    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=4), nn.Conv2d(8, 8, 3, dilation=2),
                          nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"), nn.Conv2d(8, 8, 1))  # fmt: skip
    src = _saved_native(tmp_path, model, ["0", "1", "2", "3"])
    pre = "" if fmt == "peft" else "unet."  # the component prefix diffusers / kohya files get
    grouped = "" if fmt == "peft" else "unet.0: groups=4; "  # PEFT files carry grouped convs exactly
    expected = rf"cannot export to {'PEFT' if fmt == 'peft' else fmt}: .*: {grouped}{pre}1: dilation=\(2, 2\); {pre}2: padding_mode='circular'\."
    with pytest.raises(LoRAFormatError, match=expected):
        convert_lora_file(src, tmp_path / "out", fmt, component="unet")
    assert not (tmp_path / "out").exists()


def test_native_grouped_file_converts_to_a_peft_folder_peft_runs_exactly(tmp_path):
    from convlora.formats import convert_lora_file

    base = _grouped_net()
    ours = copy.deepcopy(base)
    src = _saved_native(tmp_path, ours, ["0", "2", "4"])
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        expected = ours.eval()(x)
    _, folder = convert_lora_file(src, tmp_path / "peft", "peft")
    with pytest.warns(UserWarning, match="groups > 1"):
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    with torch.no_grad():
        assert _max_diff(peft_model(x), expected) < TOL

    # and back, without the model: the PEFT folder's grouping goes into the native table
    _, back = convert_lora_file(folder, tmp_path / "back.safetensors", "native")
    _, header = convlora.read_safetensors(back)
    assert {p: e["groups"] for p, e in json.loads(header["convlora_modules"]).items()} == {"0": 4, "2": 12, "4": 2}
    with pytest.raises(LoRAFormatError, match=r"cannot export to kohya.*: unet.0: groups=4; unet.2: groups=12; unet.4: groups=2\."):
        convert_lora_file(back, tmp_path / "k.safetensors", "kohya", component="unet")
    fresh = copy.deepcopy(base)
    convlora.load_lora(fresh, back)
    with torch.no_grad():
        assert _max_diff(fresh.eval()(x), expected) < TOL


def test_native_file_without_geometry_still_converts(tmp_path):
    """Files written before the module table recorded conv geometry: nothing to check, as before."""
    from convlora.formats import convert_lora_file

    src = _saved_native(tmp_path, nn.Sequential(nn.Conv2d(4, 4, 3, dilation=2)), ["0"])
    tensors, header = convlora.read_safetensors(src)
    table = json.loads(header["convlora_modules"])
    old = {p: {k: v for k, v in e.items() if k in ("type", "r", "alpha", "base_shape")} for p, e in table.items()}
    convlora.write_safetensors(tensors, tmp_path / "old.safetensors", {**header, "convlora_modules": json.dumps(old)})
    _, written = convert_lora_file(tmp_path / "old.safetensors", tmp_path / "k.safetensors", "kohya", component="unet")
    assert written.is_file()


@pytest.mark.parametrize("conv, x_shape", [(nn.Conv1d, (2, 8, 10)), (nn.Conv3d, (1, 8, 4, 5, 5))])
def test_grouped_conv1d_and_conv3d_go_to_peft_exactly(tmp_path, conv, x_shape):
    torch.manual_seed(0)
    base = nn.Sequential(conv(8, 6, 3, padding=1, groups=2)).eval()
    ours = copy.deepcopy(base)
    convlora.inject_lora(ours, convlora.LoRAConfig(r=3, alpha=2, target_modules=["0"]))
    randomize_lora_(ours, std=0.2)
    x = torch.randn(*x_shape)
    with torch.no_grad():
        expected = ours.eval()(x)
    folder = save_peft_adapter(ours, tmp_path / "grouped")
    with pytest.warns(UserWarning, match="groups > 1"):
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    back = copy.deepcopy(base)
    load_peft_adapter(back, folder)
    with torch.no_grad():
        assert _max_diff(peft_model(x), expected) < TOL
        assert _max_diff(back.eval()(x), expected) < TOL
