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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from convlora.atomic import apply_umask, fsync_dir, write_text_atomic
from convlora.inject import lora_layers
from convlora.io import read_safetensors, write_safetensors

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
#: Written last into a checkpoint folder; a folder without it is incomplete.
MARKER = "checkpoint.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from (missing, incomplete, made with other settings) or written."""


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


def resolve_resume_checkpoint(value: str, output_dir: str | Path, required: Sequence[str] = ()) -> Path | None:
    """The checkpoint folder ``--resume_from_checkpoint value`` means, checked for every file.

    Args:
        value: ``"latest"`` (the highest-step complete checkpoint in ``output_dir``), or a path to a
            checkpoint folder, or a bare ``checkpoint-<n>`` name looked up in ``output_dir``.
        required: files the caller needs in it (besides those its ``checkpoint.json`` lists).

    Returns:
        The folder, or None when ``value`` is ``"latest"`` and there is no complete checkpoint yet
        (a first run of a command that is simply re-run after interruptions).

    Raises:
        CheckpointError: an explicit path that does not exist or is not a complete checkpoint, or
            a checkpoint with a file missing (named).
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
        if found:
            check_files(found[-1][1], required)
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
    check_files(path, required)
    return path


def check_files(path: str | Path, required: Sequence[str] = ()) -> None:
    """Raise unless every file ``checkpoint.json`` lists, and every ``required`` one, is in ``path``.

    Raises:
        CheckpointError: naming the missing files (a checkpoint someone pruned by hand).
    """
    listed = read_marker(path).get("files")
    if not isinstance(listed, list) or not all(isinstance(f, str) for f in listed):
        raise CheckpointError(f"{Path(path) / MARKER} has no list of files; it was not written by this tool")
    missing = [name for name in dict.fromkeys([*listed, *required]) if not (Path(path) / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing {', '.join(missing)}; resume from another checkpoint")


def read_marker(path: str | Path) -> dict[str, Any]:
    """The contents of a checkpoint's ``checkpoint.json``.

    Raises:
        CheckpointError: it is missing or is not a JSON object.
    """
    marker = _read_json(Path(path) / MARKER)
    if not isinstance(marker, dict):
        raise CheckpointError(f"{Path(path) / MARKER} is not a JSON object")
    return marker


def check_settings(path: str | Path, settings: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> None:
    """Raise unless the checkpoint was made with these ``settings`` (recorded by :func:`save_checkpoint`).

    Args:
        settings: flag name -> value, e.g. ``{"--lora_alpha": 4.0}``; a checkpoint that recorded no
            settings (an older one) passes. A flag recorded by the checkpoint but absent here (a
            setting this run does not use, e.g. prior preservation) differs too.
        defaults: flag name -> the value a flag missing on either side had (flags recorded only where
            they differ from it, e.g. ``{"--adapter": "lora"}``); other missing flags read as None.

    Raises:
        CheckpointError: naming each differing setting with both values.
    """
    recorded = read_marker(path).get("settings")
    if recorded is None:
        return
    defaults = defaults or {}
    recorded = {**defaults, **recorded}
    settings = {**defaults, **settings}
    names = list(settings) + [name for name in recorded if name not in settings]
    differ = [f"{name} {recorded.get(name)!r} (checkpoint) vs {settings.get(name)!r} (this run)"
              for name in names if recorded.get(name) != settings.get(name)]
    if differ:
        raise CheckpointError(f"{path} was made with other settings: {'; '.join(differ)}. Resume with the "
                              "checkpoint's values, or start a new run in another --output_dir")


def check_adapter_unchanged(model: torch.nn.Module, lora_file: str | Path) -> None:
    """Raise unless the LoRA file's modules have the ranks and alphas of ``model``'s injected ones.

    ``load_lora`` takes each module's alpha from the file; resuming a checkpoint made with other
    LoRA settings would silently give modules that the run's own settings (and headers) misdescribe.

    Raises:
        CheckpointError: naming the first differing modules with both values.
    """
    _, header = read_safetensors(lora_file)
    try:
        table = json.loads(header["convlora_modules"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{lora_file} has no readable convlora module table") from None
    layers = lora_layers(model)
    differ = [
        f"{path}: {_described(entry.get('kind', 'lora'), entry.get('r'), entry.get('alpha'))} in the checkpoint; "
        f"{_described(layers[path].adapter().kind.label, layers[path].r, layers[path].lora_alpha)} in this run"
        for path, entry in table.items()
        if path in layers and (entry.get("kind", "lora"), entry.get("r"), entry.get("alpha"))
        != (layers[path].adapter().kind.label, layers[path].r, layers[path].lora_alpha)
    ]
    if differ:
        raise CheckpointError(f"{lora_file} was made with other LoRA settings ({len(differ)} modules differ, e.g. "
                              f"{differ[0]}); resume with the checkpoint's --adapter / --rank / --lora_alpha / "
                              "--conv_rank / --conv_alpha")


def _described(label: str, rank: Any, alpha: Any) -> str:
    """``"rank 8, alpha 8"``, with the kind in front where it is not plain LoRA (``"loha rank 4, alpha 4"``)."""
    return ("" if label == "lora" else f"{label} ") + f"rank {rank}, alpha {alpha}"


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
        info: JSON-serialisable extras for ``checkpoint.json`` (``"settings"``: see :func:`check_settings`).

    Returns:
        The final checkpoint folder.

    Raises:
        CheckpointError: the folder cannot be written (full disk, read-only); nothing of the new
            checkpoint is left behind and the earlier ones are untouched.
    """
    if total_limit is not None and total_limit < 1:
        raise ValueError(f"checkpoints_total_limit must be >= 1, got {total_limit}")
    root = Path(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_PREFIX}{step}.tmp-", dir=root))
    except OSError as err:
        raise _write_error(final, err) from err
    try:
        write(tmp)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        marker = {"format": FORMAT_VERSION, "step": step, "files": files, **(info or {})}
        write_json(tmp / MARKER, marker)
        apply_umask(tmp)
        fsync_dir(tmp)
        if final.exists():
            # Same step saved before (a run restarted from scratch in the same folder): swap it out.
            old = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_PREFIX}{step}.old-", dir=root))
            os.replace(final, old / final.name)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(root)
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(final, err) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if total_limit is not None:
        rotate_checkpoints(root, total_limit)
    return final


def _write_error(final: Path, err: Exception) -> CheckpointError:
    return CheckpointError(f"cannot write {final.name} in {final.parent}: {getattr(err, 'strerror', None) or err}; "
                           "the earlier checkpoints are untouched")


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


#: Names of what an interrupted save leaves: a checkpoint's temporary folder (``.checkpoint-<n>.tmp-*``,
#: or ``.old-*`` while one is swapped), and the temporary file of an atomic write (``.<name>.<8 chars>.tmp``,
#: made by :func:`write_json` and :func:`convlora.io.write_safetensors` next to the file they write).
INTERRUPTED_SAVE_RE = re.compile(rf"^(\.{CHECKPOINT_PREFIX}\d+\.(tmp|old)-[A-Za-z0-9_]+|\..+\.[A-Za-z0-9_]{{8}}\.tmp)$")


def remove_interrupted_saves(output_dir: str | Path) -> list[Path]:
    """Delete what killed saves left in ``output_dir`` (see :data:`INTERRUPTED_SAVE_RE`).

    Call it when no save can be running in ``output_dir`` (at the start of a run). Complete
    checkpoints, and ``checkpoint-<n>`` folders without a marker, are left alone.

    Returns:
        The deleted paths.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    removed = []
    for child in sorted(root.iterdir()):
        if INTERRUPTED_SAVE_RE.match(child.name):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed.append(child)
    return removed


def _tmp_step(path: Path) -> int | None:
    match = re.match(rf"^\.{CHECKPOINT_PREFIX}(\d+)\.", path.name)
    return int(match.group(1)) if match else None


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (:func:`convlora.atomic.write_text_atomic`); non-finite floats are refused."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


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
        write_safetensors(_unshared(tensors), folder / f"{name}.safetensors")
    write_json(folder / f"{name}.json", structure)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with a copy of each tensor whose storage an earlier one uses (safetensors refuses
    shared storage; bitsandbytes' 8-bit optimizers share one quantization map between all parameters).
    Loading gives each place its own equal tensor."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if ptr in seen and tensor.numel() else tensor
        seen.add(ptr)
    return out


def read_state(folder: str | Path, name: str) -> Any:
    """Inverse of :func:`write_state` (tensors come back on the CPU).

    Raises:
        CheckpointError: ``<name>.json`` is missing or not JSON, or a tensor it refers to is not in
            ``<name>.safetensors`` (missing or unreadable file).
    """
    folder = Path(folder)
    structure = _read_json(folder / f"{name}.json")
    tensor_file = folder / f"{name}.safetensors"
    tensors = {}
    if tensor_file.is_file():
        try:
            tensors = read_safetensors(tensor_file)[0]
        except ValueError as err:
            raise CheckpointError(str(err)) from None
    try:
        return _decode(structure, tensors)
    except KeyError as err:
        raise CheckpointError(f"{folder / f'{name}.json'} refers to tensor {err.args[0]!r}, which "
                              f"{tensor_file.name} {'lacks' if tensor_file.is_file() else 'would hold, but it is missing'}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not readable JSON: {err}") from None


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
