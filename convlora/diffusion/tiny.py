"""A tiny, offline Stable-Diffusion-architecture pipeline built from configs.

Nothing is downloaded: the UNet, VAE and CLIP text encoder are built from the configs below
(randomly initialised, deterministically from a seed) and the tokenizer is the real-CLIP-vocabulary
1,000-token tokenizer shipped as package data (``convlora/diffusion/assets/clip_tokenizer``, see
:mod:`convlora.diffusion.build_tokenizer`).

Shapes (the same architecture as the pretrained base in ``examples/tiny-sd-fashion``)::

    image       (B, 3, 32, 32)    in [-1, 1]
    VAE         AutoencoderKL, block_out_channels (32, 64, 64), 1 layer per block, ~0.95M params
                (B, 3, 32, 32) -> latents (B, 4, 8, 8)   (4x downscale, vae_scale_factor 4)
    text        CLIPTokenizer, 1,000 tokens, model_max_length 77
                CLIPTextModel, hidden 32, 5 layers, 4 heads -> (B, 77, 32)
                (frozen at a random init; initializer_factor 10 so prompts differ clearly)
    UNet        UNet2DConditionModel, block_out_channels (32, 64), 2 layers per block,
                cross_attention_dim 32, sample_size 8, ~1.43M params
                (B, 4, 8, 8), t, (B, 77, 32) -> (B, 4, 8, 8)  (epsilon prediction)
    scheduler   DDPMScheduler, SD-1.x "scaled_linear" betas 0.00085..0.012, 1,000 steps

So ``pipe(prompt)`` gives 32x32 images by default (``unet.sample_size * vae_scale_factor``).
The UNet is exactly the tiny UNet of diffusers' own tests (with ``sample_size`` set for 8x8
latents); the VAE has one more block than diffusers' tiny test VAE, for the 4x downscale.

:func:`build_tiny_sdxl_pipeline` is the Stable-Diffusion-XL counterpart (a
``StableDiffusionXLPipeline``), with SDXL's structure at toy widths::

    text        the same tokenizer twice (tokenizer, tokenizer_2); encoders at CLIP's own init
                (initializer_factor 1)
                text_encoder   CLIPTextModel, hidden 32, 5 layers              -> penultimate (B, 77, 32)
                text_encoder_2 CLIPTextModelWithProjection, hidden 32, 5 layers -> penultimate (B, 77, 32)
                               + pooled projection text_embeds (B, 32)
    UNet        SDXL's block pattern: DownBlock2D, CrossAttnDownBlock2D x 2 (up: the mirror image),
                block_out_channels (32, 64, 64), transformer_layers_per_block (1, 1, 2) -- a depth that
                differs per block, as SDXL's (1, 2, 10) --, linear proj_in/out,
                addition_embed_type "text_time" (time ids (B, 6) embedded 8-wide + pooled text (B, 32)),
                cross_attention_dim 64 (= 32 + 32, the two encoders concatenated)
                (B, 4, 8, 8), t, (B, 77, 64), {"text_embeds": (B, 32), "time_ids": (B, 6)} -> (B, 4, 8, 8)
    VAE         as above, SDXL's scaling_factor 0.13025
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

__all__ = [
    "TINY_IMAGE_SIZE",
    "TINY_LATENT_SIZE",
    "tiny_unet_config",
    "tiny_vae_config",
    "tiny_text_encoder_config",
    "tiny_scheduler_config",
    "load_tiny_tokenizer",
    "build_tiny_pipeline",
    "save_tiny_pipeline",
    "tiny_sdxl_unet_config",
    "build_tiny_sdxl_pipeline",
    "save_tiny_sdxl_pipeline",
    "copy_tokenizer_vocab_files",
]

#: Default image side of the tiny pipeline, in pixels.
TINY_IMAGE_SIZE = 32
#: Latent side (``TINY_IMAGE_SIZE // 4``).
TINY_LATENT_SIZE = 8


def tiny_unet_config() -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs: (B, 4, 8, 8) latents, cross-attention dim 32."""
    return dict(
        sample_size=TINY_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )


def tiny_sdxl_unet_config() -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs with SDXL's structure at toy widths (see the module docstring).

    ``projection_class_embeddings_input_dim`` = 6 time ids x ``addition_time_embed_dim`` 8 + the
    32-wide pooled projection of ``text_encoder_2``.
    """
    return dict(
        sample_size=TINY_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )


def tiny_vae_config(scaling_factor: float = 0.18215) -> dict[str, Any]:
    """``AutoencoderKL`` kwargs: (B, 3, 32, 32) <-> (B, 4, 8, 8).

    ``scaling_factor`` multiplies latents before the UNet sees them; the pretrained base
    stores the value that gives its latents about unit standard deviation.
    """
    return dict(
        sample_size=TINY_IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=32,
        scaling_factor=scaling_factor,
    )


def tiny_text_encoder_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """``CLIPTextConfig`` for a 32-wide, 5-layer text encoder whose vocabulary and special ids
    match ``tokenizer``; outputs (B, 77, 32).

    The tiny base keeps this encoder frozen at its random initialisation, so the init decides how
    distinguishable prompts are: with CLIP's default ``initializer_factor=1`` the outputs of
    ``"a photo of a trouser"`` and ``"a photo of a sneaker"`` differ by ~0.1 RMS (on unit-scale
    hidden states) and a UNet learns the conditioning slowly; ``initializer_factor=10`` makes
    them differ by ~0.6 RMS and halves the steps the UNet needs to draw the prompted class.
    """
    return CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        projection_dim=32,
        num_attention_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=tokenizer.model_max_length,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="quick_gelu",
        initializer_factor=10.0,
    )


def tiny_scheduler_config() -> dict[str, Any]:
    """``DDPMScheduler`` kwargs: SD-1.x noise schedule, epsilon prediction (training and sampling)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


_TOKENIZER_RESOURCE = "diffusion/assets/clip_tokenizer"


def load_tiny_tokenizer() -> CLIPTokenizer:
    """The packaged 1,000-token real-CLIP-vocabulary tokenizer (bos 998, eos = pad = 999)."""
    resource = importlib.resources.files("convlora").joinpath(_TOKENIZER_RESOURCE)
    with importlib.resources.as_file(resource) as folder:
        return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def copy_tokenizer_vocab_files(tokenizer_dir: str | Path) -> None:
    """Copy the packaged ``vocab.json`` and ``merges.txt`` into a saved pipeline's ``tokenizer/``.

    transformers 5 saves only ``tokenizer.json``; transformers 4.x loads the ``CLIPTokenizer``
    named in ``model_index.json`` from ``vocab.json`` + ``merges.txt``, so keep both.
    """
    dest = Path(tokenizer_dir)
    folder = importlib.resources.files("convlora").joinpath(_TOKENIZER_RESOURCE)
    for name in ("vocab.json", "merges.txt"):
        (dest / name).write_bytes(folder.joinpath(name).read_bytes())


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Build the tiny SD pipeline with weights initialised deterministically from ``seed``.

    The global torch RNG state is left untouched. Same seed -> bit-identical parameters.
    No safety checker, no feature extractor. Modules are fp32, on the CPU, in eval mode.
    """
    tokenizer = load_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_unet_config())
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**tiny_vae_config())
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(tiny_text_encoder_config(tokenizer))
    scheduler = DDPMScheduler(**tiny_scheduler_config())
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """Build the tiny SDXL pipeline with weights initialised deterministically from ``seed``.

    As :func:`build_tiny_pipeline`: the global RNG is untouched, same seed -> bit-identical
    parameters, fp32 on the CPU in eval mode; no watermarker, no image encoder.
    """
    tokenizer = load_tiny_tokenizer()
    te_config = tiny_text_encoder_config(tokenizer)
    # CLIP's own init: SDXL conditions on the penultimate hidden states, which no final layer norm
    # rescales, and at initializer_factor 10 they reach ~240, where attention softmaxes are so
    # sharp that float32 rounding of a batch-1 vs batch-2 UNet call differs by 2% (at 1: 2.2, 1e-6).
    te_config.initializer_factor = 1.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_sdxl_unet_config())
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**tiny_vae_config(scaling_factor=0.13025))
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(te_config)
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(te_config)
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=load_tiny_tokenizer(),
        unet=unet.eval(),
        scheduler=DDPMScheduler(**tiny_scheduler_config()),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sdxl_pipeline(path: str | Path, seed: int = 0) -> Path:
    """:func:`save_tiny_pipeline` for :func:`build_tiny_sdxl_pipeline` (adds ``text_encoder_2/``,
    ``tokenizer_2/``; ``model_index.json`` names ``StableDiffusionXLPipeline``)."""
    out = Path(path)
    build_tiny_sdxl_pipeline(seed).save_pretrained(str(out), safe_serialization=True)
    copy_tokenizer_vocab_files(out / "tokenizer")
    copy_tokenizer_vocab_files(out / "tokenizer_2")
    return out


def save_tiny_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny pipeline for ``seed`` and save it to ``path`` in the standard diffusers layout
    (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``;
    weights as safetensors). Returns ``path`` as a Path."""
    out = Path(path)
    build_tiny_pipeline(seed).save_pretrained(str(out), safe_serialization=True)
    copy_tokenizer_vocab_files(out / "tokenizer")
    return out
