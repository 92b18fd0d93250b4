"""The synthetic demo set: leaves on soil, RGB + 5-band MS, symptoms clear in red-edge/NIR and subtle in RGB (so an
RGB+MS teacher has something to teach); as in the field, few images are labelled (a few percent wrongly)."""

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from kd.errors import UserError

DEMO_CLASSES = ("healthy", "early_blight", "leaf_rust", "powdery_mildew", "nitrogen_stress")
DEMO_BANDS = ("blue", "green", "red", "red_edge", "nir")
DEMO_VERSION = 2  # written to bands.json; a demo folder from another version is refused (its numbers differ)
DEMO_ROOT = "data/demo"  # the demo's own folder (configs/*.yaml, DataConfig's default), relative to the working folder
VISIBLE_STRENGTH = (0.2, 0.6)  # how strongly a symptom shows in RGB, relative to its reflectance change


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
    # Early disease: plain in red-edge/NIR, subtle in visible light (near the camera noise on the faintest leaves).
    visible_strength = rng.uniform(*VISIBLE_STRENGTH)
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
    per_class: tuple[int, int, int] = (40, 60, 60),
    size: int = 64,
    label_noise: float = 0.03,
    unlabeled_per_class: int = 200,
) -> Path:
    """Write <root>/{train,val,test}/<class>/<n>.png + .npy (`per_class` of each) and <root>/unlabeled/<n>.png + .npy,
    seeded; `label_noise` of the training labels are flipped to a random other class."""
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
    if unlabeled_per_class:
        (root / "unlabeled").mkdir(parents=True, exist_ok=True)
        classes = np.repeat(np.arange(len(DEMO_CLASSES)), unlabeled_per_class)
        for n, k in enumerate(rng.permutation(classes)):  # names and order say nothing about the class
            rgb, ms = _render(rng, DEMO_CLASSES[k], size)
            Image.fromarray(rgb).save(root / "unlabeled" / f"{n:05d}.png")
            np.save(root / "unlabeled" / f"{n:05d}.npy", ms)
    info = {"bands": list(DEMO_BANDS), "seed": seed, "version": DEMO_VERSION}
    (root / "bands.json").write_text(json.dumps(info))
    return root


def may_write_demo(root: str | Path) -> bool:
    """Only at data/demo (however spelled) or over a demo set: elsewhere a mistyped data.root would silently get
    99 MB of synthetic leaves and a run trained on them."""
    root = Path(root)
    home = os.path.normpath(root) == os.path.normpath(DEMO_ROOT) or root.resolve() == Path(DEMO_ROOT).resolve()
    return home or is_demo_set(root)


def is_demo_set(root: Path) -> bool:
    """Whether `root` holds make_demo_dataset's marker: a bands.json naming the demo's bands and its seed."""
    try:
        info = json.loads((root / "bands.json").read_text())
    except (OSError, ValueError):  # none, or not JSON: a user's own folder
        return False
    return isinstance(info, dict) and info.get("bands") == list(DEMO_BANDS) and "seed" in info


def check_demo_version(root: str | Path) -> None:
    """Refuse a demo folder of another version: its results are not comparable."""
    info = Path(root) / "bands.json"
    version = json.loads(info.read_text()).get("version", 1) if info.is_file() else 1
    if version != DEMO_VERSION:
        raise UserError(
            f"{root} holds version {version} of the demo set; this kd writes version {DEMO_VERSION}. "
            f"Delete the folder (`make clean-demo`) and run again to write the current one, or set data.demo=false."
        )
