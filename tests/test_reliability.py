"""Bad input and unusual use: each case gives the exact result or a named error, and changes nothing.

One test per known failure: training in eval mode, tied weights, mixed rsLoRA, non-finite and
non-float tensors, nonsense alphas, fp16 merge overflow, duplicate keys, failed loads, kohya's
alpha 0 and malformed headers (the CLI cases are in ``test_cli_errors.py``).
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import convlora
from convlora import layers as layers_module
from convlora.formats import LoRAFormatError, read_lora_file
from convlora.io import LoRAFileError, read_safetensors
from convlora.state import StateDictMismatchError
from convlora.testing import randomize_lora_, relative_error


def small_model(seed: int = 0) -> nn.Module:
    """(N, 4, 6) -> Conv1d -> (N, 8, 6) -> Linear over the last dim -> flatten -> (N, 3)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.Tanh(), nn.Linear(6, 6), nn.Flatten(), nn.Linear(48, 3))


def adapted(seed: int = 0, **config) -> nn.Module:
    model = small_model(seed)
    convlora.inject_lora(model, convlora.LoRAConfig(**{"r": 2, "target_modules": ["0", "2", "4"], **config}))
    return randomize_lora_(model, seed=seed + 1)


def lora_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA tensor and every base weight, cloned (for bit-exact "nothing changed" checks)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


X = torch.randn(5, 4, 6, generator=torch.Generator().manual_seed(9))


# ---- training in eval mode learns, exactly as in train mode --------------------------------------
def _train(model: nn.Module, mode: bool, steps: int = 20) -> list[float]:
    convlora.mark_only_lora_as_trainable(model)
    model.train(mode)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(steps):
        loss = (model(X) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_training_in_eval_mode_learns_as_in_train_mode():
    in_train, in_eval = adapted(), adapted()
    train_losses, eval_losses = _train(in_train, True), _train(in_eval, False)
    assert eval_losses[-1] < 0.75 * eval_losses[0], "eval-mode training must learn"
    assert max(abs(a - b) for a, b in zip(train_losses, eval_losses)) < 1e-5
    for path, layer in convlora.lora_layers(in_eval).items():
        assert layer.merged
        reference = convlora.lora_layers(in_train)[path]
        assert relative_error(layer.lora_B, reference.lora_B) < 1e-4
    # After the last step the merged model equals a freshly re-merged copy.
    fresh = copy.deepcopy(in_eval).train()
    fresh.eval()
    assert relative_error(in_eval(X), fresh(X)) < 1e-6


def test_merged_layer_refreshes_after_writes_through_data():
    model = adapted().eval()
    layer = model[0]
    expected_before = model(X)
    with torch.no_grad():
        layer.lora_B.data.mul_(3.0)  # moves no version counter
    with torch.enable_grad():
        out = model(X)  # the training path compares values too
    reference = copy.deepcopy(model).train()(X)
    assert relative_error(out, reference) < 1e-6 and relative_error(out, expected_before) > 1e-3


def test_merged_layer_follows_a_new_alpha():
    model = adapted().eval()
    model[2].lora_alpha = 7.0
    assert model[2].scaling == 3.5
    reference = copy.deepcopy(model).train()(X)
    assert relative_error(model(X), reference) < 1e-6 and model[2].merged


# ---- tied weights ---------------------------------------------------------------------------------
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def test_tied_weights_are_never_merged_into():
    model = tiny_gpt2()
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["lm_head", "c_attn"]))
    randomize_lora_(model, seed=1, std=0.5)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    model.train()
    model.config.attn_pdrop = model.config.resid_pdrop = model.config.embd_pdrop = 0.0
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    expected = model(ids).logits.detach()
    wte = model.transformer.wte.weight.detach().clone()
    layers_module._WARNED.clear()
    with pytest.warns(UserWarning, match=r"merge-on-eval skipped because weights are tied to transformer\.wte\.weight"):
        model.eval()
    assert not model.lm_head.merged and model.transformer.h[0].attn.c_attn.merged
    assert torch.equal(model.transformer.wte.weight, wte)
    assert relative_error(model(ids).logits, expected) < 1e-6
    before = lora_values(model)
    with pytest.raises(RuntimeError, match=r"cannot merge LoRA into lm_head \(Linear\): its weight is tied to transformer\.wte\.weight"):
        convlora.merge_and_unload(model)
    assert_unchanged(model, before)
    assert isinstance(model.lm_head, convlora.Linear)


# ---- mixed rsLoRA and plain LoRA ------------------------------------------------------------------
def test_mixed_rslora_and_plain_lora_keep_their_scaling_on_reload(tmp_path):
    model = small_model()
    convlora.inject_lora(model, convlora.LoRAConfig(r=4, alpha=8, use_rslora=True, target_modules=["0"]))
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["2", "4"]))
    randomize_lora_(model, seed=3)
    assert model[0].scaling == 8 / math.sqrt(4) and model[2].scaling == 1.0
    path = convlora.save_lora(model, tmp_path / "mixed.safetensors")
    fresh = small_model()
    convlora.load_lora(fresh, path)
    assert fresh[0].use_rslora and fresh[0].scaling == 4.0 and not fresh[2].use_rslora
    assert relative_error(fresh(X), model(X)) < 1e-6
    # Other formats hold one kind per file: converting it is refused by name, not guessed.
    with pytest.raises(LoRAFormatError, match="mixes rsLoRA and plain LoRA modules"):
        read_lora_file(path)


# ---- non-finite / non-float tensors and nonsense alphas ------------------------------------------
def _native_file(tmp_path, edit_tensors=None, edit_table=None, name="edited.safetensors"):
    path = convlora.save_lora(adapted(), tmp_path / "good.safetensors")
    tensors, header = read_safetensors(path)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_table:
        table = json.loads(header["convlora_modules"])
        edit_table(table)
        header["convlora_modules"] = json.dumps(table)
    out = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata=header)
    return out


@pytest.mark.parametrize(
    "edit,error,message",
    [
        (lambda t: t["2.lora_B"].view(-1).__setitem__(0, float("nan")), ValueError, r"non-finite values \(NaN/inf\) in 2\.lora_B"),
        (lambda t: t.__setitem__("0.lora_A", torch.full_like(t["0.lora_A"], 1e300, dtype=torch.float64)), ValueError,
         r"non-finite values \(NaN/inf\) in 0\.lora_A"),
        (lambda t: t.__setitem__("0.lora_A", t["0.lora_A"].to(torch.int8)), StateDictMismatchError, r"floating point; not so: 0\.lora_A \(int8\)"),
        (lambda t: t.__setitem__("0.lora_A", t["0.lora_A"] > 0), StateDictMismatchError, r"0\.lora_A \(bool\)"),
    ],
)  # fmt: skip
def test_bad_tensors_are_refused_and_change_nothing(tmp_path, edit, error, message):
    path = _native_file(tmp_path, edit_tensors=edit)
    fresh = small_model()
    with pytest.raises(error, match=message):
        convlora.load_lora(fresh, path)
    assert not convlora.lora_layers(fresh), "the injected layers are removed again"
    merged = adapted(seed=5).eval()
    before = lora_values(merged)
    with pytest.raises(error, match=message):
        convlora.load_lora(merged, path)
    assert_unchanged(merged, before)
    assert all(layer.merged for layer in convlora.lora_layers(merged).values())


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 0, -1, "abc", None, True])
def test_bad_module_table_alpha_is_refused_before_anything_is_written(tmp_path, alpha):
    path = _native_file(tmp_path, edit_table=lambda table: table["2"].__setitem__("alpha", alpha))
    model = adapted(seed=5)
    before = lora_values(model)
    with pytest.raises(LoRAFileError, match=r"convlora_modules\['2'\]\.alpha must be a finite number > 0"):
        convlora.load_lora(model, path)
    assert_unchanged(model, before)


def test_module_entry_without_alpha_is_named(tmp_path):
    path = _native_file(tmp_path, edit_table=lambda table: table["2"].pop("alpha"))
    model = adapted(seed=5)
    before = lora_values(model)
    with pytest.raises(LoRAFileError, match=r"convlora_modules\['2'\] has no alpha"):
        convlora.load_lora(model, path)
    with pytest.raises(LoRAFileError, match=r"convlora_modules\['2'\] has no alpha"):
        read_lora_file(path)
    assert_unchanged(model, before)


@pytest.mark.parametrize("alpha", [float("inf"), float("nan"), 0.0, -2.0])
def test_lora_config_and_layers_refuse_nonsense_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        convlora.LoRAConfig(alpha=alpha, target_modules=["0"])
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        convlora.Linear(4, 4, r=2, lora_alpha=alpha)
    layer = convlora.Linear(4, 4, r=2)
    with pytest.raises(ValueError, match="lora_alpha of Linear must be a finite number > 0"):
        layer.lora_alpha = alpha
    assert layer.lora_alpha == 2.0 and layer.scaling == 1.0


# ---- fp16 merge overflow --------------------------------------------------------------------------
def fp16_overflowing_model() -> nn.Module:
    """An fp16 Linear whose ΔW is 9e4: finite in fp32, beyond fp16's 65504."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).to(torch.float16)
    convlora.inject_lora(model, convlora.LoRAConfig(r=1, alpha=1, target_modules=["0", "1"]))
    convlora.cast_lora_params(model, torch.float32)
    with torch.no_grad():
        model[0].lora_A.fill_(0.01)
        model[0].lora_B.fill_(0.01)
        model[1].lora_A.fill_(300.0)
        model[1].lora_B.fill_(300.0)
    return model


def test_fp16_merge_overflow_is_caught_after_the_cast():
    model = fp16_overflowing_model()
    before = lora_values(model)
    with pytest.raises(ValueError, match=r"merging LoRA into 1 \(Linear\) gives non-finite weights \(NaN/inf\) in float16"):
        model[1].merge()
    with pytest.raises(ValueError, match=r"1 \(Linear\) gives non-finite weights \(NaN/inf\) in float16"):
        convlora.merge_and_unload(model)
    assert_unchanged(model, before)
    assert not any(layer.merged for layer in convlora.lora_layers(model).values())


def test_eval_that_cannot_merge_one_layer_still_switches_every_module():
    """eval() does not fail half-way: every module is in eval mode, the layer that cannot merge runs unmerged."""
    model = fp16_overflowing_model()
    model.insert(1, nn.Dropout(0.5))
    layers_module._WARNED.clear()
    with pytest.warns(UserWarning, match=r"merge-on-eval skipped: merging LoRA into 1 \(Linear\) gives non-finite"):
        model.eval()
    assert not any(m.training for m in model.modules())
    assert model[0].merged and not model[2].merged
    assert torch.isfinite(model[2].weight).all()


# ---- one module in two key styles -----------------------------------------------------------------
def test_one_module_in_two_key_styles_is_refused(tmp_path):
    a, b = torch.randn(2, 8), torch.randn(8, 2)
    tensors = {
        "unet.mid.to_q.lora_A.weight": a, "unet.mid.to_q.lora_B.weight": b,
        "unet.mid.to_q.lora.down.weight": a * 2, "unet.mid.to_q.lora.up.weight": b * 2,
    }  # fmt: skip
    path = tmp_path / "twice.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(LoRAFormatError, match=r"the same module's LoRA is in the file twice, in two key styles: .*lora\.down\.weight"):
        read_lora_file(path)


# ---- failed loads leave the model as it was -------------------------------------------------------
def test_pipeline_load_failing_in_the_text_encoder_restores_the_unet(tmp_path):
    from convlora.diffusion import inject_pipeline_lora, load_pipeline_lora, save_pipeline_lora
    from convlora.diffusion import text_encoder_lora_config, unet_lora_config
    from convlora.diffusion.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    inject_pipeline_lora(pipe, unet_lora_config("attn", rank=4), text_encoder_lora_config("attn", rank=4))
    randomize_lora_(pipe.unet, seed=0)
    randomize_lora_(pipe.text_encoder, seed=1)
    path = save_pipeline_lora(tmp_path / "lora.safetensors", unet=pipe.unet, text_encoder=pipe.text_encoder)
    tensors, header = read_safetensors(path)
    for key in tensors:
        if key.startswith("unet."):
            tensors[key] = tensors[key] * 2  # fits, and differs from what the model holds
        elif key.endswith("lora_A.weight"):
            tensors[key] = tensors[key][:3]  # text encoder: rank 3 where the model has 4
        else:
            tensors[key] = tensors[key][:, :3].contiguous()
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=header)
    unet_before, te_before = lora_values(pipe.unet), lora_values(pipe.text_encoder)
    with pytest.raises(StateDictMismatchError, match=r"\[text_encoder\]"):
        load_pipeline_lora(bad, unet=pipe.unet, text_encoder=pipe.text_encoder)
    assert_unchanged(pipe.unet, unet_before)
    assert_unchanged(pipe.text_encoder, te_before)


def test_nan_file_into_a_merged_model_changes_nothing(tmp_path):
    path = _native_file(tmp_path, edit_tensors=lambda t: t["4.lora_A"].view(-1).__setitem__(3, float("inf")))
    model = adapted(seed=5).eval()
    before, out_before = lora_values(model), model(X)
    with pytest.raises(ValueError, match=r"non-finite values \(NaN/inf\) in 4\.lora_A"):
        convlora.load_lora(model, path)
    assert_unchanged(model, before)
    assert all(layer.merged for layer in convlora.lora_layers(model).values())
    assert torch.equal(model(X), out_before)


# ---- kohya alpha 0 -------------------------------------------------------------------------------
def test_kohya_alpha_zero_is_refused_because_loaders_disagree(tmp_path):
    """sd-scripts read a stored 0 as alpha = rank, A1111 / ComfyUI / diffusers as a switched-off module:
    convlora refuses it in every tool (load, convert, inspect) rather than pick one meaning."""
    from convlora.diffusion import load_pipeline_lora
    from convlora.diffusion.tiny import build_tiny_pipeline
    from convlora.formats import convert_lora_file

    a, b = torch.randn(4, 64), torch.randn(64, 4)
    base = {"lora_unet_mid_block_attentions_0_to_q.lora_down.weight": a, "lora_unet_mid_block_attentions_0_to_q.lora_up.weight": b}
    zero, ranked = tmp_path / "zero.safetensors", tmp_path / "rank.safetensors"
    save_file({**base, "lora_unet_mid_block_attentions_0_to_q.alpha": torch.tensor(0.0)}, str(zero))
    save_file({**base, "lora_unet_mid_block_attentions_0_to_q.alpha": torch.tensor(4.0)}, str(ranked))
    message = r"to_q\.alpha is 0, which loaders read differently \(kohya's sd-scripts: alpha = rank; A1111, ComfyUI"
    unet = build_tiny_pipeline().unet
    before = lora_values(unet)
    for action in (
        lambda: read_lora_file(zero),
        lambda: convert_lora_file(zero, tmp_path / "out.safetensors", "diffusers"),
        lambda: load_pipeline_lora(zero, unet=unet),
    ):
        with pytest.raises(LoRAFileError, match=message):
            action()
    assert_unchanged(unet, before)
    assert not (tmp_path / "out.safetensors").exists()
    assert read_lora_file(ranked)[1].modules["unet.mid_block.attentions.0.to_q"].alpha == 4.0


@pytest.mark.parametrize(
    "alpha,message",
    [
        (torch.tensor([4.0, 4.0]), r"\.alpha must hold one number, it has shape \(2,\)"),
        (torch.tensor([]), r"\.alpha must hold one number, it has shape \(0,\)"),
        (torch.tensor(float("nan")), r"\.alpha must be a finite number > 0, got nan"),
        (torch.tensor(-1.0), r"\.alpha must be a finite number > 0, got -1\.0"),
        (torch.tensor(True), r"\.alpha must be a real number, it is bool"),
    ],
)
def test_kohya_alpha_that_is_not_one_valid_number_is_named(tmp_path, alpha, message):
    path = tmp_path / "k.safetensors"
    save_file(
        {"lora_unet_conv_in.lora_down.weight": torch.randn(2, 4, 3, 3), "lora_unet_conv_in.lora_up.weight": torch.randn(8, 2, 1, 1),
         "lora_unet_conv_in.alpha": alpha},
        str(path),
    )  # fmt: skip
    with pytest.raises(LoRAFileError, match=message):
        read_lora_file(path)


# ---- malformed headers: one validated reader -----------------------------------------------------------
@pytest.mark.parametrize("value", ["[1, 2]", "null", "5", "not json", '"text"'])
@pytest.mark.parametrize("key", ["convlora_modules", "convlora_config"])
def test_malformed_native_header_entries_are_named(tmp_path, key, value):
    path = convlora.save_lora(adapted(), tmp_path / "good.safetensors")
    tensors, header = read_safetensors(path)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**header, key: value})
    model = adapted(seed=5)
    before = lora_values(model)
    for load in (lambda: convlora.load_lora(model, bad), lambda: read_lora_file(bad)):
        with pytest.raises(LoRAFileError, match=rf"header entry '{key}' (must be a JSON object, got|is not valid JSON)"):
            load()
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "value,message",
    [
        ("[1, 2]", "must be a JSON object, got a JSON array"),
        ("null", "must be a JSON object, got a JSON null"),
        ("7", r"must be a JSON object, got a number \(7\)"),
        ('{"unet.lora_alpha": "abc"}', "lora_alpha must be a finite number > 0, got 'abc'"),
        ('{"unet.lora_alpha": 1e999}', "lora_alpha must be a finite number > 0, got inf"),
        ('{"unet.alpha_pattern": {"to_(q": 2}}', r"alpha_pattern key 'to_\(q' is not a valid regular expression"),
        ('{"unet.alpha_pattern": [1]}', "alpha_pattern must be a JSON object, got a JSON array"),
        ('{"unet.r": 0}', "r must be an integer >= 1, got 0"),
    ],
)
def test_malformed_lora_adapter_metadata_is_named(tmp_path, value, message):
    tensors = {"unet.mid.to_q.lora_A.weight": torch.randn(2, 8), "unet.mid.to_q.lora_B.weight": torch.randn(8, 2)}
    path = tmp_path / "d.safetensors"
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": value})
    with pytest.raises(LoRAFileError, match=message):
        read_lora_file(path)


@pytest.mark.parametrize(
    "config,message",
    [
        ([1, 2], "adapter_config.json must be a JSON object, got a JSON array"),
        ({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "alpha_pattern": {"[": 1}}, "alpha_pattern key '\\[' is not a valid regular"),
        ({"peft_type": "LORA", "r": 2, "lora_alpha": float("nan")}, "lora_alpha must be a finite number > 0"),
    ],
)
def test_malformed_peft_adapter_config_is_named(tmp_path, config, message):
    from convlora.formats import load_peft_adapter

    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file({"base_model.model.2.lora_A.weight": torch.randn(2, 6), "base_model.model.2.lora_B.weight": torch.randn(6, 2)},
              str(folder / "adapter_model.safetensors"))  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    model = small_model()
    with pytest.raises(LoRAFileError, match=message):
        load_peft_adapter(model, folder)
    assert not convlora.lora_layers(model)


@pytest.mark.parametrize("metadata", [{1: "x"}, {"a": 1}, {"convlora_x": "y"}, ["a"]])
def test_save_lora_refuses_bad_metadata_by_name(tmp_path, metadata):
    with pytest.raises(ValueError, match="metadata must (map strings to strings|be a mapping)"):
        convlora.save_lora(adapted(), tmp_path / "a.safetensors", metadata=metadata)
    assert not list(tmp_path.iterdir())


def test_no_warnings_from_clean_round_trips(tmp_path):
    model = adapted()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = convlora.save_lora(model, tmp_path / "a.safetensors")
        fresh = small_model()
        convlora.load_lora(fresh, path)
        fresh.eval()
    assert relative_error(fresh(X), model(X)) < 1e-6
