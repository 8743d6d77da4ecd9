"""LoRAConfig: validation with named errors, JSON round trip, per-module rank/alpha resolution."""

import pytest

from convlora import LoRAConfig
from convlora.config import path_matches


def test_json_round_trip_and_unknown_keys():
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["to_q"], rank_pattern={"to_q": 2}, conv_rank=2)
    assert LoRAConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown LoRAConfig field\\(s\\): lora_rank, typo"):
        LoRAConfig.from_dict({**cfg.to_dict(), "lora_rank": 4, "typo": 1})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"r": 0}, "r must be an integer >= 1, got 0"),
        ({"r": 2.5}, "r must be an integer >= 1, got 2.5"),
        ({"alpha": -1}, "alpha must be a finite number > 0, got -1"),
        ({"alpha": float("inf")}, "alpha must be a finite number > 0, got inf"),
        ({"alpha": float("nan")}, "alpha must be a finite number > 0, got nan"),
        ({"alpha": 0}, "alpha must be a finite number > 0, got 0"),
        ({"conv_alpha": True}, "conv_alpha must be a finite number > 0, got True"),
        ({"alpha_pattern": {"to_q": float("inf")}}, r"alpha_pattern\['to_q'\] must be a finite number > 0"),
        ({"alpha_pattern": ["to_q"]}, "alpha_pattern must be a dict keyed by non-empty module names"),
        ({"target_modules": 5}, "target_modules must be a regex string or a list of non-empty names, got 5"),
        ({"use_rslora": "yes"}, "use_rslora must be True or False, got 'yes'"),
        ({"modules_to_save": "head"}, "modules_to_save must be None or a list of module names"),
        ({"dropout": 1.0}, "dropout must be in \\[0, 1\\), got 1.0"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"target_modules": "to_(q"}, "target_modules is not a valid regex"),
        ({"init": "xavier"}, "init must be one of \\('kaiming', 'gaussian'\\), got 'xavier'"),
        ({"bias": "some"}, "bias must be one of"),
        ({"rank_pattern": {"to_q": 0}}, "rank_pattern\\['to_q'\\] must be an integer >= 1"),
        ({"conv_rank": -2}, "conv_rank must be an integer >= 1"),
    ],
)
def test_invalid_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**{"target_modules": ["x"], **kwargs})


def test_segment_matching():
    assert path_matches("to_out.0", "down.1.attn.to_out.0")
    assert not path_matches("to_out.0", "down.1.attn.to_out.01")
    assert not path_matches("conv1", "block.xconv1")
    assert path_matches("conv1", "conv1")


def test_rank_and_alpha_resolution():
    cfg = LoRAConfig(r=8, alpha=16, conv_rank=4, target_modules=["x"], rank_pattern={"attn1.to_q": 2}, alpha_pattern={r".*\.to_k": 3})
    assert cfg.rank_and_alpha("up.attn1.to_q", is_spatial_conv=False) == (2, 16.0)
    assert cfg.rank_and_alpha("up.attn1.to_k", is_spatial_conv=False) == (8, 3.0)
    assert cfg.rank_and_alpha("up.resnets.0.conv1", is_spatial_conv=True) == (4, 4.0), "conv_alpha defaults to conv_rank"
    assert LoRAConfig(r=8, target_modules=["x"]).rank_and_alpha("a", False) == (8, 8.0), "alpha defaults to r"
