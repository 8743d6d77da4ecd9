"""The low-memory training options of the training script, each checked against the run without it:
gradient checkpointing (LoRA gradients equal and non-zero), 8-bit AdamW (its state checkpointed
without pickle and resumed exactly), and cached text embeddings (same losses and weights, the
encoders never run in the loop and are freed)."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from train_script_helpers import script_args
from transformers import CLIPTextModel

from convlora import adapter_parameters, inject_lora, mark_only_lora_as_trainable, read_safetensors
from convlora.diffusion import text_encoder_lora_config, unet_lora_config
from convlora.diffusion.tiny import load_tiny_tokenizer, tiny_sdxl_unet_config, tiny_text_encoder_config, tiny_unet_config
from convlora.testing import randomize_lora_
from convlora.training.checkpoints import read_state, write_state


@pytest.fixture
def one_thread():
    """One torch thread (as ``accelerate launch`` gives each process): tiny ops on shared cores only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- gradient checkpointing ---------------------------------------------------------------------


def _with_lora(model: torch.nn.Module, config) -> torch.nn.Module:
    """``model`` frozen, LoRA injected (random non-zero A and B, so both get gradients), train mode."""
    model.requires_grad_(False)
    inject_lora(model, config)
    mark_only_lora_as_trainable(model)
    randomize_lora_(model, seed=1, std=0.05)
    return model.train()


def _unet_inputs(unet: UNet2DConditionModel) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    config = unet.config
    args = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 7, config.cross_attention_dim, generator=g))
    kwargs = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g),
                                       "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    return args, kwargs


def _lora_grads(model: torch.nn.Module, loss_of) -> dict[str, torch.Tensor]:
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(0)
    loss_of(model).backward()
    return {name: p.grad.clone() if p.grad is not None else None for name, p in adapter_parameters(model).items()}


def _check_same_nonzero_grads(plain: dict, checkpointed: dict) -> None:
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    missing = [name for name, g in checkpointed.items() if g is None or not bool(g.abs().max() > 0)]
    assert not missing, f"{len(missing)} LoRA tensors got no gradient under checkpointing, e.g. {missing[:3]}"
    assert all(plain[name] is not None and bool(plain[name].abs().max() > 0) for name in plain)
    # the same ops recomputed: equal to float32 rounding of the backward's summation order
    worst = max(float((plain[n] - checkpointed[n]).abs().max() / plain[n].abs().max()) for n in plain)
    assert worst < 1e-5, worst


@pytest.mark.parametrize("unet_config", [tiny_unet_config, tiny_sdxl_unet_config], ids=["sd", "sdxl"])
def test_gradient_checkpointing_gives_the_unet_lora_its_gradients(script, one_thread, unet_config):
    torch.manual_seed(0)
    unet = _with_lora(UNet2DConditionModel(**unet_config()), unet_lora_config("full", rank=4))
    args, kwargs = _unet_inputs(unet)

    def loss(model):
        return model(*args, **kwargs).sample.square().mean()

    plain = _lora_grads(unet, loss)
    script.enable_gradient_checkpointing([unet])
    checkpointed_blocks = [m for m in unet.modules() if getattr(m, "gradient_checkpointing", False)]
    assert len(checkpointed_blocks) >= 4  # the down, mid and up blocks
    _check_same_nonzero_grads(plain, _lora_grads(unet, loss))


def test_gradient_checkpointing_gives_the_text_encoder_lora_its_gradients(script, one_thread):
    tokenizer = load_tiny_tokenizer()
    torch.manual_seed(0)
    encoder = _with_lora(CLIPTextModel(tiny_text_encoder_config(tokenizer)), text_encoder_lora_config("attn-mlp", rank=4))
    ids = tokenizer(["a photo of a sks ball", "a cat"], padding="max_length", return_tensors="pt").input_ids

    def loss(model):
        return model(ids).last_hidden_state.square().mean()

    plain = _lora_grads(encoder, loss)
    script.enable_gradient_checkpointing([encoder])
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in encoder.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(layers) == encoder.config.num_hidden_layers and all(m.gradient_checkpointing for m in layers)
    _check_same_nonzero_grads(plain, _lora_grads(encoder, loss))
