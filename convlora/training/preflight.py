"""Checks a training run makes before any work, so a bad setting fails in seconds, not after training.

* :func:`check_output_dir` -- the output folder can be created and written (not a file, not
  read-only, not full).
* :func:`pixel_multiple` / :func:`check_resolution` -- the training resolution is one the VAE and
  UNet can divide, computed from their configs (8 x 8 = 64 for SD 1.x, 8 x 4 = 32 for SDXL).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Written (and removed again) to prove the output folder takes data; big enough that a full disk refuses it.
PROBE_BYTES = 64 * 1024


def check_output_dir(path: str | Path, flag: str = "--output_dir") -> Path:
    """Create ``path`` if needed and prove that files can be written in it.

    The probe is a temporary file named like those of :func:`convlora.training.checkpoints.write_json`,
    so a run killed during the check leaves nothing a later run does not clean up.

    Raises:
        ValueError: ``path`` is an existing file, cannot be created, or cannot take a
            :data:`PROBE_BYTES` file (read-only, full, no permission); the reason is named.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {folder} is an existing file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=folder)
    except OSError as err:
        raise ValueError(f"{flag} {folder} cannot be created or written: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(b"\0" * PROBE_BYTES)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        raise ValueError(f"{flag} {folder} cannot be written: {err.strerror or err}") from None
    finally:
        Path(probe).unlink(missing_ok=True)
    return folder


def pixel_multiple(vae_config: Mapping[str, Any], unet_config: Mapping[str, Any]) -> int:
    """Pixels per latent pixel times the UNet's overall downsampling: what a training side must divide by.

    Each VAE encoder block but the last halves the image; each UNet down block but the last halves
    the latents (diffusers' ``AutoencoderKL`` / ``UNet2DConditionModel`` layouts).

    Args:
        vae_config: the VAE's ``config.json`` (``block_out_channels``).
        unet_config: the UNet's ``config.json`` (``down_block_types``).
    """
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    unet_factor = 2 ** (len(unet_config["down_block_types"]) - 1)
    return vae_factor * unet_factor


def check_resolution(resolution: int, vae_config: Mapping[str, Any], unet_config: Mapping[str, Any]) -> None:
    """Raise unless ``resolution`` is a multiple of :func:`pixel_multiple`.

    Raises:
        ValueError: naming the multiple, how it arises, and the nearest valid resolutions.
    """
    multiple = pixel_multiple(vae_config, unet_config)
    if resolution % multiple == 0:
        return
    lower, upper = resolution // multiple * multiple, (resolution // multiple + 1) * multiple
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    raise ValueError(
        f"--resolution {resolution} is not a multiple of {multiple} (the VAE downsamples {vae_factor}x and the "
        f"UNet {multiple // vae_factor}x more); use {f'{lower} or ' if lower else ''}{upper}"
    )
