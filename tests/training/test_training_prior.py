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
])
def test_prior_flags_that_do_not_fit_together(kwargs, message):
    given = {**dict(with_prior=False, class_data_dir=None, class_prompt=None, reg_data_dir=None, enable_bucket=False), **kwargs}
    with pytest.raises(ValueError, match=message):
        check_prior_args(**given)
