"""Training data for text-to-image LoRA: captioned images from a folder or a `datasets` dataset.

Where captions come from (checked in this order):
    * ``metadata.jsonl`` in the folder: one JSON object per line with ``file_name`` (relative to the
      folder) and the caption column (default ``text``) -- the diffusers / HF ``imagefolder``
      convention. ``metadata.csv`` with the same columns works too.
    * otherwise a sidecar file per image with the same stem: ``photo.png`` + ``photo.txt`` or
      ``photo.caption`` -- the kohya convention.
    * a `datasets` dataset by hub name or local path (:func:`load_hf_source`).

Every random choice for one sample (crop offset, flip, caption dropout, which caption of several)
is drawn from a generator seeded by ``(seed, epoch, dataset index)`` (:func:`sample_seed`), so a
sample is the same whatever batch, process or resumed run it lands in. That is what makes a
resumed run and a multi-process run equal to a straight single-process one.

The epoch travels with the index: :class:`EpochShuffleSampler` hands out :class:`SampleKey`
``(epoch, index)`` pairs, and the dataset draws from the key's epoch, never from state a loader
has to remember to update. (accelerate 1.15's ``DataLoaderShard.set_epoch`` does not reach the
dataset of a loader made by ``skip_first_batches`` or sharded over processes, so a dataset-held
epoch went stale there.) :func:`epoch_loader` sets the epoch on every sampler under a loader.

Shapes (H x W: the ``resolution`` square, or the image's aspect-ratio bucket):
    ``pixel_values``  (3, H, W) float32 in [-1, 1]
    ``input_ids``     (tokenizer.model_max_length,) int64 (SDXL adds ``input_ids_2``)
    ``time_ids``      (6,) int64: original (h, w), crop (top, left), target (h, w) -- SDXL's micro-conditioning
    cached latents    ``latent_mean`` / ``latent_std`` (C, H/f, W/f) float32
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTENSIONS = (".txt", ".caption")
#: A folder may hold up to this share of bad items (unreadable image, no caption); they are named
#: in a warning and skipped. More than that, and it is an error.
MAX_BAD_FRACTION = 0.1


class DataError(ValueError):
    """The training data cannot be used as given (the message names the files or rows)."""


def sample_seed(seed: int, purpose: str, *keys: int) -> int:
    """A 63-bit seed derived from ``seed``, a purpose name and integer keys (epoch, index, ...).

    Independent streams for different purposes/keys; identical on every machine and process.
    """
    words = [int(seed) & 0xFFFFFFFF, *(int(b) for b in purpose.encode()), *(int(k) for k in keys)]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)


def sample_generator(seed: int, purpose: str, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`sample_seed`."""
    return torch.Generator().manual_seed(sample_seed(seed, purpose, *keys))


# ---- sources: where (image, caption) pairs come from --------------------------------------------


@dataclass(frozen=True)
class Item:
    """One training example before preprocessing."""

    image: Any
    """A path, or an already decoded ``PIL.Image`` (from a `datasets` dataset)."""
    captions: tuple[str, ...]
    """One or more captions; one is picked per epoch when there are several."""
    name: str
    """How to name the item in messages (a path or ``row 12``)."""


class ItemSource:
    """A sized, indexable collection of :class:`Item` (``source[i]``)."""

    description: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Item:
        raise NotImplementedError


class ListSource(ItemSource):
    """Items held in a list (what :func:`read_image_folder` returns)."""

    def __init__(self, items: Sequence[Item], description: str = "") -> None:
        self.items = list(items)
        self.description = description

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Item:
        return self.items[index]


def read_image_folder(
    folder: str | Path,
    caption_column: str = "text",
    check_images: bool = True,
    max_bad_fraction: float = MAX_BAD_FRACTION,
) -> ListSource:
    """Collect captioned images from ``folder`` (``metadata.jsonl`` / ``.csv``, else sidecar captions).

    Args:
        folder: the image folder (searched recursively when captions are sidecar files).
        caption_column: the caption key in ``metadata.jsonl`` / ``metadata.csv``.
        check_images: decode every image once now, so a broken file is found before training.
        max_bad_fraction: up to this share of bad items is skipped with a warning naming them.

    Raises:
        DataError: the folder is missing or holds no images; ``metadata.jsonl`` is malformed or lacks
            ``file_name`` / the caption column; or more than ``max_bad_fraction`` of the items are bad
            (unreadable image, image without a caption, listed file missing). Each is named.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"training data folder not found: {root}")
    metadata_files = [root / "metadata.jsonl", root / "metadata.csv"]
    metadata = next((m for m in metadata_files if m.is_file()), None)
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}")

    items: list[Item] = []
    bad: list[str] = []
    if metadata is not None:
        rows = _read_metadata(metadata, caption_column)
        listed = set()
        for line_no, row in rows:
            path = root / row["file_name"]
            listed.add(path.resolve())
            caption = row[caption_column]
            captions = _as_captions(caption)
            if not path.is_file():
                bad.append(f"{row['file_name']} (listed on line {line_no} of {metadata.name}, file not found)")
            elif not captions:
                bad.append(f"{row['file_name']} (empty caption on line {line_no} of {metadata.name})")
            else:
                items.append(Item(path, captions, str(path)))
        unlisted = [p for p in images if p.resolve() not in listed]
        bad += [f"{p.relative_to(root)} (no caption: not listed in {metadata.name})" for p in unlisted]
        source = f"{root} ({metadata.name})"
    else:
        for path in images:
            caption_file = next((path.with_suffix(ext) for ext in CAPTION_EXTENSIONS if path.with_suffix(ext).is_file()), None)
            caption = read_text(caption_file, "caption file").strip() if caption_file is not None else ""
            if not caption:
                why = "empty caption file" if caption_file is not None else f"no metadata.jsonl and no {'/'.join(CAPTION_EXTENSIONS)} file"
                bad.append(f"{path.relative_to(root)} ({why})")
            else:
                items.append(Item(path, (caption,), str(path)))
        source = f"{root} (sidecar captions)"

    if check_images:
        readable = []
        for item in items:
            problem = _image_problem(item.image)
            if problem is None:
                readable.append(item)
            else:
                bad.append(f"{_shown(item.image, root)} (unreadable: {problem})")
        items = readable
    _check_bad_items(items, bad, source, max_bad_fraction)
    return ListSource(items, description=source)


def _shown(path: Path, root: Path) -> str:
    path = Path(path)
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _read_metadata(path: Path, caption_column: str) -> list[tuple[int, dict]]:
    rows: list[tuple[int, dict]] = []
    if path.suffix == ".jsonl":
        for line_no, line in enumerate(read_text(path, "metadata file").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no} is not a JSON object")
            rows.append((line_no, row))
    else:
        text = io.StringIO(read_text(path, "metadata file"), newline="")
        rows = [(line_no, row) for line_no, row in enumerate(csv.DictReader(text), start=2)]
    for line_no, row in rows:
        missing = [k for k in ("file_name", caption_column) if k not in row]
        if missing:
            raise DataError(
                f"{path}:{line_no} has no {' / '.join(repr(m) for m in missing)} "
                f"(keys: {sorted(row, key=str)}); set --caption_column to the caption key"
            )
        name = row["file_name"]
        if not isinstance(name, str) or not name.strip() or Path(name).is_absolute():
            raise DataError(f"{path}:{line_no}: file_name must be a non-empty path relative to the folder, got {name!r}")
    if not rows:
        raise DataError(f"{path} lists no images")
    return rows


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``.

    Raises:
        DataError: the file is not valid UTF-8 (the byte offset is named) or cannot be read.
    """
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{what} {path} is not valid UTF-8 (byte {err.start}: {err.object[err.start:err.start + 4]!r}); "
                        "save it as UTF-8") from None
    except OSError as err:
        raise DataError(f"cannot read {what} {path}: {err.strerror or err}") from None


def _as_captions(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value.strip(),) if value.strip() else ()
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(str(v).strip() for v in value if isinstance(v, str) and v.strip())
    return ()


def _image_problem(path: Path) -> str | None:
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as err:  # PIL raises several kinds (UnidentifiedImageError, OSError, SyntaxError)
        return f"{type(err).__name__}: {err}"
    return None


def _check_bad_items(items: list, bad: list[str], source: str, max_bad_fraction: float) -> None:
    total = len(items) + len(bad)
    if bad and (not items or len(bad) > max_bad_fraction * total):
        shown = "\n  ".join(bad[:20]) + (f"\n  ... ({len(bad) - 20} more)" if len(bad) > 20 else "")
        raise DataError(
            f"{len(bad)} of {total} training items in {source} cannot be used "
            f"(more than {max_bad_fraction:.0%}, so this is not skipped):\n  {shown}"
        )
    if bad:
        warnings.warn(
            f"skipping {len(bad)} of {total} training items in {source}: " + "; ".join(bad[:20]),
            stacklevel=3,
        )


class HFSource(ItemSource):
    """Rows of a `datasets.Dataset` with an image column and a caption column."""

    def __init__(self, dataset: Any, image_column: str, caption_column: str, description: str = "") -> None:
        columns = list(dataset.column_names)
        for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
            if column not in columns:
                raise DataError(f"{flag} value {column!r} needs to be one of: {', '.join(columns)}")
        if len(dataset) == 0:
            raise DataError(f"the dataset {description} is empty")
        self.dataset = dataset
        self.image_column = image_column
        self.caption_column = caption_column
        self.description = description

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Item:
        row = self.dataset[int(index)]
        captions = _as_captions(row[self.caption_column])
        if not captions:
            raise DataError(f"{self.description} row {index}: caption column {self.caption_column!r} is empty or not text")
        return Item(row[self.image_column], captions, f"{self.description} row {index}")


def load_hf_source(
    name_or_path: str,
    config_name: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    data_dir: str | None = None,
    cache_dir: str | None = None,
    split: str = "train",
) -> HFSource:
    """A `datasets` dataset by hub name, local dataset folder, or ``save_to_disk`` folder.

    Raises:
        DataError: no ``split`` split, or the columns are not there (the existing ones are listed).
    """
    import datasets

    path = Path(name_or_path)
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
    else:
        loaded = datasets.load_dataset(name_or_path, config_name, data_dir=data_dir, cache_dir=cache_dir)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"dataset {name_or_path} has no {split!r} split (splits: {', '.join(loaded)})")
        loaded = loaded[split]
    return HFSource(loaded, image_column, caption_column, description=f"dataset {name_or_path}")


# ---- preprocessing ------------------------------------------------------------------------------


def load_rgb(image: Any, name: str = "image") -> Image.Image:
    """Open (if a path) and convert to RGB, applying the EXIF orientation.

    Raises:
        DataError: naming the file, if it cannot be decoded.
    """
    try:
        if isinstance(image, (str, Path)):
            with Image.open(image) as opened:
                opened.load()
                image = opened.copy()
        elif isinstance(image, dict) and ("bytes" in image or "path" in image):  # undecoded datasets Image
            image = Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else Image.open(image["path"])
            image.load()
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected an image, got {type(image).__name__}")
        return ImageOps.exif_transpose(image).convert("RGB")
    except Exception as err:
        raise DataError(f"cannot read training image {name}: {type(err).__name__}: {err}") from None


def resized_size(width: int, height: int, target: int | tuple[int, int]) -> tuple[int, int]:
    """``(width, height)`` after scaling, aspect kept, to the smallest size that covers ``target``.

    ``target`` is a square side (the shorter side becomes it, as torchvision's ``Resize(int)``) or a
    ``(width, height)`` bucket: the side whose ratio is tighter fits exactly, the other is rounded
    (kohya's ``BucketManager.select_bucket``) and never below the target.
    """
    target_w, target_h = (target, target) if isinstance(target, int) else target
    if width * target_h >= height * target_w:  # wider than the target: fit the height
        return max(target_w, int(width * target_h / height + 0.5)), target_h
    return target_w, max(target_h, int(height * target_w / width + 0.5))


def crop_and_resize(
    image: Image.Image,
    target: tuple[int, int],
    center_crop: bool,
    flip: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize to cover ``target`` (bilinear, antialiased), crop to it, flip, scale to ``[-1, 1]``.

    Args:
        target: ``(width, height)`` of the training image in pixels.
        center_crop: crop the centre; otherwise a random offset (top, then left) drawn from ``generator``.
        flip: mirror horizontally (after the crop).

    Returns:
        ``pixels`` (3, height, width) float32 in ``[-1, 1]``, and SDXL's micro-conditioning
        ``time_ids`` (6,) int64: original (height, width), crop (top, left), target (height, width).
        The crop's ``left`` is measured in the image as trained, i.e. from the left edge of the
        flipped resized image when ``flip`` (as kohya's sd-scripts records it).
    """
    target_w, target_h = target
    original_w, original_h = image.size
    width, height = resized_size(original_w, original_h, target)
    image = TF.resize(image, [height, width], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    if center_crop:
        top, left = (height - target_h) // 2, (width - target_w) // 2
    else:
        top = int(torch.randint(0, height - target_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - target_w + 1, (1,), generator=generator))
    image = TF.crop(image, top, left, target_h, target_w)
    if flip:
        image = TF.hflip(image)
        left = width - left - target_w
    pixels = TF.to_tensor(image)  # (3, H, W) in [0, 1]
    time_ids = torch.tensor([original_h, original_w, top, left, target_h, target_w], dtype=torch.long)
    return pixels * 2.0 - 1.0, time_ids


def preprocess_image(
    image: Image.Image,
    resolution: int,
    center_crop: bool,
    flip: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`crop_and_resize` to a ``resolution`` square; returns only the pixels (3, R, R)."""
    return crop_and_resize(image, (resolution, resolution), center_crop, flip, generator)[0]


def image_size(item: Item) -> tuple[int, int]:
    """``(width, height)`` of an item's image after its EXIF orientation, reading only the header of a file."""
    if isinstance(item.image, Image.Image):
        return ImageOps.exif_transpose(item.image).size
    if isinstance(item.image, (str, Path)):
        try:
            with Image.open(item.image) as opened:
                width, height = opened.size
                rotated = opened.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that swap the sides
                return (height, width) if rotated else (width, height)
        except Exception as err:
            raise DataError(f"cannot read training image {item.name}: {type(err).__name__}: {err}") from None
    return load_rgb(item.image, item.name).size


class TextImageDataset(Dataset):
    """Preprocessed, tokenized samples; deterministic per ``(seed, epoch, index)``.

    ``dataset[i]`` is a dict with ``pixel_values`` (3, H, W), ``input_ids`` (L,) (and whatever
    else ``tokenize`` returns, e.g. SDXL's ``input_ids_2``), ``time_ids`` (6,) (see
    :func:`crop_and_resize`), ``index`` () -- or, after :meth:`use_cached_latents`, ``latent_mean`` /
    ``latent_std`` instead of pixels. ``(H, W)`` is the ``resolution`` square, or the image's
    bucket when ``target_sizes`` is given.
    """

    def __init__(
        self,
        source: ItemSource,
        tokenize: Callable[[list[str]], torch.Tensor | dict[str, torch.Tensor]],
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        caption_dropout: float = 0.0,
        seed: int = 0,
        target_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        """
        Args:
            source: the items.
            tokenize: captions -> ``(N, L)`` token ids (see :func:`clip_tokenize`), or a dict of such
                tensors by batch key (one per text encoder).
            resolution: side of the square training images, in pixels.
            target_sizes: per item, the ``(width, height)`` to crop it to (its aspect-ratio bucket,
                see :mod:`convlora.training.buckets`); ``None``: the ``resolution`` square.
            center_crop: centre crop (else a random crop per sample and epoch).
            random_flip: mirror half of the samples (per sample and epoch).
            caption_dropout: probability of training a sample with the empty caption.
            seed: base of every random choice.
        """
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        if len(source) == 0:
            raise DataError("no training items")
        if target_sizes is not None and len(target_sizes) != len(source):
            raise ValueError(f"target_sizes has {len(target_sizes)} entries for {len(source)} items")
        self.target_sizes = None if target_sizes is None else [tuple(size) for size in target_sizes]
        self.source = source
        self.tokenize = tokenize
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.epoch = 0
        self.latent_cache: dict[str, list[torch.Tensor]] | None = None

    def target_size(self, index: int) -> tuple[int, int]:
        """``(width, height)`` item ``index`` is trained at."""
        return (self.resolution, self.resolution) if self.target_sizes is None else self.target_sizes[index]

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch of a plain integer index ``dataset[i]`` (a :class:`SampleKey` brings its own)."""
        self.epoch = int(epoch)

    def choices(self, index: int, epoch: int | None = None) -> dict[str, Any]:
        """The random choices for ``index`` in ``epoch`` (default: the one set by :meth:`set_epoch`):
        flip, caption index, dropout, crop generator."""
        gen = sample_generator(self.seed, "data", self.epoch if epoch is None else epoch, index)
        u = torch.rand(3, generator=gen)  # flip, caption pick, dropout
        return {
            "flip": bool(self.random_flip and u[0] < 0.5),
            "caption_u": float(u[1]),
            "drop_caption": bool(u[2] < self.caption_dropout),
            "generator": gen,  # continues with the crop offsets
        }

    def possible_captions(self) -> list[str]:
        """Every caption a sample can be trained with, each once in first-seen order: all captions of
        all items, and the empty caption when ``caption_dropout > 0`` (see :meth:`caption_for`)."""
        captions = dict.fromkeys(c for i in range(len(self.source)) for c in self.source[i].captions)
        if self.caption_dropout > 0:
            captions[""] = None
        return list(captions)

    def caption_for(self, item: Item, choice: dict[str, Any]) -> str:
        if choice["drop_caption"]:
            return ""
        return item.captions[min(int(choice["caption_u"] * len(item.captions)), len(item.captions) - 1)]

    def __getitem__(self, key: int | SampleKey) -> dict[str, torch.Tensor]:
        epoch, index = (key.epoch, key.index) if isinstance(key, SampleKey) else (self.epoch, int(key))
        item = self.source[index]
        choice = self.choices(index, epoch)
        sample: dict[str, torch.Tensor] = {"index": torch.tensor(index, dtype=torch.long)}
        if self.latent_cache is not None:
            which = "flipped" if choice["flip"] else "plain"
            for field in ("mean", "std", "time_ids"):
                sample[f"latent_{field}" if field != "time_ids" else field] = self.latent_cache[f"{which}_{field}"][index]
        else:
            image = load_rgb(item.image, item.name)
            sample["pixel_values"], sample["time_ids"] = crop_and_resize(
                image, self.target_size(index), self.center_crop, choice["flip"], choice["generator"]
            )
        tokens = self.tokenize([self.caption_for(item, choice)])
        for name, ids in (tokens.items() if isinstance(tokens, dict) else [("input_ids", tokens)]):
            sample[name] = ids[0]
        return sample

    def use_cached_latents(self, cache: dict[str, list[torch.Tensor]]) -> None:
        """Serve ``latent_mean`` / ``latent_std`` from ``cache`` (see :func:`cache_latents`) instead of pixels."""
        self.latent_cache = cache

    def check_cacheable(self) -> None:
        """Raise if a random crop would differ between epochs (a cached latent cannot be re-cropped).

        Raises:
            DataError: naming the images whose random crop has freedom.
        """
        if self.center_crop:
            return
        free = []
        for i in range(len(self.source)):
            item = self.source[i]
            target = self.target_size(i)
            if resized_size(*image_size(item), target) != target:
                free.append(item.name)
        if free:
            raise DataError(
                f"--cache_latents with random cropping: {len(free)} image(s) are not square, so their crop "
                f"would change every epoch (e.g. {', '.join(free[:3])}). Pass --center_crop, or drop --cache_latents."
            )


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples into a batch (``pixel_values`` (B, 3, R, R) contiguous, ``input_ids`` (B, L), ...)."""
    batch = {key: torch.stack([ex[key] for ex in examples]) for key in examples[0]}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(memory_format=torch.contiguous_format).float()
    return batch


def clip_tokenize(tokenizer: Any) -> Callable[[list[str]], torch.Tensor]:
    """A ``captions -> (N, model_max_length)`` function padding/truncating to the tokenizer's length."""

    def tokenize(captions: list[str]) -> torch.Tensor:
        return tokenizer(
            captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids

    return tokenize


@torch.no_grad()
def cache_latents(
    dataset: TextImageDataset,
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> dict[str, list[torch.Tensor]]:
    """Encode every image once: the VAE posterior's mean and std, unflipped (and flipped if needed).

    Sampling a latent from ``mean + std * eps`` later (with the sample's own generator) gives the
    same training data as encoding every step; only the VAE forward is saved. Images are encoded in
    batches of one target size (one bucket) at a time.

    Args:
        encode: ``pixel_values (B, 3, H, W) -> (mean, std)`` each ``(B, C, H/f, W/f)``.

    Returns:
        ``{"plain_mean", "plain_std", "plain_time_ids", "flipped_mean", ...}``: per item (a list
        indexed like the dataset) ``(C, H/f, W/f)`` float32 on the CPU, and its time ids (6,).
    """
    dataset.check_cacheable()
    kinds = ("plain", "flipped") if dataset.random_flip else ("plain",)
    out: dict[str, list] = {f"{k}_{s}": [None] * len(dataset) for k in kinds for s in ("mean", "std", "time_ids")}
    by_size: dict[tuple[int, int], list[int]] = {}
    for i in range(len(dataset)):
        by_size.setdefault(dataset.target_size(i), []).append(i)
    for size, members in by_size.items():
        for start in range(0, len(members), batch_size):
            indices = members[start : start + batch_size]
            images = [load_rgb(dataset.source[i].image, dataset.source[i].name) for i in indices]
            for kind in kinds:
                crops = [crop_and_resize(image, size, center_crop=True, flip=kind == "flipped") for image in images]
                mean, std = encode(torch.stack([pixels for pixels, _ in crops]))
                for row, (i, (_, time_ids)) in enumerate(zip(indices, crops)):
                    out[f"{kind}_mean"][i], out[f"{kind}_std"][i] = mean[row].float().cpu(), std[row].float().cpu()
                    out[f"{kind}_time_ids"][i] = time_ids
            if progress is not None:
                progress(len(indices))
    if not dataset.random_flip:
        out.update({f"flipped_{s}": out[f"plain_{s}"] for s in ("mean", "std", "time_ids")})
    return out


class SampleKey(NamedTuple):
    """What :class:`EpochShuffleSampler` yields and :class:`TextImageDataset` is indexed with."""

    epoch: int
    index: int


class EpochShuffleSampler(Sampler[SampleKey]):
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``, as :class:`SampleKey` s.

    ``set_epoch`` picks the epoch (:func:`epoch_loader` calls it); the order is the same in every
    process and in a resumed run, so skipping the first batches of an epoch resumes exactly, and
    each key carries the epoch its sample's random choices are drawn for.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n = n
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=sample_generator(self.seed, "shuffle", self.epoch)).tolist()
        else:
            order = range(self.n)
        return iter([SampleKey(self.epoch, i) for i in order])


def epoch_loader(loader: Any, epoch: int, skip_batches: int = 0) -> Any:
    """The batches of ``epoch`` from a (prepared) dataloader, without its first ``skip_batches``.

    Sets the epoch on the loader and on every sampler and dataset under it (accelerate's own
    ``set_epoch`` misses some of them; see the module docstring), so the shuffle order and each
    sample's random choices are those of ``epoch`` -- in a resumed run too.

    Args:
        loader: a ``DataLoader`` or what ``accelerator.prepare`` made of one.
        skip_batches: batches (per process) of this epoch already trained before a resume.
    """
    if skip_batches:
        from accelerate.data_loader import skip_first_batches

        loader = skip_first_batches(loader, skip_batches)
    for part in _loader_parts(loader):
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)
    return loader


def _loader_parts(loader: Any) -> list[Any]:
    """The loader and the batch samplers, samplers and datasets nested in it (each once)."""
    found, todo = {}, [loader]
    while todo:
        part = todo.pop()
        if part is None or id(part) in found:
            continue
        found[id(part)] = part
        todo += [getattr(part, name, None) for name in ("base_dataloader", "batch_sampler", "sampler", "dataset")]
    return list(found.values())


def num_update_steps_per_epoch(num_batches: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps per epoch for ``num_batches`` per-process batches (the last partial accumulation counts)."""
    return math.ceil(num_batches / gradient_accumulation_steps)


def write_toy_dataset(
    folder: str | Path,
    n: int = 16,
    size: int = 32,
    caption: str = "a photo of a sks ball",
    seed: int = 0,
) -> Path:
    """Write ``n`` small synthetic images (a bright disc on a dark background, position and colour
    varying) with a ``metadata.jsonl`` caption each, in the diffusers imagefolder layout.

    Used by the tests and as the stand-in dataset when the shipped example data is absent.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    lines = []
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7, size=2) * size
        radius = rng.uniform(0.18, 0.3) * size
        colour = rng.uniform(0.5, 1.0, size=3)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2)[..., None]
        pixels = np.where(disc, colour, 0.08) * 255
        name = f"{i:04d}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(out / name)
        lines.append(json.dumps({"file_name": name, "text": caption}))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
