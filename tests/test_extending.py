"""docs/extending.md's claim for data layouts, shown by use: a new layout is one reader plus one LAYOUTS row, with no
other edit (the losses' and formats' claims are shown in test_features_and_distiller.py and test_export.py)."""

from pathlib import Path

import numpy as np
from PIL import Image

from kd.config import DataConfig
from kd.data import layouts
from kd.data.layouts import Layout, Listing, Source
from kd.data.loaders import open_split

ROOT = Path(__file__).resolve().parents[1]


def read_named_files(source: Source, split: str) -> Listing:
    """A layout of flat file names, <root>/<split>-<class>-<n>.png: what a camera export might look like."""
    files = sorted(source.root.glob(f"{split}-*.png"))
    entries = [(p.name, p.name.split("-")[1]) for p in files]
    classes = sorted({cls for p in source.root.glob("*.png") for cls in [p.name.split("-")[1]]})
    return Listing(source.root, entries, classes, str(source.root))


def test_a_new_layout_is_one_reader_and_one_row(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for cls in ("healthy", "rust"):
            for n in range(count):
                pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / f"{split}-{cls}-{n}.png")
    row = Layout(lambda source: any(source.root.glob("train-*.png")), read_named_files, draws_split=False)
    monkeypatch.setattr(layouts, "LAYOUTS", {"named_files": row, **layouts.LAYOUTS})
    cfg = DataConfig(root=str(tmp_path), demo=False, image_size=16)
    train, val = open_split(cfg, "train"), open_split(cfg, "val")
    assert train.classes == ["healthy", "rust"] and (len(train), len(val)) == (6, 4)
    assert sorted(label for _, label in train.samples) == [0, 0, 0, 1, 1, 1]


def test_the_extending_page_counts_the_edits_the_tests_make():
    page = (ROOT / "docs/extending.md").read_text()
    for claim in (
        "one function and one `SOFT_LOSSES` entry",
        "one function and one `FEATURE_LOSSES` entry",
        "one reader and one `LAYOUTS` row",
        "one `FORMATS` row",
    ):
        assert claim in page, claim
    assert "docs/extending.md" in (ROOT / "README.md").read_text()
