"""``convlora doctor``: which loaders will accept a LoRA file, and why not.

Each loader gets a verdict: ``ok``; ``wrong`` (it loads, but computes something else, e.g. a
different alpha); ``no`` (it refuses the file, or silently drops part of it); ``n/a`` (not that
loader's format — the verdict says how to convert). The rules restate what the loaders do:

- diffusers 0.42 ``load_lora_weights``: every key must contain ``lora``; the *first* key decides
  the key style and keys of another style are dropped; a kohya file (every key ``lora_unet_`` /
  ``lora_te*_``) goes through its converter, which keeps per-module alphas only where its renamed
  key still names the module — not for UNet attention projections nor text-encoder modules, which
  get the component's most common alpha. Alpha of PEFT-style keys comes from
  ``lora_adapter_metadata`` (``alpha = rank`` without it).
- ComfyUI and AUTOMATIC1111: see :mod:`convlora.formats.ui_loaders` (which modules each maps by
  name, and the scale it applies). ComfyUI skips diffusers-spelled attention projections and
  uses scale 1 without ``.alpha`` tensors; A1111 maps no dotted key at all and renumbers
  diffusers-spelled UNet names by SD-1.x's block layout, which ``--base`` checks.
- Every loader: a NaN / inf tensor, or an alpha that is not a positive finite number, is a failure
  (kohya's sd-scripts read alpha 0 as alpha = rank, A1111 and ComfyUI as a switched-off module).
- PEFT ``PeftModel.from_pretrained``: a folder with ``adapter_config.json``; modules outside its
  ``target_modules`` are dropped; ``rank_pattern`` must give each LoRA / DoRA / LoHa module its tensor
  rank. Per kind (:mod:`convlora.formats.peft_kinds`): DoRA needs a ``lora_magnitude_vector`` on every
  module and no grouped conv; LoHa / LoKr what ``lycoris_write_problems`` allows (Linear, Conv1d, Conv2d;
  no rsLoRA, no GPT-2 Conv1D); LoKr the shapes ``peft_lokr_shapes`` builds from ``r``,
  ``decompose_factor`` and ``decompose_both`` (other names are left at their initial values, other
  shapes raise), and no Conv1d with a full ``lokr_w2``. PEFT reads its Tucker form
  (``use_effective_conv2d``: ``hada_t1`` / ``hada_t2`` / ``lokr_t2``); convlora does not.
- DoRA in diffusers files: ``lora_magnitude_vector`` keys load (the UNet's with or without ``.weight``),
  except a text encoder's without ``.weight``, which is left unused
  (:func:`convlora.formats.diffusers.ignored_magnitude_keys`); one ``use_dora`` per component.
- LoHa / LoKr / DoRA in kohya files (LyCORIS's keys, :mod:`convlora.formats.kohya`): ComfyUI and
  A1111 read LoHa and LoKr fully (:mod:`convlora.formats.ui_loaders`); diffusers 0.42's kohya
  import renames only ``lora_down`` / ``lora_up`` / ``alpha`` and raises on the others
  (``lora_conversion_utils._convert_non_diffusers_lora_to_diffusers``: "The following keys have not
  been correctly renamed"), and ``StableDiffusionLoraLoaderMixin.lora_state_dict`` drops every
  ``dora_scale`` key (a DoRA file loads as plain LoRA). The DoRA axis: convlora, PEFT and diffusers
  normalise per output channel; LyCORIS per output channel with ``wd_on_out=True`` (its default, and
  what ``make_module_from_state_dict`` rebuilds -- a ``(1, in, ...)`` scale does not even copy into
  that), per input channel with ``wd_on_out=False``; ComfyUI and A1111 see
  :mod:`convlora.formats.ui_loaders` (neither computes convlora's output-axis DoRA).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from convlora.formats import read_lora_file
from convlora.formats.detect import detect_format, lora_file_of
from convlora.formats.diffusers import METADATA_KEY, ignored_magnitude_keys
from convlora.formats.kohya import KOHYA_PREFIXES, kohya_name, kohya_name_to_path, unet_layout_of
from convlora.formats.ldm_names import LDM_FLAT_NAME, LDMNames
from convlora.formats.peft import ADAPTER_CONFIG, KEY_PREFIX, LYCORIS_DEFAULT, rank_for
from convlora.formats.peft_kinds import (
    LOKR_NAMES,
    MAGNITUDE,
    TUCKER_NAMES,
    dora_grouped_problems,
    is_peft_conv1d_full_kron,
    lokr_base_shape,
    lycoris_write_problems,
    peft_lokr_shapes,
)
from convlora.formats.ui_loaders import UNetNames, a1111_target, a1111_unet_name, a1111_view, comfyui_maps, comfyui_view
from convlora.formats.weights import COMPONENTS, FORMAT_KINDS, LoRAFormatError, LoRAWeights, conv_geometry_problems, fits_module, resolve_paths
from convlora.layers import LORA_CLASSES
from convlora.io import read_safetensors
from convlora.state import scaling_for

# key style -> pattern of its keys
_STYLES = {
    "PEFT (lora_A/lora_B)": re.compile(r"\.(lora_[AB]\.weight|lora_magnitude_vector(\.weight)?)$"),
    "old diffusers (lora.down/up)": re.compile(r"(\.lora\.(down|up)|\.lora_linear_layer\.(down|up)|_lora\.(down|up))\.weight$"),
    "kohya (lora_down/lora_up/alpha)": re.compile(r"\.(lora_down\.weight|lora_up\.weight|alpha)$"),
    "convlora native (lora_A/lora_B)": re.compile(r"\.lora_[AB]$"),
}
_PEFT_KEY = re.compile(r"(?P<path>.+)\.(?P<name>lora_[AB]|lora_magnitude_vector|hada_\w+|lokr_\w+)(\.weight)?$")
_UNET_ATTENTION = re.compile(r"\.(to_q|to_k|to_v|to_out\.0)$")


@dataclass
class Verdict:
    loader: str
    status: str  # "ok" | "wrong" | "no" | "n/a"
    reasons: list[str] = field(default_factory=list)
    primary: bool = False
    """A loader the file's own format is made for (its failure makes the file unhealthy)."""


@dataclass
class Diagnosis:
    path: Path
    format: str | None
    summary: list[str]
    verdicts: list[Verdict]

    @property
    def healthy(self) -> bool:
        """convlora and the loaders of the file's own format load it and compute what it says.

        Warnings about other loaders (e.g. ComfyUI reading a diffusers file) do not count.
        """
        return all(v.status == "ok" for v in self.verdicts if v.primary)

    def render(self) -> str:
        lines = [f"file: {self.path}", *self.summary]
        for v in self.verdicts:
            lines.append(f"  [{v.status:>5}] {v.loader}{'' if v.primary else '  (other format)'}")
            lines += [f"          - {r}" for r in v.reasons]
        return "\n".join(lines)


def diagnose(path: str | os.PathLike, base: dict[str, nn.Module] | None = None) -> Diagnosis:
    """Check ``path`` (a LoRA file or PEFT folder) against each loader's rules.

    Args:
        base: optional ``{"unet": model, "text_encoder": model}`` (or ``{"": model}`` for a single
            model) to check that every module of the file exists there with the right shapes.
    """
    file, is_peft_folder = lora_file_of(path)
    tensors, header = read_safetensors(file)
    keys = list(tensors)
    styles = Counter(next((s for s, rx in _STYLES.items() if rx.search(k)), "unknown") for k in keys)
    try:
        fmt = "peft" if is_peft_folder else detect_format(keys, header)
    except ValueError as err:
        verdicts = [Verdict(name, "no", ["no LoRA keys"], primary=True) for name in _LOADERS]
        if any(_lycoris_part(k) and not k.endswith(".dora_scale") for k in keys):  # e.g. unet.<path>.hada_w1_a: a diffusers-spelled LoHa / LoKr
            verdicts[1].reasons = [_no_lora_keys(keys)]
        return Diagnosis(Path(path), None, [f"format: none ({err})"], verdicts)
    summary = [f"format: {fmt}, {len(keys)} tensors"]
    try:
        _, weights = read_lora_file(path)
    except ValueError as err:
        weights = None
        convlora_verdict = Verdict(_LOADERS[0], "no", [str(err)])
    else:
        convlora_verdict = Verdict(_LOADERS[0], "ok")
        summary += _describe(weights)
        if base is not None:
            convlora_verdict.reasons += _check_base(weights, base)
            if convlora_verdict.reasons:
                convlora_verdict.status = "no"
    if len([s for s in styles if s != "unknown"]) > 1:
        summary.append("key styles: " + ", ".join(f"{s} x{n}" for s, n in styles.items()))
    unet_names = _unet_names(base, summary)
    file = _FileKeys.of(tensors, header, weights)
    peft_verdict = _peft_verdict(fmt, path if is_peft_folder else None, weights, tensors)
    values = _value_problems(tensors, header, weights)
    verdicts = [
        convlora_verdict,
        _diffusers_verdict(fmt, keys, header, styles, weights, peft_loads=peft_verdict.status == "ok" and not values),
        _comfyui_verdict(fmt, file, unet_names),
        _a1111_verdict(fmt, file, unet_names),
        peft_verdict,
        _lycoris_verdict(fmt, file),
    ]
    # A kohya file of LyCORIS kinds is made for the LyCORIS loaders, not diffusers' kohya import.
    lycoris_kinds = any(_lycoris_part(k) for k in keys)
    own = {"diffusers": (0, 1), "kohya": (0, 2, 3, 5) if lycoris_kinds else (0, 1, 2, 3, 5), "peft": (0, 4), "native": (0,)}[fmt]
    for index in own:
        verdicts[index].primary = True
    for v in verdicts if values else ():
        v.status, v.reasons = "no", values + v.reasons
    return Diagnosis(Path(path), fmt, summary, verdicts)


_LOADERS = (
    "convlora (load_pipeline_lora / convert)",
    "diffusers StableDiffusionPipeline.load_lora_weights",
    "ComfyUI (LoraLoader)",
    "AUTOMATIC1111 (extensions-builtin/Lora)",
    "PEFT PeftModel.from_pretrained",
    "LyCORIS (lycoris.kohya.create_network_from_weights)",
)

#: Key parts of LyCORIS's kinds in kohya files (``<name>.<part>``).
_LYCORIS_PARTS = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".lokr_w1", ".lokr_w1_a", ".lokr_w1_b",
                  ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".dora_scale")


def _lycoris_part(key: str) -> bool:
    return key.endswith(_LYCORIS_PARTS)


def _describe(weights: LoRAWeights) -> list[str]:
    parts = Counter(next((c for c in COMPONENTS if p.startswith(c + ".")), "(single model)") for p in weights.modules)
    ranks = Counter(m.r for m in weights.modules.values())
    alphas = Counter(m.alpha for m in weights.modules.values())
    lines = [
        "modules: " + ", ".join(f"{c} {n}" for c, n in parts.items()),
        "rank: " + ", ".join(f"{r} x{n}" for r, n in ranks.most_common()),
        "alpha: " + ", ".join(f"{a:g} x{n}" for a, n in alphas.most_common()) + (" (rsLoRA)" if weights.use_rslora else ""),
    ]
    kinds = Counter(m.kind.label for m in weights.modules.values())
    if set(kinds) != {"lora"}:
        lines.append("kinds: " + ", ".join(f"{k} x{n}" for k, n in kinds.most_common()))
    if any(m.kind.use_dora for m in weights.modules.values()):
        lines.append(DORA_AXIS_NOTE)
    return lines


#: The DoRA axis per target, as the doctor's summary states it for a file with DoRA.
DORA_AXIS_NOTE = (
    "DoRA axis: convlora's magnitude is per output channel (as PEFT and diffusers compute it; in kohya files "
    "dora_scale (out, 1, ...), as LyCORIS writes and loads it with wd_on_out=True, its default; LyCORIS's "
    "wd_on_out=False is per input channel); ComfyUI takes the axis from dora_scale's shape but divides by the "
    "base weight's norms on the output axis; A1111 always normalises per input channel"
)


def _diffusers_verdict(fmt, keys, header, styles, weights, peft_loads: bool = False) -> Verdict:
    from convlora.formats import is_sdxl

    xl = weights is not None and is_sdxl(weights)  # SDXL's loader renumbers LDM names itself
    v = Verdict(f"diffusers StableDiffusion{'XL' if xl else ''}Pipeline.load_lora_weights", "ok")
    if fmt == "native":
        return Verdict(v.loader, "n/a", _unportable(weights, fmt="diffusers") or ["convlora's own file: `convlora convert FILE OUT --to diffusers`"])
    if fmt == "peft":
        return Verdict(v.loader, "n/a", _peft_folder_for_diffusers(weights, peft_loads))
    refused = _no_lora_keys(keys)
    if refused:
        v.status = "no"
        v.reasons.append(refused)
    if fmt == "kohya":
        others = [k for k in keys if not k.startswith(KOHYA_PREFIXES)]
        if others:
            v.status = "no"
            v.reasons.append(f"not every key starts with lora_unet_/lora_te*_, so its kohya converter is not used: {', '.join(others[:5])}")
        ldm = [k.split(".")[0] for k in keys if k.startswith("lora_unet_") and LDM_FLAT_NAME.match(k[len("lora_unet_") :])]
        if ldm and not xl:
            v.status = "no"
            v.reasons.append(
                f"{len(set(ldm))} UNet module(s) have LDM names ({ldm[0]}): StableDiffusionPipeline's kohya import "
                "does not renumber them (only StableDiffusionXLPipeline's does) and load_lora_weights fails; "
                "`convlora convert FILE OUT --to kohya` writes diffusers-spelled names"
            )
        elif weights is not None:
            v.reasons += _kohya_alpha_losses(weights)
            if v.reasons and v.status == "ok":
                v.status = "wrong"
        _add_diffusers_kind_losses(v, keys)
    else:
        used = [s for s in styles if s != "unknown"]
        if len(used) > 1:
            first = next(s for s, rx in _STYLES.items() if rx.search(keys[0]))
            v.status = "no"
            v.reasons.append(f"mixed key styles {used}: the first key decides ({first}); the others are silently dropped")
        unknown = [k for k in keys if not any(rx.search(k) for rx in _STYLES.values())]
        if unknown:
            v.status = "no"
            v.reasons.append(f"unknown key suffixes: {', '.join(unknown[:5])}")
        _add_diffusers_dora_losses(v, keys)
        if weights is not None:
            v.reasons += _metadata_problems(header, weights)
            if v.reasons and v.status == "ok":
                v.status = "wrong"
    if weights is not None and weights.unprefixed() and v.status == "ok":
        v.status = "no"
        v.reasons.append("keys have no unet./text_encoder. prefix, so no pipeline component takes them")
    return v


def _add_diffusers_kind_losses(v: Verdict, keys: list[str]) -> None:
    """What diffusers' kohya import does with LyCORIS kinds (see the module docstring): LoHa / LoKr keys
    make it raise, ``dora_scale`` keys are dropped."""
    kinds = sorted({k.rsplit(".", 1)[0] for k in keys if _lycoris_part(k) and not k.endswith(".dora_scale")})
    dora = sorted({k.rsplit(".", 1)[0] for k in keys if k.endswith(".dora_scale")})
    if kinds:
        v.status = "no"
        v.reasons.append(
            f"its kohya import renames only lora_down / lora_up / alpha, so the LoHa / LoKr keys of {len(kinds)} "
            f"module(s) make it raise 'The following keys have not been correctly renamed': {_short(kinds, 4)}"
        )
    if dora:
        v.status = "no" if v.status == "no" else "wrong"
        v.reasons.append(
            f"it drops every dora_scale key ('DoRA checkpoint that is not compatible'), so {len(dora)} DoRA "
            f"module(s) load as plain LoRA: {_short(dora, 4)}"
        )


def _no_lora_keys(keys: list[str]) -> str | None:
    """Why diffusers' SD-1.x / SDXL ``load_lora_weights`` refuses keys without ``lora`` ("Invalid LoRA
    checkpoint", ``loaders/lora_pipeline.py``; :data:`convlora.formats.weights.FORMAT_KIND_LIMITS`)."""
    no_lora = [k for k in keys if "lora" not in k]
    if not no_lora:
        return None
    loha_lokr = any(_lycoris_part(k) and not k.endswith(".dora_scale") for k in no_lora)
    kinds = " (LoHa's hada_* and LoKr's lokr_* keys: it loads LoRA and DoRA only)" if loha_lokr else ""
    return f"keys without 'lora' make it refuse the file ('Invalid LoRA checkpoint'){kinds}: {', '.join(no_lora[:5])}"


def _peft_folder_for_diffusers(weights: LoRAWeights | None, peft_loads: bool) -> list[str]:
    """What to do with a PEFT folder for diffusers: convert it, or what else works where it cannot be
    (``peft_loads``: doctor's PEFT verdict is ok)."""
    if weights is None:
        return ["convlora cannot read this folder (its line says why), so no `convlora convert` makes a diffusers file of it"]
    unportable = _unportable(weights, fmt="diffusers")
    if not unportable:
        return ["a PEFT adapter of one model: `convlora convert DIR OUT --to diffusers --component unet`"]
    keep = ["PEFT loads this folder as it is"] if peft_loads else []
    if not _unportable(weights, fmt="kohya"):
        keep.append("for ComfyUI / A1111: `convlora convert DIR OUT --to kohya --component unet` (or text_encoder)")
    return unportable + (["; ".join(keep)] if keep else [])


def _add_diffusers_dora_losses(v: Verdict, keys: list[str]) -> None:
    """DoRA magnitudes of a diffusers-format file that ``load_lora_weights`` does not apply as written
    (:func:`convlora.formats.diffusers.ignored_magnitude_keys`; one ``use_dora`` per component's
    ``LoraConfig``, ``utils/peft_utils.py``)."""
    ignored = ignored_magnitude_keys(keys)
    if ignored:
        v.status = "no" if v.status == "no" else "wrong"
        v.reasons.append(
            f"{len(ignored)} text-encoder DoRA magnitude(s) lack '.weight', so transformers' load_adapter (which it "
            "loads text encoders with) leaves them unused and those modules run on the magnitude PEFT initialises: "
            f"{_short(ignored, 4)}; fix: `convlora convert FILE OUT --to diffusers`"
        )
    stems = {k: _module_stem(k) for k in keys}
    for component in COMPONENTS:
        modules = {m for k, m in stems.items() if m and k.startswith(component + ".") and not k.endswith(".alpha")}
        dora = {m for k, m in stems.items() if m and k.startswith(component + ".") and MAGNITUDE in k}
        if dora and dora != modules:
            v.status = "no"
            v.reasons.append(
                f"{component}: {len(dora)} of {len(modules)} module(s) have a {MAGNITUDE}, but its LoraConfig has one "
                "use_dora for the whole component, so it computes another function for some of them"
            )


def _module_stem(key: str) -> str | None:
    """The module name of a key of one of the known key styles (``None`` for others)."""
    match = next((m for m in (rx.search(key) for rx in _STYLES.values()) if m), None)
    return key[: match.start()] if match else None


def _kohya_alpha_losses(weights: LoRAWeights) -> list[str]:
    """Modules whose alpha diffusers' kohya import replaces by the component's most common alpha."""
    problems = []
    for component in weights.components():
        modules = weights.component(component)
        common = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
        lost = [
            p for p, m in modules.items()
            if m.alpha != common and (component != "unet" or _UNET_ATTENTION.search(p))
        ]  # fmt: skip
        if lost:
            problems.append(
                f"{len(lost)} {component} module(s) get alpha {common:g} instead of their own "
                f"(diffusers' kohya converter loses per-module alpha there): {', '.join(lost[:4])}"
            )
    return problems


def _metadata_problems(header, weights: LoRAWeights) -> list[str]:
    raw = header.get(METADATA_KEY)
    if not raw:
        off = [p for p, m in weights.modules.items() if m.alpha != m.r]
        return [f"no {METADATA_KEY}: alpha = rank is used, but {len(off)} module(s) have other alphas"] if off else []
    flat = json.loads(raw)
    problems = []
    for component in weights.components():
        config = {k[len(component) + 1 :]: v for k, v in flat.items() if k.startswith(component + ".")}
        if not config:
            problems.append(f"{METADATA_KEY} has no entries for {component}: alpha = rank is used there")
            continue
        targets = config.get("target_modules") or []
        for path, module in weights.component(component).items():
            name = path[len("text_model.") :] if path.startswith("text_model.") else path
            if isinstance(targets, list) and not any(name == t or name.endswith("." + t) for t in targets):
                problems.append(f"{component}.{path} is not in target_modules: PEFT drops it")
            rank = rank_for(name, config)
            if rank is not None and rank != module.r:
                problems.append(f"{component}.{path}: metadata rank {rank}, tensors rank {module.r} (size mismatch)")
    return problems[:12]


@dataclass
class _FileKeys:
    """A file's keys as the name-based loaders (ComfyUI, A1111) see them, tied to convlora's reading."""

    shapes: dict[str, tuple[int, ...]]
    alphas: dict[str, float]
    """``<name>.alpha`` key -> its value (one-element tensors only)."""
    weights: LoRAWeights | None
    ldm_names: LDMNames | None
    """The UNet layout a kohya file with LDM names records."""

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor], header: dict[str, str], weights: LoRAWeights | None) -> _FileKeys:
        alphas = {k: float(t.flatten()[0]) for k, t in tensors.items() if k.endswith(".alpha") and t.numel() == 1}
        try:
            ldm_names = unet_layout_of(header)
        except LoRAFormatError:
            ldm_names = None  # convlora's own verdict names the bad header
        return cls({k: tuple(t.shape) for k, t in tensors.items()}, alphas, weights, ldm_names)

    def path_of(self, stem: str) -> str | None:
        """The module path of convlora's reading that a loader's module name ``stem`` stands for."""
        if self.weights is None:
            return None
        candidates = [stem, stem[len(KEY_PREFIX) :] if stem.startswith(KEY_PREFIX) else stem]
        if stem.startswith(KOHYA_PREFIXES):
            try:
                candidates.append(kohya_name_to_path(stem, stem.startswith("lora_te2_"), self.ldm_names))
            except LoRAFormatError:
                pass  # an LDM name without a recorded layout: no module of convlora's reading
        plain = re.sub(r"\.processor\.(to_q|to_k|to_v|to_out)$", lambda m: "." + m.group(1), stem)
        candidates.append(plain + ".0" if plain.endswith(".to_out") and plain != stem else plain)
        for candidate in candidates:
            for spelled in (candidate, candidate.replace(".text_model.", ".", 1)):
                if spelled in self.weights.modules:
                    return spelled
        return None

    def intended_scale(self, stem: str) -> float | None:
        path = self.path_of(stem)
        if path is None:
            return None
        module = self.weights.modules[path]
        if module.kind.name == "lokr" and not {"lokr_w1_a", "lokr_w2_a"} & set(module.factors):
            return 1.0  # no factorised side: no alpha / r (kinds.LoKrAdapter.trained_scaling)
        return scaling_for(module.r, module.alpha, self.weights.use_rslora)

    def kohya_stem(self, stem: str) -> str | None:
        """The module's name in the file ``convlora convert ... --to kohya`` writes (``None``: no component)."""
        path = self.path_of(stem)
        component = next((c for c in COMPONENTS if path and path.startswith(c + ".")), None)
        if component is None:
            return None
        return kohya_name(component, path[len(component) + 1 :], has_te2="text_encoder_2" in self.weights.components())

    def kohya_stems_under(self, first: str) -> list[str | None]:
        """The kohya names of the modules whose keys start with ``first + "."`` (A1111's whole-file misses)."""
        if self.weights is None:
            return [None]
        return [self.kohya_stem(p) for p in self.weights.modules if p.startswith(first + ".")] or [None]

    def misscaled(self, scales: dict[str, float]) -> list[str]:
        """``"name (alpha/r -> applied)"`` for each module a loader scales otherwise than the file means."""
        off = []
        for stem, applied in scales.items():
            meant = self.intended_scale(stem)
            if meant is not None and not math.isclose(meant, applied, rel_tol=1e-6):
                off.append(f"{stem} ({meant:g} -> {applied:g})")
        return off


def _comfyui_verdict(fmt: str, file: _FileKeys, unet_names: UNetNames | None) -> Verdict:
    view = comfyui_view(file.shapes, file.alphas, unet_names)
    v = Verdict(_LOADERS[2], "ok")
    # comfy/lora.py load_lora reads a DoRA magnitude only as <name>.dora_scale: PEFT's are keys it does not load
    magnitudes = [s for s in view.skipped if re.search(rf"\.{MAGNITUDE}(\.weight)?$", s)]
    view.skipped = [s for s in view.skipped if s not in magnitudes]
    attention = [s for s in view.skipped if not s.startswith(KOHYA_PREFIXES) and _UNET_ATTENTION.search(s)]
    other = [s for s in view.skipped if s not in attention]
    if magnitudes:
        v.reasons.append(
            f"drops the DoRA magnitude of {len(magnitudes)} module(s) ('lora key not loaded': comfy/lora.py load_lora "
            f"reads one only as <name>.dora_scale), so those it loads run as plain LoRA: {_short(magnitudes, 4)}"
        )
    if attention:
        v.reasons.append(
            f"skips {len(attention)} UNet attention module(s) ('lora key not loaded'): its diffusers key map "
            f"knows them only as <block>.processor.to_q / to_k / to_v / to_out: {_short(attention)}"
        )
    if other:
        v.reasons.append(f"skips {len(other)} module(s) it has no key for ('lora key not loaded'): {_short(other)}")
    off = file.misscaled(view.scales)
    if off:
        v.reasons.append(
            f"{len(off)} module(s) get another scale (it reads alpha only from .alpha tensors, scale 1 without; "
            f"never from {METADATA_KEY}), alpha/r -> applied: {_short(off)}"
        )
    v.status = "no" if view.skipped or magnitudes else "wrong" if off else "ok"
    _add_dora_axis_loss(v, view, "their dora_scale is per output channel, and its weight_decompose "
                        "(comfy/weight_adapter/base.py) then divides by the base weight's row norms ||W||, not by "
                        "those of W + ΔW")
    renamed = [file.kohya_stem(s) for s in view.skipped + [o.split(" (")[0] for o in off]]
    v.reasons += _kohya_fix(fmt, file, renamed, lambda k: comfyui_maps(k, unet_names), unet_names)
    v.reasons += _no_alpha_note(fmt, file)
    return v


def _a1111_verdict(fmt: str, file: _FileKeys, unet_names: UNetNames | None) -> Verdict:
    view = a1111_view(file.shapes, file.alphas, unet_names)
    v = Verdict(_LOADERS[3], "ok")
    dotted = [s for s in view.skipped if not s.startswith("lora_")]
    layout = [s for s in view.skipped if s.startswith("lora_unet_") and _renumbered(s, unet_names)]
    other = [s for s in view.skipped if s not in dotted and s not in layout]
    if dotted and not view.scales:
        count = len(file.weights.modules) if file.weights is not None else len(view.skipped)
        v.reasons.append(
            f"matches 0 of {count} module(s): it takes a key up to its first '.' as the module name "
            f"({', '.join(sorted({s.split('.')[0] for s in dotted})[:4])}), and no module has that name"
        )
    elif dotted:
        v.reasons.append(f"skips {len(dotted)} module(s) whose names it cuts at the first '.': {_short(dotted)}")
    if layout:
        shown = [f"{s} -> {a1111_unet_name(s[len('lora_unet_'):])} (the module is {unet_names.ldm_of_flat(s[len('lora_unet_'):])})" for s in layout]
        v.reasons.append(
            f"skips {len(layout)} UNet module(s): it renumbers diffusers-spelled UNet names by SD-1.x's block "
            f"layout, which this base does not have, and gets names of no module: {_short(shown, 4)}"
        )
    if view.misplaced:
        shown = [f"{s} -> {target}" for s, target in view.misplaced.items()]
        v.reasons.append(
            f"applies {len(shown)} UNet module(s) to another module (SD-1.x's numbering on a base of another "
            f"layout): {_short(shown, 4)}"
        )
    if other:
        v.reasons.append(f"skips {len(other)} module(s) it has no rule for: {_short(other)}")
    off = file.misscaled(view.scales)
    if off:
        v.reasons.append(f"{len(off)} module(s) get another scale (alpha only from .alpha tensors, else 1), alpha/r -> applied: {_short(off)}")
    v.status = "no" if view.skipped or view.misplaced else "wrong" if off else "ok"
    if view.unaccepted:
        v.status = "no"
        v.reasons.insert(0, f"fails to load the whole file ('Could not find a module type' in networks.py load_network): no "
                            f"module type accepts the keys of {len(view.unaccepted)} module(s): {_short(view.unaccepted, 4)}")
    _add_dora_axis_loss(v, view, "its apply_weight_decompose (network.py) always normalises per input channel, "
                        "and their dora_scale is per output channel")
    problems = [s for s in view.skipped if s not in dotted] + list(view.misplaced) + [o.split(" (")[0] for o in off]
    renamed = [file.kohya_stem(s) for s in problems] + [k for s in dotted for k in file.kohya_stems_under(s)]
    v.reasons += _kohya_fix(fmt, file, renamed, lambda k: a1111_target(k, unet_names) == "", unet_names)
    if unet_names is None and any(s.startswith("lora_unet_") for s in view.scales):
        v.reasons.append("UNet names are renumbered by SD-1.x's block layout, which A1111 assumes: `--base` checks the base has it")
    v.reasons += _no_alpha_note(fmt, file)
    return v


def _renumbered(stem: str, unet_names: UNetNames | None) -> bool:
    """A diffusers-spelled UNet name of a base module that A1111's SD-1.x numbering loses."""
    flat = stem[len("lora_unet_") :]
    return unet_names is not None and unet_names.ldm_of_flat(flat) is not None and a1111_unet_name(flat) is not None


def _add_dora_axis_loss(v: Verdict, view, why: str) -> None:
    """A UI loader's verdict on a file's output-axis (convlora / LyCORIS) DoRA modules: it computes another
    weight for them, ``why``; at least "wrong"."""
    output_axis = sorted(s for s, axis in view.dora.items() if axis == "output")
    if output_axis:
        v.reasons.append(f"computes another weight for {len(output_axis)} DoRA module(s): {why}: {_short(output_axis, 4)}")
        v.status = "no" if v.status == "no" else "wrong"


def _kohya_fix(fmt: str, file: _FileKeys, renamed: list[str | None], loads, unet_names: UNetNames | None) -> list[str]:
    """The convert command that fixes a loader's problems, or why none does.

    Args:
        renamed: the kohya names of the modules with problems (``None`` where there is none).
        loads: ``kohya module name -> bool``, whether the loader applies that name as meant.
    """
    if not renamed:
        return []
    if file.weights is None:
        return ["convlora cannot read this file (its line says why), so no `convlora convert` fixes this"]
    unportable = _unportable(file.weights, fmt="kohya")
    if unportable:
        return unportable
    if file.weights is not None and file.weights.unprefixed() and fmt != "kohya":
        return ["a single model's file: `convlora convert FILE OUT --to kohya --component unet` (or text_encoder) names its modules for pipelines"]
    unfixed = sorted({k or "(unnamed)" for k in renamed if k is None or not loads(k)})
    if fmt != "kohya" and not unfixed:
        return ["fix: `convlora convert FILE OUT --to kohya`" + _ui_dora_caveat(file.weights)]
    as_ldm = [_as_ldm(k, unet_names) for k in renamed]
    if all(k is not None and loads(k) for k in as_ldm):
        return [
            "fix: `convlora convert FILE OUT --to kohya --kohya-names ldm --base PIPELINE_DIR` (LDM names, which "
            "A1111 and ComfyUI apply on any layout; diffusers' StableDiffusionPipeline does not read them, so keep "
            "a diffusers-spelled file for diffusers)"
        ]
    if fmt != "kohya" and len(unfixed) < len(set(renamed)):
        return [f"`convlora convert FILE OUT --to kohya` fixes all but {len(unfixed)} of them: {_short(unfixed)}"]
    return ["no `convlora convert` fixes this (its kohya file spells these modules the same way)"]


def _ui_dora_caveat(weights: LoRAWeights) -> str:
    """What a kohya file still gets wrong in ComfyUI / A1111 when it holds DoRA (:data:`DORA_AXIS_NOTE`)."""
    dora = sorted(path for path, module in weights.modules.items() if module.kind.use_dora)
    if not dora:
        return ""
    return (f" (its names then load, but ComfyUI and A1111 compute another DoRA weight than convlora from any "
            f"file, for {len(dora)} DoRA module(s): see the DoRA-axis line)")


def _as_ldm(kohya_stem: str | None, unet_names: UNetNames | None) -> str | None:
    """A kohya UNet name as ``--kohya-names ldm`` writes it for the base (others unchanged)."""
    if kohya_stem is None or not kohya_stem.startswith("lora_unet_") or unet_names is None:
        return kohya_stem if kohya_stem is not None and not kohya_stem.startswith("lora_unet_") else None
    flat = kohya_stem[len("lora_unet_") :]
    if LDM_FLAT_NAME.match(flat):
        return kohya_stem
    ldm = unet_names.ldm_of_flat(flat)
    return None if ldm is None else "lora_unet_" + ldm


def _no_alpha_note(fmt: str, file: _FileKeys) -> list[str]:
    if fmt != "kohya":
        return []
    names = {k[: -len(".lora_down.weight")] for k in file.shapes if k.endswith(".lora_down.weight")}
    no_alpha = sorted(n for n in names if f"{n}.alpha" not in file.shapes)
    if not no_alpha:  # not an error: every loader then uses alpha = rank, as convlora does
        return []
    return [f"{len(no_alpha)} module(s) have no .alpha, so alpha = rank: {', '.join(no_alpha[:4])}"]


def _unet_names(base: dict[str, nn.Module] | None, summary: list[str]) -> UNetNames | None:
    """The base UNet's diffusers and LDM module names (``None`` without one; a note if no LDM names)."""
    unet = (base or {}).get("unet")
    if unet is None or not hasattr(unet, "config"):
        return None
    try:
        return UNetNames.of([n for n, _ in unet.named_modules()], unet.config)
    except ValueError as err:
        summary.append(f"base UNet: {err}; A1111's numbering is not checked")
        return None


def _value_problems(tensors: dict[str, torch.Tensor], header: dict[str, str], weights: LoRAWeights | None) -> list[str]:
    """Values no loader computes anything useful from: non-finite tensors, non-positive or non-finite alphas."""
    problems = []
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        problems.append(f"{len(bad)} tensor(s) hold NaN or inf, so every loader outputs NaN or inf: {_short(bad)}")
    alphas = {k: float(t.flatten()[0]) for k, t in tensors.items() if k.endswith(".alpha") and t.numel() == 1}
    if not alphas:  # alphas from a header: convlora's module table or lora_adapter_metadata
        alphas = {p: m.alpha for p, m in weights.modules.items()} if weights is not None else _header_alphas(header)
    odd = sorted(f"{k} = {a:g}" for k, a in alphas.items() if not (math.isfinite(a) and a > 0))
    if odd:
        problems.append(
            f"{len(odd)} alpha(s) are not a positive finite number, which loaders read differently (kohya's "
            "sd-scripts take 0 as alpha = rank; A1111, ComfyUI, diffusers and convlora scale by alpha / rank, so 0 "
            f"switches a module off and a negative alpha inverts it): {_short(odd)}"
        )
    return problems


def _header_alphas(header: dict[str, str]) -> dict[str, float]:
    """The alphas a header gives when no reader could read the file (malformed parts are skipped)."""
    alphas: dict[str, float] = {}
    for key, field_of in (("convlora_modules", lambda e: e.get("alpha")), (METADATA_KEY, None)):
        try:
            table = json.loads(header.get(key) or "{}")
        except json.JSONDecodeError:
            continue
        if not isinstance(table, dict):
            continue
        for name, entry in table.items():
            if field_of is not None and isinstance(entry, dict):
                values = {name: field_of(entry)}
            elif name.endswith("lora_alpha"):
                values = {name: entry}
            elif name.endswith("alpha_pattern") and isinstance(entry, dict):
                values = {f"{name}[{k}]": a for k, a in entry.items()}
            else:
                continue
            alphas.update({k: float(a) for k, a in values.items() if isinstance(a, (int, float))})
    return alphas


def _short(items: list[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")

def _peft_verdict(fmt, folder, weights, tensors: dict[str, torch.Tensor]) -> Verdict:
    """What ``PeftModel.from_pretrained`` makes of a folder, per kind (:mod:`convlora.formats.peft_kinds`):
    modules outside ``target_modules`` are dropped; LoRA / DoRA need the config's rank (``g·r`` on grouped
    convs), DoRA a ``lora_magnitude_vector`` on every module and no grouped conv; LoHa / LoKr what
    :func:`~convlora.formats.peft_kinds.lycoris_write_problems` allows, LoKr the shapes
    :func:`~convlora.formats.peft_kinds.peft_lokr_shapes` builds from the config."""
    loader = _LOADERS[4]
    if folder is None:
        return Verdict(
            loader, "n/a",
            _unportable(weights, allow_groups=True, fmt="peft") or ["needs an adapter folder: `convlora convert FILE DIR --to peft [--component unet]`"],
        )  # fmt: skip
    config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    by_path: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():  # <prefix><path>.lora_A.weight, <path>.lora_magnitude_vector, <path>.hada_w1_a ...
        match = _PEFT_KEY.match(key.removeprefix(KEY_PREFIX))
        if match:
            by_path.setdefault(match["path"], {})[match["name"]] = tensor
    v = Verdict(loader, "ok")
    tucker = sorted(f"{p} ({', '.join(n for n in TUCKER_NAMES if n in t)})" for p, t in by_path.items() if set(TUCKER_NAMES) & set(t))
    if tucker:
        v.reasons.append(f"{len(tucker)} module(s) in PEFT's Tucker form (use_effective_conv2d), which PEFT reads and "
                         f"convlora cannot: {_short(tucker, 4)}")
    kron = sorted(p for p, t in by_path.items()
                  if "lokr_w2" in t and {"lokr_w1", "lokr_w1_a"} & set(t) and is_peft_conv1d_full_kron(t))
    if kron:
        v.status = "wrong"
        v.reasons.append(f"{len(kron)} Conv1d LoKr module(s) with a full 3-D lokr_w2: its make_kron computes "
                         f"kron(lokr_w1, lokr_w2) for them otherwise than LyCORIS and convlora: {_short(kron, 4)}")
    problems = _peft_dora_key_problems(by_path, config) if weights is None else _peft_module_problems(weights, config)
    if problems:
        v.status = "no"
        v.reasons += problems
    return v


def _peft_module_problems(weights: LoRAWeights, config: dict) -> list[str]:
    """Why ``PeftModel.from_pretrained`` drops, refuses or recomputes modules of convlora's reading of a folder."""
    targets = config.get("target_modules") or []
    problems = [f"{p} is not in target_modules: PEFT drops it" for p in weights.modules
                if isinstance(targets, list) and not any(p == t or p.endswith("." + t) for t in targets)]
    kind = next(iter(weights.modules.values())).kind.name  # a folder holds one kind (convlora's reader checks)
    if kind == "lora":
        for path, module in weights.modules.items():
            rank = rank_for(path, config)
            peft_rank = module.r * (module.geometry or {}).get("groups", 1)  # grouped convs: g * r in PEFT
            if rank is not None and rank != peft_rank:
                problems.append(f"{path}: config rank {rank}, tensors rank {peft_rank} (size mismatch)")
        grouped = dora_grouped_problems(weights.modules)
        if grouped:
            problems.append("its DoRA computes B.view(-1, R) @ A.view(R, -1) of the grouped lora_B on grouped convs, "
                            f"which is not the LoRA update: {_short(grouped, 4)}")
        return problems
    other = lycoris_write_problems(weights.modules, weights.use_rslora, bool(config.get("fan_in_fan_out")))
    problems += [f"its {kind} cannot load this adapter as convlora computes it: {o}" for o in other]
    if kind == "lokr":
        problems += _peft_lokr_shape_problems(weights, config)
    return problems


def _peft_lokr_shape_problems(weights: LoRAWeights, config: dict) -> list[str]:
    """LoKr modules whose tensors are not the shapes PEFT's ``LoKrLayer.update_layer`` builds from the config."""
    factor, both = config.get("decompose_factor", -1), bool(config.get("decompose_both", False))
    problems, unknown = [], []
    for path, module in weights.modules.items():
        try:
            base_shape = lokr_base_shape(module, path)
        except LoRAFormatError:
            unknown.append(path)
            continue
        r = rank_for(path, config) or LYCORIS_DEFAULT
        built = peft_lokr_shapes(base_shape, r, factor, both)
        held = {n: tuple(t.shape) for n, t in module.factors.items() if n in LOKR_NAMES}
        if built != held:
            shown = lambda table: ", ".join(f"{n} {s}" for n, s in sorted(table.items()))  # noqa: E731
            effect = ("it raises a size mismatch" if built.keys() == held.keys() else
                      f"it leaves {', '.join(sorted(built.keys() - held.keys()))} at their initial values")
            problems.append(f"{path}: from r={r}, decompose_factor={factor}, decompose_both={both} it builds "
                            f"{shown(built)}; the folder holds {shown(held)}, so {effect}")
    if unknown:
        problems.append(f"the LoKr shapes PEFT builds are not checked for {len(unknown)} module(s) with a factorised "
                        f"lokr_w2 and no recorded base shape: {_short(unknown, 4)}")
    return problems


def _peft_dora_key_problems(by_path: dict[str, dict[str, torch.Tensor]], config: dict) -> list[str]:
    """DoRA keys of a folder convlora could not read that PEFT does not load as meant: ``use_dora`` is one flag
    for the whole adapter, so every LoRA module needs a ``lora_magnitude_vector`` with it and none without."""
    lora = sorted(p for p, t in by_path.items() if "lora_A" in t or "lora_B" in t)
    with_magnitude = {p for p in lora if MAGNITUDE in by_path[p]}
    if config.get("use_dora") and len(with_magnitude) < len(lora):
        missing = sorted(set(lora) - with_magnitude)
        return [f"use_dora is set but {len(missing)} module(s) have no {MAGNITUDE}, which PEFT then keeps at its "
                f"initial value: {_short(missing, 4)}"]
    if not config.get("use_dora") and with_magnitude:
        return [f"use_dora is not set, so PEFT ignores the {MAGNITUDE} of {len(with_magnitude)} module(s): "
                f"{_short(sorted(with_magnitude), 4)}"]
    return []


def _lycoris_verdict(fmt: str, file: _FileKeys) -> Verdict:
    """What LyCORIS's ``lycoris.kohya.create_network_from_weights`` makes of the adapter kinds of a kohya
    file (module names are not checked: it maps ``lora_unet_`` / ``lora_te_`` + the model's own module
    paths). Its ``make_module_from_state_dict`` (``lycoris/modules/locon.py`` / ``loha.py`` / ``lokr.py``)
    builds DoRA modules with ``wd_on_out=True`` and copies ``dora_scale`` into their ``(out, 1, ...)``
    magnitude, so a per-input-channel ``(1, in, ...)`` one fails to load."""
    loader = _LOADERS[5]
    if fmt != "kohya":
        return Verdict(loader, "n/a", ["reads kohya-format files: `convlora convert FILE OUT --to kohya`"])
    view = a1111_view(file.shapes, file.alphas)  # LyCORIS reads the same parts of a module (no names)
    input_axis = sorted(s for s, axis in view.dora.items() if axis == "input")
    if input_axis:
        return Verdict(loader, "no", [f"its DoRA modules are per output channel (wd_on_out=True), and the dora_scale of "
                                      f"{len(input_axis)} module(s) is per input channel: {_short(input_axis, 4)}"])
    dora = len(view.dora)
    reasons = [f"{dora} DoRA module(s) per output channel, as it rebuilds them (wd_on_out=True)"] if dora else []
    return Verdict(loader, "ok", reasons)


def _unportable(weights: LoRAWeights | None, allow_groups: bool = False, fmt: str | None = None) -> list[str]:
    """Why ``convlora convert`` refuses these weights for a loader: adapter kinds ``fmt``'s files do not
    carry (:data:`FORMAT_KINDS`), conv geometry it gets wrong."""
    if weights is None:
        return []
    kinds = sorted({m.kind.label for m in weights.modules.values()} - FORMAT_KINDS.get(fmt, FORMAT_KINDS["native"]))
    if kinds:
        return [f"cannot be converted for it: {fmt} files do not carry {', '.join(kinds)} adapters"]
    problems = conv_geometry_problems({p: m.geometry for p, m in weights.modules.items()}, allow_groups)
    if not problems:
        return []
    return [f"cannot be converted for it: it computes these conv LoRAs without their geometry: {'; '.join(problems[:6])}"]


def _check_base(weights: LoRAWeights, base: dict[str, nn.Module]) -> list[str]:
    problems = []
    groups = {c: weights.component(c) for c in weights.components()} or {"": weights.modules}
    for component, modules in groups.items():
        model = base.get(component) if component else next(iter(base.values()))
        if model is None:
            problems.append(f"the base has no {component} for {len(modules)} module(s)")
            continue
        resolved, unknown = resolve_paths(list(modules), model)
        if unknown:
            problems.append(f"{len(unknown)} module(s) not in the base {component or 'model'}: {', '.join(unknown[:6])}")
        named = dict(model.named_modules())
        for path, target in resolved.items():
            if type(named[target]) not in LORA_CLASSES:
                problems.append(f"{component}.{path}: the base's {target} is a {type(named[target]).__name__}, not a layer LoRA wraps")
            elif not fits_module(named[target], modules[path]):
                shapes = " / ".join(f"{n} {tuple(t.shape)}" for n, t in modules[path].tensors.items())
                problems.append(f"{component}.{path}: {shapes} do not fit base weight {tuple(named[target].weight.shape)}")
    return problems
