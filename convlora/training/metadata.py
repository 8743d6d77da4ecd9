"""What a trained LoRA file says about how it was made.

Two spellings of the same facts go into the file header (all values strings, as safetensors
requires):

* plain keys for ``convlora inspect`` and people: ``base_model``, ``unet_preset``,
  ``text_encoder_preset``, ``rank``, ``alpha``, ``conv_rank``, ``conv_alpha``, ``steps``,
  ``epochs``, ``resolution``, ``num_train_images``, ``train_data``, ``trainer`` (+ ``extra``);
* kohya's ``ss_*`` training keys (sd-scripts ``train_network.py``), which AUTOMATIC1111, ComfyUI
  managers and civitai display: ``ss_sd_model_name``, ``ss_steps``, ``ss_epoch``,
  ``ss_resolution``, ``ss_num_train_images``, ... The network keys (``ss_network_dim``,
  ``ss_network_alpha``, ``ss_network_args``, ``ss_network_module``, ``ss_base_model_version``) are
  left to the kohya writer, which derives them from the weights themselves.
"""

from __future__ import annotations

import json
import time
from typing import Any

#: The plain keys :func:`training_metadata` always writes.
REQUIRED_KEYS = (
    "base_model",
    "unet_preset",
    "rank",
    "alpha",
    "conv_rank",
    "conv_alpha",
    "steps",
    "epochs",
    "resolution",
    "num_train_images",
    "trainer",
)

#: Written by the kohya file writer from the weights; training metadata must not override them.
KOHYA_NETWORK_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version")


def training_metadata(
    base_model: str,
    unet_preset: str,
    rank: int,
    alpha: float,
    conv_rank: int | None,
    conv_alpha: float | None,
    steps: int,
    epochs: int,
    resolution: int,
    num_train_images: int,
    train_data: str | None = None,
    text_encoder_preset: str | None = None,
    extra: dict[str, Any] | None = None,
    kohya_extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Header metadata for a trained adapter file.

    Args:
        base_model: the ``--pretrained_model_name_or_path`` (folder or hub id).
        unet_preset: ``attn`` / ``attn-ff`` / ``full``.
        rank, alpha: of the linear and 1x1-conv updates.
        conv_rank, conv_alpha: of the 3x3 convs (None: same as rank / alpha).
        steps: optimizer steps trained.
        epochs: epochs started.
        resolution: training image side in pixels.
        num_train_images: dataset size.
        train_data: the data folder or dataset name.
        text_encoder_preset: the text encoder's preset if it was trained (else not written).
        extra: more plain entries (learning rate, batch size, seed, ...).
        kohya_extra: more ``ss_*`` entries (``ss_learning_rate``, ...).

    Values are turned into strings (JSON for lists and dicts); ``None`` values are left out.

    Raises:
        ValueError: ``kohya_extra`` sets a key the kohya writer derives from the weights.
    """
    clash = [k for k in (kohya_extra or {}) if k in KOHYA_NETWORK_KEYS]
    if clash:
        raise ValueError(f"{clash} are written by the kohya writer from the weights; do not set them")
    conv_rank_value = conv_rank if conv_rank is not None else rank
    conv_alpha_value = conv_alpha if conv_alpha is not None else (conv_rank if conv_rank is not None else alpha)
    meta: dict[str, Any] = {
        "base_model": base_model,
        "unet_preset": unet_preset,
        "text_encoder_preset": text_encoder_preset,
        "rank": rank,
        "alpha": alpha,
        "conv_rank": conv_rank_value,
        "conv_alpha": conv_alpha_value,
        "steps": steps,
        "epochs": epochs,
        "resolution": resolution,
        "num_train_images": num_train_images,
        "train_data": train_data,
        "trainer": "convlora train_scripts/train_text_to_image_lora.py",
        **(extra or {}),
        "ss_sd_model_name": base_model,
        "ss_steps": steps,
        "ss_epoch": epochs,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_num_train_images": num_train_images,
        "ss_training_finished_at": f"{time.time():.0f}",
        **(kohya_extra or {}),
    }
    return {key: _text(value) for key, value in meta.items() if value is not None}


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)
