"""Resuming mid-epoch, in process (fast): the batches a resumed run trains on are the straight run's.

The data path is the training script's own: TextImageDataset + EpochShuffleSampler in a DataLoader,
prepared by accelerate (one process, and sharded as for two), then :func:`epoch_loader` per epoch.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from PIL import Image

from convlora.diffusion.tiny import load_tiny_tokenizer
from convlora.training.data import EpochShuffleSampler, TextImageDataset, clip_tokenize, collate, epoch_loader, read_image_folder

N_IMAGES, BATCH, EPOCHS = 12, 2, 3


@pytest.fixture(scope="module")
def wide_images(tmp_path_factory):
    """12 non-square images (so a random crop moves) with two captions each."""
    folder = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
        lines.append(json.dumps({"file_name": f"{i:02d}.png", "text": [f"photo {i}", f"picture {i}"]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _loader(folder, tokenize, seed=0):
    """A fresh run's dataloader, as the training script builds it: every random feature on."""
    dataset = TextImageDataset(read_image_folder(folder), tokenize, 16, center_crop=False, random_flip=True,
                               caption_dropout=0.3, seed=seed)
    return torch.utils.data.DataLoader(dataset, sampler=EpochShuffleSampler(len(dataset), seed=seed),
                                       batch_size=BATCH, collate_fn=collate)


def _batches(loader, epoch, skip=0):
    return list(epoch_loader(loader, epoch, skip))


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def tokenize():
    return clip_tokenize(load_tiny_tokenizer())


def test_resume_mid_way_through_a_later_epoch_sees_the_straight_runs_batches(wide_images, tokenize):
    accelerator = Accelerator()  # as the script makes it for one process
    straight = accelerator.prepare(_loader(wide_images, tokenize))
    per_epoch = [_batches(straight, epoch) for epoch in range(EPOCHS)]
    # the draws do change between epochs (or this test could not tell epochs apart)
    assert not torch.equal(per_epoch[0][0]["pixel_values"], per_epoch[2][0]["pixel_values"])
    for epoch, skip in ((2, 2), (1, 5)):
        resumed = accelerator.prepare(_loader(wide_images, tokenize))  # a new process: nothing iterated yet
        _assert_same(_batches(resumed, epoch, skip), per_epoch[epoch][skip:])
        # and the epochs after the resumed one go on as in the straight run
        _assert_same(_batches(resumed, epoch + 1), per_epoch[epoch + 1] if epoch + 1 < EPOCHS else _batches(straight, epoch + 1))


def test_resume_of_a_loader_sharded_over_two_processes(wide_images, tokenize):
    for rank in (0, 1):
        def shard():
            return prepare_data_loader(_loader(wide_images, tokenize), num_processes=2, process_index=rank, put_on_device=False)

        straight = shard()
        per_epoch = [_batches(straight, epoch) for epoch in range(EPOCHS)]
        _assert_same(_batches(shard(), 2, 1), per_epoch[2][1:])
        # each process's samples are the ones one process draws for that epoch (accelerate's own
        # set_epoch does not reach the dataset of a sharded loader)
        reference = _loader(wide_images, tokenize).dataset
        reference.set_epoch(1)
        for batch in per_epoch[1]:
            for row, index in enumerate(batch["index"].tolist()):
                expected = reference[index]
                assert all(torch.equal(batch[k][row], expected[k]) for k in expected)
