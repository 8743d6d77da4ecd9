"""End-to-end on the tiny SDXL pipeline: the real training script through `accelerate launch`, its
files in diffusers' StableDiffusionXLPipeline, and aspect-ratio bucketing under DDP and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from train_script_helpers import REPO, check_ok, launch, script_args, summary

from convlora import load_lora, read_safetensors
from convlora.testing import relative_error

pytestmark = pytest.mark.slow

ENCODERS = ("text_encoder", "text_encoder_2")
BUCKETS = dict(enable_bucket=True, min_bucket_reso=16, max_bucket_reso=64, bucket_reso_steps=8)


def _sdxl(base: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _outputs(pipe) -> list[torch.Tensor]:
    """UNet noise prediction with SDXL's added conditions, and both encoders' penultimate states."""
    g = torch.Generator().manual_seed(123)
    latents, states = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    ids = pipe.tokenizer(["a photo of a sks ball", "a cat"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        out = [pipe.unet(latents, torch.tensor([20, 600]), states, added_cond_kwargs=added).sample]
        out += [getattr(pipe, name)(ids, output_hidden_states=True).hidden_states[-2] for name in ENCODERS]
    return out


def _lora_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(folder / "lora_convlora.safetensors")[0]


def test_sdxl_trains_unet_and_both_text_encoders_and_loads_in_diffusers(tiny_sdxl_base, toy_data, tmp_path):
    out = tmp_path / "run"
    output = check_ok(launch(script_args(
        tiny_sdxl_base, toy_data, out, train_batch_size=4, max_train_steps=12, learning_rate=3e-3, checkpointing_steps=12,
        train_text_encoder=True, text_encoder_2_preset="attn-mlp", text_encoder_2_lr=1e-3, lora_alpha=2,
        save_format=["diffusers", "kohya", "native"], validation_prompt=["a photo of a sks ball"], num_validation_images=1,
        validation_inference_steps=2, validation_guidance_scale=1.0,
    )))
    s = summary(out)
    assert s["family"] == "sdxl" and "StableDiffusionXLPipeline: LoRA on" in output
    losses = s["losses"]
    assert len(losses) == 12 and all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert (out / "validation" / "final.png").is_file()

    # the exact trained weights (checkpoint), in a fresh pipeline
    reference_pipe = _sdxl(tiny_sdxl_base)
    for name in ("unet", *ENCODERS):
        load_lora(getattr(reference_pipe, name), out / "checkpoint-12" / f"{name}_lora.safetensors")
    reference = _outputs(reference_pipe)
    base = _outputs(_sdxl(tiny_sdxl_base))
    assert all(relative_error(r, b) > 1e-3 for r, b in zip(reference, base))  # all three were trained

    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        pipe = _sdxl(tiny_sdxl_base)
        pipe.load_lora_weights(str(out / name))
        for got, want in zip(_outputs(pipe), reference):
            assert relative_error(got, want) < 1e-5, name

    tensors, header = read_safetensors(out / "lora_kohya.safetensors")
    prefixes = {k.split("_")[1] for k in tensors}
    assert prefixes == {"unet", "te1", "te2"} and header["ss_base_model_version"] == "sdxl_base_v1-0"
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_unet_output_blocks_2_2_conv.lora_up.weight" in tensors
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha" in tensors  # attn-mlp on the second encoder
    assert not any("lora_te1_text_model_encoder_layers_0_mlp" in k for k in tensors)  # attn on the first
    # the first encoder's last layer feeds nothing (SDXL takes its penultimate states): no LoRA there
    assert not any(k.startswith("lora_te1_text_model_encoder_layers_4_") for k in tensors)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_4_") for k in tensors)
    _, native = read_safetensors(out / "lora_convlora.safetensors")
    assert native["model_family"] == "sdxl" and native["text_encoder_2_lr"] == "0.001"


def test_sdxl_bf16_base_keeps_vae_and_lora_fp32_with_cached_bucket_latents(tiny_sdxl_base, mixed_aspect_data, tmp_path):
    config = tmp_path / "bf16.yaml"
    config.write_text((REPO / "accelerate_config.yaml").read_text().replace("mixed_precision: 'no'", "mixed_precision: bf16"))
    out = tmp_path / "bf16"
    check_ok(launch(script_args(tiny_sdxl_base, mixed_aspect_data, out, max_train_steps=3, cache_latents=True, center_crop=True,
                                validation_prompt=["a photo"], num_validation_images=1, validation_inference_steps=2,
                                train_text_encoder=True, **BUCKETS), config=config))
    s = summary(out)
    assert s["dtypes"]["vae"]["frozen"] == ["torch.float32"]  # SDXL's VAE overflows in half precision
    for name in ("unet", *ENCODERS):
        assert s["dtypes"][name] == {"frozen": ["torch.bfloat16"], "trainable": ["torch.float32"]}, name
    assert all(np.isfinite(s["losses"]))


def test_bucketed_sdxl_two_process_ddp_equals_one_process_double_batch(tiny_sdxl_base, mixed_aspect_data, tmp_path):
    common = dict(max_train_steps=6, learning_rate=5e-5, lr_scheduler="cosine", lr_warmup_steps=1, random_flip=True,
                  train_text_encoder=True, **BUCKETS)
    two = check_ok(launch(script_args(tiny_sdxl_base, mixed_aspect_data, tmp_path / "two", train_batch_size=1, **common), num_processes=2))
    check_ok(launch(script_args(tiny_sdxl_base, mixed_aspect_data, tmp_path / "one", train_batch_size=2, **common)))
    assert "MULTI_CPU" in two and "3 of 9 buckets used: 24x40: 3, 32x32: 2, 40x24: 3" in two
    a, b = _lora_tensors(tmp_path / "two"), _lora_tensors(tmp_path / "one")
    assert a.keys() == b.keys() and any(k.startswith("text_encoder_2.") for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    s_two, s_one = summary(tmp_path / "two"), summary(tmp_path / "one")
    assert np.allclose(s_two["losses"], s_one["losses"], atol=1e-5, rtol=0)


def test_bucketed_sd_resume_mid_epoch_equals_a_straight_run(tiny_base, mixed_aspect_data, tmp_path):
    # 8 images in buckets of 3, 3, 2 at batch 2: 2 + 2 + 1 = 5 steps per epoch; resuming at step 3
    # starts in the middle of epoch 0, and the run goes on into epoch 1.
    common = dict(train_batch_size=2, checkpointing_steps=3, random_flip=True, caption_dropout=0.2, lora_dropout=0.1, **BUCKETS)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    check_ok(launch(script_args(tiny_base, mixed_aspect_data, straight, max_train_steps=7, **common)))
    check_ok(launch(script_args(tiny_base, mixed_aspect_data, resumed, max_train_steps=3, **common)))
    output = check_ok(launch(script_args(tiny_base, mixed_aspect_data, resumed, max_train_steps=7,
                                         resume_from_checkpoint="latest", **common)))
    assert "checkpoint-3 at step 3" in output
    a, b = summary(straight), summary(resumed)
    assert a["losses"] == b["losses"] and len(a["losses"]) == 7
    ta, tb = _lora_tensors(straight), _lora_tensors(resumed)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
