"""Multispectral (MS) band stacks: finding, reading and checking them, whatever their layout on disk.

A stack is a .npy array (H×W×C, C×H×W, or H×W for one band) or a TIFF (several pages: one band per page; one page:
H×W×C or H×W). Only numpy and Pillow are used: no extra dependency for TIFF.
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from kd.errors import UserError

MS_SUFFIXES = (".npy", ".tif", ".tiff")


def find_ms(stem: Path, image: Path) -> Path | None:
    """The MS file <stem>.npy / .tif / .tiff, never the image itself (a .tif image may share the stem)."""
    for suffix in MS_SUFFIXES:
        candidate = stem.with_suffix(suffix)
        if candidate != image and candidate.is_file():
            return candidate
    return None


def band_indices(bands: list, folders: list[Path]) -> list[int] | None:
    """`ms_bands` as indices: ints stay, names are looked up in bands.json ({"bands": [...]}) of `folders`."""
    if not bands:
        return None  # all bands
    if all(isinstance(b, int) for b in bands):
        return list(bands)
    files = [f / "bands.json" for f in folders if (f / "bands.json").is_file()]
    if not files:
        raise UserError(f"data.ms_bands {bands} uses names, but there is no bands.json in {folders[-1]}")
    names = json.loads(files[0].read_text())["bands"]
    unknown = [b for b in bands if not isinstance(b, int) and b not in names]
    if unknown:
        raise UserError(f"data.ms_bands: {unknown} not in {files[0]}, which names the bands {names}")
    return [b if isinstance(b, int) else names.index(b) for b in bands]


def ms_header(path: Path) -> tuple[tuple[int, ...], bool]:
    """(array shape, whether it is a multi-page TIFF — one band per page) without reading the pixels."""
    if path.suffix.lower() == ".npy":
        return np.load(path, mmap_mode="r").shape, False
    with Image.open(path) as im:
        pages = getattr(im, "n_frames", 1)
        bands = len(im.getbands())
        if pages > 1:
            return (pages, im.height, im.width), True
        return ((im.height, im.width, bands) if bands > 1 else (im.height, im.width)), False


def read_ms(path: Path, hw: tuple[int, int], layout: str = "auto", bands: list[int] | None = None) -> np.ndarray:
    """An MS stack as float32 C×H×W for an image of size `hw`: .npy (H×W×C, C×H×W or H×W) or a (multi-page) TIFF."""
    try:
        if path.suffix.lower() == ".npy":
            array, pages = np.load(path), False
        else:
            with Image.open(path) as im:
                frames = [np.array(page) for page in ImageSequence.Iterator(im)]
            array, pages = (np.stack(frames), True) if len(frames) > 1 else (frames[0], False)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        hint = "" if path.suffix.lower() == ".npy" else " (Pillow reads one band per page, or 1-4 channels per page)"
        raise UserError(f"cannot read multispectral file {path}: {e}{hint}; re-save it as .npy") from None
    axis, bands = pick_bands(array.shape, hw, "chw" if pages else layout, bands, path)
    array = array[None] if axis is None else np.moveaxis(array, axis, 0)
    return np.ascontiguousarray(array if bands is None else array[bands], dtype=np.float32)


def pick_bands(shape: tuple, hw: tuple, layout: str, bands: list[int] | None, path: Path) -> tuple:
    """(band axis or None for a single-band H×W array, checked band indices) — errors say how to fix the file."""
    if tuple(shape) == tuple(hw):
        axis, count = None, 1
    else:
        fits = {"chw": len(shape) == 3 and tuple(shape[1:]) == hw, "hwc": len(shape) == 3 and tuple(shape[:2]) == hw}
        found = [k for k, ok in fits.items() if ok and layout in ("auto", k)]
        if not found:
            raise UserError(
                f"{path} has shape {tuple(shape)}, which does not fit its {hw[0]}×{hw[1]} image as "
                f"{'H×W×C or C×H×W' if layout == 'auto' else layout.upper()}; re-save it at the image's size"
            )
        if len(found) > 1:
            raise UserError(f"{path} has shape {tuple(shape)}: either axis could hold the bands; set data.ms_layout")
        axis = 0 if found[0] == "chw" else 2
        count = shape[axis]
    if bands is not None and any(not -count <= b < count for b in bands):
        raise UserError(f"data.ms_bands {bands} asks for bands {path} lacks: it has {count}")
    return axis, bands
