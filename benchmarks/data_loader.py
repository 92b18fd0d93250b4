"""Throughput of the training data loader alone (no model): samples/s with and without MS, per worker count.

python benchmarks/data_loader.py                                  # a small demo set in a temp folder (< 1 minute)
python benchmarks/data_loader.py --root data/plantvillage --workers 0 4 8 --out results/loader.json
python benchmarks/data_loader.py --config configs/teacher_v2s.yaml data.ms_root=/data/ms --workers 8 16
python benchmarks/data_loader.py --vs-torchvision --out results/loader_vs_torchvision.json   # about 2 minutes
python benchmarks/data_loader.py --vs-torchvision --photos ../shared/data/ibeans128 --image-size 128 --workers 0 4

Startup (worker spawn + first batch) is reported apart from the steady rate, which is what training sees.

--vs-torchvision races kd's training loader (RGB only) against two torchvision pipelines on the same files:
`torchvision`, ImageFolder + PIL transforms (what torchdistill's configs build: RandomResizedCrop, flips, ToTensor,
Normalize), and `torchvision_v2`, what one would write today: torchvision.io.decode_image (libjpeg-turbo, uint8
tensor) + transforms.v2 (RandomResizedCrop, flips, ToDtype, Normalize). The files: rendered 500x500 JPEG field photos
at 224 px and the demo's 64 px PNGs (--images JPEGs, default 100, and 4x as many PNGs), or with --photos DIR the
photos of DIR/train/<class>/ at --image-size (default 224): all of them, or with --images N the first N taken
round-robin over the classes (each class's files sorted by name), copied to a temp folder like the rendered ones.
Per worker: samples/s of one process decoding and transforming alone (1 thread, no DataLoader), which is what each
DataLoader worker does; kd's float path before uint8 (`kd_float`) is measured too. Then each loader with --workers
workers. Variants take turns over --rounds rounds, best round counts.
"""

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image, read_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing kd

from benchmarks.report import write_report  # noqa: E402
from kd.config import DataConfig, load_config  # noqa: E402
from kd.data.dataset import InputSpec  # noqa: E402
from kd.data.demo import make_demo_dataset  # noqa: E402
from kd.data.layouts import class_images  # noqa: E402
from kd.data.loaders import build_loader, open_split, prepare_data  # noqa: E402
from kd.errors import UserError, exit_on_user_error  # noqa: E402


def measure(cfg: DataConfig, dataset, with_ms: bool, workers: int, batch_size: int, batches: int) -> dict:
    """Time `batches` training batches after the first one (which pays for worker startup)."""
    cfg.num_workers = workers
    bands = dataset.read(0)[1].shape[0] if with_ms else 0
    ms_stats = {"ms_mean": [0.0] * bands, "ms_std": [1.0] * bands} if with_ms else {}  # MS normalization costs too
    spec = InputSpec(cfg.image_size, **ms_stats)  # the normalization's values do not change its cost
    loader = build_loader(cfg, spec, "train", batch_size, train=True, dataset=dataset)
    start = time.perf_counter()
    it = iter(loader)
    next(it)
    startup = time.perf_counter() - start
    start, seen, done = time.perf_counter(), 0, 0
    while done < batches:
        for batch in it:
            seen, done = seen + len(batch["label"]), done + 1
            if done == batches:
                break
        it = iter(loader)  # next epoch (persistent workers are reused)
    elapsed = time.perf_counter() - start
    return {
        "with_ms": with_ms,
        "workers": workers,
        "startup_s": round(startup, 3),
        "samples_per_s": round(seen / elapsed, 1),
    }


def write_photos(root: Path, count: int, size: int, suffix: str) -> Path:
    """`count` demo leaves rendered at `size` px (kd.data.demo), as <root>/train/<class>/*<suffix>: JPEGs like field
    photos (quality 90), or PNGs."""
    import numpy as np
    from PIL import Image

    from kd.data.demo import DEMO_CLASSES, _render

    rng = np.random.default_rng(0)
    for i in range(count):
        cls = DEMO_CLASSES[i % len(DEMO_CLASSES)]
        (root / "train" / cls).mkdir(parents=True, exist_ok=True)
        rgb, _ = _render(rng, cls, size)
        Image.fromarray(rgb).save(root / "train" / cls / f"{i:05d}{suffix}", quality=90)
    return root


def copy_photos(photos: Path, root: Path, count: int | None) -> Path:
    """`photos`/train/<class>/* copied to <root>/train/<class>/: the first `count` taken round-robin over the classes
    (each class's files sorted by name), so any count keeps the classes balanced; all of them when `count` is None."""
    per_class = class_images(photos / "train").values()  # kd's own listing: the files kd would train on
    picked = [p for row in itertools.zip_longest(*per_class) for p in row if p is not None][:count]
    for path in picked:
        (root / "train" / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / "train" / path.parent.name / path.name)
    return root


class DecodedFolder(torch.utils.data.Dataset):
    """ImageFolder's samples decoded by torchvision.io (libjpeg-turbo, to a uint8 tensor), then `transform`."""

    def __init__(self, samples: list[tuple[str, int]], transform) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.transform(decode_image(read_file(path), mode=ImageReadMode.RGB)), label


def torchvision_sets(root: Path, size: int, scale_min: float, mean: list[float], std: list[float]) -> dict:
    """The two torchvision pipelines over <root>/train (same files, same augmentations): ImageFolder + PIL transforms
    (`torchvision`) and decode_image + transforms.v2 (`torchvision_v2`)."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    crop = T.RandomResizedCrop(size, scale=(scale_min, 1.0))
    flips = [T.RandomHorizontalFlip(), T.RandomVerticalFlip()]
    pil_set = ImageFolder(str(root / "train"), T.Compose([crop, *flips, T.ToTensor(), T.Normalize(mean, std)]))
    v2_transform = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(scale_min, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
    return {"torchvision": pil_set, "torchvision_v2": DecodedFolder(pil_set.samples, v2_transform)}


def transforms_per_worker(root: Path, size: int, rounds: int) -> dict:
    """samples/s of one worker's work (decode + training transform, 1 thread) for kd, kd's float path and both
    torchvision pipelines; variants take turns, best round counts."""
    from kd.data.dataset import LeafDataset, load_image
    from kd.data.transforms import PairedTransform

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    transform = PairedTransform(size, train=True, mean=mean, std=std, hflip=0.5, vflip=0.5, scale_min=0.6)
    kd_set = LeafDataset(root, "train", transform=transform)
    tv_sets = torchvision_sets(root, size, 0.6, mean, std)

    def kd_float(i: int):  # the float path: the image made float at full size, then cropped and resized
        generator = torch.Generator().manual_seed(i)
        return transform(load_image(kd_set.samples[i][0]), generator=generator)

    variants = {
        "kd": lambda i: kd_set[i],
        "kd_float": kd_float,
        "torchvision": tv_sets["torchvision"].__getitem__,
        "torchvision_v2": tv_sets["torchvision_v2"].__getitem__,
    }
    n = min(len(kd_set), len(tv_sets["torchvision"]))
    best = dict.fromkeys(variants, 0.0)
    for _ in range(rounds):
        for name, get in variants.items():
            start = time.perf_counter()
            for i in range(n):
                get(i)
            best[name] = max(best[name], n / (time.perf_counter() - start))
    return {name: round(rate, 1) for name, rate in best.items()}


def loaders_with_workers(root: Path, size: int, workers: int, batch_size: int, rounds: int) -> dict:
    """samples/s of kd's training loader and of both torchvision pipelines' loaders, `workers` processes each,
    persistent workers, over whole epochs after the first batch (start-up); the three take turns."""
    cfg = DataConfig(root=str(root), demo=False, image_size=size, num_workers=workers, hflip=0.5, vflip=0.5)
    spec = InputSpec(size)
    kd_loader = build_loader(cfg, spec, "train", batch_size, train=True, dataset=open_split(cfg, "train", scan=False))
    extra = {"persistent_workers": True} if workers else {}
    loaders = {"kd": kd_loader}
    for name, tv_set in torchvision_sets(root, size, cfg.scale_min, spec.mean, spec.std).items():
        loaders[name] = torch.utils.data.DataLoader(
            tv_set, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers, **extra
        )
    best = dict.fromkeys(loaders, 0.0)
    for loader in loaders.values():
        it = iter(loader)
        next(it)  # start-up: workers spawned, first batch
        for _ in it:
            pass
    for _ in range(rounds):
        for name, loader in loaders.items():
            start, seen = time.perf_counter(), 0
            for batch in loader:
                seen += len(batch["label"] if isinstance(batch, dict) else batch[1])
            best[name] = max(best[name], seen / (time.perf_counter() - start))
    return {name: round(rate, 1) for name, rate in best.items()}


def vs_torchvision(args) -> dict:
    """kd's loader against both torchvision pipelines on 500 px JPEGs at 224 px and on 64 px PNGs, or on --photos."""
    if args.photos:
        photos, size = Path(args.photos), args.image_size or 224
        if not (photos / "train").is_dir():
            raise UserError(f"--photos {photos}: no train/ folder (the layout is DIR/train/<class>/*.jpg)")
        cases = {
            f"photos_{photos.resolve().name}_to_{size}px": (size, lambda root: copy_photos(photos, root, args.images))
        }
    else:
        count = args.images or 100
        cases = {
            "jpeg_500px_to_224px": (224, lambda root: write_photos(root, count, 500, ".jpg")),
            "png_64px_to_64px": (64, lambda root: write_photos(root, count * 4, 64, ".png")),
        }
    report = {"cpus": os.cpu_count(), "workers": args.workers, "batch_size": args.batch_size, "cases": {}}
    with tempfile.TemporaryDirectory() as temp:
        for name, (size, write) in cases.items():
            root = write(Path(temp) / name)
            images = sum(1 for p in (root / "train").rglob("*") if p.is_file())
            torch.set_num_threads(1)  # as in a DataLoader worker
            per_worker = transforms_per_worker(root, size, args.rounds)
            case = {"images": images, "per_worker_samples_per_s": per_worker, "loaders_samples_per_s": {}}
            for workers in args.workers:
                rates = loaders_with_workers(root, size, workers, args.batch_size, args.rounds)
                case["loaders_samples_per_s"][str(workers)] = rates
            for baseline in ("torchvision", "torchvision_v2"):
                case[f"kd_vs_{baseline}_per_worker"] = round(per_worker["kd"] / per_worker[baseline], 3)
            report["cases"][name] = case
            print(
                f"{name} ({images} images): per worker (1 thread) "
                + ", ".join(f"{k} {v:.0f}" for k, v in per_worker.items())
                + f" samples/s; kd / torchvision {case['kd_vs_torchvision_per_worker']:.2f}"
                + f", kd / torchvision_v2 {case['kd_vs_torchvision_v2_per_worker']:.2f}"
            )
            for workers, rates in case["loaders_samples_per_s"].items():
                print(
                    f"  {workers} workers: "
                    + ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
                    + f" samples/s; kd / torchvision {rates['kd'] / rates['torchvision']:.2f}"
                    + f", kd / torchvision_v2 {rates['kd'] / rates['torchvision_v2']:.2f}"
                )
    return report


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config whose data section is used (default: a small demo set)")
    parser.add_argument("--root", help="dataset root (overrides data.root; turns data.demo off)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20, help="batches timed per setting, after the first")
    parser.add_argument("--image-size", type=int, help="overrides data.image_size (--photos: default 224)")
    parser.add_argument("--no-ms", action="store_true", help="RGB only (the data has no MS stacks)")
    parser.add_argument("--vs-torchvision", action="store_true", help="race torchvision's loaders (PIL, v2)")
    parser.add_argument("--images", type=int, help="--vs-torchvision: JPEGs (default 100; PNGs: 4x as many), or photos")
    parser.add_argument("--photos", help="--vs-torchvision: race on DIR/train/<class>/* instead of rendered photos")
    parser.add_argument("--rounds", type=int, default=3, help="--vs-torchvision: rounds, best counts")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.ms_root=/data/ms")
    args = parser.parse_args(argv)
    if args.vs_torchvision:
        report = vs_torchvision(args)
        write_report(args.out, report)
        return report

    cfg = load_config(args.config, args.overrides).data
    if args.image_size:
        cfg.image_size = args.image_size
    temp = None
    if args.root:
        cfg.root, cfg.demo = args.root, False
    elif not args.config:
        temp = tempfile.TemporaryDirectory()
        cfg.root, cfg.demo = temp.name, False
        make_demo_dataset(
            temp.name,
            per_class=(60, 4, 4),
            unlabeled_per_class=0,
            **({"size": cfg.image_size} if cfg.image_size else {}),
        )
    prepare_data(cfg)
    torch.set_num_threads(1)  # as in a DataLoader worker; the main process would otherwise use every core

    results = []
    for with_ms in (False,) if args.no_ms else (False, True):
        start = time.perf_counter()
        dataset = open_split(cfg, "train", with_ms=with_ms)  # listing + header scan, timed apart from loading
        scan_s = time.perf_counter() - start
        for workers in args.workers:
            row = measure(cfg, dataset, with_ms, workers, args.batch_size, args.batches)
            row["scan_s"] = round(scan_s, 3)
            results.append(row)
            print(
                f"{'rgb+ms' if with_ms else 'rgb':>6}  workers {workers:>2}: {row['samples_per_s']:8.1f} samples/s"
                f"  (startup {row['startup_s']:.2f} s, scan of {len(dataset)} samples {scan_s:.2f} s)"
            )
    report = {
        "root": str(cfg.root) if temp is None else "demo (temporary)",
        "train_samples": len(dataset),
        "image_size": cfg.image_size,
        "batch_size": args.batch_size,
        "batches": args.batches,
        "cpus": os.cpu_count(),
        "results": results,
    }
    write_report(args.out, report)
    if args.out:
        print(f"wrote {args.out}")
    if temp is not None:
        temp.cleanup()
    return report


if __name__ == "__main__":
    main()
