"""A LoRA from the difference of two models: ``ΔW = W_tuned - W_base``, per Linear and Conv, by SVD.

BASE and TUNED are diffusers pipeline folders or single models saved with ``save_pretrained`` (a
UNet folder, a CLIP text-model folder). Which tensor is which layer's weight comes from the model
built from its config on the ``meta`` device (no weight allocated); the weights themselves are read
from the safetensors files one tensor at a time (never unpickled), so at most one module of each
model is in memory, in float32, at a time.

Each adaptable module (Linear, Conv1d/2d/3d of any kernel and groups, GPT-2 ``Conv1D``) whose
``max |ΔW|`` exceeds ``min_diff`` becomes the best rank-k approximation of ΔW (Eckart–Young, via
:func:`convlora.lowrank.dense_svd`) with ``k = min(rank, m, n)`` (``conv_rank`` for k×k convs) and
``alpha = k`` (scaling 1, kohya's choice), singular values split evenly between A and B. kohya's
``extract_lora_from_models.py`` applies its ``--min_diff`` (default 0.01) to the text encoder as a
whole and clamps the factors at their 99% quantile; here the threshold is per module (default 0:
identical modules are skipped) and nothing is clamped, so the result is the exact truncation.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from convlora.formats.weights import COMPONENTS, LoRAFormatError, LoRAModule, LoRAWeights, nested_clip_path
from convlora.layers import LORA_CLASSES, conv_geometry_record, is_spatial_conv
from convlora.lowrank import dense_svd, lora_from_svd
from convlora.state import checked_rank

__all__ = ["ExtractReport", "extract_lora", "lora_of_delta", "model_folders"]

#: File names ``save_pretrained`` gives a model's weights (diffusers, transformers), and their shard indexes.
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


@dataclass
class ExtractReport:
    """What :func:`extract_lora` did."""

    extracted: dict[str, float] = field(default_factory=dict)
    """Module path -> retained Frobenius share ``‖ΔW_k‖_F / ‖ΔW‖_F``."""
    skipped: list[str] = field(default_factory=list)
    """Adaptable modules with ``max |ΔW| <= min_diff``."""
    other_changed: list[str] = field(default_factory=list)
    """Tensors a LoRA cannot carry (biases, norms, embeddings) that differ by more than ``min_diff``."""


# ---- reading the folders -------------------------------------------------------------------------
def model_folders(folder: str | os.PathLike) -> dict[str, Path]:
    """``{component: folder}`` of a pipeline folder (``unet``, ``text_encoder``, ``text_encoder_2``),
    or ``{"": folder}`` for a single model (a ``config.json`` in the folder itself).

    Raises:
        FileNotFoundError: neither.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    components = {name: folder / name for name in COMPONENTS if (folder / name / "config.json").is_file()}
    if components:
        return components
    if (folder / "config.json").is_file():
        return {"": folder}
    raise FileNotFoundError(f"{folder} is neither a diffusers pipeline folder nor a save_pretrained model folder (no config.json)")


def build_skeleton(folder: Path) -> nn.Module:
    """The model of a ``save_pretrained`` folder, built from its ``config.json`` on the meta device.

    Raises:
        LoRAFormatError: a config that names no diffusers / transformers model class.
    """
    import diffusers
    import transformers

    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise LoRAFormatError(f"{config_file} is not valid JSON ({err})") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    with torch.device("meta"):
        if isinstance(name, str) and isinstance(getattr(diffusers, name, None), type):
            cls = getattr(diffusers, name)
            return cls.from_config(cls.load_config(folder))
        names = config.get("architectures") if isinstance(config, dict) else None
        cls = getattr(transformers, names[0], None) if isinstance(names, list) and names else None
        if not isinstance(cls, type):
            raise LoRAFormatError(f"{config_file} names no diffusers (_class_name) or transformers (architectures) model class")
        return cls(cls.config_class.from_pretrained(folder))


def weight_files(folder: Path) -> dict[str, Path]:
    """``tensor key -> safetensors file`` of a model folder (one file, or a sharded one's index).

    Raises:
        LoRAFormatError: no safetensors weights (``.bin`` pickles are never read), or a bad index.
    """
    for name in _WEIGHT_FILES:
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                return {key: folder / file for key, file in weight_map.items()}
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise LoRAFormatError(f"{index} is not a safetensors shard index ({err})") from None
        if (folder / name).is_file():
            from safetensors import safe_open

            with safe_open(str(folder / name), framework="pt") as f:
                return dict.fromkeys(f.keys(), folder / name)
    raise LoRAFormatError(
        f"{folder} has no safetensors weights ({' or '.join(_WEIGHT_FILES)}); convlora never unpickles .bin files"
    )


class _TensorReader:
    """One tensor at a time from a model folder's safetensors files (kept open while in use)."""

    def __init__(self, folder: Path, stack: contextlib.ExitStack) -> None:
        from safetensors import safe_open

        self.folder = folder
        self.files = weight_files(folder)
        self._handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in set(self.files.values())}

    def key_of(self, key: str) -> str | None:
        """``key`` as stored: as given, or in the nested CLIP spelling (``text_model.``) older files use."""
        return next((k for k in (key, nested_clip_path(key)) if k in self.files), None)

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self.files[key]].get_tensor(key)


# ---- the architecture check ----------------------------------------------------------------------
def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``path -> module`` for every module LoRA can wrap (exact types of :data:`convlora.layers.LORA_CLASSES`)."""
    return {path: m for path, m in model.named_modules() if path and type(m) in LORA_CLASSES}


def check_same_architecture(base: nn.Module, tuned: nn.Module, component: str) -> None:
    """The same adaptable modules, of the same types and weight shapes.

    Raises:
        LoRAFormatError: naming the first modules that differ.
    """
    ours, theirs = adaptable_modules(base), adaptable_modules(tuned)
    where = f"{component}." if component else ""
    problems = [
        f"{where}{p}: BASE {_describe(m)}, TUNED {_describe(theirs[p])}"
        for p, m in ours.items()
        if p in theirs and (type(m) is not type(theirs[p]) or m.weight.shape != theirs[p].weight.shape)
    ]
    problems += [f"{where}{p} only in BASE" for p in ours if p not in theirs]
    problems += [f"{where}{p} only in TUNED" for p in theirs if p not in ours]
    if problems:
        more = f" ... ({len(problems) - 6} more)" if len(problems) > 6 else ""
        raise LoRAFormatError("BASE and TUNED are different architectures: " + "; ".join(problems[:6]) + more)


# ---- extraction ----------------------------------------------------------------------------------
def extract_lora(
    base: str | os.PathLike, tuned: str | os.PathLike, rank: int, conv_rank: int | None = None, min_diff: float = 0.0
) -> tuple[LoRAWeights, ExtractReport]:
    """The LoRA ``TUNED - BASE`` (see the module docstring for the rule).

    Returns:
        ``(weights, report)``; pipeline paths carry their component prefix (``unet.``).

    Raises:
        FileNotFoundError: a folder that is not there or not a model folder.
        LoRAFormatError: different architectures or components (named), missing weights, no
            difference at all.
    """
    rank = checked_rank(rank, "--rank")
    conv_rank = checked_rank(rank if conv_rank is None else conv_rank, "--conv-rank")
    if not (math.isfinite(min_diff) and min_diff >= 0):
        raise ValueError(f"--min-diff must be a finite number >= 0, got {min_diff}")
    base_folders, tuned_folders = model_folders(base), model_folders(tuned)
    if base_folders.keys() != tuned_folders.keys():
        raise LoRAFormatError(f"BASE has components {_kinds(base_folders)}, TUNED {_kinds(tuned_folders)}")
    skeletons = {}
    for component, folder in base_folders.items():
        skeletons[component] = build_skeleton(folder)
        check_same_architecture(skeletons[component], build_skeleton(tuned_folders[component]), component)
    modules, report = {}, ExtractReport()
    for component, skeleton in skeletons.items():
        prefix = f"{component}." if component else ""
        ranks = (rank, conv_rank, min_diff)
        modules.update(_extract_component(base_folders[component], tuned_folders[component], skeleton, ranks, report, prefix))
    if not modules:
        raise LoRAFormatError(f"TUNED does not differ from BASE in any Linear / Conv weight (by more than --min-diff {min_diff:g})")
    return LoRAWeights(modules), report


def _kinds(folders: dict[str, Path]) -> str:
    return "[] (a single model)" if "" in folders else str(sorted(folders))


def _extract_component(
    base: Path, tuned: Path, skeleton: nn.Module, settings: tuple[int, int, float], report: ExtractReport, prefix: str
) -> dict[str, LoRAModule]:
    """The LoRA modules of one component, one module at a time; fills ``report``.

    ``settings`` is ``(rank, conv_rank, min_diff)``.
    """
    rank, conv_rank, min_diff = settings
    modules = {}
    with contextlib.ExitStack() as stack:
        base_reader, tuned_reader = _TensorReader(base, stack), _TensorReader(tuned, stack)
        weight_keys = set()
        for path, layer in adaptable_modules(skeleton).items():
            base_key, tuned_key = _stored_key(base_reader, f"{path}.weight"), _stored_key(tuned_reader, f"{path}.weight")
            weight_keys.update((base_key, tuned_key))
            delta = tuned_reader.get(tuned_key).float() - base_reader.get(base_key).float()  # the layer's weight layout
            if tuple(delta.shape) != tuple(layer.weight.shape):
                raise LoRAFormatError(
                    f"{prefix}{path}: stored weight {tuple(delta.shape)}, its config says {tuple(layer.weight.shape)}"
                )
            if float(delta.abs().max()) <= min_diff:
                report.skipped.append(prefix + path)
                continue
            k = conv_rank if is_spatial_conv(layer) else rank
            modules[prefix + path], report.extracted[prefix + path] = lora_of_delta(layer, delta, k)
        for key in sorted(set(base_reader.files) - weight_keys):
            tuned_key = tuned_reader.key_of(key)
            if tuned_key is not None and _max_difference(base_reader.get(key), tuned_reader.get(tuned_key)) > min_diff:
                report.other_changed.append(prefix + key)
    return modules


def _describe(module: nn.Module) -> str:
    return f"{type(module).__name__} {tuple(module.weight.shape)}"


def _stored_key(reader: _TensorReader, key: str) -> str:
    found = reader.key_of(key)
    if found is None:
        raise LoRAFormatError(f"{reader.folder} has no tensor {key} (or {nested_clip_path(key)}), which its config.json implies")
    return found


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    if not a.is_floating_point():
        return 0.0 if torch.equal(a, b) else math.inf
    return float((b.float() - a.float()).abs().max()) if a.numel() else 0.0


def lora_of_delta(layer: nn.Module, delta: torch.Tensor, rank: int) -> tuple[LoRAModule, float]:
    """The rank-``rank`` LoRA (alpha = its rank) of ``delta`` in ``layer``'s weight layout."""
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        matrix = delta  # (out, in) or (C_out, C_in/groups, *k)
    else:
        matrix = delta.T  # GPT-2 Conv1D stores (in, out)
    u, s, vh = dense_svd(matrix)  # (m, q), (q,), (q, n)
    k = min(rank, len(s))
    total = float(s.double().square().sum())
    retained = math.sqrt(float(s[:k].double().square().sum()) / total) if total > 0 else 1.0
    lora_a, lora_b = lora_from_svd(u, s, vh, k, 1.0, matrix.shape[1:], torch.float32)
    return LoRAModule(lora_a, lora_b, float(k), conv_geometry_record(layer)), retained
