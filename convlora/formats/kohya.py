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

The names lose their dots. Loading into a model maps them back exactly by comparing with the
model's module names (:func:`convlora.formats.weights.resolve_paths`); converting without a model
restores them from the vocabulary of SD-1.x UNet and CLIP module names below.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import torch

from convlora.formats.ldm_names import LDM_FLAT_NAME, LDMNames
from convlora.formats.pairing import pair_modules, raise_on_leftovers, split_lora_keys
from convlora.formats.weights import LoRAFormatError, LoRAModule, LoRAWeights, nested_clip_path
from convlora.header import json_entry, tensor_alpha

#: Header keys that describe the tensors (rank, alpha, conv dims); written from the weights.
NETWORK_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")

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
            tensors[f"{name}.lora_down.weight"] = module.lora_A
            tensors[f"{name}.lora_up.weight"] = module.lora_B
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
    if conv_rank is not None:
        conv_alpha = _kohya_alpha(conv_alpha, conv_rank, weights.use_rslora)
        header["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": _fmt(conv_alpha)})
    return tensors, header


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
    NaN, inf or a negative alpha, or an ``.alpha`` that is not one number, is refused by name. Keys that are not
    ``lora_down`` / ``lora_up`` / ``alpha`` of a ``lora_unet_`` / ``lora_te*_`` module (LoHa, LoKr,
    DoRA scales, ...) are named in an error. LDM-named UNet modules are read back with the layout
    the header records (:data:`UNET_LAYOUT_KEY`), else by ``unet_config`` (the base's UNet
    config), else -- for an SDXL file (``lora_te2_`` keys, or ``ss_base_model_version`` ``sdxl*``) --
    by SDXL's standard layout; otherwise they are an error.
    """
    prefixed = {k: v for k, v in tensors.items() if k.startswith(KOHYA_PREFIXES)}
    groups, leftovers = split_lora_keys(
        prefixed, {".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"}, source
    )
    leftovers += [k for k in tensors if not k.startswith(KOHYA_PREFIXES)]
    raise_on_leftovers(leftovers, source, " (convlora imports plain LoRA / LoCon: no LoHa, LoKr or DoRA)")

    def alpha_of(name: str, rank: int, group) -> float:
        if "alpha" not in group:
            return float(rank)
        return tensor_alpha(group["alpha"], f"{name}.alpha", source)

    modules = pair_modules(groups, alpha_of, source)
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
    metadata = {k: v for k, v in header.items() if k not in (*NETWORK_KEYS, UNET_LAYOUT_KEY)}
    return LoRAWeights(renamed, use_rslora=False, metadata=metadata)


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
