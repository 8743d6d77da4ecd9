"""doctor's ComfyUI and AUTOMATIC1111 verdicts: one file per rule, verdict texts asserted."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from convlora.diffusion import inject_pipeline_lora, save_pipeline_lora, text_encoder_lora_config, unet_lora_config
from convlora.diffusion.tiny import build_tiny_pipeline, tiny_unet_config
from convlora.formats import LoRAModule, LoRAWeights, write_lora_file
from convlora.formats.doctor import diagnose
from convlora.io import read_safetensors, write_safetensors
from convlora.testing import randomize_lora_

COMFYUI, A1111 = "ComfyUI (LoraLoader)", "AUTOMATIC1111 (extensions-builtin/Lora)"
ATTENTION_SKIP = (
    "skips 48 UNet attention module(s) ('lora key not loaded'): its diffusers key map knows them only as "
    "<block>.processor.to_q / to_k / to_v / to_out: unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
)
UPSAMPLER_DROP = (
    "skips 1 UNet module(s): it renumbers diffusers-spelled UNet names by SD-1.x's block layout, which this base "
    "does not have, and gets names of no module: lora_unet_up_blocks_0_upsamplers_0_conv -> output_blocks_2_1_conv "
    "(the module is output_blocks_2_2_conv)"
)
FIX = "fix: `convlora convert FILE OUT --to kohya`"
NO_FIX = "no `convlora convert` fixes this (its kohya file spells these modules the same way)"
LDM_FIX = (
    "fix: `convlora convert FILE OUT --to kohya --kohya-names ldm --base PIPELINE_DIR` (LDM names, which A1111 and "
    "ComfyUI apply on any layout; diffusers' StableDiffusionPipeline does not read them, so keep a diffusers-spelled "
    "file for diffusers)"
)


@pytest.fixture(scope="module")
def pipe():
    """The tiny pipeline with full-preset UNet LoRA (rank 4, alpha 8; 3x3 convs rank 2, alpha 1) and text-encoder attn LoRA."""
    pipe = build_tiny_pipeline(0)
    inject_pipeline_lora(
        pipe, unet_lora_config("full", rank=4, alpha=8, conv_rank=2, conv_alpha=1), text_encoder_lora_config("attn", rank=4)
    )
    randomize_lora_(pipe.unet, seed=0)
    randomize_lora_(pipe.text_encoder, seed=1)
    return pipe


@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("doctor")
    return {
        fmt: save_pipeline_lora(folder / f"{fmt}.safetensors", unet=pipe.unet, text_encoder=pipe.text_encoder, format=fmt)
        for fmt in ("diffusers", "kohya", "native")
    }


@pytest.fixture(scope="module")
def base(pipe):
    return {"unet": UNet2DConditionModel(**tiny_unet_config()), "text_encoder": pipe.text_encoder}


def verdicts(path, base=None) -> dict:
    return {v.loader: v for v in diagnose(path, base=base).verdicts}


def conv_weights(alpha: float) -> LoRAWeights:
    """One UNet 3x3 conv LoRA of rank 2 (no attention module)."""
    g = torch.Generator().manual_seed(0)
    module = LoRAModule(torch.randn(2, 32, 3, 3, generator=g), torch.randn(32, 2, 1, 1, generator=g), alpha)
    return LoRAWeights({"unet.down_blocks.0.resnets.0.conv1": module})


def test_diffusers_file_comfyui_skips_attention_and_misscales_a1111_matches_nothing(files):
    v = verdicts(files["diffusers"])
    assert v[COMFYUI].status == "no" and not v[COMFYUI].primary
    assert v[COMFYUI].reasons[0].startswith(ATTENTION_SKIP)
    # 117 UNet modules - 48 attention = 69 loaded, all with alpha/r != 1 (8/4 or 1/2); text encoder alpha = rank
    assert v[COMFYUI].reasons[1].startswith(
        "69 module(s) get another scale (it reads alpha only from .alpha tensors, scale 1 without; never from "
        "lora_adapter_metadata), alpha/r -> applied: unet.down_blocks.0.downsamplers.0.conv (0.5 -> 1)"
    )
    assert v[COMFYUI].reasons[2:] == [FIX]
    assert v[A1111].status == "no"
    assert v[A1111].reasons == [
        "matches 0 of 137 module(s): it takes a key up to its first '.' as the module name (text_encoder, unet), "
        "and no module has that name",
        FIX,
    ]


def test_diffusers_file_without_attention_comfyui_scale_one(tmp_path):
    wrong = write_lora_file(conv_weights(alpha=4.0), tmp_path / "a4", "diffusers")  # alpha/r = 2, no .alpha tensor
    assert verdicts(wrong)[COMFYUI].status == "wrong"
    assert verdicts(wrong)[COMFYUI].reasons == [
        "1 module(s) get another scale (it reads alpha only from .alpha tensors, scale 1 without; never from "
        "lora_adapter_metadata), alpha/r -> applied: unet.down_blocks.0.resnets.0.conv1 (2 -> 1)",
        FIX,
    ]
    same = write_lora_file(conv_weights(alpha=2.0), tmp_path / "a2", "diffusers")  # alpha == rank: scale 1 is right
    assert verdicts(same)[COMFYUI].status == "ok" and verdicts(same)[COMFYUI].reasons == []


def test_processor_spelled_attention_is_what_comfyui_maps(tmp_path):
    g = torch.Generator().manual_seed(0)
    block = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    tensors = {f"{block}.processor.to_q_lora.down.weight": torch.randn(2, 64, generator=g),
               f"{block}.processor.to_q_lora.up.weight": torch.randn(64, 2, generator=g)}  # fmt: skip
    write_safetensors(tensors, tmp_path / "old.safetensors")
    assert verdicts(tmp_path / "old.safetensors")[COMFYUI].status == "ok"
    write_safetensors({k.replace(".processor.to_q_lora.", ".to_q.lora."): t for k, t in tensors.items()}, tmp_path / "new.safetensors")
    assert verdicts(tmp_path / "new.safetensors")[COMFYUI].reasons[0].startswith("skips 1 UNet attention module(s)")


def test_kohya_file_loads_in_both_and_a1111_loses_the_tiny_upsampler(files, base):
    v = verdicts(files["kohya"])
    assert (v[COMFYUI].status, v[COMFYUI].reasons, v[COMFYUI].primary) == ("ok", [], True)
    assert v[A1111].status == "ok" and v[A1111].primary
    assert v[A1111].reasons == ["UNet names are renumbered by SD-1.x's block layout, which A1111 assumes: `--base` checks the base has it"]

    v = verdicts(files["kohya"], base=base)
    assert (v[COMFYUI].status, v[COMFYUI].reasons) == ("ok", [])
    assert v[A1111].status == "no" and v[A1111].reasons == [UPSAMPLER_DROP, LDM_FIX]
    assert not diagnose(files["kohya"], base=base).healthy


def test_diffusers_file_on_the_tiny_base_needs_ldm_names_for_a1111(files, base):
    v = verdicts(files["diffusers"], base=base)
    assert v[A1111].reasons[1] == LDM_FIX
    assert v[COMFYUI].reasons[-1] == FIX  # ComfyUI numbers diffusers names by the model's own layout


def test_ldm_named_kohya_file_loads_in_a1111_and_comfyui_not_in_diffusers(files, base, tmp_path):
    from convlora.cli import main

    out = tmp_path / "ldm.safetensors"
    assert main(["convert", str(files["kohya"]), str(out), "--to", "kohya", "--kohya-names", "ldm", "--base", str(tmp_path / "pipe")]) == 2
    base["unet"].save_config(tmp_path / "pipe" / "unet")
    assert main(["convert", str(files["kohya"]), str(out), "--to", "kohya", "--kohya-names", "ldm", "--base", str(tmp_path / "pipe")]) == 0
    assert "lora_unet_output_blocks_2_2_conv.lora_down.weight" in read_safetensors(out)[0]
    v = verdicts(out, base=base)
    assert [(v[COMFYUI].status, v[COMFYUI].reasons), (v[A1111].status, v[A1111].reasons)] == [("ok", []), ("ok", [])]
    diffusers = v["diffusers StableDiffusionPipeline.load_lora_weights"]
    assert diffusers.status == "no" and diffusers.reasons == [
        "117 UNet module(s) have LDM names (lora_unet_input_blocks_1_0_emb_layers_1): StableDiffusionPipeline's kohya "
        "import does not renumber them (only StableDiffusionXLPipeline's does) and load_lora_weights fails; "
        "`convlora convert FILE OUT --to kohya` writes diffusers-spelled names"
    ]


def test_a1111_numbering_lands_on_another_module_of_a_one_layer_base(tmp_path):
    # layers_per_block 1: up blocks hold 2 resnets, so SD-1.x's output_blocks_{3i+j} is another block's resnet
    config = {**tiny_unet_config(), "layers_per_block": 1}
    g = torch.Generator().manual_seed(0)
    module = LoRAModule(torch.randn(2, 96, 3, 3, generator=g), torch.randn(32, 2, 1, 1, generator=g), 2.0)
    path = write_lora_file(LoRAWeights({"unet.up_blocks.1.resnets.0.conv1": module}), tmp_path / "k.safetensors", "kohya")
    v = verdicts(path, base={"unet": UNet2DConditionModel(**config)})[A1111]
    assert v.status == "no"
    assert v.reasons == [
        "applies 1 UNet module(s) to another module (SD-1.x's numbering on a base of another layout): "
        "lora_unet_up_blocks_1_resnets_0_conv1 -> output_blocks_3_0_in_layers_2",
        LDM_FIX,
    ]


def test_native_file_neither_maps(files):
    v = verdicts(files["native"])
    assert v[COMFYUI].status == "no" and v[COMFYUI].reasons[0].startswith(ATTENTION_SKIP)
    # native files keep transformers-5's flattened CLIP paths, which ComfyUI's key map does not have
    assert v[COMFYUI].reasons[1].startswith(
        "skips 20 module(s) it has no key for ('lora key not loaded'): text_encoder.encoder.layers.0.self_attn.k_proj"
    )
    assert v[COMFYUI].reasons[-1] == FIX
    assert v[A1111].status == "no" and v[A1111].reasons[0].startswith("matches 0 of 137 module(s)")
    assert diagnose(files["native"]).healthy  # other loaders' verdicts do not make convlora's own file unhealthy


def test_kohya_module_outside_comfyuis_clip_map_is_named(tmp_path):
    g = torch.Generator().manual_seed(0)
    name = "lora_te_text_model_final_layer_norm"  # not one of ComfyUI's six CLIP layer modules
    write_safetensors(
        {f"{name}.lora_down.weight": torch.randn(2, 32, generator=g), f"{name}.lora_up.weight": torch.randn(32, 2, generator=g)},
        tmp_path / "k.safetensors",
    )
    v = verdicts(tmp_path / "k.safetensors")
    assert v[COMFYUI].reasons[:2] == [f"skips 1 module(s) it has no key for ('lora key not loaded'): {name}", NO_FIX]
    assert v[A1111].reasons[:2] == [f"skips 1 module(s) it has no rule for: {name}", NO_FIX]


def test_nan_tensors_fail_every_loader(files, tmp_path):
    tensors, header = read_safetensors(files["kohya"])
    key = "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, tmp_path / "nan.safetensors", header)  # a hostile file: convlora's own writer refuses NaN
    diagnosis = diagnose(tmp_path / "nan.safetensors")
    assert not diagnosis.healthy
    for v in diagnosis.verdicts:
        assert v.status == "no", v.loader
        assert v.reasons[0] == f"1 tensor(s) hold NaN or inf, so every loader outputs NaN or inf: {key}"


@pytest.mark.parametrize("alpha", [0.0, -4.0, float("inf")])
def test_kohya_alpha_that_is_not_positive_and_finite_fails_every_loader(tmp_path, alpha):
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    save_file(
        {f"{name}.lora_down.weight": torch.randn(2, 32, 3, 3, generator=g), f"{name}.lora_up.weight": torch.randn(32, 2, 1, 1, generator=g),
         f"{name}.alpha": torch.tensor(alpha)},
        tmp_path / "k.safetensors",
    )  # fmt: skip
    diagnosis = diagnose(tmp_path / "k.safetensors")
    assert [v.status for v in diagnosis.verdicts] == ["no"] * 6
    expected = (
        "1 alpha(s) are not a positive finite number, which loaders read differently (kohya's sd-scripts take 0 as "
        "alpha = rank; A1111, ComfyUI, diffusers and convlora scale by alpha / rank, so 0 switches a module off and a "
        f"negative alpha inverts it): {name}.alpha = {alpha:g}"
    )
    assert all(expected in v.reasons for v in diagnosis.verdicts)


def test_nan_alpha_in_diffusers_metadata_fails_every_loader(tmp_path):
    path = write_lora_file(conv_weights(alpha=2.0), tmp_path / "d", "diffusers")
    tensors, header = read_safetensors(path)
    meta = json.loads(header["lora_adapter_metadata"])
    meta["unet.lora_alpha"] = float("nan")
    write_safetensors(tensors, tmp_path / "nan_alpha.safetensors", {**header, "lora_adapter_metadata": json.dumps(meta)})
    diagnosis = diagnose(tmp_path / "nan_alpha.safetensors")
    assert [v.status for v in diagnosis.verdicts] == ["no"] * 6
    # convlora's reader may refuse the header itself; every other loader is told why
    assert all(any("alpha(s) are not a positive finite number" in r for r in v.reasons) for v in diagnosis.verdicts[1:])
