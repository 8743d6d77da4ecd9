"""UNet / text-encoder presets: exact target sets on the tiny SD pipeline."""

from __future__ import annotations

from collections import Counter

import pytest

import convlora
from convlora.diffusion import lora_parameter_count, text_encoder_lora_config, unet_lora_config
from convlora.layers import is_spatial_conv


def _kinds(paths):
    """Last path segment, or the last two when it is an index: ...attn1.to_out.0 -> to_out.0, ff.net.2 -> net.2."""
    out = Counter()
    for p in paths:
        parts = p.split(".")
        out[".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]] += 1
    return out


def test_attn_preset_targets_exactly_qkvo(unet):
    paths = convlora.inject_lora(unet, unet_lora_config("attn", rank=4))
    # 6 transformer blocks (2 down, 1 mid, 3 up) x 2 attentions (self, cross) x 4 projections
    assert _kinds(paths) == {"to_q": 12, "to_k": 12, "to_v": 12, "to_out.0": 12}


def test_attn_ff_adds_proj_and_feed_forward(unet):
    paths = convlora.inject_lora(unet, unet_lora_config("attn-ff", rank=4))
    assert _kinds(paths) == {
        "to_q": 12, "to_k": 12, "to_v": 12, "to_out.0": 12,
        "proj_in": 6, "proj_out": 6, "proj": 6, "net.2": 6,
    }  # fmt: skip
    # add_k_proj / add_v_proj are in the preset but absent from an SD-1.x UNet: skipped, no error


def test_full_adds_resnets_and_samplers_with_conv_rank(unet):
    cfg = unet_lora_config("full", rank=4, alpha=8, conv_rank=2, conv_alpha=1)
    plan = convlora.plan_injection(unet, cfg)
    kinds = _kinds(plan)
    assert kinds["conv1"] == kinds["conv2"] == kinds["time_emb_proj"] == 12
    assert kinds["conv_shortcut"] == 7 and kinds["conv"] == 2  # one downsampler, one upsampler
    assert "conv_in" not in plan and "conv_out" not in plan
    modules = dict(unet.named_modules())
    for path, spec in plan.items():
        expected = (2, 1.0) if is_spatial_conv(modules[path]) else (4, 8.0)
        assert (spec.r, spec.alpha) == expected, path
    assert plan["down_blocks.1.resnets.0.conv_shortcut"].r == 4  # 1x1 conv: the linear rank


def test_conv_in_out_on_request(unet):
    plan = convlora.plan_injection(unet, unet_lora_config("full", include_conv_in_out=True))
    assert {"conv_in", "conv_out"} <= set(plan)


def test_text_encoder_presets(text_encoder):
    attn = convlora.plan_injection(text_encoder, text_encoder_lora_config("attn"))
    assert _kinds(attn) == {"q_proj": 5, "k_proj": 5, "v_proj": 5, "out_proj": 5}
    mlp = convlora.plan_injection(text_encoder, text_encoder_lora_config("attn-mlp", rank=2))
    assert _kinds(mlp) == {"q_proj": 5, "k_proj": 5, "v_proj": 5, "out_proj": 5, "fc1": 5, "fc2": 5}


def test_preset_errors():
    with pytest.raises(ValueError, match="unknown UNet preset 'ful'"):
        unet_lora_config("ful")
    with pytest.raises(ValueError, match="unknown text-encoder preset 'mlp'"):
        text_encoder_lora_config("mlp")
    with pytest.raises(ValueError, match="conv_rank / conv_alpha apply to 3x3 convs"):
        unet_lora_config("attn", conv_rank=4)


def test_user_typo_still_raises(unet):
    with pytest.raises(ValueError, match="matched no module for: to_qq"):
        convlora.inject_lora(unet, convlora.LoRAConfig(target_modules=["to_q", "to_qq"]))


def test_parameter_count_matches_injected_layers(unet):
    cfg = unet_lora_config("full", rank=4, conv_rank=2, include_conv_in_out=True)
    plan = convlora.plan_injection(unet, cfg)
    modules = dict(unet.named_modules())
    predicted = sum(lora_parameter_count(modules[p], s.r) for p, s in plan.items())
    convlora.inject_lora(unet, cfg)
    assert predicted == sum(p.numel() for p in convlora.adapter_parameters(unet).values())


def test_training_metadata_keys_are_the_ones_inspect_knows():
    from convlora.diffusion import TRAINING_METADATA
    from convlora.training.metadata import REQUIRED_KEYS

    assert set(REQUIRED_KEYS) <= set(TRAINING_METADATA)
