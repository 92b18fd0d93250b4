"""Data layouts, multispectral files, scanning and loaders, on tiny synthetic files written to tmp dirs."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd.config import DataConfig
from kd.data.dataset import InputSpec, LeafDataset, ms_statistics
from kd.data.demo import DEMO_CLASSES, DEMO_VERSION, _render, make_demo_dataset
from kd.data.layouts import SPLITS
from kd.data.loaders import build_loader, open_split, prepare_data
from kd.data.scan import scan_dataset
from kd.data.transforms import PairedTransform
from kd.errors import UserError

HW = (6, 8)  # not square, so the band axis of an MS array is never ambiguous
BANDS = 3
RAW_MS = InputSpec(8, ms_mean=[0.0], ms_std=[1.0])  # MS as stored: one mean and std serve every band


def ms_values(label: int, index: int) -> np.ndarray:
    """The MS stack of image `index` of class `label`, C×H×W: band b is label * 10 + b + index / 100 everywhere."""
    return np.stack([np.full(HW, label * 10 + b + index / 100, np.float32) for b in range(BANDS)])


def write_ms(stem: Path, stack: np.ndarray, kind: str) -> Path:
    """Save a C×H×W stack as .npy H×W×C ("hwc"), .npy C×H×W ("chw") or a multi-page .tif ("tif")."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    if kind == "tif":
        pages = [Image.fromarray(band) for band in stack]
        pages[0].save(stem.with_suffix(".tif"), save_all=True, append_images=pages[1:])
        return stem.with_suffix(".tif")
    np.save(stem.with_suffix(".npy"), stack.transpose(1, 2, 0) if kind == "hwc" else stack)
    return stem.with_suffix(".npy")


def make_folder(root: Path, n: int = 10, ms: str | None = "hwc", ms_root: Path | None = None, classes="abc") -> Path:
    """<root>/<class>/<i>.png (+ MS stack beside it, or under `ms_root` at the same relative path)."""
    for label, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((*HW, 3), 40 * label + i, np.uint8)).save(root / cls / f"{i:02d}.png")
            if ms:
                write_ms((ms_root or root) / cls / f"{i:02d}", ms_values(label, i), ms)
    return root


def data_config(root: Path, **extra) -> DataConfig:
    return DataConfig(**{"root": str(root), "demo": False, "image_size": 8, "num_workers": 0} | extra)


def names(dataset: LeafDataset) -> set[str]:
    return {p.relative_to(p.parents[1]).as_posix() for p, _ in dataset.samples}


# ---------------------------------------------------------------------------------------------------- layouts


def test_split_folders_layout(tiny_demo):
    val = LeafDataset(tiny_demo, "val")
    assert val.classes == sorted(DEMO_CLASSES) and len(val) == 4 * len(DEMO_CLASSES)
    assert all(p.parts[-3] == "val" for p, _ in val.samples)
    with pytest.raises(UserError, match="trained on"):
        LeafDataset(tiny_demo, "val", classes=["a", "b"])


def test_single_folder_split_is_stratified_saved_and_reused(tmp_path):
    root = make_folder(tmp_path / "data", n=10)
    splits = {s: LeafDataset(root, s) for s in SPLITS}
    assert (root / "splits.json").is_file()
    for split, per_class in (("train", 6), ("val", 2), ("test", 2)):
        labels = [label for _, label in splits[split].samples]
        assert [labels.count(c) for c in range(3)] == [per_class] * 3  # every class in every split
    assert set().union(*(names(d) for d in splits.values())) == {f"{c}/{i:02d}.png" for c in "abc" for i in range(10)}
    assert sum(len(d) for d in splits.values()) == 30  # disjoint

    # reused, not redrawn: another seed only warns; new images do not change it
    Image.fromarray(np.zeros((*HW, 3), np.uint8)).save(root / "a" / "new.png")
    with pytest.warns(UserWarning, match="reusing split file"):
        again = LeafDataset(root, "val", split_seed=5)
    assert names(again) == names(splits["val"])

    gone = splits["test"].samples[0][0]
    gone.unlink()
    with pytest.raises(UserError, match=f"no longer exist.*{gone.relative_to(root).as_posix()}.*delete"):
        LeafDataset(root, "test")


def test_split_file_path_from_config_written_by_prepare_data(tmp_path):
    root = make_folder(tmp_path / "data", n=5)
    cfg = data_config(root, split_file=str(tmp_path / "my_split.json"), val_fraction=0.2, test_fraction=0.2)
    prepare_data(cfg)
    saved = json.loads((tmp_path / "my_split.json").read_text())
    assert not (root / "splits.json").exists()
    assert (len(saved["train"]), len(saved["val"]), len(saved["test"])) == (9, 3, 3)
    assert names(open_split(cfg, "val")) == {rel for rel, _ in saved["val"]}
    with pytest.raises(UserError, match="only 2 images"):
        LeafDataset(make_folder(tmp_path / "small", n=2), "train")


def test_demo_is_never_written_into_a_folder_of_real_data(tmp_path):
    root = make_folder(tmp_path / "data", n=3)
    with pytest.raises(UserError, match="demo=false"):
        prepare_data(data_config(root, demo=True))


def test_csv_manifest_with_and_without_split_column(tmp_path):
    make_folder(tmp_path / "images", n=6, ms=None)
    rows = [(f"images/{c}/{i:02d}.png", c, "val" if i < 2 else "train") for c in "abc" for i in range(6)]
    with open(tmp_path / "with_split.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *rows])
    val = LeafDataset("unused", "val", manifest=tmp_path / "with_split.csv")
    assert val.classes == ["a", "b", "c"] and len(val) == 6
    assert val.read(0)[0].shape == (3, *HW)

    with open(tmp_path / "pool.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *[r[:2] for r in rows]])
    test = open_split(data_config("unused", manifest=str(tmp_path / "pool.csv")), "test")
    assert (tmp_path / "splits.json").is_file()  # beside the CSV
    assert sorted(label for _, label in test.samples) == [0, 1, 2]

    (tmp_path / "bad.csv").write_text("file,class\nx.png,a\n")
    with pytest.raises(UserError, match="header row path,label"):
        LeafDataset("unused", "train", manifest=tmp_path / "bad.csv")


# --------------------------------------------------------------------------------------------- multispectral


@pytest.mark.parametrize("kind", ["hwc", "chw", "tif"])
def test_ms_stacks_read_the_same_from_every_file_layout(tmp_path, kind):
    root = make_folder(tmp_path / "data", n=4, ms=kind)
    ds = LeafDataset(root, "train", with_ms=True)
    assert len(ds) == len(LeafDataset(root, "train"))  # a .tif beside a .png is its MS stack, not an image
    for index in range(len(ds)):
        path, label = ds.samples[index]
        rgb, ms, _ = ds.read(index)
        assert ms.shape == (BANDS, *HW) and rgb.shape == (3, *HW)
        assert torch.equal(ms, torch.from_numpy(ms_values(label, int(path.stem))))
    assert scan_dataset(ds) == []


def test_ms_stacks_in_a_parallel_ms_root(tmp_path):
    root = make_folder(tmp_path / "rgb", n=4, ms="chw", ms_root=tmp_path / "ms")
    with pytest.raises(UserError, match="no multispectral file"):
        LeafDataset(root, "train", with_ms=True)
    ds = LeafDataset(root, "train", with_ms=True, ms_root=tmp_path / "ms")
    path, label = ds.samples[0]
    assert torch.equal(ds.read(0)[1], torch.from_numpy(ms_values(label, int(path.stem))))


def test_ambiguous_band_axis_is_an_error_until_ms_layout_is_set(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a" / "x.png")
    np.save(tmp_path / "a" / "x.npy", np.arange(64, dtype=np.float32).reshape(4, 4, 4))
    (tmp_path / "splits.json").write_text(
        json.dumps(
            {"seed": 0, "val_fraction": 0.15, "test_fraction": 0.15, "classes": ["a", "b"], "train": [["a/x.png", "a"]]}
        )
    )
    ds = LeafDataset(tmp_path, "train", with_ms=True)
    with pytest.raises(UserError, match="either axis.*ms_layout"):
        ds.read(0)
    with pytest.raises(UserError, match="either axis"):
        scan_dataset(ds)
    chw = LeafDataset(tmp_path, "train", with_ms=True, ms_layout="chw").read(0)[1]
    hwc = LeafDataset(tmp_path, "train", with_ms=True, ms_layout="hwc").read(0)[1]
    assert chw[1, 0, 0] == 16 and hwc[1, 0, 0] == 1


def test_band_selection_by_index_and_by_name(tmp_path):
    root = make_folder(tmp_path / "data", n=3)
    (root / "bands.json").write_text(json.dumps({"bands": ["blue", "green", "nir"]}))
    by_index = LeafDataset(root, "train", with_ms=True, ms_bands=[2, 0])
    by_name = LeafDataset(root, "train", with_ms=True, ms_bands=["nir", "blue"])
    path, label = by_index.samples[0]
    expected = torch.from_numpy(ms_values(label, int(path.stem))[[2, 0]])
    assert torch.equal(by_index.read(0)[1], expected) and torch.equal(by_name.read(0)[1], expected)
    with pytest.raises(UserError, match=r"\['red'\] not in .*bands.json.*'blue', 'green', 'nir'"):
        LeafDataset(root, "train", with_ms=True, ms_bands=["red"])
    with pytest.raises(UserError, match="it has 3"):
        scan_dataset(LeafDataset(root, "train", with_ms=True, ms_bands=[0, 5]))


def test_missing_ms_file_is_an_error_or_zero_filled(tmp_path):
    root = make_folder(tmp_path / "data", n=4)
    gone = next(p for p, _ in LeafDataset(root, "train").samples).with_suffix(".npy")
    gone.unlink()
    with pytest.raises(UserError, match=f"1 of .* no multispectral file, e.g. {gone}.*ms_missing=zeros"):
        LeafDataset(root, "train", with_ms=True)
    with pytest.warns(UserWarning, match="1 of .*zero-filled"):
        ds = LeafDataset(root, "train", with_ms=True, ms_missing="zeros")
    index = [p for p, _ in ds.samples].index(gone.with_suffix(".png"))
    assert torch.equal(ds.read(index)[1], torch.zeros(BANDS, *HW))
    # statistics leave the zero-filled stack out
    mean, _ = ms_statistics(ds)
    present = [ds.read(i)[1] for i in range(len(ds)) if i != index]
    assert np.allclose(mean, torch.stack(present).mean(dim=(0, 2, 3)).numpy(), atol=1e-5)


def test_statistics_use_the_train_split_only(tmp_path):
    root = make_folder(tmp_path / "data", n=10)
    train = LeafDataset(root, "train", with_ms=True)
    mean, std = ms_statistics(train)
    stacks = torch.stack([train.read(i)[1] for i in range(len(train))])
    assert np.allclose(mean, stacks.mean(dim=(0, 2, 3)).numpy(), atol=1e-5)
    assert np.allclose(std, stacks.std(dim=(0, 2, 3)).numpy(), atol=1e-5)
    everything = [ms_values(label, i) for label in range(3) for i in range(10)]
    assert not np.allclose(mean, np.stack(everything).mean(axis=(0, 2, 3)), atol=1e-4)  # val/test are left out


def test_class_mismatch_and_statistics_from_train_split(tiny_demo):
    with pytest.raises(UserError, match="trained on"):
        LeafDataset(tiny_demo, "val", classes=["a", "b"])
    train = LeafDataset(tiny_demo, "train", with_ms=True)
    mean, std = ms_statistics(train)
    stacks = torch.stack([train.read(i)[1] for i in range(len(train))])
    assert np.allclose(mean, stacks.mean(dim=(0, 2, 3)).numpy(), atol=1e-5)
    assert np.allclose(std, stacks.std(dim=(0, 2, 3)).numpy(), atol=1e-5)


# --------------------------------------------------------------------------------------------- bad files


def test_scan_lists_bad_files_or_skips_them(tmp_path):
    root = make_folder(tmp_path / "data", n=6)
    samples = LeafDataset(root, "train").samples
    bad_image, bad_ms = samples[0][0], samples[-1][0].with_suffix(".npy")
    bad_image.write_bytes(b"not a png")
    bad_ms.write_bytes(b"not a npy")
    ds = LeafDataset(root, "train", with_ms=True)
    with pytest.raises(UserError, match="2 of 12") as info:
        scan_dataset(ds)
    assert str(bad_image) in str(info.value) and str(bad_ms) in str(info.value)
    assert "on_bad_file=skip" in str(info.value)
    with pytest.warns(UserWarning, match="skipped 2"):
        bad = scan_dataset(ds, on_bad_file="skip")
    assert {p for p, _ in bad} == {bad_image, bad_ms} and len(ds) == 10
    with pytest.warns(UserWarning, match="skipped 2"):
        assert len(open_split(data_config(root, on_bad_file="skip"), "train", with_ms=True)) == 10


def test_corrupt_image_error_names_the_file(tiny_demo, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_demo / "val", root / "val")
    bad = next((root / "val" / "healthy").glob("*.png"))
    bad.write_bytes(b"not a png")
    ds = LeafDataset(root, "val")
    index = [p for p, _ in ds.samples].index(bad)
    with pytest.raises(UserError, match=str(bad)):
        ds[index]


# --------------------------------------------------------------------------------------- transforms, loaders


def test_paired_transform_keeps_rgb_and_ms_pixel_aligned():
    torch.manual_seed(0)
    pattern = torch.zeros(1, 32, 32)
    pattern[:, 5:9, 20:27] = 1.0  # an asymmetric block, so any flip or crop offset shows
    rgb, ms = pattern.repeat(3, 1, 1), pattern.repeat(4, 1, 1)
    transform = PairedTransform(24, train=True, hflip=0.5, vflip=0.5, scale_min=0.3)
    for _ in range(20):
        out = transform(rgb, ms)
        assert torch.equal(out["rgb"][0], out["ms"][0])


def test_loader_options_come_from_the_config_and_a_dataset_can_be_reused(tmp_path):
    root = make_folder(tmp_path / "data", n=10)
    cfg = data_config(root)
    loader = build_loader(cfg, RAW_MS, "train", 4, train=True)
    batch = next(iter(loader))
    assert batch["rgb"].shape == (4, 3, 8, 8) and batch["ms"].shape == (4, BANDS, 8, 8)
    assert loader.prefetch_factor is None and not loader.persistent_workers

    cfg = data_config(root, prefetch_factor=3, persistent_workers=False, pin_memory=False, num_workers=1)
    train = open_split(cfg, "train", with_ms=True)
    loader = build_loader(cfg, RAW_MS, "train", 4, train=True, dataset=train)
    assert (loader.num_workers, loader.prefetch_factor, loader.persistent_workers) == (1, 3, False)
    assert loader.dataset is not train and train.transform.image_size is None  # the caller's dataset is untouched


# ------------------------------------------------------------------------------------------------- demo set


def test_demo_dataset_layout_and_ms_signal(tiny_demo):
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        assert sorted(p.name for p in (tiny_demo / split).iterdir()) == sorted(DEMO_CLASSES)
        pngs = sorted((tiny_demo / split).rglob("*.png"))
        assert len(pngs) == n * len(DEMO_CLASSES)
        assert all(p.with_suffix(".npy").is_file() for p in pngs)
    stack = np.load(next((tiny_demo / "val" / "leaf_rust").glob("*.npy")))
    assert stack.shape == (32, 32, 5)


def test_demo_unlabelled_pool_is_deterministic_and_its_names_say_nothing_of_the_class(tmp_path):
    a = make_demo_dataset(tmp_path / "a", per_class=(2, 1, 1), size=16, unlabeled_per_class=3)
    b = make_demo_dataset(tmp_path / "b", per_class=(2, 1, 1), size=16, unlabeled_per_class=3)
    pool = sorted((a / "unlabeled").iterdir())
    assert [p.name for p in pool] == sorted(f"{n:05d}{ext}" for n in range(15) for ext in (".npy", ".png"))
    assert all((b / "unlabeled" / p.name).read_bytes() == p.read_bytes() for p in pool)
    assert np.load(pool[0]).shape == (16, 16, 5) and Image.open(pool[1]).size == (16, 16)
    assert len(list(a.rglob("*.png"))) == (2 + 1 + 1 + 3) * len(DEMO_CLASSES)  # the pool comes on top of the splits
    assert json.loads((a / "bands.json").read_text())["version"] == DEMO_VERSION


def test_a_demo_folder_of_another_version_is_refused(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", per_class=(1, 1, 1), size=16, unlabeled_per_class=0)
    prepare_data(DataConfig(root=str(root), demo=True))  # the current version: accepted as it is
    (root / "bands.json").write_text(json.dumps({"bands": ["blue"], "seed": 0}))  # written before versions
    with pytest.raises(UserError, match=r"version 1 of the demo set.*make clean-demo"):
        prepare_data(DataConfig(root=str(root), demo=True))


def test_demo_disease_lowers_vegetation_index():
    # NDVI = (NIR - red) / (NIR + red) is lighting-invariant; stressed tissue reflects less NIR and more red
    rng = np.random.default_rng(0)

    def mean_ndvi(cls):
        values = []
        for _ in range(60):
            ms = _render(rng, cls, 32)[1].astype(np.float32)
            values.append(((ms[..., 4] - ms[..., 2]) / (ms[..., 4] + ms[..., 2] + 1e-6)).mean())
        return np.mean(values)

    healthy = mean_ndvi("healthy")
    diseased = [mean_ndvi(cls) for cls in DEMO_CLASSES[1:]]
    assert all(d < healthy for d in diseased) and np.mean(diseased) < healthy - 0.02
