"""Which images make up each split: one reader per layout (split folders, one folder split once by a saved seeded
draw, a CSV manifest) in one table, LAYOUTS. Paths are relative to a base folder, so MS stacks can sit under `ms_root`.
"""

import csv
import functools
import json
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from kd.config import DataConfig
from kd.errors import QUOTE_LIMIT, UserError, quote

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Source:
    """DataConfig's fields of the same names."""

    root: Path
    manifest: str | Path = ""
    split_file: str | Path = ""
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0

    @classmethod
    def of(cls, cfg: DataConfig) -> "Source":
        return cls(Path(cfg.root), cfg.manifest, cfg.split_file, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)


class Listing(NamedTuple):
    base: Path  # folder the relative paths start from
    entries: list[tuple[str, str]]  # (relative path, class name) of the requested split
    classes: list[str]  # every class of the dataset, sorted (the default label order)
    where: str  # what was read, for error messages


def list_split(source: Source, split: str) -> Listing:
    return layout_of(source).read(source, split)


def split_images(source: Source, splits: tuple[str, ...]) -> dict[Path, str]:
    """{image path: split}; a split the data lacks is left out."""
    out = {}
    for split in splits:
        try:
            listing = list_split(source, split)
        except UserError:
            continue
        out |= {listing.base / rel: split for rel, _ in listing.entries}
    return out


def shown(value: object) -> str:
    """str(value), cut like kd.errors.quote when long: a 100k-character path must not make a 200 kB message."""
    text = str(value)
    return text if len(text) <= QUOTE_LIMIT else quote(text)


def check_classes(classes: list[str], where: str, fix: str) -> None:
    """Refuse fewer than 2 classes: a classifier of one class scores 100% and learns nothing."""
    if len(classes) < 2:
        found = f"only the class {quote(classes[0])}" if classes else "no classes"
        raise UserError(f"{where} has {found}: classification needs at least 2 classes; {fix}")


def image_files(paths: Iterable[Path]) -> list[Path]:
    """The images among `paths`, sorted. Not only regular files: a FIFO named like an image is listed, and the scan
    names it as bad. A .tif/.tiff sharing its stem with another image is that image's MS stack, not an image."""
    files = sorted(p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    plain = {p.with_suffix("") for p in files if p.suffix.lower() not in (".tif", ".tiff")}
    return [p for p in files if p.suffix.lower() not in (".tif", ".tiff") or p.with_suffix("") not in plain]


def class_images(folder: Path) -> dict[str, list[Path]]:
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{folder} has no class folders: expected {folder}/<class>/<image>")
    out = {d.name: image_files(d.iterdir()) for d in classes}
    empty = [name for name, images in out.items() if not images]
    if empty and len(empty) < len(out):  # all empty is reported by the caller as "no images"
        raise UserError(
            f"class folder(s) {', '.join(str(folder / n) for n in empty)} have no images "
            f"({', '.join(IMAGE_SUFFIXES)}): add images or remove the folder, or the model gets a class it cannot learn"
        )
    return out


def read_split_folders(source: Source, split: str) -> Listing:
    root = source.root
    if source.split_file:
        raise UserError(f"data.split_file is set, but {root} already has split folders; unset one of them")
    split_dir = root / split
    if not split_dir.is_dir():
        raise UserError(f"split folder {split_dir} does not exist: expected <root>/{split}/<class>/<image>")
    images = class_images(split_dir)
    check_classes(list(images), str(split_dir), f"add a folder of images for each class under {split_dir}")
    entries = [(p.relative_to(root).as_posix(), cls) for cls, files in images.items() for p in files]
    return Listing(root, entries, sorted(images), str(split_dir))


def read_one_folder(source: Source, split: str) -> Listing:
    root = source.root
    if not root.is_dir():
        raise UserError(f"data.root {root} does not exist: expected <root>/<class>/<image> or <root>/<split>/<class>/")

    def pool() -> dict[str, list[str]]:  # listed only when a split has to be drawn
        images = class_images(root)
        check_classes(list(images), str(root), "add a <class> folder of images for each class")
        return {cls: [p.relative_to(root).as_posix() for p in files] for cls, files in images.items()}

    return _from_split_file(root, split, pool, source)


def read_manifest_split(source: Source, split: str) -> Listing:
    path = Path(source.manifest)
    rows = read_manifest(path)
    if rows[0][2] is None:  # no split column: split it once, like a single folder of classes
        pool: dict[str, list[str]] = {}
        for rel, label, _ in rows:
            pool.setdefault(label, []).append(rel)
        return _from_split_file(path.parent, split, lambda: pool, source)
    entries = [(rel, label) for rel, label, s in rows if s == split]
    return Listing(path.parent, entries, _sorted_labels({label for _, label, _ in rows}), f"{path} ({split})")


def read_manifest(path: Path, unlabeled: bool = False) -> list[tuple[str, str, str | None]]:
    """Rows (path, label, split or None). A row without a label (split empty or train) is an unlabelled training
    image: left out, or with `unlabeled` the only rows returned."""
    if not path.is_file():
        raise UserError(f"data.manifest {shown(path)} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel starts its UTF-8 CSVs with a BOM
        reader = csv.DictReader(f)
        if not {"path", "label"} <= set(reader.fieldnames or ()):
            raise UserError(f"{path} must start with the header row path,label[,split]; got {quote(reader.fieldnames)}")
        has_split = "split" in reader.fieldnames
        rows = [(r["path"].strip(), r["label"].strip(), r["split"].strip() if has_split else None) for r in reader]
    without_label = [bool(r[0]) and not r[1] and r[2] in (None, "", "train") for r in rows]
    bad = [
        (i + 2, r)
        for i, r in enumerate(rows)
        if not without_label[i] and (not r[0] or not r[1] or (has_split and r[2] not in SPLITS))
    ]
    if bad:
        raise UserError(
            f"{path} line {bad[0][0]}: {quote(bad[0][1])} needs a path, a label and a split in {SPLITS} (a row "
            "without a label is an unlabelled training image: leave its split empty or train)"
        )
    if unlabeled:
        return [r for r, u in zip(rows, without_label) if u]
    _refuse_repeats(path, rows, ["unlabelled" if u else r[2] or "" for r, u in zip(rows, without_label)])
    lines = [i + 2 for i, u in enumerate(without_label) if not u]
    rows = [r for r, u in zip(rows, without_label) if not u]
    if not rows:
        raise UserError(f"{path} lists no images")
    check_classes(sorted({label for _, label, _ in rows}), str(path), "give its label column at least 2 classes")
    # a label only val/test rows have would get no class, and score 0 on them (no train rows: no split column, and
    # the split drawn later is stratified; or a manifest without training rows)
    trained = {label for _, label, split in rows if split == "train"}
    untrained = [(line, label) for line, (_, label, _) in zip(lines, rows) if trained and label not in trained]
    if untrained:
        label = untrained[0][1]
        at = [str(line) for line, other in untrained if other == label]
        more = f" ({len(at) - 5} more)" if len(at) > 5 else ""
        raise UserError(
            f"{shown(path)}: the label {quote(label)} is on val/test rows only (lines {', '.join(at[:5])}{more}), "
            "so no training row teaches it. Add training rows with that label, or fix or delete those rows."
        )
    return rows


def _refuse_repeats(path: Path, rows: list[tuple[str, str, str | None]], kinds: list[str]) -> None:
    """Refuse an image on two rows, compared resolved. `kinds`: each row's split, or "unlabelled"."""
    first: dict[str, int] = {}
    realpath = functools.cache(os.path.realpath)  # each folder once: every path of a large manifest takes seconds
    for i, (rel, _, _) in enumerate(rows):
        head, name = os.path.split(os.path.join(path.parent, rel))
        j = first.setdefault(os.path.join(realpath(head), name), i)
        if j == i:
            continue
        where = f"lines {j + 2} and {i + 2} of {shown(path)} both list the image {shown(rel)}"
        if kinds[j] == kinds[i]:
            raise UserError(f"{where}{f' ({kinds[i]})' if kinds[i] else ''}: it would be used twice. Delete a row.")
        harm = "a val or test image would be trained on" if {"val", "test"} & {kinds[i], kinds[j]} else "used twice"
        raise UserError(f"{where}, as {kinds[j]} and as {kinds[i]}: {harm}. Delete one of the rows.")


def _sorted_labels(labels: set[str]) -> list[str]:
    # numeric labels ("2", "10") sort as numbers, so class 10 does not land between 1 and 2
    return sorted(labels, key=int) if all(s.isdigit() for s in labels) else sorted(labels)


def _from_split_file(base: Path, split: str, pool: Callable[[], dict], source: Source) -> Listing:
    path = Path(source.split_file or base / "splits.json")
    if not path.is_file():
        write_split_file(path, pool(), source.val_fraction, source.test_fraction, source.split_seed)
    try:
        saved = json.loads(path.read_text())
        entries = [tuple(e) for e in saved[split]]
        classes = list(saved["classes"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"split file {path} is damaged or has no '{split}' list ({e}); restore it") from None
    # exists, not is_file: a FIFO or folder there is named by the scan; os.path: False for a too-long name
    gone = [rel for rel, _ in entries if not os.path.exists(base / rel)]
    if gone:
        raise UserError(
            f"split file {path} lists {len(gone)} {split} images that no longer exist under {base}, e.g. "
            f"{', '.join(map(shown, gone[:5]))}. Restore them, or delete {path} to draw a new split (its val/test "
            "images will differ from earlier runs, so earlier scores are not comparable)."
        )
    asked = {"val_fraction": source.val_fraction, "test_fraction": source.test_fraction, "seed": source.split_seed}
    if any(saved.get(k) != v for k, v in asked.items()):
        warnings.warn(
            f"reusing split file {path} ({_describe(saved)}), not the configured {_describe(asked)}", stacklevel=2
        )
    check_classes(classes, f"split file {path}", f"delete it to draw a new split of {base}")
    return Listing(base, entries, classes, f"{path} ({split})")


def _describe(split: dict) -> str:
    return ", ".join(f"{key} {split.get(key)}" for key in ("val_fraction", "test_fraction", "seed"))


def write_split_file(path: Path, pool: dict[str, list[str]], val_fraction: float, test_fraction: float, seed: int):
    """Draw a stratified split (each class in every split) and save it as JSON; fractions checked by DataConfig."""
    rng = np.random.default_rng(seed)
    split: dict = {"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction}
    split.update(classes=_sorted_labels(set(pool)), train=[], val=[], test=[])
    for cls in split["classes"]:
        files = sorted(pool[cls])
        # at least one image per class in a split that is asked for, so every class is validated and tested
        n_val, n_test = (0 if f <= 0 else max(1, round(len(files) * f)) for f in (val_fraction, test_fraction))
        if n_val + n_test >= len(files):
            raise UserError(f"class '{cls}' has only {len(files)} images: too few for train, val and test splits")
        for rank, i in enumerate(rng.permutation(len(files))):
            name = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
            split[name].append([files[i], cls])
    for name in SPLITS:
        split[name].sort()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(split, indent=1))
    os.replace(tmp, path)  # atomic: processes that race to write it write the same seeded split
    print(f"wrote a new stratified split to {path} ({_describe(split)}); later runs reuse it")


class Layout(NamedTuple):
    found: Callable[[Source], bool]  # whether the data at `source` is laid out this way
    read: Callable[[Source, str], Listing]  # the images of one split
    draws_split: bool  # read() may draw and save a split file: prepare_data reads once first, on the main process


LAYOUTS = {  # tried in order: the first layout found reads the data
    "manifest": Layout(lambda source: bool(source.manifest), read_manifest_split, draws_split=True),
    "split_folders": Layout(
        lambda source: any((source.root / s).is_dir() for s in SPLITS), read_split_folders, draws_split=False
    ),
    "one_folder": Layout(lambda source: True, read_one_folder, draws_split=True),
}


def layout_of(source: Source) -> Layout:
    return next(layout for layout in LAYOUTS.values() if layout.found(source))
