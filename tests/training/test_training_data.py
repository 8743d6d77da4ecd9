"""convlora.training.data: folders and datasets, captions, bad items, preprocessing, determinism, latent cache."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from convlora.diffusion.tiny import load_tiny_tokenizer
from convlora.training.data import (
    DataError,
    EpochShuffleSampler,
    SampleKey,
    TextImageDataset,
    cache_latents,
    clip_tokenize,
    collate,
    load_hf_source,
    preprocess_image,
    read_image_folder,
    resized_size,
    sample_seed,
    write_toy_dataset,
)


def _image(path, size=(40, 30), value=128):
    arr = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    arr[: size[1] // 2] = 255 - value  # top half differs, so crops and flips are visible
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def tokenize():
    return clip_tokenize(load_tiny_tokenizer())


# ---- folders ------------------------------------------------------------------------------------


def test_metadata_jsonl_folder(tmp_path):
    write_toy_dataset(tmp_path, n=5, size=16, caption="a photo of a sks ball")
    source = read_image_folder(tmp_path)
    assert len(source) == 5
    assert all(item.captions == ("a photo of a sks ball",) for item in source.items)
    assert [item.image.name for item in source.items] == [f"{i:04d}.png" for i in range(5)]


def test_metadata_custom_caption_column_and_list_captions(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "prompt": ["one", "two"]}) + "\n")
    with pytest.raises(DataError, match=r"metadata.jsonl:1 has no 'text'.*--caption_column"):
        read_image_folder(tmp_path)
    assert read_image_folder(tmp_path, caption_column="prompt")[0].captions == ("one", "two")


def test_metadata_csv_folder(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,a photo of a cat\n")
    assert read_image_folder(tmp_path)[0].captions == ("a photo of a cat",)


@pytest.mark.parametrize("ext", [".txt", ".caption"])
def test_sidecar_captions_recursive(tmp_path, ext):
    (tmp_path / "sub").mkdir()
    for name in ("x", "sub/y"):
        _image(tmp_path / f"{name}.jpg")
        (tmp_path / f"{name}{ext}").write_text(f"caption of {name}\n")
    source = read_image_folder(tmp_path)
    assert sorted(item.captions[0] for item in source.items) == ["caption of sub/y", "caption of x"]


def test_empty_or_missing_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_image_folder(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images"):
        read_image_folder(tmp_path)


def test_image_without_caption_is_an_error_when_many(tmp_path):
    for i in range(3):
        _image(tmp_path / f"{i}.png")
    (tmp_path / "0.txt").write_text("only one has a caption")
    with pytest.raises(DataError, match=r"(?s)2 of 3 training items.*1.png \(no metadata.jsonl and no .txt/.caption file\)"):
        read_image_folder(tmp_path)


def test_a_few_bad_items_among_many_are_named_and_skipped(tmp_path):
    write_toy_dataset(tmp_path, n=20, size=16)
    (tmp_path / "0003.png").write_bytes(b"not a png at all")
    with pytest.warns(UserWarning, match=r"skipping 1 of 20 .*0003.png \(unreadable"):
        source = read_image_folder(tmp_path)
    assert len(source) == 19 and all(item.image.name != "0003.png" for item in source.items)


def test_truncated_image_is_found_before_training(tmp_path):
    write_toy_dataset(tmp_path, n=2, size=16)
    data = (tmp_path / "0001.png").read_bytes()
    (tmp_path / "0001.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"0001.png \(unreadable"):
        read_image_folder(tmp_path)


def test_metadata_problems_are_named(tmp_path):
    write_toy_dataset(tmp_path, n=2, size=16)
    lines = (tmp_path / "metadata.jsonl").read_text().splitlines()
    (tmp_path / "metadata.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(DataError, match=r"metadata.jsonl:2 is not valid JSON"):
        read_image_folder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text(lines[0] + "\n" + json.dumps({"file_name": "missing.png", "text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"(?s)missing.png \(listed on line 2 of metadata.jsonl, file not found\).*0001.png \(no caption"):
        read_image_folder(tmp_path)


# ---- `datasets` ---------------------------------------------------------------------------------


def _hf_dataset(n=3):
    import datasets

    images = [Image.fromarray(np.full((20, 30, 3), 40 * i, dtype=np.uint8)) for i in range(n)]
    return datasets.Dataset.from_dict({"image": images, "caption": [f"cap {i}" for i in range(n)]}).cast_column(
        "image", datasets.Image()
    )


def test_dataset_from_local_parquet_folder_and_save_to_disk(tmp_path):
    ds = _hf_dataset()
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    ds.save_to_disk(str(tmp_path / "disk"))
    for path in (tmp_path / "pq", tmp_path / "disk"):
        source = load_hf_source(str(path), caption_column="caption")
        assert len(source) == 3
        item = source[2]
        assert item.captions == ("cap 2",) and isinstance(item.image, Image.Image) and item.image.size == (30, 20)


def test_dataset_column_errors_list_the_columns(tmp_path):
    _hf_dataset().save_to_disk(str(tmp_path / "disk"))
    with pytest.raises(DataError, match=r"--caption_column value 'text' needs to be one of: image, caption"):
        load_hf_source(str(tmp_path / "disk"))


# ---- preprocessing and determinism --------------------------------------------------------------


def test_resize_crop_flip_shapes_and_values():
    image = Image.fromarray(np.arange(60 * 40 * 3, dtype=np.uint8).reshape(40, 60, 3) % 251)
    assert resized_size(60, 40, 20) == (30, 20)
    out = preprocess_image(image, 20, center_crop=True, flip=False)
    assert out.shape == (3, 20, 20) and out.dtype == torch.float32
    assert -1.0 <= float(out.min()) and float(out.max()) <= 1.0
    flipped = preprocess_image(image, 20, center_crop=True, flip=True)
    assert torch.equal(flipped, out.flip(-1))
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(preprocess_image(image, 20, False, False, gen_a), preprocess_image(image, 20, False, False, gen_b))
    offsets = {tuple(preprocess_image(image, 20, False, False, torch.Generator().manual_seed(s))[0, 0, :3].tolist()) for s in range(8)}
    assert len(offsets) > 1  # random crops of a wider image move


def test_samples_depend_only_on_seed_epoch_and_index(tmp_path, tokenize):
    write_toy_dataset(tmp_path, n=6, size=24)
    make = lambda seed: TextImageDataset(read_image_folder(tmp_path), tokenize, 16, random_flip=True, seed=seed)  # noqa: E731
    a, b = make(0), make(0)
    a.set_epoch(3)
    b.set_epoch(3)
    for i in (5, 0, 2):  # any access order
        assert torch.equal(a[i]["pixel_values"], b[i]["pixel_values"])
        assert int(a[i]["index"]) == i
    flips = []
    for epoch in range(12):
        a.set_epoch(epoch)
        flips.append(a.choices(1)["flip"])
    assert 0 < sum(flips) < 12  # the flip changes between epochs
    def flips(ds):
        out = []
        for epoch in range(4):
            ds.set_epoch(epoch)
            out += [ds.choices(i)["flip"] for i in range(6)]
        return out

    assert flips(make(1)) != flips(make(0))  # another seed, other choices


def test_caption_dropout_and_caption_choice(tmp_path, tokenize):
    _image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": ["one", "two"]}) + "\n")
    source = read_image_folder(tmp_path)
    ds = TextImageDataset(source, tokenize, 16, caption_dropout=0.3, seed=0)
    seen = []
    for epoch in range(400):
        ds.set_epoch(epoch)
        seen.append(ds.caption_for(source[0], ds.choices(0)))
    share_empty = seen.count("") / len(seen)
    assert 0.22 < share_empty < 0.38
    assert {"one", "two", ""} == set(seen)
    empty_ids = tokenize([""])[0]
    ds.set_epoch(seen.index(""))
    assert torch.equal(ds[0]["input_ids"], empty_ids)


def test_epoch_sampler_is_a_seeded_permutation_of_keys_that_carry_the_epoch():
    s = EpochShuffleSampler(10, seed=4)
    first = list(s)
    assert sorted(k.index for k in first) == list(range(10)) and first == list(s)
    assert {k.epoch for k in first} == {0}
    s.set_epoch(1)
    assert [k.index for k in s] != [k.index for k in first] and {k.epoch for k in s} == {1}
    other = EpochShuffleSampler(10, seed=4)
    other.set_epoch(1)
    assert list(other) == list(s)
    assert [k.index for k in EpochShuffleSampler(4, seed=4, shuffle=False)] == [0, 1, 2, 3]


def test_a_sample_key_brings_its_epoch_whatever_epoch_the_dataset_holds(tmp_path, tokenize):
    write_toy_dataset(tmp_path, n=4, size=24)
    ds = TextImageDataset(read_image_folder(tmp_path), tokenize, 16, random_flip=True, caption_dropout=0.5, seed=0)
    ds.set_epoch(3)
    by_int = [ds[i] for i in range(4)]
    ds.set_epoch(0)
    by_key = [ds[SampleKey(3, i)] for i in range(4)]
    for a, b in zip(by_int, by_key):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_sample_seed_streams_are_distinct_and_stable():
    assert sample_seed(0, "noise", 1, 2) == sample_seed(0, "noise", 1, 2)
    seeds = {sample_seed(0, "noise", e, i) for e in range(5) for i in range(50)} | {sample_seed(0, "data", 0, 0)}
    assert len(seeds) == 251
    assert 0 <= sample_seed(2**40, "x") < 2**63


def test_collate_stacks():
    batch = collate([{"pixel_values": torch.zeros(3, 4, 4), "input_ids": torch.zeros(7, dtype=torch.long), "index": torch.tensor(i)}
                     for i in range(2)])
    assert batch["pixel_values"].shape == (2, 3, 4, 4) and batch["index"].tolist() == [0, 1]


# ---- latent cache -------------------------------------------------------------------------------


def test_cached_latents_equal_encoding_every_step(tmp_path, tokenize):
    write_toy_dataset(tmp_path, n=5, size=16)
    ds = TextImageDataset(read_image_folder(tmp_path), tokenize, 16, center_crop=True, random_flip=True, seed=0)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 4, stride=4)

    def encode(pixels):
        h = conv(pixels)
        return h[:, :4], h[:, 4:].exp()

    with torch.no_grad():
        cache = cache_latents(ds, encode, batch_size=2)
        ds.set_epoch(2)
        plain = [ds[i] for i in range(5)]
        ds.use_cached_latents(cache)
        cached = [ds[i] for i in range(5)]
        for p, c in zip(plain, cached):
            mean, std = encode(p["pixel_values"][None])
            assert torch.allclose(c["latent_mean"], mean[0], atol=1e-6) and torch.allclose(c["latent_std"], std[0], atol=1e-6)
            assert torch.equal(c["input_ids"], p["input_ids"]) and "pixel_values" not in c
            assert torch.equal(c["time_ids"], p["time_ids"])  # the same crop, recorded the same way
    assert len(cache["plain_mean"]) == 5 and cache["plain_mean"][0].shape == (4, 4, 4) and "flipped_mean" in cache


def test_cache_latents_refuses_random_crops_of_non_square_images(tmp_path, tokenize):
    _image(tmp_path / "wide.png", size=(40, 20))
    _image(tmp_path / "square.png", size=(20, 20))
    for name in ("wide", "square"):
        (tmp_path / f"{name}.txt").write_text("x")
    ds = TextImageDataset(read_image_folder(tmp_path), tokenize, 16, center_crop=False)
    with pytest.raises(DataError, match=r"--cache_latents with random cropping: 1 image\(s\).*wide.png.*--center_crop"):
        cache_latents(ds, lambda p: (p, p))
    ds.center_crop = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache_latents(ds, lambda p: (p, p))


# ---- malformed caption files and metadata: named errors, never a traceback -----------------------


@pytest.mark.parametrize("where", ["metadata.jsonl", "metadata.csv", "sidecar"])
def test_invalid_utf8_is_a_data_error_naming_the_file_and_byte(tmp_path, where):
    _image(tmp_path / "a.png")
    bad = "caption caf\xe9".encode("latin-1")  # é in Latin-1: not UTF-8
    if where == "metadata.jsonl":
        target = tmp_path / where
        target.write_bytes(b'{"file_name": "a.png", "text": "' + bad + b'"}\n')
    elif where == "metadata.csv":
        target = tmp_path / where
        target.write_bytes(b"file_name,text\na.png," + bad + b"\n")
    else:
        target = tmp_path / "a.txt"
        target.write_bytes(bad)
    offset = bad.index(b"\xe9") + (target.read_bytes().index(bad) if where != "sidecar" else 0)
    with pytest.raises(DataError, match=rf"{target.name} is not valid UTF-8 \(byte {offset}: b'\\xe9"):
        read_image_folder(tmp_path)


@pytest.mark.parametrize("file_name", [5, None, "", ["a.png"], "/abs/a.png"])
def test_file_name_that_is_not_a_relative_path_is_a_data_error(tmp_path, file_name):
    _image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": file_name, "text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"metadata.jsonl:1: file_name must be a non-empty path relative to the folder, got "):
        read_image_folder(tmp_path)
