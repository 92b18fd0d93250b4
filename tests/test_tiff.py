"""Multispectral TIFFs as cameras and GIS tools write them (kd/data/multispectral.py, read with tifffile): every layout,
sample type and compression reads back the values written, and broken files are named. Files are written here with
tifffile; the expected stacks are the written arrays, moved to C×H×W with numpy."""

import importlib.util
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from kd.data.dataset import LeafDataset, ms_statistics
from kd.data.multispectral import read_ms
from kd.data.scan import scan_dataset
from kd.errors import UserError

HW = (6, 8)  # not square: a C×H×W array can never pass for H×W×C
RNG = np.random.default_rng(0)


def stack_of(dtype: str, bands: int = 5) -> np.ndarray:
    """A C×H×W stack spanning `dtype`'s range (integers to their maximum, floats signed and fractional)."""
    if np.dtype(dtype).kind == "f":
        return (RNG.standard_normal((bands, *HW)) * 1000).astype(dtype)
    return RNG.integers(0, np.iinfo(dtype).max, (bands, *HW), endpoint=True).astype(dtype)


def interleaved(path: Path, stack: np.ndarray, **options) -> Path:
    """One page, the bands as its samples (H×W×C, PlanarConfiguration 1): how drone cameras export stacks."""
    tifffile.imwrite(path, stack.transpose(1, 2, 0), photometric="minisblack", planarconfig="contig", **options)
    return path


def planar(path: Path, stack: np.ndarray, **options) -> Path:
    """One page, the bands as its samples stored one plane after the other (C×H×W, PlanarConfiguration 2)."""
    tifffile.imwrite(path, stack, photometric="minisblack", planarconfig="separate", **options)
    return path


def one_band_per_page(path: Path, stack: np.ndarray, **options) -> Path:
    """A page per band, with no shape record of tifffile's: as other tools write band sequences."""
    with tifffile.TiffWriter(path) as tif:
        for band in stack:
            tif.write(band, photometric="minisblack", metadata=None, **options)
    return path


CASES = {
    "planar-float32": (planar, "float32", 5, {}),
    "interleaved-uint8": (interleaved, "uint8", 5, {}),
    "interleaved-uint16": (interleaved, "uint16", 5, {}),
    "interleaved-float32": (interleaved, "float32", 5, {}),
    "interleaved-4-band-uint16": (interleaved, "uint16", 4, {}),
    "interleaved-uint16-zlib": (interleaved, "uint16", 5, {"compression": "zlib"}),
    "planar-uint16-deflate": (planar, "uint16", 5, {"compression": "adobe_deflate"}),
    "interleaved-float32-tiled-zlib": (interleaved, "float32", 5, {"compression": "zlib", "tile": (16, 16)}),
    "pages-uint16": (one_band_per_page, "uint16", 5, {}),
    "pages-float32-zlib": (one_band_per_page, "float32", 3, {"compression": "zlib"}),
}


@pytest.mark.parametrize("case", CASES)
def test_every_tiff_layout_reads_back_the_values_written(tmp_path, case):
    write, dtype, bands, options = CASES[case]
    stack = stack_of(dtype, bands)
    path = write(tmp_path / "x.tif", stack, **options)
    got = read_ms(path, HW)
    assert got.dtype == np.float32 and got.shape == (bands, *HW)
    # values as stored, integer types not rescaled: the per-band statistics normalize them
    assert np.array_equal(got, stack.astype(np.float32))
    assert np.array_equal(read_ms(path, HW, bands=[2, 0]), stack[[2, 0]].astype(np.float32))


def test_the_tiff_says_where_its_bands_are_even_on_a_square_image(tmp_path):
    """4 bands of a 4×4 image: as .npy either axis could hold the bands; the TIFF's own layout decides."""
    stack = RNG.integers(0, 65535, (4, 4, 4)).astype(np.uint16)
    for write in (interleaved, planar, one_band_per_page):
        path = write(tmp_path / f"{write.__name__}.tif", stack)
        assert np.array_equal(read_ms(path, (4, 4)), stack.astype(np.float32)), write.__name__


def test_an_array_saved_with_tifffile_reads_like_the_same_npy(tmp_path):
    """tifffile.imwrite(path, hwc_array) records the array's shape and stores it as pages of rows; it is read back
    as that array, its band axis found by the image size as for a .npy."""
    stack = stack_of("float32")
    tifffile.imwrite(tmp_path / "hwc.tif", stack.transpose(1, 2, 0))
    tifffile.imwrite(tmp_path / "chw.tif", stack)
    for name in ("hwc.tif", "chw.tif"):
        assert np.array_equal(read_ms(tmp_path / name, HW), stack), name


def test_pillow_lzw_pages_still_read_without_imagecodecs(tmp_path):
    """LZW needs the optional imagecodecs in tifffile; Pillow reads such one-band-per-page files, as before."""
    stack = stack_of("float32", 3)
    pages = [Image.fromarray(band) for band in stack]
    pages[0].save(tmp_path / "lzw.tif", save_all=True, append_images=pages[1:], compression="tiff_lzw")
    assert np.array_equal(read_ms(tmp_path / "lzw.tif", HW), stack)


@pytest.mark.skipif(importlib.util.find_spec("imagecodecs") is not None, reason="imagecodecs decodes LZW")
def test_a_tiff_neither_reader_decodes_names_the_missing_package(tmp_path):
    path = interleaved(tmp_path / "x.tif", stack_of("uint16"), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].tags["Compression"].valueoffset
    with open(path, "r+b") as f:  # claim LZW, which only imagecodecs decodes and Pillow cannot for 5 samples
        f.seek(offset)
        f.write(struct.pack("<H", 5))
    with pytest.raises(UserError, match=r"x.tif: .*LZW.*imagecodecs.*pip install imagecodecs.*Pillow cannot"):
        read_ms(path, HW)


# ------------------------------------------------------------------------------------ a dataset of TIFF stacks


def make_data(root: Path, bands: dict | None = None) -> Path:
    """<root>/train/{a,b}/<i>.png, each with an interleaved uint16 stack <i>.tif (5 bands unless `bands` says)."""
    for cls in "ab":
        (root / "train" / cls).mkdir(parents=True)
        for i in range(3):
            stem = root / "train" / cls / str(i)
            Image.fromarray(RNG.integers(0, 256, (*HW, 3), np.uint8)).save(stem.with_suffix(".png"))
            interleaved(stem.with_suffix(".tif"), stack_of("uint16", (bands or {}).get(f"{cls}/{i}", 5)))
    return root


def test_a_dataset_of_interleaved_tiffs_scans_reads_and_has_statistics(tmp_path):
    root = make_data(tmp_path)
    ds = LeafDataset(root, "train", with_ms=True)
    assert len(ds) == 6 and scan_dataset(ds) == []  # each .tif beside a .png is its MS stack, not an image
    stacks = [tifffile.imread(ds.ms_files[path]).transpose(2, 0, 1).astype(np.float64) for path, _ in ds.samples]
    for index, expected in enumerate(stacks):
        assert np.array_equal(ds.read(index)[1].numpy(), expected)
    mean, std = ms_statistics(ds)
    everything = np.concatenate([s.reshape(5, -1) for s in stacks], axis=1)
    assert np.allclose(mean, everything.mean(1), rtol=1e-6) and np.allclose(std, everything.std(1, ddof=1), rtol=1e-6)


def test_odd_band_counts_nan_and_broken_tiffs_are_named_by_the_scan(tmp_path):
    root = make_data(tmp_path, bands={"a/1": 4})
    odd = root / "train" / "a" / "1.tif"
    nan = root / "train" / "b" / "0.tif"
    values = stack_of("float32")
    values[2, 1, 1] = np.nan
    interleaved(nan, values)
    truncated = root / "train" / "b" / "1.tif"
    interleaved(truncated, stack_of("uint16"), compression="zlib")
    truncated.write_bytes(truncated.read_bytes()[:-40])
    mixed = root / "train" / "b" / "2.tif"
    with tifffile.TiffWriter(mixed) as tif:  # one band of another type: not one stack
        for band in [*stack_of("uint16", 4), stack_of("float32", 1)[0]]:
            tif.write(band, photometric="minisblack", metadata=None)
    ds = LeafDataset(root, "train", with_ms=True)
    with pytest.raises(UserError, match="4 of 6 samples have bad files") as raised:
        scan_dataset(ds)
    message = str(raised.value)
    assert f"{odd}: 4 bands, but 2 of 3 multispectral files have 5" in message
    assert f"{nan}: NaN or infinite values (1 of 240)" in message
    assert re.search(
        rf"{re.escape(str(truncated))}: unreadable multispectral file \(damaged TIFF: .*truncated", message
    )
    assert f"{mixed}: unreadable multispectral file (it holds 2 images of different sizes or types" in message


def test_a_tiff_claiming_a_huge_stack_is_refused_before_reading(tmp_path, monkeypatch):
    path = interleaved(tmp_path / "x.tif", stack_of("uint8"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 39)  # 240 values > 3 × 2 × 39, as a damaged header would claim
    with pytest.raises(UserError, match=r"x.tif: its header claims a 6×8×5 stack, over 234 values"):
        read_ms(path, HW)
