"""Multispectral (MS) band stacks, .npy or TIFF, found, read and checked; values kept as stored."""

import json
import math
import os
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageSequence

from kd.errors import UserError

MS_SUFFIXES = (".npy", ".tif", ".tiff")

# What reading a broken or hostile file raises, found by fuzzing truncated and bit-flipped files: SyntaxError (some
# broken PNG chunks); DecompressionBombError (a header claiming a huge size) is not an OSError.
FILE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

# What tifffile raises on a damaged TIFF besides ValueError (found by fuzzing); read_tiff makes them a ValueError.
TIFF_DAMAGE = (zlib.error, struct.error, ArithmeticError, IndexError, KeyError, TypeError)


def find_ms(stem: Path, image: Path) -> Path | None:
    """<stem>.npy / .tif / .tiff, never the image itself. A FIFO or folder there counts: the scan names it as bad
    instead of zero-filling its bands as if it were missing."""
    for suffix in MS_SUFFIXES:
        candidate = stem.with_suffix(suffix)
        if candidate != image and os.path.exists(candidate):  # os.path: False for a too-long name, no OSError
            return candidate
    return None


def require_regular(path: Path) -> None:
    """Raise OSError unless a regular file: opening a FIFO waits for a writer (the scan hung, silent), a device reads
    without end, a folder fails with a confusing error."""
    mode = os.stat(path).st_mode  # follows symlinks: a link to a regular file is fine
    if not stat.S_ISREG(mode):
        kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket", stat.S_ISDIR: "a folder"}
        kind = next((name for test, name in kinds.items() if test(mode)), "a device or other special file")
        raise OSError(f"not a regular file but {kind}")


def band_indices(bands: list, folders: list[Path]) -> list[int] | None:
    """`ms_bands` as indices: names are looked up in bands.json ({"bands": [...]}) of `folders`."""
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
    """The array as stored, and whether its band axis is known to be the first (a TIFF says, a .npy does not). A
    broken file raises one of FILE_ERRORS; callers name the file."""
    require_regular(path)
    array, bands_first = (read_npy(path), False) if path.suffix.lower() == ".npy" else read_tiff(path)
    if array.dtype.kind not in "biuf":  # strings, complex numbers, records: no band values to train on
        raise ValueError(f"it holds {array.dtype} values, not real numbers")
    return array, bands_first


def read_npy(path: Path) -> np.ndarray:
    """A header claiming more bytes than the file holds is refused before numpy allocates them all (a 200-byte file
    claiming 93 GiB), and pickled objects too: loading them runs code from the file."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:  # 3.0 only adds UTF-8 field names: structured arrays, no band values
            raise ValueError(f".npy format version {version[0]}.{version[1]}; re-save it with numpy.save")
        if dtype.hasobject:
            raise ValueError("it holds pickled Python objects, not numbers; re-save it as a numeric array")
        claimed, held = math.prod(shape) * dtype.itemsize, os.fstat(f.fileno()).st_size - f.tell()
        if claimed > held:
            raise ValueError(
                f"its header claims a {'×'.join(map(str, shape))} {dtype} array ({claimed} bytes), but the file "
                f"holds {held}: it is truncated or damaged"
            )
    return np.load(path, allow_pickle=False)


def read_tiff(path: Path) -> tuple[np.ndarray, bool]:
    """As load_ms returns it, thumbnails left out. A compression tifffile needs the optional imagecodecs for (LZW,
    PackBits, JPEG) falls back to Pillow, one band per page."""
    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.series) > 1:  # tifffile starts a new series where the pages' size or type changes
                raise ValueError(
                    f"it holds {len(tif.series)} images of different sizes or types, not one stack; re-save it with "
                    "every band the same size and type"
                )
            series = tif.series[0]
            # more values than the largest RGB image Pillow decodes (it refuses twice MAX_IMAGE_PIXELS): refused before
            # any memory is allocated, as a PNG claiming that size would be
            limit = math.inf if Image.MAX_IMAGE_PIXELS is None else 3 * 2 * Image.MAX_IMAGE_PIXELS
            if int(np.prod(series.shape, dtype=np.float64)) > limit:
                raise Image.DecompressionBombError(
                    f"its header claims a {'×'.join(map(str, series.shape))} stack, over {limit} values (3 × 2 × "
                    "PIL.Image.MAX_IMAGE_PIXELS): the file is damaged, or raise Image.MAX_IMAGE_PIXELS"
                )
            array = series.asarray(maxworkers=1)  # the start-up scan already reads files in parallel
    except (ValueError, *TIFF_DAMAGE) as e:
        if "imagecodecs" in str(e):  # "<COMPRESSION.LZW: 5> requires the 'imagecodecs' package": Pillow may read it
            try:
                with Image.open(path) as im:
                    frames = [np.array(page) for page in ImageSequence.Iterator(im)]
            except FILE_ERRORS as pillow:
                raise ValueError(f"{e} (`pip install imagecodecs`); Pillow cannot read it either ({pillow})") from None
            return (np.stack(frames), True) if len(frames) > 1 else (frames[0], False)
        if isinstance(e, ValueError):  # tifffile's own message (TiffFileError), or ours
            raise
        raise ValueError(f"damaged TIFF: {e or type(e).__name__}") from None
    if "S" in series.axes:  # samples per pixel: the bands of one page, interleaved (…YXS) or planar (SYX)
        return np.moveaxis(array, series.axes.index("S"), 0), True
    # pages of one band each, unless tifffile wrote the array and recorded its shape ("shaped"): then as a .npy
    return array, array.ndim == 3 and series.kind != "shaped"


def read_ms(path: Path, hw: tuple[int, int], layout: str = "auto", bands: list[int] | None = None) -> np.ndarray:
    """An MS stack as float32 C×H×W for an image of size `hw`."""
    try:
        array, bands_first = load_ms(path)
    except FILE_ERRORS as e:
        raise UserError(f"cannot read multispectral file {path}: {e}; fix it or re-save it as .npy") from None
    return ms_stack(array, bands_first, hw, layout, bands, path)


def ms_stack(
    array: np.ndarray, bands_first: bool, hw: tuple[int, int], layout: str, bands: list[int] | None, path: Path
) -> np.ndarray:
    """`array` as read by load_ms, as the float32 C×H×W stack of the chosen bands; UserError naming `path`."""
    shape, layout = array.shape, "chw" if bands_first else layout
    if tuple(shape) == tuple(hw):  # one band
        array, count = array[None], 1
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
        array, count = np.moveaxis(array, axis, 0), shape[axis]
    if bands is not None and any(not -count <= b < count for b in bands):
        raise UserError(f"data.ms_bands {bands} asks for bands {path} lacks: it has {count}")
    return np.ascontiguousarray(array if bands is None else array[bands], dtype=np.float32)
