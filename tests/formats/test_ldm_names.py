"""LDM module names from a UNet config, checked against diffusers' own LDM checkpoint conversion."""

from __future__ import annotations

import pytest
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from convlora.diffusion.tiny import tiny_unet_config
from convlora.formats.ldm_names import LDMNames

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
