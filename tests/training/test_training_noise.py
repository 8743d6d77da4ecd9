"""convlora.training.noise: per-sample draws, SNR weights, targets, loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr as diffusers_compute_snr

from convlora.diffusion.tiny import tiny_scheduler_config
from convlora.training.noise import compute_snr, diffusion_loss, draw_step_noise, snr_loss_weights, training_target

SHAPE = (4, 8, 8)


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(**tiny_scheduler_config())


def test_draws_do_not_depend_on_the_batch_a_sample_is_in():
    together = draw_step_noise(torch.tensor([3, 7]), epoch=2, seed=0, latent_shape=SHAPE, num_train_timesteps=1000)
    alone = [draw_step_noise(torch.tensor([i]), epoch=2, seed=0, latent_shape=SHAPE, num_train_timesteps=1000) for i in (3, 7)]
    assert torch.equal(together.noise, torch.cat([a.noise for a in alone]))
    assert torch.equal(together.latent_eps, torch.cat([a.latent_eps for a in alone]))
    assert torch.equal(together.timesteps, torch.cat([a.timesteps for a in alone]))
    assert together.timesteps.dtype == torch.int64 and together.noise.shape == (2, *SHAPE)


def test_draws_change_with_epoch_index_and_seed():
    base = draw_step_noise(torch.tensor([0]), 0, 0, SHAPE, 1000).noise
    for other in (draw_step_noise(torch.tensor([0]), 1, 0, SHAPE, 1000), draw_step_noise(torch.tensor([1]), 0, 0, SHAPE, 1000),
                  draw_step_noise(torch.tensor([0]), 0, 1, SHAPE, 1000)):
        assert not torch.equal(other.noise, base)


def test_timesteps_cover_the_range():
    t = draw_step_noise(torch.arange(2000), 0, 0, (1, 1, 1), 1000).timesteps
    assert int(t.min()) >= 0 and int(t.max()) <= 999 and len(set(t.tolist())) > 800


def test_noise_offset_adds_a_per_channel_constant():
    plain = draw_step_noise(torch.tensor([5]), 0, 0, SHAPE, 1000)
    offset = draw_step_noise(torch.tensor([5]), 0, 0, SHAPE, 1000, noise_offset=0.1)
    diff = offset.noise - plain.noise  # (1, C, h, w), constant over h, w
    assert torch.allclose(diff, diff[..., :1, :1].expand_as(diff), atol=1e-7)
    assert float(diff.abs().max()) > 0
    assert torch.equal(offset.timesteps, plain.timesteps) and torch.equal(offset.latent_eps, plain.latent_eps)


def test_snr_matches_diffusers(scheduler):
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(compute_snr(scheduler.alphas_cumprod, t), diffusers_compute_snr(scheduler, t), rtol=1e-6)


def test_min_snr_weights():
    snr = torch.tensor([0.5, 5.0, 50.0])
    assert torch.allclose(snr_loss_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.1]))
    assert torch.allclose(snr_loss_weights(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))
    assert torch.allclose(snr_loss_weights(snr, 5.0, "sample"), torch.tensor([0.5, 5.0, 5.0]))
    with pytest.raises(ValueError, match="unknown prediction_type 'x0'"):
        snr_loss_weights(snr, 5.0, "x0")


def test_targets(scheduler):
    latents, noise, t = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE), torch.tensor([3, 900])
    assert training_target(scheduler, latents, noise, t, "epsilon") is noise
    assert torch.equal(training_target(scheduler, latents, noise, t, "v_prediction"), scheduler.get_velocity(latents, noise, t))
    assert training_target(scheduler, latents, noise, t, "sample") is latents


def test_loss_is_plain_mse_without_gamma_and_weighted_with_it(scheduler):
    pred, target = torch.randn(3, *SHAPE, dtype=torch.bfloat16), torch.randn(3, *SHAPE)
    loss = diffusion_loss(pred, target)
    assert loss.dtype == torch.float32 and torch.equal(loss, F.mse_loss(pred.float(), target))
    t = torch.tensor([5, 400, 990])
    weighted = diffusion_loss(pred, target, t, scheduler.alphas_cumprod, snr_gamma=5.0)
    per_sample = ((pred.float() - target) ** 2).mean(dim=(1, 2, 3))
    snr = diffusers_compute_snr(scheduler, t)
    expected = (per_sample * torch.clamp(snr, max=5.0) / snr).mean()
    assert torch.allclose(weighted, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="snr_gamma needs timesteps"):
        diffusion_loss(pred, target, snr_gamma=5.0)
