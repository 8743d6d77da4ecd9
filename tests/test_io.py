"""Native adapter files: round trip, header, strict loading, wrong bases, bad files, nothing unpickled."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors import safe_open
from torch import nn

import convlora
from convlora.io import write_safetensors
from convlora.testing import randomize_lora_


def make_model(seed: int = 0, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, groups=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 4),
    )


CFG = convlora.LoRAConfig(r=4, alpha=6, target_modules=["0", "2", "5"], rank_pattern={"5": 2})


def adapted(seed: int = 0) -> nn.Module:
    model = make_model()
    convlora.inject_lora(model, CFG)
    return randomize_lora_(model, seed=seed)


def test_round_trip_reproduces_outputs_exactly(tmp_path):
    model = adapted()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    path = convlora.save_lora(model, tmp_path / "adapter.safetensors", metadata={"base_model": "tiny"})

    fresh = make_model()  # no LoRA yet: load_lora injects exactly what the file describes
    assert convlora.load_lora(fresh, path) == ["0", "2", "5"]
    assert torch.equal(fresh(x), expected)
    assert {p: m.r for p, m in convlora.lora_layers(fresh).items()} == {"0": 4, "2": 4, "5": 2}

    injected = make_model()
    convlora.inject_lora(injected, CFG)
    injected.eval()  # loading into a merged model re-merges consistently
    convlora.load_lora(injected, path)
    assert torch.allclose(injected(x), expected, rtol=1e-5, atol=1e-6)


def test_header_carries_config_ranks_alphas_and_fingerprint(tmp_path):
    path = convlora.save_lora(adapted(), tmp_path / "a.safetensors", metadata={"steps": "10"})
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        keys = set(f.keys())
    assert keys == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B", "5.lora_A", "5.lora_B"}
    assert convlora.LoRAConfig.from_json(header["convlora_config"]) == CFG
    modules = json.loads(header["convlora_modules"])
    assert modules["2"] == {"type": "Conv2d", "r": 4, "alpha": 6.0, "base_shape": [8, 4, 3, 3],
                            "groups": 2, "dilation": [1, 1], "padding_mode": "zeros"}  # fmt: skip
    assert set(modules["5"]) == {"type", "r", "alpha", "base_shape"} and modules["5"]["r"] == 2  # Linear: no geometry
    assert len(header["convlora_fingerprint"]) == 16 and header["steps"] == "10"


def test_strict_load_names_missing_unexpected_and_misshaped_keys(tmp_path):
    model = adapted()
    tensors = convlora.lora_state_dict(model)
    path = convlora.save_lora(model, tmp_path / "a.safetensors")
    _, header = convlora.read_safetensors(path)

    target = make_model()
    convlora.inject_lora(target, CFG)
    before = {k: v.clone() for k, v in target.state_dict().items()}

    def rewrite(name, new_tensors):
        return convlora.write_safetensors(new_tensors, tmp_path / name, header)

    missing = rewrite("missing.safetensors", {k: v for k, v in tensors.items() if k != "2.lora_B"})
    with pytest.raises(convlora.StateDictMismatchError, match="missing key\\(s\\) 2.lora_B"):
        convlora.load_lora(target, missing)
    unexpected = rewrite("unexpected.safetensors", {**tensors, "9.lora_A": torch.zeros(2, 2)})
    with pytest.raises(convlora.StateDictMismatchError, match="unexpected key\\(s\\) 9.lora_A"):
        convlora.load_lora(target, unexpected)
    misshaped = rewrite("misshaped.safetensors", {**tensors, "5.lora_A": torch.zeros(3, 8)})
    with pytest.raises(convlora.StateDictMismatchError, match=r"5.lora_A: .*misshaped.safetensors has \(3, 8\), model expects \(2, 8\)"):
        convlora.load_lora(target, misshaped)
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a failed load"
    # The same files into a model without LoRA: refused, and no LoRA layer is left behind.
    fresh = make_model()
    with pytest.raises(convlora.StateDictMismatchError):
        convlora.load_lora(fresh, misshaped)
    assert not convlora.lora_layers(fresh)


def test_different_base_is_refused(tmp_path):
    path = convlora.save_lora(adapted(), tmp_path / "a.safetensors")
    wider = make_model(width=16)
    with pytest.raises(ValueError, match=r"different base model: 0: base weight is \(16, 3, 3, 3\), file was made for \(8, 3, 3, 3\)"):
        convlora.load_lora(wider, path)
    assert not convlora.lora_layers(wider)
    other_targets = make_model()
    convlora.inject_lora(other_targets, convlora.LoRAConfig(r=4, alpha=6, target_modules=["0", "5"], rank_pattern={"5": 2}))
    with pytest.raises(ValueError, match="fingerprint mismatch.*2: in the file, not adapted in the model"):
        convlora.load_lora(other_targets, path)


def test_missing_truncated_and_foreign_files(tmp_path):
    model = make_model()
    with pytest.raises(FileNotFoundError, match="LoRA file not found: .*nope.safetensors"):
        convlora.load_lora(model, tmp_path / "nope.safetensors")
    path = convlora.save_lora(adapted(), tmp_path / "a.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(convlora.LoRAFileError, match="truncated.safetensors is not a readable safetensors file"):
        convlora.load_lora(model, truncated)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not a tensor file")
    with pytest.raises(convlora.LoRAFileError, match="notes.safetensors is not a readable safetensors file"):
        convlora.load_lora(model, text)
    foreign = convlora.write_safetensors({"unet.x.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(convlora.LoRAFileError, match="has no convlora header"):
        convlora.load_lora(model, foreign)
    assert not convlora.lora_layers(model)


class _Payload:
    """Unpickling this object would create a marker file: the test proves nothing is unpickled."""

    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_checkpoints_are_never_unpickled(tmp_path):
    marker = tmp_path / "UNPICKLED"
    _Payload.marker = marker
    for name, dump in {
        "legacy.safetensors": lambda p: p.write_bytes(pickle.dumps(_Payload(), protocol=2)),
        "zipfile.pt": lambda p: torch.save({"x": _Payload()}, p),
    }.items():
        path = tmp_path / name
        dump(path)
        with pytest.raises(convlora.LoRAFileError, match="pickled PyTorch checkpoint.*never unpickles"):
            convlora.load_lora(make_model(), path)
    assert not marker.exists()


def test_non_finite_adapter_is_never_written(tmp_path):
    model = adapted()
    good = convlora.save_lora(model, tmp_path / "a.safetensors")
    good_bytes = good.read_bytes()
    with torch.no_grad():
        model[2].lora_A[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite values \\(NaN/inf\\) in 2.lora_A"):
        convlora.save_lora(model, good)
    assert good.read_bytes() == good_bytes, "a refused save must leave the previous file intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"], "no temporary file left behind"


def test_reserved_metadata_keys_refused(tmp_path):
    with pytest.raises(ValueError, match="convlora_config"):
        convlora.save_lora(adapted(), tmp_path / "a.safetensors", metadata={"convlora_config": "{}"})
    with pytest.raises(ValueError, match="has no LoRA layers"):
        convlora.save_lora(make_model(), tmp_path / "b.safetensors")


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        path = convlora.save_lora(adapted(), tmp_path / "a.safetensors")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_write_safetensors_on_a_full_disk_is_an_oserror_naming_the_file_and_leaves_nothing(full_filesystem):
    target = full_filesystem / "adapter.safetensors"
    with pytest.raises(OSError, match=r"could not write .*adapter\.safetensors"):
        write_safetensors({"a": torch.ones(4096)}, target)
    assert sorted(p.name for p in full_filesystem.iterdir()) == ["filler"]
