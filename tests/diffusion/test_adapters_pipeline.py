"""A second LoRA file under a new adapter name, in every format, on the tiny SD UNet."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

import convlora
from convlora.diffusion import load_pipeline_lora, save_pipeline_lora, unet_lora_config
from convlora.formats import load_peft_adapter, save_peft_adapter
from convlora.io import read_safetensors
from convlora.testing import randomize_lora_, relative_error


def _save(fmt: str, model, path):
    if fmt == "native":
        return convlora.save_lora(model, path / "lora.safetensors")
    if fmt == "peft":
        return save_peft_adapter(model, path / "peft")
    return save_pipeline_lora(path / f"{fmt}.safetensors", unet=model, format=fmt)


def _load(fmt: str, model, file, adapter_name=None):
    if fmt == "native":
        return convlora.load_lora(model, file, adapter_name=adapter_name)
    if fmt == "peft":
        return load_peft_adapter(model, file, adapter_name=adapter_name)
    return load_pipeline_lora(file, unet=model, adapter_name=adapter_name)["unet"]


def _adapted_unet(template, config, seed):
    unet = copy.deepcopy(template.unet)
    convlora.inject_lora(unet, config)
    return randomize_lora_(unet, seed=seed, std=0.1)


@pytest.mark.parametrize("fmt", ["native", "diffusers", "kohya", "peft"])
def test_second_file_under_a_new_name_adds_exactly_its_weighted_update(fmt, _tiny_pipeline_template, unet_inputs, tmp_path):
    first = _adapted_unet(_tiny_pipeline_template, unet_lora_config("attn", rank=4, alpha=2), seed=1)
    # the second adapter also covers modules the first does not (ff, proj_in / proj_out) and another rank
    donor = _adapted_unet(_tiny_pipeline_template, unet_lora_config("attn-ff", rank=2, alpha=3), seed=2)
    file = _save(fmt, donor, tmp_path)
    reference = copy.deepcopy(first)

    loaded = _load(fmt, first, file, adapter_name="second")
    assert sorted(loaded) == sorted(convlora.lora_layers(donor))
    assert convlora.list_adapters(first) == ["default", "second"] and convlora.active_adapters(first) == ["second"]
    convlora.set_adapters(first, ["default", "second"], [0.7, 1.0])
    first.eval()

    # independently: the first adapter merged at strength 0.7, then the second file loaded on that base
    convlora.set_lora_scale(reference, 0.7)
    convlora.merge_and_unload(reference)
    _load(fmt, reference, file)
    reference.eval()
    with torch.no_grad():
        assert relative_error(first(*unet_inputs).sample, reference(*unet_inputs).sample) < 1e-5


def test_bad_kohya_file_under_a_new_name_leaves_the_unet_bit_identical(_tiny_pipeline_template, tmp_path):
    unet = _adapted_unet(_tiny_pipeline_template, unet_lora_config("attn", rank=4), seed=1).eval()
    donor = _adapted_unet(_tiny_pipeline_template, unet_lora_config("attn-ff", rank=2), seed=2)
    file = _save("kohya", donor, tmp_path)
    tensors, header = read_safetensors(file)
    up = next(k for k in tensors if k.endswith("ff_net_2.lora_up.weight"))
    tensors[up] = torch.full_like(tensors[up], float("nan"))  # found only after the new layers were injected
    save_file(tensors, tmp_path / "bad.safetensors", metadata=header)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    weights = {p: layer.weight.detach().clone() for p, layer in convlora.lora_layers(unet).items()}
    kinds = {p: type(m) for p, m in unet.named_modules()}
    with pytest.raises(ValueError, match="non-finite values"):
        load_pipeline_lora(tmp_path / "bad.safetensors", unet=unet, adapter_name="second")
    assert {p: type(m) for p, m in unet.named_modules()} == kinds
    after = unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(layer.merged and torch.equal(layer.weight, weights[p]) for p, layer in convlora.lora_layers(unet).items())
    assert convlora.list_adapters(unet) == ["default"]
