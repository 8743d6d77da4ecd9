"""convlora.lowrank against independent references: numpy's SVD of the dense ΔW, and the merged sums."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from convlora.formats import LoRAFormatError, LoRAModule, LoRAWeights
from convlora.lowrank import annotated, check_dynamic, choose_rank, merge_loras, resize_lora, resize_module

# (name, lora_A shape at rank r without the rank, lora_B trailing ones, groups)
LAYERS = {
    "linear": ((40,), 24, ()),
    "conv1d k5": ((8, 5), 16, (1,)),
    "conv2d 1x1": ((16, 1, 1), 32, (1, 1)),
    "conv2d 3x3": ((16, 3, 3), 32, (1, 1)),
    "conv2d 3x3 groups=4": ((2, 3, 3), 12, (1, 1)),  # C_in 8 / groups 4: ΔW is (12, 2*3*3)
    "conv3d 3x3x3": ((6, 3, 3, 3), 8, (1, 1, 1)),
}


def random_module(layer: str, r: int, alpha: float, seed: int) -> LoRAModule:
    a_tail, out, ones = LAYERS[layer]
    g = torch.Generator().manual_seed(seed)
    geometry = {"groups": 4, "dilation": [1, 1], "padding_mode": "zeros"} if "groups" in layer else None
    return LoRAModule(torch.randn(r, *a_tail, generator=g), torch.randn(out, r, *ones, generator=g), alpha, geometry)


def dense(module: LoRAModule, use_rslora: bool = False) -> np.ndarray:
    """ΔW as a float64 numpy matrix (out, in/groups * prod(k)), computed here, not with convlora's helpers."""
    r = module.lora_A.shape[0]
    scaling = module.alpha / (math.sqrt(r) if use_rslora else r)
    return scaling * module.lora_B.double().numpy().reshape(module.lora_B.shape[0], r) @ module.lora_A.double().numpy().reshape(r, -1)


def best_rank(matrix: np.ndarray, k: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def rel(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_resize_gives_the_best_rank_k_approximation(layer, use_rslora):
    module = random_module(layer, r=10, alpha=6.0, seed=0)
    new, retained = resize_module(module, 4, use_rslora)
    a_tail, out, ones = LAYERS[layer]
    assert new.lora_A.shape == (4, *a_tail) and new.lora_B.shape == (out, 4, *ones)
    old_scaling = 6.0 / (math.sqrt(10) if use_rslora else 10)
    assert new.alpha == pytest.approx(old_scaling * (2.0 if use_rslora else 4.0))  # the scaling is kept
    assert new.geometry == module.geometry
    reference = best_rank(dense(module, use_rslora), 4)
    assert rel(dense(new, use_rslora), reference) < 1e-4
    s = np.linalg.svd(dense(module, use_rslora), compute_uv=False)
    assert retained == pytest.approx(math.sqrt((s[:4] ** 2).sum() / (s**2).sum()), rel=1e-6)
    assert float(new.lora_A.norm()) == pytest.approx(float(new.lora_B.norm()), rel=1e-5)  # σ split evenly


def test_modules_at_or_below_the_rank_are_kept_exactly():
    weights = LoRAWeights({"lin": random_module("linear", 3, 3.0, 1), "conv": random_module("conv2d 3x3", 8, 4.0, 2)})
    resized, report = resize_lora(weights, rank=4, conv_rank=8)
    assert resized.modules["lin"] is weights.modules["lin"] and resized.modules["conv"] is weights.modules["conv"]
    assert [(e.path, e.old_rank, e.new_rank, e.fro_retained) for e in report] == [("lin", 3, 3, 1.0), ("conv", 8, 8, 1.0)]
    resized, _ = resize_lora(weights, rank=4, conv_rank=2)  # --conv-rank applies to k x k convs only
    assert resized.modules["lin"].r == 3 and resized.modules["conv"].r == 2
    assert rel(dense(resized.modules["conv"]), best_rank(dense(weights.modules["conv"]), 2)) < 1e-4


def module_with_singular_values(sigma: list[float]) -> LoRAModule:
    """A Linear LoRA (alpha = r, scaling 1) whose ΔW has exactly these singular values."""
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(20, len(sigma), generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(30, len(sigma), generator=g, dtype=torch.float64))[0]
    return LoRAModule(v.T.float().contiguous(), (u * torch.tensor(sigma, dtype=torch.float64)).float(), float(len(sigma)))


SIGMA = [10.0, 5.0, 2.0, 0.9, 0.5, 0.1, 0.05, 0.01]


@pytest.mark.parametrize(
    "method, param, fewest",
    [
        ("sv_ratio", 10.0, 3),  # σ > 10/10: 10, 5, 2
        ("sv_ratio", 25.0, 5),  # σ > 0.4: 10, 5, 2, 0.9, 0.5
        ("sv_fro", 0.99, 3),  # √(100+25+4)/√130.07... = 0.9959 >= 0.99; two values give 0.980
        ("sv_fro", 0.999, 5),  # four give 0.99899
        ("sv_cumulative", 0.9, 3),  # (10+5+2)/18.56 = 0.916; two give 0.808
        ("sv_cumulative", 0.95, 4),  # 17.9/18.56 = 0.964
    ],
)  # fmt: skip
def test_dynamic_ranks_follow_kohya(method, param, fewest):
    # the reference: the fewest singular values meeting the criterion, plus the one kohya adds
    s = np.array(SIGMA)
    share = {"sv_ratio": None, "sv_fro": np.sqrt(np.cumsum(s**2) / (s**2).sum()), "sv_cumulative": np.cumsum(s) / s.sum()}[method]
    assert fewest == (int((s > s[0] / param).sum()) if share is None else int(np.argmax(share >= param)) + 1)
    module = module_with_singular_values(SIGMA)
    new, _ = resize_module(module, 8, False, method, param)
    assert new.r == fewest + 1
    assert rel(dense(new), best_rank(dense(module), fewest + 1)) < 1e-4
    assert resize_module(module, 2, False, method, param)[0].r == 2  # --rank caps it


def test_choose_rank_edge_cases():
    assert choose_rank(torch.tensor([0.0, 0.0]), 4) == 1  # a zero update: rank 1, as kohya
    assert choose_rank(torch.tensor([3.0, 2.0, 1.0]), 8, "sv_ratio", 100.0) == 3  # never beyond the non-zero values
    assert choose_rank(torch.tensor([3.0, 2.0, 1.0]), 8, "sv_fro", 1.0) == 3
    zero = LoRAModule(torch.zeros(4, 6), torch.zeros(5, 4), 4.0)
    new, retained = resize_module(zero, 2, False)
    assert new.r == 1 and retained == 1.0 and not new.lora_A.any() and not new.lora_B.any()


@pytest.mark.parametrize(
    "method, param, message",
    [
        ("svd_magic", 0.5, "unknown dynamic method 'svd_magic': choose one of sv_ratio, sv_fro, sv_cumulative"),
        ("sv_fro", None, "--dynamic sv_fro needs a finite --dynamic_param"),
        ("sv_fro", 1.5, r"--dynamic sv_fro: --dynamic_param is a fraction and must be in \(0, 1\], got 1.5"),
        ("sv_ratio", 0.5, "must be >= 1, got 0.5"),
        (None, 0.5, "--dynamic_param needs --dynamic"),
    ],
)  # fmt: skip
def test_bad_dynamic_settings_are_named(method, param, message):
    with pytest.raises(ValueError, match=message):
        check_dynamic(method, param)


# ---- merge ---------------------------------------------------------------------------------------
def test_merge_is_the_exact_weighted_sum():
    first = LoRAWeights(
        {"a": random_module("linear", 4, 8.0, 10), "c": random_module("conv2d 3x3 groups=4", 2, 1.0, 11),
         "only_first": random_module("conv3d 3x3x3", 3, 3.0, 12)}, use_rslora=False, metadata={"base_model": "x"},
    )  # fmt: skip
    second = LoRAWeights(
        {"a": random_module("linear", 8, 2.0, 20), "c": random_module("conv2d 3x3 groups=4", 5, 7.0, 21),
         "only_second": random_module("conv1d k5", 6, 6.0, 22)}, use_rslora=True,
    )  # fmt: skip
    merged = merge_loras([(first, 0.7), (second, -1.0)])
    assert set(merged.modules) == {"a", "c", "only_first", "only_second"}
    assert merged.use_rslora is False and merged.metadata == {"base_model": "x"}
    for path in ("a", "c"):
        expected = 0.7 * dense(first.modules[path]) - 1.0 * dense(second.modules[path], use_rslora=True)
        assert rel(dense(merged.modules[path]), expected) < 1e-6
        assert merged.modules[path].r == first.modules[path].r + second.modules[path].r
    assert merged.modules["c"].geometry == first.modules["c"].geometry
    assert rel(dense(merged.modules["only_first"]), 0.7 * dense(first.modules["only_first"])) < 1e-6
    assert rel(dense(merged.modules["only_second"]), -dense(second.modules["only_second"], use_rslora=True)) < 1e-6

    unchanged = merge_loras([(first, 1.0), (second, 0.0)])  # weight 0 drops a file; weight 1 keeps tensors
    assert set(unchanged.modules) == set(first.modules)
    assert all(unchanged.modules[p] is m for p, m in first.modules.items())


def test_merge_then_svd_is_the_best_approximation_of_the_sum():
    first = LoRAWeights({"a": random_module("conv2d 3x3", 6, 6.0, 30)})
    second = LoRAWeights({"a": random_module("conv2d 3x3", 6, 3.0, 31)})
    merged = merge_loras([(first, 0.5), (second, 2.0)])
    resized, _ = resize_lora(merged, 5)
    expected = best_rank(0.5 * dense(first.modules["a"]) + 2.0 * dense(second.modules["a"]), 5)
    assert resized.modules["a"].r == 5 and rel(dense(resized.modules["a"]), expected) < 1e-4


def test_merge_refuses_different_layers_on_one_path():
    first = LoRAWeights({"unet.x": random_module("conv2d 3x3", 4, 4.0, 1)})
    second = LoRAWeights({"unet.x": random_module("conv2d 1x1", 4, 4.0, 2)})
    with pytest.raises(LoRAFormatError, match=r"unet.x: a.safetensors has lora_A \(4, 16, 3, 3\) / lora_B \(32, 4, 1, 1\), "
                       r"b.safetensors has lora_A \(4, 16, 1, 1\) / lora_B \(32, 4, 1, 1\): not the same layer"):
        merge_loras([(first, 1.0), (second, 1.0)], sources=["a.safetensors", "b.safetensors"])
    grouped = random_module("conv2d 3x3 groups=4", 2, 1.0, 3)
    other = LoRAModule(grouped.lora_A, grouped.lora_B, 1.0, {**grouped.geometry, "dilation": [2, 2]})
    with pytest.raises(LoRAFormatError, match="unet.x: conv geometry .* in a, .*'dilation': \\[2, 2\\].* in b"):
        merge_loras([(LoRAWeights({"unet.x": grouped}), 1.0), (LoRAWeights({"unet.x": other}), 1.0)], sources=["a", "b"])
    with pytest.raises(LoRAFormatError, match="single.safetensors adapt\\(s\\) a single model"):
        merge_loras([(first, 1.0), (LoRAWeights({"x": grouped}), 1.0)], sources=["pipe.safetensors", "single.safetensors"])
    with pytest.raises(LoRAFormatError, match="nothing to merge: every weight is 0"):
        merge_loras([(first, 0.0)])


def test_annotated_metadata_describes_the_new_tensors():
    weights = LoRAWeights(
        {"a": random_module("linear", 2, 2.0, 1), "b": random_module("linear", 2, 2.0, 2)},
        metadata={"rank": "8", "alpha": "8", "ss_training_comment": "mine", "sshs_model_hash": "abc", "steps": "5"},
    )  # fmt: skip
    assert annotated(weights, "resized").metadata == {"rank": "2", "alpha": "2", "ss_training_comment": "resized; mine", "steps": "5"}


# ---- extract's per-layer step ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "layer",
    [torch.nn.Linear(40, 24), torch.nn.Conv1d(8, 16, 5), torch.nn.Conv2d(16, 32, 3), torch.nn.Conv2d(8, 12, 3, groups=4),
     torch.nn.Conv3d(6, 8, 3), torch.nn.Conv2d(16, 32, 1)],
    ids=["linear", "conv1d", "conv2d", "conv2d-groups4", "conv3d", "conv2d-1x1"],
)  # fmt: skip
def test_extract_step_is_the_best_rank_k_approximation(layer):
    from convlora.extract import lora_of_delta
    from convlora.state import delta_weight

    g = torch.Generator().manual_seed(7)
    delta = torch.randn(layer.weight.shape, generator=g)  # a full-rank difference in the layer's weight layout
    module, retained = lora_of_delta(layer, delta, 3)
    assert module.lora_A.shape == (3, *layer.weight.shape[1:])
    assert module.lora_B.shape == (layer.weight.shape[0], 3, *(1,) * (layer.weight.dim() - 2)) and module.alpha == 3.0
    matrix = delta.double().flatten(1).numpy()  # (C_out, C_in/groups * prod(k))
    assert rel(delta_weight(module.lora_A, module.lora_B, 1.0).flatten(1).double().numpy(), best_rank(matrix, 3)) < 1e-4
    s = np.linalg.svd(matrix, compute_uv=False)
    assert retained == pytest.approx(math.sqrt((s[:3] ** 2).sum() / (s**2).sum()), rel=1e-5)
    if getattr(layer, "groups", 1) > 1:
        assert module.geometry == {"groups": 4, "dilation": [1, 1], "padding_mode": "zeros"}
