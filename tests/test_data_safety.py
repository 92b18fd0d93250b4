"""Inputs that hung the start-up scan, leaked val/test images into training, trained on data nobody asked for, or
crashed with a traceback (issue 21): FIFOs and other special files, repeated or copied images across splits,
manifest mistakes, .npy headers claiming huge arrays, and a mistyped data.root with data.demo on."""

import csv
import errno
import os
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import kd.data.loaders
from kd.config import DataConfig
from kd.data.dataset import InputSpec, LeafDataset
from kd.data.demo import make_demo_dataset
from kd.data.loaders import build_loader, open_split, prepare_data
from kd.data.multispectral import load_ms
from kd.data.scan import scan_dataset
from kd.errors import UserError

HW = (6, 8)
RNG = np.random.default_rng(0)


def image(path: Path) -> Path:
    """A random (so unique) PNG at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (*HW, 3), np.uint8)).save(path)
    return path


def split_folders(root: Path, n: int = 3, ms: bool = False) -> Path:
    """<root>/{train,val,test}/{a,b}/<i>.png, every image different (and a C×H×W .npy beside each with `ms`)."""
    for split in ("train", "val", "test"):
        for cls in "ab":
            for i in range(n):
                png = image(root / split / cls / f"{i}.png")
                if ms:
                    np.save(png.with_suffix(".npy"), RNG.random((3, *HW), dtype=np.float32))
    return root


def manifest(path: Path, rows: list, header=("path", "label", "split"), bom: bool = False) -> Path:
    """A CSV manifest at `path` with `rows`; the images it names (but "missing/...") are written beside it."""
    for row in rows:
        if row[0] and not row[0].startswith("missing") and not (path.parent / row[0]).exists():
            image(path.parent / row[0])
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def rows(n: int = 3) -> list[list[str]]:
    """Manifest rows: n images of classes a and b in each split."""
    return [[f"img/{s}/{c}{i}.png", c, s] for s in ("train", "val", "test") for c in "ab" for i in range(n)]


def config(root: Path, **extra) -> DataConfig:
    return DataConfig(**{"root": str(root), "demo": False, "image_size": 8, "num_workers": 0} | extra)


def fifo(path: Path) -> Path:
    """A FIFO at `path`. Should anything open it for reading (the bug), a writer comes after a few seconds and
    closes it at once: the reader gets an empty file instead of a hang, and the test fails on its message."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)

    def unblock():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and path.exists():
            time.sleep(3)
            try:  # succeeds only while a reader waits in open()
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as e:
                if e.errno not in (errno.ENXIO, errno.ENOENT):
                    return

    threading.Thread(target=unblock, daemon=True).start()
    return path


# ------------------------------------------------------------------------------------ not regular files


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_a_fifo_in_a_manifest_is_a_bad_file_named_not_a_hang(tmp_path):
    csv_path = manifest(tmp_path / "data.csv", rows())
    fifo(tmp_path / "img/train/a9.png")
    csv_path.write_text(csv_path.read_text() + "img/train/a9.png,a,train\n")
    start = time.monotonic()
    with pytest.raises(
        UserError, match=r"1 of 7 samples have bad files:\n  .*a9.png: unreadable image \(not a regular"
    ):
        open_split(config(tmp_path, manifest=str(csv_path)), "train")
    with pytest.warns(UserWarning, match=r"(?s)skipped 1 .*a9.png: unreadable image \(not a regular file but a FIFO\)"):
        assert len(open_split(config(tmp_path, manifest=str(csv_path), on_bad_file="skip"), "train")) == 6
    assert time.monotonic() - start < 2  # stat only: nothing waited for a writer


def test_a_folder_listed_as_an_image_is_a_bad_file_named(tmp_path):
    csv_path = manifest(tmp_path / "data.csv", [*rows(), ["img/train/folder.png", "a", "train"]])
    (tmp_path / "img/train/folder.png").unlink()
    (tmp_path / "img/train/folder.png").mkdir()
    with pytest.raises(UserError, match=r"folder.png: unreadable image \(not a regular file but a folder\)"):
        open_split(config(tmp_path, manifest=str(csv_path)), "train")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_a_fifo_as_ms_file_or_unlabelled_image_is_a_bad_file_named(tmp_path):
    root = split_folders(tmp_path / "data", ms=True)
    band_file = root / "train/a/0.npy"
    band_file.unlink()
    fifo(band_file)
    with pytest.raises(UserError, match=rf"{re.escape(str(band_file))}: unreadable multispectral file \(not a regular"):
        open_split(config(root, ms_missing="zeros"), "train", with_ms=True)  # not zero-filled as if missing
    band_file.unlink()
    np.save(band_file, RNG.random((3, *HW), dtype=np.float32))

    pool = tmp_path / "pool"
    image(pool / "u0.png")
    fifo(pool / "u1.png")
    cfg = config(root, unlabeled_root=str(pool))
    with pytest.raises(UserError, match=r"u1.png: unreadable image \(not a regular file but a FIFO\)"):
        build_loader(cfg, InputSpec(8), "train", 4, train=True, unlabeled=True)


# ------------------------------------------------------------------------------- val/test images in training


def test_a_manifest_row_repeated_in_another_split_is_a_leak_named_by_its_lines(tmp_path):
    listed = rows()
    listed.append(["img/./test/a0.png", "a", "train"])  # the test image a0, spelled another way
    csv_path = manifest(tmp_path / "data.csv", listed)
    with pytest.raises(
        UserError,
        match=r"lines 14 and 20 of .*data.csv both list the image img/./test/a0.png, as "
        r"test and as train: a val or test image would be trained on",
    ):
        LeafDataset(tmp_path, "train", manifest=csv_path)


def test_a_copy_or_hard_link_of_a_test_image_in_training_is_refused(tmp_path):
    root = split_folders(tmp_path / "data")
    shutil.copy(root / "test/b/1.png", root / "train/a/copy.png")
    with pytest.raises(
        UserError,
        match=r"1 training images have the content of val/test images, e\.g\. .*train/a/"
        r"copy.png has the same bytes as test image .*test/b/1.png",
    ):
        open_split(config(root), "train")
    (root / "train/a/copy.png").unlink()
    assert len(open_split(config(root), "train")) == 6
    assert len(open_split(config(root), "val")) == 6  # val and test are not compared with each other here

    pool = tmp_path / "pool"
    image(pool / "u0.png")
    image(pool / "u1.png")
    os.link(root / "val/a/2.png", pool / "u2.png")  # a hard link: another path, the same file
    with pytest.raises(
        UserError,
        match=r"1 unlabelled images have the content of val/test images, e\.g\. .*u2.png "
        r"has the same bytes as val image .*val/a/2.png",
    ):
        build_loader(config(root, unlabeled_root=str(pool)), InputSpec(8), "train", 4, train=True, unlabeled=True)


def test_a_copied_test_image_in_a_manifest_is_refused(tmp_path):
    csv_path = manifest(tmp_path / "data.csv", rows())
    shutil.copy(tmp_path / "img/test/b2.png", tmp_path / "img/train/b2_copy.png")
    csv_path.write_text(csv_path.read_text() + "img/train/b2_copy.png,b,train\n")
    with pytest.raises(UserError, match=r"b2_copy.png has the same bytes as test image .*img/test/b2.png"):
        open_split(config(tmp_path, manifest=str(csv_path)), "train")


# ------------------------------------------------------------------------------------ manifest mistakes


def test_a_label_only_in_val_or_test_is_refused_naming_it_and_its_rows(tmp_path):
    csv_path = manifest(
        tmp_path / "data.csv", [*rows(), ["img/val/z.png", "zebra", "val"], ["img/test/z.png", "zebra", "test"]]
    )
    with pytest.raises(
        UserError,
        match=r"the label 'zebra' is on val/test rows only \(lines 20, 21\), so no "
        "training row teaches it",
    ):
        LeafDataset(tmp_path, "train", manifest=csv_path)


def test_an_evaluation_manifest_without_training_rows_is_accepted(tmp_path):
    csv_path = manifest(tmp_path / "data.csv", [r for r in rows() if r[2] == "test"])
    assert len(LeafDataset(tmp_path, "test", manifest=csv_path)) == 6


def test_a_row_repeated_in_one_split_is_refused(tmp_path):
    csv_path = manifest(tmp_path / "data.csv", [*rows(), ["img/train/b1.png", "b", "train"]])
    with pytest.raises(
        UserError,
        match=r"lines 6 and 20 of .*data.csv both list the image img/train/b1.png \(train\): "
        "it would be used twice",
    ):
        LeafDataset(tmp_path, "train", manifest=csv_path)
    without_split = manifest(
        tmp_path / "plain.csv", [["img/train/a0.png", "a"], ["img/train/a0.png", "a"]], ("path", "label")
    )
    with pytest.raises(UserError, match=r"lines 2 and 3 of .*plain.csv both list the image img/train/a0.png: it "):
        LeafDataset(tmp_path, "train", manifest=without_split)


def test_a_manifest_starting_with_a_utf8_bom_is_read(tmp_path):
    csv_path = manifest(tmp_path / "data.csv", rows(), bom=True)
    assert csv_path.read_bytes().startswith(b"\xef\xbb\xbfpath,label,split")
    assert len(LeafDataset(tmp_path, "train", manifest=csv_path)) == 6


def test_a_huge_path_is_cut_in_the_messages(tmp_path):
    huge = "missing/" + "x" * 100_000 + ".png"
    csv_path = manifest(tmp_path / "data.csv", [*rows(), [huge, "a", "train"]])
    with pytest.raises(UserError, match="unreadable image") as error:
        open_split(config(tmp_path, manifest=str(csv_path)), "train")
    assert len(str(error.value)) < 1000
    bad_row = manifest(tmp_path / "bad.csv", [*rows(), [huge, "a", "somewhere"]])
    with pytest.raises(UserError, match="line 20") as error:
        LeafDataset(tmp_path, "train", manifest=bad_row)
    assert len(str(error.value)) < 1000
    with pytest.raises(UserError, match="does not exist") as error:
        prepare_data(config(tmp_path / ("y" * 100_000)))
    assert len(str(error.value)) < 1000


# ------------------------------------------------------------------------------------------- .npy headers


def test_a_npy_header_claiming_a_huge_array_is_a_bad_file_named(tmp_path):
    root = split_folders(tmp_path / "data", ms=True)
    bomb = root / "train/b/1.npy"
    header = {"descr": "<f4", "fortran_order": False, "shape": (5, 100_000, 50_000)}  # 93 GiB
    with open(bomb, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 64)
    assert bomb.stat().st_size < 300
    with pytest.raises(ValueError, match=r"header claims a 5×100000×50000 float32 array \(100000000000 bytes\), but"):
        load_ms(bomb)
    with pytest.raises(UserError, match=r"1\.npy: unreadable multispectral file \(its header claims a 5×100000×50000"):
        open_split(config(root), "train", with_ms=True)
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(open_split(config(root, on_bad_file="skip"), "train", with_ms=True)) == 5


def test_a_npy_of_pickled_objects_is_a_bad_file_named(tmp_path):
    root = split_folders(tmp_path / "data", ms=True)
    np.save(root / "train/a/2.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match=r"2\.npy: unreadable multispectral file \(it holds pickled Python objects"):
        scan_dataset(LeafDataset(root, "train", with_ms=True))


# ---------------------------------------------------------------------------------------------- demo data


def small_demo(root, seed=0):
    return make_demo_dataset(root, seed=seed, per_class=(2, 1, 1), size=16, unlabeled_per_class=0)


def test_a_mistyped_root_with_demo_on_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(kd.data.loaders, "make_demo_dataset", small_demo)
    typo = tmp_path / "dmeo"
    with pytest.raises(
        UserError,
        match=rf"data.root {re.escape(str(typo))} does not exist\. Set data.root to your "
        r"images .* or leave data.root at data/demo for the built-in demo set",
    ):
        prepare_data(DataConfig(root=str(typo), demo=True))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no class folders"):
        prepare_data(DataConfig(root=str(tmp_path / "empty"), demo=True))
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("spelling", ["data/demo", "./data/demo/", "ABSOLUTE"])
def test_the_demo_is_written_at_its_own_folder(tmp_path, monkeypatch, spelling):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(kd.data.loaders, "make_demo_dataset", small_demo)
    root = str(tmp_path / "data/demo") if spelling == "ABSOLUTE" else spelling
    prepare_data(DataConfig(root=root, demo=True))
    assert (tmp_path / "data/demo/train/healthy").is_dir() and (tmp_path / "data/demo/bands.json").is_file()
    prepare_data(DataConfig(root=root, demo=True))  # there now: checked, not written again


def test_the_demo_is_rewritten_in_a_folder_that_holds_its_marker(tmp_path, monkeypatch):
    monkeypatch.setattr(kd.data.loaders, "make_demo_dataset", small_demo)
    elsewhere = small_demo(tmp_path / "my_demo")
    shutil.rmtree(elsewhere / "train")  # its marker (bands.json) is left
    prepare_data(DataConfig(root=str(elsewhere), demo=True))
    assert (elsewhere / "train/healthy").is_dir()
