"""Data files that would load wrong or stop a run: every image mode, 16-bit images, NaN or odd-band MS files,
decompression bombs, truncated images and one-class datasets. Expected values are computed here with numpy."""

import csv
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd.config import DataConfig
from kd.data.dataset import InputSpec, LeafDataset, image_tensor, ms_statistics
from kd.data.loaders import build_loader, open_split
from kd.data.scan import scan_dataset
from kd.errors import UserError

HW = (6, 8)
RNG = np.random.default_rng(0)


def make_data(root: Path, n: int = 4, bands: int = 3) -> Path:
    """<root>/train/{a,b}/<i>.png with a random C×H×W <i>.npy beside each."""
    for cls in "ab":
        folder = root / "train" / cls
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(RNG.integers(0, 256, (*HW, 3), np.uint8)).save(folder / f"{i}.png")
            np.save(folder / f"{i}.npy", RNG.random((bands, *HW), dtype=np.float32))
    return root


def q(path: Path) -> str:
    """`path` as a regular expression that matches it literally."""
    return re.escape(str(path))


def data_config(root: Path, **extra) -> DataConfig:
    return DataConfig(**{"root": str(root), "demo": False, "image_size": 8, "num_workers": 0} | extra)


def png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG (gray H×W or RGB H×W×3), written by hand: Pillow cannot write 16-bit RGB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", array.shape[1], array.shape[0], 16, 2 if array.ndim == 3 else 0, 0, 0, 0)
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in array)  # filter byte 0 (none) per row
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def chw(array: np.ndarray) -> torch.Tensor:
    """H×W (gray, repeated) or H×W×3 values in [0, 1] as float 3×H×W."""
    rgb = np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32))


# ------------------------------------------------------------------------------------------ image modes


@pytest.mark.parametrize("shape", [(*HW, 3), HW], ids=["rgb", "gray"])
def test_16_bit_images_load_like_the_same_8_bit_image(tmp_path, shape):
    eight = RNG.integers(0, 256, shape, np.uint8)
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    Image.fromarray(eight).save(folder / "8.png")
    (folder / "16.png").write_bytes(png16(eight.astype(np.uint16) * 257))
    if len(shape) == 2:  # Pillow writes 16-bit gray TIFFs (little-endian, where the PNG is big-endian)
        Image.fromarray(eight.astype(np.uint16) * 257).save(folder / "16_tiff.tif")
    (tmp_path / "train" / "b").mkdir()
    Image.fromarray(eight).save(tmp_path / "train" / "b" / "other_class.png")
    ds = LeafDataset(tmp_path, "train")
    expected = chw(eight / 255)
    loaded = {p.name: ds.read(i)[0] for i, (p, label) in enumerate(ds.samples) if label == 0}
    assert len(loaded) == (2 if len(shape) == 3 else 3)
    for name, rgb in loaded.items():
        assert torch.allclose(rgb, expected, atol=1 / 255), name


def _modes() -> dict[str, tuple[Image.Image, np.ndarray]]:
    """{mode: (image, expected H×W[×3] values in [0, 1])}, the expected values from numpy alone."""
    h, w = HW
    rgb = RNG.integers(0, 256, (h, w, 3), np.uint8)
    gray, alpha = rgb[..., 0], RNG.integers(0, 256, HW, np.uint8)
    palette = RNG.integers(0, 256, (256, 3), np.uint8)
    index = RNG.integers(0, 256, HW, np.uint8)

    def raw(mode: str, *planes: np.ndarray, dtype=np.uint8) -> Image.Image:
        return Image.frombytes(mode, (w, h), np.dstack(planes).astype(dtype).tobytes())

    paletted, paletted_alpha = raw("P", index), raw("PA", index, alpha)
    for im in (paletted, paletted_alpha):
        im.putpalette(palette.tobytes())
    top31, gray16 = 2**31 - 1, gray.astype(np.uint16) * 257
    return {
        "1": (Image.fromarray(gray > 127), (gray > 127) * 1.0),
        "L": (raw("L", gray), gray / 255),
        "LA": (raw("LA", gray, alpha), gray / 255),
        "P": (paletted, palette[index] / 255),
        "PA": (paletted_alpha, palette[index] / 255),
        "RGB": (raw("RGB", rgb), rgb / 255),
        "RGBA": (raw("RGBA", rgb, alpha), rgb / 255),
        "CMYK": (raw("CMYK", 255 - rgb, np.zeros(HW)), rgb / 255),  # no black ink: R = 255 - C
        "I;16": (raw("I;16", gray16, dtype="<u2"), gray / 255),
        "I;16L": (raw("I;16L", gray16, dtype="<u2"), gray / 255),
        "I;16B": (raw("I;16B", gray16, dtype=">u2"), gray / 255),
        "I": (raw("I", np.round(gray / 255 * top31), dtype=np.int32), gray / 255),
        "F": (raw("F", gray / 255, dtype=np.float32), gray / 255),
    }


MODES = _modes()


@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_loads_as_rgb_in_0_1(mode):
    im, expected = MODES[mode]
    assert im.mode == mode
    assert torch.allclose(image_tensor(im), chw(expected), atol=1 / 255)


def test_ycbcr_loads_as_rgb():
    rgb = RNG.integers(0, 256, (*HW, 3)).astype(np.float64)
    r, g, b = rgb.transpose(2, 0, 1)
    y = 0.299 * r + 0.587 * g + 0.114 * b  # JPEG's (full-range BT.601) conversion
    cb, cr = 128 + (b - y) / 1.772, 128 + (r - y) / 1.402
    ycc = np.round(np.dstack([y, cb, cr])).clip(0, 255).astype(np.uint8)
    im = Image.frombytes("YCbCr", HW[::-1], ycc.tobytes())
    assert torch.allclose(image_tensor(im), chw(rgb / 255), atol=3 / 255)  # rounding in both directions


@pytest.mark.parametrize("values", [[0.0, 255.0], [0.5, np.nan], [-1.0, 0.5]], ids=["0-255", "nan", "negative"])
def test_float_images_outside_0_1_are_refused(tmp_path, values):
    im = Image.frombytes("F", (2, 1), np.array(values, np.float32).tobytes())
    with pytest.raises(ValueError, match=r"mode F pixels span .* does not map to \[0, 1\]"):
        image_tensor(im)
    root = make_data(tmp_path, n=2, bands=3)
    im.save(root / "train" / "a" / "float.tif")
    with pytest.raises(UserError, match=r"float.tif: unreadable image \(mode F pixels span"):
        scan_dataset(LeafDataset(root, "train"))


# ------------------------------------------------------------------------------------------- MS files


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_ms_values_are_found_named_and_skipped(tmp_path, value):
    root = make_data(tmp_path)
    bad = root / "train" / "b" / "2.npy"
    stack = np.load(bad)
    stack[1, 2, 3] = value
    np.save(bad, stack)
    ds = LeafDataset(root, "train", with_ms=True)
    with pytest.raises(
        UserError, match=rf"the multispectral band statistics are not finite: NaN or infinite values in {q(bad)}\."
    ):
        ms_statistics(ds)  # also when no scan ran first
    with pytest.raises(
        UserError, match=rf"1 of 8 samples have bad files:\n  {q(bad)}: NaN or infinite values \(1 of 144\)"
    ):
        scan_dataset(ds)
    with pytest.warns(UserWarning, match="skipped 1"):
        assert scan_dataset(ds, on_bad_file="skip") == [
            (bad, "NaN or infinite values (1 of 144); fix or delete the file")
        ]
    kept = np.stack([np.load(p.with_suffix(".npy")) for p, _ in ds.samples]).astype(np.float64)
    assert len(kept) == 7
    mean, std = ms_statistics(ds)
    assert np.allclose(mean, kept.mean(axis=(0, 2, 3))) and np.allclose(std, kept.std(axis=(0, 2, 3), ddof=1))


def test_ms_files_with_another_band_count_are_found_named_and_skipped(tmp_path):
    root = make_data(tmp_path, bands=3)
    odd = root / "train" / "a" / "1.npy"
    np.save(odd, RNG.random((5, *HW), dtype=np.float32))
    with pytest.raises(UserError, match=rf"1 of 8 samples have bad files:\n  {q(odd)}: 5 bands, but 7 of 8 .* have 3"):
        scan_dataset(LeafDataset(root, "train", with_ms=True))
    assert scan_dataset(LeafDataset(root, "train", with_ms=True, ms_bands=[0, 2])) == []  # counted after the pick
    cfg = data_config(root, on_bad_file="skip")
    with pytest.warns(UserWarning, match="skipped 1"):
        raw_ms = InputSpec(8, ms_mean=[0.0], ms_std=[1.0])  # MS as stored: one mean and std serve every band
        loader = build_loader(cfg, raw_ms, "train", batch_size=7, train=False)
    assert odd.with_suffix(".png") not in [p for p, _ in loader.dataset.samples]
    assert next(iter(loader))["ms"].shape == (7, 3, 8, 8)  # one batch of all 7: the band counts stack


@pytest.mark.parametrize("first", ["odd", "truncated"])
def test_zero_filled_stacks_get_the_usual_band_count(tmp_path, first):
    root = make_data(tmp_path, bands=3)
    path = root / "train" / "a" / "0.npy"  # the first MS file, which the zero-filled band count was taken from
    np.save(path, RNG.random((5, *HW), dtype=np.float32))
    if first == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    (root / "train" / "a" / "1.npy").unlink()
    with pytest.warns(UserWarning):
        ds = open_split(data_config(root, on_bad_file="skip", ms_missing="zeros"), "train", with_ms=True)
    index = [p.name for p, _ in ds.samples].index("1.png")
    assert torch.equal(ds.read(index)[1], torch.zeros(3, *HW))


# ------------------------------------------------------------------------------------- broken images


def test_decompression_bomb_is_named_and_skipped(tmp_path):
    root = make_data(tmp_path, n=3)
    bomb = root / "train" / "a" / "1.png"
    data = bytearray(bomb.read_bytes())
    data[16:24] = struct.pack(">II", 30000, 30000)  # IHDR width and height
    data[29:33] = struct.pack(">I", zlib.crc32(data[12:29]))  # the IHDR checksum, so only the size is wrong
    bomb.write_bytes(data)
    assert bomb.stat().st_size < 1000
    ds = LeafDataset(root, "train")
    with pytest.raises(UserError, match=rf"cannot read image {q(bomb)}: Image size \(900000000 pixels\)"):
        ds.read([p for p, _ in ds.samples].index(bomb))
    with pytest.raises(UserError, match=rf"{q(bomb)}: unreadable image \(Image size"):
        scan_dataset(ds)
    with pytest.warns(UserWarning, match="skipped 1"):
        assert [p for p, _ in scan_dataset(ds, on_bad_file="skip")] == [bomb]


def test_truncated_png_and_jpeg_are_found_by_the_scan_and_skipped(tmp_path):
    root = make_data(tmp_path, n=4)
    noise = RNG.integers(0, 256, (64, 64, 3), np.uint8)  # noise: no compressor shrinks it much
    png, jpeg = root / "train" / "a" / "big.png", root / "train" / "b" / "big.jpg"
    for path in (png, jpeg):
        Image.fromarray(noise).save(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with Image.open(path) as im:
            assert im.size == (64, 64)  # the header is intact: only decoding finds the damage
    with pytest.raises(UserError, match="2 of 10 samples have bad files") as error:
        scan_dataset(LeafDataset(root, "train"))
    assert f"{png}: unreadable image (" in str(error.value) and f"{jpeg}: unreadable image (" in str(error.value)
    with pytest.warns(UserWarning, match="skipped 2"):
        loader = build_loader(data_config(root, on_bad_file="skip"), InputSpec(8), "train", batch_size=4, train=True)
    assert sum(len(batch["label"]) for batch in loader) == 8  # all that is left, without a crash


# ------------------------------------------------------------------------------------------ one class


def test_a_dataset_of_one_class_is_refused(tmp_path):
    root = make_data(tmp_path / "split_folders", n=4)
    (root / "train" / "b").rename(root / "b_elsewhere")
    with pytest.raises(UserError, match=rf"{q(root / 'train')} has only the class 'a': .*needs at least 2 classes"):
        LeafDataset(root, "train")

    folder = tmp_path / "one_folder"
    (root / "train").rename(folder)
    with pytest.raises(UserError, match=rf"{q(folder)} has only the class 'a': .*needs at least 2 classes"):
        LeafDataset(folder, "train")
    assert not (folder / "splits.json").exists()  # refused before a split is drawn

    manifest = tmp_path / "one.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *[(f"one_folder/a/{i}.png", "a") for i in range(4)]])
    with pytest.raises(UserError, match=rf"{q(manifest)} has only the class 'a': .*needs at least 2"):
        LeafDataset("unused", "train", manifest=manifest)
