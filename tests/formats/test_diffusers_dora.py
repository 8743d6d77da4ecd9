"""DoRA in diffusers LoRA files, against the real ``StableDiffusionPipeline.load_lora_weights``.

The tiny SD pipeline (UNet with 3x3 and 1x1 convs and attention Linears, CLIP text encoder) with DoRA
everywhere: diffusers' loaded pipeline must give convlora's UNet prediction within 1e-5 and its text
encoder's hidden states within the tolerances of tests/diffusion/test_diffusers_interop.py (5e-5
relative in float32, 1e-5 in float64). LoHa and LoKr are refused for diffusers files by name.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

import convlora
from convlora.diffusion import (
    inject_pipeline_lora,
    load_pipeline_lora,
    save_pipeline_lora,
    text_encoder_lora_config,
    unet_lora_config,
)
from convlora.formats import LoRAFormatError, write_lora_file
from convlora.formats.weights import LoRAWeights, weights_from_model
from convlora.io import read_safetensors, write_safetensors
from convlora.testing import randomize_lora_, relative_error

pytest.importorskip("diffusers")
pytest.importorskip("peft")

TOL = 1e-5
TE_FP32_REL_TOL = 5e-5  # as tests/diffusion/test_diffusers_interop.py: the tiny CLIP amplifies fp32 rounding


@pytest.fixture(scope="module")
def template():
    from convlora.diffusion.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    unet_in = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g))
    return unet_in, torch.randint(0, 998, (2, 77), generator=torch.Generator().manual_seed(2))


def _outputs(pipe, inputs):
    unet_in, tokens = inputs
    with torch.no_grad():
        return pipe.unet(*unet_in).sample, pipe.text_encoder(tokens)[0]


def _text_encoder_out64(text_encoder, tokens):
    model = copy.deepcopy(text_encoder).double()
    for layer in convlora.lora_layers(model).values():
        layer.unmerge()
    with torch.no_grad():
        return model(tokens)[0]


def _text_encoders_agree(theirs, ours, tokens) -> tuple[float, float]:
    """(float32 relative error, float64 max abs difference) of two text encoders' hidden states."""
    with torch.no_grad():
        rel32 = relative_error(theirs(tokens)[0], ours(tokens)[0])
    return rel32, float((_text_encoder_out64(theirs, tokens) - _text_encoder_out64(ours, tokens)).abs().max())


def _dora_pipeline(template, kind: str = "dora"):
    """DoRA on the full UNet preset (3x3 convs at conv rank 2, 1x1 convs, attention) and the text encoder's attn + MLP."""
    pipe = copy.deepcopy(template)
    unet_cfg = unet_lora_config("full", rank=4, alpha=8, conv_rank=2, conv_alpha=1, include_conv_in_out=True)
    te_cfg = text_encoder_lora_config("attn-mlp", rank=4, alpha=6)
    inject_pipeline_lora(pipe, dataclasses.replace(unet_cfg, kind=kind), dataclasses.replace(te_cfg, kind=kind))
    randomize_lora_(pipe.unet, seed=1, std=0.1)
    randomize_lora_(pipe.text_encoder, seed=2, std=0.1)
    return pipe


def test_diffusers_load_lora_weights_runs_convlora_dora(template, inputs, tmp_path):
    ours = _dora_pipeline(template)
    unet_out, te_out = _outputs(ours, inputs)
    base_unet, base_te = _outputs(template, inputs)
    assert relative_error(unet_out, base_unet) > 1e-2 and relative_error(te_out, base_te) > 1e-2
    path = save_pipeline_lora(tmp_path / "pytorch_lora_weights.safetensors", unet=ours.unet, text_encoder=ours.text_encoder)

    tensors, header = read_safetensors(path)
    expected_keys = set()
    for component, suffix in (("unet", ""), ("text_encoder", ".weight")):
        for module_path in convlora.lora_layers(getattr(ours, component)):
            key = f"{component}.{'text_model.' + module_path if component == 'text_encoder' else module_path}"
            expected_keys |= {f"{key}.lora_A.weight", f"{key}.lora_B.weight", f"{key}.lora_magnitude_vector{suffix}"}
    assert set(tensors) == expected_keys
    assert tensors["unet.conv_in.lora_magnitude_vector"].shape == (1, 32, 1, 1)
    assert tensors["unet.down_blocks.1.attentions.0.proj_in.lora_magnitude_vector"].shape == (1, 64, 1, 1)
    assert tensors["text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_magnitude_vector.weight"].shape == (37,)
    config = json.loads(header["lora_adapter_metadata"])
    assert config["unet.use_dora"] is True and config["text_encoder.use_dora"] is True

    theirs = copy.deepcopy(template)
    theirs.load_lora_weights(str(path))
    their_unet, _ = _outputs(theirs, inputs)
    assert (their_unet - unet_out).abs().max() < TOL
    rel32, abs64 = _text_encoders_agree(theirs.text_encoder, ours.text_encoder, inputs[1])
    assert rel32 < TE_FP32_REL_TOL and abs64 < TOL

    again = copy.deepcopy(template)
    load_pipeline_lora(path, unet=again.unet, text_encoder=again.text_encoder)
    assert {a.kind.label for a in convlora.formats.weights.model_adapter(again.unet).values()} == {"dora"}
    again_unet, again_te = _outputs(again, inputs)
    assert torch.equal(again_unet, unet_out) and torch.equal(again_te, te_out)


def test_text_encoder_magnitudes_need_the_weight_suffix_in_diffusers(template, inputs, tmp_path):
    """Without ``.weight`` diffusers' text-encoder load (transformers' load_adapter) drops the magnitude."""
    ours = _dora_pipeline(template)
    path = save_pipeline_lora(tmp_path / "a" / "pytorch_lora_weights.safetensors", text_encoder=ours.text_encoder)
    tensors, header = read_safetensors(path)
    bare = {k.removesuffix(".weight") if "lora_magnitude_vector" in k else k: v for k, v in tensors.items()}
    write_safetensors(bare, tmp_path / "b" / "pytorch_lora_weights.safetensors", header)
    theirs = copy.deepcopy(template)
    theirs.load_lora_weights(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert _text_encoders_agree(theirs.text_encoder, ours.text_encoder, inputs[1])[0] > 1e-2
    # convlora reads both spellings as the same DoRA
    fresh = copy.deepcopy(template)
    load_pipeline_lora(tmp_path / "b" / "pytorch_lora_weights.safetensors", text_encoder=fresh.text_encoder)
    assert torch.equal(_outputs(fresh, inputs)[1], _outputs(ours, inputs)[1])


def test_diffusers_trained_dora_file_loads_into_convlora(template, inputs, tmp_path):
    """A file diffusers writes itself: PEFT DoRA adapters, ``save_lora_weights`` (UNet only: diffusers reads its
    own text-encoder magnitudes without ``.weight`` wrongly, see the test above)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    theirs = copy.deepcopy(template)
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, rank_pattern={"conv1": 2},
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut"])
    theirs.unet.add_adapter(config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in theirs.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=g))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(theirs.unet),
                                              unet_lora_adapter_metadata=config.to_dict())
    expected, _ = _outputs(theirs, inputs)
    assert relative_error(expected, _outputs(template, inputs)[0]) > 1e-2

    ours = copy.deepcopy(template)
    info = load_pipeline_lora(tmp_path / "pytorch_lora_weights.safetensors", unet=ours.unet)
    assert info["format"] == "diffusers"
    layers = convlora.lora_layers(ours.unet)
    assert layers["down_blocks.0.resnets.0.conv1"].r == 2
    assert {a.kind.label for a in convlora.formats.weights.model_adapter(ours.unet).values()} == {"dora"}
    got, _ = _outputs(ours, inputs)
    assert (got - expected).abs().max() < TOL


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_loha_and_lokr_are_refused_for_diffusers_with_the_reason(kind, template, tmp_path):
    pipe = copy.deepcopy(template)
    convlora.inject_lora(pipe.unet, convlora.LoRAConfig(r=2, kind=kind, target_modules=["to_q", "to_k"]))
    with pytest.raises(LoRAFormatError, match=(
        rf"^diffusers files do not carry these adapter kinds: {kind} \(unet\.down_blocks\.1\.attentions\.0\.transformer_blocks"
        r"\.0\.attn1\.to_q, .*; carried by native, kohya, peft\)\. diffusers' StableDiffusion / SDXL load_lora_weights "
        r"refuses every key without 'lora' in it, as LoHa's hada_\* and LoKr's lokr_\* keys are \(loaders/lora_pipeline\.py\), "
        r"and loads LoRA and DoRA only$"
    )):
        save_pipeline_lora(tmp_path / "p.safetensors", unet=pipe.unet, format="diffusers")
    assert not list(tmp_path.iterdir())


def test_a_component_mixing_dora_and_lora_is_refused(template, tmp_path):
    dora, lora = _dora_pipeline(template), _dora_pipeline(template, kind="lora")
    modules = weights_from_model(dora.unet, prefix="unet.")
    modules["unet.conv_in"] = weights_from_model(lora.unet, prefix="unet.")["unet.conv_in"]
    with pytest.raises(LoRAFormatError, match=r"^diffusers gives each pipeline component one LoraConfig, so unet must be "
                                              r"all DoRA or all plain LoRA; it has DoRA on .* and plain LoRA on conv_in$"):
        write_lora_file(LoRAWeights(modules), tmp_path / "p.safetensors", "diffusers")
    assert not list(tmp_path.iterdir())
