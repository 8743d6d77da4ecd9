"""Model families: what differs between Stable Diffusion 1.x/2.x and Stable Diffusion XL pipelines.

Everything that depends on the family lives in one small object, chosen once from the pipeline
folder (:func:`detect_family`), so the training loop, the file writers and the CLI never ask
"is this SDXL?" themselves:

=====================  ==============================  ==================================================
                       ``SD``                          ``SDXL``
=====================  ==============================  ==================================================
text encoders          ``text_encoder``                ``text_encoder`` + ``text_encoder_2``
prompt embedding       last hidden state (B, L, D)     penultimate hidden states of both, concatenated
                                                       (B, L, D1 + D2), + pooled projection of
                                                       ``text_encoder_2`` (B, P)
added UNet conditions  none                            ``{"text_embeds": (B, P), "time_ids": (B, 6)}``,
                                                       time ids = original (h, w), crop (top, left),
                                                       target (h, w) in pixels
pipeline class         ``StableDiffusionPipeline``     ``StableDiffusionXLPipeline``
kohya base version     ``sd_v1``                       ``sdxl_base_v1-0`` (what sd-scripts writes)
=====================  ==============================  ==================================================
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["FAMILIES", "SD", "SDXL", "Family", "detect_family", "family_from_configs", "family_of_pipeline"]


@dataclass(frozen=True)
class Family:
    """The family-specific parts of a text-to-image pipeline (see the module docstring)."""

    name: str
    """``"sd"`` or ``"sdxl"``."""
    pipeline_class_name: str
    """The diffusers pipeline class that runs it."""
    text_encoders: tuple[str, ...]
    """Pipeline attribute names of the text encoders, in the order their outputs are concatenated."""
    text_encoder_classes: tuple[str, ...]
    """The transformers class of each text encoder, same order."""
    tokenizers: tuple[str, ...]
    """The tokenizer of each text encoder, same order."""
    kohya_base_model_version: str
    """kohya's ``ss_base_model_version`` for LoRAs of this family."""
    uses_time_ids: bool
    """Whether the UNet takes SDXL's size/crop micro-conditioning."""
    vae_needs_fp32: bool
    """The family's VAE overflows in half precision (SDXL's does): keep it float32 unless the user
    gives a VAE fixed for half precision."""

    def unused_layers(self, name: str, encoder: nn.Module) -> str | None:
        """A regex (``LoRAConfig.exclude_modules``) for the layers of text encoder ``name`` whose
        output never reaches the UNet, or ``None``.

        SDXL conditions on the penultimate hidden states: the last layer of ``text_encoder`` feeds
        nothing (``text_encoder_2``'s feeds its pooled projection). LoRA there could never learn,
        and under DDP its parameters would get no gradient at all.
        """
        if not self.uses_time_ids or name != self.text_encoders[0]:
            return None
        return rf"(.*\.)?layers\.{encoder.config.num_hidden_layers - 1}\..*"

    @property
    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def input_id_keys(self) -> tuple[str, ...]:
        """Batch keys of the token ids, one per text encoder: ``input_ids``, ``input_ids_2``."""
        return tuple("input_ids" if i == 0 else f"input_ids_{i + 1}" for i in range(len(self.text_encoders)))

    def tokenize(self, tokenizers: Mapping[str, Any]) -> Callable[[list[str]], dict[str, torch.Tensor]]:
        """``captions -> {"input_ids": (N, L), ["input_ids_2": (N, L)]}``, each tokenizer padding to its length."""
        pairs = [(key, tokenizers[name]) for key, name in zip(self.input_id_keys(), self.tokenizers)]

        def tokenize(captions: list[str]) -> dict[str, torch.Tensor]:
            return {
                key: tok(captions, max_length=tok.model_max_length, padding="max_length", truncation=True,
                         return_tensors="pt").input_ids
                for key, tok in pairs
            }

        return tokenize

    def encode_prompts(self, text_encoders: Mapping[str, nn.Module], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the text encoders contribute to the UNet's conditioning, per prompt.

        Args:
            text_encoders: name -> encoder (``text_encoder`` and, for SDXL, ``text_encoder_2``).
            batch: ``input_ids`` (B, L) [+ ``input_ids_2`` (B, L) for SDXL].

        Returns:
            ``{"encoder_hidden_states": (B, L, D)}``; SDXL: the penultimate hidden states of both
            encoders concatenated (B, L, D1 + D2), and ``"text_embeds"`` (B, P), the pooled projection
            of the last encoder.
        """
        encoders = [text_encoders[name] for name in self.text_encoders]
        ids = [batch[key] for key in self.input_id_keys()]
        if not self.uses_time_ids:
            return {"encoder_hidden_states": encoders[0](ids[0], return_dict=False)[0]}
        hidden, pooled = [], None
        for encoder, input_ids in zip(encoders, ids):
            out = encoder(input_ids, output_hidden_states=True, return_dict=True)
            hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
            pooled = out[0]  # the last encoder's pooled projection (text_embeds), (B, P)
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def unet_conditions(self, text_encoders: Mapping[str, nn.Module], batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The UNet's conditioning keyword arguments for a batch (its prompts encoded now)."""
        return self.conditions_from_prompts(self.encode_prompts(text_encoders, batch), batch)

    def conditions_from_prompts(self, prompts: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The UNet's conditioning keyword arguments from :meth:`encode_prompts`'s output (computed now
        or cached).

        Args:
            prompts: ``encoder_hidden_states`` (B, L, D) [+ ``text_embeds`` (B, P) for SDXL].
            batch: for SDXL its ``time_ids`` (B, 6).

        Returns:
            ``{"encoder_hidden_states": (B, L, D)}``; SDXL adds ``"added_cond_kwargs"``
            ``{"text_embeds": (B, P), "time_ids": (B, 6)}`` in the hidden states' dtype.
        """
        states = prompts["encoder_hidden_states"]
        if not self.uses_time_ids:
            return {"encoder_hidden_states": states}
        time_ids = batch["time_ids"].to(states.device, dtype=states.dtype)
        return {"encoder_hidden_states": states,
                "added_cond_kwargs": {"text_embeds": prompts["text_embeds"].to(states.dtype), "time_ids": time_ids}}

    def build_pipeline(self, vae: nn.Module, unet: nn.Module, text_encoders: Mapping[str, nn.Module],
                       tokenizers: Mapping[str, Any], scheduler: Any) -> Any:
        """A pipeline of this family around the given (in-memory) models; no safety checker, no watermark."""
        parts = {"vae": vae, "unet": unet, "scheduler": scheduler, **text_encoders, **tokenizers}
        if self.name == "sd":
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        else:
            parts.update(add_watermarker=False)
        pipeline = self.pipeline_class(**parts)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline


SD = Family("sd", "StableDiffusionPipeline", ("text_encoder",), ("CLIPTextModel",), ("tokenizer",), "sd_v1",
            uses_time_ids=False, vae_needs_fp32=False)
SDXL = Family("sdxl", "StableDiffusionXLPipeline", ("text_encoder", "text_encoder_2"),
              ("CLIPTextModel", "CLIPTextModelWithProjection"), ("tokenizer", "tokenizer_2"), "sdxl_base_v1-0",
              uses_time_ids=True, vae_needs_fp32=True)
FAMILIES = {f.name: f for f in (SD, SDXL)}


def family_from_configs(model_index: Mapping[str, Any] | None, unet_config: Mapping[str, Any] | None) -> Family:
    """SDXL when ``model_index.json`` names an SDXL pipeline class (``_class_name``), or the UNet
    config has ``addition_embed_type == "text_time"``; otherwise SD.

    Raises:
        ValueError: neither config given.
    """
    if model_index is None and unet_config is None:
        raise ValueError("need the pipeline's model_index.json or its unet/config.json to tell its family")
    if "XL" in str((model_index or {}).get("_class_name", "")):
        return SDXL
    return SDXL if (unet_config or {}).get("addition_embed_type") == "text_time" else SD


def detect_family(folder: str | os.PathLike) -> Family:
    """The family of a local diffusers pipeline folder (see :func:`family_from_configs`).

    Raises:
        FileNotFoundError: the folder has neither ``model_index.json`` nor ``unet/config.json``.
    """
    folder = Path(folder)
    configs = [folder / "model_index.json", folder / "unet" / "config.json"]
    if not any(c.is_file() for c in configs):
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json or unet/config.json)")
    index, unet = (json.loads(c.read_text()) if c.is_file() else None for c in configs)
    return family_from_configs(index, unet)


def family_of_pipeline(pipe_or_unet: Any) -> Family:
    """The family of a loaded pipeline or UNet (from the UNet's ``addition_embed_type``)."""
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    config = getattr(unet, "config", None)  # any other module (no diffusers config) is not SDXL
    return SDXL if getattr(config, "addition_embed_type", None) == "text_time" else SD
