"""Training checkpoints: atomic, numerically rotated, resumable, never pickled.

A checkpoint is a folder ``<output_dir>/checkpoint-<step>``. It is written into a temporary
folder ``<output_dir>/.checkpoint-<step>.tmp-<random>`` and renamed into place only when every
file in it is complete (``checkpoint.json`` is written last), so a crash -- even SIGKILL -- while
saving leaves the previous checkpoints untouched and at most an ignored temporary folder.

What goes in is up to the caller (:func:`save_checkpoint` takes a ``write(folder)`` callback);
:func:`write_state` / :func:`read_state` store any nested state (an optimizer's or LR scheduler's
``state_dict()``) as safetensors + JSON, so loading a checkpoint never unpickles anything.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from convlora.io import read_safetensors, write_safetensors

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
#: Written last into a checkpoint folder; a folder without it is incomplete.
MARKER = "checkpoint.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint to resume from is missing or incomplete."""


# ---- finding checkpoints ------------------------------------------------------------------------


def checkpoint_step(path: str | Path) -> int | None:
    """The step number of a ``checkpoint-<step>`` folder name, else None."""
    match = CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a finished checkpoint folder (its marker file is there)."""
    return (Path(path) / MARKER).is_file()


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` as ``(step, path)``, sorted by step number.

    Numeric order: ``checkpoint-9`` comes before ``checkpoint-10``. Temporary folders and
    ``checkpoint-<n>`` folders without the marker are left out.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = checkpoint_step(child)
        if step is not None and child.is_dir() and is_complete(child):
            found.append((step, child))
    return sorted(found)


def incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Temporary folders of interrupted saves and ``checkpoint-<n>`` folders without a marker."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted(
        child
        for child in root.iterdir()
        if child.is_dir()
        and (
            child.name.startswith(f".{CHECKPOINT_PREFIX}")
            or (checkpoint_step(child) is not None and not is_complete(child))
        )
    )


def resolve_resume_checkpoint(value: str, output_dir: str | Path) -> Path | None:
    """The checkpoint folder ``--resume_from_checkpoint value`` means.

    Args:
        value: ``"latest"`` (the highest-step complete checkpoint in ``output_dir``), or a path to a
            checkpoint folder, or a bare ``checkpoint-<n>`` name looked up in ``output_dir``.

    Returns:
        The folder, or None when ``value`` is ``"latest"`` and there is no complete checkpoint yet
        (a first run of a command that is simply re-run after interruptions).

    Raises:
        CheckpointError: an explicit path that does not exist or is not a complete checkpoint.
    """
    if value == "latest":
        partial = incomplete_checkpoints(output_dir)
        if partial:
            warnings.warn(
                "ignoring incomplete checkpoint folder(s) from an interrupted save: "
                + ", ".join(p.name for p in partial),
                stacklevel=2,
            )
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(value)
    if not path.exists() and not path.is_absolute() and len(path.parts) == 1:
        path = Path(output_dir) / value  # diffusers accepts a bare checkpoint name
    if not path.is_dir():
        raise CheckpointError(
            f"--resume_from_checkpoint {value!r}: no such checkpoint folder"
            + (f" (looked in {output_dir})" if len(Path(value).parts) == 1 else "")
            + ". Use 'latest' to continue from the newest checkpoint if there is one."
        )
    if not is_complete(path):
        raise CheckpointError(f"--resume_from_checkpoint {value!r}: {path} is incomplete (no {MARKER}); it was not finished")
    return path


def read_marker(path: str | Path) -> dict[str, Any]:
    """The contents of a checkpoint's ``checkpoint.json``."""
    return json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))


# ---- saving and rotating ------------------------------------------------------------------------


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    write: Callable[[Path], None],
    total_limit: int | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically, then delete the oldest beyond ``total_limit``.

    Args:
        output_dir: where checkpoints live.
        step: the optimizer step the checkpoint holds.
        write: fills the (temporary) folder it is given with the checkpoint's files.
        total_limit: keep at most this many complete checkpoints (oldest by step number deleted,
            only after the new one is complete); None keeps all.
        info: JSON-serialisable extras for ``checkpoint.json``.

    Returns:
        The final checkpoint folder.
    """
    if total_limit is not None and total_limit < 1:
        raise ValueError(f"checkpoints_total_limit must be >= 1, got {total_limit}")
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_PREFIX}{step}.tmp-", dir=root))
    try:
        write(tmp)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        marker = {"format": FORMAT_VERSION, "step": step, "files": files, **(info or {})}
        write_json(tmp / MARKER, marker)
        _apply_umask(tmp)
        _fsync_dir(tmp)
        if final.exists():
            # Same step saved before (a run restarted from scratch in the same folder): swap it out.
            old = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_PREFIX}{step}.old-", dir=root))
            os.replace(final, old / final.name)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if total_limit is not None:
        rotate_checkpoints(root, total_limit)
    return final


def rotate_checkpoints(output_dir: str | Path, total_limit: int) -> list[Path]:
    """Delete the lowest-step complete checkpoints so that at most ``total_limit`` remain.

    Also removes leftovers of interrupted saves (``.checkpoint-*`` temporary folders) older than
    the newest complete checkpoint. Returns the deleted folders.
    """
    found = list_checkpoints(output_dir)
    doomed = [path for _, path in found[: max(0, len(found) - total_limit)]]
    newest = found[-1][0] if found else None
    for path in incomplete_checkpoints(output_dir):
        step = _tmp_step(path)
        if path.name.startswith(".") and newest is not None and step is not None and step < newest:
            doomed.append(path)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _tmp_step(path: Path) -> int | None:
    match = re.match(rf"^\.{CHECKPOINT_PREFIX}(\d+)\.", path.name)
    return int(match.group(1)) if match else None


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (temporary file + fsync + rename); non-finite floats are refused."""
    path = Path(path)
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _apply_umask(folder: Path) -> None:
    """Give ``folder`` and its files the permissions a plain mkdir / open would have had
    (temporary files and folders are created private, 0600 / 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _fsync_dir(path: Path) -> None:
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


# ---- state dicts without pickle -----------------------------------------------------------------


def write_state(folder: str | Path, name: str, state: Any) -> None:
    """Store a nested state (dicts, lists, tuples, tensors, numbers, strings) as
    ``<name>.safetensors`` (the tensors) + ``<name>.json`` (the structure).

    Raises:
        ValueError: a tensor or float is NaN/inf (nothing non-finite is ever written).
        TypeError: a value of another kind (its place in the structure is named).
    """
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, name, tensors)
    folder = Path(folder)
    if tensors:
        write_safetensors(tensors, folder / f"{name}.safetensors")
    write_json(folder / f"{name}.json", structure)


def read_state(folder: str | Path, name: str) -> Any:
    """Inverse of :func:`write_state` (tensors come back on the CPU)."""
    folder = Path(folder)
    structure = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    tensor_file = folder / f"{name}.safetensors"
    tensors = read_safetensors(tensor_file)[0] if tensor_file.is_file() else {}
    return _decode(structure, tensors)


_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"


def _encode(value: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        # Keyed by its place in the structure, so equal states give equal files whatever the dict order.
        if where in tensors:
            raise ValueError(f"two tensors at {where} (keys that differ only in type?)")
        tensors[where] = value.detach().cpu()
        return {_TENSOR: where}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"state {where} is non-finite ({value}); refusing to write it")
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, f"{where}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{where}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, f"{where}.{k}", tensors) for k, v in value.items()}
        return {_DICT: [[_encode(k, f"{where}.key", tensors), _encode(v, f"{where}.{k}", tensors)] for k, v in value.items()]}
    raise TypeError(f"cannot store {type(value).__name__} at {where} without pickling")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if _TENSOR in value:
            return tensors[value[_TENSOR]]
        if _TUPLE in value:
            return tuple(_decode(v, tensors) for v in value[_TUPLE])
        if _DICT in value:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value[_DICT]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value
