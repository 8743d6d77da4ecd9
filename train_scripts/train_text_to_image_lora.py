#!/usr/bin/env python
"""Train a LoRA (attention + conv) for a Stable Diffusion 1.x/2.x or SDXL pipeline with accelerate.

    accelerate launch --config_file accelerate_config.yaml train_scripts/train_text_to_image_lora.py \\
        --pretrained_model_name_or_path PIPELINE_DIR_OR_HUB_ID --train_data_dir IMAGES_DIR \\
        --resolution 512 --train_batch_size 4 --max_train_steps 2000 --rank 16 --unet_preset full \\
        --output_dir out/my-lora --checkpointing_steps 500 --validation_prompt "a photo of sks dog"

With no arguments it trains on the embedded default: the tiny pretrained base in
``examples/tiny-sd-fashion`` and the captioned set in ``examples/sks-bag`` (while those are absent:
a tiny pipeline built from configs and a generated image set), and writes a before/after grid.

Argument names follow diffusers' ``examples/text_to_image/train_text_to_image_lora.py``; every
``help=`` below is the documentation. What differs from that script, and why:

* LoRA goes into convolutions too (``--unet_preset full``, ``--conv_rank``), via convlora.
* One script for both families: an SDXL pipeline (its ``model_index.json``, or a UNet with
  ``addition_embed_type == "text_time"``) is conditioned on both text encoders and on each image's
  own size and crop (``convlora.diffusion.families``), and ``--train_text_encoder`` trains both.
* Aspect-ratio bucketing (``--enable_bucket``, kohya's semantics), deterministic like the rest.
* The choice of precision is read from ``accelerator.mixed_precision`` (so the accelerate config
  alone can set it); the frozen weights are cast to it, the LoRA weights stay float32.
* Every random draw of a sample (crop, flip, caption dropout, noise, timestep) is seeded by
  ``(seed, epoch, dataset index)``: N processes give the same weights as one process with an
  N-times larger batch, and a resumed run equals a straight one (weights, optimizer, LR, losses).
* Checkpoints are written to a temporary folder and renamed when complete, rotated by step number,
  and hold no pickles; a resume path that does not exist, a checkpoint missing a file, or one made
  with other LoRA settings is an error.
* Arguments, the output folder and the resolution are checked before any work; a failure the
  script can name prints one line (``error: ...``) and exits with 1 (2 for an argument).
* The distributed type that runs is logged, and a config asking for one the run does not get
  (FSDP that accelerate does not set up, FSDP1, DeepSpeed) is refused; FSDP2 on CPU processes, which
  accelerate runs as plain DDP, is sharded by ``convlora.training.distributed`` with ``fully_shard``.
* A step whose loss is NaN/inf is skipped and reported; several in a row stop the run; no file with
  non-finite tensors is ever written.

The steps of ``main()``: 1 setup, 2 models, 3 data, 4 optimizer, prepare and resume, 5 train loop,
6 save.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, broadcast_object_list
from PIL import Image, ImageDraw
from safetensors import SafetensorError
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from convlora import (  # noqa: E402
    adapter_parameters,
    disable_lora,
    inject_lora,
    load_lora,
    lora_scale,
    mark_only_lora_as_trainable,
    save_lora,
)
from convlora.diffusion import save_pipeline_lora, text_encoder_lora_config, unet_lora_config  # noqa: E402
from convlora.diffusion.families import Family, detect_family, family_from_configs  # noqa: E402
from convlora.training.buckets import BucketBatchSampler, bucket_resolutions, check_bucket_args, select_bucket  # noqa: E402
from convlora.training.checkpoints import (  # noqa: E402
    CheckpointError,
    check_adapter_unchanged,
    check_settings,
    list_checkpoints,
    read_state,
    remove_interrupted_saves,
    resolve_resume_checkpoint,
    save_checkpoint,
    write_json,
    write_state,
)
from convlora.training.data import (  # noqa: E402
    EpochShuffleSampler,
    ListSource,
    TextImageDataset,
    cache_latents,
    collate,
    epoch_loader,
    image_size,
    load_hf_source,
    read_image_folder,
    sample_seed,
    write_toy_dataset,
)
from convlora.training.distributed import (  # noqa: E402
    check_parallelism,
    frozen_local_share,
    full_tensors,
    prepare_sharding,
    requested_parallelism,
)
from convlora.training.metadata import training_metadata  # noqa: E402
from convlora.training.noise import PREDICTION_TYPES, diffusion_loss, draw_step_noise, training_target  # noqa: E402
from convlora.training.precision import (  # noqa: E402
    BASE_PRECISIONS,
    adapter_dtypes,
    base_storage_mode,
    cast_for_training,
    check_mixed_precision,
    parameter_dtypes,
    store_frozen_base,
    weight_dtype_for,
)
from convlora.training.preflight import check_output_dir, check_resolution  # noqa: E402

logger = get_logger(__name__, log_level="INFO")

EMBEDDED_BASE = REPO / "examples" / "tiny-sd-fashion"
EMBEDDED_DATA = REPO / "examples" / "sks-bag"
EMBEDDED_CONCEPT = "a photo of a sks bag"
#: The no-argument run: the new concept plus two classes the base already knows (to show drift).
EMBEDDED_PROMPTS = [EMBEDDED_CONCEPT, "a photo of a trouser", "a photo of a sneaker"]
EMBEDDED_SCORE_CLASSES = ["bag", "trouser", "sneaker"]

#: Defaults that depend on the run: (with your own model/data, with the embedded default).
MODE_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "resolution": (512, 32),
    "train_batch_size": (16, 8),
    "num_train_epochs": (100, 100),
    "max_train_steps": (None, 600),
    "learning_rate": (1e-4, 1e-3),
    "lr_scheduler": ("constant", "cosine"),
    "lr_warmup_steps": (500, 20),
    "rank": (4, 8),
    "center_crop": (False, True),
    "random_flip": (False, True),
    "validation_epochs": (1, 1000),
    "num_validation_images": (4, 16),
    "validation_guidance_scale": (7.5, 4.0),
    "validation_inference_steps": (30, 50),
    "checkpointing_steps": (500, 1000),
    "seed": (None, 0),
    "output_dir": ("out/text-to-image-lora", "out/sks-bag-lora"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: ...)" only where the help does not already say it and there is a value."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """An argument error is one line (``--help`` shows the usage), not the usage of 60 options."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def default(name: str) -> str:
        own, embedded = MODE_DEFAULTS[name]
        return f"(default: {own}; {embedded} for the embedded no-argument run)"

    p = ArgumentParser(
        description="Train a text-to-image LoRA (attention + conv) with accelerate. No arguments: the embedded demo.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="SD-1.x/2.x or SDXL pipeline folder (unet/, vae/, text_encoder/[, text_encoder_2/], tokenizer/, "
                        "scheduler/) or hub id. "
                        "Omitted: the embedded tiny base in examples/tiny-sd-fashion.")
    g.add_argument("--revision", type=str, default=None, help="Revision of a hub model.")
    g.add_argument("--variant", type=str, default=None, help="Weight file variant of the pipeline, e.g. 'fp16'.")
    g.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                   help="A VAE folder or hub id to use instead of the pipeline's (e.g. an SDXL VAE fixed for fp16). "
                        "Without it an SDXL VAE stays float32 under fp16/bf16, where it would overflow.")
    g.add_argument("--prediction_type", type=str, default=None, choices=PREDICTION_TYPES,
                   help="What the UNet learns to predict. Omitted: the scheduler config's prediction_type.")

    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=None, help="Rank of the LoRA updates " + default("rank"))
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha; the update is scaled by alpha/rank. Omitted: alpha = rank.")
    g.add_argument("--unet_preset", type=str, default="full", choices=["attn", "attn-ff", "full"],
                   help="UNet layers that get LoRA: 'attn' = to_q/k/v/out (diffusers' set), 'attn-ff' = + proj_in/out "
                        "and feed-forward (kohya's LoRA), 'full' = + resnet and resampler convs (kohya's LoCon).")
    g.add_argument("--conv_rank", type=int, default=None, help="Rank of the 3x3 convs ('full' preset; kohya's conv_dim). Omitted: --rank.")
    g.add_argument("--conv_alpha", type=float, default=None, help="Alpha of the 3x3 convs. Omitted: --conv_rank.")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA branch input while training.")
    g.add_argument("--train_text_encoder", action="store_true",
                   help="Also train a LoRA on the text encoder (SDXL: on both text encoders).")
    g.add_argument("--text_encoder_preset", type=str, default="attn", choices=["attn", "attn-mlp"],
                   help="Text-encoder layers that get LoRA (with --train_text_encoder).")
    g.add_argument("--text_encoder_lr", type=float, default=None, help="Learning rate of the text-encoder LoRA. Omitted: --learning_rate.")
    g.add_argument("--text_encoder_2_preset", type=str, default=None, choices=["attn", "attn-mlp"],
                   help="SDXL: the preset of the second text encoder. Omitted: --text_encoder_preset.")
    g.add_argument("--text_encoder_2_lr", type=float, default=None,
                   help="SDXL: learning rate of the second text encoder's LoRA. Omitted: --text_encoder_lr.")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", type=str, default=None,
                   help="A `datasets` dataset: hub name, local dataset folder, or a save_to_disk folder.")
    g.add_argument("--dataset_config_name", type=str, default=None, help="The config of the dataset, if it has several.")
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="A folder of images with captions in metadata.jsonl (file_name + caption column) or in "
                        ".txt/.caption files beside each image. Omitted (and no --dataset_name): examples/sks-bag.")
    g.add_argument("--image_column", type=str, default="image", help="Image column of a --dataset_name dataset.")
    g.add_argument("--caption_column", type=str, default="text", help="Caption column (dataset) or key (metadata.jsonl).")
    g.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N samples (for quick runs).")
    g.add_argument("--resolution", type=int, default=None, help="Training image side in pixels " + default("resolution"))
    g.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=None,
                   help="Crop the centre after resizing the shorter side; otherwise a random crop " + default("center_crop"))
    g.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=None,
                   help="Mirror half of the samples horizontally " + default("random_flip"))
    g.add_argument("--caption_dropout", type=float, default=0.0,
                   help="Probability of training a sample with the empty caption (kohya's caption_dropout_rate).")
    g.add_argument("--cache_latents", action="store_true",
                   help="Encode every image with the VAE once before training (needs --center_crop, or images whose "
                        "resize fills their square or bucket exactly).")
    g.add_argument("--enable_bucket", action="store_true",
                   help="Aspect-ratio bucketing (kohya's): each image is resized and cropped into the bucket of about "
                        "--resolution^2 pixels nearest its aspect ratio; every batch comes from one bucket.")
    g.add_argument("--min_bucket_reso", type=int, default=256, help="Smallest bucket side in pixels (with --enable_bucket).")
    g.add_argument("--max_bucket_reso", type=int, default=1024, help="Largest bucket side in pixels (with --enable_bucket).")
    g.add_argument("--bucket_reso_steps", type=int, default=64,
                   help="Bucket sides are multiples of this (with --enable_bucket; 64 as kohya, at least the VAE factor x 8 "
                        "for real SD/SDXL).")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses (0: in the main process).")
    g.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are stored.")

    g = p.add_argument_group("training")
    g.add_argument("--train_batch_size", type=int, default=None, help="Batch size per process " + default("train_batch_size"))
    g.add_argument("--num_train_epochs", type=int, default=None, help="Epochs, unless --max_train_steps is set " + default("num_train_epochs"))
    g.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs " + default("max_train_steps"))
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches accumulated per optimizer step.")
    g.add_argument("--gradient_checkpointing", action="store_true", help="Recompute activations in backward (less memory, slower).")
    g.add_argument("--learning_rate", type=float, default=None, help="Learning rate after warmup " + default("learning_rate"))
    g.add_argument("--scale_lr", action="store_true", help="Multiply the learning rate by processes x batch size x accumulation.")
    g.add_argument("--lr_scheduler", type=str, default=None,
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
                   help="Learning-rate schedule " + default("lr_scheduler"))
    g.add_argument("--lr_warmup_steps", type=int, default=None, help="Warmup optimizer steps " + default("lr_warmup_steps"))
    g.add_argument("--lr_num_cycles", type=int, default=1, help="Cycles of cosine_with_restarts.")
    g.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    g.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR loss weighting gamma (5.0 recommended); omitted: plain MSE.")
    g.add_argument("--noise_offset", type=float, default=0.0, help="Scale of the per-channel noise offset (0.05-0.1 typical).")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="Adam beta1.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="Adam beta2.")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="Adam epsilon.")
    g.add_argument("--use_8bit_adam", action="store_true", help="8-bit AdamW from bitsandbytes (must be installed; GPU only).")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Clip the gradient norm to this value.")
    g.add_argument("--max_consecutive_nonfinite_steps", type=int, default=5,
                   help="Stop the run after this many optimizer steps in a row with a NaN/inf loss (each is skipped).")
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                   help="Overrides the accelerate config. The frozen weights are stored in this dtype, LoRA stays fp32. "
                        "fp16 needs a GPU.")
    g.add_argument("--base_precision", type=str, default=None, choices=list(BASE_PRECISIONS),
                   help="Storage of the frozen UNet and text-encoder Linear/Conv weights (convs included): nf4 "
                        "(bitsandbytes NF4, double-quantized, as QLoRA), int8 / fp8 (per-output-channel scales), or "
                        "bf16 / fp16 / fp32; dequantized per layer into the compute dtype (--mixed_precision). "
                        "Default: the mixed-precision dtype. Saved LoRA files are the same whatever the base.")
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    g.add_argument("--seed", type=int, default=None, help="Seed of every random choice " + default("seed") + "; omitted: drawn and recorded.")

    g = p.add_argument_group("checkpoints and outputs")
    g.add_argument("--output_dir", type=str, default=None, help="Where everything is written " + default("output_dir"))
    g.add_argument("--output_name", type=str, default="lora", help="File name stem of the kohya and native LoRA files.")
    g.add_argument("--save_format", type=str, nargs="+", default=["diffusers", "kohya"], choices=["diffusers", "kohya", "native"],
                   help="LoRA file format(s): diffusers (pytorch_lora_weights.safetensors, for load_lora_weights), "
                        "kohya (AUTOMATIC1111 / ComfyUI), native (convlora.diffusion.load_pipeline_lora).")
    g.add_argument("--checkpointing_steps", type=int, default=None,
                   help="Save a resumable checkpoint every N optimizer steps " + default("checkpointing_steps"))
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints (oldest by step deleted).")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="A checkpoint folder (or bare checkpoint-N in --output_dir) to continue from, or 'latest' "
                        "(the newest complete one; a fresh start if there is none). A missing path is an error.")
    g.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard folder, inside --output_dir.")
    g.add_argument("--report_to", type=str, default="tensorboard", help="'tensorboard', 'wandb', 'all' or 'none'.")

    g = p.add_argument_group("validation")
    g.add_argument("--validation_prompt", type=str, nargs="+", default=None,
                   help="Prompt(s) sampled at validation, base vs LoRA side by side. Embedded run: the new concept and two known classes.")
    g.add_argument("--num_validation_images", type=int, default=None, help="Images per prompt " + default("num_validation_images"))
    g.add_argument("--validation_epochs", type=int, default=None, help="Validate every N epochs " + default("validation_epochs"))
    g.add_argument("--validation_steps", type=int, default=None, help="Validate every N optimizer steps (instead of epochs).")
    g.add_argument("--validation_inference_steps", type=int, default=None,
                   help="Denoising steps per validation image " + default("validation_inference_steps"))
    g.add_argument("--validation_guidance_scale", type=float, default=None,
                   help="Classifier-free guidance scale at validation " + default("validation_guidance_scale"))
    g.add_argument("--validation_lora_scale", type=float, default=1.0,
                   help="LoRA strength of the validation samples (0 = the base, 1 = as trained); the saved files do not change.")
    g.add_argument("--validation_score_classes", type=str, nargs="+", default=None,
                   help="One Fashion-MNIST class per --validation_prompt ('-' to skip): report the share of its images the "
                        "classifier in examples/tiny-sd-fashion/classifier recognises as that class, base vs LoRA.")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)

    args = p.parse_args(argv)
    args.embedded = args.pretrained_model_name_or_path is None
    if not args.embedded and args.train_data_dir is None and args.dataset_name is None:
        p.error("with --pretrained_model_name_or_path, give the data too: --train_data_dir or --dataset_name")
    mode = 1 if args.embedded else 0
    for name, values in MODE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, values[mode])
    if args.embedded and args.validation_prompt is None:
        args.validation_prompt = list(EMBEDDED_PROMPTS)
        if args.validation_score_classes is None and (EMBEDDED_BASE / "classifier" / "model.safetensors").is_file():
            args.validation_score_classes = list(EMBEDDED_SCORE_CLASSES)
    if args.validation_score_classes is not None and len(args.validation_score_classes) != len(args.validation_prompt or []):
        p.error("--validation_score_classes needs one class (or '-') per --validation_prompt")
    problem = argument_problem(args)
    if problem:
        p.error(problem)
    return args


#: What each numeric argument must be, checked before any work (an argument left at None is not
#: checked; NaN and infinity fail every rule).
ARGUMENT_RULES: dict[str, tuple[Callable[[float], bool], tuple[str, ...]]] = {
    ">= 1": (lambda v: v >= 1, (
        "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "resolution", "rank", "conv_rank",
        "max_train_steps", "num_train_epochs", "checkpoints_total_limit", "max_train_samples", "lr_num_cycles",
        "max_consecutive_nonfinite_steps", "validation_steps", "validation_epochs", "num_validation_images",
        "validation_inference_steps")),
    ">= 0": (lambda v: 0 <= v < math.inf, (
        "lr_warmup_steps", "dataloader_num_workers", "noise_offset", "max_grad_norm", "adam_weight_decay",
        "validation_guidance_scale")),
    "> 0": (lambda v: 0 < v < math.inf, (
        "learning_rate", "text_encoder_lr", "text_encoder_2_lr", "lora_alpha", "conv_alpha", "snr_gamma", "adam_epsilon", "lr_power")),
    "in [0, 1)": (lambda v: 0 <= v < 1, ("lora_dropout", "adam_beta1", "adam_beta2")),
    "in [0, 1]": (lambda v: 0 <= v <= 1, ("caption_dropout",)),
    "finite": (math.isfinite, ("validation_lora_scale",)),
}


def argument_problem(args: argparse.Namespace) -> str | None:
    """The first argument that breaks its rule (:data:`ARGUMENT_RULES`), or a LoRA setting the presets
    refuse, as a message naming the flag; None when all are valid."""
    for rule, (holds, names) in ARGUMENT_RULES.items():
        for name in names:
            value = getattr(args, name)
            if value is not None and not holds(value):
                return f"--{name} must be {rule}, got {value}"
    try:
        unet_lora_config(args.unet_preset, rank=args.rank, alpha=args.lora_alpha, conv_rank=args.conv_rank,
                         conv_alpha=args.conv_alpha, dropout=args.lora_dropout)
    except ValueError as err:
        return f"--unet_preset {args.unet_preset}: {err}"
    if args.enable_bucket:
        try:
            check_bucket_args(args.resolution, args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps)
        except ValueError as err:
            return str(err)
    return None


def adapter_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that shape the adapter, defaults resolved (an omitted --lora_alpha is --rank): what a
    checkpoint records and a run resuming it must repeat, so the file header and its modules agree."""
    config = unet_lora_config(args.unet_preset, rank=args.rank, alpha=args.lora_alpha, conv_rank=args.conv_rank,
                              conv_alpha=args.conv_alpha)
    rank, alpha = config.rank_and_alpha("linear", is_spatial_conv=False)
    settings = {"--unet_preset": args.unet_preset, "--rank": rank, "--lora_alpha": alpha,
                "--train_text_encoder": bool(args.train_text_encoder)}
    if args.base_precision is not None:  # the base the adapter's gradients were taken on
        settings["--base_precision"] = args.base_precision
    if args.unet_preset == "full":
        settings["--conv_rank"], settings["--conv_alpha"] = config.rank_and_alpha("conv", is_spatial_conv=True)
    if args.train_text_encoder:
        settings["--text_encoder_preset"] = args.text_encoder_preset
        if args.text_encoder_2_preset is not None:  # SDXL's second encoder, when it has its own
            settings["--text_encoder_2_preset"] = args.text_encoder_2_preset
    return settings


@dataclass
class Models:
    """The pipeline's parts, as step 2 leaves them."""

    family: Family
    noise_scheduler: DDPMScheduler
    tokenizers: dict[str, CLIPTokenizer]
    text_encoders: dict[str, torch.nn.Module]
    """Every text encoder of the family by pipeline name (``text_encoder``, ``text_encoder_2``)."""
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    weight_dtype: torch.dtype
    prediction_type: str
    trained_encoders: tuple[str, ...]
    """The text encoders that carry LoRA (all of them with --train_text_encoder, else none)."""


@dataclass
class Run:
    """What steps 4-6 share: the prepared models, optimizer and loader, and the progress so far."""

    unet: torch.nn.Module
    text_encoders: dict[str, torch.nn.Module]
    """As in :class:`Models`, the trained ones replaced by their prepared (DDP-wrapped) versions."""
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    dataloader: Any
    params: list[torch.nn.Parameter]
    steps_per_epoch: int
    total_batch: int
    parallel: Any
    """What :func:`convlora.training.distributed.check_parallelism` found (DDP, FSDP2 sharding, ...)."""
    progress: dict = field(default_factory=dict)
    first_epoch: int = 0
    batches_to_skip: int = 0
    epoch: int = 0
    consecutive_nonfinite: int = 0
    checkpoints: list[Path] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    base_rows: list | None = None
    scores: dict = field(default_factory=dict)

    @property
    def global_step(self) -> int:
        return self.progress["global_step"]

    def trained_models(self, models: Models) -> list[torch.nn.Module]:
        """The prepared models that carry LoRA: the UNet, then the trained text encoders."""
        return [self.unet] + [self.text_encoders[name] for name in models.trained_encoders]


# ==== 1. setup ===================================================================================


def setup(args: argparse.Namespace) -> tuple[Accelerator, Path | None]:
    """Accelerator, logging, embedded-default assets, the checkpoint to resume from, and the seed."""
    check_output_dir(args.output_dir)  # in every process, before any of them waits for another
    logging_dir = Path(args.output_dir, args.logging_dir)
    # `accelerate launch --multi_gpu --num_processes N` on a machine without a GPU starts N processes
    # that would each train alone unless told to meet on the CPU (gloo): tell them.
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    on_cpu = launched > 1 and not torch.accelerator.is_available()
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,  # None: the accelerate config / launcher decides
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(logging_dir)),
        cpu=on_cpu,
    )
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"{launched} processes were launched but accelerate set up {accelerator.num_processes}; they would "
            "train separately. Check the accelerate config's distributed_type / use_cpu."
        )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    quiet = logging.ERROR if not accelerator.is_local_main_process else logging.WARNING
    transformers.utils.logging.set_verbosity(quiet)
    diffusers.utils.logging.set_verbosity(quiet)
    check_mixed_precision(accelerator.mixed_precision, accelerator.device)
    check_base_precision(args, accelerator)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    if accelerator.is_main_process:
        for path in remove_interrupted_saves(args.output_dir):  # no save is running yet
            logger.info(f"removed {path.name}, left by an interrupted save")
    if args.embedded:
        with accelerator.main_process_first():
            prepare_embedded_default(args, accelerator.is_main_process)
    check_resolution_fits(args)

    # Resolve the checkpoint now: a missing path must fail before minutes of model loading.
    resume_dir = None
    if args.resume_from_checkpoint:
        resume_dir = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir, required=CHECKPOINT_FILES)
        if resume_dir is None:
            accelerator.print(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir} yet, starting from step 0")
        else:
            check_resume_fits(args, resume_dir)
    if args.seed is None:  # every process must use the same seed: draw it once, broadcast it
        drawn = [random.SystemRandom().randrange(2**31)]
        broadcast_object_list(drawn, from_process=0)
        args.seed = int(drawn[0])
    return accelerator, resume_dir


def check_base_precision(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Refuse a --base_precision that cannot run here before any model is loaded: fp32 under half-precision
    compute, or a quantized base under FSDP2 (sharding splits tensors along dim 0, which NF4's packed
    blocks and the per-channel scales do not follow)."""
    mode = base_storage_mode(args.base_precision, weight_dtype_for(accelerator.mixed_precision))
    if mode in ("nf4", "int8", "fp8") and requested_parallelism() == "FSDP2":
        raise ValueError(f"--base_precision {mode} with FSDP2: a quantized base is not sharded; use DDP (MULTI_CPU / MULTI_GPU)")


def check_resolution_fits(args: argparse.Namespace) -> None:
    """Refuse a --resolution the VAE and UNet cannot divide (read from their configs; no weights loaded)."""
    path, common = args.pretrained_model_name_or_path, {"revision": args.revision, "cache_dir": args.cache_dir}
    vae_config = AutoencoderKL.load_config(path, subfolder="vae", **common)
    unet_config = UNet2DConditionModel.load_config(path, subfolder="unet", **common)
    check_resolution(args.resolution, vae_config, unet_config)


def check_resume_fits(args: argparse.Namespace, resume_dir: Path) -> None:
    """A resumed run repeats the checkpoint's adapter settings and seed (taken from it when omitted),
    and does not stop before the checkpoint's step."""
    check_settings(resume_dir, adapter_settings(args))
    progress = read_state(resume_dir, "progress")
    if args.seed is not None and args.seed != progress["seed"]:
        raise CheckpointError(f"{resume_dir} was trained with --seed {progress['seed']}, not {args.seed}")
    args.seed = progress["seed"]
    if args.max_train_steps is not None and progress["global_step"] > args.max_train_steps:
        raise CheckpointError(f"{resume_dir} is at step {progress['global_step']}, past --max_train_steps {args.max_train_steps}")


def prepare_embedded_default(args: argparse.Namespace, is_main: bool) -> None:
    """Point the run at the shipped tiny base + data, or (while absent) build stand-ins in the output folder."""
    if (EMBEDDED_BASE / "model_index.json").is_file():
        args.pretrained_model_name_or_path = str(EMBEDDED_BASE)
    else:
        from convlora.diffusion.tiny import save_tiny_pipeline

        stand_in = Path(args.output_dir) / "embedded-stand-in" / "tiny-sd"
        if is_main and not (stand_in / "model_index.json").is_file():
            save_tiny_pipeline(stand_in, seed=0)
        args.pretrained_model_name_or_path = str(stand_in)
        logger.warning(f"{EMBEDDED_BASE} not found: using an untrained tiny pipeline built from configs ({stand_in})")
    if args.train_data_dir is None and args.dataset_name is None:
        if (EMBEDDED_DATA / "metadata.jsonl").is_file():
            args.train_data_dir = str(EMBEDDED_DATA)
        else:
            stand_in = Path(args.output_dir) / "embedded-stand-in" / "images"
            if is_main and not (stand_in / "metadata.jsonl").is_file():
                write_toy_dataset(stand_in, n=32, size=args.resolution, caption=EMBEDDED_CONCEPT)
            args.train_data_dir = str(stand_in)
            logger.warning(f"{EMBEDDED_DATA} not found: using {stand_in} (generated discs captioned {EMBEDDED_CONCEPT!r})")

# ==== 2. models ==================================================================================


def load_models(args: argparse.Namespace, accelerator: Accelerator) -> Models:
    """Load the pipeline parts of its family, freeze them, add LoRA, and cast: frozen weights to the
    mixed-precision dtype (the VAE of SDXL stays float32), LoRA parameters to float32."""
    path, common = args.pretrained_model_name_or_path, {"revision": args.revision, "cache_dir": args.cache_dir}
    family = pipeline_family(args)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **common)
    weights = {**common, "variant": args.variant, "torch_dtype": torch.float32}
    tokenizers = {name: CLIPTokenizer.from_pretrained(path, subfolder=name, **common) for name in family.tokenizers}
    text_encoders = {
        name: getattr(transformers, cls).from_pretrained(path, subfolder=name, **weights)
        for name, cls in zip(family.text_encoders, family.text_encoder_classes)
    }
    if args.pretrained_vae_model_name_or_path:
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, **weights)
    else:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **weights)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights)
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    for model in (unet, vae, *text_encoders.values()):
        model.requires_grad_(False)
        model.eval()
    trained = family.text_encoders if args.train_text_encoder else ()
    adapted = add_lora(args, family, unet, {name: text_encoders[name] for name in trained})

    # Frozen weights in the accelerator's dtype (read from accelerate: the config file may set it),
    # LoRA parameters in float32, so the optimizer and the fp16 grad scaler work on float32.
    weight_dtype = weight_dtype_for(accelerator.mixed_precision)
    vae_dtype = torch.float32 if family.vae_needs_fp32 and not args.pretrained_vae_model_name_or_path else weight_dtype
    cast_for_training(vae, vae_dtype, accelerator.device)
    for model in (unet, *text_encoders.values()):
        cast_for_training(model, weight_dtype, accelerator.device)
    storage = base_storage_mode(args.base_precision, weight_dtype)
    if storage is not None:
        stored = store_frozen_base({"unet": unet, **text_encoders}, storage, weight_dtype)
        logger.info(f"frozen base stored as {storage}: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in stored.items()))
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for name in trained:
            text_encoders[name].gradient_checkpointing_enable()
    n_lora = sum(p.numel() for model in (unet, *(text_encoders[name] for name in trained))
                 for p in adapter_parameters(model).values())
    logger.info(f"{family.pipeline_class_name}: LoRA on {len(adapted)} modules ({args.unet_preset} preset"
                f"{', text encoders ' + ' + '.join(trained) if trained else ''}), {n_lora:,} trainable parameters; "
                f"frozen weights {weight_dtype} (VAE {vae_dtype}), LoRA {adapter_dtypes(unet)}")
    return Models(family, noise_scheduler, tokenizers, text_encoders, vae, unet, weight_dtype,
                  noise_scheduler.config.prediction_type, tuple(trained))


def pipeline_family(args: argparse.Namespace) -> Family:
    """SD or SDXL, from the pipeline's model_index.json / unet config (a local folder or the hub)."""
    path = Path(args.pretrained_model_name_or_path)
    if path.is_dir():
        return detect_family(path)
    common = {"revision": args.revision, "cache_dir": args.cache_dir}
    return family_from_configs(None, UNet2DConditionModel.load_config(str(path), subfolder="unet", **common))


def add_lora(args: argparse.Namespace, family: Family, unet: torch.nn.Module, text_encoders: dict[str, torch.nn.Module]) -> list[str]:
    """Inject LoRA into the UNet and the given text encoders (not into layers whose output the
    family never uses) and make only it trainable; returns the paths.

    The LoRA A matrices are initialised from the global RNG: the same seed gives the same start in
    every process and in a one-process run.
    """
    torch.manual_seed(sample_seed(args.seed, "lora-init"))
    unet_config = unet_lora_config(
        args.unet_preset, rank=args.rank, alpha=args.lora_alpha, conv_rank=args.conv_rank,
        conv_alpha=args.conv_alpha, dropout=args.lora_dropout,
    )
    adapted = inject_lora(unet, unet_config)
    mark_only_lora_as_trainable(unet)
    unet.train()
    for name, encoder in text_encoders.items():
        config = text_encoder_lora_config(encoder_setting(args, name, "preset"), rank=args.rank, alpha=args.lora_alpha,
                                          dropout=args.lora_dropout)
        config = dataclasses.replace(config, exclude_modules=family.unused_layers(name, encoder))
        adapted += [f"{name}.{p}" for p in inject_lora(encoder, config)]
        mark_only_lora_as_trainable(encoder)
        encoder.train()
    return adapted


def encoder_setting(args: argparse.Namespace, encoder: str, what: str) -> Any:
    """``--text_encoder_preset`` / ``--text_encoder_lr`` for ``text_encoder``; for ``text_encoder_2``
    its own ``--text_encoder_2_*`` value, falling back to the first encoder's."""
    first = getattr(args, f"text_encoder_{what}")
    if encoder == "text_encoder_2" and getattr(args, f"text_encoder_2_{what}") is not None:
        return getattr(args, f"text_encoder_2_{what}")
    return first


# ==== 3. data ====================================================================================


def build_data(args: argparse.Namespace, accelerator: Accelerator, models: Models) -> tuple[TextImageDataset, torch.utils.data.DataLoader]:
    """The dataset (deterministic per seed, epoch and index) and its dataloader (not yet prepared):
    square crops shuffled per epoch, or with --enable_bucket aspect-ratio buckets drawn per bucket."""
    if args.dataset_name is not None:
        source = load_hf_source(args.dataset_name, args.dataset_config_name, args.image_column, args.caption_column,
                                data_dir=args.train_data_dir, cache_dir=args.cache_dir)
    else:
        source = read_image_folder(args.train_data_dir, caption_column=args.caption_column)
    if args.max_train_samples is not None:
        source = ListSource([source[i] for i in range(min(args.max_train_samples, len(source)))], source.description)
    target_sizes = None
    if args.enable_bucket:
        buckets = bucket_resolutions(args.resolution, args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps)
        target_sizes = [select_bucket(*image_size(source[i]), buckets) for i in range(len(source))]
        used = sorted(set(target_sizes))
        logger.info(f"{len(used)} of {len(buckets)} buckets used: " +
                    ", ".join(f"{w}x{h}: {target_sizes.count((w, h))}" for w, h in used))
    dataset = TextImageDataset(
        source, models.family.tokenize(models.tokenizers), args.resolution, center_crop=args.center_crop,
        random_flip=args.random_flip, caption_dropout=args.caption_dropout, seed=args.seed, target_sizes=target_sizes,
    )
    if args.cache_latents:
        vae = models.vae

        def encode(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            dist = vae.encode(pixels.to(accelerator.device, dtype=vae.dtype)).latent_dist
            return dist.mean, dist.std

        bar = tqdm(total=len(dataset), desc="Caching latents", disable=not accelerator.is_local_main_process)
        dataset.use_cached_latents(cache_latents(dataset, encode, batch_size=args.train_batch_size, progress=bar.update))
        bar.close()
    common = {"collate_fn": collate, "num_workers": args.dataloader_num_workers}
    if target_sizes is None:
        sampler = EpochShuffleSampler(len(dataset), seed=args.seed)
        dataloader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=args.train_batch_size, **common)
    else:
        sampler = BucketBatchSampler(target_sizes, args.train_batch_size, accelerator.num_processes, seed=args.seed)
        dataloader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **common)
    return dataset, dataloader


# ==== 4. optimizer, schedule, prepare, resume ====================================================


def build_optimizer(args: argparse.Namespace, accelerator: Accelerator, models: Models) -> torch.optim.Optimizer:
    """AdamW (or 8-bit AdamW) over the LoRA parameters only: one group for the UNet, one per trained
    text encoder with its own learning rate."""
    scale = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes if args.scale_lr else 1
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    groups = [{"params": list(adapter_parameters(models.unet).values()), "lr": args.learning_rate * scale}]
    for name in models.trained_encoders:
        lr = encoder_setting(args, name, "lr")
        groups.append({"params": list(adapter_parameters(models.text_encoders[name]).values()),
                       "lr": (lr if lr is not None else args.learning_rate) * scale})
    return optimizer_cls(groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def prepare_training(args: argparse.Namespace, accelerator: Accelerator, models: Models, dataset, dataloader, parallel) -> Run:
    """FSDP2 sharding where it runs, optimizer and LR schedule, the epoch/step arithmetic, and
    ``accelerator.prepare`` (not of models already sharded: DDP must not wrap them)."""
    logger.info(parallel.describe())
    trained = [models.text_encoders[name] for name in models.trained_encoders]
    prepare_sharding(parallel, accelerator, [models.unet, *trained])
    optimizer = build_optimizer(args, accelerator, models)
    sampler = dataloader.batch_sampler if isinstance(dataloader.batch_sampler, BucketBatchSampler) else dataloader.sampler
    if isinstance(sampler, BucketBatchSampler):
        batches_per_epoch = len(sampler) // accelerator.num_processes
    else:
        batches_per_epoch = math.ceil(len(dataset) / (args.train_batch_size * accelerator.num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    # Stepped by this script once per optimizer step (not by accelerate once per process), so
    # the schedule is the same for any number of processes.
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=args.max_train_steps, num_cycles=args.lr_num_cycles, power=args.lr_power,
    )
    if parallel.shard_here:
        unet = models.unet
        optimizer, dataloader = accelerator.prepare(optimizer, dataloader)
    else:
        unet, *trained, optimizer, dataloader = accelerator.prepare(models.unet, *trained, optimizer, dataloader)
    if len(dataloader) != batches_per_epoch:
        raise RuntimeError(f"expected {batches_per_epoch} batches per epoch per process, accelerate gives {len(dataloader)}")
    text_encoders = {**models.text_encoders, **dict(zip(models.trained_encoders, trained))}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    return Run(unet, text_encoders, optimizer, lr_scheduler, dataloader, params, steps_per_epoch, total_batch, parallel)


def resume_or_start(args: argparse.Namespace, accelerator: Accelerator, models: Models, run: Run, resume_dir: Path | None) -> None:
    """Fresh progress, or the checkpoint's LoRA weights, optimizer, schedule and progress; then the
    epoch and the batches of it to skip, and the trackers."""
    run.progress = {"seed": args.seed, "global_step": 0, "losses": [], "learning_rates": [], "skipped_steps": []}
    if resume_dir is not None:
        with full_tensors(run.trained_models(models), run.optimizer, write_back=True):  # FSDP: load whole tensors, keep this shard
            run.progress = load_training_state(resume_dir, accelerator, models, run)
        accelerator.print(f"Resumed from {resume_dir} at step {run.global_step}")
    run.first_epoch = run.epoch = run.global_step // run.steps_per_epoch
    run.batches_to_skip = (run.global_step % run.steps_per_epoch) * args.gradient_accumulation_steps
    if accelerator.is_main_process:
        accelerator.init_trackers("text2image-lora", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                              for k, v in vars(args).items()})
    logger.info(f"***** Training: {len(run.dataloader.dataset)} images, {args.max_train_steps} steps ({args.num_train_epochs} epochs), "
                f"batch {args.train_batch_size} per process x {accelerator.num_processes} processes x "
                f"{args.gradient_accumulation_steps} accumulation = {run.total_batch}, mixed precision "
                f"{accelerator.mixed_precision}, seed {args.seed} *****")


#: The files of a checkpoint that :func:`load_training_state` reads (besides the optional text-encoder
#: LoRA and grad-scaler state); a resume checks they are all there before loading anything.
CHECKPOINT_FILES = ("unet_lora.safetensors", "optimizer.json", "lr_scheduler.json", "progress.json")


def save_training_state(folder: Path, accelerator: Accelerator, models: Models, run: Run) -> None:
    """Everything a resumed run needs, without pickles: LoRA weights (convlora files, one per trained
    model), optimizer and scheduler state (safetensors + JSON), progress (step, losses, seed)."""
    for name, model in trained_by_name(models, run).items():
        save_lora(accelerator.unwrap_model(model), folder / f"{name}_lora.safetensors")
    write_state(folder, "optimizer", run.optimizer.state_dict())
    write_state(folder, "lr_scheduler", run.lr_scheduler.state_dict())
    if accelerator.scaler is not None:
        write_state(folder, "grad_scaler", accelerator.scaler.state_dict())
    write_state(folder, "progress", run.progress)


def load_training_state(folder: Path, accelerator: Accelerator, models: Models, run: Run) -> dict:
    """Inverse of :func:`save_training_state`; returns the progress dict.

    Raises:
        CheckpointError: the checkpoint's text encoders were (not) trained where this run does (not).
    """
    trained = trained_by_name(models, run)
    for name in models.family.text_encoders:
        has_file = (folder / f"{name}_lora.safetensors").is_file()
        if has_file != (name in trained):
            raise CheckpointError(f"{folder}: the text encoder was {'' if has_file else 'not '}trained in that run; "
                                  f"pass {'' if has_file else 'no '}--train_text_encoder")
    for name, model in trained.items():  # every file fits before any is loaded
        check_adapter_unchanged(accelerator.unwrap_model(model), folder / f"{name}_lora.safetensors")
    for name, model in trained.items():
        load_lora(accelerator.unwrap_model(model), folder / f"{name}_lora.safetensors")
    run.optimizer.load_state_dict(read_state(folder, "optimizer"))
    run.lr_scheduler.load_state_dict(read_state(folder, "lr_scheduler"))
    if accelerator.scaler is not None and (folder / "grad_scaler.json").is_file():
        accelerator.scaler.load_state_dict(read_state(folder, "grad_scaler"))
    return read_state(folder, "progress")


def trained_by_name(models: Models, run: Run) -> dict[str, torch.nn.Module]:
    """``{"unet": ..., "text_encoder": ..., ...}``: the prepared models that carry LoRA."""
    return {"unet": run.unet, **{name: run.text_encoders[name] for name in models.trained_encoders}}


# ==== 5. train loop ==============================================================================


def train_loop(args: argparse.Namespace, accelerator: Accelerator, models: Models, run: Run) -> None:
    """Epochs from the resumed one to the last: validate (per --validation_steps or at epoch ends),
    checkpoint, stop at --max_train_steps."""
    latent_scale = vae_scale(models.vae)
    alphas_cumprod = models.noise_scheduler.alphas_cumprod.to(accelerator.device)
    progress_bar = tqdm(range(args.max_train_steps), initial=run.global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    for epoch in range(run.first_epoch, args.num_train_epochs):
        run.epoch = epoch
        for model in run.trained_models(models):
            model.train()
        skipped_batches = run.batches_to_skip if epoch == run.first_epoch else 0
        loader = epoch_loader(run.dataloader, epoch, skipped_batches)  # the shuffle order and every per-sample draw
        window_losses: list[torch.Tensor] = []  # the gathered losses of the batches of one optimizer step
        for batch_in_epoch, batch in enumerate(loader, start=skipped_batches):
            # The global RNG only drives LoRA dropout; seeding it per batch keeps resume exact.
            torch.manual_seed(sample_seed(args.seed, "batch", epoch, batch_in_epoch, accelerator.process_index))
            finite = train_step(args, accelerator, models, run, batch, epoch, latent_scale, alphas_cumprod, window_losses)
            if not accelerator.sync_gradients:
                continue
            record_step(args, accelerator, run, torch.cat(window_losses), finite, progress_bar)
            window_losses = []
            maybe_checkpoint(args, accelerator, models, run)
            if args.validation_steps and run.global_step % args.validation_steps == 0:
                maybe_validate(args, accelerator, models, run)
            if run.global_step >= args.max_train_steps:
                break
        if not args.validation_steps and (epoch + 1) % args.validation_epochs == 0:
            maybe_validate(args, accelerator, models, run)
        if run.global_step >= args.max_train_steps:
            break
    progress_bar.close()


def train_step(args, accelerator: Accelerator, models: Models, run: Run, batch: dict, epoch: int, latent_scale: int,
               alphas_cumprod: torch.Tensor, window_losses: list[torch.Tensor]) -> bool:
    """Forward, backward and (at the end of an accumulation window) the optimizer step of one batch.

    Appends every process's loss to ``window_losses``; returns whether the window so far is finite
    (loss and gradient norm) -- the same decision in every process.
    """
    scheduler = models.noise_scheduler
    with accelerator.accumulate(*run.trained_models(models)):
        # (a) latents: the VAE posterior sampled with this sample's own noise
        latents_hw = (batch["time_ids"][0, 4:6] // latent_scale).tolist()
        draws = draw_step_noise(batch["index"].cpu(), epoch, args.seed, (models.vae.config.latent_channels, *latents_hw),
                                scheduler.config.num_train_timesteps, args.noise_offset).to(accelerator.device)
        with torch.no_grad():
            if "latent_mean" in batch:
                mean, std = batch["latent_mean"], batch["latent_std"]
            else:
                posterior = models.vae.encode(batch["pixel_values"].to(dtype=models.vae.dtype)).latent_dist
                mean, std = posterior.mean, posterior.std
            latents = (mean.float() + std.float() * draws.latent_eps) * models.vae.config.scaling_factor
        # (b) forward diffusion: noise the latents at a random timestep
        noisy_latents = scheduler.add_noise(latents, draws.noise, draws.timesteps)
        # (c) conditioning: the family's prompt embedding (+ SDXL's added conditions); no graph
        # through frozen text encoders
        with contextlib.nullcontext() if models.trained_encoders else torch.no_grad():
            conditions = models.family.unet_conditions(run.text_encoders, batch)
        # (d) predict and compare with the target (noise, velocity or x0)
        target = training_target(scheduler, latents, draws.noise, draws.timesteps, models.prediction_type)
        model_pred = run.unet(noisy_latents, draws.timesteps, **conditions, return_dict=False)[0]
        loss = diffusion_loss(model_pred, target, draws.timesteps, alphas_cumprod, args.snr_gamma, models.prediction_type)
        # (e) every process's loss, for the log and for the same skip decision everywhere
        window_losses.append(accelerator.gather(loss.detach().reshape(1)))
        accelerator.backward(loss)
        grad_norm = None
        if accelerator.sync_gradients and args.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(run.params, args.max_grad_norm)
        finite = bool(torch.isfinite(torch.cat(window_losses)).all()) and (grad_norm is None or bool(torch.isfinite(grad_norm)))
        # (f) update: a non-finite step is skipped (with fp16 the grad scaler skips it itself
        # and lowers its scale, so it must still see the step)
        if finite or accelerator.scaler is not None:
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return finite


def record_step(args, accelerator: Accelerator, run: Run, losses: torch.Tensor, finite: bool, progress_bar) -> None:
    """Book one completed optimizer step: schedule, progress, log, and the NaN policy.

    Raises:
        NonFiniteLossError: --max_consecutive_nonfinite_steps non-finite steps in a row.
    """
    step = run.global_step + 1
    step_loss = float(losses.mean())
    skipped = not finite or bool(getattr(run.optimizer, "step_was_skipped", False))
    if not skipped:
        run.lr_scheduler.step()
    lr = run.lr_scheduler.get_last_lr()[0]
    run.progress["global_step"] = step
    run.progress["losses"].append(step_loss if finite else None)
    run.progress["learning_rates"].append(lr)
    if skipped:
        run.progress["skipped_steps"].append(step)
    run.consecutive_nonfinite = 0 if finite else run.consecutive_nonfinite + 1
    if not finite:
        logger.warning(f"step {step}: loss is {step_loss} (non-finite); the update was skipped")
        if run.consecutive_nonfinite >= args.max_consecutive_nonfinite_steps:
            raise NonFiniteLossError(
                f"the loss was NaN/inf in {run.consecutive_nonfinite} steps in a row (up to step {step}); "
                f"stopping. Nothing with non-finite values was saved; the last checkpoint is "
                f"{run.checkpoints[-1] if run.checkpoints else 'none'}. Try a lower --learning_rate, "
                "--mixed_precision bf16 or no, or check the data."
            )
    progress_bar.update(1)
    progress_bar.set_postfix(step=step, loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
    accelerator.log({"train_loss": step_loss if finite else float("nan"), "lr": lr}, step=step)


def maybe_checkpoint(args, accelerator: Accelerator, models: Models, run: Run) -> None:
    """Every --checkpointing_steps: an atomic, rotated checkpoint, written by the main process."""
    if run.global_step % args.checkpointing_steps:
        return
    with full_tensors(run.trained_models(models), run.optimizer):  # FSDP: every process gathers, the main one writes
        if accelerator.is_main_process:
            path = save_checkpoint(args.output_dir, run.global_step,
                                   lambda folder: save_training_state(folder, accelerator, models, run),
                                   total_limit=args.checkpoints_total_limit, info={"settings": adapter_settings(args)})
            run.checkpoints.append(path)
            logger.info(f"Saved checkpoint {path}")


def maybe_validate(args, accelerator: Accelerator, models: Models, run: Run, final: bool = False) -> None:
    """Validation grid from the main process, if prompts are given; mid-run validations skip the
    last step (the final one covers it)."""
    if not args.validation_prompt or not accelerator.is_main_process:
        return
    if not final and run.global_step >= args.max_train_steps:
        return
    run.base_rows, _, grid_path, run.scores = run_validation(args, accelerator, models, run, final=final)
    run.outputs["validation grid"] = grid_path


# ==== 6. save ====================================================================================


def write_outputs(args, accelerator: Accelerator, models: Models, run: Run, started: float) -> dict:
    """From the main process: the LoRA files, the final validation grid, ``train_summary.json``, and
    the list of outputs. Returns the summary (empty in other processes)."""
    accelerator.wait_for_everyone()
    summary = {}
    gathered = contextlib.ExitStack()
    gathered.enter_context(full_tensors(run.trained_models(models)))  # FSDP: every process gathers, the main one writes
    if accelerator.is_main_process:
        final = {name: accelerator.unwrap_model(model) for name, model in trained_by_name(models, run).items()}
        metadata = file_metadata(args, accelerator, models, run)
        files = {"diffusers": Path(args.output_dir, "pytorch_lora_weights.safetensors"),
                 "kohya": Path(args.output_dir, f"{args.output_name}_kohya.safetensors"),
                 "native": Path(args.output_dir, f"{args.output_name}_convlora.safetensors")}
        for fmt in args.save_format:
            run.outputs[f"LoRA ({fmt})"] = save_pipeline_lora(files[fmt], **final, format=fmt, metadata=metadata,
                                                              base_model_version=models.family.kohya_base_model_version)
        maybe_validate(args, accelerator, models, run, final=True)
        kept = list_checkpoints(args.output_dir)
        if kept:
            run.outputs["checkpoints"] = ", ".join(str(path) for _, path in kept)
        if accelerator.trackers:
            logs = Path(args.output_dir, args.logging_dir)
            run.outputs["tensorboard"] = f"{logs}  (tensorboard --logdir {logs})"
        summary = {
            **run.progress,
            "max_train_steps": args.max_train_steps,
            "mixed_precision": accelerator.mixed_precision,
            "num_processes": accelerator.num_processes,
            "family": models.family.name,
            "distributed": {"requested": run.parallel.requested, "running": run.parallel.running, "sharded": run.parallel.sharded,
                            "frozen_local_share": frozen_local_share(run.trained_models(models))},
            "dtypes": {"unet": parameter_dtypes(final["unet"]), "vae": parameter_dtypes(models.vae),
                       **{name: parameter_dtypes(accelerator.unwrap_model(model)) for name, model in run.text_encoders.items()}},
            "concept_scores": run.scores,
            "base_model": args.pretrained_model_name_or_path,
            "train_data": args.train_data_dir or args.dataset_name,
            "num_train_images": len(run.dataloader.dataset),
            "seconds": round(time.time() - started, 1),
            "outputs": {k: str(v) for k, v in run.outputs.items()},
        }
        summary_path = write_json(Path(args.output_dir, "train_summary.json"), summary)
        print_outputs(args, run.outputs, summary_path, run.scores, summary["seconds"])
    gathered.close()
    accelerator.end_training()
    return summary


def file_metadata(args, accelerator: Accelerator, models: Models, run: Run) -> dict[str, str]:
    """The header entries of the LoRA files: convlora's keys and kohya's ``ss_*`` spellings."""
    trained = models.trained_encoders
    te_lrs = {name: encoder_setting(args, name, "lr") for name in trained}
    n_images = len(run.dataloader.dataset)
    return training_metadata(
        base_model=args.pretrained_model_name_or_path, unet_preset=args.unet_preset, rank=args.rank,
        alpha=args.lora_alpha if args.lora_alpha is not None else args.rank,
        conv_rank=args.conv_rank, conv_alpha=args.conv_alpha, steps=run.global_step, epochs=run.epoch + 1,
        resolution=args.resolution, num_train_images=n_images, train_data=args.train_data_dir or args.dataset_name,
        text_encoder_preset=args.text_encoder_preset if trained else None,
        extra={
            "model_family": models.family.name,
            "learning_rate": args.learning_rate, "text_encoder_lr": te_lrs.get("text_encoder"),
            "text_encoder_2_preset": encoder_setting(args, "text_encoder_2", "preset") if "text_encoder_2" in trained else None,
            "text_encoder_2_lr": te_lrs.get("text_encoder_2"),
            "lr_scheduler": args.lr_scheduler, "total_batch_size": run.total_batch, "mixed_precision": accelerator.mixed_precision,
            "seed": args.seed, "prediction_type": models.prediction_type, "snr_gamma": args.snr_gamma,
            "noise_offset": args.noise_offset, "caption_dropout": args.caption_dropout,
            "enable_bucket": args.enable_bucket or None,
        },
        kohya_extra={
            "ss_learning_rate": args.learning_rate, "ss_text_encoder_lr": te_lrs.get("text_encoder"),
            "ss_lr_scheduler": args.lr_scheduler, "ss_lr_warmup_steps": args.lr_warmup_steps,
            "ss_max_train_steps": args.max_train_steps, "ss_batch_size_per_device": args.train_batch_size,
            "ss_total_batch_size": run.total_batch, "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
            "ss_mixed_precision": accelerator.mixed_precision, "ss_seed": args.seed, "ss_noise_offset": args.noise_offset,
            "ss_min_snr_gamma": args.snr_gamma, "ss_caption_dropout_rate": args.caption_dropout,
            "ss_cache_latents": args.cache_latents, "ss_flip_aug": args.random_flip, "ss_random_crop": not args.center_crop,
            "ss_network_dropout": args.lora_dropout, "ss_max_grad_norm": args.max_grad_norm,
            "ss_optimizer": "bitsandbytes.optim.AdamW8bit" if args.use_8bit_adam else "torch.optim.AdamW",
            "ss_dataset_dirs": {Path(args.train_data_dir or args.dataset_name).name: {"n_repeats": 1, "img_count": n_images}},
            "ss_enable_bucket": args.enable_bucket,
            **({"ss_min_bucket_reso": args.min_bucket_reso, "ss_max_bucket_reso": args.max_bucket_reso,
                "ss_bucket_reso_steps": args.bucket_reso_steps} if args.enable_bucket else {}),
        },
    )


# ==== validation =================================================================================


def validation_pipeline(args, accelerator: Accelerator, models: Models, run: Run):
    """A pipeline of the family around the models in memory (nothing reloaded, nothing cast), with
    the folder's own sampling scheduler."""
    index_file = Path(args.pretrained_model_name_or_path, "model_index.json")
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    scheduler_class = getattr(diffusers, index.get("scheduler", [None, "DDPMScheduler"])[1], DDPMScheduler)
    scheduler = scheduler_class.from_config(models.noise_scheduler.config)
    text_encoders = {name: accelerator.unwrap_model(model) for name, model in run.text_encoders.items()}
    return models.family.build_pipeline(models.vae, accelerator.unwrap_model(run.unet), text_encoders, models.tokenizers, scheduler)


@torch.no_grad()
def sample_images(pipeline, args) -> list[list[Image.Image]]:
    """``num_validation_images`` images per validation prompt, image ``i`` always from seed ``seed + i``."""
    rows = []
    for prompt in args.validation_prompt:
        generators = [torch.Generator("cpu").manual_seed(args.seed + i) for i in range(args.num_validation_images)]
        out = pipeline(
            [prompt] * args.num_validation_images, generator=generators, height=args.resolution, width=args.resolution,
            num_inference_steps=args.validation_inference_steps, guidance_scale=args.validation_guidance_scale,
        )
        rows.append(out.images)
    return rows


def run_validation(args, accelerator: Accelerator, models: Models, run: Run, final: bool = False):
    """Sample the validation prompts with LoRA (and, the first time, without), save the PNG grid and
    log it. Returns ``(base_rows, lora_rows, grid_path, scores)``.

    ``eval()`` merges LoRA into the weights (inference at base speed, no cast of any trained
    module); ``train()`` afterwards restores the exact training weights.
    """
    step, base_rows = run.global_step, run.base_rows
    pipeline = validation_pipeline(args, accelerator, models, run)
    trained = [accelerator.unwrap_model(model) for model in run.trained_models(models)]
    for model in trained:
        model.eval()
    try:
        # autocast: the prepared UNet returns float32 (accelerate's wrapper) to a half-precision VAE
        with accelerator.autocast():
            with contextlib.ExitStack() as stack:
                for model in trained:
                    stack.enter_context(lora_scale(model, args.validation_lora_scale))
                lora_rows = sample_images(pipeline, args)
            if base_rows is None:
                with contextlib.ExitStack() as stack:
                    for model in trained:
                        stack.enter_context(disable_lora(model))
                    base_rows = sample_images(pipeline, args)
    finally:
        for model in trained:
            model.train()
    grid = make_grid(base_rows, lora_rows, args.validation_prompt, step)
    grid_path = Path(args.output_dir, "validation", "final.png" if final else f"step-{step:06d}.png")
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(grid_path)
    scores = concept_scores(args, base_rows, lora_rows)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation/grid", np.asarray(grid), step, dataformats="HWC")
            for prompt, images in zip(args.validation_prompt, lora_rows):
                tracker.writer.add_images(f"validation/{prompt}", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
    if scores:
        accelerator.log({f"concept_score/{c}": s["lora"] for c, s in scores.items()}, step=step)
    return base_rows, lora_rows, grid_path, scores


def concept_scores(args, base_rows, lora_rows) -> dict[str, dict[str, float]]:
    """Share of each prompt's images the Fashion-MNIST classifier recognises as its class, base vs LoRA."""
    if not args.validation_score_classes:
        return {}
    from convlora.diffusion.fashion import concept_score, load_classifier

    classifier = load_classifier(EMBEDDED_BASE / "classifier")
    scores = {}
    for prompt, cls, base, lora in zip(args.validation_prompt, args.validation_score_classes, base_rows, lora_rows):
        if cls != "-":
            scores[cls] = {"prompt": prompt, "base": concept_score(base, cls, classifier), "lora": concept_score(lora, cls, classifier)}
    return scores


def make_grid(base_rows, lora_rows, prompts, step: int, per_line: int = 8) -> Image.Image:
    """For each prompt: the base model's images, a gap, the LoRA model's images (same seeds),
    ``per_line`` images per side on a line (more images wrap onto further lines)."""
    n = len(lora_rows[0])
    cols, lines = min(n, per_line), math.ceil(n / per_line)
    tile = max(lora_rows[0][0].width, 96)  # upscale tiny images so the grid is readable
    label_w, gap, header, row_gap = 220, 16, 22, 8
    block = lines * tile + row_gap  # one prompt's lines
    grid = Image.new("RGB", (label_w + 2 * cols * tile + gap, header + len(prompts) * block - row_gap), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((label_w, 4), "base (no LoRA)", fill="black")
    draw.text((label_w + cols * tile + gap, 4), f"LoRA, step {step}", fill="black")
    for r, (prompt, base, lora) in enumerate(zip(prompts, base_rows, lora_rows)):
        top = header + r * block
        draw.text((4, top + lines * tile // 2 - 6), prompt[:34], fill="black")
        for side_x, images in ((label_w, base), (label_w + cols * tile + gap, lora)):
            for i, image in enumerate(images):
                grid.paste(image.resize((tile, tile), Image.NEAREST), (side_x + (i % cols) * tile, top + (i // cols) * tile))
    return grid

# ==== main =======================================================================================


def main(argv: list[str] | None = None) -> dict:
    """The six steps; returns the summary written to ``train_summary.json`` (main process)."""
    started = time.time()
    args = parse_args(argv)
    accelerator, resume_dir = setup(args)                                   # 1. setup
    parallel = check_parallelism(accelerator, validating=bool(args.validation_prompt))
    models = load_models(args, accelerator)                                 # 2. models (+ LoRA)
    dataset, dataloader = build_data(args, accelerator, models)             # 3. data
    run = prepare_training(args, accelerator, models, dataset, dataloader,  # 4. optimizer, schedule,
                           parallel)
    resume_or_start(args, accelerator, models, run, resume_dir)             #    prepare, resume
    train_loop(args, accelerator, models, run)                              # 5. train loop
    return write_outputs(args, accelerator, models, run, started)           # 6. save


def vae_scale(vae: AutoencoderKL) -> int:
    """Pixels per latent pixel (8 for SD, 4 for the tiny base)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def print_outputs(args, outputs: dict, summary_path: Path, scores: dict, seconds: float) -> None:
    """The files written, each LoRA file with the loaders it is for.

    ComfyUI and AUTOMATIC1111 load the kohya file fully; they drop modules of the diffusers file
    (ComfyUI its attention projections, A1111 all of them), so each file is named with its loaders.
    """
    use = {
        "LoRA (diffusers)": "diffusers: pipe.load_lora_weights(folder)",
        "LoRA (kohya)": "AUTOMATIC1111, ComfyUI (models/Lora); diffusers too",
        "LoRA (native)": "convlora.diffusion.load_pipeline_lora",
    }
    print(f"\nDone in {seconds:.0f} s. Outputs in {args.output_dir}:")
    order = ["LoRA", "validation grid", "checkpoints", "tensorboard"]
    for name, path in sorted(outputs.items(), key=lambda kv: next(i for i, o in enumerate(order + [""]) if kv[0].startswith(o))):
        print(f"  {name + ':':<20} {path}" + (f"  <- for {use[name]}" if name in use else ""))
    if "LoRA (diffusers)" in outputs and "LoRA (kohya)" not in outputs:
        print("  for AUTOMATIC1111 / ComfyUI: convlora convert <diffusers file> <out>.safetensors --to kohya")
    print(f"  {'summary:':<20} {summary_path}")
    for cls, s in scores.items():
        print(f"  concept score {cls!r} ({s['prompt']!r}): base {s['base']:.2f} -> LoRA {s['lora']:.2f}")


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN/inf for too many steps in a row."""


def command_line(argv: list[str] | None = None) -> int:
    """Run :func:`main`; a failure it names (bad data, checkpoint or argument, an unwritable or full
    disk, a diverged loss) prints one line, no traceback, and gives exit code 1."""
    try:
        main(argv)
    # DataError, CheckpointError, LoRAFileError, DistributedSetupError are ValueErrors; safetensors reports a full disk as a SafetensorError
    except (NonFiniteLossError, ValueError, OSError, SafetensorError) as err:
        for bar in list(getattr(tqdm, "_instances", ())):  # end the progress bar's line first
            bar.close()
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(command_line())
