"""``images=``: files, folders, shell patterns and lists of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from transfer.core.errors import ConfigError
from transfer.data.folders import collect_images


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    for name in ("0000.jpg", "0001.jpg", "0002.png", "0005.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "0003.jpg").write_bytes(b"")
    return tmp_path


def names(files: list[Path]) -> list[str]:
    return [f.name for f in files]


def test_a_character_class_and_a_single_character_wildcard(photos: Path):
    assert names(collect_images(str(photos / "000[0-3].*"))) == ["0000.jpg", "0001.jpg", "0002.png"]
    assert names(collect_images(str(photos / "000?.jpg"))) == ["0000.jpg", "0001.jpg", "0005.jpg"]


def test_recursive_patterns_and_folders_keep_only_images(photos: Path):
    assert names(collect_images(str(photos / "**" / "*.jpg"))) == ["0000.jpg", "0001.jpg", "0005.jpg", "0003.jpg"]
    assert len(collect_images(str(photos))) == 5  # notes.txt is not an image


def test_several_specs_as_a_list_or_with_commas_each_file_once(photos: Path):
    a, b = str(photos / "0000.jpg"), str(photos / "000[01].jpg")
    assert names(collect_images([a, b])) == ["0000.jpg", "0001.jpg"]
    assert names(collect_images(f"{a},{photos / '0005.jpg'}")) == ["0000.jpg", "0005.jpg"]


def test_a_spec_that_matches_nothing_is_named(photos: Path):
    with pytest.raises(ConfigError, match=r"images=.*9\?\.jpg matches no image files"):
        collect_images([str(photos / "0000.jpg"), str(photos / "9?.jpg")])
