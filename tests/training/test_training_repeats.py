"""kohya-style ``N_name`` folders: repeat counts, captions from files or from the folder name, and a
named error for every folder that cannot be read as intended."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from convlora.training.data import DataError, write_toy_dataset
from convlora.training.repeats import is_repeat_layout, parse_folder_name, read_repeat_folders, read_training_folder, repeat_counts


def _images(folder: Path, n: int, captions: dict[int, str] | None = None) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(folder / f"{i}.png")
    for i, caption in (captions or {}).items():
        (folder / f"{i}.txt").write_text(caption)
    return folder


@pytest.mark.parametrize("name, parsed", [("10_sks bag", (10, "sks bag")), ("3_a_b", (3, "a_b")), ("5", (5, "")),
                                          ("1_", (1, ""))])
def test_folder_names_split_at_the_first_underscore_as_kohya(name, parsed):
    assert parse_folder_name(name) == parsed


def test_images_repeat_and_take_the_folder_caption_unless_they_have_their_own(tmp_path):
    _images(tmp_path / "data" / "3_sks bag", 2, captions={1: "a photo of a sks bag, studio"})
    _images(tmp_path / "data" / "1_sks_bag_outdoors", 1)
    (tmp_path / "data" / "notes.md").write_text("not an image")
    source = read_training_folder(tmp_path / "data")
    assert [(Path(i.image).parent.name, Path(i.image).name, i.captions[0]) for i in source.items] == (
        [("1_sks_bag_outdoors", "0.png", "sks_bag_outdoors")]
        + [("3_sks bag", "0.png", "sks bag")] * 3 + [("3_sks bag", "1.png", "a photo of a sks bag, studio")] * 3
    )
    assert repeat_counts(source) == {"1_sks_bag_outdoors": {"n_repeats": 1, "img_count": 1},
                                     "3_sks bag": {"n_repeats": 3, "img_count": 2}}


def test_a_captioned_folder_is_not_read_as_kohya_folders(tmp_path):
    data = write_toy_dataset(tmp_path / "plain", n=12)
    _images(data / "10_extra", 1)  # a metadata.jsonl decides: listed images only
    assert not is_repeat_layout(data) and not is_repeat_layout(tmp_path / "missing")
    with pytest.warns(UserWarning, match="not listed in metadata.jsonl"):
        assert len(read_training_folder(data)) == 12


@pytest.mark.parametrize("make, message", [
    (lambda root: _images(root / "sks bag", 1), r"folder 'sks bag': a kohya-style folder name is '<repeats>_<caption>'"),
    (lambda root: _images(root / "x_sks", 1), r"'x' is not a repeat count"),
    (lambda root: _images(root / "0_sks", 1), r"folder '0_sks': the repeat count must be at least 1, got 0"),
    (lambda root: (root / "4_empty").mkdir(), r"folder '4_empty' has no images"),
    (lambda root: _images(root / "4", 1), r"4/0.png has no caption: no .txt/.caption file beside it and no caption"),
    (lambda root: Image.new("RGB", (8, 8)).save(root / "loose.png"), r"images belong in them, not beside them \(loose.png"),
])
def test_folders_that_cannot_be_read_as_intended_are_named(tmp_path, make, message):
    root = tmp_path / "data"
    _images(root / "2_good", 1)
    make(root)
    with pytest.raises(DataError, match=message):
        read_repeat_folders(root, flag="--reg_data_dir")


def test_a_missing_folder_is_named_with_its_flag(tmp_path):
    with pytest.raises(DataError, match=r"--reg_data_dir .*nothing is not a folder"):
        read_repeat_folders(tmp_path / "nothing", flag="--reg_data_dir")
