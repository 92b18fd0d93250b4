"""Multispectral (MS) band stacks: finding, reading and checking them, whatever their layout on disk.

A stack is a .npy array (H×W×C, C×H×W, or H×W for one band) or a TIFF (several pages: one band per page; one page:
H×W×C or H×W). Only numpy and Pillow are used: no extra dependency for TIFF.
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

from kd.errors import UserError

MS_SUFFIXES = (".npy", ".tif", ".tiff")

# What reading a broken or hostile image or array raises: OSError (UnidentifiedImageError is one, and so is a
# truncated file), ValueError (numpy, Pillow), SyntaxError (some broken PNG chunks) and DecompressionBombError (a
# header claiming a huge size), which is not an OSError. Found by fuzzing truncated and bit-flipped files.
FILE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


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


def load_ms(path: Path) -> tuple[np.ndarray, bool]:
    """The whole array of an MS file, as stored, and whether it is a multi-page TIFF (one band per page).

    A broken file raises one of FILE_ERRORS; callers name the file.
    """
    if path.suffix.lower() == ".npy":
        array, pages = np.load(path), False
    else:
        with Image.open(path) as im:
            frames = [np.array(page) for page in ImageSequence.Iterator(im)]
        array, pages = (np.stack(frames), True) if len(frames) > 1 else (frames[0], False)
    if array.dtype.kind not in "biuf":  # strings, complex numbers, records: no band values to train on
        raise ValueError(f"it holds {array.dtype} values, not real numbers")
    return array, pages


def read_ms(path: Path, hw: tuple[int, int], layout: str = "auto", bands: list[int] | None = None) -> np.ndarray:
    """An MS stack as float32 C×H×W for an image of size `hw`: .npy (H×W×C, C×H×W or H×W) or a (multi-page) TIFF."""
    try:
        array, pages = load_ms(path)
    except FILE_ERRORS as e:
        hint = "" if path.suffix.lower() == ".npy" else " (Pillow reads one band per page, or 1-4 channels per page)"
        raise UserError(f"cannot read multispectral file {path}: {e}{hint}; re-save it as .npy") from None
    return ms_stack(array, pages, hw, layout, bands, path)


def ms_stack(
    array: np.ndarray, pages: bool, hw: tuple[int, int], layout: str, bands: list[int] | None, path: Path
) -> np.ndarray:
    """`array` as read by load_ms, as the float32 C×H×W stack of the chosen bands; UserError naming `path`."""
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
