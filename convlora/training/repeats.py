"""kohya-style image folders: ``N_name`` subfolders whose images count ``N`` times per epoch.

    train_data_dir/
        10_sks bag/          every image here is trained 10 times per epoch
            a.png  a.txt     a caption file beside an image is its caption ...
            b.png            ... otherwise the folder name after the count: "sks bag"
        1_sks bag studio/

The rule is kohya sd-scripts' (``generate_dreambooth_subsets_config_by_subdirs``): the folder name
is split at ``_``; the first part is the repeat count, the rest (joined again with ``_``) is the
caption of images without a caption file. Where kohya skips a folder it cannot read with a warning,
here a subfolder whose name has no count, a count below 1, a folder without images, or an image
with neither a caption file nor a caption in its folder name is an error naming it -- a silently
skipped folder would train on less data than intended. ``--reg_data_dir`` (the class images of
prior preservation) has the same layout.

A folder is read this way when it has no ``metadata.jsonl`` / ``metadata.csv`` and at least one
subfolder whose name starts with digits and ``_`` (:func:`is_repeat_layout`); other folders are read
by :func:`convlora.training.data.read_image_folder`.
"""

from __future__ import annotations

import re
from pathlib import Path

from convlora.training.data import (
    CAPTION_EXTENSIONS,
    IMAGE_EXTENSIONS,
    DataError,
    Item,
    ListSource,
    read_image_folder,
    read_text,
)

_COUNTED = re.compile(r"^\d+_")


def parse_folder_name(name: str) -> tuple[int, str]:
    """``"10_sks bag"`` -> ``(10, "sks bag")``; ``"3_a_b"`` -> ``(3, "a_b")``; ``"5"`` -> ``(5, "")``.

    Raises:
        DataError: the part before the first ``_`` is not a whole number, or it is below 1.
    """
    count, _, caption = name.partition("_")
    if not count.isdigit():
        raise DataError(f"folder {name!r}: a kohya-style folder name is '<repeats>_<caption>' (e.g. '10_sks bag'); "
                        f"{count!r} is not a repeat count")
    if int(count) < 1:
        raise DataError(f"folder {name!r}: the repeat count must be at least 1, got {int(count)}")
    return int(count), caption


def is_repeat_layout(folder: str | Path) -> bool:
    """Whether ``folder`` is read as kohya ``N_name`` subfolders (see the module docstring)."""
    root = Path(folder)
    if not root.is_dir() or (root / "metadata.jsonl").is_file() or (root / "metadata.csv").is_file():
        return False
    return any(p.is_dir() and _COUNTED.match(p.name) for p in root.iterdir())


def read_repeat_folders(folder: str | Path, flag: str = "--train_data_dir") -> ListSource:
    """Every image of every ``N_name`` subfolder of ``folder``, each listed ``N`` times.

    Returns:
        A source of ``sum(N * images)`` items in folder order (sorted by name), each image's ``N``
        copies in a row; each copy is its own sample (own crop, flip and noise).

    Raises:
        DataError: a subfolder name without a count (or a count below 1), a subfolder without
            images, images directly in ``folder``, or an image without any caption; each named.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{flag} {root} is not a folder")
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if loose:
        raise DataError(f"{flag} {root} has N_name subfolders, so images belong in them, not beside them ({loose[0]}, ...)")
    subfolders = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    items: list[Item] = []
    for sub in subfolders:
        repeats, folder_caption = parse_folder_name(sub.name)
        images = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise DataError(f"{flag} {root}: folder {sub.name!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        for path in images:
            caption = _caption_file_text(path) or folder_caption.strip()
            if not caption:
                raise DataError(f"{path} has no caption: no {'/'.join(CAPTION_EXTENSIONS)} file beside it and no caption "
                                f"after the count in its folder name {sub.name!r}")
            items += [Item(path, (caption,), str(path))] * repeats
    if not items:
        raise DataError(f"{flag} {root} has no N_name subfolders")
    return ListSource(items, description=f"{root} (kohya N_name folders)")


def read_training_folder(folder: str | Path, caption_column: str = "text", flag: str = "--train_data_dir") -> ListSource:
    """A folder in either layout: kohya ``N_name`` subfolders, or captioned images (metadata / sidecars)."""
    if is_repeat_layout(folder):
        return read_repeat_folders(folder, flag=flag)
    return read_image_folder(folder, caption_column=caption_column)


def repeat_counts(source: ListSource) -> dict[str, dict[str, int]]:
    """``{subfolder name: {"n_repeats": N, "img_count": images}}`` of a :func:`read_repeat_folders`
    source (kohya's ``ss_dataset_dirs``)."""
    counts: dict[str, dict[str, int]] = {}
    for item in source.items:
        entry = counts.setdefault(Path(item.image).parent.name, {"n_repeats": 0, "img_count": 0, "items": 0})
        entry["items"] += 1
    for name, entry in counts.items():
        repeats = parse_folder_name(name)[0]
        entry.update(n_repeats=repeats, img_count=entry.pop("items") // repeats)
    return counts


def _caption_file_text(image: Path) -> str:
    for ext in CAPTION_EXTENSIONS:
        sidecar = image.with_suffix(ext)
        if sidecar.is_file():
            return read_text(sidecar, "caption file").strip()
    return ""
