import json

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from kd.data import DEMO_CLASSES, LeafDataset, PairedTransform, _render, ms_statistics
from kd.errors import UserError
from kd.models import HybridFusion, build_model, load_checkpoint, read_meta, save_checkpoint


@pytest.mark.parametrize("fusion", ["concat", "add", "attention"])
def test_hybrid_fusion_modes_give_logits_and_use_both_modalities(fusion):
    torch.manual_seed(0)
    model = HybridFusion(
        4, backbone="test_efficientnet", ms_backbone="test_resnet", ms_channels=5, fusion=fusion
    ).eval()
    rgb, ms = torch.randn(2, 3, 32, 32), torch.randn(2, 5, 32, 32)
    out = model(rgb, ms)
    assert out.shape == (2, 4)
    assert not torch.allclose(out, model(rgb, ms * 3 + 1))  # the MS branch matters


def test_checkpoint_round_trip_is_exact_and_pickle_free(tmp_path):
    spec = {"name": "hybrid", "num_classes": 3, "backbone": "test_efficientnet", "ms_channels": 2}
    model = build_model(spec).eval()
    meta = {"arch": spec, "classes": ["a", "b", "c"], "inputs": ["rgb", "ms"], "image_size": 32}
    save_checkpoint(tmp_path / "best.safetensors", model, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "best.safetensors"]
    assert json.loads((tmp_path / "best.json").read_text())["classes"] == ["a", "b", "c"]
    loaded, loaded_meta = load_checkpoint(tmp_path / "best.ckpt")  # a guide-style .ckpt path names the same stem
    rgb, ms = torch.randn(1, 3, 32, 32), torch.randn(1, 2, 32, 32)
    assert torch.equal(loaded.eval()(rgb, ms), model(rgb, ms))
    assert loaded_meta == meta


def test_missing_or_damaged_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="not found.*train_teacher.py"):
        read_meta(tmp_path / "nope.ckpt")
    save_checkpoint(
        tmp_path / "m",
        timm.create_model("test_resnet", num_classes=2),
        {"arch": {"name": "test_resnet", "num_classes": 2}},
    )
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="damaged"):
        load_checkpoint(tmp_path / "m")


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(3)
    source = timm.create_model("test_efficientnet", num_classes=10)
    safetensors.torch.save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    model = build_model({"name": "test_efficientnet", "num_classes": 10}, pretrained=str(tmp_path / "w.safetensors"))
    assert torch.equal(model.conv_stem.weight, source.conv_stem.weight)
    with pytest.raises(UserError, match="does not exist"):
        build_model({"name": "test_efficientnet", "num_classes": 10}, pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="not a timm model"):
        build_model({"name": "efficientnet_b99", "num_classes": 10})


def test_demo_dataset_layout_and_ms_signal(tiny_demo):
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        assert sorted(p.name for p in (tiny_demo / split).iterdir()) == sorted(DEMO_CLASSES)
        pngs = sorted((tiny_demo / split).rglob("*.png"))
        assert len(pngs) == n * len(DEMO_CLASSES)
        assert all(p.with_suffix(".npy").is_file() for p in pngs)
    stack = np.load(next((tiny_demo / "val" / "leaf_rust").glob("*.npy")))
    assert stack.shape == (32, 32, 5)


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


def test_paired_transform_keeps_rgb_and_ms_pixel_aligned():
    torch.manual_seed(0)
    pattern = torch.zeros(1, 32, 32)
    pattern[:, 5:9, 20:27] = 1.0  # an asymmetric block, so any flip or crop offset shows
    rgb, ms = pattern.repeat(3, 1, 1), pattern.repeat(4, 1, 1)
    transform = PairedTransform(24, train=True, hflip=0.5, vflip=0.5, scale_min=0.3)
    for _ in range(20):
        out = transform(rgb, ms)
        assert torch.equal(out["rgb"][0], out["ms"][0])


def test_corrupt_image_error_names_the_file(tiny_demo, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_demo / "val", root / "val")
    bad = next((root / "val" / "healthy").glob("*.png"))
    bad.write_bytes(b"not a png")
    ds = LeafDataset(root, "val")
    index = [p for p, _ in ds.samples].index(bad)
    with pytest.raises(UserError, match=str(bad)):
        ds[index]


def test_class_mismatch_and_statistics_from_train_split(tiny_demo):
    with pytest.raises(UserError, match="trained on"):
        LeafDataset(tiny_demo, "val", classes=["a", "b"])
    train = LeafDataset(tiny_demo, "train", with_ms=True)
    mean, std = ms_statistics(train)
    stacks = torch.stack([train.read(i)[1] for i in range(len(train))])
    assert np.allclose(mean, stacks.mean(dim=(0, 2, 3)).numpy(), atol=1e-5)
    assert np.allclose(std, stacks.std(dim=(0, 2, 3)).numpy(), atol=1e-5)
