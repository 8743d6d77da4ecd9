"""convlora.training.precision and .metadata: dtypes under mixed precision, what the files record."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from convlora import inject_lora, mark_only_lora_as_trainable
from convlora.diffusion import unet_lora_config
from convlora.diffusion.tiny import tiny_unet_config
from convlora.training.metadata import KOHYA_NETWORK_KEYS, REQUIRED_KEYS, training_metadata
from convlora.training.precision import (
    adapter_dtypes,
    cast_for_training,
    check_mixed_precision,
    parameter_dtypes,
    weight_dtype_for,
)


def test_weight_dtype_for_accelerate_values():
    assert weight_dtype_for("no") is torch.float32 and weight_dtype_for(None) is torch.float32
    assert weight_dtype_for("fp16") is torch.float16 and weight_dtype_for("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="'fp8' is not supported"):
        weight_dtype_for("fp8")


def test_fp16_on_cpu_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match=r"fp16 mixed precision needs a GPU.*'bf16' or 'no'"):
        check_mixed_precision("fp16", torch.device("cpu"))
    check_mixed_precision("bf16", torch.device("cpu"))
    check_mixed_precision("fp16", torch.device("cuda"))


def _lora_unet():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config()).train()
    inject_lora(unet, unet_lora_config("full", rank=4))
    mark_only_lora_as_trainable(unet)
    return unet


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_frozen_half_lora_float32(dtype):
    unet = _lora_unet()
    cast_for_training(unet, dtype)
    assert parameter_dtypes(unet) == {"trainable": ["torch.float32"], "frozen": [str(dtype)]}
    assert adapter_dtypes(unet) == ["torch.float32"]


def _fp16_step(unet, lora_in_fp32: bool):
    """One fp16 training step with the CPU grad scaler, as accelerate does on a GPU."""
    cast_for_training(unet, torch.float16)
    if not lora_in_fp32:
        unet.half()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    gen = torch.Generator().manual_seed(0)
    x, t, h = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=gen)
    with torch.autocast("cpu", dtype=torch.float16):
        pred = unet(x, t, h).sample
    loss = F.mse_loss(pred.float(), torch.randn(2, 4, 8, 8, generator=gen))
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    return params


def test_fp16_recipe_trains_float32_lora_without_unscale_error():
    params = _fp16_step(_lora_unet(), lora_in_fp32=True)
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        _fp16_step(_lora_unet(), lora_in_fp32=False)  # the mistake the recipe prevents


def test_training_metadata_keys_and_strings():
    meta = training_metadata(
        base_model="examples/tiny-sd-fashion", unet_preset="full", rank=8, alpha=8.0, conv_rank=4, conv_alpha=None,
        steps=600, epochs=150, resolution=32, num_train_images=32, train_data="examples/sks-bag",
        extra={"learning_rate": 1e-3, "snr_gamma": None}, kohya_extra={"ss_seed": 0, "ss_dataset_dirs": {"sks-bag": {"img_count": 32}}},
    )
    assert set(REQUIRED_KEYS) <= set(meta) and all(isinstance(v, str) for v in meta.values())
    assert meta["base_model"] == meta["ss_sd_model_name"] == "examples/tiny-sd-fashion"
    assert (meta["rank"], meta["alpha"], meta["conv_rank"], meta["conv_alpha"]) == ("8", "8", "4", "4")
    assert (meta["steps"], meta["ss_steps"], meta["resolution"], meta["ss_resolution"]) == ("600", "600", "32", "(32, 32)")
    assert meta["num_train_images"] == meta["ss_num_train_images"] == "32"
    assert meta["learning_rate"] == "0.001" and "snr_gamma" not in meta and "text_encoder_preset" not in meta
    assert meta["ss_dataset_dirs"] == '{"sks-bag": {"img_count": 32}}'
    assert not any(k.startswith("convlora_") or k in KOHYA_NETWORK_KEYS for k in meta)
    with pytest.raises(ValueError, match="ss_network_dim"):
        training_metadata("b", "attn", 4, 4, None, None, 1, 1, 32, 1, kohya_extra={"ss_network_dim": 4})
