"""Noise, timesteps, targets and the loss of one denoising training step.

Every random draw for a sample comes from a generator seeded by ``(seed, epoch, dataset index)``
(see :func:`convlora.training.data.sample_seed`): the noise a sample gets does not depend on which
batch or process it lands in, so a two-process run equals a one-process run with the doubled batch
and a resumed run equals a straight one.

Shapes: latents ``(B, C, h, w)``, timesteps ``(B,)`` int64, per-sample losses ``(B,)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from convlora.training.data import sample_generator

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class StepNoise:
    """The random draws of one batch, all on the CPU in float32."""

    latent_eps: torch.Tensor
    """``(B, C, h, w)`` standard normal: the VAE posterior sample is ``mean + std * latent_eps``."""
    noise: torch.Tensor
    """``(B, C, h, w)`` the diffusion noise, including the noise offset."""
    timesteps: torch.Tensor
    """``(B,)`` int64 in ``[0, num_train_timesteps)``."""

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "StepNoise":
        return StepNoise(
            self.latent_eps.to(device=device, dtype=dtype),
            self.noise.to(device=device, dtype=dtype),
            self.timesteps.to(device=device),
        )


def draw_step_noise(
    indices: torch.Tensor,
    epoch: int,
    seed: int,
    latent_shape: tuple[int, int, int],
    num_train_timesteps: int,
    noise_offset: float = 0.0,
) -> StepNoise:
    """Draw the VAE-sample noise, diffusion noise and timestep for each sample of a batch.

    Args:
        indices: ``(B,)`` dataset indices of the batch's samples.
        epoch: the epoch (a sample seen in another epoch gets new noise).
        seed: the run's seed.
        latent_shape: ``(C, h, w)`` of one latent.
        num_train_timesteps: the noise scheduler's ``num_train_timesteps``.
        noise_offset: scale of the per-channel offset added to the noise
            (https://www.crosslabs.org/blog/diffusion-with-offset-noise); 0 disables it.
    """
    eps, noises, steps = [], [], []
    channels = latent_shape[0]
    for index in indices.tolist():
        gen = sample_generator(seed, "noise", epoch, index)
        eps.append(torch.randn(latent_shape, generator=gen))
        noise = torch.randn(latent_shape, generator=gen)
        offset = torch.randn((channels, 1, 1), generator=gen)  # always drawn: the stream does not depend on the flag
        if noise_offset:
            noise = noise + noise_offset * offset
        noises.append(noise)
        steps.append(torch.randint(0, num_train_timesteps, (1,), generator=gen))
    return StepNoise(torch.stack(eps), torch.stack(noises), torch.cat(steps).long())


def compute_snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``alpha_bar_t / (1 - alpha_bar_t)`` per timestep, float32 ``(B,)``."""
    alpha_bar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alpha_bar / (1.0 - alpha_bar)


def snr_loss_weights(snr: torch.Tensor, snr_gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023, https://arxiv.org/abs/2303.09556), per sample ``(B,)``.

    The paper's weight ``min(SNR, gamma)`` is for predicting x0; for an epsilon model it becomes
    ``min(SNR, gamma) / SNR`` and for a v model ``min(SNR, gamma) / (SNR + 1)`` (its section 4.2).
    """
    clipped = torch.clamp(snr, max=snr_gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"unknown prediction_type {prediction_type!r}; choose from {PREDICTION_TYPES}")


def training_target(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the UNet should predict: the noise (``epsilon``), the velocity (``v_prediction``) or x0 (``sample``)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {prediction_type!r}; choose from {PREDICTION_TYPES}")


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor | None = None,
    alphas_cumprod: torch.Tensor | None = None,
    snr_gamma: float | None = None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Mean squared error in float32, optionally Min-SNR weighted per sample.

    Without ``snr_gamma`` this is exactly ``F.mse_loss(pred.float(), target.float())``.

    Returns:
        A 0-dim float32 tensor.
    """
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    if timesteps is None or alphas_cumprod is None:
        raise ValueError("snr_gamma needs timesteps and alphas_cumprod")
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, model_pred.dim())))
    weights = snr_loss_weights(compute_snr(alphas_cumprod, timesteps), snr_gamma, prediction_type)
    return (per_sample * weights).mean()
