"""Fixtures for the training tests: a tiny SD pipeline folder and a small captioned image set."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """The tiny SD-architecture pipeline (random weights, seed 0) saved in diffusers layout."""
    from convlora.diffusion.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "base", seed=0)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """8 generated 32x32 images with metadata.jsonl captions."""
    from convlora.training.data import write_toy_dataset

    return write_toy_dataset(tmp_path_factory.mktemp("toy") / "data", n=8, size=32)
