"""Prior preservation: the class-image cache (deterministic, refused when made otherwise, written all
or nothing), instance + class batches and their loss. Real tiny pipeline, two sampler steps."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convlora.training.data import SampleKey, TextImageDataset, read_image_folder
from convlora.training.prior import (
    RECORD,
    ClassImagesError,
    ClassImageSettings,
    PriorPairs,
    check_class_cache,
    check_prior_args,
    class_image_source,
    collate_pairs,
    base_targets,
    generate_class_images,
    prior_loss,
)

SETTINGS = ClassImageSettings(prompts=("a photo of a trouser", "a photo of a coat"), resolution=32, num_inference_steps=2,
                              guidance_scale=4.0, seed=0, sample_batch_size=2, base_model={"name_or_path": "tiny"})


@pytest.fixture(scope="module")
def sampler(tiny_base):
    """``(prompts, generators) -> images`` of the tiny pipeline at SETTINGS' steps and guidance."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_base), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def generate(prompts, generators):
        return pipe(prompts, generator=generators, height=32, width=32, num_inference_steps=2, guidance_scale=4.0).images

    return generate


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_adding_images_later_gives_the_images_of_one_go(tmp_path, sampler):
    calls = []
    assert generate_class_images(tmp_path / "a", SETTINGS, 3, sampler) == [3, 3]
    assert generate_class_images(tmp_path / "a", SETTINGS, 5, lambda p, g: calls.append(len(p)) or sampler(p, g)) == [5, 5]
    assert calls == [2, 2, 2, 2]  # only the aligned batches holding images 3 and 4: [2, 4) and [4, 6) per prompt
    generate_class_images(tmp_path / "b", SETTINGS, 5, sampler)
    a, b = _pixels(tmp_path / "a"), _pixels(tmp_path / "b")
    assert sorted(a) == [f"p{k:02d}-{i:05d}.png" for k in range(2) for i in range(5)] and sorted(a) == sorted(b)
    assert all(np.array_equal(a[name], b[name]) for name in a)
    assert not np.array_equal(a["p00-00000.png"], a["p00-00001.png"])  # one seed per image
    record = json.loads((tmp_path / "a" / RECORD).read_text())
    assert record["counts"] == [5, 5] and record["settings"] == {**SETTINGS.record(), "prompts": list(SETTINGS.prompts)}
    listed = read_image_folder(tmp_path / "a")  # metadata.jsonl makes it a plain training folder too
    assert len(listed) == 10 and listed[5].captions == ("a photo of a coat",)
    # asking for fewer uses the first ones, and generates nothing
    source = class_image_source(tmp_path / "a", SETTINGS, 3)
    assert [Path(item.image).name for item in source.items] == ["p00-00000.png", "p00-00001.png", "p00-00002.png",
                                                               "p01-00000.png", "p01-00001.png", "p01-00002.png"]
    assert generate_class_images(tmp_path / "a", SETTINGS, 3, lambda p, g: pytest.fail("generated")) == [5, 5]


def test_a_cache_from_other_settings_is_refused_naming_the_difference(tmp_path, sampler):
    generate_class_images(tmp_path / "c", SETTINGS, 2, sampler)
    before = _pixels(tmp_path / "c")
    other = replace(SETTINGS, guidance_scale=5.0, base_model={"name_or_path": "other"})
    with pytest.raises(ClassImagesError, match=r"guidance_scale 4\.0 \(cache\) vs 5\.0 \(this run\); base_model"):
        generate_class_images(tmp_path / "c", other, 4, sampler)
    with pytest.raises(ClassImagesError, match=r"prompts \['a photo of a trouser', 'a photo of a coat'\] \(cache\) vs \['a photo of a coat'\]"):
        class_image_source(tmp_path / "c", replace(SETTINGS, prompts=("a photo of a coat",)), 2)
    with pytest.raises(ClassImagesError, match="has 2 images of 'a photo of a trouser', fewer than --num_class_images 4"):
        class_image_source(tmp_path / "c", SETTINGS, 4)
    assert _pixels(tmp_path / "c").keys() == before.keys()


def test_images_without_a_record_or_a_damaged_cache_are_refused(tmp_path, sampler):
    (tmp_path / "own").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "own" / "x.png")
    with pytest.raises(ClassImagesError, match=r"holds images \(x\.png, \.\.\.\) but no class_images\.json"):
        check_class_cache(tmp_path / "own", SETTINGS)
    generate_class_images(tmp_path / "d", SETTINGS, 2, sampler)
    (tmp_path / "d" / "p01-00001.png").unlink()
    with pytest.raises(ClassImagesError, match="lists 2 images of prompt 1 but p01-00001.png is missing"):
        check_class_cache(tmp_path / "d", SETTINGS)
    (tmp_path / "d" / RECORD).write_text("{not json")
    with pytest.raises(ClassImagesError, match="class_images.json is not valid JSON"):
        check_class_cache(tmp_path / "d", SETTINGS)


def test_a_failure_while_generating_leaves_the_cache_as_it_was(tmp_path, sampler):
    generate_class_images(tmp_path / "e", SETTINGS, 2, sampler)
    before = {p.name: p.read_bytes() for p in (tmp_path / "e").iterdir()}
    calls = []

    def fails_second_time(prompts, generators):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return sampler(prompts, generators)

    with pytest.raises(RuntimeError, match="out of memory"):
        generate_class_images(tmp_path / "e", SETTINGS, 4, fails_second_time)
    assert {p.name: p.read_bytes() for p in (tmp_path / "e").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["e"]  # no temporary folder left


def _dataset(folder: Path, n: int, caption: str) -> TextImageDataset:
    from convlora.training.data import write_toy_dataset

    source = read_image_folder(write_toy_dataset(folder, n=n, caption=caption))
    return TextImageDataset(source, lambda captions: torch.tensor([[len(c)] for c in captions]), 32, center_crop=True)


def test_pairs_put_b_instance_samples_then_b_class_samples_in_a_batch(tmp_path):
    pairs = PriorPairs(_dataset(tmp_path / "i", 3, "sks"), _dataset(tmp_path / "c", 5, "a photo of a coat"))
    assert len(pairs) == 5  # the larger of the two, as diffusers' DreamBooth
    batch = collate_pairs([pairs[SampleKey(0, i)] for i in (4, 1)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["is_class"].tolist() == [False, False, True, True]
    assert batch["index"].tolist() == [4, 1, 9, 6]  # the noise keys: i, then len + i
    assert batch["input_ids"][:, 0].tolist() == [3, 3, 17, 17]
    assert torch.equal(batch["pixel_values"][0], pairs.instances[SampleKey(0, 1)]["pixel_values"])  # 4 mod 3
    assert torch.equal(batch["pixel_values"][2], pairs.classes[SampleKey(0, 4)]["pixel_values"])


def test_prior_loss_is_instance_loss_plus_weighted_class_loss():
    pred, target = torch.arange(8.0).reshape(4, 2), torch.zeros(4, 2)
    is_class = torch.tensor([False, False, True, True])

    def loss_of(part):
        return ((pred[part] - target[part]) ** 2).mean()

    expected = (0 + 1 + 4 + 9) / 4 + 0.5 * (16 + 25 + 36 + 49) / 4
    assert prior_loss(loss_of, is_class, 0.5).item() == pytest.approx(expected, rel=1e-7)
    with pytest.raises(ValueError, match=r"B instance samples then B class samples, got is_class=\[True, False, True, True\]"):
        prior_loss(loss_of, torch.tensor([True, False, True, True]), 0.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(class_prompt=["a dog"]), "--class_prompt is for prior preservation: add --with_prior_preservation"),
    (dict(with_prior=True, class_prompt=["a dog"], class_data_dir="c", enable_bucket=True),
     "--with_prior_preservation does not work with --enable_bucket yet"),
    (dict(with_prior=True, class_prompt=["a dog"]), "needs --class_prompt and --class_data_dir"),
    (dict(with_prior=True, reg_data_dir="r", class_prompt=["a dog"]), "--reg_data_dir gives the class images"),
    (dict(with_prior=True, class_prompt=["a", "a"], class_data_dir="c"), "--class_prompt lists a prompt twice"),
    (dict(prior_target="base"), "--prior_target is for prior preservation: add --with_prior_preservation"),
    (dict(with_prior=True, class_prompt=["a"], class_data_dir="c", prior_target="base", train_text_encoder=True),
     "--prior_target base compares with the frozen base's predictions, .* use --prior_target noise"),
])
def test_prior_flags_that_do_not_fit_together(kwargs, message):
    given = {**dict(with_prior=False, class_data_dir=None, class_prompt=None, reg_data_dir=None, enable_bucket=False), **kwargs}
    with pytest.raises(ValueError, match=message):
        check_prior_args(**given)


# ---- --prior_target base: the class half's target is the frozen base's prediction ------------------


@pytest.fixture(scope="module")
def tiny_unet_inputs(tiny_base):
    """The tiny base's UNet, a copy with a new rank-4 LoRA (B = 0), and inputs for a batch of 2 + 2."""
    import copy

    from diffusers import UNet2DConditionModel

    from convlora import inject_lora
    from convlora.diffusion import unet_lora_config

    base = UNet2DConditionModel.from_pretrained(str(tiny_base), subfolder="unet")
    unet = copy.deepcopy(base)
    inject_lora(unet, unet_lora_config("full", rank=4))
    unet.train()  # as in training: unmerged
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, base.config.in_channels, 8, 8, generator=g)
    t = torch.tensor([10, 500, 20, 900])
    states = torch.randn(4, 7, base.config.cross_attention_dim, generator=g)
    return base, unet, x, t, states


def _prediction(model, x, t, states, part=slice(None)):
    return model(x[part], t[part], encoder_hidden_states=states[part], return_dict=False)[0]


def _base_prediction(unet, x, t, states):
    from convlora import disable_lora

    def base_prediction(part):
        assert not torch.is_grad_enabled()
        with disable_lora(unet):
            return _prediction(unet, x, t, states, part)

    return base_prediction


def test_base_targets_replace_only_the_class_half_with_the_base_prediction(tiny_unet_inputs):
    import copy

    from convlora import lora_state_dict

    base, unet, x, t, states = tiny_unet_inputs
    unet = copy.deepcopy(unet)
    with torch.no_grad():  # a trained-looking LoRA: every B non-zero
        for name, tensor in lora_state_dict(unet).items():
            if name.endswith("lora_B"):
                tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    is_class, noise = torch.tensor([False, False, True, True]), torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    targets = base_targets(noise, is_class, _base_prediction(unet, x, t, states))
    with torch.no_grad():
        expected = _prediction(base, x, t, states, slice(2, 4))
        lora_pred = _prediction(unet, x, t, states, slice(2, 4))
    assert torch.equal(targets[:2], noise[:2]) and torch.equal(targets[2:], expected)  # the base, bit for bit
    assert (lora_pred - expected).abs().max() > 1e-3  # and the LoRA does change the class samples' prediction
    with pytest.raises(ValueError, match=r"B instance samples then B class samples, got is_class=\[False, True, True, True\]"):
        base_targets(noise, torch.tensor([False, True, True, True]), _base_prediction(unet, x, t, states))
    with pytest.raises(ValueError, match=r"the base prediction has shape \(1, 4, 8, 8\), the class targets \(2, 4, 8, 8\)"):
        base_targets(noise, is_class, lambda part: noise[:1])


def test_with_base_targets_a_new_lora_has_a_class_loss_of_zero(tiny_unet_inputs):
    _, unet, x, t, states = tiny_unet_inputs  # B = 0: the LoRA's prediction is the base's
    is_class, noise = torch.tensor([False, False, True, True]), torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    targets = base_targets(noise, is_class, _base_prediction(unet, x, t, states))
    full = base_targets(noise, is_class, lambda part: _base_prediction(unet, x, t, states)(slice(None))[part])
    pred = _prediction(unet, x, t, states)
    assert torch.equal(full[2:], pred[2:].detach())  # the same batch shape: exactly the LoRA's own prediction
    losses = {}

    def loss_of(part):
        losses[part.start] = ((pred[part] - targets[part]) ** 2).mean()
        return losses[part.start]

    total = prior_loss(loss_of, is_class, 1.0)
    # 0 up to rounding: the base pass sees 2 samples, the LoRA's 4, and batch shapes change the last bits
    assert losses[2].item() < 1e-11 and total.item() == pytest.approx(losses[0].item(), rel=1e-9) and losses[0].item() > 1e-3
    total.backward()
    grads = [p.grad for n, p in unet.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)  # the instance half still trains the LoRA
    unet.zero_grad(set_to_none=True)
