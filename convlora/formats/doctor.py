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
- A1111 / ComfyUI: kohya names with ``.alpha`` tensors; ComfyUI also maps diffusers keys but reads
  alpha only from ``.alpha`` tensors, never from ``lora_adapter_metadata``.
- PEFT ``PeftModel.from_pretrained``: a folder with ``adapter_config.json``; modules outside its
  ``target_modules`` are dropped; ``rank_pattern`` must give each module its tensor rank.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from convlora.formats import read_lora_file
from convlora.formats.detect import detect_format, lora_file_of
from convlora.formats.diffusers import METADATA_KEY
from convlora.formats.kohya import KOHYA_PREFIXES
from convlora.formats.peft import ADAPTER_CONFIG, rank_for
from convlora.formats.weights import COMPONENTS, LoRAWeights, conv_geometry_problems, fits_module, resolve_paths
from convlora.layers import LORA_CLASSES
from convlora.io import read_safetensors

# key style -> pattern of its keys
_STYLES = {
    "PEFT (lora_A/lora_B)": re.compile(r"\.lora_[AB]\.weight$"),
    "old diffusers (lora.down/up)": re.compile(r"(\.lora\.(down|up)|\.lora_linear_layer\.(down|up)|_lora\.(down|up))\.weight$"),
    "kohya (lora_down/lora_up/alpha)": re.compile(r"\.(lora_down\.weight|lora_up\.weight|alpha)$"),
    "convlora native (lora_A/lora_B)": re.compile(r"\.lora_[AB]$"),
}
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
        return Diagnosis(Path(path), None, [f"format: none ({err})"], verdicts)
    summary = [f"format: {fmt}, {len(keys)} tensors"]
    try:
        _, weights = read_lora_file(path)
    except ValueError as err:
        weights = None
        convlora_verdict = Verdict("convlora (load_pipeline_lora / convert)", "no", [str(err)])
    else:
        convlora_verdict = Verdict("convlora (load_pipeline_lora / convert)", "ok")
        summary += _describe(weights)
        if base is not None:
            convlora_verdict.reasons += _check_base(weights, base)
            if convlora_verdict.reasons:
                convlora_verdict.status = "no"
    if len([s for s in styles if s != "unknown"]) > 1:
        summary.append("key styles: " + ", ".join(f"{s} x{n}" for s, n in styles.items()))
    convlora_verdict.primary = True
    verdicts = [
        convlora_verdict,
        _diffusers_verdict(fmt, keys, header, styles, weights),
        _a1111_verdict(fmt, keys, weights),
        _peft_verdict(fmt, path if is_peft_folder else None, weights),
    ]
    own = {"diffusers": (1,), "kohya": (1, 2), "peft": (3,), "native": ()}[fmt]
    for index in own:
        verdicts[index].primary = True
    return Diagnosis(Path(path), fmt, summary, verdicts)


_LOADERS = (
    "convlora (load_pipeline_lora / convert)",
    "diffusers StableDiffusionPipeline.load_lora_weights",
    "AUTOMATIC1111 / ComfyUI",
    "PEFT PeftModel.from_pretrained",
)


def _describe(weights: LoRAWeights) -> list[str]:
    parts = Counter(next((c for c in COMPONENTS if p.startswith(c + ".")), "(single model)") for p in weights.modules)
    ranks = Counter(m.r for m in weights.modules.values())
    alphas = Counter(m.alpha for m in weights.modules.values())
    lines = [
        "modules: " + ", ".join(f"{c} {n}" for c, n in parts.items()),
        "rank: " + ", ".join(f"{r} x{n}" for r, n in ranks.most_common()),
        "alpha: " + ", ".join(f"{a:g} x{n}" for a, n in alphas.most_common()) + (" (rsLoRA)" if weights.use_rslora else ""),
    ]
    return lines


def _diffusers_verdict(fmt, keys, header, styles, weights) -> Verdict:
    v = Verdict("diffusers StableDiffusionPipeline.load_lora_weights", "ok")
    if fmt == "native":
        return Verdict(v.loader, "n/a", _unportable(weights) or ["convlora's own file: `convlora convert FILE OUT --to diffusers`"])
    if fmt == "peft":
        return Verdict(
            v.loader, "n/a", _unportable(weights) or ["a PEFT adapter of one model: `convlora convert DIR OUT --to diffusers --component unet`"]
        )
    no_lora = [k for k in keys if "lora" not in k]
    if no_lora:
        v.status = "no"
        v.reasons.append(f"keys without 'lora' make it refuse the file ('Invalid LoRA checkpoint'): {', '.join(no_lora[:5])}")
    if fmt == "kohya":
        others = [k for k in keys if not k.startswith(KOHYA_PREFIXES)]
        if others:
            v.status = "no"
            v.reasons.append(f"not every key starts with lora_unet_/lora_te*_, so its kohya converter is not used: {', '.join(others[:5])}")
        elif weights is not None:
            v.reasons += _kohya_alpha_losses(weights)
            if v.reasons and v.status == "ok":
                v.status = "wrong"
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
        if weights is not None:
            v.reasons += _metadata_problems(header, weights)
            if v.reasons and v.status == "ok":
                v.status = "wrong"
    if weights is not None and weights.unprefixed() and v.status == "ok":
        v.status = "no"
        v.reasons.append("keys have no unet./text_encoder. prefix, so no pipeline component takes them")
    return v


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


def _a1111_verdict(fmt, keys, weights) -> Verdict:
    v = Verdict("AUTOMATIC1111 / ComfyUI", "ok")
    if fmt == "kohya":
        others = [k for k in keys if not k.startswith(KOHYA_PREFIXES)]
        if others:
            v.status = "no"
            v.reasons.append(f"keys they do not map: {', '.join(others[:5])}")
        names = {k[: -len(".lora_down.weight")] for k in keys if k.endswith(".lora_down.weight")}
        no_alpha = sorted(n for n in names if f"{n}.alpha" not in keys)
        if no_alpha:  # not an error: every loader then uses alpha = rank, as convlora does
            v.reasons.append(f"{len(no_alpha)} module(s) have no .alpha, so alpha = rank: {', '.join(no_alpha[:4])}")
        return v
    if fmt in ("native", "peft") or weights is None:
        return Verdict(v.loader, "n/a", _unportable(weights) or ["not a kohya file: `convlora convert FILE OUT --to kohya`"])
    off = [p for p, m in weights.modules.items() if m.alpha != m.r]
    if off:
        return Verdict(
            v.loader, "wrong",
            [f"ComfyUI maps diffusers keys but ignores {METADATA_KEY}: {len(off)} module(s) with alpha != rank get "
             "scale 1; A1111 expects kohya names. `convlora convert FILE OUT --to kohya`"],
        )  # fmt: skip
    return Verdict(v.loader, "ok", ["ComfyUI maps diffusers keys; for A1111 prefer `convlora convert FILE OUT --to kohya`"])


def _peft_verdict(fmt, folder, weights) -> Verdict:
    loader = "PEFT PeftModel.from_pretrained"
    if folder is None:
        return Verdict(
            loader, "n/a",
            _unportable(weights, allow_groups=True) or ["needs an adapter folder: `convlora convert FILE DIR --to peft [--component unet]`"],
        )  # fmt: skip
    v = Verdict(loader, "ok")
    config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    if weights is not None:
        targets = config.get("target_modules") or []
        for path, module in weights.modules.items():
            if isinstance(targets, list) and not any(path == t or path.endswith("." + t) for t in targets):
                v.reasons.append(f"{path} is not in target_modules: PEFT drops it")
            rank = rank_for(path, config)
            peft_rank = module.r * (module.geometry or {}).get("groups", 1)  # grouped convs: g * r in PEFT
            if rank is not None and rank != peft_rank:
                v.reasons.append(f"{path}: config rank {rank}, tensors rank {peft_rank} (size mismatch)")
        if v.reasons:
            v.status = "no"
    return v


def _unportable(weights: LoRAWeights | None, allow_groups: bool = False) -> list[str]:
    """Why ``convlora convert`` refuses these weights for a loader (conv geometry it gets wrong)."""
    if weights is None:
        return []
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
                problems.append(
                    f"{component}.{path}: lora_A {tuple(modules[path].lora_A.shape)} / lora_B "
                    f"{tuple(modules[path].lora_B.shape)} do not fit base weight {tuple(named[target].weight.shape)}"
                )
    return problems
