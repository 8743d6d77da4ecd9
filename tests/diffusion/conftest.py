"""Shared tiny models for the diffusion tests: built once per session, deep-copied per test."""

from __future__ import annotations

import copy

import pytest
import torch


@pytest.fixture(scope="session")
def _tiny_pipeline_template():
    from convlora.diffusion.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@pytest.fixture
def tiny_pipeline(_tiny_pipeline_template):
    """A fresh copy of the tiny SD pipeline (UNet, VAE, CLIP text encoder, tokenizer), eval mode."""
    return copy.deepcopy(_tiny_pipeline_template)


@pytest.fixture
def unet(tiny_pipeline):
    return tiny_pipeline.unet


@pytest.fixture
def text_encoder(tiny_pipeline):
    return tiny_pipeline.text_encoder


@pytest.fixture(scope="session")
def unet_inputs():
    """(latents (2, 4, 8, 8), timesteps (2,), text states (2, 77, 32)) — fixed random inputs."""
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([10, 500]),
        torch.randn(2, 77, 32, generator=g),
    )


@pytest.fixture(scope="session")
def token_ids():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 998, (2, 77), generator=g)
