"""PEFT adapter folders for DoRA, LoHa and LoKr, both ways, against the real PEFT.

convlora -> PEFT: ``save_peft_adapter``, then ``PeftModel.from_pretrained`` must give convlora's outputs;
PEFT -> convlora: ``save_pretrained`` of a PEFT model with random adapter tensors, then
``load_peft_adapter``. Outputs agree within 1e-5 relative (fp32) on Linear, Conv2d 3x3 and Conv2d 1x1
layers. What PEFT would compute differently is refused with a named error and nothing written.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import convlora
from convlora.formats import LoRAFormatError, load_peft_adapter, read_lora_file, save_peft_adapter
from convlora.formats.peft import write_peft_folder
from convlora.formats.weights import LoRAWeights, model_adapter, weights_from_model
from convlora.io import read_safetensors
from convlora.testing import randomize_lora_, relative_error

peft = pytest.importorskip("peft")
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402

TOL = 1e-5
TARGETS = ["c3", "c1", "lin"]


class Net(nn.Module):
    """(N, 8, 6, 6) -> (N, 20): a 3x3 conv, a 1x1 conv and a Linear."""

    def __init__(self, c_in: int = 8, c_mid: int = 16, c_out: int = 12, features: int = 20) -> None:
        super().__init__()
        self.c3 = nn.Conv2d(c_in, c_mid, 3, padding=1)
        self.c1 = nn.Conv2d(c_mid, c_out, 1)
        self.lin = nn.Linear(c_out, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.c1(torch.relu(self.c3(x))).mean(dim=(2, 3)))


def _net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def _wide() -> Net:
    """(N, 16, 6, 6) in; channel counts whose LoKr factors with factor 4 are PEFT's too: 16 -> (4, 4),
    32 -> (4, 8), 48 -> (4, 12)."""
    torch.manual_seed(0)
    return Net(16, 16, 32, 48).eval()


def _x(model: nn.Module) -> torch.Tensor:
    return torch.randn(2, model.c3.in_channels, 6, 6, generator=torch.Generator().manual_seed(5))


def _ours(base: nn.Module, **config) -> nn.Module:
    model = copy.deepcopy(base)
    convlora.inject_lora(model, convlora.LoRAConfig(target_modules=TARGETS, **config))
    randomize_lora_(model, seed=1, std=0.3)
    return model.eval()


def _randomize_peft(model: nn.Module, seed: int = 0) -> None:
    """Random values for every adapter tensor of a PEFT model; DoRA magnitudes scaled by ``1 + 0.1 N(0, 1)``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=g)
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * noise)
            elif any(k in name for k in ("lora_A", "lora_B", "hada_", "lokr_")):
                param.copy_(noise * 0.3)


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# ---- convlora -> PEFT ----------------------------------------------------------------------------
_P = "base_model.model."
WRITE_CASES = {
    "dora": (_net, {"r": 2, "alpha": 3, "kind": "dora"},
             {f"{_P}{p}.{n}": s for p, a, b, m in (("c3", (2, 8, 3, 3), (16, 2, 1, 1), (1, 16, 1, 1)),
                                                   ("c1", (2, 16, 1, 1), (12, 2, 1, 1), (1, 12, 1, 1)),
                                                   ("lin", (2, 12), (20, 2), (20,)))
              for n, s in (("lora_A.weight", a), ("lora_B.weight", b), ("lora_magnitude_vector", m))},
             {"peft_type": "LORA", "r": 2, "lora_alpha": 3, "use_dora": True, "rank_pattern": {}, "alpha_pattern": {}}),
    "loha": (_net, {"r": 2, "alpha": 3, "kind": "loha"},
             {f"{_P}{p}.hada_w{i}_{ab}": (o, 2) if ab == "a" else (2, n)
              for p, o, n in (("c3", 16, 72), ("c1", 12, 16), ("lin", 20, 12)) for i in (1, 2) for ab in "ab"},
             {"peft_type": "LOHA", "r": 2, "alpha": 3, "use_effective_conv2d": False, "rank_dropout": 0.0,
              "module_dropout": 0.0, "rank_pattern": {}, "alpha_pattern": {}}),
    "lokr-w2-factorised": (_net, {"r": 1, "alpha": 3, "kind": "lokr"},
                           {f"{_P}c3.lokr_w1": (4, 2), f"{_P}c3.lokr_w2_a": (4, 1), f"{_P}c3.lokr_w2_b": (1, 36),
                            f"{_P}c1.lokr_w1": (3, 4), f"{_P}c1.lokr_w2_a": (4, 1), f"{_P}c1.lokr_w2_b": (1, 4),
                            f"{_P}lin.lokr_w1": (4, 3), f"{_P}lin.lokr_w2_a": (5, 1), f"{_P}lin.lokr_w2_b": (1, 4)},
                           {"peft_type": "LOKR", "r": 1, "alpha": 3, "decompose_both": False, "decompose_factor": -1,
                            "use_effective_conv2d": False, "rank_pattern": {}, "alpha_pattern": {}}),
    "lokr-full": (_net, {"r": 8, "alpha": 5, "kind": "lokr"},  # neither side factorised: PEFT's alpha = r, scaling 1
                  {f"{_P}c3.lokr_w1": (4, 2), f"{_P}c3.lokr_w2": (4, 4, 3, 3), f"{_P}c1.lokr_w1": (3, 4),
                   f"{_P}c1.lokr_w2": (4, 4, 1, 1), f"{_P}lin.lokr_w1": (4, 3), f"{_P}lin.lokr_w2": (5, 4)},
                  {"peft_type": "LOKR", "r": 3, "alpha": 3, "decompose_both": False, "decompose_factor": -1,
                   "rank_pattern": {}, "alpha_pattern": {}}),
    "lokr-factor4-both": (_wide, {"r": 1, "alpha": 2, "kind": "lokr", "factor": 4, "decompose_both": True},
                          {f"{_P}{p}.{n}": s for p, a, c, b, dk in (("c3", 4, 4, 4, 36), ("c1", 4, 4, 8, 4),
                                                                    ("lin", 4, 4, 12, 8))
                           for n, s in (("lokr_w1_a", (a, 1)), ("lokr_w1_b", (1, c)), ("lokr_w2_a", (b, 1)),
                                        ("lokr_w2_b", (1, dk)))},
                          {"peft_type": "LOKR", "r": 1, "alpha": 2, "decompose_both": True, "decompose_factor": 4}),
}


@pytest.mark.parametrize("case", sorted(WRITE_CASES))
def test_convlora_kinds_saved_for_peft_run_the_same_in_peft(case, tmp_path):
    make_base, config, keys, fields = WRITE_CASES[case]
    base = make_base()
    ours = _ours(base, **config)
    x = _x(base)
    expected = _out(ours, x)
    assert relative_error(expected, _out(base, x)) > 1e-2  # the adapter matters
    folder = save_peft_adapter(ours, tmp_path / "peft")
    tensors, header = read_safetensors(folder / "adapter_model.safetensors")
    assert {k: tuple(t.shape) for k, t in tensors.items()} == keys
    shapes = {p: list(layer.delta_shape_for(layer)) for p, layer in convlora.lora_layers(ours).items()}
    lycoris = config["kind"] in ("loha", "lokr")  # their flattened factors do not tell a kernel from channels
    assert set(header) == ({"format", "convlora_base_shapes"} if lycoris else {"format"})
    assert not lycoris or json.loads(header["convlora_base_shapes"]) == shapes
    written = json.loads((folder / "adapter_config.json").read_text())
    assert {k: written[k] for k in fields} == fields and sorted(written["target_modules"]) == sorted(TARGETS)

    theirs = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    assert relative_error(_out(theirs, x), expected) < TOL
    back = copy.deepcopy(base)
    assert sorted(load_peft_adapter(back, folder)) == sorted(TARGETS)
    assert torch.equal(_out(back.eval(), x), expected)


# ---- PEFT -> convlora ----------------------------------------------------------------------------
READ_CASES = {
    "dora": (_net, LoraConfig(r=2, lora_alpha=5, use_dora=True, target_modules=TARGETS), "dora"),
    "loha": (_net, LoHaConfig(r=3, alpha=5, target_modules=TARGETS), "loha"),
    "lokr-w2-factorised": (_net, LoKrConfig(r=1, alpha=3, target_modules=TARGETS), "lokr"),
    "lokr-full-alpha-not-r": (_net, LoKrConfig(r=8, alpha=3, target_modules=TARGETS), "lokr"),  # PEFT: 3/8 applies
    "lokr-factor4-both": (_wide, LoKrConfig(r=1, alpha=2, decompose_both=True, decompose_factor=4,
                                            target_modules=TARGETS), "lokr"),
}


@pytest.mark.parametrize("case", sorted(READ_CASES))
def test_peft_written_kinds_load_into_convlora_with_peft_outputs(case, tmp_path):
    make_base, config, label = READ_CASES[case]
    base = make_base()
    theirs = get_peft_model(copy.deepcopy(base), config)
    _randomize_peft(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    x = _x(base)
    expected = _out(theirs.eval(), x)
    assert relative_error(expected, _out(base, x)) > 1e-2

    ours = copy.deepcopy(base)
    assert sorted(load_peft_adapter(ours, tmp_path / "peft")) == sorted(TARGETS)
    assert {a.kind.label for a in model_adapter(ours).values()} == {label}
    assert relative_error(_out(ours.eval(), x), expected) < TOL
    fmt, weights = read_lora_file(tmp_path / "peft")
    assert fmt == "peft" and {m.kind.label for m in weights.modules.values()} == {label}


def test_peft_dora_magnitude_is_read_per_output_channel(tmp_path):
    """PEFT's conv magnitude (1, out, 1, 1) and Linear magnitude (out,) become convlora's (out,), unchanged."""
    base = _net()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, use_dora=True, target_modules=TARGETS))
    _randomize_peft(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    tensors, _ = read_safetensors(tmp_path / "peft" / "adapter_model.safetensors")
    _, weights = read_lora_file(tmp_path / "peft")
    for path in TARGETS:
        magnitude = weights.modules[path].factors["magnitude"]
        assert magnitude.shape == (weights.modules[path].lora_B.shape[0],)
        assert torch.equal(magnitude, tensors[f"{_P}{path}.lora_magnitude_vector"].flatten())


# ---- native -> peft -> native, by the command line -----------------------------------------------
@pytest.mark.parametrize("case", sorted(WRITE_CASES))
def test_convert_native_to_peft_and_back_is_bit_exact(case, tmp_path):
    from convlora.cli import main

    make_base, config, _, _ = WRITE_CASES[case]
    ours = _ours(make_base(), **config)
    src = convlora.save_lora(ours, tmp_path / "native.safetensors")
    assert main(["convert", str(src), str(tmp_path / "peft"), "--to", "peft"]) == 0
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "back.safetensors"), "--to", "native"]) == 0
    before, before_header = read_safetensors(src)
    after, after_header = read_safetensors(tmp_path / "back.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # r and alpha of a LoKr with neither side factorised scale nothing (its scaling is 1): PEFT's folder gives r = 1
    unscaled = {p for p, a in model_adapter(ours).items() if a.kind.name == "lokr" and not a.is_factorised}
    before_table, after_table = (json.loads(h["convlora_modules"]) for h in (before_header, after_header))
    assert before_table.keys() == after_table.keys()
    for path, entry in before_table.items():
        fields = ("type", "base_shape", "kind") + (() if path in unscaled else ("r", "alpha"))
        assert {k: after_table[path].get(k) for k in fields} == {k: entry.get(k) for k in fields}
    fresh = make_base()
    convlora.load_lora(fresh, tmp_path / "back.safetensors")
    x = _x(fresh)
    assert torch.equal(_out(fresh.eval(), x), _out(ours, x))


# ---- refusals ------------------------------------------------------------------------------------
def test_loha_with_dora_is_refused_by_kind(tmp_path):
    ours = _ours(_net(), r=2, kind="loha", weight_decompose=True)
    with pytest.raises(LoRAFormatError, match=r"^peft files do not carry these adapter kinds: loha\+dora "
                                              r"\(c3, c1, lin; carried by native, kohya\)\. PEFT's LoHaConfig / "
                                              r"LoKrConfig have no weight decomposition \(DoRA\)$"):
        save_peft_adapter(ours, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_one_folder_holds_one_kind(tmp_path):
    lora, loha = _ours(_net(), r=2), _ours(_net(), r=2, kind="loha")
    modules = {**weights_from_model(lora), "lin": weights_from_model(loha)["lin"]}
    with pytest.raises(LoRAFormatError, match=r"^a PEFT adapter folder holds one adapter type \(LoraConfig with use_dora "
                                              r"for all modules or none, LoHaConfig or LoKrConfig\); this adapter has "
                                              r"loha, lora \(loha: lin; lora: c1, c3\)$"):
        write_peft_folder(LoRAWeights(modules), tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_dora_on_a_grouped_conv_is_refused(tmp_path):
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 4, 1))
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, kind="dora", target_modules=["0", "1"]))
    with pytest.raises(LoRAFormatError, match=r"^cannot export to PEFT: its DoRA computes B\.view\(-1, R\) @ A\.view\(R, -1\) "
                                              r"of the grouped lora_B it uses on grouped convs, which is not the LoRA "
                                              r"update: 0: groups=2\. Save them with format='native'"):
        save_peft_adapter(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize(("kind", "model", "config", "problem"), [
    ("loha", lambda: nn.Sequential(nn.Linear(8, 8)), {"use_rslora": True},
     r"rsLoRA scaling \(PEFT's LohaConfig has no use_rslora\)"),
    ("loha", lambda: nn.Sequential(nn.Conv3d(4, 8, 3)), {},
     r"Conv3d layers 0 \(PEFT's loha adapts Linear, Conv1d and Conv2d\)"),
    ("lokr", lambda: nn.Sequential(nn.Conv1d(8, 16, 3)), {"r": 8},
     r"Conv1d layers 0 with a full lokr_w2 \(PEFT's make_kron computes kron\(lokr_w1, lokr_w2\) for a 3-D lokr_w2 differently\)"),
])  # fmt: skip
def test_what_peft_lycoris_layers_compute_differently_is_refused(kind, model, config, problem, tmp_path):
    model = model()
    convlora.inject_lora(model, convlora.LoRAConfig(**{"r": 2, **config}, kind=kind, target_modules=["0"]))
    with pytest.raises(LoRAFormatError, match=rf"^cannot export to PEFT: its {kind} would compute this adapter "
                                              rf"differently: {problem}\. Save it with format='native'"):
        save_peft_adapter(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_lokr_shapes_no_peft_config_builds_are_refused(tmp_path):
    """factor 8: 64 -> (8, 8) but 24 -> (3, 8), which PEFT's factorization(24, 8) gives as (8, 3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Conv2d(24, 24, 3))
    convlora.inject_lora(model, convlora.LoRAConfig(r=1, kind="lokr", factor=8, target_modules=["0", "1"]))
    with pytest.raises(LoRAFormatError, match=r"^cannot export to PEFT: it builds every LoKr module's shapes from one "
                                              r"decompose_factor and decompose_both, and no choice gives these modules' "
                                              r"shapes: 1\. Save them with format='native'"):
        save_peft_adapter(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_peft_tucker_convs_are_refused_on_read(tmp_path):
    theirs = get_peft_model(_net(), LoHaConfig(r=2, use_effective_conv2d=True, target_modules=TARGETS))
    theirs.save_pretrained(tmp_path / "peft")
    ours = _net()
    with pytest.raises(LoRAFormatError, match=r"adapter_config\.json: use_effective_conv2d is set: PEFT's Tucker form of "
                                              r"LoHa / LoKr convs, which convlora does not have$"):
        load_peft_adapter(ours, tmp_path / "peft")
    assert not convlora.lora_layers(ours)


def test_peft_lokr_conv1d_with_a_full_w2_is_refused_on_read(tmp_path):
    base = nn.Sequential(nn.Conv1d(8, 16, 3))
    theirs = get_peft_model(copy.deepcopy(base), LoKrConfig(r=8, target_modules=["0"]))
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.raises(LoRAFormatError, match=r": 0 is a Conv1d LoKr with a full lokr_w2 \(4, 4, 3\): PEFT's make_kron "
                                              r"computes kron\(lokr_w1, lokr_w2\) for it differently from LyCORIS"):
        load_peft_adapter(base, tmp_path / "peft")
    assert not convlora.lora_layers(base)


@pytest.mark.parametrize("config", [{"kind": "dora"}, {"kind": "loha"}, {"kind": "lokr", "r": 1}], ids=lambda c: c["kind"])
def test_conv1d_kinds_run_the_same_in_peft(config, tmp_path):
    """Conv1d (k = 3): DoRA, LoHa and a LoKr whose lokr_w2 is factorised (PEFT reshapes that product exactly)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv1d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv1d(16, 12, 1)).eval()
    ours = copy.deepcopy(base)
    convlora.inject_lora(ours, convlora.LoRAConfig(**{"r": 2, "alpha": 3, **config}, target_modules=["0", "2"]))
    randomize_lora_(ours, seed=1, std=0.3)
    x = torch.randn(2, 8, 10, generator=torch.Generator().manual_seed(5))
    expected = _out(ours.eval(), x)
    assert relative_error(expected, _out(base, x)) > 1e-2
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), save_peft_adapter(ours, tmp_path / "peft")).eval()
    assert relative_error(_out(theirs, x), expected) < TOL


def test_gpt2_conv1d_dora_runs_the_same_in_peft(tmp_path):
    """GPT-2's Conv1D keeps its weight (in, out); PEFT's DoRA transposes it (fan_in_fan_out) before the row norms."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    base = transformers.GPT2Model(transformers.GPT2Config(vocab_size=100, n_embd=32, n_head=4, n_layer=2, n_positions=64)).eval()
    ours = copy.deepcopy(base)
    convlora.inject_lora(ours, convlora.LoRAConfig(r=2, alpha=3, kind="dora", target_modules=["c_attn"]))
    randomize_lora_(ours, seed=1, std=0.3)
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ours.eval()(ids).last_hidden_state
        assert relative_error(expected, base(ids).last_hidden_state) > 1e-2
        folder = save_peft_adapter(ours, tmp_path / "peft")
        assert json.loads((folder / "adapter_config.json").read_text())["fan_in_fan_out"] is True
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
        assert relative_error(theirs(ids).last_hidden_state, expected) < TOL


@pytest.mark.parametrize("config", [{"kind": "loha"}, {"kind": "lokr", "r": 1}, {"kind": "lokr", "r": 8}],
                         ids=["loha", "lokr-w2-factorised", "lokr-full"])
def test_grouped_conv_loha_and_lokr_run_the_same_in_peft_and_back(config, tmp_path):
    """PEFT's LoHa / LoKr build the update in the grouped weight's own (out, in/g, *k) shape, as convlora does."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(8, 16, 3, groups=2, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1, groups=4)).eval()
    ours = copy.deepcopy(base)
    convlora.inject_lora(ours, convlora.LoRAConfig(**{"r": 2, **config}, target_modules=["0", "2"]))
    randomize_lora_(ours, seed=1, std=0.3)
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(5))
    expected = _out(ours.eval(), x)
    assert relative_error(expected, _out(base, x)) > 1e-2
    folder = save_peft_adapter(ours, tmp_path / "peft")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    assert relative_error(_out(theirs, x), expected) < TOL
    back = copy.deepcopy(base)
    load_peft_adapter(back, folder)
    assert torch.equal(_out(back.eval(), x), expected)


def test_peft_dora_folder_missing_a_magnitude_is_named(tmp_path):
    from convlora.io import write_safetensors

    theirs = get_peft_model(_net(), LoraConfig(r=2, use_dora=True, target_modules=TARGETS))
    theirs.save_pretrained(tmp_path / "peft")
    weights_file = tmp_path / "peft" / "adapter_model.safetensors"
    tensors, header = read_safetensors(weights_file)
    del tensors[f"{_P}c1.lora_magnitude_vector"]
    write_safetensors(tensors, weights_file, header)
    ours = _net()
    with pytest.raises(LoRAFormatError, match=r"adapter_model\.safetensors: PEFT's use_dora is True for the whole adapter but "
                                              r"2 of 3 modules have a lora_magnitude_vector \(not: c1\)$"):
        load_peft_adapter(ours, tmp_path / "peft")
    assert not convlora.lora_layers(ours)


def test_peft_factorization_equals_peft_own_for_every_size_and_factor():
    """The split PEFT's LoKrConfig builds with (its ``tuners/lokr/layer.py`` ``factorization``), including
    the unordered dividing factor and negative factors other than -1."""
    from peft.tuners.lokr.layer import factorization as peft_own

    from convlora.formats.peft_kinds import peft_factorization

    cases = [(d, f) for d in range(1, 1300) for f in (*range(-3, 40), 64, 128, 256)]
    assert [peft_factorization(d, f) for d, f in cases] == [tuple(peft_own(d, f)) for d, f in cases]
