"""LoRA files that diffusers' own ``StableDiffusionPipeline.load_lora_weights`` loads, and back.

Every comparison is against the real diffusers / PEFT code on the tiny SD pipeline: the UNet noise
prediction and the text encoder's hidden states must agree within 1e-5 (fp32).
"""

from __future__ import annotations

import copy

import pytest
import torch

import convlora
from convlora.diffusion import (
    inject_pipeline_lora,
    load_pipeline_lora,
    save_pipeline_lora,
    text_encoder_lora_config,
    unet_lora_config,
)
from convlora.formats import LoRAFormatError
from convlora.io import read_safetensors, write_safetensors
from convlora.testing import randomize_lora_, relative_error

TOL = 1e-5
# The tiny CLIP text encoder (frozen random, initializer_factor 10) amplifies float32 rounding through
# its 5 layers: merged vs unmerged differ by up to ~1.9e-5 relative there (the UNet: ~1e-6). Text
# encoders are therefore also compared in float64 at TOL, where only a real difference can show.
TE_FP32_REL_TOL = 5e-5
METADATA = {"base_model": "tiny-sd", "unet_preset": "full", "steps": "500"}


def _outputs(pipe, unet_inputs, token_ids):
    with torch.no_grad():
        return pipe.unet(*unet_inputs).sample, pipe.text_encoder(token_ids)[0]


def _text_encoder_out64(text_encoder, token_ids):
    """The text encoder's output in float64 (LoRA unmerged, so no float32 merge rounding is carried in)."""
    model = copy.deepcopy(text_encoder).double()
    for layer in convlora.lora_layers(model).values():
        layer.unmerge()
    with torch.no_grad():
        return model(token_ids)[0]


def _assert_text_encoders_agree(theirs, ours, token_ids):
    with torch.no_grad():
        their32, our32 = theirs(token_ids)[0], ours(token_ids)[0]
    assert relative_error(their32, our32) < TE_FP32_REL_TOL
    assert (_text_encoder_out64(theirs, token_ids) - _text_encoder_out64(ours, token_ids)).abs().max() < TOL


def _adapted_pipeline(template, preset: str):
    """A convlora-adapted copy of the tiny pipeline: alpha != rank everywhere, conv rank for 3x3 convs."""
    pipe = copy.deepcopy(template)
    if preset == "full":
        unet_cfg = unet_lora_config("full", rank=4, alpha=8, conv_rank=2, conv_alpha=1, include_conv_in_out=True)
    else:
        unet_cfg = unet_lora_config(preset, rank=4, alpha=2)
    inject_pipeline_lora(pipe, unet_cfg, text_encoder_lora_config("attn-mlp", rank=4, alpha=6))
    randomize_lora_(pipe.unet, seed=1, std=0.1)
    randomize_lora_(pipe.text_encoder, seed=2, std=0.1)
    return pipe


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
@pytest.mark.parametrize("preset", ["attn", "attn-ff", "full"])
def test_diffusers_load_lora_weights_reproduces_convlora(fmt, preset, _tiny_pipeline_template, unet_inputs, token_ids, tmp_path):
    ours = _adapted_pipeline(_tiny_pipeline_template, preset)
    unet_out, te_out = _outputs(ours, unet_inputs, token_ids)  # eval mode: merged
    base_unet_out, _ = _outputs(_tiny_pipeline_template, unet_inputs, token_ids)
    assert (unet_out - base_unet_out).abs().max() > 1e-2  # the adapter matters
    path = save_pipeline_lora(
        tmp_path / "pytorch_lora_weights.safetensors", unet=ours.unet, text_encoder=ours.text_encoder,
        format=fmt, metadata=METADATA,
    )  # fmt: skip
    assert all(read_safetensors(path)[1][k] == v for k, v in METADATA.items())

    theirs = copy.deepcopy(_tiny_pipeline_template)
    theirs.load_lora_weights(str(path))
    their_unet, their_te = _outputs(theirs, unet_inputs, token_ids)
    assert (their_unet - unet_out).abs().max() < TOL
    _assert_text_encoders_agree(theirs.text_encoder, ours.text_encoder, token_ids)  # ours merged
    with convlora.temporarily_unmerged([*convlora.lora_layers(ours.unet).values(), *convlora.lora_layers(ours.text_encoder).values()]):
        unmerged_unet, _ = _outputs(ours, unet_inputs, token_ids)
        _assert_text_encoders_agree(theirs.text_encoder, ours.text_encoder, token_ids)  # ours unmerged
    assert (their_unet - unmerged_unet).abs().max() < TOL

    # ... and convlora reads its own export back onto a fresh pipeline exactly
    again = copy.deepcopy(_tiny_pipeline_template)
    info = load_pipeline_lora(path, unet=again.unet, text_encoder=again.text_encoder)
    assert info["format"] == fmt and info["metadata"]["steps"] == "500"
    assert sorted(info["unet"]) == sorted(convlora.lora_layers(ours.unet))
    again_unet, again_te = _outputs(again, unet_inputs, token_ids)
    assert torch.equal(again_unet, unet_out) and torch.equal(again_te, te_out)


def test_native_pipeline_file_round_trip(_tiny_pipeline_template, unet_inputs, token_ids, tmp_path):
    ours = _adapted_pipeline(_tiny_pipeline_template, "full")
    expected = _outputs(ours, unet_inputs, token_ids)
    path = save_pipeline_lora(tmp_path / "lora.safetensors", unet=ours.unet, text_encoder=ours.text_encoder, format="native", metadata=METADATA)
    tensors, header = read_safetensors(path)
    assert "unet.conv_in.lora_A" in tensors and "text_encoder.encoder.layers.0.mlp.fc1.lora_B" in tensors
    assert header["base_model"] == "tiny-sd"
    fresh = copy.deepcopy(_tiny_pipeline_template)
    info = load_pipeline_lora(path, unet=fresh.unet, text_encoder=fresh.text_encoder)
    assert info["format"] == "native" and len(info["text_encoder"]) == 30
    got = _outputs(fresh, unet_inputs, token_ids)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_diffusers_trained_file_loads_into_convlora(_tiny_pipeline_template, unet_inputs, token_ids, tmp_path):
    """A file written by diffusers itself (PEFT adapters + save_lora_weights, as its training script does)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    theirs = copy.deepcopy(_tiny_pipeline_template)
    unet_config = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="gaussian",
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut"],
        rank_pattern={"conv1": 2}, alpha_pattern={"conv2": 3},
    )  # fmt: skip
    te_config = LoraConfig(r=2, lora_alpha=5, init_lora_weights="gaussian", target_modules=["q_proj", "v_proj"])
    theirs.unet.add_adapter(unet_config)
    theirs.text_encoder.add_adapter(te_config)
    _randomize_peft(theirs.unet, seed=3)
    _randomize_peft(theirs.text_encoder, seed=4)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(theirs.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(theirs.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict(),
    )
    expected = _outputs(theirs, unet_inputs, token_ids)

    ours = copy.deepcopy(_tiny_pipeline_template)
    info = load_pipeline_lora(tmp_path / "pytorch_lora_weights.safetensors", unet=ours.unet, text_encoder=ours.text_encoder)
    assert info["format"] == "diffusers" and len(info["text_encoder"]) == 10
    layers = convlora.lora_layers(ours.unet)
    assert (layers["down_blocks.0.resnets.0.conv1"].r, layers["down_blocks.0.resnets.0.conv1"].lora_alpha) == (2, 8.0)
    assert layers["down_blocks.0.resnets.0.conv2"].lora_alpha == 3.0
    got = _outputs(ours, unet_inputs, token_ids)
    assert (got[0] - expected[0]).abs().max() < TOL
    _assert_text_encoders_agree(theirs.text_encoder, ours.text_encoder, token_ids)


def test_kohya_trained_file_loads_into_convlora(_tiny_pipeline_template, unet_inputs, token_ids, tmp_path):
    """A LoCon file spelled as sd-scripts writes it; diffusers' kohya import is the reference."""
    g = torch.Generator().manual_seed(5)
    unet = _tiny_pipeline_template.unet
    modules = dict(unet.named_modules())
    targets = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": 4,
        "down_blocks.1.attentions.0.proj_in": 4,
        "mid_block.resnets.0.conv1": 2,
        "up_blocks.0.resnets.0.conv_shortcut": 4,
        "up_blocks.0.upsamplers.0.conv": 2,
    }
    tensors = {}
    for path, rank in targets.items():
        weight = modules[path].weight
        name = "lora_unet_" + path.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, *weight.shape[1:], generator=g) * 0.2
        tensors[f"{name}.lora_up.weight"] = torch.randn(weight.shape[0], rank, *weight.shape[2:3] and (1, 1), generator=g) * 0.05
        tensors[f"{name}.alpha"] = torch.tensor(1.0 if rank == 2 else 8.0)
    te_name = "lora_te_text_model_encoder_layers_1_mlp_fc2"
    tensors[f"{te_name}.lora_down.weight"] = torch.randn(3, 37, generator=g) * 0.2
    tensors[f"{te_name}.lora_up.weight"] = torch.randn(32, 3, generator=g) * 0.05
    tensors[f"{te_name}.alpha"] = torch.tensor(8.0)
    path = write_safetensors(tensors, tmp_path / "locon.safetensors", {"ss_network_module": "networks.lora"})

    theirs = copy.deepcopy(_tiny_pipeline_template)
    theirs.load_lora_weights(str(path))
    expected = _outputs(theirs, unet_inputs, token_ids)
    ours = copy.deepcopy(_tiny_pipeline_template)
    info = load_pipeline_lora(path, unet=ours.unet, text_encoder=ours.text_encoder)
    assert info["format"] == "kohya" and sorted(info["unet"]) == sorted(targets)
    assert info["text_encoder"] == ["encoder.layers.1.mlp.fc2"]
    got = _outputs(ours, unet_inputs, token_ids)
    assert (got[0] - expected[0]).abs().max() < TOL
    _assert_text_encoders_agree(theirs.text_encoder, ours.text_encoder, token_ids)


def _randomize_peft(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)


# ---- errors --------------------------------------------------------------------------------------
def test_file_with_text_encoder_lora_but_no_text_encoder_raises(_tiny_pipeline_template, tmp_path):
    ours = _adapted_pipeline(_tiny_pipeline_template, "attn")
    path = save_pipeline_lora(tmp_path / "l.safetensors", unet=ours.unet, text_encoder=ours.text_encoder)
    fresh = copy.deepcopy(_tiny_pipeline_template)
    with pytest.raises(LoRAFormatError, match=r"holds LoRA for text_encoder \(30 modules\) but no such model was given"):
        load_pipeline_lora(path, unet=fresh.unet)
    assert not convlora.lora_layers(fresh.unet)
    assert len(load_pipeline_lora(path, unet=fresh.unet, strict=False)["unet"]) == 48


def test_unknown_module_and_leftover_keys_are_named(_tiny_pipeline_template, tmp_path):
    ours = _adapted_pipeline(_tiny_pipeline_template, "attn")
    path = save_pipeline_lora(tmp_path / "l.safetensors", unet=ours.unet)
    tensors, header = read_safetensors(path)
    bad = dict(tensors)
    bad["unet.down_blocks.9.attn.to_q.lora_A.weight"] = torch.zeros(4, 64)
    bad["unet.down_blocks.9.attn.to_q.lora_B.weight"] = torch.zeros(64, 4)
    write_safetensors(bad, tmp_path / "unknown.safetensors", header)
    fresh = copy.deepcopy(_tiny_pipeline_template)
    with pytest.raises(LoRAFormatError, match=r"1 LoRA module\(s\) match no module of UNet2DConditionModel: down_blocks\.9\.attn\.to_q"):
        load_pipeline_lora(tmp_path / "unknown.safetensors", unet=fresh.unet)
    assert not convlora.lora_layers(fresh.unet)  # nothing half-loaded

    dora = dict(tensors)
    dora["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector"] = torch.ones(64)
    write_safetensors(dora, tmp_path / "dora.safetensors", header)
    with pytest.raises(LoRAFormatError, match=r"to_q\.lora_magnitude_vector"):
        load_pipeline_lora(tmp_path / "dora.safetensors", unet=fresh.unet)


def test_model_with_other_lora_modules_is_strict(_tiny_pipeline_template, tmp_path):
    ours = _adapted_pipeline(_tiny_pipeline_template, "attn")
    path = save_pipeline_lora(tmp_path / "l.safetensors", unet=ours.unet, format="kohya")
    fresh = copy.deepcopy(_tiny_pipeline_template)
    convlora.inject_lora(fresh.unet, unet_lora_config("attn-ff", rank=4))
    with pytest.raises(convlora.StateDictMismatchError, match="missing key.*proj_in.lora_A"):
        load_pipeline_lora(path, unet=fresh.unet)


def test_grouped_conv_refused_for_diffusers_and_kohya(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, groups=2))
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["0"]))
    for fmt in ("diffusers", "kohya"):
        with pytest.raises(LoRAFormatError, match=f"cannot export to {fmt}.*0: groups=2.*format='native'"):
            save_pipeline_lora(tmp_path / "g.safetensors", unet=model, format=fmt)
    assert save_pipeline_lora(tmp_path / "g.safetensors", unet=model, format="native").is_file()


def test_metadata_must_be_strings_and_not_reserved(_tiny_pipeline_template, tmp_path):
    ours = _adapted_pipeline(_tiny_pipeline_template, "attn")
    with pytest.raises(ValueError, match=r"offending keys: \['steps', 'lora_adapter_metadata'\]"):
        save_pipeline_lora(tmp_path / "x.safetensors", unet=ours.unet, metadata={"steps": 5, "lora_adapter_metadata": "{}"})


def test_single_model_native_file_loads_into_the_unet(_tiny_pipeline_template, unet_inputs, tmp_path):
    ours = _adapted_pipeline(_tiny_pipeline_template, "attn-ff")
    convlora.save_lora(ours.unet, tmp_path / "unet.safetensors", metadata={"steps": "3"})
    fresh = copy.deepcopy(_tiny_pipeline_template)
    info = load_pipeline_lora(tmp_path / "unet.safetensors", unet=fresh.unet, text_encoder=fresh.text_encoder)
    assert info["format"] == "native" and len(info["unet"]) == 72 and info["text_encoder"] == []
    with torch.no_grad():
        assert torch.equal(fresh.unet(*unet_inputs).sample, ours.unet(*unet_inputs).sample)
