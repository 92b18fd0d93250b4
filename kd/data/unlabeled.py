"""Unlabelled training images for distillation (data.unlabeled_root, manifest rows without a label): label -1, after
the labelled images of the training split; `ShareSampler` puts a set number of each in every batch."""

from pathlib import Path

import torch

from kd.config import DataConfig
from kd.data.dataset import UNLABELED, EpochSampler, LeafDataset
from kd.data.layouts import IMAGE_SUFFIXES, SPLITS, Source, image_files, read_manifest, split_images
from kd.data.scan import refuse_leaks, scan_dataset
from kd.errors import UserError


def unlabeled_sources(cfg: DataConfig) -> list[tuple[Path, str]]:
    """(base folder, relative path) of every unlabelled image: data.unlabeled_root's, then the manifest's."""
    found = []
    if cfg.unlabeled_root:
        root = Path(cfg.unlabeled_root)
        if not root.is_dir():
            raise UserError(f"data.unlabeled_root {root} is not a folder: point it at a folder of unlabelled images")
        visible = (p for p in root.rglob("*") if not any(part.startswith(".") for part in p.relative_to(root).parts))
        found += [(root, p.relative_to(root).as_posix()) for p in image_files(visible)]
        if not found:
            raise UserError(f"data.unlabeled_root {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if cfg.manifest:
        manifest = Path(cfg.manifest)
        found += [(manifest.parent, rel) for rel, _, _ in read_manifest(manifest, unlabeled=True)]
    return found


def has_unlabeled(cfg: DataConfig) -> bool:
    if cfg.unlabeled_root:
        return True
    return bool(cfg.manifest) and Path(cfg.manifest).is_file() and bool(read_manifest(Path(cfg.manifest), True))


def ignored_note(cfg: DataConfig) -> str | None:
    """train_teacher.py's one line when the config names unlabelled images, which plain training cannot use."""
    if not has_unlabeled(cfg):
        return None
    where = f"data.unlabeled_root {cfg.unlabeled_root}" if cfg.unlabeled_root else "data.manifest"
    return f"{where} names unlabelled images: train_teacher.py trains on labelled ones only (distill.py uses them)"


def add_unlabeled(dataset: LeafDataset, cfg: DataConfig) -> LeafDataset:
    """A copy of the training split with the unlabelled images after its own, every file scanned, leaks refused."""
    sources = unlabeled_sources(cfg)
    # one that is also a labelled image would train twice, or leak a val/test image into training
    labelled = {path.resolve() for path in split_images(Source.of(cfg), SPLITS)}
    both = [base / rel for base, rel in sources if (base / rel).resolve() in labelled]
    if both:
        raise UserError(
            f"{len(both)} unlabelled images are also labelled images of the dataset, e.g. {both[0]}: point "
            "data.unlabeled_root at a folder of unlabelled images only (outside data.root's class folders); a val "
            "or test image among them would leak into training"
        )
    merged = dataset.with_unlabeled(sources)
    scan_dataset(merged, cfg.on_bad_file)
    refuse_leaks(merged, cfg)
    return merged


class ShareSampler(EpochSampler):
    """Loader keys for batches of `labeled_per_batch` labelled samples (indices below `labeled`), then unlabelled
    ones, each set shuffled per epoch; Accelerate shards whole batches, so each process's batch keeps the share."""

    def __init__(self, labeled: int, unlabeled: int, labeled_per_batch: int, unlabeled_per_batch: int, seed: int = 0):
        super().__init__(labeled + unlabeled, seed)
        self.labeled, self.unlabeled = labeled, unlabeled
        self.per_batch = (labeled_per_batch, unlabeled_per_batch)
        self.batches = min(labeled // labeled_per_batch, unlabeled // unlabeled_per_batch)

    @classmethod
    def for_dataset(cls, labels: list[int], batch_size: int, fraction: float | None, seed: int) -> "ShareSampler":
        """`fraction` of each batch unlabelled (rounded), or None: the sets' own proportion."""
        labeled = sum(label != UNLABELED for label in labels)
        unlabeled = len(labels) - labeled
        share = unlabeled / len(labels) if fraction is None else fraction
        per_batch = min(max(round(batch_size * share), 1), batch_size - 1)
        if batch_size < 2 or (fraction is not None and per_batch != round(batch_size * fraction)):
            raise UserError(
                f"a batch of {batch_size} cannot hold a share of {share:.2f} unlabelled images and at least one "
                "of each kind: raise distillation.batch_size, or set data.unlabeled_fraction nearer 0.5"
            )
        if labeled < batch_size - per_batch or unlabeled < per_batch:
            raise UserError(
                f"{labeled} labelled and {unlabeled} unlabelled training images cannot fill one batch of "
                f"{batch_size - per_batch} + {per_batch}: lower distillation.batch_size or add images"
            )
        return cls(labeled, unlabeled, batch_size - per_batch, per_batch, seed)

    def __len__(self) -> int:
        return self.batches * sum(self.per_batch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        (n_labeled, n_unlabeled), count = self.per_batch, self.batches
        labeled = torch.randperm(self.labeled, generator=generator)[: count * n_labeled].view(count, n_labeled)
        unlabeled = self.labeled + torch.randperm(self.unlabeled, generator=generator)[: count * n_unlabeled]
        order = torch.cat([labeled, unlabeled.view(count, n_unlabeled)], 1).flatten()
        return iter((self.epoch * self.size + order).tolist())

    def describe(self) -> str:
        n_labeled, n_unlabeled = self.per_batch
        return (
            f"{self.labeled} labelled + {self.unlabeled} unlabelled training images: each batch holds {n_labeled} "
            f"labelled and {n_unlabeled} unlabelled; an epoch is {self.batches} batches "
            f"({self.batches * n_labeled} labelled, {self.batches * n_unlabeled} unlabelled images)"
        )
