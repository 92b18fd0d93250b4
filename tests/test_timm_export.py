"""export.py --formats timm and --push-to-hub: the folder timm.create_model("local-dir:...") loads gives the
checkpoint's logits, classes, input size and normalization; the hybrid teacher and bad repository ids are refused.
The reference model is rebuilt here from the checkpoint's weights with timm alone; normalization is computed by
hand."""

import json
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image
from safetensors.torch import load_file

import export
from kd.data.dataset import InputSpec
from kd.deploy import formats as export_formats
from kd.deploy.timm_folder import push_timm
from kd.errors import UserError
from kd.models.checkpoint import CheckpointMeta, save_checkpoint
from kd.models.zoo import build_model

CLASSES = ["healthy", "leaf_rust", "powdery_mildew"]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # not ImageNet's or timm's defaults: they must come from the checkpoint
SIZE = 40  # not the architecture's default either
QUICK = ["--latency-runs", "1", "--max-batches", "1"]


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=len(CLASSES))
    with torch.no_grad():
        model.get_classifier().weight.mul_(20)  # clear logit gaps: a real comparison
    arch = {"name": "test_efficientnet", "num_classes": len(CLASSES)}
    return save_checkpoint(tmp_path_factory.mktemp("student") / "best", model, CheckpointMeta(arch, CLASSES, spec()))


def spec() -> InputSpec:
    return InputSpec(SIZE, MEAN, STD)


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory) -> tuple[Path, dict, list]:
    """export.py --formats timm --push-to-hub, with an offline stand-in for timm's upload that records its call."""
    pushed = []

    def push_to_hf_hub(model, repo_id, **settings):
        pushed.append((model, repo_id, settings))
        return types.SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/1")

    out = tmp_path_factory.mktemp("exp") / "s.onnx"
    args = ["--checkpoint", str(student), "--out", str(out), "--formats", "timm", "--push-to-hub", "someone/leaf-b0"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(timm.models, "push_to_hf_hub", push_to_hf_hub)
        report = export.main([*args, *QUICK])
    return out.with_name("s_timm"), report, pushed


def reference(student: Path) -> torch.nn.Module:
    model = timm.create_model("test_efficientnet", num_classes=len(CLASSES))
    model.load_state_dict(load_file(str(student.with_suffix(".safetensors"))))
    return model.eval()


def test_timm_loads_the_student_with_its_logits(exported, student):
    folder, report, _ = exported
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = reference(student)(x), loaded(x)
    assert expected.abs().max() > 0.1  # logits far above the tolerance
    assert torch.allclose(got, expected, atol=1e-5)
    row = report["formats"]["timm"]  # export.py ran the folder through timm too, against PyTorch
    assert row["status"] == "ok" and row["max_abs_diff"] < 1e-5 and row["top1_agreement"] == 1.0
    on_disk = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
    assert row["size_mb"] == pytest.approx(on_disk) and Path(row["file"]) == folder


def test_timm_knows_the_classes_input_size_and_normalization(exported):
    folder, _, _ = exported
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    cfg = loaded.pretrained_cfg
    assert loaded.num_classes == len(CLASSES) and cfg["num_classes"] == len(CLASSES)
    assert list(cfg["label_names"]) == CLASSES
    assert tuple(cfg["input_size"]) == (3, SIZE, SIZE)
    assert np.allclose(cfg["mean"], MEAN) and np.allclose(cfg["std"], STD)
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "test_efficientnet" and config["label_names"] == CLASSES
    # timm's own eval preprocessing from that config is kd's: the image at the input size, normalized by hand here
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=loaded))
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), np.uint8)
    by_hand = (pixels / 255 - np.array(MEAN)) / np.array(STD)
    assert np.allclose(transform(Image.fromarray(pixels)).numpy(), by_hand.transpose(2, 0, 1), atol=1e-5)


def test_the_hybrid_teacher_is_refused(tmp_path, capsys):
    arch = {"name": "hybrid", "num_classes": 3, "backbone": "test_efficientnet", "ms_backbone": "test_resnet"}
    arch |= {"ms_channels": 5, "fusion": "concat"}
    meta = CheckpointMeta(arch, CLASSES, InputSpec(SIZE, MEAN, STD, [0.0] * 5, [1.0] * 5))
    teacher = save_checkpoint(tmp_path / "teacher" / "best", build_model(arch), meta)
    out = tmp_path / "exp" / "t.onnx"
    for flags in (["--formats", "timm"], ["--push-to-hub", "someone/leaf-teacher"]):
        with pytest.raises(SystemExit):
            export.main(["--checkpoint", str(teacher), "--out", str(out), *flags, *QUICK])
        err = capsys.readouterr().err
        assert "is a hybrid model with inputs ['rgb', 'ms']" in err and "timm cannot rebuild" in err, flags
    assert not list(out.parent.glob("*"))  # nothing written


def test_only_a_model_timm_built_is_written_its_way(tmp_path):
    src = export_formats.ExportInputs(torch.nn.Linear(3, 3), CheckpointMeta(None, CLASSES, spec()), [], tmp_path, {})
    with pytest.raises(UserError, match="the timm format .* holds timm models, and 'Linear' is not one"):
        export_formats.write_timm(src, tmp_path / "x_timm")


def test_push_to_hub_uploads_what_was_checked(exported, student):
    _, report, pushed = exported
    assert report["formats"]["timm"]["status"] == "ok"  # the folder was written and checked first
    assert report["hub"] == "https://huggingface.co/someone/leaf-b0/commit/1"
    ((model, repo_id, settings),) = pushed
    assert repo_id == "someone/leaf-b0" and settings["safe_serialization"] is True
    assert settings["model_config"]["label_names"] == CLASSES
    assert settings["data_config"]["input_size"] == (3, SIZE, SIZE) and list(settings["data_config"]["mean"]) == MEAN
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference(student)(x))


def test_push_to_hub_mistakes_are_one_clear_message(student, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s.onnx"
    with pytest.raises(SystemExit):
        export.main(["--checkpoint", str(student), "--out", str(out), "--push-to-hub", "not a/valid//id", *QUICK])
    assert "--push-to-hub 'not a/valid//id' is not a Hub repository id" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before exporting anything

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(timm.models, "push_to_hf_hub", offline)
    model = timm.create_model("test_efficientnet", num_classes=len(CLASSES))
    with pytest.raises(UserError, match=r"could not push .* 'someone/leaf-b0' \(ConnectionError: no network\)"):
        push_timm(model, CheckpointMeta(None, CLASSES, spec()), "someone/leaf-b0")
