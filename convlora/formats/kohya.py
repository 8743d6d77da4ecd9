"""kohya-ss / AUTOMATIC1111 / ComfyUI LoRA files (what sd-scripts' ``networks/lora.py`` writes).

Per module ``<name>.lora_down.weight`` (= convlora's A, with the base conv's kernel),
``<name>.lora_up.weight`` (= B, 1x1 for convs) and ``<name>.alpha`` (0-dim tensor); the scaling is
``alpha / rank``. ``<name>`` is ``lora_unet_`` / ``lora_te_`` (``lora_te1_`` / ``lora_te2_`` for
SDXL's two text encoders) followed by the diffusers module path with every ``.`` turned into
``_`` — the nested CLIP spelling (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``) for
text encoders. String metadata: ``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha``,
``ss_network_args`` (``{"conv_dim", "conv_alpha"}``) and ``ss_base_model_version``.

Optionally (``ldm_names``) UNet modules are named by their LDM / original-Stable-Diffusion names
(``lora_unet_input_blocks_4_1_proj_in``, see :mod:`convlora.formats.ldm_names`), with the UNet
layout recorded in the header (:data:`UNET_LAYOUT_KEY`) so they read back exactly.

**SDXL** LoRAs name UNet modules by their LDM names (always: that is how kohya's
``sdxl_train_network.py`` writes them, its SDXL UNet being the LDM one, and how ComfyUI -- its
``unet_to_diffusers`` table -- and A1111 -- ``lora_unet`` -> ``diffusion_model`` -- look SDXL LoRAs
up): ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``,
``lora_unet_output_blocks_2_2_conv``, with ``ss_base_model_version`` ``sdxl_base_v1-0``. A file that
records no layout (kohya's own) is read with SDXL's standard layout (:data:`SDXL_UNET_LAYOUT`,
shared by its fine-tunes) or the base's UNet config when loading into a model.

**LyCORIS kinds** (LoHa, LoKr, DoRA; :mod:`convlora.kinds`) use LyCORIS's keys and layouts
(``lycoris/modules/loha.py``, ``lokr.py``, ``locon.py`` ``custom_state_dict``): ``<name>.hada_w1_a``
``(out, r)``, ``.hada_w1_b`` ``(r, in·∏k)``, ``.hada_w2_a``, ``.hada_w2_b``; ``<name>.lokr_w1`` ``(a, c)`` or
``.lokr_w1_a`` / ``.lokr_w1_b``, ``.lokr_w2`` ``(b, d, *k)`` or ``.lokr_w2_a`` ``(b, r)`` / ``.lokr_w2_b``
``(r, d·∏k)``; ``<name>.alpha`` (scale ``alpha / r``; a LoKr with neither side factorised has scale 1
whatever alpha says). DoRA's magnitude is ``<name>.dora_scale`` in LyCORIS's output-axis shape
``(out, 1, *1s)`` (``wd_on_out=True``; see :func:`magnitude_from_dora_scale`). Such files say
``ss_network_module = lycoris.kohya`` and, in ``ss_network_args``, LyCORIS's ``algo`` (``locon``,
``loha``, ``lokr``), ``dora_wd`` / ``wd_on_output``, LoKr's ``factor`` / ``decompose_both`` (the keys
``lycoris.kohya.create_network`` reads), and record each such module's base weight shape
(:data:`BASE_SHAPES_KEY`) so a convlora file reads back whole.

The names lose their dots. Loading into a model maps them back exactly by comparing with the
model's module names (:func:`convlora.formats.weights.resolve_paths`); converting without a model
restores them from the vocabulary of SD-1.x UNet and CLIP module names below.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping

import torch

from convlora.formats.ldm_names import LDM_FLAT_NAME, LDMNames
from convlora.formats.pairing import pair_modules, raise_on_leftovers, split_lora_keys
from convlora.formats.weights import LoRAFormatError, LoRAModule, LoRAWeights, nested_clip_path
from convlora.header import json_entry, tensor_alpha
from convlora.kinds import AdapterKind, LoHaAdapter, LoKrAdapter, lokr_rank_of

#: Header keys that describe the tensors (rank, alpha, conv dims); written from the weights.
NETWORK_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")

#: Header key of the base weight shapes ``{kohya name: [out, in/g, *k]}`` of a file's LoHa / LoKr / DoRA
#: modules (LoHa's flattened factors do not tell a conv's kernel).
BASE_SHAPES_KEY = "convlora_base_shapes"

#: convlora parameter name -> LyCORIS's key part (``<name>.<part>``).
LYCORIS_PARTS = {
    "lora_A": "lora_down.weight", "lora_B": "lora_up.weight", "magnitude": "dora_scale",
    **{n: n for n in LoHaAdapter.factor_names}, **{n: n for n in LoKrAdapter.ALL_FACTOR_NAMES},
}  # fmt: skip
#: LyCORIS's ``algo`` (``ss_network_args``) of each kind.
LYCORIS_ALGOS = {"lora": "locon", "loha": "loha", "lokr": "lokr"}
#: LyCORIS key parts of decompositions convlora has no kind for (Tucker / CP convs).
TUCKER_PARTS = (".lora_mid.weight", ".hada_t1", ".hada_t2", ".lokr_t2")

#: Header key of a file whose UNet names are LDM names: the UNet layout they were numbered for (JSON).
UNET_LAYOUT_KEY = "convlora_unet_layout"

#: kohya's ``ss_base_model_version`` of SDXL LoRAs (``sdxl_train_util.MODEL_VERSION_SDXL_BASE_V1_0``).
SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"
#: SDXL's UNet layout (what decides LDM numbers: block types and resnets per block, not widths or
#: transformer depths), used where no model or recorded layout says otherwise.
SDXL_UNET_LAYOUT = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
}

#: Every key of a file that diffusers' ``load_lora_weights`` treats as kohya starts with one of these.
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")

# Module-name segments that contain "_" in diffusers' UNet2DConditionModel and transformers' CLIP,
# longest first when they share a start.
_SEGMENTS = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "add_k_proj", "add_v_proj", "add_q_proj", "to_add_out", "proj_in", "proj_out", "conv_in", "conv_out",
    "conv_shortcut", "time_emb_proj", "time_embedding", "linear_1", "linear_2", "add_embedding",
    "class_embedding", "conv_norm_out", "text_model", "self_attn", "q_proj", "k_proj", "v_proj",
    "out_proj", "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding",
    "position_embedding", "text_projection", "encoder_hid_proj",
}  # fmt: skip
_MAX_SEGMENT_WORDS = max(s.count("_") + 1 for s in _SEGMENTS)


def to_kohya(
    weights: LoRAWeights, base_model_version: str = "sd_v1", ldm_names: LDMNames | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header of a kohya LoRA file.

    rsLoRA scaling ``alpha / sqrt(r)`` has no kohya spelling; it is written as the equivalent
    ``alpha' = alpha * sqrt(r)`` (same outputs in every loader).

    Args:
        ldm_names: name UNet modules by their LDM names in this layout
            (``lora_unet_output_blocks_2_2_conv``) instead of their diffusers paths, and record the
            layout in the header (:data:`UNET_LAYOUT_KEY`). A1111 and ComfyUI apply such names on
            any layout; diffusers' ``StableDiffusionPipeline`` does not read them.

    Raises:
        LoRAFormatError: a path without a ``unet.`` / ``text_encoder.`` / ``text_encoder_2.`` prefix,
            or two paths that become the same kohya name.
    """
    stray = weights.unprefixed()
    if stray:
        raise LoRAFormatError(
            "a kohya LoRA file names each module by its pipeline component (unet., text_encoder.); "
            f"these paths have none: {', '.join(stray[:6])}"
        )
    components = weights.components()
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for component in components:
        for path, module in weights.component(component).items():
            if component == "unet" and ldm_names is not None:
                name = "lora_unet_" + ldm_names.to_ldm(path).replace(".", "_")
            else:
                name = kohya_name(component, path, has_te2="text_encoder_2" in components)
            if name in origin:
                raise LoRAFormatError(f"{origin[name]} and {component}.{path} both become kohya name {name}")
            origin[name] = f"{component}.{path}"
            tensors.update(module_tensors(name, module, f"{component}.{path}"))
            tensors[f"{name}.alpha"] = torch.tensor(_kohya_alpha(module.alpha, module.r, weights.use_rslora), dtype=torch.float32)
    rank, alpha, conv_rank, conv_alpha = weights.most_common()
    # The network keys describe these tensors, so they win over same-named metadata (e.g. from a
    # LyCORIS source file); the base model version is the caller's to say.
    header = {"ss_base_model_version": base_model_version, **weights.metadata}
    header["ss_network_module"] = "networks.lora"
    header["ss_network_dim"] = str(rank)
    header["ss_network_alpha"] = _fmt(_kohya_alpha(alpha, rank, weights.use_rslora))
    header.pop("ss_network_args", None)
    header.pop(UNET_LAYOUT_KEY, None)
    if ldm_names is not None:
        header[UNET_LAYOUT_KEY] = json.dumps(ldm_names.layout, sort_keys=True)
    header.pop(BASE_SHAPES_KEY, None)
    args = {}
    if conv_rank is not None:
        conv_alpha = _kohya_alpha(conv_alpha, conv_rank, weights.use_rslora)
        args = {"conv_dim": str(conv_rank), "conv_alpha": _fmt(conv_alpha)}
    if any(not m.is_plain_lora for m in weights.modules.values()):
        args = {**_lycoris_header(weights, origin, header), **args}
    if args:
        header["ss_network_args"] = json.dumps(args)
    return tensors, header


def _lycoris_header(weights: LoRAWeights, origin: Mapping[str, str], header: dict[str, str]) -> dict[str, str]:
    """Mark ``header`` as LyCORIS's (``ss_network_module``, :data:`BASE_SHAPES_KEY` of the modules that
    are not plain LoRA; ``origin``: kohya name -> path) and return its ``ss_network_args`` entries."""
    header["ss_network_module"] = "lycoris.kohya"
    others = {name: weights.modules[path] for name, path in origin.items() if not weights.modules[path].is_plain_lora}
    shapes = {name: list(m.base_shape) for name, m in others.items() if m.base_shape is not None}
    header[BASE_SHAPES_KEY] = json.dumps(shapes, sort_keys=True)
    return _lycoris_args([m.kind for m in others.values()])


def _lycoris_args(kinds: list[AdapterKind]) -> dict[str, str]:
    """The ``ss_network_args`` LyCORIS's ``lycoris.kohya.create_network`` reads for these kinds (strings:
    sd-scripts' ``train_network.py`` records ``json.dumps`` of the ``--network_args`` ``key=value`` pairs
    and ``ss_network_module`` as given, ``lycoris.kohya``): ``algo`` of the most common kind, ``dora_wd`` and
    ``wd_on_output`` with DoRA, ``factor`` / ``decompose_both`` of the most common LoKr options."""
    name = Counter(k.name for k in kinds).most_common(1)[0][0]
    args = {"algo": LYCORIS_ALGOS[name]}
    if any(k.use_dora for k in kinds):
        args.update(dora_wd="True", wd_on_output="True")
    lokr = [(k.factor, k.decompose_both) for k in kinds if k.name == "lokr"]
    if lokr:
        factor, both = Counter(lokr).most_common(1)[0][0]
        args.update(factor=str(factor), decompose_both=str(both))
    return args


def module_tensors(name: str, module: LoRAModule, path: str) -> dict[str, torch.Tensor]:
    """One module's tensors under LyCORIS's keys (:data:`LYCORIS_PARTS`), less ``.alpha``; DoRA's
    ``magnitude (out,)`` as ``dora_scale (out, 1, *1s)``, the base weight's dimensions.

    Raises:
        LoRAFormatError: a DoRA module whose base weight's dimensions are not known.
    """
    tensors = {}
    for param, tensor in module.tensors.items():
        if param == "magnitude":
            dims = _base_dims(module)
            if dims is None:
                raise LoRAFormatError(f"{path}: a {module.kind.label} module whose base weight shape is not known; "
                                      "load it into its model and save from there")
            tensor = tensor.reshape(-1, *(1,) * (dims - 1))
        tensors[f"{name}.{LYCORIS_PARTS[param]}"] = tensor
    return tensors


def _base_dims(module: LoRAModule) -> int | None:
    """The number of dimensions of the module's base weight (2 for Linear, 4 for Conv2d), where known."""
    if module.base_shape is not None:
        return len(module.base_shape)
    if module.kind.name == "lora":
        return module.lora_A.dim()
    return module.factors["lokr_w2"].dim() if "lokr_w2" in module.factors else None


def kohya_name(component: str, path: str, has_te2: bool = False) -> str:
    """The kohya module name of ``component``'s module ``path``.

    ``("unet", "down_blocks.0.resnets.0.conv1")`` -> ``lora_unet_down_blocks_0_resnets_0_conv1``;
    text encoders use the nested CLIP spelling and, next to a second text encoder (SDXL),
    ``lora_te1_`` / ``lora_te2_``.
    """
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if has_te2 else "lora_te_", "text_encoder_2": "lora_te2_"}
    spelled = nested_clip_path(path) if component.startswith("text_encoder") else path
    return prefixes[component] + spelled.replace(".", "_")


def from_kohya(
    tensors: Mapping[str, torch.Tensor],
    header: Mapping[str, str],
    source: str = "file",
    unet_config: Mapping[str, object] | None = None,
) -> LoRAWeights:
    """Neutral weights from a kohya file; paths get a component prefix and restored dots.

    A module without ``.alpha`` gets ``alpha = rank`` (kohya's and A1111's default). An alpha of 0
    (sd-scripts read it as ``alpha = rank``, A1111 / ComfyUI / diffusers as a switched-off module),
    NaN, inf or a negative alpha, or an ``.alpha`` that is not one number, is refused by name. Modules
    are read by :func:`read_modules` (LoRA / LoCon, LoHa, LoKr, DoRA in LyCORIS's keys); keys it does
    not understand are named in an error. LDM-named UNet modules are read back with the layout
    the header records (:data:`UNET_LAYOUT_KEY`), else by ``unet_config`` (the base's UNet
    config), else -- for an SDXL file (``lora_te2_`` keys, or ``ss_base_model_version`` ``sdxl*``) --
    by SDXL's standard layout; otherwise they are an error.
    """
    modules = read_modules(tensors, header, source)
    if not modules:
        raise LoRAFormatError(f"{source} holds no LoRA weights")
    renamed: dict[str, LoRAModule] = {}
    has_te2 = any(name.startswith("lora_te2_") for name in modules)
    ldm_names = unet_layout_of(header, source)
    if ldm_names is None and unet_config is not None:
        ldm_names = LDMNames.from_config(unet_config)
    if ldm_names is None and (has_te2 or str(header.get("ss_base_model_version", "")).startswith("sdxl")):
        ldm_names = LDMNames.from_config(SDXL_UNET_LAYOUT)
    for name, module in modules.items():
        path = kohya_name_to_path(name, has_te2, ldm_names, source)
        if path in renamed:
            raise LoRAFormatError(f"{source}: two kohya names restore to the same module path {path}")
        renamed[path] = module
    # The network keys describe the tensors and are rewritten from them by every writer.
    metadata = {k: v for k, v in header.items() if k not in (*NETWORK_KEYS, UNET_LAYOUT_KEY, BASE_SHAPES_KEY)}
    return LoRAWeights(renamed, use_rslora=False, metadata=metadata)


def read_modules(tensors: Mapping[str, torch.Tensor], header: Mapping[str, str], source: str = "file") -> dict[str, LoRAModule]:
    """kohya name -> module, for every ``lora_unet_`` / ``lora_te*_`` module of a kohya / LyCORIS file.

    Each module is plain LoRA / LoCon (``lora_down`` / ``lora_up``), LoHa (the four ``hada_*``) or LoKr
    (one W1 and one W2 of ``lokr_*``), with DoRA where it has ``dora_scale``, and ``alpha`` (``alpha =
    rank`` without one). Keys of no module of these kinds (Tucker convs, other LyCORIS algorithms), a
    module mixing kinds or lacking a factor, and input-axis ``dora_scale`` are refused, named.
    """
    suffixes = {f".{part}": param for param, part in LYCORIS_PARTS.items()} | {".alpha": "alpha"}
    prefixed = {k: v for k, v in tensors.items() if k.startswith(KOHYA_PREFIXES)}
    groups, leftovers = split_lora_keys(prefixed, suffixes, source)
    leftovers += [k for k in tensors if not k.startswith(KOHYA_PREFIXES)]
    tucker = any(k.endswith(TUCKER_PARTS) for k in leftovers)
    raise_on_leftovers(leftovers, source, " (convlora imports LoRA / LoCon, LoHa, LoKr and DoRA; "
                       + ("no Tucker-decomposed convs: lora_mid, hada_t1/t2, lokr_t2)" if tucker else "no other LyCORIS algorithms)"))
    shapes = json_entry(header, BASE_SHAPES_KEY, source) or {}
    roles = {"lora_A": "A", "lora_B": "B", "alpha": "alpha"}
    plain = {n: {roles[p]: t for p, t in g.items()} for n, g in groups.items() if _family(n, g, source) == "lora" and "magnitude" not in g}
    modules = pair_modules(plain, lambda name, rank, group: _alpha_of(name, rank, group, source), source)
    for name, group in groups.items():
        if name not in plain:
            modules[name] = _kind_module(name, group, shapes.get(name), source)
    return modules


def _alpha_of(name: str, rank: int, group: Mapping[str, torch.Tensor], source: str) -> float:
    if "alpha" not in group:
        return float(rank)
    return tensor_alpha(group["alpha"], f"{name}.alpha", source)


def _family(name: str, group: Mapping[str, torch.Tensor], source: str) -> str:
    """``"lora"``, ``"loha"`` or ``"lokr"``: the kind whose tensors ``name`` has (exactly one)."""
    params = set(group) - {"alpha", "magnitude"}
    families = {f for f, names in _KIND_TENSORS.items() if params & set(names)}
    if len(families) != 1:
        found = ", ".join(f"{name}.{LYCORIS_PARTS.get(p, p)}" for p in sorted(group))
        what = "mixes the tensors of several adapter kinds" if families else "has no adapter tensors"
        raise LoRAFormatError(f"{source}: {name} {what}: {found}")
    return families.pop()


_KIND_TENSORS = {"lora": ("lora_A", "lora_B"), "loha": LoHaAdapter.factor_names, "lokr": LoKrAdapter.ALL_FACTOR_NAMES}


def _kind_module(name: str, group: Mapping[str, torch.Tensor], base_shape, source: str) -> LoRAModule:
    """A LoHa / LoKr module, or any kind with DoRA, from its group of tensors (checked, named)."""
    family = _family(name, group, source)
    factors = {p: t for p, t in group.items() if p != "alpha"}
    bad = sorted(f"{name}.{LYCORIS_PARTS[p]} ({str(t.dtype).replace('torch.', '')})" for p, t in factors.items() if not t.is_floating_point())
    if bad:
        raise LoRAFormatError(f"{source}: adapter tensors must be floating point; not so: {', '.join(bad)}")
    n_out, rank = _check_factors(name, family, factors, source)
    if "magnitude" in factors:
        factors["magnitude"] = magnitude_from_dora_scale(factors["magnitude"], n_out, f"{source}: {name}")
    if base_shape is not None:
        base_shape = tuple(int(s) for s in base_shape)
    elif family == "lokr" and "lokr_w2" in factors:
        w1 = factors.get("lokr_w1")
        a, c = w1.shape if w1 is not None else (factors["lokr_w1_a"].shape[0], factors["lokr_w1_b"].shape[1])
        b, d, *kernel = factors["lokr_w2"].shape
        base_shape = (a * b, c * d, *kernel)
    lora_A, lora_B = factors.pop("lora_A", None), factors.pop("lora_B", None)
    kind = AdapterKind(family, use_dora="magnitude" in factors)
    return LoRAModule(lora_A, lora_B, _alpha_of(name, rank, group, source), kind=kind, factors=factors, base_shape=base_shape)


def _check_factors(name: str, family: str, factors: Mapping[str, torch.Tensor], source: str) -> tuple[int, int]:
    """``(out, rank)`` of a module's factors (rank 1 for a LoKr without a factorised side).

    Raises:
        LoRAFormatError: a missing factor, or factors whose shapes do not fit together.
    """
    shapes = {p: tuple(t.shape) for p, t in factors.items() if p != "magnitude"}
    if family == "lora":
        a, b = shapes.get("lora_A"), shapes.get("lora_B")
        if a is None or b is None or len(a) < 2 or len(b) < 2 or b[1] != a[0]:
            raise LoRAFormatError(f"{source}: {name} needs lora_down (r, in, *k) and lora_up (out, r, *1s) of one rank, "
                                  f"got {a} and {b}")
        return b[0], a[0]
    if family == "loha":
        missing = [f"{name}.{p}" for p in LoHaAdapter.factor_names if p not in shapes]
        if missing:
            raise LoRAFormatError(f"{source}: {name} is a LoHa module without {', '.join(missing)}")
        w1a, w1b, w2a, w2b = (shapes[p] for p in LoHaAdapter.factor_names)
        if not (len(w1a) == len(w1b) == 2 and w1a == w2a and w1b == w2b and w1a[1] == w1b[0] and min(w1a + w1b) >= 1):
            raise LoRAFormatError(f"{source}: {name}: LoHa factors of shapes {[w1a, w1b, w2a, w2b]} are not "
                                  "hada_w1_a, hada_w2_a (out, r) and hada_w1_b, hada_w2_b (r, in)")
        return w1a[0], w1a[1]
    w1 = shapes.get("lokr_w1") or (shapes.get("lokr_w1_a", (1,))[0], shapes.get("lokr_w1_b", (1,))[-1])
    w2 = shapes.get("lokr_w2") or (shapes.get("lokr_w2_a", (1,))[0], shapes.get("lokr_w2_b", (1,))[-1])
    delta_shape = (w1[0] * w2[0], w1[-1] * w2[1], *w2[2:]) if len(w1) == 2 and len(w2) >= 2 and min(w1 + w2) >= 1 else (0, 0)
    try:
        rank = lokr_rank_of(delta_shape, shapes)
    except (ValueError, ZeroDivisionError) as err:
        raise LoRAFormatError(f"{source}: {name}: {err}") from None
    return delta_shape[0], rank or 1


def magnitude_from_dora_scale(dora_scale: torch.Tensor, n_out: int, where: str) -> torch.Tensor:
    """DoRA's ``magnitude (out,)`` from a file's ``dora_scale``, which must be per output channel.

    LyCORIS writes ``dora_scale`` as ``(out, 1, *1s)`` with ``wd_on_out=True`` (its default and the
    axis ``make_module_from_state_dict`` rebuilds) and as ``(1, in, *1s)`` with ``wd_on_out=False``
    (``lycoris/modules/locon.py`` / ``loha.py`` / ``lokr.py`` ``__init__``, ``functional/general.py``
    ``weight_decompose``). convlora computes DoRA over the output axis only (PEFT's rule), and a
    per-input-channel magnitude has no exact output-axis equivalent, so that one is refused.

    Args:
        n_out: the module's output size.

    Raises:
        LoRAFormatError: an input-axis or otherwise shaped ``dora_scale``, named.
    """
    shape = tuple(dora_scale.shape)
    if len(shape) >= 2 and shape[0] == n_out and math.prod(shape[1:]) == 1:
        return dora_scale.reshape(n_out)
    if len(shape) >= 2 and shape[0] == 1 and shape[1] > 1 and math.prod(shape[2:]) == 1:
        raise LoRAFormatError(
            f"{where}.dora_scale has shape {shape}: a per-input-channel DoRA magnitude (LyCORIS's wd_on_output=False); "
            "convlora computes DoRA over the output axis only, and the two are not convertible"
        )
    raise LoRAFormatError(f"{where}.dora_scale has shape {shape}; expected ({n_out}, 1, ...): one magnitude per output channel")


def unet_layout_of(header: Mapping[str, str], source: str = "file") -> LDMNames | None:
    """The LDM names of the UNet layout a kohya header records (``None`` if it records none).

    Raises:
        LoRAFormatError: the recorded layout is not valid JSON or not a UNet layout.
    """
    layout = json_entry(header, UNET_LAYOUT_KEY, source)
    if layout is None:
        return None
    try:
        return LDMNames.from_config(layout)
    except (ValueError, TypeError, AttributeError) as err:
        raise LoRAFormatError(f"{source}: {UNET_LAYOUT_KEY} is not a UNet layout ({err})") from None


def kohya_name_to_path(name: str, has_te2: bool = False, ldm_names: LDMNames | None = None, source: str = "file") -> str:
    """``lora_unet_down_blocks_0_resnets_0_conv1`` -> ``unet.down_blocks.0.resnets.0.conv1``.

    Dots are restored from the SD-1.x UNet / CLIP vocabulary; when loading into a model the result
    is matched against the model's own names, so an unusual name still lands on the right module.
    An LDM-named UNet module (``lora_unet_input_blocks_4_1_...``) is renumbered with ``ldm_names``.

    Raises:
        LoRAFormatError: an LDM name without ``ldm_names``, or one that layout does not have.
    """
    flat_unet = name[len("lora_unet_") :] if name.startswith("lora_unet_") else None
    if flat_unet is not None and LDM_FLAT_NAME.match(flat_unet):
        if ldm_names is None:
            raise LoRAFormatError(
                f"{source}: {name} is an LDM (original Stable Diffusion) UNet name, and the file does not "
                f"record the UNet layout ({UNET_LAYOUT_KEY}) that says which diffusers module it is"
            )
        try:
            return "unet." + ldm_names.from_flat_ldm(flat_unet)
        except ValueError as err:
            raise LoRAFormatError(f"{source}: {err}") from None
    for prefix, component in (
        ("lora_unet_", "unet"),
        ("lora_te1_", "text_encoder"),
        ("lora_te2_", "text_encoder_2"),
        ("lora_te_", "text_encoder"),
    ):
        if name.startswith(prefix):
            return f"{component}.{restore_dots(name[len(prefix):])}"
    raise LoRAFormatError(f"{name} does not start with one of {KOHYA_PREFIXES}")


def restore_dots(flat: str) -> str:
    """``down_blocks_0_resnets_0_conv1`` -> ``down_blocks.0.resnets.0.conv1`` (SD-1.x UNet / CLIP vocabulary)."""
    words = flat.split("_")
    segments, i = [], 0
    while i < len(words):
        for n in range(min(_MAX_SEGMENT_WORDS, len(words) - i), 0, -1):
            candidate = "_".join(words[i : i + n])
            if n == 1 or candidate in _SEGMENTS:
                segments.append(candidate)
                i += n
                break
    return ".".join(segments)


def _kohya_alpha(alpha: float, rank: int, use_rslora: bool) -> float:
    """kohya scales by ``alpha / r``: rsLoRA's ``alpha / sqrt(r)`` is ``alpha * sqrt(r)`` there."""
    return alpha * math.sqrt(rank) if use_rslora else alpha


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
