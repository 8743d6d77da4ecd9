"""doctor's PEFT and diffusers verdicts for DoRA, LoHa and LoKr, each backed by the real loader.

PEFT folders written by convlora (``save_peft_adapter``) and by PEFT (``get_peft_model(...).save_pretrained``):
where doctor says PEFT loads a folder, ``PeftModel.from_pretrained`` gives convlora's outputs within 1e-5
relative (fp32); where it says PEFT refuses one, PEFT raises. diffusers DoRA files: where doctor says
``load_lora_weights`` loads one, the loaded UNet gives convlora's prediction within 1e-5; where it warns
about a text encoder, diffusers' text encoder computes something else.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

import convlora
from convlora.cli import main
from convlora.diffusion import inject_pipeline_lora, save_pipeline_lora, text_encoder_lora_config, unet_lora_config
from convlora.formats import load_peft_adapter, save_peft_adapter
from convlora.formats.doctor import diagnose
from convlora.io import read_safetensors, write_safetensors
from convlora.testing import randomize_lora_, relative_error

pytest.importorskip("peft")
pytest.importorskip("diffusers")
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402

TOL = 1e-5
TARGETS = ["c3", "c1", "lin"]
PEFT, DIFFUSERS = "PEFT PeftModel.from_pretrained", "diffusers StableDiffusionPipeline.load_lora_weights"
CONVLORA = "convlora (load_pipeline_lora / convert)"
TO_KOHYA = "PEFT loads this folder as it is; for ComfyUI / A1111: `convlora convert DIR OUT --to kohya --component unet` (or text_encoder)"


class Net(nn.Module):
    """(N, 8, 6, 6) -> (N, 20): a 3x3 conv, a 1x1 conv and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv2d(8, 16, 3, padding=1)
        self.c1 = nn.Conv2d(16, 12, 1)
        self.lin = nn.Linear(12, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.c1(torch.relu(self.c3(x))).mean(dim=(2, 3)))


def _net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


X = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(5))


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


def _verdicts(path) -> dict[str, tuple[str, list[str]]]:
    return {v.loader: (v.status, v.reasons) for v in diagnose(path).verdicts}


# ---- PEFT folders of each kind -------------------------------------------------------------------
# LoKr r = 8 on these channels: PEFT keeps both sides full (lokr_w1 and lokr_w2)
OURS = {"dora": {"r": 2, "alpha": 3, "kind": "dora"}, "loha": {"r": 2, "alpha": 3, "kind": "loha"},
        "lokr": {"r": 8, "alpha": 5, "kind": "lokr"}}
THEIRS = {"dora": LoraConfig(r=2, lora_alpha=3, use_dora=True, target_modules=TARGETS),
          "loha": LoHaConfig(r=2, alpha=3, target_modules=TARGETS),
          "lokr": LoKrConfig(r=8, alpha=3, target_modules=TARGETS)}
FOR_DIFFUSERS = {
    "dora": ["a PEFT adapter of one model: `convlora convert DIR OUT --to diffusers --component unet`"],
    "loha": ["cannot be converted for it: diffusers files do not carry loha adapters", TO_KOHYA],
    "lokr": ["cannot be converted for it: diffusers files do not carry lokr adapters", TO_KOHYA],
}


def _peft_written(kind: str, folder) -> nn.Module:
    """A PEFT model of ``kind`` with random adapter tensors, saved to ``folder``."""
    theirs = get_peft_model(_net(), copy.deepcopy(THEIRS[kind]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(theirs.named_parameters()):
            noise = torch.randn(param.shape, generator=g)
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * noise)
            elif any(k in name for k in ("lora_A", "lora_B", "hada_", "lokr_")):
                param.copy_(noise * 0.3)
    theirs.save_pretrained(folder)
    return theirs


@pytest.mark.parametrize("kind", sorted(OURS))
def test_convlora_written_peft_folder_of_each_kind_is_ok_for_peft(kind, tmp_path):
    ours = _net()
    convlora.inject_lora(ours, convlora.LoRAConfig(target_modules=TARGETS, **OURS[kind]))
    randomize_lora_(ours, seed=1, std=0.3)
    folder = save_peft_adapter(ours, tmp_path / "peft")
    diagnosis = diagnose(folder)
    v = _verdicts(folder)
    assert v[CONVLORA] == ("ok", []) and v[PEFT] == ("ok", []) and diagnosis.healthy
    assert v[DIFFUSERS] == ("n/a", FOR_DIFFUSERS[kind])
    assert f"  [   ok] {PEFT}\n" in diagnosis.render()
    theirs = PeftModel.from_pretrained(_net(), folder)
    assert relative_error(_out(theirs), _out(ours)) < TOL and relative_error(_out(ours), _out(_net())) > 1e-2


@pytest.mark.parametrize("kind", sorted(THEIRS))
def test_peft_written_folder_of_each_kind_is_ok_for_peft(kind, tmp_path):
    theirs = _peft_written(kind, tmp_path / "peft")
    v = _verdicts(tmp_path / "peft")
    assert v[CONVLORA] == ("ok", []) and v[PEFT] == ("ok", []) and diagnose(tmp_path / "peft").healthy
    assert v[DIFFUSERS] == ("n/a", FOR_DIFFUSERS[kind])
    again = PeftModel.from_pretrained(_net(), tmp_path / "peft")
    ours = _net()
    load_peft_adapter(ours, tmp_path / "peft")
    assert relative_error(_out(again), _out(theirs)) < TOL and relative_error(_out(ours), _out(theirs)) < TOL


def test_suggested_conversions_for_a_peft_loha_folder(tmp_path):
    """kohya works (ComfyUI / A1111 read LoHa there); diffusers is refused, as doctor says."""
    _peft_written("loha", tmp_path / "peft")
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "k.safetensors"), "--to", "kohya", "--component", "unet"]) == 0
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "d.safetensors"), "--to", "diffusers", "--component", "unet"]) == 2
    assert not (tmp_path / "d.safetensors").exists()


def test_lokr_shapes_the_config_does_not_build_are_named(tmp_path):
    """The full-both-sides folder under other configs: with r = 1 PEFT builds lokr_w2_a / lokr_w2_b instead (and
    warns of the keys it does not use); with decompose_factor = 4 another lokr_w1 (and raises)."""
    theirs = _peft_written("lokr", tmp_path / "peft")
    config_file = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "r": 1, "alpha": 1}))
    status, reasons = _verdicts(tmp_path / "peft")[PEFT]
    assert status == "no" and reasons == [
        f"{p}: from r=1, decompose_factor=-1, decompose_both=False it builds lokr_w1 {w1}, lokr_w2_a {w2a}, lokr_w2_b "
        f"{w2b}; the folder holds lokr_w1 {w1}, lokr_w2 {w2}, so it leaves lokr_w2_a, lokr_w2_b at their initial values"
        for p, w1, w2a, w2b, w2 in (("c1", (3, 4), (4, 1), (1, 4), (4, 4, 1, 1)), ("c3", (4, 2), (4, 1), (1, 36), (4, 4, 3, 3)),
                                    ("lin", (4, 3), (5, 1), (1, 4), (5, 4)))
    ]  # fmt: skip
    assert relative_error(_out(PeftModel.from_pretrained(_net(), tmp_path / "peft")), _out(theirs)) > 1e-2

    config_file.write_text(json.dumps({**config, "decompose_factor": 4}))
    status, reasons = _verdicts(tmp_path / "peft")[PEFT]
    assert status == "no" and reasons[0] == (
        "c1: from r=8, decompose_factor=4, decompose_both=False it builds lokr_w1 (4, 4), lokr_w2 (3, 4, 1, 1); the "
        "folder holds lokr_w1 (3, 4), lokr_w2 (4, 4, 1, 1), so it raises a size mismatch"
    )
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(_net(), tmp_path / "peft")


def test_dora_folder_missing_a_magnitude_is_not_what_peft_loads(tmp_path):
    theirs = _peft_written("dora", tmp_path / "peft")
    weights_file = tmp_path / "peft" / "adapter_model.safetensors"
    tensors, header = read_safetensors(weights_file)
    del tensors["base_model.model.c1.lora_magnitude_vector"]
    write_safetensors(tensors, weights_file, header)
    assert _verdicts(tmp_path / "peft")[PEFT] == (
        "no", ["use_dora is set but 1 module(s) have no lora_magnitude_vector, which PEFT then keeps at its initial value: c1"])
    assert relative_error(_out(PeftModel.from_pretrained(_net(), tmp_path / "peft")), _out(theirs)) > 1e-3


def test_peft_tucker_folder_is_named_and_ok_for_peft(tmp_path):
    theirs = get_peft_model(_net(), LoHaConfig(r=2, use_effective_conv2d=True, target_modules=TARGETS))
    theirs.save_pretrained(tmp_path / "peft")
    v = _verdicts(tmp_path / "peft")
    assert v[CONVLORA] == ("no", [f"{tmp_path / 'peft' / 'adapter_config.json'}: use_effective_conv2d is set: PEFT's "
                                  "Tucker form of LoHa / LoKr convs, which convlora does not have"])
    assert v[PEFT] == ("ok", ["1 module(s) in PEFT's Tucker form (use_effective_conv2d), which PEFT reads and convlora "
                              "cannot: c3 (hada_t1, hada_t2)"])
    assert v[DIFFUSERS] == ("n/a", ["convlora cannot read this folder (its line says why), so no `convlora convert` "
                                    "makes a diffusers file of it"])
    assert relative_error(_out(PeftModel.from_pretrained(_net(), tmp_path / "peft")), _out(theirs)) < TOL


def test_peft_loha_folder_on_a_conv3d_is_refused_by_peft(tmp_path):
    """A LoHa folder recording a Conv3d base shape (convlora's writer refuses to write one; written here by hand)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"hada_w1_a": (8, 2), "hada_w1_b": (2, 108), "hada_w2_a": (8, 2), "hada_w2_b": (2, 108)}
    (tmp_path / "peft").mkdir()
    write_safetensors({f"base_model.model.0.{n}": torch.randn(s, generator=g) for n, s in shapes.items()},
                      tmp_path / "peft" / "adapter_model.safetensors",
                      {"format": "pt", "convlora_base_shapes": json.dumps({"0": [8, 4, 3, 3, 3]})})
    config = {"peft_type": "LOHA", "r": 2, "alpha": 2, "target_modules": ["0"], "use_effective_conv2d": False}
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    v = _verdicts(tmp_path / "peft")
    assert v[PEFT] == ("no", ["its loha cannot load this adapter as convlora computes it: Conv3d layers 0 (PEFT's loha "
                              "adapts Linear, Conv1d and Conv2d)"])
    assert v[DIFFUSERS][1][1] == "for ComfyUI / A1111: `convlora convert DIR OUT --to kohya --component unet` (or text_encoder)"
    with pytest.raises(TypeError, match="Conv3d'> not supported"):
        PeftModel.from_pretrained(nn.Sequential(nn.Conv3d(4, 8, 3)), tmp_path / "peft")


def test_peft_has_no_loha_with_dora(tmp_path):
    ours = _net()
    convlora.inject_lora(ours, convlora.LoRAConfig(r=2, kind="loha", weight_decompose=True, target_modules=TARGETS))
    path = convlora.save_lora(ours, tmp_path / "native.safetensors")
    assert _verdicts(path)[PEFT] == ("n/a", ["cannot be converted for it: peft files do not carry loha+dora adapters"])


# ---- diffusers files -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def template():
    from convlora.diffusion.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def dora_pipe(template):
    """DoRA on the full UNet preset (3x3 convs, 1x1 convs, attention) and the text encoder's attention."""
    pipe = copy.deepcopy(template)
    unet_cfg = unet_lora_config("full", rank=4, alpha=8, conv_rank=2, conv_alpha=1, include_conv_in_out=True)
    te_cfg = text_encoder_lora_config("attn", rank=4, alpha=6)
    inject_pipeline_lora(pipe, dataclasses.replace(unet_cfg, kind="dora"), dataclasses.replace(te_cfg, kind="dora"))
    randomize_lora_(pipe.unet, seed=1, std=0.1)
    randomize_lora_(pipe.text_encoder, seed=2, std=0.1)
    return pipe


UNET_IN = tuple(torch.randn(*s, generator=torch.Generator().manual_seed(1)) for s in ((2, 4, 8, 8), (2, 77, 32)))
TOKENS = torch.randint(0, 998, (2, 77), generator=torch.Generator().manual_seed(2))


def _unet_out(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe.unet(UNET_IN[0], torch.tensor([10, 500]), UNET_IN[1]).sample


def _text_out(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe.text_encoder(TOKENS)[0]


def _rewrite(path, out, rename) -> str:
    tensors, header = read_safetensors(path)
    write_safetensors({rename(k): t for k, t in tensors.items()}, out, header)
    return str(out)


@pytest.mark.parametrize("unet_spelling", ["", ".weight"])
def test_convlora_diffusers_dora_file_is_ok_and_loads_in_diffusers(unet_spelling, template, dora_pipe, tmp_path):
    """UNet magnitudes load under both spellings; convlora writes ``<key>.lora_magnitude_vector``."""
    path = save_pipeline_lora(tmp_path / "a" / "pytorch_lora_weights.safetensors", unet=dora_pipe.unet)
    path = _rewrite(path, tmp_path / "pytorch_lora_weights.safetensors",
                    lambda k: k + unet_spelling if k.endswith(".lora_magnitude_vector") else k)
    assert sum(k.endswith(f".lora_magnitude_vector{unet_spelling}") for k in read_safetensors(path)[0]) == 119
    assert _verdicts(path)[DIFFUSERS] == ("ok", []) and diagnose(path).healthy
    comfyui = _verdicts(path)["ComfyUI (LoraLoader)"]
    assert comfyui[0] == "no" and comfyui[1][0] == (
        "drops the DoRA magnitude of 119 module(s) ('lora key not loaded': comfy/lora.py load_lora reads one only as "
        "<name>.dora_scale), so those it loads run as plain LoRA: "
        f"unet.conv_in.lora_magnitude_vector{unet_spelling}, unet.conv_out.lora_magnitude_vector{unet_spelling}, "
        f"unet.down_blocks.0.downsamplers.0.conv.lora_magnitude_vector{unet_spelling}, "
        f"unet.down_blocks.0.resnets.0.conv1.lora_magnitude_vector{unet_spelling}, ... (115 more)"
    )
    # the names come right in a kohya file, the DoRA weight does not: the suggested fix says so
    assert comfyui[1][-1] == (
        "fix: `convlora convert FILE OUT --to kohya` (its names then load, but ComfyUI and A1111 compute another "
        "DoRA weight than convlora from any file, for 119 DoRA module(s): see the DoRA-axis line)"
    )
    theirs = copy.deepcopy(template)
    theirs.load_lora_weights(path)
    assert (_unet_out(theirs) - _unet_out(dora_pipe)).abs().max() < TOL
    assert relative_error(_unet_out(dora_pipe), _unet_out(template)) > 1e-2


def test_text_encoder_magnitude_without_weight_is_warned_and_convert_fixes_it(template, dora_pipe, tmp_path):
    path = save_pipeline_lora(tmp_path / "a.safetensors", unet=dora_pipe.unet, text_encoder=dora_pipe.text_encoder)
    assert _verdicts(path)[DIFFUSERS] == ("ok", [])
    bare = _rewrite(path, tmp_path / "bare.safetensors", lambda k: k.removesuffix(".weight") if "magnitude" in k else k)
    status, reasons = _verdicts(bare)[DIFFUSERS]
    assert status == "wrong" and reasons == [
        "20 text-encoder DoRA magnitude(s) lack '.weight', so transformers' load_adapter (which it loads text encoders "
        "with) leaves them unused and those modules run on the magnitude PEFT initialises: "
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_magnitude_vector, "
        "text_encoder.text_model.encoder.layers.0.self_attn.out_proj.lora_magnitude_vector, "
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_magnitude_vector, "
        "text_encoder.text_model.encoder.layers.0.self_attn.v_proj.lora_magnitude_vector, ... (16 more); "
        "fix: `convlora convert FILE OUT --to diffusers`"
    ]
    assert not diagnose(bare).healthy
    theirs = copy.deepcopy(template)
    theirs.load_lora_weights(bare)
    assert relative_error(_text_out(theirs), _text_out(dora_pipe)) > 1e-2
    assert (_unet_out(theirs) - _unet_out(dora_pipe)).abs().max() < TOL  # the UNet's bare magnitudes do load

    fixed = tmp_path / "fixed" / "pytorch_lora_weights.safetensors"
    assert main(["convert", bare, str(fixed), "--to", "diffusers"]) == 0
    assert _verdicts(fixed)[DIFFUSERS] == ("ok", [])
    again = copy.deepcopy(template)
    again.load_lora_weights(str(fixed))
    assert relative_error(_text_out(again), _text_out(dora_pipe)) < 5e-5  # test_diffusers_dora.py's fp32 text tolerance


def test_diffusers_spelled_loha_keys_are_refused_by_diffusers(template, tmp_path):
    g = torch.Generator().manual_seed(0)
    key = "unet.down_blocks.0.resnets.0.conv1"
    shapes = {"hada_w1_a": (32, 2), "hada_w1_b": (2, 288), "hada_w2_a": (32, 2), "hada_w2_b": (2, 288)}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    write_safetensors({f"{key}.{n}": torch.randn(s, generator=g) for n, s in shapes.items()}, path, {"format": "pt"})
    assert _verdicts(path)[DIFFUSERS] == ("no", [
        "keys without 'lora' make it refuse the file ('Invalid LoRA checkpoint') (LoHa's hada_* and LoKr's lokr_* keys: "
        f"it loads LoRA and DoRA only): {key}.hada_w1_a, {key}.hada_w1_b, {key}.hada_w2_a, {key}.hada_w2_b"
    ])  # fmt: skip
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        copy.deepcopy(template).load_lora_weights(str(path))
