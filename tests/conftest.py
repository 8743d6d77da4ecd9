"""Project-wide test settings, and real small / full / read-only filesystems."""

import os
import subprocess
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests use tiny models on 2 shared cores, where a second OpenMP thread only spins: a tiny UNet
    forward measured 11 ms with one thread and 1.8 s with two while other jobs ran."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
