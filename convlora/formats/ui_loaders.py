"""What ComfyUI and AUTOMATIC1111 do with the keys of a LoRA file, restated as rules.

Both apply a LoRA by *name*: each key is cut into a module name and a weight part, the module name
is looked up in a table of the model's modules, and a name not in the table is skipped (ComfyUI
logs ``lora key not loaded``, A1111 prints ``Failed to match keys``; the rest is applied). The rules
below are what their code does (ComfyUI master, early 2026: ``comfy/lora.py``
``model_lora_keys_unet`` / ``model_lora_keys_clip``, ``comfy/utils.py`` ``unet_to_diffusers``,
``comfy/weight_adapter/lora.py``; A1111 v1.10 ``extensions-builtin/Lora``: ``networks.py``
``load_network`` / ``convert_diffusers_name_to_compvis``, ``network.py`` ``calc_scale``).

ComfyUI
    Module names: ``lora_unet_<name>`` with the diffusers path *or* the LDM path of a UNet weight
    (dots as ``_``); the dotted diffusers path with or without ``unet.`` — but attention
    projections only in the attention-processor spelling ``<block>.processor.to_q`` /
    ``to_k`` / ``to_v`` / ``to_out``, so ``<block>.to_q`` is skipped; text encoders only for the six
    CLIP layer modules ``self_attn.{q,k,v,out}_proj`` / ``mlp.fc1`` / ``mlp.fc2``, as
    ``lora_te_text_model_encoder_layers_N_...`` (``lora_te1_``; ``lora_te2_`` on SDXL) or
    ``text_encoder.text_model.encoder.layers.N....``. Weight parts: ``lora_up/lora_down.weight``,
    ``lora_B/lora_A.weight``, ``lora.up/lora.down.weight``, ``_lora.up/_lora.down.weight``,
    ``lora_linear_layer.up/down.weight``, bare ``lora_B/lora_A``. Scale: ``<name>.alpha / rank``,
    and **1** when the file has no ``<name>.alpha`` tensor (it never reads ``lora_adapter_metadata``).

AUTOMATIC1111
    The module name is the key up to its *first* ``.``, so ``unet.down_blocks...`` names a module
    ``unet``, which does not exist. A ``lora_unet_`` name in diffusers spelling is renumbered into
    an LDM name with SD-1.x's fixed layout (``down_blocks_i_*_j`` -> ``input_blocks_{1+3i+j}``,
    ``up_blocks_i_*_j`` -> ``output_blocks_{3i+j}``, ``down_blocks_i_downsamplers`` ->
    ``input_blocks_{3+3i}_0_op``, ``up_blocks_i_upsamplers`` -> ``output_blocks_{2+3i}_{1 if i == 0
    else 2}_conv``, ``conv1`` -> ``in_layers_2``, ...); when that names no module of the loaded
    model, ``lora_unet_`` is replaced by ``diffusion_model_`` (how LDM-named files load). Text
    encoders: ``lora_te_text_model_encoder_layers_N_<rest>`` -> the CLIP module of that name (SD-1.x).
    Scale: ``<name>.alpha / rank``, and 1 without ``.alpha``.

LyCORIS kinds (both UIs; :func:`lycoris_module` states the rules)
    ComfyUI's ``comfy/lora.py`` ``load_lora`` reads ``<name>.alpha`` and ``<name>.dora_scale``, then
    offers the module to each adapter of ``comfy/weight_adapter``: ``LoRAAdapter.load`` (lora.py; an
    up key), ``LoHaAdapter.load`` (loha.py; ``hada_w1_a`` present, the other three read),
    ``LoKrAdapter.load`` (lokr.py; any of ``lokr_w1`` / ``lokr_w2`` / ``lokr_w1_a`` / ``lokr_w2_a``).
    A1111's ``networks.py`` ``load_network`` gives the module to the first of its module types that
    accepts its parts (``network_lora.py``: ``lora_up.weight`` and ``lora_down.weight``;
    ``network_hada.py``: all four ``hada_*``; ``network_lokr.py``: a W1 and a W2) and raises
    ``Could not find a module type`` -- the whole file fails -- when none does. Both scale LoHa by
    ``alpha / hada_w1_b.shape[0]`` and LoKr by ``alpha / lokr_w2_b.shape[0]`` (else ``lokr_w1_b``),
    **1** when neither LoKr side is factorised or there is no ``.alpha``.

DoRA (``dora_scale``; :func:`dora_axis`)
    ComfyUI's ``comfy/weight_adapter/base.py`` ``weight_decompose`` takes the axis from the shape:
    ``dora_scale.shape[0] == out`` is per output channel, and then it divides by the row norms of the
    *base* weight ``||W||``, not of ``W + ΔW`` (earlier versions always normalised per input
    channel); otherwise per input channel, of ``W + ΔW``, which is LyCORIS's ``wd_on_out=False``
    DoRA. A1111's ``network.py`` ``NetworkModule.apply_weight_decompose`` always normalises per input
    channel, so a per-output-channel ``(out, 1, ...)`` magnitude broadcasts into another weight.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from convlora.formats.kohya import kohya_name_to_path
from convlora.formats.ldm_names import LDM_FLAT_NAME, LDMNames

# ---- how both split a key into module name and weight part -----------------------------------------
#: Weight parts ComfyUI's plain-LoRA loader reads (up and down of each spelling), and ``.alpha``.
COMFYUI_PARTS = (
    ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", "_lora.up.weight", "_lora.down.weight",
    ".lora_B.weight", ".lora_A.weight", ".lora.up.weight", ".lora.down.weight",
    ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", ".lora_B", ".lora_A", ".alpha",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2", ".lokr_w1", ".lokr_w2",
    ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2", ".dora_scale",
)  # fmt: skip
_HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclass(frozen=True)
class LycorisModule:
    """One module of a file as both UIs read its LyCORIS kind: which kind, the rank alpha divides by
    (``None``: scale 1), its output size and DoRA's ``dora_scale`` shape (``None`` without DoRA)."""

    kind: str
    rank: int | None
    n_out: int
    dora_shape: tuple[int, ...] | None


def lycoris_module(parts: Mapping[str, tuple[int, ...]], comfyui: bool) -> LycorisModule | None:
    """How ComfyUI (``comfyui``) or A1111 reads a LoHa / LoKr module from its parts (``"hada_w1_a"`` ->
    shape, no leading dot), or ``None`` when it has no such module (see the module docstring)."""
    dora = parts.get("dora_scale")
    if (comfyui and "hada_w1_a" in parts) or (not comfyui and all(p in parts for p in _HADA)):
        if not all(p in parts for p in _HADA):  # ComfyUI's LoHaAdapter.load reads all four: a KeyError
            return None
        return LycorisModule("loha", parts["hada_w1_b"][0], parts["hada_w1_a"][0], dora)
    w1 = parts.get("lokr_w1") or _product(parts, "lokr_w1")
    w2 = parts.get("lokr_w2") or _product(parts, "lokr_w2")
    has_any = any(p in parts for p in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a"))
    if (comfyui and not has_any) or w1 is None or w2 is None:  # ComfyUI: its kron of a missing side fails
        return None
    factorised = parts.get("lokr_w2_b", parts.get("lokr_w1_b"))
    return LycorisModule("lokr", factorised[0] if factorised else None, w1[0] * w2[0], dora)


def _product(parts: Mapping[str, tuple[int, ...]], side: str) -> tuple[int, int] | None:
    a, b = parts.get(side + "_a"), parts.get(side + "_b")
    return (a[0], b[-1]) if a and b else None


def dora_axis(dora_shape: tuple[int, ...], n_out: int) -> str:
    """``"output"`` for a per-output-channel ``dora_scale`` (LyCORIS's ``(out, 1, *1s)``, ComfyUI's test
    ``shape[0] == out``), else ``"input"``."""
    return "output" if len(dora_shape) >= 1 and dora_shape[0] == n_out else "input"

_UNET_BLOCK = r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)"
_TRANSFORMER_LEAF = r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|norm[123])"
#: The diffusers paths of the UNet weights ComfyUI's ``unet_to_diffusers`` lists (SD-family UNets).
COMFYUI_UNET_PATHS = re.compile(
    rf"^({_UNET_BLOCK}\.resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut|norm1|norm2)"
    rf"|{_UNET_BLOCK}\.attentions\.\d+\.(proj_in|proj_out|norm|{_TRANSFORMER_LEAF})"
    r"|(down_blocks\.\d+\.downsamplers|up_blocks\.\d+\.upsamplers)\.0\.conv"
    r"|conv_in|conv_out|conv_norm_out|(time_embedding|add_embedding|class_embedding)\.linear_[12])$"
)
_ATTENTION_PROJECTION = re.compile(r"\.(to_q|to_k|to_v|to_out\.0)$")
#: The CLIP text-encoder modules ComfyUI maps (``LORA_CLIP_MAP``), dotted.
COMFYUI_CLIP_MODULES = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")
_CLIP_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")


@dataclass
class LoaderView:
    """What one loader makes of a file: per module name the scale it applies, and what it skips."""

    scales: dict[str, float] = field(default_factory=dict)
    """Module name (the file's key stem) -> the scale the loader multiplies ``up @ down`` by."""
    skipped: list[str] = field(default_factory=list)
    """Module names (or, for unreadable parts, keys) the loader does not apply."""
    misplaced: dict[str, str] = field(default_factory=dict)
    """Module name -> the other module it is applied to instead (A1111's SD-1.x numbering)."""
    dora: dict[str, str] = field(default_factory=dict)
    """Module name -> the axis of its ``dora_scale`` (:func:`dora_axis`), for modules applied with DoRA."""
    unaccepted: list[str] = field(default_factory=list)
    """Module names whose parts no module type accepts (A1111 then fails to load the whole file)."""

    def add_scale(self, stem: str, alpha_key: str | None, rank: int, alphas: Mapping[str, float]) -> None:
        """Record the scale both UIs apply: ``alpha / rank`` from the ``.alpha`` tensor, 1 without one;
        an ``.alpha`` that is not one number is a part the loader cannot read (skipped)."""
        if alpha_key is None:
            self.scales[stem] = 1.0
        elif alpha_key in alphas:
            self.scales[stem] = alphas[alpha_key] / rank
        else:
            self.skipped.append(alpha_key)


def group_keys(keys: Iterable[str], parts: Collection[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """``{stem: {part: key}}`` for keys ending in one of ``parts`` (longest first), and the rest."""
    ordered = sorted(parts, key=len, reverse=True)
    groups: dict[str, dict[str, str]] = {}
    rest = []
    for key in keys:
        part = next((p for p in ordered if key.endswith(p) and len(key) > len(p)), None)
        if part is None:
            rest.append(key)
        else:
            groups.setdefault(key[: -len(part)], {})[part] = key
    return groups, rest


# ---- ComfyUI ---------------------------------------------------------------------------------------
def comfyui_view(shapes: dict[str, tuple[int, ...]], alphas: dict[str, float], unet_names: UNetNames | None = None) -> LoaderView:
    """What ComfyUI applies, from the file's key shapes and its ``.alpha`` values.

    Args:
        shapes: every key of the file -> its tensor shape.
        alphas: ``<name>.alpha`` key -> value, for the ``.alpha`` tensors that hold one number (the others count as unreadable).
        unet_names: the base's UNet module names (diffusers and LDM), when known; otherwise any
            name of an SD-family UNet module counts as present.
    """
    groups, rest = group_keys(shapes, COMFYUI_PARTS)
    view = LoaderView(skipped=sorted(rest))
    for stem, parts in groups.items():
        down = next((parts[p] for p in parts if p.endswith(("down.weight", "lora_A.weight", ".lora_A"))), None)
        up = next((parts[p] for p in parts if p.endswith(("up.weight", "lora_B.weight", ".lora_B"))), None)
        other = None if down is not None else lycoris_module({p[1:]: shapes[k] for p, k in parts.items()}, comfyui=True)
        if (down is None and other is None) or not comfyui_maps(stem, unet_names):
            view.skipped.append(stem)
            continue
        rank = shapes[down][0] if down is not None else other.rank
        view.add_scale(stem, parts.get(".alpha") if rank is not None else None, rank, alphas)
        if ".dora_scale" in parts:
            n_out = shapes[up][0] if down is not None and up is not None else other.n_out if other else 0
            view.dora[stem] = dora_axis(shapes[parts[".dora_scale"]], n_out)
    return view


def comfyui_maps(stem: str, unet_names: UNetNames | None = None) -> bool:
    """Whether ComfyUI's key map (``model_lora_keys_unet`` + ``model_lora_keys_clip``) has ``stem``."""
    if stem.startswith("lora_unet_"):
        flat = stem[len("lora_unet_") :]
        if unet_names is not None:
            path = unet_names.path_of_flat(flat)
            return bool(path and COMFYUI_UNET_PATHS.match(path)) or flat in unet_names.flat_ldm
        return bool(LDM_FLAT_NAME.match(flat) or COMFYUI_UNET_PATHS.match(kohya_name_to_path(stem)[len("unet.") :]))
    for prefix in ("lora_te_", "lora_te1_", "lora_te2_"):
        if stem.startswith(prefix):
            return _is_clip_layer_module(stem[len(prefix) :], flat=True)
    for prefix in ("text_encoder.", "text_encoder_2."):
        if stem.startswith(prefix):
            return _is_clip_layer_module(stem[len(prefix) :], flat=False)
    path = stem[len("unet.") :] if stem.startswith("unet.") else stem
    processor = re.sub(r"\.processor\.(to_q|to_k|to_v|to_out)$", lambda m: "." + m.group(1), path)
    if processor != path:  # the attention-processor spelling ComfyUI's diffusers key map knows
        path = processor + (".0" if processor.endswith(".to_out") else "")
    elif _ATTENTION_PROJECTION.search(path):
        return False
    return bool(COMFYUI_UNET_PATHS.match(path)) and (unet_names is None or path in unet_names.diffusers)


def _is_clip_layer_module(name: str, flat: bool) -> bool:
    if flat:
        match = re.match(r"^text_model_encoder_layers_(\d+)_(.+)$", name)
        return bool(match) and int(match.group(1)) < 32 and match.group(2) in {m.replace(".", "_") for m in COMFYUI_CLIP_MODULES}
    match = _CLIP_LAYER.match(name)
    return bool(match) and int(match.group(1)) < 32 and match.group(2) in COMFYUI_CLIP_MODULES


# ---- AUTOMATIC1111 ---------------------------------------------------------------------------------
_A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def a1111_unet_name(flat: str) -> str | None:
    """The LDM name (``_``-spelled) A1111 gives ``lora_unet_<flat>`` by SD-1.x's numbering, or ``None``.

    ``down_blocks_0_resnets_1_conv1`` -> ``input_blocks_2_0_in_layers_2``. ``None``: no rule
    matches, so A1111 tries ``flat`` itself as an LDM name.
    """
    rules = (
        (r"conv_in(.*)", lambda m: f"input_blocks_0_0{m[1]}"),
        (r"conv_out(.*)", lambda m: f"out_2{m[1]}"),
        (r"time_embedding_linear_(\d+)(.*)", lambda m: f"time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
        (r"down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{_a1111_inner(m)}"),
        (r"mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{_A1111_RESNET.get(m[3], m[3]) if m[1] == 'resnets' else m[3]}"),
        (r"up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m: f"output_blocks_{int(m[1]) * 3 + int(m[3])}_{_a1111_inner(m)}"),
        (r"down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"input_blocks_{3 + int(m[1]) * 3}_0_op"),
        (r"up_blocks_(\d+)_upsamplers_0_conv", lambda m: f"output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"),
    )  # fmt: skip
    for pattern, name in rules:
        match = re.match(pattern, flat)
        if match:
            return name(match)
    return None


def _a1111_inner(match: re.Match) -> str:
    kind, suffix = match[2], match[4]
    return f"1_{suffix}" if kind == "attentions" else f"0_{_A1111_RESNET.get(suffix, suffix)}"


def a1111_view(shapes: dict[str, tuple[int, ...]], alphas: dict[str, float], unet_names: UNetNames | None = None) -> LoaderView:
    """What A1111 applies, from the file's key shapes and ``.alpha`` values.

    Without ``unet_names`` the base is taken to have SD-1.x's layout (the one A1111's numbering
    is right for); with them, each UNet name is checked against the base's real LDM names.
    """
    view = LoaderView()
    stems: dict[str, dict[str, str]] = {}
    for key in shapes:
        stem, _, part = key.partition(".")  # A1111 cuts at the first "."
        stems.setdefault(stem, {})[part] = key
    for stem, parts in stems.items():
        down = parts.get("lora_down.weight") or parts.get("lora_A.weight")
        up = parts.get("lora_up.weight") or parts.get("lora_B.weight")
        target = a1111_target(stem, unet_names)
        other = None if down is not None else lycoris_module({p: shapes[k] for p, k in parts.items()}, comfyui=False)
        if target is None:
            view.skipped.append(stem)
            continue
        if down is None and other is None:
            view.unaccepted.append(stem)
            continue
        if target != "":
            view.misplaced[stem] = target
        rank = shapes[down][0] if down is not None else other.rank
        view.add_scale(stem, parts.get("alpha") if rank is not None else None, rank, alphas)
        if "dora_scale" in parts:
            n_out = shapes[up][0] if up is not None else other.n_out if other else 0
            view.dora[stem] = dora_axis(shapes[parts["dora_scale"]], n_out)
    return view


def a1111_target(stem: str, unet_names: UNetNames | None) -> str | None:
    """``""`` when A1111 applies ``stem`` to the module it names, ``None`` when it skips it, else
    the LDM name of the other module it lands on."""
    for prefix in ("lora_te_", "lora_te1_", "lora_te2_"):  # lora_te1_ by its fallback, lora_te2_ on SDXL
        if stem.startswith(prefix):
            return "" if re.match(r"^text_model_encoder_layers_\d+_.+$", stem[len(prefix) :]) else None
    if not stem.startswith("lora_unet_"):
        return None
    flat = stem[len("lora_unet_") :]
    sd1_name = a1111_unet_name(flat)
    if unet_names is None:
        return "" if sd1_name is not None or LDM_FLAT_NAME.match(flat) else None
    meant = unet_names.ldm_of_flat(flat)
    if sd1_name is not None and sd1_name in unet_names.flat_ldm:
        return "" if sd1_name == meant else sd1_name
    return "" if flat in unet_names.flat_ldm else None  # the lora_unet_ -> diffusion_model_ fallback


@dataclass(frozen=True)
class UNetNames:
    """A base UNet's module names, ``.``- and ``_``-spelled, diffusers and LDM."""

    diffusers: frozenset[str]
    """Every module path of the UNet (``named_modules``)."""
    ldm_by_flat: dict[str, str]
    """``_``-spelled diffusers path -> ``_``-spelled LDM name, for the modules that have one."""
    flat_ldm: frozenset[str]
    """The ``_``-spelled LDM names (A1111's module table, less its ``diffusion_model_`` prefix)."""
    path_by_flat: dict[str, str | None]
    """``_``-spelled diffusers path -> the path (``None`` where two paths share the spelling)."""

    @classmethod
    def of(cls, module_paths: Iterable[str], config: Any) -> UNetNames:
        """From the UNet's ``named_modules()`` paths and its config (see :mod:`convlora.formats.ldm_names`).

        Raises:
            ValueError: a UNet layout without LDM names (see :meth:`LDMNames.from_config`).
        """
        names = LDMNames.from_config(config)
        paths = frozenset(p for p in module_paths if p)
        ldm = {}
        for path in paths:
            try:
                ldm[path.replace(".", "_")] = names.to_ldm(path).replace(".", "_")
            except ValueError:
                continue  # containers (down_blocks.0, ...) are no LDM module
        by_flat: dict[str, str | None] = {}
        for path in paths:
            by_flat[path.replace(".", "_")] = None if path.replace(".", "_") in by_flat else path
        return cls(paths, ldm, frozenset(ldm.values()), by_flat)

    def path_of_flat(self, flat: str) -> str | None:
        """The module path spelled ``flat`` with ``.`` as ``_`` (``None`` if none or ambiguous)."""
        return self.path_by_flat.get(flat)

    def ldm_of_flat(self, flat: str) -> str | None:
        """The LDM name (``_``-spelled) of the module whose diffusers path is ``flat`` with dots as ``_``."""
        return self.ldm_by_flat.get(flat)
