"""Data: leaf images with optional multispectral (MS) band stacks, aligned transforms, loaders.

Layouts (see kd/layouts.py): <root>/<split>/<class>/<image>, one <root>/<class>/<image> folder split once into a
saved split file, or a CSV manifest. The MS stack of an image is <image>.npy (H×W×C or C×H×W) or a multi-band
<image>.tif, beside it or at the same relative path under `ms_root`. A batch is {"rgb": B×3×H×W, "ms": B×C×H×W
(when asked), "label": B}.
"""

import copy
import inspect
import warnings
from pathlib import Path
from typing import Optional

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, Sampler

from kd.config import DataConfig
from kd.demo import DEMO_BANDS, DEMO_CLASSES, make_demo_dataset  # noqa: F401 (re-exported)
from kd.errors import UserError
from kd.layouts import IMAGE_SUFFIXES, SPLITS, list_split
from kd.models import check_ms_bands
from kd.multispectral import band_indices, find_ms, ms_header, pick_bands, read_ms


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

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """The untransformed sample: RGB as float 3×H×W in [0, 1], MS as float C×H×W (or None), label."""
        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                rgb = TF.to_dtype(TF.pil_to_tensor(im.convert("RGB")), torch.float32, scale=True)
        except (OSError, UnidentifiedImageError) as e:
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
        resume, or when a teacher's output for it is cached. The sample carries `key`: kd.cache finds its row by it."""
        epoch, index = divmod(key, len(self))
        rgb, ms, label = self.read(index)
        generator = torch.Generator().manual_seed(hash((self.augment_seed, epoch, index)) % 2**63)
        sample = self.transform(rgb, ms, generator=generator)
        sample["label"], sample["key"] = label, key
        return sample

    def check(self, index: int) -> tuple[Path, str] | None:
        """(bad file, why) when sample `index` cannot be read, from headers only (fast); None when it looks fine."""
        path = self.samples[index][0]
        try:
            with Image.open(path) as im:
                hw = (im.height, im.width)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            return path, f"unreadable image ({e})"
        ms_path = self.ms_files.get(path)
        if ms_path is not None:
            try:
                shape, pages = ms_header(ms_path)
                pick_bands(shape, hw, "chw" if pages else self.ms_layout, self.ms_bands, ms_path)
            except (OSError, UnidentifiedImageError, ValueError) as e:
                return ms_path, f"unreadable multispectral file ({e})"
            except UserError as e:
                return ms_path, str(e)
        return None

    def _check_missing_ms(self, split: str, missing: list[Path], policy: str) -> int:
        """Refuse (or warn once about) images without an MS file; return the band count used to zero-fill them."""
        if not missing:
            return 0
        expected = f"{missing[0].with_suffix('.npy')} (or .tif / .tiff)"
        first = f"{len(missing)} of {len(self.ms_files)} {split} images have no multispectral file, e.g. {expected}"
        if policy == "error":
            raise UserError(f"{first}. Add the files, or set data.ms_missing=zeros to zero-fill their bands.")
        present = [i for i, (p, _) in enumerate(self.samples) if self.ms_files[p] is not None]
        if not present:
            raise UserError(f"{first}, and none has one: check data.ms_root and the file names")
        warnings.warn(f"{first}; their bands are zero-filled (data.ms_missing=zeros)", stacklevel=3)
        return self.read(present[0])[1].shape[0]


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


class PairedTransform:
    """Crop/flip RGB and MS with the same parameters (teacher and student see one view), then normalize each."""

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
    ):
        self.image_size, self.train = image_size, train
        self.mean, self.std = list(mean), list(std)
        self.ms_mean, self.ms_std = ms_mean, ms_std
        self.hflip, self.vflip, self.scale = hflip, vflip, (scale_min, 1.0)

    def __call__(
        self, rgb: torch.Tensor, ms: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict:
        x = rgb if ms is None else torch.cat([rgb, ms])
        size = [self.image_size] * 2 if self.image_size else list(x.shape[1:])
        if self.train:
            top, left, h, w = crop_params(x.shape[1], x.shape[2], self.scale, (3 / 4, 4 / 3), generator)
            x = TF.resized_crop(x, top, left, h, w, size, antialias=True)
            if torch.rand((), generator=generator) < self.hflip:
                x = x.flip(-1)
            if torch.rand((), generator=generator) < self.vflip:
                x = x.flip(-2)
        elif list(x.shape[1:]) != size:
            x = TF.resize(x, size, antialias=True)
        out = {"rgb": TF.normalize(x[:3], self.mean, self.std)}
        if ms is not None:
            out["ms"] = x[3:] if self.ms_mean is None else TF.normalize(x[3:], self.ms_mean, self.ms_std)
        return out


def scan_dataset(dataset: LeafDataset, on_bad_file: str = "error") -> list[tuple[Path, str]]:
    """Check every sample's file headers before training, so a bad file fails now rather than mid-epoch.

    `on_bad_file`: "error" raises, listing the bad files; "skip" drops their samples with a warning.
    Returns the [(bad file, why)] found.
    """
    _check_choice("data.on_bad_file", on_bad_file, ("error", "skip"))
    found = [(i, bad) for i in range(len(dataset)) if (bad := dataset.check(i)) is not None]
    if not found:
        return []
    bad = [b for _, b in found]
    listing = "\n".join(f"  {path}: {why}" for path, why in bad[:20]) + ("\n  ..." if len(bad) > 20 else "")
    if on_bad_file == "error":
        raise UserError(
            f"{len(bad)} of {len(dataset)} samples have unreadable files:\n{listing}\n"
            "Fix or delete them, or set data.on_bad_file=skip to leave them out."
        )
    drop = {i for i, _ in found}
    dataset.samples = [s for i, s in enumerate(dataset.samples) if i not in drop]
    if not dataset.samples:
        raise UserError(f"every sample has an unreadable file:\n{listing}")
    warnings.warn(f"skipped {len(bad)} samples with unreadable files (data.on_bad_file=skip):\n{listing}", stacklevel=2)
    return bad


def ms_statistics(dataset: LeafDataset, max_samples: int = 256) -> tuple[list[float], list[float]]:
    """Per-band mean and std of the MS stacks, from (a seeded subsample of) the training split only.

    Zero-filled stacks (missing MS files) are left out: they would drag the mean towards 0.
    """
    usable = [i for i, (path, _) in enumerate(dataset.samples) if dataset.ms_files.get(path) is not None]
    if not usable:
        raise UserError("ms_statistics needs a dataset built with with_ms=True that has multispectral files")
    picks = torch.randperm(len(usable), generator=torch.Generator().manual_seed(0))[:max_samples]
    stacks = torch.stack([dataset.read(usable[int(i)])[1] for i in picks])  # N×C×H×W
    mean = stacks.mean(dim=(0, 2, 3))
    std = stacks.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return mean.tolist(), std.tolist()


def prepare_data(cfg: DataConfig) -> None:
    """Write the demo set if asked and absent, check the data is there, and make the split file if one is needed.

    Run it on one process first (Accelerate's main_process_first) so the split file is drawn once.
    """
    root, manifest = Path(cfg.root), cfg.manifest
    if cfg.demo and not manifest and not (root / "train").is_dir():
        if root.is_dir() and any(root.iterdir()):
            raise UserError(f"data.demo is true, but {root} holds other files; set data.demo=false to use them")
        print(f"writing the synthetic demo dataset to {root} (seed {cfg.demo_seed})")
        make_demo_dataset(root, seed=cfg.demo_seed)
    if not manifest and not root.is_dir():
        raise UserError(
            f"data.root {root} does not exist. Point data.root at <root>/<split>/<class>/<image> or "
            "<root>/<class>/<image> folders, or set data.demo=true to generate the built-in demo set there."
        )
    if manifest or not any((root / split).is_dir() for split in SPLITS):
        opt = _options(cfg)  # a single folder of classes (or a manifest): draw and save the split file now, once
        list_split(
            root, "train", manifest, opt["split_file"], (opt["val_fraction"], opt["test_fraction"], opt["split_seed"])
        )


def open_split(
    cfg: DataConfig,
    split: str,
    classes: list[str] | None = None,
    with_ms: bool = False,
    transform: PairedTransform | None = None,
    scan: bool = True,
) -> LeafDataset:
    """One split as the config describes it (any layout, MS options), its files checked by `scan_dataset`."""
    dataset = LeafDataset(cfg.root, split, classes, with_ms, transform, **_options(cfg))
    if scan:
        scan_dataset(dataset, cfg.on_bad_file)
    return dataset


def _options(cfg: DataConfig) -> dict:
    return {key: getattr(cfg, key, default) for key, default in DATASET_OPTIONS.items()}


def build_loader(
    cfg: DataConfig,
    split: str,
    batch_size: int,
    train: bool,
    with_ms: bool,
    classes: list[str] | None = None,
    ms_stats: tuple | None = None,
    seed: int = 0,
    dataset: LeafDataset | None = None,
) -> DataLoader:
    """A DataLoader over one split; training loaders shuffle (seeded), augment and drop the last partial batch.

    Pass `dataset` (from `open_split`) to reuse an already scanned split; the loader gets a copy with its transform.
    """
    transform = PairedTransform(
        cfg.image_size,
        train=train,
        mean=cfg.mean or IMAGENET_DEFAULT_MEAN,  # null without a model to ask: timm's default
        std=cfg.std or IMAGENET_DEFAULT_STD,
        ms_mean=ms_stats[0] if ms_stats else None,
        ms_std=ms_stats[1] if ms_stats else None,
        hflip=cfg.hflip,
        vflip=cfg.vflip,
        scale_min=cfg.scale_min,
    )
    if dataset is None:
        dataset = open_split(cfg, split, classes, with_ms, transform)
    else:
        dataset = copy.copy(dataset)
        dataset.transform = transform
    workers = cfg.num_workers
    extra = {}
    if workers > 0:  # these two are errors with num_workers=0
        extra = dict(
            persistent_workers=cfg.persistent_workers,
            prefetch_factor=cfg.prefetch_factor,
        )
    dataset.augment_seed = seed
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed) if train else None,
        # the loader's own generator: drawing worker seeds must not move the global RNG that dropout uses
        generator=torch.Generator().manual_seed(seed),
        drop_last=train and len(dataset) > batch_size,
        num_workers=workers,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),  # pinning needs a GPU
        **extra,
    )


def resolve_input(cfg: DataConfig, preferred: dict) -> DataConfig:
    """A copy of `cfg` whose null image_size/mean/std are filled from `preferred` (kd.models.input_config)."""
    cfg = copy.copy(cfg)
    for key in ("image_size", "mean", "std"):
        if getattr(cfg, key) is None:
            setattr(cfg, key, preferred[key])
    return cfg


def checkpoint_loader(cfg: DataConfig, meta: dict, split: str, batch_size: int) -> DataLoader:
    """An evaluation loader that feeds a checkpoint what it was trained on: its classes, inputs, input size and
    normalization, MS bands and MS statistics, even if the config changed since."""
    with_ms = "ms" in meta["inputs"]
    ms_stats = (meta["ms_mean"], meta["ms_std"]) if with_ms else None
    cfg = copy.copy(cfg)
    for key in ("image_size", "mean", "std"):  # kd checkpoints record them; other metadata may not
        setattr(cfg, key, meta.get(key, getattr(cfg, key)))
    if with_ms and meta.get("ms_bands") is not None:
        cfg.ms_bands = meta["ms_bands"]
    loader = build_loader(
        cfg, split, batch_size, train=False, with_ms=with_ms, classes=meta["classes"], ms_stats=ms_stats
    )
    check_ms_bands(meta, loader.dataset)
    return loader
