"""Atomic writes: every file and folder convlora writes appears whole, or not at all.

One rule for every writer (adapter files, PEFT configs, checkpoint JSON, pipelines): the content is
written to a hidden temporary sibling (``.<name>.<8 chars>.tmp``), flushed to disk, given the
permissions a plain ``open`` / ``mkdir`` would have had, and renamed into place. An error removes
the temporary file and leaves ``path`` as it was; a crash leaves at most the hidden sibling, which
:func:`convlora.training.checkpoints.remove_interrupted_saves` recognises.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["apply_umask", "current_umask", "fsync_dir", "replace_folder", "write_file_atomic", "write_text_atomic"]


def write_file_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a temporary file beside ``path``, which then replaces ``path`` in one rename.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`write_file_atomic`)."""
    return write_file_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def replace_folder(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a whole folder atomically: ``write(tmp)`` fills a temporary sibling, which then takes ``path``'s place.

    Files already in ``path`` that ``write`` does not produce (a README, other models) are carried
    over. An error (a full disk, a failing ``write``) removes the temporary folder and leaves ``path``
    as it was; a crash leaves at most a hidden ``.<name>.*.tmp`` sibling, never a half-written ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; give the usual folder mode
        if path.exists():
            _carry_over(path, tmp)
            old = tmp.with_name(tmp.name[: -len(".tmp")] + ".old")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _carry_over(src: Path, dst: Path) -> None:
    """Copy into ``dst`` every entry of ``src`` that ``dst`` lacks (folders present in both: recursively)."""
    for entry in src.iterdir():
        target = dst / entry.name
        if entry.is_dir() and not entry.is_symlink():
            if target.is_dir():
                _carry_over(entry, target)
            elif not target.exists():
                shutil.copytree(entry, target, symlinks=True)
        elif not target.exists():
            shutil.copy2(entry, target, follow_symlinks=False)


def current_umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the permissions a plain mkdir / open would have had
    (temporary files and folders are created private, 0600 / 0700)."""
    umask = current_umask()
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (the renames into it) to disk, where the platform allows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
