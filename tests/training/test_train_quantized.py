"""The training script on a quantized frozen base: a real 2-process `accelerate launch` (DDP over gloo)
with --base_precision nf4, whose files load in diffusers' own loader like any other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_script_helpers import check_ok, launch, load_pipeline, script_args, summary, unet_out

from convlora.diffusion import load_pipeline_lora

pytestmark = pytest.mark.slow


def test_nf4_base_trains_under_ddp_and_its_files_load_in_diffusers(tiny_base, toy_data, tmp_path):
    out = tmp_path / "run"
    output = check_ok(launch(script_args(
        tiny_base, toy_data, out, base_precision="nf4", train_text_encoder=True, max_train_steps=4,
        learning_rate=3e-3, save_format=["diffusers", "native"],
    ), num_processes=2))
    assert "frozen base stored as nf4: unet " in output
    losses = summary(out)["losses"]
    assert len(losses) == 4 and all(np.isfinite(losses))
    # The adapter file is an ordinary one: diffusers loads it onto a full-precision base, and gives what
    # convlora's own loader gives.
    reference = load_pipeline(tiny_base)
    info = load_pipeline_lora(out / "lora_convlora.safetensors", unet=reference.unet, text_encoder=reference.text_encoder)
    assert info["unet"] and info["text_encoder"]
    expected = unet_out(reference.unet)
    assert not torch.allclose(expected, unet_out(load_pipeline(tiny_base).unet), atol=1e-4)  # the LoRA changed the UNet
    pipe = load_pipeline(tiny_base)
    pipe.load_lora_weights(str(out / "pytorch_lora_weights.safetensors"))
    assert torch.allclose(unet_out(pipe.unet), expected, atol=1e-5)
