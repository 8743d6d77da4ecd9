"""kohya / LyCORIS files of LoHa, LoKr and DoRA: convlora -> file -> LyCORIS's own loader (``lycoris.kohya
.create_network_from_weights``) gives convlora's outputs, LyCORIS's own modules -> file -> convlora gives
LyCORIS's, files read back bit-exactly, and what convlora refuses is named."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import convlora
from convlora.diffusion.tiny import tiny_unet_config
from convlora.formats import LoRAFormatError, read_lora_file, write_lora_file
from convlora.formats.kohya import BASE_SHAPES_KEY
from convlora.formats.weights import (
    LoRAWeights,
    load_weights_into_model,
    weights_from_model,
)
from convlora.io import read_safetensors, write_safetensors
from convlora.testing import randomize_lora_, relative_error

REL = 1e-5  # convlora vs LyCORIS, relative to the output's largest value

# name -> LoRAConfig options; the layer sizes below make r=2 factorise LoKr's W2 (and W1 with decompose_both),
# while r=16 leaves both LoKr sides whole (scale 1).
KINDS = {
    "loha": {"kind": "loha", "r": 4},
    "lokr": {"kind": "lokr", "r": 2},
    "lokr-both": {"kind": "lokr", "r": 2, "decompose_both": True},
    "lokr-whole": {"kind": "lokr", "r": 16},
    "lokr-factor4": {"kind": "lokr", "r": 2, "factor": 4},
    "dora": {"kind": "dora", "r": 4},
    "loha-dora": {"kind": "loha", "r": 4, "weight_decompose": True},
    "lokr-dora": {"kind": "lokr", "r": 2, "weight_decompose": True},
}
LAYERS = ("conv3", "conv1", "linear")


class Tiny(nn.Module):
    """A 3x3 conv, a 1x1 conv and a Linear, named as a UNet's modules would be in a kohya file."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv1 = nn.Conv2d(64, 64, 1)
        self.linear = nn.Linear(64, 96)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.conv1(torch.relu(self.conv3(x))).mean((2, 3)))


def _adapted(kind_name: str, targets=LAYERS, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(base, copy with a randomised adapter of ``kind_name`` on ``targets``)."""
    torch.manual_seed(seed)
    base = Tiny()
    model = copy.deepcopy(base)
    convlora.inject_lora(model, convlora.LoRAConfig(alpha=3.0, target_modules=list(targets), **KINDS[kind_name]))
    randomize_lora_(model, seed=seed + 1, std=0.3)
    return base, model


def _write(model: nn.Module, path) -> str:
    return str(write_lora_file(LoRAWeights(weights_from_model(model, prefix="unet.")), path, "kohya"))


def _lycoris_applied(base: nn.Module, path: str) -> nn.Module:
    """A copy of ``base`` running LyCORIS's modules built from the file, as sd-scripts loads a LyCORIS file."""
    from lycoris.kohya import create_network_from_weights

    theirs = copy.deepcopy(base)
    network, _ = create_network_from_weights(1.0, path, None, None, theirs)
    network.apply_to(None, theirs, apply_text_encoder=False, apply_unet=True)
    assert len(network.unet_loras) == len([m for m in base.modules() if m is not base])
    return theirs.eval()


def _read_back(base: nn.Module, path) -> nn.Module:
    _, weights = read_lora_file(path)
    fresh = copy.deepcopy(base)
    load_weights_into_model(fresh, weights.component("unet"))
    return fresh


@pytest.mark.parametrize("kind_name", KINDS)
def test_lycoris_loads_convlora_kohya_files_to_the_same_outputs_and_they_read_back_exactly(kind_name, tmp_path):
    base, model = _adapted(kind_name)
    path = _write(model, tmp_path / "a.safetensors")
    x = torch.randn(2, 32, 7, 7)
    with torch.no_grad():
        ours, plain = model(x), base(x)
        theirs = _lycoris_applied(base, path)(x)
        again = _read_back(base, path)(x)
    assert relative_error(ours, plain) > 0.1  # the adapter changes the output ...
    assert relative_error(theirs, ours) < REL  # ... and LyCORIS computes the same
    assert torch.equal(again, ours)
    fresh = _read_back(base, path)
    ours_sd, theirs_sd = convlora.lora_state_dict(model), convlora.lora_state_dict(fresh)
    assert ours_sd.keys() == theirs_sd.keys() and all(torch.equal(ours_sd[k], theirs_sd[k]) for k in ours_sd)


def test_the_keys_layouts_and_header_are_lycoris(tmp_path):
    _, model = _adapted("lokr-dora")
    tensors, header = read_safetensors(_write(model, tmp_path / "a.safetensors"))
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    assert shapes == {
        # 3x3 conv 32 -> 64: W1 (8, 4), W2 = (8, 2) @ (2, 8 * 9); DoRA (64, 1, 1, 1)
        "lora_unet_conv3.lokr_w1": (8, 4), "lora_unet_conv3.lokr_w2_a": (8, 2), "lora_unet_conv3.lokr_w2_b": (2, 72),
        "lora_unet_conv3.dora_scale": (64, 1, 1, 1), "lora_unet_conv3.alpha": (),
        "lora_unet_conv1.lokr_w1": (8, 8), "lora_unet_conv1.lokr_w2_a": (8, 2), "lora_unet_conv1.lokr_w2_b": (2, 8),
        "lora_unet_conv1.dora_scale": (64, 1, 1, 1), "lora_unet_conv1.alpha": (),
        "lora_unet_linear.lokr_w1": (8, 8), "lora_unet_linear.lokr_w2_a": (12, 2), "lora_unet_linear.lokr_w2_b": (2, 8),
        "lora_unet_linear.dora_scale": (96, 1), "lora_unet_linear.alpha": (),
    }  # fmt: skip
    assert header["ss_network_module"] == "lycoris.kohya"
    assert json.loads(header["ss_network_args"]) == {
        "algo": "lokr", "dora_wd": "True", "wd_on_output": "True", "factor": "-1", "decompose_both": "False",
        "conv_dim": "2", "conv_alpha": "3",
    }  # fmt: skip
    assert json.loads(header[BASE_SHAPES_KEY]) == {
        "lora_unet_conv1": [64, 64, 1, 1], "lora_unet_conv3": [64, 32, 3, 3], "lora_unet_linear": [96, 64]
    }
    assert (header["ss_network_dim"], header["ss_network_alpha"]) == ("2", "3")
    assert float(tensors["lora_unet_conv3.alpha"]) == 3.0


def test_plain_lora_files_keep_kohyas_header():
    from convlora.formats.kohya import to_kohya

    plain = Tiny()
    convlora.inject_lora(plain, convlora.LoRAConfig(r=4, target_modules=["linear"]))
    _, header = to_kohya(LoRAWeights(weights_from_model(plain, prefix="unet.")))
    assert header["ss_network_module"] == "networks.lora" and "ss_network_args" not in header and BASE_SHAPES_KEY not in header


def _lycoris_module(kind: str, layer: nn.Module, seed: int, **options):
    """One of LyCORIS's own modules on ``layer`` with random weights, as its training leaves them."""
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    cls = {"locon": LoConModule, "loha": LohaModule, "lokr": LokrModule}[kind]
    module = cls("lora_unet_x", layer, lora_dim=options.pop("r", 4), alpha=3.0, **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "dora_scale":
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


LYCORIS_TRAINED = {
    "loha": ("loha", {}),
    "lokr": ("lokr", {"r": 2}),
    "lokr-both": ("lokr", {"r": 2, "decompose_both": True}),
    "lokr-whole": ("lokr", {"r": 16}),
    "dora": ("locon", {"weight_decompose": True}),
    "loha-dora": ("loha", {"weight_decompose": True}),
    "lokr-dora": ("lokr", {"r": 2, "weight_decompose": True}),
}


@pytest.mark.parametrize("layer_name", ["conv3", "conv1", "linear"])
@pytest.mark.parametrize("trained", LYCORIS_TRAINED)
def test_files_of_lycoris_trained_modules_load_into_convlora_with_lycoris_outputs(trained, layer_name, tmp_path):
    torch.manual_seed(0)
    base = Tiny()
    kind, options = LYCORIS_TRAINED[trained]
    theirs = copy.deepcopy(base)
    module = _lycoris_module(kind, getattr(theirs, layer_name), seed=3, **options)
    tensors = {f"lora_unet_{layer_name}.{k}": v.detach().clone().contiguous() for k, v in module.custom_state_dict().items()}
    path = write_safetensors(tensors, tmp_path / "lycoris.safetensors", {"ss_network_module": "lycoris.kohya"})
    module.apply_to()
    x = torch.randn(2, 32, 7, 7)
    ours = _read_back(base, path)
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert relative_error(expected, base(x)) > 0.01
    assert relative_error(got, expected) < REL


def test_input_axis_dora_scale_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    module = _lycoris_module("loha", nn.Conv2d(32, 64, 3, padding=1), seed=0, weight_decompose=True, wd_on_out=False)
    tensors = {f"lora_unet_conv3.{k}": v.detach().clone() for k, v in module.custom_state_dict().items()}
    assert tuple(tensors["lora_unet_conv3.dora_scale"].shape) == (1, 32, 1, 1)
    path = write_safetensors(tensors, tmp_path / "in_axis.safetensors", {})
    with pytest.raises(LoRAFormatError) as err:
        read_lora_file(path)
    assert str(err.value) == (
        f"{path}: lora_unet_conv3.dora_scale has shape (1, 32, 1, 1): a per-input-channel DoRA magnitude (LyCORIS's "
        "wd_on_output=False); convlora computes DoRA over the output axis only, and the two are not convertible"
    )


def _file_of(model, tmp_path, edit) -> str:
    tensors, header = read_safetensors(_write(model, tmp_path / "a.safetensors"))
    edit(tensors)
    return str(write_safetensors(tensors, tmp_path / "edited.safetensors", header))


def test_unknown_keys_missing_factors_and_mixed_kinds_are_refused_by_name(tmp_path):
    _, model = _adapted("loha", targets=["linear"])
    path = _file_of(model, tmp_path, lambda t: t.update({"lora_unet_linear.hada_t1": torch.zeros(4, 4)}))
    with pytest.raises(LoRAFormatError, match=rf"^{path}: 1 key\(s\) are not LoRA weights convlora understands: "
                       r"lora_unet_linear.hada_t1 \(convlora imports LoRA / LoCon, LoHa, LoKr and DoRA; no Tucker-decomposed "
                       r"convs: lora_mid, hada_t1/t2, lokr_t2\)$"):
        read_lora_file(path)
    path = _file_of(model, tmp_path, lambda t: t.update({"lora_unet_linear.oft_blocks": torch.zeros(4, 4)}))
    with pytest.raises(LoRAFormatError, match=r"lora_unet_linear.oft_blocks \(convlora imports LoRA / LoCon, LoHa, LoKr and DoRA; no other LyCORIS algorithms\)$"):
        read_lora_file(path)
    path = _file_of(model, tmp_path, lambda t: t.pop("lora_unet_linear.hada_w2_b"))
    with pytest.raises(LoRAFormatError, match=rf"^{path}: lora_unet_linear is a LoHa module without lora_unet_linear.hada_w2_b$"):
        read_lora_file(path)
    path = _file_of(model, tmp_path, lambda t: t.update({"lora_unet_linear.lokr_w1": torch.zeros(8, 8)}))
    with pytest.raises(LoRAFormatError, match=rf"^{path}: lora_unet_linear mixes the tensors of several adapter kinds: "
                       r"lora_unet_linear.alpha, lora_unet_linear.hada_w1_a, .*lora_unet_linear.lokr_w1$"):
        read_lora_file(path)


def test_factor_shapes_that_do_not_fit_are_refused_by_name(tmp_path):
    _, model = _adapted("loha", targets=["linear"])
    path = _file_of(model, tmp_path, lambda t: t.update({"lora_unet_linear.hada_w2_a": torch.zeros(96, 3)}))
    with pytest.raises(LoRAFormatError, match=rf"^{path}: lora_unet_linear: LoHa factors of shapes \[\(96, 4\), \(4, 64\), "
                       r"\(96, 3\), \(4, 64\)\] are not hada_w1_a, hada_w2_a \(out, r\) and hada_w1_b, hada_w2_b \(r, in\)$"):
        read_lora_file(path)
    _, model = _adapted("lokr-both", targets=["linear"])
    path = _file_of(model, tmp_path, lambda t: t.update({"lora_unet_linear.lokr_w1_b": torch.zeros(3, 8)}))
    with pytest.raises(LoRAFormatError, match=rf"^{path}: lora_unet_linear: LoKr factors disagree on the rank: \[2, 3\]$"):
        read_lora_file(path)
    _, model = _adapted("dora", targets=["linear"])
    path = _file_of(model, tmp_path, lambda t: t.update({"lora_unet_linear.dora_scale": torch.ones(96)}))
    with pytest.raises(LoRAFormatError, match=rf"^{path}: lora_unet_linear.dora_scale has shape \(96,\); expected \(96, 1, ...\): "
                       "one magnitude per output channel$"):
        read_lora_file(path)


def test_a_file_for_another_base_is_refused_by_shape_and_the_model_is_unchanged(tmp_path):
    _, model = _adapted("loha", targets=["linear"])
    path = _write(model, tmp_path / "a.safetensors")
    other = Tiny()
    other.linear = nn.Linear(64, 48)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    _, weights = read_lora_file(path)
    with pytest.raises(convlora.StateDictMismatchError) as err:
        load_weights_into_model(other, weights.component("unet"))
    assert str(err.value) == (
        "file does not fit the model: shape mismatch for linear.hada_w1_a: file has (96, 4), model expects (48, 4); "
        "linear.hada_w2_a: file has (96, 4), model expects (48, 4)"
    )
    assert not convlora.lora_layers(other) and all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_a_kohya_loha_file_converts_to_native_and_back(tmp_path):
    from convlora.formats import convert_lora_file

    base, model = _adapted("loha-dora")
    path = _write(model, tmp_path / "a.safetensors")
    convert_lora_file(path, tmp_path / "n.safetensors", "native")
    convert_lora_file(tmp_path / "n.safetensors", tmp_path / "k.safetensors", "kohya")
    first, second = read_safetensors(path)[0], read_safetensors(tmp_path / "k.safetensors")[0]
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(_read_back(base, tmp_path / "k.safetensors")(torch.ones(1, 32, 5, 5)), model(torch.ones(1, 32, 5, 5)))


def _lycoris_modules_from_file(unet: nn.Module, path) -> list[nn.Module]:
    """LyCORIS's modules for each ``lora_unet_`` module of the file, applied to ``unet``: what
    ``lycoris.kohya.create_network_from_weights`` does per module (``lycoris.modules.get_module`` /
    ``make_module``), without the network whose default targets collide on a diffusers UNet."""
    from lycoris.modules import get_module, make_module

    tensors, _ = read_safetensors(path)
    stems = {k.split(".")[0] for k in tensors}
    applied = []
    for name, module in unet.named_modules():
        stem = f"lora_unet_{name}".replace(".", "_")
        if name and stem in stems:
            lycoris_module = make_module(*get_module(tensors, stem), stem, module)
            lycoris_module.apply_to()
            applied.append(lycoris_module.eval())
    return applied


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out"]  # 84 modules


@pytest.mark.parametrize("kind_name", ["loha", "lokr", "dora", "loha-dora", "lokr-dora"])
def test_a_tiny_unet_round_trips_through_kohya_files_and_lycoris_agrees(kind_name, tmp_path):
    from diffusers import UNet2DConditionModel

    from convlora.diffusion.pipeline import load_pipeline_lora, save_pipeline_lora

    torch.manual_seed(0)
    base = UNet2DConditionModel(**tiny_unet_config()).eval()
    unet = copy.deepcopy(base)
    options = {k: v for k, v in KINDS[kind_name].items() if k != "r"}
    convlora.inject_lora(unet, convlora.LoRAConfig(r=2, target_modules=UNET_TARGETS, **options))
    randomize_lora_(unet, seed=2, std=0.2)
    path = save_pipeline_lora(tmp_path / "k.safetensors", unet=unet, format="kohya")
    fresh = copy.deepcopy(base)
    load_pipeline_lora(path, unet=fresh)
    theirs = copy.deepcopy(base)
    applied = _lycoris_modules_from_file(theirs, path)
    assert len(applied) == len(convlora.lora_layers(unet)) == 84
    args = (torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 32))
    with torch.no_grad():
        ours, plain = unet(*args).sample, base(*args).sample
        assert relative_error(ours, plain) > 1e-3
        assert torch.equal(fresh(*args).sample, ours)
        assert relative_error(theirs.eval()(*args).sample, ours) < REL


# ---- convlora doctor on LyCORIS-kind files -----------------------------------------------------------
COMFYUI, A1111 = "ComfyUI (LoraLoader)", "AUTOMATIC1111 (extensions-builtin/Lora)"
DIFFUSERS, LYCORIS = "diffusers StableDiffusionPipeline.load_lora_weights", "LyCORIS (lycoris.kohya.create_network_from_weights)"
UNET_MODULES = (
    "lora_unet_conv_in, lora_unet_down_blocks_1_attentions_0_proj_in, lora_unet_down_blocks_1_attentions_1_proj_in, "
    "lora_unet_mid_block_attentions_0_proj_in, ... (3 more)"
)
SD1_NOTE = "UNet names are renumbered by SD-1.x's block layout, which A1111 assumes: `--base` checks the base has it"


def _unet_file(tmp_path, **options) -> str:
    """A kohya file of a tiny UNet adapter on conv_in (3x3) and the six proj_in (1x1 convs)."""
    from diffusers import UNet2DConditionModel

    from convlora.diffusion.pipeline import save_pipeline_lora

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config())
    convlora.inject_lora(unet, convlora.LoRAConfig(r=2, target_modules=["proj_in", "conv_in"], **options))
    randomize_lora_(unet, seed=2, std=0.2)
    return str(save_pipeline_lora(tmp_path / "k.safetensors", unet=unet, format="kohya"))


def _diagnosis(path):
    from convlora.formats.doctor import diagnose

    diagnosis = diagnose(path)
    return diagnosis, {v.loader: v for v in diagnosis.verdicts}


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_doctor_loha_and_lokr_files_load_fully_in_comfyui_a1111_and_lycoris_not_in_diffusers(kind, tmp_path):
    diagnosis, v = _diagnosis(_unet_file(tmp_path, kind=kind))
    assert diagnosis.summary[-1] == f"kinds: {kind} x7" and diagnosis.healthy
    assert {name: (x.status, x.primary) for name, x in v.items()} == {
        "convlora (load_pipeline_lora / convert)": ("ok", True), DIFFUSERS: ("no", False), COMFYUI: ("ok", True),
        A1111: ("ok", True), "PEFT PeftModel.from_pretrained": ("n/a", False), LYCORIS: ("ok", True),
    }  # fmt: skip
    assert v[DIFFUSERS].reasons == [
        ("its kohya import renames only lora_down / lora_up / alpha, so the LoHa / LoKr keys of 7 module(s) make it "
        f"raise 'The following keys have not been correctly renamed': {UNET_MODULES}")
    ]
    assert v[COMFYUI].reasons == [] and v[A1111].reasons == [SD1_NOTE] and v[LYCORIS].reasons == []
    from convlora.formats.weights import FORMAT_KINDS  # PEFT folders may carry more kinds than they do today

    assert v["PEFT PeftModel.from_pretrained"].reasons == (
        [f"cannot be converted for it: peft files do not carry {kind} adapters"] if kind not in FORMAT_KINDS["peft"]
        else ["needs an adapter folder: `convlora convert FILE DIR --to peft [--component unet]`"]
    )


def test_doctor_dora_file_explains_the_axis_per_loader(tmp_path):
    from convlora.formats.doctor import DORA_AXIS_NOTE

    diagnosis, v = _diagnosis(_unet_file(tmp_path, kind="lokr", weight_decompose=True))
    assert diagnosis.summary[-2:] == ["kinds: lokr+dora x7", DORA_AXIS_NOTE] and not diagnosis.healthy
    assert DORA_AXIS_NOTE == (
        "DoRA axis: convlora's magnitude is per output channel (as PEFT and diffusers compute it; in kohya files "
        "dora_scale (out, 1, ...), as LyCORIS writes and loads it with wd_on_out=True, its default; LyCORIS's "
        "wd_on_out=False is per input channel); ComfyUI takes the axis from dora_scale's shape but divides by the "
        "base weight's norms on the output axis; A1111 always normalises per input channel"
    )
    assert [(x.status) for x in v.values()] == ["ok", "no", "wrong", "wrong", "n/a", "ok"]
    assert v[DIFFUSERS].reasons[1] == (
        f"it drops every dora_scale key ('DoRA checkpoint that is not compatible'), so 7 DoRA module(s) load as plain LoRA: {UNET_MODULES}"
    )
    assert v[COMFYUI].reasons == [
        ("computes another weight for 7 DoRA module(s): their dora_scale is per output channel, and its weight_decompose "
        "(comfy/weight_adapter/base.py) then divides by the base weight's row norms ||W||, not by those of W + ΔW: "
        f"{UNET_MODULES}")
    ]
    assert v[A1111].reasons == [
        ("computes another weight for 7 DoRA module(s): its apply_weight_decompose (network.py) always normalises per "
        f"input channel, and their dora_scale is per output channel: {UNET_MODULES}"),
        SD1_NOTE,
    ]
    assert v[LYCORIS].reasons == ["7 DoRA module(s) per output channel, as it rebuilds them (wd_on_out=True)"]


def test_doctor_input_axis_dora_file_loads_in_the_uis_not_in_convlora_or_lycoris(tmp_path):
    name = "lora_unet_conv_in"
    module = _lycoris_module("locon", nn.Conv2d(4, 32, 3, padding=1), seed=0, weight_decompose=True, wd_on_out=False)
    path = write_safetensors({f"{name}.{k}": v.detach().clone() for k, v in module.custom_state_dict().items()}, tmp_path / "i.safetensors", {})
    _, v = _diagnosis(path)
    assert {name: x.status for name, x in v.items() if name in (COMFYUI, A1111, LYCORIS)} == {COMFYUI: "ok", A1111: "ok", LYCORIS: "no"}
    assert v["convlora (load_pipeline_lora / convert)"].reasons == [
        (f"{path}: {name}.dora_scale has shape (1, 4, 1, 1): a per-input-channel DoRA magnitude (LyCORIS's "
        "wd_on_output=False); convlora computes DoRA over the output axis only, and the two are not convertible")
    ]
    assert v[LYCORIS].reasons == [
        f"its DoRA modules are per output channel (wd_on_out=True), and the dora_scale of 1 module(s) is per input channel: {name}"
    ]
    from lycoris.modules import get_module, make_module

    tensors, _ = read_safetensors(path)
    with pytest.raises(RuntimeError, match=r"output with shape \[32, 1, 1, 1\] doesn't match the broadcast shape \[32, 4, 1, 1\]"):
        make_module(*get_module(tensors, name), name, nn.Conv2d(4, 32, 3, padding=1))  # what LyCORIS's loader does per module


def test_doctor_a1111_fails_a_whole_file_with_a_module_no_type_accepts(tmp_path):
    name = "lora_unet_conv_in"
    path = write_safetensors({f"{name}.lokr_w1": torch.ones(4, 2), f"{name}.alpha": torch.tensor(1.0)}, tmp_path / "w1.safetensors", {})
    _, v = _diagnosis(path)
    assert v[A1111].status == "no" and v[A1111].reasons[0] == (
        "fails to load the whole file ('Could not find a module type' in networks.py load_network): no module type "
        f"accepts the keys of 1 module(s): {name}"
    )
    assert v[COMFYUI].status == "no" and v[COMFYUI].reasons[0].startswith(f"skips 1 module(s) it has no key for ('lora key not loaded'): {name}")


def test_the_dora_rules_of_comfyui_and_a1111_compute_other_weights_than_output_axis_dora():
    """Their formulas (comfy/weight_adapter/base.py weight_decompose, A1111 network.py apply_weight_decompose),
    restated, on a convlora DoRA module's file tensors: neither is convlora's (or LyCORIS's wd_on_out=True) weight,
    while ComfyUI's input-axis branch is LyCORIS's wd_on_out=False DoRA."""
    _, model = _adapted("dora", targets=["linear"])
    layer = model.linear
    adapter = layer.adapter()
    w = layer.weight.detach()
    merged = w + adapter.delta().detach()
    dora_scale = adapter.magnitude.detach().reshape(-1, 1)  # what the file holds
    eps = torch.finfo(w.dtype).eps
    ours = merged * dora_scale / merged.norm(dim=1, keepdim=True)
    comfyui = merged * dora_scale / (w.norm(dim=1, keepdim=True) + eps)  # shape[0] == out: the base weight's rows
    a1111 = merged * dora_scale / merged.norm(dim=0, keepdim=True)  # per input column, broadcast
    assert relative_error(w + adapter.merged_update(w), ours) < 1e-6
    assert relative_error(comfyui, ours) > 1e-3 and relative_error(a1111, ours) > 1e-3

    torch.manual_seed(0)
    base = nn.Linear(64, 96)
    theirs = _lycoris_module("locon", base, seed=1, weight_decompose=True, wd_on_out=False)
    up, down = theirs.lora_up.weight.detach(), theirs.lora_down.weight.detach()
    merged = base.weight.detach() + up @ down * theirs.scale
    scale = theirs.dora_scale.detach()  # (1, 64)
    comfyui_input_axis = merged * scale / (merged.norm(dim=0, keepdim=True) + eps)
    theirs.apply_to()
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert relative_error(torch.nn.functional.linear(x, comfyui_input_axis, base.bias), base(x)) < REL


@pytest.mark.parametrize("kind_name", ["loha", "lokr", "lokr-dora"])
def test_rslora_adapters_of_other_kinds_are_written_with_the_equivalent_alpha(kind_name, tmp_path):
    torch.manual_seed(0)
    base = Tiny()
    model = copy.deepcopy(base)
    convlora.inject_lora(model, convlora.LoRAConfig(alpha=3.0, use_rslora=True, target_modules=list(LAYERS), **KINDS[kind_name]))
    randomize_lora_(model, seed=1, std=0.3)
    path = str(write_lora_file(LoRAWeights(weights_from_model(model, prefix="unet."), use_rslora=True), tmp_path / "a.safetensors", "kohya"))
    r = KINDS[kind_name]["r"]
    assert float(read_safetensors(path)[0]["lora_unet_linear.alpha"]) == pytest.approx(3.0 * r**0.5)
    x = torch.randn(2, 32, 7, 7)
    with torch.no_grad():
        ours = model(x)
        assert relative_error(_lycoris_applied(base, path)(x), ours) < REL
        assert relative_error(_read_back(base, path)(x), ours) < 1e-6


def test_the_command_line_doctor_passes_a_loha_file_and_fails_a_dora_file(tmp_path, capsys):
    from convlora.cli import main

    loha = _unet_file(tmp_path, kind="loha")
    assert main(["doctor", loha]) == 0
    out = capsys.readouterr().out
    assert "[   ok] LyCORIS (lycoris.kohya.create_network_from_weights)\n" in out and "  kinds: loha x7" not in out
    assert "kinds: loha x7\n" in out and "[   no] diffusers StableDiffusionPipeline.load_lora_weights  (other format)" in out
    (tmp_path / "dora").mkdir()
    assert main(["doctor", _unet_file(tmp_path / "dora", kind="dora")]) == 1
    assert "[wrong] ComfyUI (LoraLoader)\n" in capsys.readouterr().out
