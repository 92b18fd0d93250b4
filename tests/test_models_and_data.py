import json

import pytest
import safetensors.torch
import timm
import torch

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
