"""The `convlora` command: inspect, convert, doctor, merge — run in-process on the tiny pipeline."""

from __future__ import annotations

import copy

import pytest
import torch

import convlora
from convlora.cli import main
from convlora.diffusion import inject_pipeline_lora, save_pipeline_lora, text_encoder_lora_config, unet_lora_config
from convlora.io import read_safetensors, write_safetensors
from convlora.testing import randomize_lora_

TRAINING = {"base_model": "tiny-sd", "unet_preset": "full", "steps": "500", "resolution": "32", "num_train_images": "32"}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from convlora.diffusion.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-sd")


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """(pipeline with full-preset UNet LoRA + attn text-encoder LoRA, its diffusers file)."""
    from convlora.diffusion.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    inject_pipeline_lora(
        pipe, unet_lora_config("full", rank=4, alpha=8, conv_rank=2, conv_alpha=1), text_encoder_lora_config("attn", rank=4)
    )
    randomize_lora_(pipe.unet, seed=0)
    randomize_lora_(pipe.text_encoder, seed=1)
    path = tmp_path_factory.mktemp("lora") / "pytorch_lora_weights.safetensors"
    save_pipeline_lora(path, unet=pipe.unet, text_encoder=pipe.text_encoder, metadata=TRAINING)
    return pipe, path


def test_version_and_help(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "convlora" in capsys.readouterr().out
    assert main([]) == 0
    assert "inspect" in capsys.readouterr().out


def test_inspect_pipeline_lists_presets_with_counts(pipeline_dir, capsys):
    assert main(["inspect", str(pipeline_dir)]) == 0
    out = capsys.readouterr().out
    assert "unet preset 'attn': 48 modules, 46,080 LoRA parameters (3.23% of 1,427,012)" in out
    assert "unet preset 'attn-ff': 72 modules" in out and "unet preset 'full': 117 modules" in out
    assert "add_k_proj                       -   (not in this model)" in out
    assert "text-encoder preset 'attn-mlp': 30 modules" in out

    assert main(["inspect", str(pipeline_dir), "--preset", "full", "--conv-rank", "4", "--include-conv-in-out"]) == 0
    out = capsys.readouterr().out
    assert "unet preset 'full': 119 modules" in out and "unet preset 'attn'" not in out
    assert "down_blocks.0.resnets.0.conv1" in out and "32x32x3x3" in out  # one line per module


def test_inspect_lora_file_shows_training_metadata(adapted, capsys):
    assert main(["inspect", str(adapted[1])]) == 0
    out = capsys.readouterr().out
    assert "format: diffusers" in out
    assert "base_model               tiny-sd" in out and "num_train_images         32" in out
    assert "unet: 117 modules (26 3x3 convs)" in out
    assert "rank:  4 x91, 2 x26" in out and "alpha: 8 x91, 1 x26" in out


def test_convert_chain_keeps_outputs(adapted, tmp_path, capsys):
    pipe, path = adapted
    assert main(["convert", str(path), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 0
    assert main(["convert", str(tmp_path / "k.safetensors"), str(tmp_path / "n.safetensors"), "--to", "native"]) == 0
    assert "(kohya) ->" in capsys.readouterr().out
    tensors, header = read_safetensors(tmp_path / "n.safetensors")
    assert header["steps"] == "500" and "unet.down_blocks.0.resnets.0.conv1.lora_A" in tensors
    from convlora.diffusion import load_pipeline_lora
    from convlora.diffusion.tiny import build_tiny_pipeline

    fresh = build_tiny_pipeline()
    load_pipeline_lora(tmp_path / "n.safetensors", unet=fresh.unet, text_encoder=fresh.text_encoder)
    for name in ("unet", "text_encoder"):
        ours, theirs = convlora.lora_state_dict(getattr(pipe, name)), convlora.lora_state_dict(getattr(fresh, name))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_convert_errors_exit_2_with_the_reason(tmp_path, capsys):
    write_safetensors({"weight": torch.zeros(2)}, tmp_path / "plain.safetensors")
    assert main(["convert", str(tmp_path / "plain.safetensors"), str(tmp_path / "o.safetensors"), "--to", "kohya"]) == 2
    assert "convlora convert: error: no LoRA keys found (1 key(s): weight)" in capsys.readouterr().err


def test_doctor_healthy_file(adapted, pipeline_dir, capsys):
    assert main(["doctor", str(adapted[1]), "--base", str(pipeline_dir)]) == 0
    out = capsys.readouterr().out
    assert "[   ok] diffusers StableDiffusionPipeline.load_lora_weights" in out
    # ComfyUI skips diffusers-spelled attention and reads alpha only from .alpha tensors; A1111 maps no dotted key
    assert "[   no] ComfyUI (LoraLoader)  (other format)" in out
    assert "[   no] AUTOMATIC1111 (extensions-builtin/Lora)  (other format)" in out and "--to kohya" in out


def test_doctor_mixed_styles_and_unknown_suffixes(adapted, tmp_path, capsys):
    tensors, header = read_safetensors(adapted[1])
    key = next(k for k in tensors if k.startswith("unet.") and k.endswith(".lora_A.weight"))
    mixed = dict(tensors)
    mixed[key.replace(".lora_A.weight", ".lora.down.weight")] = mixed.pop(key)
    mixed[key.replace(".lora_A.weight", ".lora.up.weight")] = mixed.pop(key.replace("lora_A", "lora_B"))
    mixed["unet.conv_in.lora_magnitude_vector"] = torch.ones(32)
    mixed["unet.conv_in.lora_extra"] = torch.ones(1)
    write_safetensors(mixed, tmp_path / "mixed.safetensors", header)
    assert main(["doctor", str(tmp_path / "mixed.safetensors")]) == 1
    out = capsys.readouterr().out
    assert "[   no] convlora" in out and "lora_magnitude_vector" in out
    assert "mixed key styles" in out and "the others are silently dropped" in out
    assert "unknown key suffixes: unet.conv_in.lora_extra" in out
    assert ("unet: 1 of 118 module(s) have a lora_magnitude_vector, but its LoraConfig has one use_dora for the whole "
            "component, so it computes another function for some of them") in out


def test_doctor_kohya_alpha_loss_and_missing_modules(adapted, pipeline_dir, tmp_path, capsys):
    pipe = copy.deepcopy(adapted[0])
    layer = convlora.lora_layers(pipe.text_encoder)["encoder.layers.0.self_attn.q_proj"]
    with convlora.temporarily_unmerged([layer]):
        layer.lora_alpha, layer.scaling = 1.0, 0.25  # one text-encoder module with its own alpha
    path = save_pipeline_lora(tmp_path / "k.safetensors", unet=pipe.unet, text_encoder=pipe.text_encoder, format="kohya")
    assert main(["doctor", str(path)]) == 1
    out = capsys.readouterr().out
    assert "1 text_encoder module(s) get alpha 4 instead of their own" in out

    tensors, header = read_safetensors(path)
    tensors["lora_unet_down_blocks_7_resnets_0_conv1.lora_down.weight"] = torch.zeros(2, 32, 3, 3)
    tensors["lora_unet_down_blocks_7_resnets_0_conv1.lora_up.weight"] = torch.zeros(32, 2, 1, 1)
    write_safetensors(tensors, tmp_path / "extra.safetensors", header)
    assert main(["doctor", str(tmp_path / "extra.safetensors"), "--base", str(pipeline_dir)]) == 1
    assert "1 module(s) not in the base unet: down_blocks.7.resnets.0.conv1" in capsys.readouterr().out


def test_merge_writes_a_pipeline_with_the_lora_inside(adapted, pipeline_dir, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    pipe, path = adapted
    assert main(["merge", str(pipeline_dir), str(path), str(tmp_path / "merged")]) == 0
    assert "merged 117 unet and 20 text-encoder modules (diffusers)" in capsys.readouterr().out
    merged = UNet2DConditionModel.from_pretrained(tmp_path / "merged" / "unet").eval()
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        assert (merged(x, torch.tensor([3]), c).sample - pipe.unet(x, torch.tensor([3]), c).sample).abs().max() < 1e-5


def test_doctor_notes_kohya_modules_without_alpha(tmp_path, capsys):
    write_safetensors(
        {"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3), "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1)},
        tmp_path / "old.safetensors",
    )
    assert main(["doctor", str(tmp_path / "old.safetensors")]) == 0
    assert "1 module(s) have no .alpha, so alpha = rank: lora_unet_conv_in" in capsys.readouterr().out


def test_doctor_says_which_loaders_a_conv_geometry_rules_out(tmp_path, capsys):
    from convlora.formats import save_peft_adapter

    model = torch.nn.Sequential(torch.nn.Conv2d(8, 12, 3, groups=4), torch.nn.Conv2d(12, 12, 3, dilation=2))
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["0", "1"]))
    convlora.save_lora(model, tmp_path / "native.safetensors")
    assert main(["doctor", str(tmp_path / "native.safetensors")]) == 0  # healthy for convlora itself
    out = capsys.readouterr().out
    why = "cannot be converted for it: it computes these conv LoRAs without their geometry: "
    assert out.count(why + "0: groups=4; 1: dilation=(2, 2)") == 3  # diffusers, ComfyUI, A1111
    assert out.count(why + "1: dilation=(2, 2)\n") == 1  # PEFT carries grouped convs

    grouped = torch.nn.Sequential(torch.nn.Conv2d(8, 12, 3, groups=4))
    convlora.inject_lora(grouped, convlora.LoRAConfig(r=2, target_modules=["0"]))
    save_peft_adapter(grouped, tmp_path / "peft")  # PEFT rank g * r = 8 for tensors of convlora rank 2
    assert main(["doctor", str(tmp_path / "peft")]) == 0
    assert "[   ok] PEFT PeftModel.from_pretrained" in capsys.readouterr().out
