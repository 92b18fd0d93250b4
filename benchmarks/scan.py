"""What the start-up scan costs: images/s of reading only the headers vs decoding every file (kd's scan).

python benchmarks/scan.py                      # 3,000 PNGs at 128 px and 300 JPEGs at 500 px in a temp folder
python benchmarks/scan.py --pngs 500 --jpegs 100 --out results/scan.json

The header-only pass is what kd used to do; it let truncated files through to stop the run mid-epoch.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing kd

from benchmarks.report import write_report  # noqa: E402
from kd.data.dataset import LeafDataset  # noqa: E402
from kd.data.scan import scan_dataset  # noqa: E402


def write_images(root: Path, count: int, size: int, suffix: str) -> None:
    """`count` photo-like images (smooth colour fields: pixel noise would not compress like a field photo) in two
    class folders."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
        coarse.resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:05d}{suffix}", quality=90)


def headers_only(dataset: LeafDataset) -> None:
    for path, _ in dataset.samples:
        with Image.open(path) as im:
            im.size  # noqa: B018 (the header is all it reads)


def rate(run, dataset: LeafDataset, repeats: int = 3) -> float:
    """Images per second, best of `repeats` (the file cache is warm after the first)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(dataset)
        best = min(best, time.perf_counter() - start)
    return len(dataset) / best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pngs", type=int, default=3000, help="128 px PNG images")
    parser.add_argument("--jpegs", type=int, default=300, help="500 px JPEG images (quality 90)")
    parser.add_argument("--out", help="also write the figures here (JSON)")
    args = parser.parse_args(argv)
    report = {"cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        for name, count, size, suffix in (
            ("png_128px", args.pngs, 128, ".png"),
            ("jpeg_500px", args.jpegs, 500, ".jpg"),
        ):
            root = Path(tmp) / name
            write_images(root, count, size, suffix)
            dataset = LeafDataset(
                root, "train", split_file=Path(tmp) / f"{name}.json", val_fraction=1e-4, test_fraction=1e-4
            )
            report[name] = {
                "images": len(dataset),
                "headers_only": rate(headers_only, dataset),
                "full_1_thread": rate(lambda d: scan_dataset(d, workers=1), dataset),
                "full_all_threads": rate(lambda d: scan_dataset(d), dataset),
            }
    for name, figures in report.items():
        if isinstance(figures, dict):
            cells = ", ".join(f"{k} {v:,.0f} img/s" for k, v in figures.items() if k != "images")
            print(f"{name} ({figures['images']} images): {cells}")
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
