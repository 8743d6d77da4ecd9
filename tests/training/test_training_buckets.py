"""Aspect-ratio buckets: kohya's bucket list, assignment, resize + crop into the bucket (recorded in
the time ids), and batches drawn per bucket that shard under accelerate like one big batch."""

from __future__ import annotations

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from PIL import Image

from convlora.training.buckets import BucketBatchSampler, bucket_resolutions, check_bucket_args, select_bucket
from convlora.training.data import TextImageDataset, clip_tokenize, crop_and_resize, read_image_folder


@pytest.fixture(scope="module")
def tokenize():
    from convlora.diffusion.tiny import load_tiny_tokenizer

    return clip_tokenize(load_tiny_tokenizer())


def test_bucket_list_is_kohyas_for_512():
    # kohya make_bucket_resolutions((512, 512), 256, 1024, 64), worked out by hand: width w gets
    # height min(1024, floor(512*512 / w / 64) * 64), both orientations, plus the square.
    buckets = bucket_resolutions(512, 256, 1024, 64)
    one_side = [(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (704, 320), (832, 256), (896, 256), (960, 256)]
    assert set(buckets) == set(one_side) | {(h, w) for w, h in one_side}
    assert len(buckets) == 17 and buckets == sorted(buckets)
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)


@pytest.mark.parametrize(
    "args, message",
    [
        ((512, 256, 1024, 0), "--bucket_reso_steps must be >= 1"),
        ((512, 250, 1024, 64), "--min_bucket_reso 250 must be a positive multiple of --bucket_reso_steps 64"),
        ((2048, 256, 1024, 64), "--resolution 2048 must lie between"),
    ],
)
def test_bad_bucket_settings_name_the_flag(args, message):
    with pytest.raises(ValueError, match=message):
        check_bucket_args(*args)


def test_select_bucket_by_nearest_aspect_ratio():
    buckets = bucket_resolutions(512, 256, 1024, 64)
    assert select_bucket(600, 400, buckets) == (640, 384)  # 1.5: 640/384 = 1.67 beats 576/448 = 1.29
    assert select_bucket(384, 640, buckets) == (384, 640)  # its own size is a bucket
    assert select_bucket(100, 100, buckets) == (512, 512)  # small images are scaled up into a bucket


def test_resize_and_crop_into_a_bucket_records_the_crop():
    image = Image.new("RGB", (600, 400))
    pixels, time_ids = crop_and_resize(image, (640, 384), center_crop=True, flip=False)
    # 600x400 covers 640x384 at 640x427 (the width fits); the centre crop starts 21 rows down
    assert pixels.shape == (3, 384, 640)
    assert time_ids.tolist() == [400, 600, 21, 0, 384, 640]
    wide = Image.new("RGB", (900, 300))
    _, plain = crop_and_resize(wide, (512, 256), center_crop=False, flip=False, generator=torch.Generator().manual_seed(0))
    _, flipped = crop_and_resize(wide, (512, 256), center_crop=False, flip=True, generator=torch.Generator().manual_seed(0))
    # 900x300 -> 768x256; the same random crop, measured from the left of the flipped image
    top, left = plain.tolist()[2:4]
    assert top == 0 and 0 <= left <= 256 and flipped.tolist()[2:4] == [0, 768 - left - 512]


def _sizes():
    return [(64, 32)] * 5 + [(32, 64)] * 3 + [(48, 48)] * 4


def test_batches_come_from_one_bucket_and_cover_every_image_each_epoch():
    sizes = _sizes()
    sampler = BucketBatchSampler(sizes, batch_size=2, num_processes=1, seed=0)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        keys = list(sampler)
        assert {key.epoch for batch in keys for key in batch} == {epoch}  # each key brings its epoch
        batches = [[key.index for key in batch] for batch in keys]
        assert len(batches) == len(sampler) == 3 + 2 + 2  # ceil(5/2) + ceil(3/2) + ceil(4/2)
        assert all(len({sizes[i] for i in batch}) == 1 and len(batch) == 2 for batch in batches)
        assert {i for batch in batches for i in batch} == set(range(12))
    sampler.set_epoch(0)
    again = BucketBatchSampler(sizes, batch_size=2, num_processes=1, seed=0)
    assert list(again) == list(sampler)  # (seed, epoch) decides everything
    sampler.set_epoch(1)
    assert list(sampler) != list(again)
    assert list(BucketBatchSampler(sizes, 2, 1, seed=1)) != list(again)


@pytest.mark.parametrize("batch_size, num_processes", [(1, 2), (2, 2), (1, 3)])
def test_n_processes_draw_the_batches_of_one_process_with_n_times_the_batch(batch_size, num_processes):
    sizes = _sizes()
    single = BucketBatchSampler(sizes, batch_size * num_processes, 1, seed=5)
    sharded = BucketBatchSampler(sizes, batch_size, num_processes, seed=5)
    for epoch in (0, 1):
        single.set_epoch(epoch)
        sharded.set_epoch(epoch)
        # what accelerate hands each process
        shards = [list(BatchSamplerShard(sharded, num_processes, k)) for k in range(num_processes)]
        assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(sharded) // num_processes
        joined = [sum(parts, []) for parts in zip(*shards)]
        assert joined == list(single)


def test_dataset_trains_each_image_at_its_bucket(tmp_path, tokenize):
    for name, size in (("wide", (96, 48)), ("tall", (40, 80)), ("square", (50, 50))):
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(name)
    source = read_image_folder(tmp_path)
    buckets = bucket_resolutions(32, 16, 64, 8)
    targets = [select_bucket(*Image.open(source[i].image).size, buckets) for i in range(len(source))]
    ds = TextImageDataset(source, tokenize, 32, center_crop=True, target_sizes=targets)
    shapes = {source[i].name.rsplit("/", 1)[-1]: (tuple(ds[i]["pixel_values"].shape), ds[i]["time_ids"].tolist()) for i in range(3)}
    assert shapes["square.png"] == ((3, 32, 32), [50, 50, 0, 0, 32, 32])
    # buckets of 32x32 = 1024 px, sides multiples of 8: tall 40x80 (aspect 0.5) -> 24x40 (0.6),
    # resized to 24x48, 4 rows cropped off the top; wide 96x48 (2.0) -> 40x24, 48x24, 4 columns off
    assert shapes["tall.png"] == ((3, 40, 24), [80, 40, 4, 0, 40, 24])
    assert shapes["wide.png"] == ((3, 24, 40), [48, 96, 0, 4, 24, 40])
