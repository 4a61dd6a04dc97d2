"""Decoding messy image files, and the layouts and faults of a user's image folders."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.helpers import CLASSES, make_image_folder
from transfer.core.errors import ConfigError, CorruptImagesError, DataNotFoundError
from transfer.core.preprocess import Preprocess
from transfer.data import ImageFolderData, datasets
from transfer.data.datasets import decode_checked, list_images
from transfer.data.decode import read_rgb, to_rgb

# (mode, file suffix that can hold it)
MODES = [
    ("1", ".png"),
    ("L", ".png"),
    ("LA", ".png"),
    ("P", ".png"),
    ("RGB", ".jpg"),
    ("RGBA", ".png"),
    ("CMYK", ".jpg"),
    ("I;16", ".png"),
    ("I", ".tif"),
    ("F", ".tif"),
    ("RGB", ".webp"),
]


def pre(size: int = 32) -> Preprocess:
    """What a model's weights would hand the data module."""
    return Preprocess(size, (0.5,) * 3, (0.25,) * 3)


def ready(dm):
    dm.setup("fit")
    return dm


def solid(mode: str, size: tuple[int, int], value: int) -> Image.Image:
    """A one-colour image in ``mode`` whose 8-bit grey level is ``value``."""
    if mode == "I;16":
        return Image.fromarray(np.full(size[::-1], value * 257, dtype=np.uint16))
    if mode == "F":
        return Image.fromarray(np.full(size[::-1], value / 255, dtype=np.float32))
    if mode == "CMYK":
        return Image.new("CMYK", size, (0, 0, 0, 255 - value))
    if mode == "1":
        return Image.new("1", size, 1 if value >= 128 else 0)
    return Image.new("L", size, value).convert(mode)


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(MODES),
    width=st.integers(1, 90),
    height=st.integers(1, 90),
    value=st.integers(0, 255),
    out=st.one_of(st.none(), st.integers(1, 48)),
)
def test_every_mode_and_size_decodes_to_upright_8bit_rgb(kind, width, height, value, out):
    mode, suffix = kind
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"img{suffix}"
        solid(mode, (width, height), value).save(path)
        rgb = read_rgb(path, out)
    assert rgb.mode == "RGB"
    assert rgb.size == ((out, out) if out else (width, height))
    arr = np.asarray(rgb).astype(int)
    expected = (255 if value >= 128 else 0) if mode == "1" else value
    tolerance = 12 if suffix in (".jpg", ".webp") else 1  # lossy formats, CMYK->RGB through JPEG
    assert np.abs(arr - expected).max() <= tolerance, (mode, value, arr.mean())


@settings(max_examples=30, deadline=None)
@given(long=st.integers(50, 2000), short=st.integers(1, 4), tall=st.booleans(), out=st.integers(4, 40))
def test_extreme_aspect_images_fit_the_square_and_keep_their_centre(long, short, tall, out):
    w, h = (short, long) if tall else (long, short)
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = 200  # red everywhere, green only in the middle 10% of the long side
    lo, hi = int(long * 0.45), int(long * 0.55) + 1
    if tall:
        arr[lo:hi, :, 1] = 200
    else:
        arr[:, lo:hi, 1] = 200
    with tempfile.TemporaryDirectory() as tmp:
        Image.fromarray(arr).save(Path(tmp) / "x.png")
        got = np.asarray(read_rgb(Path(tmp) / "x.png", out))
    assert got.shape == (out, out, 3)
    assert got[..., 1].mean() > 150  # the centre crop, not a squashed whole


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path):
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (16, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    arr = np.asarray(read_rgb(tmp_path / "deep.png")).astype(float)
    assert 120 < arr.mean() < 135  # convert("RGB") gives ~254
    assert arr[0, 0].tolist() == [0, 0, 0] and arr[0, -1].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path: Path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)  # stored: left half red, right half blue
    arr[:, 20:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored left edge becomes the top
    img.save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    got = np.asarray(read_rgb(tmp_path / "portrait.jpg")).astype(int)
    assert got.shape == (40, 20, 3)
    assert got[5, 10, 0] > 200 and got[5, 10, 2] < 60  # top: red
    assert got[35, 10, 2] > 200 and got[35, 10, 0] < 60  # bottom: blue


def test_transparent_pixels_become_white_and_palette_colours_survive():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert 120 < np.asarray(to_rgb(half))[0, 0, 0] < 135
    pal = Image.new("RGB", (4, 4), (200, 30, 60)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert np.asarray(to_rgb(pal))[0, 0].tolist() == [200, 30, 60]
    pal.info["transparency"] = pal.getpixel((0, 0))  # a GIF-style transparent palette entry
    assert np.asarray(to_rgb(pal))[0, 0].tolist() == [255, 255, 255]


def corrupt_files(folder: Path) -> list[Path]:
    """A truncated PNG and a random-bytes ``.jpg`` inside ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "000.png"
    truncated, junk = folder / "zz_truncated.png", folder / "zz_random.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    return [truncated, junk]


def test_decode_reports_corrupt_rows_instead_of_raising(tiny_cifar: Path):
    bad = corrupt_files(tiny_cifar / "train" / "dog")
    files, _ = list_images(tiny_cifar / "train", list(CLASSES))
    images, failed = decode_checked(files, size=16)
    assert sorted(files[i] for i in failed) == sorted(bad) and images.shape == (len(files), 16, 16, 3)
    assert all(images[i].max() == 0 for i in failed) and images[0].max() > 0


def test_decoding_in_processes_gives_the_rows_of_decoding_in_order(tiny_cifar: Path, monkeypatch):
    bad = corrupt_files(tiny_cifar / "train" / "dog")
    files, _ = list_images(tiny_cifar / "train", list(CLASSES))
    monkeypatch.setattr(datasets, "_POOL_MIN_FILES", len(files) + 1)  # one process
    alone, failed_alone = decode_checked(files, size=16)
    monkeypatch.setattr(datasets, "_POOL_MIN_FILES", 1)
    monkeypatch.setattr(datasets, "_POOL_CHUNK", 3)  # several tasks, so order is what is tested
    monkeypatch.setattr(datasets.os, "sched_getaffinity", lambda pid: {0, 1})
    pooled, failed_pooled = decode_checked(files, size=16)
    assert np.array_equal(alone, pooled) and failed_alone == failed_pooled
    assert sorted(files[i] for i in failed_pooled) == sorted(bad)


@pytest.mark.parametrize("augment_on", ["device", "cpu_pil"])
def test_corrupt_images_fail_naming_them_or_are_skipped_and_counted(tmp_path: Path, augment_on: str):
    root = make_image_folder(tmp_path / "mine", {"train": 10})
    bad = corrupt_files(root / "train" / "ship")
    with pytest.raises(CorruptImagesError) as info:
        ready(ImageFolderData(str(root), num_workers=0, preprocess=pre(32), augment_on=augment_on))
    message = str(info.value)
    assert "2 image file(s) could not be decoded" in message and "data.skip_corrupt=true" in message
    assert all(str(p) in message for p in bad)
    dm = ready(ImageFolderData(str(root), num_workers=0, preprocess=pre(32), augment_on=augment_on, skip_corrupt=True))
    assert dm.describe()["corrupt_skipped"] == 2 and sorted(dm.describe()["corrupt_files"]) == sorted(map(str, bad))
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 30
    files, _ = list_images(root / "train", list(CLASSES))
    bad_rows = {files.index(p) for p in bad}
    assert not bad_rows & {int(i) for ds in (dm.train_set, dm.val_set, dm.test_set) for i in ds.indices}
    for ds in (dm.train_set, dm.val_set, dm.test_set):  # every remaining item decodes
        for i in range(len(ds)):
            ds[i]


def test_non_image_files_are_ignored(tmp_path: Path):
    root = make_image_folder(tmp_path / "mine", {"train": 10})
    for junk in ("notes.txt", ".DS_Store", "Thumbs.db", "._000.png", "labels.csv"):
        (root / "train" / "cat" / junk).write_bytes(b"not an image")
    (root / "train" / "cat" / "sub.jpg").mkdir()  # a folder named like an image
    dm = ready(ImageFolderData(str(root), num_workers=0, preprocess=pre(32)))
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 30 and dm.describe()["corrupt_skipped"] == 0


def test_an_empty_class_folder_is_an_error(tmp_path: Path):
    root = make_image_folder(tmp_path / "mine", {"train": 10})
    (root / "train" / "horse").mkdir()
    (root / "train" / "horse" / "readme.txt").write_text("todo")
    with pytest.raises(ConfigError, match=r"no image files for class\(es\) horse"):
        ready(ImageFolderData(str(root), num_workers=0, preprocess=pre(32)))


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_splits_with_different_class_sets_are_an_error(tmp_path: Path, change: str):
    root = make_image_folder(tmp_path / "mine", {"train": 6, "test": 2})
    if change == "extra":
        make_image_folder(root, {"test": 2}, classes=("horse",))
    else:
        for f in (root / "test" / "dog").iterdir():
            f.unlink()
        (root / "test" / "dog").rmdir()
    with pytest.raises(ConfigError, match="test split's classes differ") as info:
        _ = ImageFolderData(str(root)).classes
    assert ("horse" if change == "extra" else "lacks dog") in str(info.value)


def test_flat_layout_holds_out_stratified_seeded_splits(tmp_path: Path):
    make_image_folder(tmp_path, {"flat": 20})
    root = tmp_path / "flat"
    dm = ready(ImageFolderData(str(root), num_workers=0, preprocess=pre(32), val_size=0.2, test_size=0.1, split_seed=1))
    assert dm.classes == list(CLASSES) and dm.layout == "flat" and "flat layout" in dm.describe()["source"]
    sizes = (len(dm.train_set), len(dm.val_set), len(dm.test_set))
    assert sizes == (42, 12, 6)
    rows = [set(ds.indices.tolist()) for ds in (dm.train_set, dm.val_set, dm.test_set)]
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    targets = dm.train_set.targets.numpy()
    assert np.bincount(targets[sorted(rows[1])]).tolist() == [4, 4, 4]  # stratified
    again = ready(
        ImageFolderData(str(root), num_workers=0, preprocess=pre(32), val_size=0.2, test_size=0.1, split_seed=1)
    )
    other = ready(
        ImageFolderData(str(root), num_workers=0, preprocess=pre(32), val_size=0.2, test_size=0.1, split_seed=2)
    )
    assert set(again.val_set.indices.tolist()) == rows[1] and set(other.val_set.indices.tolist()) != rows[1]


def test_a_set_without_a_test_folder_says_its_test_images_were_held_out_of_train(tmp_path: Path):
    from transfer.run import describe

    root = make_image_folder(tmp_path / "photos", {"train": 10, "val": 2})
    dm = ready(ImageFolderData(str(root), num_workers=0, preprocess=pre(32), test_size=0.2))
    about = dm.describe()
    assert about["val_from"] == "the val/ folder" and about["test_size"] == 6 == len(dm.test_set)
    assert about["test_from"] == "held out of the train/ folder (there is no test/ folder; data.test_size=0.2)"
    summary = {"model": "m", "test_acc": 0.5, "best_epoch": 1, "best_val_acc": 0.5, "train_seconds": 1.0,
               "images_per_second": 9.0, "data": {**about, "test_scored": 6}}  # fmt: skip
    assert "test accuracy 50.00% on 6 images held out of the train/ folder (there is no test/ folder" in describe(
        summary
    )
    with_test = ready(ImageFolderData(str(make_image_folder(tmp_path / "full", {"train": 4, "test": 2})),
                                      num_workers=0, preprocess=pre(32)))  # fmt: skip
    assert with_test.describe()["test_from"] == "the test/ folder"
    assert "images" not in describe({**summary, "data": {**with_test.describe(), "test_scored": 6}}).split("(")[0]


def test_split_folders_without_train_say_which_layouts_work(tmp_path: Path):
    make_image_folder(tmp_path / "mine", {"test": 2})
    with pytest.raises(DataNotFoundError, match="test/ but no train/ folder"):
        _ = ImageFolderData(str(tmp_path / "mine")).classes


@pytest.mark.parametrize("augment_on", ["device", "cpu_pil"])
def test_a_folder_of_odd_images_trains_through_both_paths(tmp_path: Path, augment_on: str):
    """Tiny, extreme-aspect, 16-bit, palette, transparent, CMYK and EXIF-rotated files side by side."""
    root = tmp_path / "odd"
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i, (mode, size, suffix) in enumerate(
            [
                ("L", (1, 1), ".png"),
                ("RGB", (1, 300), ".png"),
                ("RGBA", (300, 1), ".png"),
                ("P", (5, 3), ".gif"),
                ("CMYK", (40, 30), ".jpg"),
                ("I;16", (20, 20), ".png"),
                ("LA", (9, 60), ".png"),
                ("RGB", (64, 32), ".jpg"),
            ]
        ):
            img = solid(mode, size, 60 + 120 * c)
            exif = img.getexif()
            if suffix == ".jpg":
                exif[0x0112] = 8
            img.save(root / name / f"{i}{suffix}", **({"exif": exif} if suffix == ".jpg" else {}))
    dm = ready(
        ImageFolderData(
            str(root), num_workers=0, preprocess=pre(32), batch_size=4, val_size=2, test_size=2, augment_on=augment_on
        )
    )
    assert dm.layout == "flat" and len(dm.train_set) == 12
    for split in ("train", "val", "test"):
        loader = getattr(dm, f"{split}_dataloader")()
        for batch in loader:
            x, _, _ = dm.prepare_batch(batch, train=split == "train")
            assert x.shape[1:] == (3, 32, 32) and torch.isfinite(x).all()
