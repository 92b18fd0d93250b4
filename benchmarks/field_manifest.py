"""The field case as a CSV manifest: K labelled photos per class of a split-folder set's train split, the rest of
that split as unlabelled rows (label withheld), val and test unchanged.

python benchmarks/field_manifest.py --root ../shared/data/ibeans128 --per-class 40 --out data/field/k40.csv

The K photos are drawn per class with `--seed` (default 0) and are the same for every student seed, so the rows of
one table differ only in how they train. Paths are written relative to the CSV, as kd's manifests read them.
"""

import argparse
import csv
import os
import random
from pathlib import Path

SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)


def field_rows(root: Path, per_class: int, seed: int) -> list[tuple[Path, str, str]]:
    """(image, label or "", split) rows: `per_class` labelled training photos of each class, the rest unlabelled."""
    rng, rows = random.Random(seed), []
    for folder in sorted(p for p in (root / "train").iterdir() if p.is_dir()):
        photos = images(folder)
        if len(photos) <= per_class:
            raise SystemExit(f"{folder} has {len(photos)} photos, not more than --per-class {per_class}")
        labelled = set(rng.sample(photos, per_class))
        rows += [(p, folder.name if p in labelled else "", "train") for p in photos]
    for split in ("val", "test"):
        rows += [(p, folder.name, split) for folder in sorted((root / split).iterdir()) for p in images(folder)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="<root>/{train,val,test}/<class>/<image>")
    parser.add_argument("--per-class", type=int, default=40, help="labelled training photos kept per class")
    parser.add_argument("--seed", type=int, default=0, help="which photos are kept labelled")
    parser.add_argument("--out", required=True, help="the CSV to write")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = field_rows(Path(args.root), args.per_class, args.seed)
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows((os.path.relpath(p, out.parent), label, split) for p, label, split in rows)
    labelled = sum(1 for _, label, split in rows if split == "train" and label)
    print(f"{out}: {labelled} labelled + {sum(1 for _, label, _ in rows if not label)} unlabelled training photos")


if __name__ == "__main__":
    main()
