"""Data: leaf image folders with optional multispectral (MS) band stacks, aligned transforms, and the demo set.

Layout (PlantVillage style, one folder per split): <root>/<split>/<class>/<image>.png, and for MS a band stack
<image>.npy (H x W x C) beside each image. A batch is {"rgb": B×3×H×W, "ms": B×C×H×W (when asked), "label": B}.
"""

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import RandomResizedCrop

from kd.config import DataConfig
from kd.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DEMO_CLASSES = ("healthy", "early_blight", "leaf_rust", "powdery_mildew", "nitrogen_stress")
DEMO_BANDS = ("blue", "green", "red", "red_edge", "nir")


class LeafDataset(Dataset):
    """One split of an image-folder dataset; with `with_ms`, also the .npy band stack beside each image."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        classes: list[str] | None = None,
        with_ms: bool = False,
        transform: Optional["PairedTransform"] = None,
    ):
        split_dir = Path(root) / split
        if not split_dir.is_dir():
            raise UserError(f"split folder {split_dir} does not exist: expected <root>/{split}/<class>/<image>")
        found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        if classes is None:
            classes = found
        elif sorted(classes) != found:
            raise UserError(f"{split_dir} has classes {found}, but the model was trained on {list(classes)}")
        self.classes = list(classes)
        self.samples = [
            (p, label)
            for label, c in enumerate(self.classes)
            for p in sorted((split_dir / c).iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.samples:
            raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {split_dir}/<class>/")
        self.with_ms = with_ms
        self.transform = transform or PairedTransform(image_size=None)

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
            ms_path = path.with_suffix(".npy")
            if not ms_path.is_file():
                raise UserError(f"multispectral file {ms_path} is missing for image {path}")
            try:
                ms = torch.from_numpy(np.load(ms_path).astype(np.float32)).permute(2, 0, 1)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read multispectral file {ms_path}: {e}") from None
            if ms.shape[1:] != rgb.shape[1:]:
                raise UserError(f"{ms_path} is {tuple(ms.shape[1:])} pixels but {path} is {tuple(rgb.shape[1:])}")
        return rgb, ms, label

    def __getitem__(self, index: int) -> dict:
        rgb, ms, label = self.read(index)
        sample = self.transform(rgb, ms)
        sample["label"] = label
        return sample


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

    def __call__(self, rgb: torch.Tensor, ms: torch.Tensor | None = None) -> dict:
        x = rgb if ms is None else torch.cat([rgb, ms])
        size = [self.image_size] * 2 if self.image_size else list(x.shape[1:])
        if self.train:
            top, left, h, w = RandomResizedCrop.get_params(x, scale=list(self.scale), ratio=[3 / 4, 4 / 3])
            x = TF.resized_crop(x, top, left, h, w, size, antialias=True)
            if torch.rand(()) < self.hflip:
                x = x.flip(-1)
            if torch.rand(()) < self.vflip:
                x = x.flip(-2)
        elif list(x.shape[1:]) != size:
            x = TF.resize(x, size, antialias=True)
        out = {"rgb": TF.normalize(x[:3], self.mean, self.std)}
        if ms is not None:
            out["ms"] = x[3:] if self.ms_mean is None else TF.normalize(x[3:], self.ms_mean, self.ms_std)
        return out


def ms_statistics(dataset: LeafDataset, max_samples: int = 256) -> tuple[list[float], list[float]]:
    """Per-band mean and std of the MS stacks, from (a seeded subsample of) the training split only."""
    picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:max_samples]
    stacks = torch.stack([dataset.read(int(i))[1] for i in picks])  # N×C×H×W
    mean = stacks.mean(dim=(0, 2, 3))
    std = stacks.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return mean.tolist(), std.tolist()


def prepare_data(cfg: DataConfig) -> None:
    """Write the demo set when the config asks for it and it is not there yet; otherwise check the root exists."""
    root = Path(cfg.root)
    if cfg.demo and not (root / "train").is_dir():
        print(f"writing the synthetic demo dataset to {root} (seed {cfg.demo_seed})")
        make_demo_dataset(root, seed=cfg.demo_seed)
    if not root.is_dir():
        raise UserError(
            f"data.root {root} does not exist. Point data.root at <root>/<split>/<class>/<image> "
            "folders, or set data.demo=true to generate the built-in demo set there."
        )


def build_loader(
    cfg: DataConfig,
    split: str,
    batch_size: int,
    train: bool,
    with_ms: bool,
    classes: list[str] | None = None,
    ms_stats: tuple | None = None,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader over one split; training loaders shuffle (seeded), augment and drop the last partial batch."""
    transform = PairedTransform(
        cfg.image_size,
        train=train,
        mean=cfg.mean,
        std=cfg.std,
        ms_mean=ms_stats[0] if ms_stats else None,
        ms_std=ms_stats[1] if ms_stats else None,
        hflip=cfg.hflip,
        vflip=cfg.vflip,
        scale_min=cfg.scale_min,
    )
    dataset = LeafDataset(cfg.root, split, classes=classes, with_ms=with_ms, transform=transform)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(dataset) > batch_size,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


# ----------------------------------------------------------------------------------------------- demo data set


def _leaf_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A leaf on soil: (leaf mask H×W in [0, 1], normalized coordinates along/across the leaf)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    angle = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(-0.08, 0.08, size=2)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    a, b = rng.uniform(0.36, 0.46), rng.uniform(0.2, 0.28)
    r = (u / a) ** 2 + (v / (b * (1 - 0.5 * (u / a)))) ** 2  # egg-shaped: narrower towards the tip
    mask = np.clip((1.0 - r) * 8, 0, 1)
    return mask, np.stack([u / a, v / b])


def _symptom_mask(rng: np.random.Generator, cls: str, size: int, coords: np.ndarray) -> np.ndarray:
    """Where the disease shows, H×W in [0, 1]; each class has its own spatial pattern."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    spots = np.zeros((size, size), np.float32)
    if cls == "healthy":
        return spots
    if cls == "nitrogen_stress":  # chlorosis spreading from the leaf tip and margins
        return np.clip((coords[0] + 0.6 * np.abs(coords[1]) - rng.uniform(0.0, 0.4)) * 2.5, 0, 1)
    count, radius, sharp = {
        "early_blight": (rng.integers(2, 5), (0.06, 0.1), 30.0),
        "leaf_rust": (rng.integers(15, 30), (0.015, 0.03), 80.0),
        "powdery_mildew": (rng.integers(3, 6), (0.1, 0.16), 6.0),
    }[cls]
    for _ in range(count):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(*radius)
        d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        spots = np.maximum(spots, np.clip((r - d) * sharp / max(r, 0.02) + 0.5, 0, 1))
    return spots


# Reflectance of blue, green, red, red-edge, NIR: healthy leaf, soil, and the change each disease causes.
_LEAF = np.array([0.05, 0.14, 0.06, 0.30, 0.50], np.float32)
_SOIL = np.array([0.12, 0.16, 0.22, 0.28, 0.32], np.float32)
_SYMPTOM = {
    "early_blight": [-0.02, -0.08, 0.04, -0.20, -0.35],
    "leaf_rust": [-0.03, 0.0, 0.20, -0.12, -0.25],
    "powdery_mildew": [0.30, 0.22, 0.28, 0.05, -0.15],
    "nitrogen_stress": [0.02, 0.10, 0.14, -0.20, -0.28],
    "healthy": [0, 0, 0, 0, 0],
}


def _render(rng: np.random.Generator, cls: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One sample: an RGB uint8 image H×W×3 and its 5-band reflectance stack H×W×5 (float16)."""
    leaf, coords = _leaf_scene(rng, size)
    symptom = _symptom_mask(rng, cls, size, coords) * leaf
    # Pre-symptomatic stress: half of the diseased leaves show it in red-edge/NIR but barely in visible light.
    visible_strength = rng.uniform(0.5, 1.0) if rng.random() < 0.5 else rng.uniform(0.0, 0.12)
    nir_strength = rng.uniform(0.7, 1.0)
    leaf_tint = _LEAF * rng.uniform(0.85, 1.15, size=5).astype(np.float32)
    veins = 1.0 - 0.15 * np.exp(-((coords[1] * 12) ** 2)) * leaf  # midrib
    soil = _SOIL * rng.uniform(0.7, 1.2) + rng.normal(0, 0.02, (size, size, 1)).astype(np.float32)
    change = np.array(_SYMPTOM[cls], np.float32)
    strength = np.array([visible_strength] * 3 + [nir_strength] * 2, np.float32)
    reflect = soil * (1 - leaf[..., None]) + (leaf_tint * veins[..., None]) * leaf[..., None]
    reflect = reflect + symptom[..., None] * change * strength
    light = rng.uniform(0.7, 1.3) * (1 + 0.3 * (np.linspace(-0.5, 0.5, size)[None, :, None] * rng.uniform(-1, 1)))
    reflect = np.clip(reflect * light + rng.normal(0, 0.01, reflect.shape), 0, 1).astype(np.float32)
    rgb = reflect[..., [2, 1, 0]] * 2.2 + rng.normal(0, 0.03, (size, size, 3))  # camera gain and noise
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), reflect.astype(np.float16)


def make_demo_dataset(
    root: str | Path,
    seed: int = 0,
    per_class: tuple[int, int, int] = (240, 60, 60),
    size: int = 64,
    label_noise: float = 0.03,
) -> Path:
    """Write a seeded synthetic leaf-disease set: <root>/{train,val,test}/<class>/<n>.png + <n>.npy (5 bands).

    Symptoms are clear in red-edge/NIR for every diseased leaf but faint in RGB for about half of them, so an
    RGB+MS teacher beats an RGB-only model and has something to teach it. `label_noise` of the training labels
    are flipped to a random other class, as in hand-labelled field data.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val", "test"), per_class):
        for cls in DEMO_CLASSES:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
        for true_cls in DEMO_CLASSES:
            for n in range(count):
                rgb, ms = _render(rng, true_cls, size)
                cls = true_cls
                if split == "train" and rng.random() < label_noise:
                    cls = str(rng.choice([c for c in DEMO_CLASSES if c != true_cls]))
                stem = root / split / cls / f"{true_cls}_{n:04d}"
                Image.fromarray(rgb).save(stem.with_suffix(".png"))
                np.save(stem.with_suffix(".npy"), ms)
    (root / "bands.json").write_text(json.dumps({"bands": list(DEMO_BANDS), "seed": seed}))
    return root


def checkpoint_loader(cfg: DataConfig, meta: dict, split: str, batch_size: int) -> DataLoader:
    """An evaluation loader that feeds a checkpoint what it was trained on: its classes, inputs and MS stats."""
    with_ms = "ms" in meta["inputs"]
    ms_stats = (meta["ms_mean"], meta["ms_std"]) if with_ms else None
    return build_loader(
        cfg, split, batch_size, train=False, with_ms=with_ms, classes=meta["classes"], ms_stats=ms_stats
    )
