"""Property-based tests: generated file headers, tensors, configs and layer geometries.

Every property is one of: the exact result, or an error of convlora's own kinds (all ``ValueError``
subclasses: ``LoRAFileError``, ``LoRAFormatError``, ``StateDictMismatchError``) with the model left
exactly as it was. Each runs on a few dozen examples in ``make test`` and on many more under the
``fuzz`` marker (``make test-fuzz``).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import convlora
from convlora.formats import read_lora_file
from convlora.io import read_safetensors
from convlora.testing import randomize_lora_, relative_error

#: (examples in `make test`, examples under `make test-fuzz`)
BUDGETS = [pytest.param(25, id="quick"), pytest.param(600, id="long", marks=pytest.mark.fuzz)]

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _settings(budget: int):
    return settings(
        max_examples=budget, deadline=None, database=None, derandomize=budget < 100,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )  # fmt: skip


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.Tanh(), nn.Linear(6, 6), nn.Flatten(), nn.Linear(48, 3))


def adapted(seed: int = 0) -> nn.Module:
    model = small_model(seed)
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, alpha=3, target_modules=["0", "2", "4"]))
    return randomize_lora_(model, seed=seed + 1)


X = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(0))


def _snapshot(model: nn.Module) -> tuple:
    layers = convlora.lora_layers(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, {p: (l.lora_alpha, l.use_rslora, l.merged) for p, l in layers.items()}


def _assert_same(model: nn.Module, snapshot: tuple) -> None:
    state, layers = snapshot
    assert {p: (l.lora_alpha, l.use_rslora, l.merged) for p, l in convlora.lora_layers(model).items()} == layers
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())


def _load_or_named_error(load, model: nn.Module) -> bool:
    """Run ``load()``; True when it succeeded, False when it raised a named error and changed nothing."""
    before = _snapshot(model)
    try:
        load()
    except ValueError:  # convlora's errors are all ValueError subclasses; anything else is a bug
        _assert_same(model, before)
        return False
    return True


@pytest.fixture(scope="module")
def native_file(tmp_path_factory):
    path = convlora.save_lora(adapted(), tmp_path_factory.mktemp("fuzz") / "good.safetensors")
    return read_safetensors(path)


def _write(tensors, header) -> Path:
    path = Path(tempfile.mkdtemp()) / "f.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=header)
    return path


# ---- headers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", BUDGETS)
def test_native_header_entries(native_file, budget):
    tensors, header = native_file
    table = json.loads(header["convlora_modules"])

    @_settings(budget)
    @given(
        entry=st.sampled_from(["convlora_modules", "convlora_config", "module field"]),
        module=st.sampled_from(sorted(table)),
        field=st.sampled_from(["r", "alpha", "base_shape", "type", "groups", "dilation", "padding_mode", "use_rslora"]),
        value=JSON,
        eval_mode=st.booleans(),
    )
    def run(entry, module, field, value, eval_mode):
        if entry == "module field":
            edited = json.loads(header["convlora_modules"])
            edited[module][field] = value
            new_header = {**header, "convlora_modules": json.dumps(edited)}
        else:
            new_header = {**header, entry: json.dumps(value)}
        path = _write(tensors, new_header)
        fresh = small_model()
        if _load_or_named_error(lambda: convlora.load_lora(fresh, path), fresh):
            loaded = json.loads(new_header["convlora_modules"])
            for p, layer in convlora.lora_layers(fresh).items():
                assert layer.lora_alpha == float(loaded[p]["alpha"]) and math.isfinite(layer.scaling)
        existing = adapted(seed=4).train(not eval_mode)
        _load_or_named_error(lambda: convlora.load_lora(existing, path), existing)
        try:
            read_lora_file(path)
        except ValueError:
            pass

    run()


@pytest.mark.parametrize("budget", BUDGETS)
def test_diffusers_adapter_metadata(budget):
    tensors = {"unet.mid.to_q.lora_A.weight": torch.randn(2, 8), "unet.mid.to_q.lora_B.weight": torch.randn(8, 2)}

    @_settings(budget)
    @given(
        value=JSON | st.dictionaries(
            st.sampled_from(["unet.r", "unet.lora_alpha", "unet.alpha_pattern", "unet.rank_pattern", "unet.use_rslora", "r"]),
            JSON | st.dictionaries(st.sampled_from(["to_q", "mid.to_q", "(", "a|b", "*"]), JSON, max_size=2), max_size=4,
        )
    )  # fmt: skip
    def run(value):
        path = _write(tensors, {"lora_adapter_metadata": json.dumps(value)})
        try:
            _, weights = read_lora_file(path)
        except ValueError:
            return
        (module,) = weights.modules.values()
        assert math.isfinite(module.alpha) and module.alpha > 0

    run()


@pytest.mark.parametrize("budget", BUDGETS)
def test_peft_adapter_config(budget, tmp_path):
    from convlora.formats import load_peft_adapter

    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(
        {"base_model.model.2.lora_A.weight": torch.randn(2, 6), "base_model.model.2.lora_B.weight": torch.randn(6, 2)},
        str(folder / "adapter_model.safetensors"),
    )

    @_settings(budget)
    @given(value=JSON | st.fixed_dictionaries({"r": JSON, "lora_alpha": JSON, "alpha_pattern": JSON}))
    def run(value):
        (folder / "adapter_config.json").write_text(json.dumps(value))
        model = small_model()
        if _load_or_named_error(lambda: load_peft_adapter(model, folder), model):
            assert convlora.lora_layers(model)["2"].lora_alpha > 0

    run()


@pytest.mark.parametrize("budget", BUDGETS)
def test_kohya_alpha_tensors(budget):
    down, up = torch.randn(2, 4, 3, 3), torch.randn(8, 2, 1, 1)

    @_settings(budget)
    @given(
        shape=st.sampled_from([(), (1,), (2,), (0,), (1, 1)]),
        value=st.floats(allow_nan=True, allow_infinity=True, width=32),
        dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]),
    )
    def run(shape, value, dtype):
        alpha = torch.full(shape, value).to(dtype) if dtype != torch.bool else torch.full(shape, bool(value))
        path = _write({"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up, "lora_unet_conv_in.alpha": alpha}, {})
        try:
            _, weights = read_lora_file(path)
        except ValueError:
            return
        assert weights.modules["unet.conv_in"].alpha == float(alpha.reshape(()).item()) > 0

    run()


# ---- tensors ----------------------------------------------------------------------------------------
SPECIAL = st.sampled_from([0.0, 1e-3, -2.5, 7e4, 1e300, float("nan"), float("inf"), -float("inf")])


@pytest.mark.parametrize("budget", BUDGETS)
def test_tensors_entering_a_model(native_file, budget):
    tensors, header = native_file

    @_settings(budget)
    @given(
        key=st.sampled_from(sorted(tensors)),
        dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int64, torch.bool]),
        value=SPECIAL,
        eval_mode=st.booleans(),
        half_base=st.booleans(),
    )
    def run(key, dtype, value, eval_mode, half_base):
        edited = dict(tensors)
        poked = tensors[key].double().clone()
        poked.view(-1)[0] = value
        edited[key] = poked.to(dtype) if dtype != torch.bool else poked > 0
        path = _write(edited, header)
        model = adapted(seed=2)
        if half_base:
            model.to(torch.float16)
            convlora.cast_lora_params(model, torch.float32)
        model.train(not eval_mode)
        if _load_or_named_error(lambda: convlora.load_lora(model, path), model):
            assert all(torch.isfinite(p).all() for p in model.parameters())
            unmerged = model.train()(X.to(model[2].weight.dtype))
            model.eval()
            merged_ok = all(l.merged for l in convlora.lora_layers(model).values())
            assert not merged_ok or relative_error(model(X.to(model[2].weight.dtype)), unmerged) < (1e-2 if half_base else 1e-5)

    run()


# ---- configs -----------------------------------------------------------------------------------------
CONFIG_FIELDS = {
    "r": JSON, "alpha": JSON, "dropout": JSON, "target_modules": JSON | st.just(["0", "2"]),
    "exclude_modules": JSON, "rank_pattern": JSON, "alpha_pattern": JSON, "conv_rank": JSON, "conv_alpha": JSON,
    "init": JSON | st.just("gaussian"), "use_rslora": JSON, "merge_on_eval": JSON, "bias": JSON | st.just("all"),
    "modules_to_save": JSON,
}  # fmt: skip


@pytest.mark.parametrize("budget", BUDGETS)
def test_configs(budget):
    @_settings(budget)
    @given(fields=st.fixed_dictionaries({}, optional=CONFIG_FIELDS))
    def run(fields):
        fields.setdefault("target_modules", ["0", "2"])
        try:
            config = convlora.LoRAConfig(**fields)
        except ValueError:
            return
        assert convlora.LoRAConfig.from_json(config.to_json()) == config
        model = small_model()
        if _load_or_named_error(lambda: convlora.inject_lora(model, config), model):
            for layer in convlora.lora_layers(model).values():
                assert math.isfinite(layer.scaling) and layer.scaling > 0

    run()


# ---- layer geometries ------------------------------------------------------------------------------
@st.composite
def conv_geometry(draw):
    dims = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 4]))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.sampled_from(["same", 0, 1])) if stride == 1 else draw(st.sampled_from([0, 1]))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    size = draw(st.integers(5, 7))
    return dims, dict(
        in_channels=in_channels, out_channels=out_channels, kernel_size=kernel, stride=stride, padding=padding,
        dilation=dilation, groups=groups, padding_mode=padding_mode,
    ), size  # fmt: skip


@pytest.mark.parametrize("budget", BUDGETS)
def test_layer_geometries(budget):
    @_settings(budget)
    @given(
        geometry=conv_geometry(),
        r=st.integers(1, 4),
        alpha=st.floats(0.1, 16),
        rslora=st.booleans(),
        dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    )
    def run(geometry, r, alpha, rslora, dtype):
        dims, kwargs, size = geometry
        conv_class = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        torch.manual_seed(0)
        try:
            base = conv_class(**kwargs)
        except (ValueError, RuntimeError):
            assume(False)  # a geometry torch itself refuses
        base = base.to(dtype)
        x = torch.randn(2, kwargs["in_channels"], *(size,) * dims).to(dtype)
        expected_base = base(x)
        lora_class = {1: convlora.Conv1d, 2: convlora.Conv2d, 3: convlora.Conv3d}[dims]
        layer = lora_class.from_module(base, r=r, alpha=alpha, use_rslora=rslora)
        assert torch.equal(layer(x), expected_base), "B = 0: exactly the base output"
        randomize_lora_(layer, seed=r)
        weight = layer.weight.detach().clone()
        unmerged = layer.train()(x)
        layer.eval()
        tolerance = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 5e-2}[dtype]
        assert layer.merged and relative_error(layer(x), unmerged) < tolerance
        layer.train()
        assert torch.equal(layer.weight, weight), "train() restores the base weight bit-exactly"

    run()
