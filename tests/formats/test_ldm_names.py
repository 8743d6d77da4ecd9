"""LDM module names from a UNet config, checked against diffusers' own LDM checkpoint conversion."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from convlora.diffusion import inject_pipeline_lora, save_pipeline_lora, text_encoder_lora_config, unet_lora_config
from convlora.diffusion.tiny import tiny_unet_config
from convlora.formats.ldm_names import LDMNames
from convlora.testing import randomize_lora_

# SD-1.x's layout (4 levels, attention in the first three down / last three up blocks), small channels.
SD1_SHAPED = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
)  # fmt: skip
# SDXL's layout: 3 levels, no attention at the first, 1 / 2 (SDXL: 2 / 10) transformer layers, text_time embedding.
SDXL_SHAPED = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2), cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4,
    use_linear_projection=True,
)  # fmt: skip


@pytest.mark.parametrize("config", [tiny_unet_config(), SD1_SHAPED, SDXL_SHAPED], ids=["tiny", "sd1", "sdxl"])
def test_ldm_names_are_the_ones_diffusers_checkpoint_conversion_reads(config):
    unet = UNet2DConditionModel(**config)
    names = LDMNames.from_config(unet.config)
    state = unet.state_dict()
    ldm = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        ldm[f"model.diffusion_model.{names.to_ldm(module)}.{param}"] = tensor
    assert len(ldm) == len(state)  # no two diffusers modules share an LDM name
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(state)
    assert all(back[k] is state[k] for k in state)  # every tensor went back to its own module
    for key in state:
        module = key.rpartition(".")[0]
        assert names.from_ldm(names.to_ldm(module)) == module


def test_tiny_and_sd1_numbering_differ_only_where_the_layouts_do():
    tiny, sd1 = LDMNames.from_config(tiny_unet_config()), LDMNames.from_config(SD1_SHAPED)
    # SD-1.x's first up block has no attention, the tiny base's has: the upsampler follows it.
    assert tiny.to_ldm("up_blocks.0.upsamplers.0.conv") == "output_blocks.2.2.conv"
    assert sd1.to_ldm("up_blocks.0.upsamplers.0.conv") == "output_blocks.2.1.conv"
    assert tiny.to_ldm("down_blocks.0.downsamplers.0.conv") == sd1.to_ldm("down_blocks.0.downsamplers.0.conv") == "input_blocks.3.0.op"
    assert tiny.to_ldm("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert tiny.to_ldm("mid_block.resnets.1.time_emb_proj") == "middle_block.2.emb_layers.1"
    assert tiny.to_ldm("up_blocks.1.resnets.2.conv_shortcut") == "output_blocks.5.0.skip_connection"
    assert tiny.to_ldm("time_embedding.linear_2") == "time_embed.2" and tiny.to_ldm("conv_out") == "out.2"


def test_sdxl_numbering_and_per_block_layers():
    sdxl = LDMNames.from_config(SDXL_SHAPED)
    assert sdxl.to_ldm("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert sdxl.to_ldm("add_embedding.linear_1") == "label_emb.0.0"
    uneven = LDMNames.from_config({**SD1_SHAPED, "layers_per_block": (1, 2, 1, 3)})
    assert uneven.to_ldm("down_blocks.1.resnets.1.conv1") == "input_blocks.4.0.in_layers.2"  # conv_in, 1 resnet + downsampler, then 2nd resnet
    assert uneven.to_ldm("up_blocks.1.resnets.0.conv1") == "output_blocks.4.0.in_layers.2"  # up block 0: 3 + 1 resnets


def test_unknown_layouts_and_paths_are_named():
    with pytest.raises(ValueError, match=r"no LDM names for UNet block type\(s\) \['AttnDownBlock2D'\]"):
        LDMNames.from_config({**SD1_SHAPED, "down_block_types": ("AttnDownBlock2D",) * 4})
    with pytest.raises(ValueError, match="as many up_block_types as down_block_types"):
        LDMNames.from_config({**SD1_SHAPED, "up_block_types": ("UpBlock2D",)})
    names = LDMNames.from_config(tiny_unet_config())
    with pytest.raises(ValueError, match=r"UNet module 'down_blocks.7.resnets.0.conv1' has no LDM name"):
        names.to_ldm("down_blocks.7.resnets.0.conv1")
    with pytest.raises(ValueError, match=r"LDM UNet module 'output_blocks.9.0.in_layers.2' does not exist"):
        names.from_ldm("output_blocks.9.0.in_layers.2")


@pytest.mark.parametrize("config", [tiny_unet_config(), SD1_SHAPED, SDXL_SHAPED], ids=["tiny", "sd1", "sdxl"])
def test_kohya_spelled_ldm_names_come_back_as_diffusers_paths(config):
    unet = UNet2DConditionModel(**config)
    names = LDMNames.from_config(unet.config)
    paths = [p for p, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(paths) > 50
    for path in paths:
        assert names.from_flat_ldm(names.to_ldm(path).replace(".", "_")) == path
    assert LDMNames.from_config(names.layout) == names  # the layout a kohya header records gives the same names


def test_ldm_named_kohya_file_reads_back_exactly_loads_into_convlora_and_diffusers_refuses_it(tmp_path):
    from convlora.diffusion import load_pipeline_lora
    from convlora.diffusion.tiny import build_tiny_pipeline
    from convlora.formats import LoRAFormatError, read_lora_file, write_lora_file
    from convlora.io import read_safetensors
    from safetensors.torch import save_file

    pipe = build_tiny_pipeline(0)
    inject_pipeline_lora(pipe, unet_lora_config("full", rank=4, alpha=8, conv_rank=2, conv_alpha=1), text_encoder_lora_config("attn", rank=4))
    randomize_lora_(pipe.unet, seed=0)
    randomize_lora_(pipe.text_encoder, seed=1)
    _, weights = read_lora_file(save_pipeline_lora(tmp_path / "k.safetensors", unet=pipe.unet, text_encoder=pipe.text_encoder, format="kohya"))
    path = write_lora_file(weights, tmp_path / "ldm.safetensors", "kohya", ldm_names=LDMNames.from_config(pipe.unet.config))
    tensors, header = read_safetensors(path)
    assert "lora_unet_output_blocks_2_2_conv.alpha" in tensors and "lora_unet_input_blocks_4_1_proj_in.lora_up.weight" in tensors
    _, back = read_lora_file(path)
    assert sorted(back.modules) == sorted(weights.modules) and "convlora_unet_layout" not in back.metadata
    for p, m in weights.modules.items():
        assert torch.equal(back.modules[p].lora_A, m.lora_A) and torch.equal(back.modules[p].lora_B, m.lora_B)
        assert back.modules[p].alpha == m.alpha

    fresh = build_tiny_pipeline(0)
    load_pipeline_lora(path, unet=fresh.unet, text_encoder=fresh.text_encoder)
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        assert (fresh.unet(x, torch.tensor([3]), c).sample - pipe.unet(x, torch.tensor([3]), c).sample).abs().max() < 1e-6
    with pytest.raises(Exception, match="not found in the base model"):  # StableDiffusionPipeline does not renumber LDM names
        build_tiny_pipeline(0).load_lora_weights(path)

    save_file(tensors, tmp_path / "no_layout.safetensors", {k: v for k, v in header.items() if k != "convlora_unet_layout"})
    with pytest.raises(LoRAFormatError, match=r"lora_unet_\w+ is an LDM \(original Stable Diffusion\) UNet name, and the file does not record the UNet layout"):
        read_lora_file(tmp_path / "no_layout.safetensors")
