"""Format detection, kohya name restoration, file-to-file conversion and reading edge cases."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from convlora.formats import (
    LoRAFormatError,
    LoRAModule,
    LoRAWeights,
    convert_lora_file,
    detect_format,
    read_lora_file,
    write_lora_file,
)
from convlora.formats.kohya import kohya_name_to_path
from convlora.io import read_safetensors, write_safetensors


def _weights() -> LoRAWeights:
    g = torch.Generator().manual_seed(0)
    return LoRAWeights(
        {
            "unet.down_blocks.0.resnets.0.conv1": LoRAModule(torch.randn(2, 32, 3, 3, generator=g), torch.randn(32, 2, 1, 1, generator=g), 1.0),
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0": LoRAModule(torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g), 8.0),
            "unet.mid_block.resnets.0.time_emb_proj": LoRAModule(torch.randn(4, 128, generator=g), torch.randn(64, 4, generator=g), 8.0),
            "text_encoder.encoder.layers.0.self_attn.q_proj": LoRAModule(torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g), 6.0),
        },
        metadata={"base_model": "tiny-sd", "steps": "100"},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("keys", "header", "expected"),
    [
        (["a.lora_A", "a.lora_B"], {"convlora_modules": "{}"}, "native"),
        (["unet.a.lora_A.weight", "unet.a.lora_B.weight"], {}, "diffusers"),
        (["unet.a.to_q_lora.down.weight"], {}, "diffusers"),
        (["lora_unet_a.lora_down.weight", "lora_unet_a.alpha"], {}, "kohya"),
        (["base_model.model.fc.lora_A.weight"], {}, "peft"),
    ],
)
def test_detect_format(keys, header, expected):
    assert detect_format(keys, header) == expected


def test_no_lora_keys_raises_naming_them(tmp_path):
    write_safetensors({"conv.weight": torch.zeros(2, 2)}, tmp_path / "plain.safetensors")
    with pytest.raises(LoRAFormatError, match=r"no LoRA keys found \(1 key\(s\): conv\.weight\)"):
        read_lora_file(tmp_path / "plain.safetensors")


def test_safetensors_whose_header_length_starts_with_0x80_is_not_mistaken_for_a_pickle(tmp_path):
    # The 8-byte header length came out as 0x6680 for a real LoRA file: its first byte is the pickle
    # protocol marker 0x80. Pad the metadata until that happens and check the file still reads.
    path = tmp_path / "x.safetensors"
    for pad in range(300):
        write_safetensors({"a.lora_A": torch.zeros(1)}, path, {"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80", struct.unpack("<Q", path.read_bytes()[:8])
    tensors, header = read_safetensors(path)
    assert list(tensors) == ["a.lora_A"] and header["pad"].startswith("x")


def test_kohya_names_restore_to_diffusers_paths():
    assert kohya_name_to_path("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0") == (
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
    )
    assert kohya_name_to_path("lora_unet_up_blocks_0_resnets_2_conv_shortcut") == "unet.up_blocks.0.resnets.2.conv_shortcut"
    assert kohya_name_to_path("lora_unet_mid_block_resnets_0_time_emb_proj") == "unet.mid_block.resnets.0.time_emb_proj"
    assert kohya_name_to_path("lora_unet_down_blocks_0_downsamplers_0_conv") == "unet.down_blocks.0.downsamplers.0.conv"
    assert kohya_name_to_path("lora_te_text_model_encoder_layers_3_self_attn_out_proj") == (
        "text_encoder.text_model.encoder.layers.3.self_attn.out_proj"
    )
    assert kohya_name_to_path("lora_te2_text_model_encoder_layers_0_mlp_fc1") == "text_encoder_2.text_model.encoder.layers.0.mlp.fc1"


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "native"])
def test_every_format_round_trips_tensors_alpha_and_metadata(fmt, tmp_path):
    weights = _weights()
    path = write_lora_file(weights, tmp_path / f"lora_{fmt}.safetensors", fmt)
    got_fmt, back = read_lora_file(path)
    assert got_fmt == fmt
    # files spell CLIP paths nested (text_model.); loading maps them onto flattened models
    expected_paths = {p.replace("text_encoder.encoder", "text_encoder.text_model.encoder") if fmt != "native" else p for p in weights.modules}
    assert set(back.modules) == expected_paths
    for path_, module in weights.modules.items():
        other = back.modules[path_.replace("text_encoder.encoder", "text_encoder.text_model.encoder") if fmt != "native" else path_]
        assert torch.equal(other.lora_A, module.lora_A) and torch.equal(other.lora_B, module.lora_B)
        assert other.alpha == module.alpha
    assert back.metadata["base_model"] == "tiny-sd" and back.metadata["steps"] == "100"


def test_kohya_header(tmp_path):
    path = write_lora_file(_weights(), tmp_path / "k.safetensors", "kohya")
    tensors, header = read_safetensors(path)
    assert header["ss_network_module"] == "networks.lora"
    assert (header["ss_network_dim"], header["ss_network_alpha"]) == ("4", "8")
    assert json.loads(header["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert header["ss_base_model_version"] == "sd_v1"
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].dim() == 0
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors


def test_diffusers_header_carries_alpha(tmp_path):
    path = write_lora_file(_weights(), tmp_path / "d.safetensors", "diffusers")
    tensors, header = read_safetensors(path)
    meta = json.loads(header["lora_adapter_metadata"])
    assert (meta["unet.r"], meta["unet.lora_alpha"]) == (4, 8)
    assert meta["unet.rank_pattern"] == {"down_blocks.0.resnets.0.conv1": 2}
    assert meta["unet.alpha_pattern"] == {"down_blocks.0.resnets.0.conv1": 1}
    assert meta["text_encoder.target_modules"] == ["encoder.layers.0.self_attn.q_proj"]
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in tensors


def test_convert_chain_is_lossless(tmp_path):
    src = write_lora_file(_weights(), tmp_path / "a.safetensors", "native")
    convert_lora_file(src, tmp_path / "b.safetensors", "kohya")
    convert_lora_file(tmp_path / "b.safetensors", tmp_path / "c", "diffusers")
    fmt, back = read_lora_file(tmp_path / "c" / "pytorch_lora_weights.safetensors")
    assert fmt == "diffusers"
    original = {p.replace("text_encoder.encoder", "text_encoder.text_model.encoder"): m for p, m in _weights().modules.items()}
    assert set(back.modules) == set(original)
    for path, module in original.items():
        assert torch.equal(back.modules[path].lora_A, module.lora_A) and back.modules[path].alpha == module.alpha


def test_rslora_becomes_equivalent_kohya_alpha(tmp_path):
    weights = _weights()
    weights.use_rslora = True
    _, back = read_lora_file(write_lora_file(weights, tmp_path / "k.safetensors", "kohya"))
    for path, module in weights.modules.items():
        other = back.modules[path.replace("text_encoder.encoder", "text_encoder.text_model.encoder")]
        assert other.alpha / other.r == pytest.approx(module.alpha / module.r**0.5)  # same scaling


def test_kohya_leftovers_are_named(tmp_path):
    tensors = {
        "lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
        "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1),
        "lora_unet_conv_in.lokr_t2": torch.zeros(2, 2, 3, 3),
    }
    write_safetensors(tensors, tmp_path / "tucker.safetensors")
    with pytest.raises(LoRAFormatError, match=r"1 key\(s\) are not LoRA weights convlora understands: lora_unet_conv_in\.lokr_t2 "
                       r"\(convlora imports LoRA / LoCon, LoHa, LoKr and DoRA; no Tucker-decomposed convs"):
        read_lora_file(tmp_path / "tucker.safetensors")
    tensors["lora_unet_conv_in.hada_w1_a"] = tensors.pop("lora_unet_conv_in.lokr_t2")
    write_safetensors(tensors, tmp_path / "mixed.safetensors")
    with pytest.raises(LoRAFormatError, match=r"lora_unet_conv_in mixes the tensors of several adapter kinds: lora_unet_conv_in\.hada_w1_a, "
                       r"lora_unet_conv_in\.lora_down\.weight, lora_unet_conv_in\.lora_up\.weight$"):
        read_lora_file(tmp_path / "mixed.safetensors")


def test_lone_down_matrix_is_named(tmp_path):
    write_safetensors({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)}, tmp_path / "half.safetensors")
    with pytest.raises(LoRAFormatError, match="without both LoRA matrices.*lora_unet_conv_in"):
        read_lora_file(tmp_path / "half.safetensors")


def test_diffusers_to_peft_needs_one_component(tmp_path):
    src = write_lora_file(_weights(), tmp_path / "d.safetensors", "diffusers")
    with pytest.raises(LoRAFormatError, match="choose one with --component"):
        convert_lora_file(src, tmp_path / "peft", "peft")
    convert_lora_file(src, tmp_path / "peft", "peft", component="unet")
    fmt, back = read_lora_file(tmp_path / "peft")
    assert fmt == "peft" and len(back.modules) == 3 and back.modules["mid_block.resnets.0.time_emb_proj"].alpha == 8.0


def test_kohya_network_keys_describe_the_tensors_not_stale_metadata(tmp_path):
    weights = _weights()
    weights.metadata.update({"ss_network_dim": "128", "ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1_5"})
    _, header = read_safetensors(write_lora_file(weights, tmp_path / "k.safetensors", "kohya"))
    assert (header["ss_network_dim"], header["ss_network_module"]) == ("4", "networks.lora")
    assert header["ss_base_model_version"] == "sd_v1_5"  # the caller's to say
    _, back = read_lora_file(tmp_path / "k.safetensors")
    assert "ss_network_dim" not in back.metadata and back.metadata["ss_base_model_version"] == "sd_v1_5"


def test_two_spellings_of_one_module_are_refused():
    from torch import nn

    from convlora.formats import load_weights_into_model

    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4)))
    one = LoRAModule(torch.zeros(2, 4), torch.zeros(4, 2), 2.0)
    with pytest.raises(LoRAFormatError, match=r"several LoRA entries land on the same module: 0\.0 \(0\.0 and 0_0\)"):
        load_weights_into_model(model, {"0.0": one, "0_0": one})  # exact name, and kohya's spelling of it
