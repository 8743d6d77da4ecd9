"""Aspect-ratio bucketing: train each image near its own aspect ratio instead of a centre square.

The rule is kohya sd-scripts' (``--enable_bucket``, ``--min_bucket_reso``, ``--max_bucket_reso``,
``--bucket_reso_steps``), in pixels:

* **Buckets** (:func:`bucket_resolutions`): for every width ``w`` from ``min_reso`` to ``max_reso``
  in steps of ``steps``, the height ``h = min(max_reso, floor(R*R / w / steps) * steps)`` (kept if at
  least ``min_reso``), both ``(w, h)`` and ``(h, w)``, plus the square ``floor(R / steps) * steps``.
  So every bucket holds at most ``R*R`` pixels (``R`` = ``--resolution``) and about that many.
* **Assignment** (:func:`select_bucket`): an image goes to the bucket whose aspect ratio is
  nearest its own (its own size, if that is a bucket); it is then resized to cover the bucket and
  cropped into it (:func:`convlora.training.data.crop_and_resize`), the crop recorded in SDXL's
  time ids.
* **Batches** (:class:`BucketBatchSampler`): every batch comes from one bucket. Each epoch the
  members of each bucket are shuffled, split into *global* batches of ``batch_size x
  num_processes`` (a bucket's last batch is filled up with its own first members, as
  ``DistributedSampler`` pads), the global batches are shuffled, and each is yielded as
  ``num_processes`` consecutive per-process batches -- accelerate hands batch ``k`` of every
  ``num_processes`` to process ``k``. Everything depends only on ``(seed, epoch)``, so N processes
  at batch B train exactly the batches of one process at batch N*B, and a resumed run (which skips
  the first batches of its epoch) the batches of a straight one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from convlora.training.data import SampleKey, sample_generator

__all__ = ["BucketBatchSampler", "bucket_resolutions", "check_bucket_args", "select_bucket"]


def check_bucket_args(resolution: int, min_reso: int, max_reso: int, steps: int) -> None:
    """Raise ``ValueError`` naming the flag when the bucket settings cannot work together."""
    if steps < 1:
        raise ValueError(f"--bucket_reso_steps must be >= 1, got {steps}")
    for flag, value in (("--min_bucket_reso", min_reso), ("--max_bucket_reso", max_reso)):
        if value < steps or value % steps:
            raise ValueError(f"{flag} {value} must be a positive multiple of --bucket_reso_steps {steps}")
    if not min_reso <= resolution <= max_reso:
        raise ValueError(
            f"--resolution {resolution} must lie between --min_bucket_reso {min_reso} and --max_bucket_reso {max_reso}"
        )


def bucket_resolutions(resolution: int, min_reso: int, max_reso: int, steps: int) -> list[tuple[int, int]]:
    """The ``(width, height)`` buckets for a ``resolution``-square pixel budget, sorted.

    Raises:
        ValueError: the settings do not fit together (:func:`check_bucket_args`).
    """
    check_bucket_args(resolution, min_reso, max_reso, steps)
    area = resolution * resolution
    side = resolution // steps * steps
    buckets = {(side, side)}
    for width in range(min_reso, max_reso + 1, steps):
        height = min(max_reso, area // width // steps * steps)
        if height >= min_reso:
            buckets.update({(width, height), (height, width)})
    return sorted(buckets)


def select_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket for a ``width`` x ``height`` image: its own size if that is a bucket, else the
    one with the nearest aspect ratio (the first of equals, in ``buckets`` order)."""
    if (width, height) in buckets:
        return (width, height)
    ratio = width / height
    return min(buckets, key=lambda b: abs(b[0] / b[1] - ratio))


class BucketBatchSampler(Sampler[list[SampleKey]]):
    """Per-process batches of :class:`~convlora.training.data.SampleKey` s (epoch, dataset index),
    each from one bucket (see the module docstring).

    Args:
        target_sizes: each item's bucket, ``(width, height)``, indexed like the dataset.
        batch_size: samples per process and batch.
        num_processes: processes that share each global batch (1 for a single process).
        seed: the run's seed.
    """

    def __init__(self, target_sizes: Sequence[tuple[int, int]], batch_size: int, num_processes: int, seed: int) -> None:
        if batch_size < 1 or num_processes < 1:
            raise ValueError(f"batch_size and num_processes must be >= 1, got {batch_size}, {num_processes}")
        self.buckets: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(target_sizes):
            self.buckets.setdefault(tuple(size), []).append(index)
        self.buckets = dict(sorted(self.buckets.items()))
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_processes

    def global_batches(self) -> list[list[int]]:
        """This epoch's global batches (``batch_size x num_processes`` indices each), in training order."""
        size, batches = self.global_batch_size, []
        for bucket_id, members in enumerate(self.buckets.values()):
            order = torch.randperm(len(members), generator=sample_generator(self.seed, "bucket", self.epoch, bucket_id))
            shuffled = [members[i] for i in order.tolist()]
            n_batches = -(-len(shuffled) // size)
            filled = (shuffled * -(-n_batches * size // len(shuffled)))[: n_batches * size]
            batches += [filled[i : i + size] for i in range(0, len(filled), size)]
        order = torch.randperm(len(batches), generator=sample_generator(self.seed, "bucket-order", self.epoch))
        return [batches[i] for i in order.tolist()]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for batch in self.global_batches():
            for start in range(0, len(batch), self.batch_size):
                yield [SampleKey(self.epoch, i) for i in batch[start : start + self.batch_size]]

    def __len__(self) -> int:
        """Per-process batches of all processes together (a multiple of ``num_processes``)."""
        size = self.global_batch_size
        return sum(-(-len(m) // size) for m in self.buckets.values()) * self.num_processes
