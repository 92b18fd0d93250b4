"""Data: leaf images with optional multispectral (MS) band stacks, aligned transforms, loaders.

Layouts (see kd/data/layouts.py): <root>/<split>/<class>/<image>, one <root>/<class>/<image> folder split once into a
saved split file, or a CSV manifest. The MS stack of an image is <image>.npy (H×W×C or C×H×W) or a multi-band
<image>.tif, beside it or at the same relative path under `ms_root`. A batch is {"rgb": B×3×H×W, "ms": B×C×H×W
(when asked), "label": B}.
"""

import copy
import hashlib
import inspect
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torchvision.io
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, Sampler

from kd.config import DataConfig
from kd.data.augment import RandAugment, parse_randaugment
from kd.data.demo import (  # noqa: F401 (DEMO_BANDS, DEMO_CLASSES, make_demo_dataset: re-exported)
    DEMO_BANDS,
    DEMO_CLASSES,
    DEMO_ROOT,
    check_demo_version,
    is_demo_set,
    make_demo_dataset,
    may_write_demo,
)
from kd.data.layouts import IMAGE_SUFFIXES, SPLITS, list_split, shown
from kd.data.mixing import Mixing, MixingCollate
from kd.data.multispectral import FILE_ERRORS, band_indices, find_ms, load_ms, ms_stack, read_ms, require_regular
from kd.errors import UserError


@dataclass
class InputSpec:
    """What a model is fed, as the loaders prepare it: the side of its square input, the RGB normalization and, for
    a model that also reads MS band stacks, their per-band normalization and the bands picked from each stack.
    Every checkpoint records its model's in its metadata."""

    image_size: int | None  # None: each image at its stored size (loaders only; checkpoints always record one)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_DEFAULT_MEAN))  # timm's, when no model says
    std: list[float] = field(default_factory=lambda: list(IMAGENET_DEFAULT_STD))
    ms_mean: list[float] | None = None  # None: the model reads RGB only
    ms_std: list[float] | None = None
    ms_bands: list = field(default_factory=list)  # band indices or names (bands.json); [] = all

    @property
    def with_ms(self) -> bool:
        return self.ms_mean is not None

    def rgb(self) -> dict:
        """{"image_size", "mean", "std"}: the part kd.distill.teachers.adapt_view converts between."""
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}


class LeafDataset(Dataset):
    """One split of a leaf-image dataset; with `with_ms`, also each image's MS band stack.

    `samples` is [(image path, label)]; `ms_files` maps an image path to its MS file (None: missing, zero-filled).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        classes: list[str] | None = None,
        with_ms: bool = False,
        transform: Optional["PairedTransform"] = None,
        *,
        manifest: str | Path = "",
        split_file: str | Path = "",
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        ms_root: str | Path = "",
        ms_bands: list | tuple = (),
        ms_missing: str = "error",
        ms_layout: str = "auto",
    ):
        _check_choice("data.ms_missing", ms_missing, ("error", "zeros"))
        _check_choice("data.ms_layout", ms_layout, ("auto", "hwc", "chw"))
        listing = list_split(root, split, manifest, split_file, (val_fraction, test_fraction, split_seed))
        if classes is None:
            classes = listing.classes
        elif sorted(classes) != sorted(listing.classes):
            raise UserError(f"{listing.where} has classes {listing.classes}, but the model was trained on {classes}")
        self.classes = list(classes)
        label = {c: i for i, c in enumerate(self.classes)}
        entries = sorted(listing.entries, key=lambda e: (label[e[1]], e[0]))
        self.samples = [(listing.base / rel, label[cls]) for rel, cls in entries]
        if not self.samples:
            raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {listing.where}")
        self.with_ms, self.ms_layout, self.ms_bands, self.ms_files = with_ms, ms_layout, None, {}
        self.digests: dict[Path, bytes] = {}  # image path -> content hash, from scan_dataset (for refuse_leaks)
        self.transform = transform or PairedTransform(image_size=None)
        self.augment_seed = 0
        if with_ms:
            folders = ([Path(ms_root)] if ms_root else []) + [listing.base, Path(root)]
            self.ms_bands = band_indices(list(ms_bands), folders)
            missing = []  # where each absent MS file was looked for
            for rel, _ in entries:
                stem = Path(ms_root) / rel if ms_root else listing.base / rel
                self.ms_files[listing.base / rel] = find_ms(stem, listing.base / rel)
                if self.ms_files[listing.base / rel] is None:
                    missing.append(stem)
            self._zero_bands = self._check_missing_ms(split, missing, ms_missing)

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int, uint8: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """The untransformed sample: RGB as float 3×H×W in [0, 1] (`uint8`: as uint8 0-255 when the image has 8
        bits per channel), MS as float C×H×W (or None), label."""
        path, label = self.samples[index]
        try:
            rgb = load_image(path, uint8)
        except FILE_ERRORS as e:
            raise UserError(f"cannot read image {path}: {e}") from None
        ms = None
        if self.with_ms:
            ms_path = self.ms_files[path]
            if ms_path is None:
                ms = torch.zeros(self._zero_bands, *rgb.shape[1:])
            else:
                ms = torch.from_numpy(read_ms(ms_path, tuple(rgb.shape[1:]), self.ms_layout, self.ms_bands))
        return rgb, ms, label

    def __getitem__(self, key: int) -> dict:
        """Sample `key % len(self)`; with an EpochSampler, `key // len(self)` is the epoch, and the augmentation is
        drawn from a generator seeded by (seed, epoch, sample): the same view whatever the worker count, after a
        resume, or when a teacher's output for it is cached. The sample carries `key`: kd.distill.cache finds its row by
        it."""
        epoch, index = divmod(key, len(self))
        rgb, ms, label = self.read(index, uint8=True)  # PairedTransform crops and resizes RGB in uint8
        generator = torch.Generator().manual_seed(hash((self.augment_seed, epoch, index)) % 2**63)
        sample = self.transform(rgb, ms, generator=generator)
        sample["label"], sample["key"] = label, key
        return sample

    def check(self, index: int) -> tuple[tuple[Path, str] | None, int | None, bytes | None]:
        """((bad file, why) or None when sample `index` reads fine, its MS band count or None, the image's content
        hash or None).

        Decodes the image and reads the MS array in full: a truncated file or a NaN is found here, not mid-epoch.
        """
        path = self.samples[index][0]
        try:
            digest = file_digest(path)  # before decoding: the bytes are then in the page cache
            hw = decoded_size(path)
        except FILE_ERRORS as e:
            return (path, f"unreadable image ({e})"), None, None
        ms_path = self.ms_files.get(path)
        if ms_path is None:
            return None, None, digest
        try:
            array, pages = load_ms(ms_path)
        except FILE_ERRORS as e:
            return (ms_path, f"unreadable multispectral file ({e})"), None, None
        try:
            stack = ms_stack(array, pages, hw, self.ms_layout, self.ms_bands, ms_path)
        except UserError as e:
            return (ms_path, str(e)), None, None
        bad = int((~np.isfinite(stack)).sum())
        if bad:  # one NaN makes the band statistics NaN, and with them every training step
            return (ms_path, f"NaN or infinite values ({bad} of {stack.size}); fix or delete the file"), None, None
        return None, len(stack), digest

    def _check_missing_ms(self, split: str, missing: list[Path], policy: str) -> int:
        """Refuse (or warn once about) images without an MS file; return the band count used to zero-fill them."""
        if not missing:
            return 0
        expected = f"{shown(missing[0].with_suffix('.npy'))} (or .tif / .tiff)"
        first = f"{len(missing)} of {len(self.ms_files)} {split} images have no multispectral file, e.g. {expected}"
        if policy == "error":
            raise UserError(f"{first}. Add the files, or set data.ms_missing=zeros to zero-fill their bands.")
        present = [i for i, (p, _) in enumerate(self.samples) if self.ms_files[p] is not None]
        if not present:
            raise UserError(f"{first}, and none has one: check data.ms_root and the file names")
        warnings.warn(f"{first}; their bands are zero-filled (data.ms_missing=zeros)", stacklevel=3)
        for index in present[:-1]:  # a first guess: scan_dataset sets the band count most files have
            try:
                return self.read(index)[1].shape[0]
            except UserError:
                pass  # a broken file, which scan_dataset reports or skips
        return self.read(present[-1])[1].shape[0]


def load_image(path: Path, uint8: bool = False) -> torch.Tensor:
    """The image at `path`, decoded in full, as float 3×H×W in [0, 1]; a broken file raises one of FILE_ERRORS.

    `uint8`: an image with 8 bits per channel comes as uint8 3×H×W (0-255) instead. A JPEG or PNG is then decoded by
    torchvision (libjpeg-turbo, libpng: 1.4-1.5x Pillow's decode and conversion; for PNGs the same pixels); what it
    does not decode to 8-bit RGB, Pillow does. 16-bit, 32-bit and float images stay float in [0, 1]."""
    require_regular(path)
    if uint8 and Path(path).suffix.lower() in TORCHVISION_DECODES:
        try:
            rgb = torchvision.io.decode_image(str(path), torchvision.io.ImageReadMode.RGB)
            if rgb.dtype == torch.uint8:
                return rgb
        except RuntimeError:
            pass  # a file torchvision cannot decode, or a broken one: Pillow decodes it, or says why not
    with Image.open(path) as im:
        if uint8 and not _wide(im):
            return TF.pil_to_tensor(im.convert("RGB"))
        return image_tensor(im)


def decoded_size(path: Path) -> tuple[int, int]:
    """(height, width) of the image at `path` after decoding all of it, as the start-up scan needs: a truncated or
    out-of-range file raises one of FILE_ERRORS. Faster than load_image: it makes no float tensor."""
    require_regular(path)
    with Image.open(path) as im:
        hw = im.height, im.width
        if _wide(im):
            _wide_gray(im)  # checks the range
        else:
            # JPEG: decode at 1/8 scale. Every byte is still read (truncation is still found), but most of the inverse
            # DCT is skipped: 1.5x faster on 500 px photos. Other formats ignore draft().
            im.draft(im.mode, (im.width // 8, im.height // 8))
            im.load()
    return hw


def file_digest(path: Path) -> bytes:
    """A hash of the file's bytes: two images with one hash are copies (or links) of each other. Cheap next to the
    decode the scan does anyway (blake2b hashes faster than a PNG decodes)."""
    require_regular(path)  # reading a FIFO would wait for a writer
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").digest()


def image_tensor(im: Image.Image) -> torch.Tensor:
    """Any image Pillow opens as float 3×H×W in [0, 1]: integers are divided by the top value of their bit depth,
    alpha is dropped, a palette is expanded, one gray channel is repeated. Float (mode F) pixels are taken as they
    are and must lie in [0, 1]."""
    if _wide(im):
        return _wide_gray(im).expand(3, -1, -1).contiguous()
    return TF.to_dtype(TF.pil_to_tensor(im.convert("RGB")), torch.float32, scale=True)


def _wide(im: Image.Image) -> bool:
    # 16-bit (I;16*), 32-bit (I) and float (F) gray: convert("RGB") would clip them to 0-255, mostly white
    return im.mode.startswith("I") or im.mode == "F"


def _wide_gray(im: Image.Image) -> torch.Tensor:
    """A 16/32-bit or float gray image as H×W in [0, 1]; ValueError when its values do not fit there."""
    array = np.asarray(im)
    top = 1.0 if array.dtype.kind == "f" else np.iinfo(array.dtype).max
    gray = torch.from_numpy((array.astype(np.float64) / top).astype(np.float32))
    if not (gray.isfinite().all() and gray.min() >= 0 and gray.max() <= 1):
        raise ValueError(
            f"mode {im.mode} pixels span [{array.min()}, {array.max()}], which does not map to [0, 1]: "
            "re-save it as an 8- or 16-bit image, or as float values in [0, 1]"
        )
    return gray


# The data options of LeafDataset (keyword-only) with their defaults: open_split reads them from the config with
# getattr, so configs written before these keys existed still work.
DATASET_OPTIONS = {
    name: p.default
    for name, p in inspect.signature(LeafDataset.__init__).parameters.items()
    if p.kind == p.KEYWORD_ONLY
}


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{key} must be one of {', '.join(choices)}, got {value!r}")


def crop_params(
    height: int, width: int, scale: tuple, ratio: tuple, generator: torch.Generator | None = None
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's (top, left, h, w), drawn from `generator` (torchvision's version uses the global RNG)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w, h = round((target_area * aspect) ** 0.5), round((target_area / aspect) ** 0.5)
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    side = min(height, width)  # fallback: the central square crop
    return (height - side) // 2, (width - side) // 2, side, side


class EpochSampler(Sampler):
    """A seeded shuffle per epoch that yields epoch * n + index, so the dataset knows the epoch of each sample
    (for its per-sample augmentation seed) even inside persistent workers."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return iter((self.epoch * self.size + order).tolist())


TORCHVISION_DECODES = (".jpg", ".jpeg", ".png")  # load_image(uint8=True) decodes these with torchvision.io
# The version of how a view's pixels are made from a file and its draws: bump it when they change for the same draws
# (2: RGB cropped, resized and flipped in uint8; JPEGs and PNGs decoded by torchvision), so teacher caches key on it.
PIXELS_VERSION = 2


class PairedTransform:
    """Crop/flip RGB and MS with the same parameters (teacher and student see one view), then normalize each.

    `randaugment` (a timm string such as "rand-m9-n2"; "" = off) adds kd.data.augment.RandAugment after the flips, in
    training: its geometric ops move the MS bands with the RGB, its colour ops change the RGB only.
    """

    pixels = PIXELS_VERSION  # how views are made from files (kd.distill.cache keys its logits on it)

    def __init__(
        self,
        image_size: int | None,
        train: bool = False,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        ms_mean=None,
        ms_std=None,
        hflip: float = 0.5,
        vflip: float = 0.0,
        scale_min: float = 1.0,
        randaugment: str = "",
    ):
        self.image_size, self.train = image_size, train
        self.randaugment = randaugment
        spec = parse_randaugment(randaugment) if train else None
        self.rand_augment = RandAugment(spec) if spec else None
        self.mean, self.std = list(mean), list(std)
        self.ms_mean, self.ms_std = ms_mean, ms_std
        self.hflip, self.vflip, self.scale = hflip, vflip, (scale_min, 1.0)

    def __call__(
        self, rgb: torch.Tensor, ms: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict:
        """`rgb` float in [0, 1], or uint8: then, without RandAugment, the RGB crop, resize and flips run on uint8 (a
        quarter of the bytes, and torch's vectorized uint8 resize) and the RGB is made float once, at the output
        size: 1.7x the float path per sample at 224 px from 500 px photos (benchmarks/data_loader.py). MS bands take
        the same geometric steps in float, apart: the RGB view is the same with or without them."""
        uint8 = rgb.dtype == torch.uint8 and self.rand_augment is None
        if rgb.dtype == torch.uint8 and not uint8:
            rgb = TF.to_dtype(rgb, torch.float32, scale=True)
        # one tensor when RGB and MS share a dtype (RandAugment moves them together), else each apart
        parts = [rgb] if ms is None else [rgb, ms] if uint8 else [torch.cat([rgb, ms])]
        height, width = rgb.shape[1:]
        size = [self.image_size] * 2 if self.image_size else [height, width]
        if self.train:
            top, left, h, w = crop_params(height, width, self.scale, (3 / 4, 4 / 3), generator)
            parts = [TF.resized_crop(x, top, left, h, w, size, antialias=True) for x in parts]
            if torch.rand((), generator=generator) < self.hflip:
                parts = [x.flip(-1) for x in parts]
            if torch.rand((), generator=generator) < self.vflip:
                parts = [x.flip(-2) for x in parts]
            if self.rand_augment is not None:  # uncovered pixels get the mean: they normalize to 0
                x = parts[0]  # float RGB (+ MS): uint8 is off with RandAugment
                fill = self.mean + (list(self.ms_mean) if self.ms_mean is not None else [0.0] * (len(x) - 3))
                parts = [self.rand_augment(x, fill, generator)]
        elif [height, width] != size:
            parts = [TF.resize(x, size, antialias=True) for x in parts]
        if uint8:
            parts[0] = TF.to_dtype(parts[0], torch.float32, scale=True)
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        out = {"rgb": TF.normalize(x[:3], self.mean, self.std)}
        if ms is not None:
            out["ms"] = x[3:] if self.ms_mean is None else TF.normalize(x[3:], self.ms_mean, self.ms_std)
        return out


def scan_dataset(dataset: LeafDataset, on_bad_file: str = "error", workers: int = 0) -> list[tuple[Path, str]]:
    """Read every sample in full before training (LeafDataset.check), so a bad file fails now, not mid-epoch, and
    find MS files whose band count differs from the others' (batches of them could not be stacked).

    `on_bad_file`: "error" raises, listing the bad files; "skip" drops their samples with a warning.
    `workers`: decoding threads (0: one per CPU, up to 16). Returns the [(bad file, why)] found. Each image's
    content hash goes to `dataset.digests` (refuse_leaks compares them with the val and test images').
    """
    _check_choice("data.on_bad_file", on_bad_file, ("error", "skip"))
    # Pillow and numpy release the GIL while decoding, so threads decode in parallel
    with ThreadPoolExecutor(workers or _threads()) as pool:
        results = list(pool.map(dataset.check, range(len(dataset))))
    dataset.digests = {dataset.samples[i][0]: d for i, (_, _, d) in enumerate(results) if d is not None}
    found = {i: bad for i, (bad, _, _) in enumerate(results) if bad is not None}
    bands = {i: n for i, (bad, n, _) in enumerate(results) if bad is None and n is not None}
    if bands:
        usual, count = Counter(bands.values()).most_common(1)[0]
        dataset._zero_bands = usual  # zero-filled stacks (data.ms_missing=zeros) must stack with the others
        for i, n in bands.items():
            if n != usual:
                why = f"{n} bands, but {count} of {len(bands)} multispectral files have {usual}"
                found[i] = (dataset.ms_files[dataset.samples[i][0]], why)
    if not found:
        return []
    bad = [found[i] for i in sorted(found)]
    listing = "\n".join(f"  {shown(path)}: {shown(why)}" for path, why in bad[:20])
    listing += "\n  ..." if len(bad) > 20 else ""
    if on_bad_file == "error":
        raise UserError(
            f"{len(bad)} of {len(dataset)} samples have bad files:\n{listing}\n"
            "Fix or delete them, or set data.on_bad_file=skip to leave them out."
        )
    dataset.samples = [s for i, s in enumerate(dataset.samples) if i not in found]
    if not dataset.samples:
        raise UserError(f"every sample has a bad file:\n{listing}")
    warnings.warn(f"skipped {len(bad)} samples with bad files (data.on_bad_file=skip):\n{listing}", stacklevel=2)
    return bad


def _threads() -> int:
    return min(16, os.cpu_count() or 1)


def refuse_leaks(dataset: LeafDataset, cfg: DataConfig) -> None:
    """Refuse a training or unlabelled image of the scanned `dataset` whose bytes are a val or test image's: a copy,
    a hard link or a symlink of it. Trained on, it makes the val/test scores measure memory, not generalization."""
    from kd.data.unlabeled import UNLABELED  # it builds on this module

    held_out = _held_out_images(cfg, {path for path, _ in dataset.samples})
    if not held_out:
        return
    with ThreadPoolExecutor(_threads()) as pool:
        digests = list(pool.map(_digest_or_none, held_out))
    split_of = {d: (path, split) for (path, split), d in zip(held_out.items(), digests) if d is not None}
    leaks = [(path, label) for path, label in dataset.samples if dataset.digests.get(path) in split_of]
    if not leaks:
        return
    kinds = Counter("unlabelled" if label == UNLABELED else "training" for _, label in leaks)
    what = " and ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    copy_of, split = split_of[dataset.digests[leaks[0][0]]]
    raise UserError(
        f"{what} images have the content of val/test images, e.g. {shown(leaks[0][0])} has the same bytes as "
        f"{split} image {shown(copy_of)} (a copy or a link): trained on, they would make the val/test scores measure "
        "memory. Remove each from one of the two sets."
    )


def _held_out_images(cfg: DataConfig, seen: set[Path]) -> dict[Path, str]:
    """{image path: split} of the val and test splits the data has (a split it lacks is skipped)."""
    options = _options(cfg)
    new_split = (options["val_fraction"], options["test_fraction"], options["split_seed"])
    out = {}
    for split in ("val", "test"):
        try:
            listing = list_split(cfg.root, split, cfg.manifest, options["split_file"], new_split)
        except UserError:  # no such split (no test folder): nothing to leak into
            continue
        out |= {listing.base / rel: split for rel, _ in listing.entries}
    return {path: split for path, split in out.items() if path not in seen}  # the training split itself: not a leak


def _digest_or_none(path: Path) -> bytes | None:
    try:
        return file_digest(path)
    except OSError:  # its own split's scan names it
        return None


def ms_statistics(dataset: LeafDataset, max_samples: int = 256) -> tuple[list[float], list[float]]:
    """Per-band mean and std of the MS stacks, from (a seeded subsample of) the training split only.

    Zero-filled stacks (missing MS files) are left out: they would drag the mean towards 0.
    """
    usable = [i for i, (path, _) in enumerate(dataset.samples) if dataset.ms_files.get(path) is not None]
    if not usable:
        raise UserError("ms_statistics needs a dataset built with with_ms=True that has multispectral files")
    picks = torch.randperm(len(usable), generator=torch.Generator().manual_seed(0))[:max_samples]
    # per-band sums in float64, one stack at a time: no overflow to inf, and images may differ in size
    count, total, squares, bad = 0, 0.0, 0.0, []
    for index in (usable[int(i)] for i in picks):
        stack = dataset.read(index)[1].double()
        if not stack.isfinite().all():  # NaN statistics would make every training step NaN
            bad.append(str(dataset.ms_files[dataset.samples[index][0]]))
        count += stack[0].numel()
        total = total + stack.sum((1, 2))
        squares = squares + stack.square().sum((1, 2))
    if bad:
        raise UserError(
            f"the multispectral band statistics are not finite: NaN or infinite values in {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}. Fix or delete those files (scan_dataset lists them all)."
        )
    mean = total / count
    std = ((squares - count * mean.square()) / max(count - 1, 1)).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.tolist(), std.tolist()


def prepare_data(cfg: DataConfig) -> None:
    """Write the demo set if asked, absent and at its own folder (kd.data.demo.may_write_demo), check the data is there,
    and make the split file if one is needed.

    Run it on one process first (Accelerate's main_process_first) so the split file is drawn once.
    """
    root, manifest = Path(cfg.root), cfg.manifest
    if cfg.demo and not manifest:
        _prepare_demo(root, cfg.demo_seed)
    if not manifest and not os.path.isdir(root):  # os.path: False for a too-long path, no OSError
        raise UserError(
            f"data.root {shown(root)} does not exist. Set data.root to your images (<root>/<split>/<class>/<image> "
            f"or <root>/<class>/<image> folders), or leave data.root at {DEMO_ROOT} for the built-in demo set."
        )
    if manifest or not any((root / split).is_dir() for split in SPLITS):
        opt = _options(cfg)  # a single folder of classes (or a manifest): draw and save the split file now, once
        list_split(
            root, "train", manifest, opt["split_file"], (opt["val_fraction"], opt["test_fraction"], opt["split_seed"])
        )


def _prepare_demo(root: Path, seed: int) -> None:
    """Check the demo set at `root`, or write it there if it may be (kd.data.demo.may_write_demo); elsewhere leave
    `root` to prepare_data's checks, so a mistyped data.root is named instead of filled with synthetic data."""
    if os.path.isdir(root / "train"):
        check_demo_version(root)
    elif os.path.isdir(root) and any(root.iterdir()) and not is_demo_set(root):
        raise UserError(f"data.demo is true, but {shown(root)} holds other files; set data.demo=false to use them")
    elif may_write_demo(root):
        print(f"writing the synthetic demo dataset to {root} (seed {seed})")
        make_demo_dataset(root, seed=seed)


def open_split(
    cfg: DataConfig,
    split: str,
    classes: list[str] | None = None,
    with_ms: bool = False,
    transform: PairedTransform | None = None,
    scan: bool = True,
    ms_bands: list | None = None,
) -> LeafDataset:
    """One split as the config describes it (any layout, MS options), its files checked by `scan_dataset`.
    `ms_bands` (a model's) replaces data.ms_bands."""
    options = _options(cfg) | ({} if ms_bands is None else {"ms_bands": ms_bands})
    dataset = LeafDataset(cfg.root, split, classes, with_ms, transform, **options)
    if scan:
        scan_dataset(dataset, cfg.on_bad_file)
        if split == "train":
            refuse_leaks(dataset, cfg)
    return dataset


def _options(cfg: DataConfig) -> dict:
    return {key: getattr(cfg, key, default) for key, default in DATASET_OPTIONS.items()}


def build_loader(
    cfg: DataConfig,
    spec: InputSpec,
    split: str,
    batch_size: int,
    train: bool,
    classes: list[str] | None = None,
    seed: int = 0,
    dataset: LeafDataset | None = None,
    *,
    unlabeled: bool = False,
    mixing: Mixing | None = None,
) -> DataLoader:
    """A DataLoader over one split, prepared as `spec` says (MS too when it has MS statistics); training loaders
    shuffle (seeded), augment and drop the last partial batch.

    Pass `dataset` (from `open_split`) to reuse an already scanned split; the loader gets a copy with its transform.
    A training loader with `unlabeled` adds the config's unlabelled images (kd/data/unlabeled.py: label -1, a set share
    of every batch), one with `mixing` mixes each batch (kd/data/mixing.py: Mixup / CutMix).
    """
    from kd.data.unlabeled import ShareSampler, add_unlabeled, has_unlabeled  # it builds on this module

    unlabeled = unlabeled and train and has_unlabeled(cfg)
    transform = PairedTransform(
        spec.image_size,
        train=train,
        mean=spec.mean,
        std=spec.std,
        ms_mean=spec.ms_mean,
        ms_std=spec.ms_std,
        hflip=cfg.hflip,
        vflip=cfg.vflip,
        scale_min=cfg.scale_min,
        randaugment=getattr(cfg, "randaugment", ""),
    )
    if dataset is None:  # with unlabelled images, the scan reads them and the labelled ones in one go
        scan = not unlabeled
        dataset = open_split(cfg, split, classes, spec.with_ms, transform, scan=scan, ms_bands=spec.ms_bands)
    else:
        dataset = copy.copy(dataset)
        dataset.transform = transform
    if unlabeled:
        dataset = add_unlabeled(dataset, cfg)
    workers = cfg.num_workers
    extra = {}
    if workers > 0:  # these two are errors with num_workers=0
        extra = dict(
            persistent_workers=cfg.persistent_workers,
            prefetch_factor=cfg.prefetch_factor,
        )
    dataset.augment_seed = seed
    sampler = EpochSampler(len(dataset), seed) if train else None
    if unlabeled:
        labels = [label for _, label in dataset.samples]
        sampler = ShareSampler.for_dataset(labels, batch_size, getattr(cfg, "unlabeled_fraction", None), seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=MixingCollate(mixing) if mixing is not None and train else None,
        # the loader's own generator: drawing worker seeds must not move the global RNG that dropout uses
        generator=torch.Generator().manual_seed(seed),
        drop_last=train and len(dataset) > batch_size,
        num_workers=workers,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),  # pinning needs a GPU
        **extra,
    )


def resolve_input(cfg: DataConfig, preferred: dict) -> InputSpec:
    """The config's image size and normalization (RGB only), each null filled from `preferred`: the model's own
    {"image_size", "mean", "std"}, from its timm pretrained config."""
    chosen = {key: getattr(cfg, key) for key in ("image_size", "mean", "std")}
    return InputSpec(**{key: preferred[key] if value is None else value for key, value in chosen.items()})
