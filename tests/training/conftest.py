"""Fixtures for the training tests: a tiny SD pipeline folder, a small captioned image set, the script as a module."""

from __future__ import annotations

import importlib.util
import sys
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


@pytest.fixture(scope="session")
def tiny_sdxl_base(tmp_path_factory) -> Path:
    """The tiny SDXL pipeline (random weights, seed 0) saved in diffusers layout."""
    from convlora.diffusion.tiny import save_tiny_sdxl_pipeline

    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "base", seed=0)


@pytest.fixture(scope="session")
def mixed_aspect_data(tmp_path_factory) -> Path:
    """8 captioned images of three aspect ratios (3 wide 40x24, 3 tall 24x40, 2 square 32x32) with
    .txt captions; with --resolution 32 and buckets of side steps 8 each lands in its own bucket."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("mixed") / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 24)] * 3 + [(24, 40)] * 3 + [(32, 32)] * 2):
        pixels = (rng.uniform(0, 1, (h, w, 3)) ** 2 * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text("a photo of a sks ball")
    return folder


@pytest.fixture(scope="module")
def script():
    """The training script imported as a module (its functions, without launching it)."""
    from train_script_helpers import SCRIPT

    spec = importlib.util.spec_from_file_location("train_text_to_image_lora", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
