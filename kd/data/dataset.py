"""LeafDataset: one split of leaf images (and MS stacks); a sample is {"rgb", "ms" (when asked), "label", "key"}."""

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.io
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, Sampler

from kd.data.layouts import IMAGE_SUFFIXES, Source, list_split, shown
from kd.data.multispectral import FILE_ERRORS, band_indices, find_ms, read_ms, require_regular
from kd.data.transforms import PairedTransform
from kd.errors import UserError

UNLABELED = -1  # the label of an unlabelled sample (kd/data/unlabeled.py)


@dataclass
class InputSpec:
    """What a model is fed: every checkpoint records its model's."""

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
        """The part kd.distill.teachers.adapt_view converts between."""
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}


class EpochSampler(Sampler):
    """A seeded shuffle per epoch yielding epoch * n + index: the dataset knows each sample's epoch (for its
    augmentation seed) even inside persistent workers."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return iter((self.epoch * self.size + order).tolist())


class LeafDataset(Dataset):
    """`samples`: [(image path, label)]; `ms_files`: image path -> MS file (None: zero-filled with `zero_bands`
    bands). Keyword options: DataConfig's fields, validated there. scan_dataset fills `digests` and `zero_bands`."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        classes: list[str] | None = None,
        with_ms: bool = False,
        transform: PairedTransform | None = None,
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
        listing = list_split(Source(Path(root), manifest, split_file, val_fraction, test_fraction, split_seed), split)
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
        self.zero_bands = 0  # bands of a zero-filled stack (data.ms_missing=zeros)
        self.digests: dict[Path, bytes] = {}  # image path -> content hash (kd.data.scan.refuse_leaks compares them)
        self.transform = transform or PairedTransform(image_size=None)
        self.augment_seed = 0
        self._ms_root, self._ms_missing = Path(ms_root) if ms_root else None, ms_missing
        if with_ms:
            folders = ([Path(ms_root)] if ms_root else []) + [listing.base, Path(root)]
            self.ms_bands = band_indices(list(ms_bands), folders)
            self._find_ms([(listing.base, rel) for rel, _ in entries], split)

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int, uint8: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """The untransformed (RGB, MS or None, label); `uint8`: see load_image."""
        path, label = self.samples[index]
        try:
            rgb = load_image(path, uint8)
        except FILE_ERRORS as e:
            raise UserError(f"cannot read image {path}: {e}") from None
        if not self.with_ms:
            return rgb, None, label
        if (ms_path := self.ms_files[path]) is None:
            return rgb, torch.zeros(self.zero_bands, *rgb.shape[1:]), label
        return rgb, torch.from_numpy(read_ms(ms_path, tuple(rgb.shape[1:]), self.ms_layout, self.ms_bands)), label

    def __getitem__(self, key: int) -> dict:
        """Sample `key % len(self)` of epoch `key // len(self)`, its view seeded by (seed, epoch, sample): the same
        whatever the worker count, after a resume, or when a teacher's output for it is cached (by `key`)."""
        epoch, index = divmod(key, len(self))
        rgb, ms, label = self.read(index, uint8=True)  # PairedTransform crops and resizes RGB in uint8
        generator = torch.Generator().manual_seed(hash((self.augment_seed, epoch, index)) % 2**63)
        return {**self.transform(rgb, ms, generator=generator), "label": label, "key": key}

    def with_unlabeled(self, images: list[tuple[Path, str]]) -> "LeafDataset":
        """A copy with `images` ((base folder, relative path)) after its own samples, label UNLABELED."""
        merged = copy.copy(self)
        merged.samples = self.samples + [(base / rel, UNLABELED) for base, rel in images]
        merged.ms_files = dict(self.ms_files)
        if self.with_ms:
            merged._find_ms(images, "unlabelled")
        return merged

    def view(self, transform: PairedTransform, augment_seed: int) -> "LeafDataset":
        out = copy.copy(self)
        out.transform, out.augment_seed = transform, augment_seed
        return out

    def _find_ms(self, images: list[tuple[Path, str]], what: str) -> None:
        """Find each image's MS file; refuse (or warn about) those without one, as data.ms_missing says."""
        missing = []  # where each absent MS file was looked for
        for base, rel in images:
            stem = self._ms_root / rel if self._ms_root else base / rel
            self.ms_files[base / rel] = find_ms(stem, base / rel)
            if self.ms_files[base / rel] is None:
                missing.append(stem)
        if not missing:
            return
        expected = f"{shown(missing[0].with_suffix('.npy'))} (or .tif / .tiff)"
        first = f"{len(missing)} of {len(images)} {what} images have no multispectral file, e.g. {expected}"
        if self._ms_missing == "error":
            raise UserError(f"{first}. Add the files, or set data.ms_missing=zeros to zero-fill their bands.")
        present = [i for i, (p, _) in enumerate(self.samples) if self.ms_files[p] is not None]
        if not present:
            raise UserError(f"{first}, and none has one: check data.ms_root and the file names")
        warnings.warn(f"{first}; their bands are zero-filled (data.ms_missing=zeros)", stacklevel=3)
        for index in present[:-1]:  # a first guess: scan_dataset sets the band count most files have
            try:
                self.zero_bands = self.read(index)[1].shape[0]
                return
            except UserError:
                pass  # a broken file, which scan_dataset reports or skips
        self.zero_bands = self.read(present[-1])[1].shape[0]


def ms_statistics(dataset: LeafDataset, max_samples: int = 256) -> tuple[list[float], list[float]]:
    """Per-band MS mean and std of a seeded subsample; zero-filled stacks are left out (they drag the mean to 0)."""
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


def load_image(path: Path, uint8: bool = False) -> torch.Tensor:
    """Float 3×H×W in [0, 1]; a broken file raises one of FILE_ERRORS. `uint8`: an 8-bit image comes as uint8, a JPEG
    or PNG decoded by torchvision (1.4-1.5x Pillow's decode and conversion; for PNGs the same pixels)."""
    require_regular(path)
    if uint8 and Path(path).suffix.lower() in (".jpg", ".jpeg", ".png"):
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
    """(height, width) after decoding all of it (a broken file raises one of FILE_ERRORS), with no float tensor."""
    require_regular(path)
    with Image.open(path) as im:
        hw = im.height, im.width
        if _wide(im):
            _wide_gray(im)  # checks the range
        else:
            # JPEG at 1/8 scale: every byte still read (truncation found), most of the IDCT skipped: 1.5x faster
            im.draft(im.mode, (im.width // 8, im.height // 8))
            im.load()
    return hw


def image_tensor(im: Image.Image) -> torch.Tensor:
    """Any image Pillow opens as float 3×H×W in [0, 1] (integers over their bit depth's top; float must be in it)."""
    if _wide(im):
        return _wide_gray(im).expand(3, -1, -1).contiguous()
    return TF.to_dtype(TF.pil_to_tensor(im.convert("RGB")), torch.float32, scale=True)


def _wide(im: Image.Image) -> bool:
    # 16-bit (I;16*), 32-bit (I) and float (F) gray: convert("RGB") would clip them to 0-255, mostly white
    return im.mode.startswith("I") or im.mode == "F"


def _wide_gray(im: Image.Image) -> torch.Tensor:
    array = np.asarray(im)
    top = 1.0 if array.dtype.kind == "f" else np.iinfo(array.dtype).max
    gray = torch.from_numpy((array.astype(np.float64) / top).astype(np.float32))
    if not (gray.isfinite().all() and gray.min() >= 0 and gray.max() <= 1):
        raise ValueError(
            f"mode {im.mode} pixels span [{array.min()}, {array.max()}], which does not map to [0, 1]: "
            "re-save it as an 8- or 16-bit image, or as float values in [0, 1]"
        )
    return gray
