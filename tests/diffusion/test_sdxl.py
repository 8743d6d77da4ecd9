"""Stable Diffusion XL: the tiny SDXL pipeline, the family object, and LoRA files that diffusers'
own ``StableDiffusionXLPipeline.load_lora_weights`` loads into the UNet and both text encoders."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch

import convlora
from convlora.diffusion import inject_pipeline_lora, load_pipeline_lora, save_pipeline_lora, text_encoder_lora_config, unet_lora_config
from convlora.diffusion.families import SD, SDXL, detect_family, family_from_configs, family_of_pipeline
from convlora.io import read_safetensors
from convlora.testing import randomize_lora_, relative_error

TOL = 1e-5
ENCODERS = ("text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def sdxl_template():
    from convlora.diffusion.tiny import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(seed=0)


@pytest.fixture(scope="module")
def sdxl_inputs():
    """UNet inputs: latents (2, 4, 8, 8), timesteps, states (2, 77, 64), text_embeds (2, 32), time_ids (2, 6)."""
    g = torch.Generator().manual_seed(3)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32], [40, 24, 4, 0, 32, 32]])}
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 64, generator=g), added


def _unet_out(pipe, inputs):
    latents, t, states, added = inputs
    with torch.no_grad():
        return pipe.unet(latents, t, states, added_cond_kwargs=added).sample


def _encoder_out64(encoder, ids):
    """Penultimate hidden states and the first output (pooled / last hidden), float64, LoRA unmerged."""
    model = copy.deepcopy(encoder).double()
    for layer in convlora.lora_layers(model).values():
        layer.unmerge()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


# ---- the tiny SDXL pipeline ----------------------------------------------------------------------


def test_tiny_sdxl_pipeline_has_sdxl_structure_and_builds_fast(sdxl_template, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from convlora.diffusion.tiny import build_tiny_sdxl_pipeline, save_tiny_sdxl_pipeline

    started = time.perf_counter()
    pipe = build_tiny_sdxl_pipeline(seed=0)
    assert time.perf_counter() - started < 1.0
    assert type(pipe) is StableDiffusionXLPipeline
    assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    config = pipe.unet.config
    assert config.addition_embed_type == "text_time" and config.cross_attention_dim == 64
    assert config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    depth = {name.rsplit(".transformer_blocks", 1)[0]: int(name.rsplit(".", 1)[1])
             for name, _ in pipe.unet.named_modules() if name.split(".")[-2:-1] == ["transformer_blocks"]}
    assert depth["down_blocks.1.attentions.0"] == 0 and depth["down_blocks.2.attentions.0"] == 1  # depth 1, then 2
    assert depth["up_blocks.0.attentions.2"] == 1 and depth["up_blocks.1.attentions.2"] == 0
    assert pipe.tokenizer("a photo of a cat").input_ids == pipe.tokenizer_2("a photo of a cat").input_ids == [998, 320, 816, 531, 539, 320, 66, 536, 999]
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), sdxl_template.unet.state_dict().values()))
    images = pipe("a photo of a cat", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3)

    folder = save_tiny_sdxl_pipeline(tmp_path / "sdxl")
    assert detect_family(folder) is SDXL and family_of_pipeline(pipe) is SDXL
    (folder / "model_index.json").unlink()
    assert detect_family(folder) is SDXL  # from the UNet's addition_embed_type alone
    assert family_from_configs({"_class_name": "StableDiffusionPipeline"}, {}) is SD
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        detect_family(tmp_path)


def test_sdxl_conditions_equal_the_pipelines_own_prompt_encoding(sdxl_template):
    pipe = sdxl_template
    tokenize = SDXL.tokenize({"tokenizer": pipe.tokenizer, "tokenizer_2": pipe.tokenizer_2})
    prompts = ["a photo of a cat", "a sks bag"]
    batch = {**tokenize(prompts), "time_ids": torch.tensor([[32, 32, 0, 0, 32, 32], [48, 32, 8, 0, 32, 32]])}
    assert set(batch) == {"input_ids", "input_ids_2", "time_ids"}
    with torch.no_grad():
        ours = SDXL.unet_conditions({name: getattr(pipe, name) for name in ENCODERS}, batch)
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert ours["encoder_hidden_states"].shape == (2, 77, 64)
    assert torch.equal(ours["encoder_hidden_states"], embeds)
    assert torch.equal(ours["added_cond_kwargs"]["text_embeds"], pooled)
    assert torch.equal(ours["added_cond_kwargs"]["time_ids"], batch["time_ids"].float())
    with torch.no_grad():  # SD: the last hidden state of the one encoder, no added conditions
        sd = SD.unet_conditions({"text_encoder": pipe.text_encoder}, {"input_ids": batch["input_ids"]})
    assert set(sd) == {"encoder_hidden_states"} and torch.equal(sd["encoder_hidden_states"], pipe.text_encoder(batch["input_ids"])[0])


# ---- files: diffusers' real SDXL loader reproduces convlora's adapted models ---------------------


def _adapted_sdxl(template, preset: str):
    pipe = copy.deepcopy(template)
    if preset == "full":
        unet_cfg = unet_lora_config("full", rank=4, alpha=8, conv_rank=2, conv_alpha=1, include_conv_in_out=True)
    else:
        unet_cfg = unet_lora_config(preset, rank=4, alpha=2)
    adapted = inject_pipeline_lora(pipe, unet_cfg, text_encoder_lora_config("attn-mlp", rank=4, alpha=6),
                                   text_encoder_lora_config("attn", rank=2, alpha=3))
    assert set(adapted) == {"unet", *ENCODERS}
    for seed, name in enumerate(("unet", *ENCODERS)):
        randomize_lora_(getattr(pipe, name), seed=seed + 1, std=0.1)
    return pipe


def _assert_same_models(theirs, ours, inputs, ids):
    assert relative_error(_unet_out(theirs, inputs), _unet_out(ours, inputs)) < TOL
    for name in ENCODERS:
        for a, b in zip(_encoder_out64(getattr(theirs, name), ids), _encoder_out64(getattr(ours, name), ids)):
            assert relative_error(a, b) < TOL, name


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
@pytest.mark.parametrize("preset", ["attn", "attn-ff", "full"])
def test_sdxl_load_lora_weights_reproduces_convlora(fmt, preset, sdxl_template, sdxl_inputs, tmp_path):
    ours = _adapted_sdxl(sdxl_template, preset)
    assert relative_error(_unet_out(ours, sdxl_inputs), _unet_out(sdxl_template, sdxl_inputs)) > 1e-2  # it matters
    path = save_pipeline_lora(tmp_path / f"{fmt}.safetensors", unet=ours.unet, text_encoder=ours.text_encoder,
                              text_encoder_2=ours.text_encoder_2, format=fmt, metadata={"base_model": "tiny-sdxl"})
    tensors, header = read_safetensors(path)
    prefixes = {k.split(".")[0] if fmt == "diffusers" else k.split("_")[1] for k in tensors}
    assert prefixes == ({"unet", "text_encoder", "text_encoder_2"} if fmt == "diffusers" else {"unet", "te1", "te2"})
    if fmt == "kohya":
        assert header["ss_base_model_version"] == "sdxl_base_v1-0"
    theirs = copy.deepcopy(sdxl_template)
    theirs.load_lora_weights(str(path))
    ids = theirs.tokenizer(["a photo of a cat", "a sks bag"], padding="max_length", return_tensors="pt").input_ids
    _assert_same_models(theirs, ours, sdxl_inputs, ids)

    # convlora reads its own file back into fresh models exactly
    fresh = copy.deepcopy(sdxl_template)
    info = load_pipeline_lora(path, unet=fresh.unet, text_encoder=fresh.text_encoder, text_encoder_2=fresh.text_encoder_2)
    assert {name: len(info[name]) for name in ("unet", *ENCODERS)} == {
        name: len(convlora.lora_layers(getattr(ours, name))) for name in ("unet", *ENCODERS)}
    for name in ("unet", *ENCODERS):
        mine, back = convlora.lora_state_dict(getattr(ours, name)), convlora.lora_state_dict(getattr(fresh, name))
        assert mine.keys() == back.keys() and all(torch.equal(mine[k], back[k]) for k in mine), name


def test_sdxl_kohya_file_has_the_metadata_kohya_writes(sdxl_template, tmp_path):
    ours = _adapted_sdxl(sdxl_template, "full")
    path = save_pipeline_lora(tmp_path / "k.safetensors", unet=ours.unet, text_encoder=ours.text_encoder,
                              text_encoder_2=ours.text_encoder_2, format="kohya")
    _, header = read_safetensors(path)
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"
    assert json.loads(header["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert (header["ss_network_dim"], header["ss_network_alpha"]) == ("4", "8")


# ---- the SDXL kohya spelling (what ComfyUI and A1111 look up) ------------------------------------


def test_sdxl_kohya_keys_use_the_ldm_module_names(sdxl_template, tmp_path):
    ours = _adapted_sdxl(sdxl_template, "full")
    path = save_pipeline_lora(tmp_path / "k.safetensors", unet=ours.unet, text_encoder=ours.text_encoder,
                              text_encoder_2=ours.text_encoder_2, format="kohya")
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in read_safetensors(path)[0]}
    expected = {
        "lora_unet_input_blocks_0_0",                                         # conv_in
        "lora_unet_input_blocks_1_0_in_layers_2",                             # down_blocks.0.resnets.0.conv1
        "lora_unet_input_blocks_2_0_emb_layers_1",                            # down_blocks.0.resnets.1.time_emb_proj
        "lora_unet_input_blocks_3_0_op",                                      # down_blocks.0.downsamplers.0.conv
        "lora_unet_input_blocks_4_0_skip_connection",                         # down_blocks.1.resnets.0.conv_shortcut
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",         # down_blocks.1.attentions.0 (depth 1)
        "lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_k",         # down_blocks.2.attentions.1 (depth 2)
        "lora_unet_input_blocks_7_1_proj_in",
        "lora_unet_middle_block_0_out_layers_3",                              # mid_block.resnets.0.conv2
        "lora_unet_middle_block_1_transformer_blocks_1_ff_net_0_proj",
        "lora_unet_output_blocks_0_1_transformer_blocks_1_ff_net_2",          # up_blocks.0.attentions.0 (depth 2)
        "lora_unet_output_blocks_2_2_conv",                                   # up_blocks.0.upsamplers.0.conv
        "lora_unet_output_blocks_5_2_conv",                                   # up_blocks.1.upsamplers.0.conv
        "lora_unet_output_blocks_8_0_skip_connection",                        # up_blocks.2.resnets.2.conv_shortcut
        "lora_unet_out_2",                                                    # conv_out
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te1_text_model_encoder_layers_4_mlp_fc2",
        "lora_te2_text_model_encoder_layers_4_self_attn_out_proj",
    }
    assert expected <= names
    assert not [n for n in names if any(s in n for s in ("down_blocks", "mid_block", "up_blocks", "conv1", "resnets"))]
    n_unet = len(convlora.lora_layers(ours.unet))
    assert sum(n.startswith("lora_unet_") for n in names) == n_unet
    assert sum(n.startswith("lora_te1_") for n in names) == 30 and sum(n.startswith("lora_te2_") for n in names) == 20


# ---- import: files written by diffusers' own SDXL exporter and by PEFT ---------------------------


def _randomize_peft(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)


def test_diffusers_trained_sdxl_file_loads_into_convlora(sdxl_template, sdxl_inputs, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    theirs = copy.deepcopy(sdxl_template)
    unet_config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
                             rank_pattern={"conv1": 2})
    te_configs = {name: LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"]) for name in ENCODERS}
    theirs.unet.add_adapter(unet_config)
    for seed, name in enumerate(ENCODERS):
        getattr(theirs, name).add_adapter(te_configs[name])
        _randomize_peft(getattr(theirs, name), seed=10 + seed)
    _randomize_peft(theirs.unet, seed=3)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(theirs.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(theirs.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(theirs.text_encoder_2),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=te_configs["text_encoder"].to_dict(),
        text_encoder_2_lora_adapter_metadata=te_configs["text_encoder_2"].to_dict(),
    )
    ours = copy.deepcopy(sdxl_template)
    info = load_pipeline_lora(tmp_path / "pytorch_lora_weights.safetensors", unet=ours.unet,
                              text_encoder=ours.text_encoder, text_encoder_2=ours.text_encoder_2)
    assert info["format"] == "diffusers" and len(info["text_encoder"]) == len(info["text_encoder_2"]) == 10
    assert convlora.lora_layers(ours.unet)["down_blocks.0.resnets.0.conv1"].r == 2
    ids = ours.tokenizer(["a photo of a cat"], padding="max_length", return_tensors="pt").input_ids
    _assert_same_models(theirs, ours, sdxl_inputs, ids)


def test_peft_trained_sdxl_unet_adapter_loads_into_convlora(sdxl_template, sdxl_inputs, tmp_path):
    from peft import LoraConfig, get_peft_model

    from convlora.formats import load_peft_adapter

    theirs = copy.deepcopy(sdxl_template)
    peft_unet = get_peft_model(theirs.unet, LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_v", "proj_in", "conv2"]))
    _randomize_peft(peft_unet, seed=7)
    peft_unet.save_pretrained(str(tmp_path / "adapter"))
    ours = copy.deepcopy(sdxl_template)
    paths = load_peft_adapter(ours.unet, tmp_path / "adapter")
    targets = [n for n, _ in sdxl_template.unet.named_modules() if n.rsplit(".", 1)[-1] in ("to_q", "to_v", "proj_in", "conv2")]
    assert sorted(paths) == sorted(targets) and len(targets) == 96
    latents, t, states, added = sdxl_inputs
    with torch.no_grad():
        expected = peft_unet(latents, t, states, added_cond_kwargs=added).sample
    assert relative_error(_unet_out(ours, sdxl_inputs), expected) < TOL


# ---- the convlora command on SDXL pipelines and files --------------------------------------------


def test_cli_inspect_convert_doctor_merge_on_sdxl(sdxl_template, sdxl_inputs, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from convlora.cli import main
    from convlora.diffusion.tiny import save_tiny_sdxl_pipeline

    folder = save_tiny_sdxl_pipeline(tmp_path / "sdxl")
    assert main(["inspect", str(folder), "--preset", "attn"]) == 0
    out = capsys.readouterr().out
    assert "(StableDiffusionXLPipeline)" in out and "text_encoder_2: CLIPTextModelWithProjection" in out

    ours = _adapted_sdxl(sdxl_template, "full")
    parts = {name: getattr(ours, name) for name in ("unet", *ENCODERS)}
    kohya = save_pipeline_lora(tmp_path / "k.safetensors", **parts, format="kohya")
    direct = save_pipeline_lora(tmp_path / "d.safetensors", **parts, format="diffusers")
    assert main(["inspect", str(kohya)]) == 0
    out = capsys.readouterr().out
    assert "text_encoder_2: 20 modules" in out and "sdxl_base_v1-0" in out

    # model-less conversion both ways gives the files written from the models
    assert main(["convert", str(kohya), str(tmp_path / "k2d"), "--to", "diffusers"]) == 0
    assert main(["convert", str(direct), str(tmp_path / "d2k.safetensors"), "--to", "kohya"]) == 0
    capsys.readouterr()
    for converted, reference in ((tmp_path / "k2d" / "pytorch_lora_weights.safetensors", direct), (tmp_path / "d2k.safetensors", kohya)):
        a, b = read_safetensors(converted)[0], read_safetensors(reference)[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), converted

    assert main(["doctor", str(kohya), "--base", str(folder)]) == 0
    assert main(["doctor", str(direct), "--base", str(folder)]) == 0
    capsys.readouterr()
    assert main(["merge", str(folder), str(kohya), str(tmp_path / "merged")]) == 0
    assert "unet and 50 text-encoder modules (20 of them in text_encoder_2) (kohya)" in capsys.readouterr().out
    merged = UNet2DConditionModel.from_pretrained(tmp_path / "merged" / "unet").eval()
    latents, t, states, added = sdxl_inputs
    with torch.no_grad():
        assert relative_error(merged(latents, t, states, added_cond_kwargs=added).sample, _unet_out(ours, sdxl_inputs)) < TOL


def test_unet_only_sdxl_file_without_metadata_converts_to_the_sdxl_kohya_spelling(sdxl_template, tmp_path):
    from convlora.formats import convert_lora_file, is_sdxl, read_lora_file

    pipe = copy.deepcopy(sdxl_template)
    inject_pipeline_lora(pipe, unet_lora_config("attn", rank=2))
    src = save_pipeline_lora(tmp_path / "d.safetensors", unet=pipe.unet)
    assert is_sdxl(read_lora_file(src)[1])  # told by the transformer depth alone
    _, written = convert_lora_file(src, tmp_path / "k.safetensors", "kohya")
    tensors, header = read_safetensors(written)
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"
    assert "lora_unet_input_blocks_7_1_transformer_blocks_1_attn1_to_q.lora_down.weight" in tensors
    from convlora.diffusion.tiny import build_tiny_pipeline  # an SD-1.x file stays diffusers-named

    sd_pipe = build_tiny_pipeline(0)
    inject_pipeline_lora(sd_pipe, unet_lora_config("attn", rank=2))
    sd_src = save_pipeline_lora(tmp_path / "sd.safetensors", unet=sd_pipe.unet)
    assert not is_sdxl(read_lora_file(sd_src)[1])
    _, written = convert_lora_file(sd_src, tmp_path / "sdk.safetensors", "kohya")
    tensors, header = read_safetensors(written)
    assert header["ss_base_model_version"] == "sd_v1"
    assert all(k.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_")) for k in tensors)
