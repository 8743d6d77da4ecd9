"""Fixtures for the training tests: a tiny SD pipeline folder and a small captioned image set."""

from __future__ import annotations

import os
import subprocess
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


def _mount_tmpfs(mount: Path, options: str) -> None:
    """Mount a tmpfs (a real small or read-only filesystem); skip the test where that is not allowed."""
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs permission to mount a tmpfs")


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 64 KiB tmpfs: a disk that fills up for real."""
    mount = tmp_path / "small"
    _mount_tmpfs(mount, "size=64k")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def full_filesystem(tiny_filesystem):
    """The 64 KiB tmpfs, filled to the last byte."""
    with open(tiny_filesystem / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 1024)
        except OSError:  # ENOSPC: full
            pass
    return tiny_filesystem


@pytest.fixture
def read_only_filesystem(tmp_path):
    """A tmpfs mounted read-only (root ignores a folder's permission bits, so chmod would not do)."""
    mount = tmp_path / "ro"
    _mount_tmpfs(mount, "ro,size=64k")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)
