"""From a DataConfig to DataLoaders: prepare_data once, open_split (a scanned split), build_loader, resolve_input."""

import inspect
import os

import torch
from torch.utils.data import DataLoader

from kd.config import DataConfig
from kd.data.dataset import EpochSampler, InputSpec, LeafDataset
from kd.data.demo import DEMO_ROOT, check_demo_version, is_demo_set, make_demo_dataset, may_write_demo
from kd.data.layouts import Source, layout_of, list_split, shown
from kd.data.mixing import Mixing, MixingCollate
from kd.data.scan import refuse_leaks, scan_dataset
from kd.data.transforms import PairedTransform
from kd.data.unlabeled import ShareSampler, add_unlabeled, has_unlabeled
from kd.errors import UserError

# DataConfig's fields that LeafDataset takes as keyword options
DATASET_OPTIONS = [p.name for p in inspect.signature(LeafDataset).parameters.values() if p.kind == p.KEYWORD_ONLY]


def prepare_data(cfg: DataConfig) -> None:
    """Write the demo set if asked, check the data is there, and draw the split file if one is needed. Run it on one
    process first (Accelerate's main_process_first) so the split file is drawn once."""
    source = Source.of(cfg)
    root = source.root
    if cfg.demo and not cfg.manifest:  # written only where it may be: a mistyped data.root is named, not filled
        if os.path.isdir(root / "train"):
            check_demo_version(root)
        elif os.path.isdir(root) and any(root.iterdir()) and not is_demo_set(root):
            raise UserError(f"data.demo is true, but {shown(root)} holds other files; set data.demo=false to use them")
        elif may_write_demo(root):
            print(f"writing the synthetic demo dataset to {root} (seed {cfg.demo_seed})")
            make_demo_dataset(root, seed=cfg.demo_seed)
    if not cfg.manifest and not os.path.isdir(root):  # os.path: False for a too-long path, no OSError
        raise UserError(
            f"data.root {shown(root)} does not exist. Set data.root to your images (<root>/<split>/<class>/"
            f"<image> or <root>/<class>/<image> folders), or leave data.root at {DEMO_ROOT} for the built-in demo set."
        )
    if layout_of(source).draws_split:
        list_split(source, "train")


def open_split(
    cfg: DataConfig,
    split: str,
    classes: list[str] | None = None,
    with_ms: bool = False,
    transform: PairedTransform | None = None,
    scan: bool = True,
    ms_bands: list | None = None,
) -> LeafDataset:
    """One split, its files checked by `scan_dataset`; `ms_bands` (a model's) replaces data.ms_bands."""
    options = {key: getattr(cfg, key) for key in DATASET_OPTIONS} | ({} if ms_bands is None else {"ms_bands": ms_bands})
    dataset = LeafDataset(cfg.root, split, classes, with_ms, transform, **options)
    if scan:
        scan_dataset(dataset, cfg.on_bad_file)
        if split == "train":
            refuse_leaks(dataset, cfg)
    return dataset


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
    """A DataLoader over one split as `spec` says; training ones shuffle (seeded), augment, drop the last partial
    batch, may add the unlabelled images and mix batches. `dataset`: a scanned split to reuse (the loader copies it)."""
    unlabeled = unlabeled and train and has_unlabeled(cfg)
    augment = {key: getattr(cfg, key) for key in ("hflip", "vflip", "scale_min", "randaugment")}
    transform = PairedTransform(spec.image_size, train, spec.mean, spec.std, spec.ms_mean, spec.ms_std, **augment)
    if dataset is None:  # with unlabelled images, the scan reads them and the labelled ones in one go
        dataset = open_split(cfg, split, classes, spec.with_ms, scan=not unlabeled, ms_bands=spec.ms_bands)
    if unlabeled:
        dataset = add_unlabeled(dataset, cfg)
    dataset = dataset.view(transform, seed)  # a copy: the caller's dataset keeps its own transform
    sampler = EpochSampler(len(dataset), seed) if train else None
    if unlabeled:
        labels = [label for _, label in dataset.samples]
        sampler = ShareSampler.for_dataset(labels, batch_size, cfg.unlabeled_fraction, seed)
    # persistent_workers and prefetch_factor are errors with num_workers=0
    workers = cfg.num_workers
    extra = dict(persistent_workers=cfg.persistent_workers, prefetch_factor=cfg.prefetch_factor) if workers else {}
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
    """The config's image size and normalization, each null filled from `preferred` (the model's timm config)."""
    chosen = {"image_size": cfg.image_size, "mean": cfg.mean, "std": cfg.std}
    return InputSpec(**{key: preferred[key] if value is None else value for key, value in chosen.items()})
