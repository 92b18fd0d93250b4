"""export.py --formats timm and --push-to-hub: the folder timm.create_model("local-dir:...") loads gives the
checkpoint's logits, classes, input size and normalization; it states no licence or tag it does not know, records the
teachers and recipe, and holds a model card; --push-to-hub uploads exactly that folder; the hybrid teacher and bad
repository ids are refused. The reference model is rebuilt here from the checkpoint's weights with timm alone;
normalization is computed by hand."""

import json
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import export
import kd
from kd.data.dataset import InputSpec
from kd.deploy import formats as export_formats
from kd.deploy import timm_folder
from kd.deploy.timm_folder import push_timm
from kd.errors import UserError
from kd.models.checkpoint import CheckpointMeta, save_checkpoint
from kd.models.zoo import build_model

CLASSES = ["healthy", "leaf_rust", "powdery_mildew"]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # not ImageNet's or timm's defaults: they must come from the checkpoint
SIZE = 40  # not the architecture's default either
TEACHER = "runs/teacher/best.safetensors"
QUICK = ["--latency-runs", "1", "--max-batches", "1"]


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=len(CLASSES))
    with torch.no_grad():
        model.get_classifier().weight.mul_(20)  # clear logit gaps: a real comparison
    arch = {"name": "test_efficientnet", "num_classes": len(CLASSES)}
    run = tmp_path_factory.mktemp("student")
    recipe = {"name": "leaf", "seed": 0, "data": {"root": "data/leaves", "demo": False}, "model": {"name": "x"}}
    recipe["distillation"] = {"teacher_checkpoint": TEACHER, "temperature": 4.0, "alpha": 0.3, "max_epochs": 12}
    (run / "config.yaml").write_text(yaml.safe_dump(recipe))  # the run's config, as distill.py saves it
    meta = CheckpointMeta(arch, CLASSES, spec(), teachers=[TEACHER], epoch=7, metrics={"val_acc": 0.9})
    return save_checkpoint(run / "best", model, meta)


def spec() -> InputSpec:
    return InputSpec(SIZE, MEAN, STD)


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory) -> tuple[Path, dict, list]:
    """export.py --formats timm --push-to-hub --results, with an offline stand-in for the Hub client that records
    its calls."""
    pushed = []

    class HfApi:
        def create_repo(self, repo_id, **kwargs):
            pushed.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            folder = Path(kwargs["folder_path"])
            pushed.append(("upload_folder", kwargs, sorted(p.name for p in folder.iterdir())))
            return types.SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/1")

    def no_timm_push(*args, **kwargs):
        raise AssertionError("timm's push_to_hf_hub writes its own model card (apache-2.0): not used")

    out = tmp_path_factory.mktemp("exp") / "s.onnx"
    results = evaluate_results(tmp_path_factory.mktemp("results"), student)
    args = ["--checkpoint", str(student), "--out", str(out), "--formats", "timm", "--push-to-hub", "someone/leaf-b0"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(timm_folder, "HfApi", HfApi)
        patch.setattr(timm.models, "push_to_hf_hub", no_timm_push)
        report = export.main([*args, "--results", str(results), *QUICK])
    return out.with_name("s_timm"), report, pushed


def evaluate_results(folder: Path, student: Path) -> Path:
    """results.json and results.md laid out as evaluate.py writes them: the student, another model and a teacher."""
    models = {
        "teacher": {"path": str(student.with_name("teacher.safetensors"))},
        "distilled": {"path": str(student)},
        "baseline": {"path": str(student.with_name("other.safetensors"))},
    }
    summary = {name: {"runs": [name]} for name in models}
    results = {"models": models, "summary": summary, "settings": {"teacher": "teacher"}, "derived": []}
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "results.md").write_text(
        "val split of data/leaves (30 images)\n\n| Model | Top-1 Acc. |\n|---|---|\n"
        "| teacher (hybrid, RGB+MS) | 91.0% |\n| distilled (test_efficientnet, RGB) | 88.0% |\n"
        "| baseline (test_efficientnet, RGB) | 80.0% |\n\nLatency: batch 1.\n\n"
        "Recall per class\n\n| Model | healthy |\n|---|---|\n| teacher | 90.0% |\n| distilled | 87.0% |\n"
        "| baseline | 70.0% |\n\n- 8.0 points over the baseline student\n"
    )
    return folder


def reference(student: Path) -> torch.nn.Module:
    model = timm.create_model("test_efficientnet", num_classes=len(CLASSES))
    model.load_state_dict(load_file(str(student.with_suffix(".safetensors"))))
    return model.eval()


def test_timm_loads_the_student_with_its_logits(exported, student):
    folder, report, _ = exported
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
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


def test_push_to_hub_uploads_exactly_the_checked_folder(exported):
    folder, report, pushed = exported
    assert report["formats"]["timm"]["status"] == "ok"  # the folder was written and checked first
    assert report["hub"] == "https://huggingface.co/someone/leaf-b0/commit/1"
    (create, repo_id, _), (upload, kwargs, files) = pushed
    assert (create, repo_id) == ("create_repo", "someone/leaf-b0") and upload == "upload_folder"
    assert kwargs["repo_id"] == "someone/leaf-b0" and Path(kwargs["folder_path"]) == folder
    assert files == ["README.md", "config.json", "model.safetensors"]  # its own card, no card timm would write


def test_config_states_nothing_inherited_and_how_it_was_made(exported):
    folder, _, _ = exported
    config = json.loads((folder / "config.json").read_text())
    inherited = {"tag", "license", "paper_ids", "paper_name", "notes", "origin_url", "hf_hub_id", "url"}
    assert not inherited & config["pretrained_cfg"].keys() and "license" not in config
    assert config["label_names"] == CLASSES and config["pretrained_cfg"]["input_size"] == [3, SIZE, SIZE]
    made = config["kd"]
    assert made["distilled"] is True and made["teachers"] == [TEACHER] and made["epoch"] == 7
    assert made["recipe"]["distillation"]["temperature"] == 4.0 and "model" not in made["recipe"]
    assert made["data"]["root"] == "data/leaves" and made["version"] == kd.__version__


def test_the_model_card(exported):
    folder, _, _ = exported
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n") and "license:" not in card.split("---")[1]
    for section in ("# someone/leaf-b0", "## Model", "## Training", "## Results", "## Data", "## Limitations"):
        assert f"\n{section}\n" in card, section
    assert "`healthy`, `leaf_rust`, `powdery_mildew`" in card and f"{SIZE}×{SIZE}" in card and str(MEAN) in card
    assert "Distilled from the teacher checkpoint(s)" in card and TEACHER in card
    assert "temperature=4.0, alpha=0.3, max_epochs=12" in card and "Initialization: random weights" in card
    assert "| distilled (test_efficientnet, RGB) | 88.0% |" in card and "| teacher (hybrid, RGB+MS) | 91.0% |" in card
    assert "| distilled | 87.0% |" in card and "baseline" not in card  # this model's rows and the teacher's only
    assert "Not evaluated" not in card and "`data/leaves`" in card and "Licence: not stated" in card
    assert 'timm.create_model("hf-hub:someone/leaf-b0", pretrained=True)' in card
    assert str(folder.parent.parent) not in card  # no local paths of this machine beyond what the recipe names


def test_license_when_given_and_an_unevaluated_label_trained_model(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=len(CLASSES))
    arch = {"name": "test_efficientnet", "num_classes": len(CLASSES)}
    ckpt = save_checkpoint(tmp_path / "run" / "best", model, CheckpointMeta(arch, CLASSES, spec()))
    out = tmp_path / "exp" / "s.onnx"
    export.main(["--checkpoint", str(ckpt), "--out", str(out), "--formats", "timm", "--license", "cc-by-4.0", *QUICK])
    folder = out.with_name("s_timm")
    config = json.loads((folder / "config.json").read_text())
    assert config["pretrained_cfg"]["license"] == "cc-by-4.0"
    assert config["kd"]["distilled"] is False and config["kd"]["teachers"] == [] and config["kd"]["recipe"] is None
    card = (folder / "README.md").read_text()
    assert "\nlicense: cc-by-4.0\n" in card and "Licence: `cc-by-4.0`" in card
    assert "Trained on the labels alone" in card and "Not evaluated" in card and "knowledge-distillation" not in card
    assert timm.create_model(f"local-dir:{folder}", pretrained=True).pretrained_cfg["license"] == "cc-by-4.0"


def test_results_without_this_model_are_refused_before_exporting(student, tmp_path, capsys):
    (tmp_path / "r").mkdir()
    results = evaluate_results(tmp_path / "r", student.with_name("elsewhere.safetensors"))  # another model's
    out = tmp_path / "exp" / "s.onnx"
    with pytest.raises(SystemExit):
        export.main(["--checkpoint", str(student), "--out", str(out), "--formats", "timm", "--results", str(results)])
    assert f"holds no evaluation of {student}" in capsys.readouterr().err
    assert not out.parent.exists() or not any(out.parent.iterdir())
    with pytest.raises(SystemExit):
        export.main(["--checkpoint", str(student), "--out", str(out), "--license", "mit", *QUICK])
    assert "--license describe the timm folder" in capsys.readouterr().err


def test_push_to_hub_mistakes_are_one_clear_message(student, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s.onnx"
    with pytest.raises(SystemExit):
        export.main(["--checkpoint", str(student), "--out", str(out), "--push-to-hub", "not a/valid//id", *QUICK])
    assert "--push-to-hub 'not a/valid//id' is not a Hub repository id" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before exporting anything

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(timm_folder, "HfApi", offline)
    with pytest.raises(UserError, match=r"could not push .* 'someone/leaf-b0' \(ConnectionError: no network\)"):
        push_timm(tmp_path, "someone/leaf-b0")
