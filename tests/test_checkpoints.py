"""Checkpoint metadata (<stem>.json): what kd writes loads; a damaged or hand-edited file is one message listing
everything wrong with it, and the scripts turn it into `error: ...` and exit status 2."""

import inspect
import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from conftest import ROOT, reset_accelerate
from test_data import data_config, make_folder

import distill
from kd.data.dataset import InputSpec
from kd.deploy.inference import checkpoint_loader
from kd.errors import UserError
from kd.models.checkpoint import SCHEMA_VERSION, CheckpointMeta, load_checkpoint, read_meta, save_checkpoint
from kd.models.hybrid import HYBRID_ARGS, HybridFusion
from kd.models.zoo import build_model

CLASSES = ["a", "b", "c", "d", "e"]
PLAIN = {"name": "test_efficientnet", "num_classes": 5, "drop_rate": 0.2}
HYBRID = {"name": "hybrid", "num_classes": 5, "backbone": "test_efficientnet", "ms_backbone": "test_resnet"}
HYBRID |= {"ms_channels": 4, "fusion": "concat", "drop_rate": 0.2}
RGB = {"image_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# the dicts train_teacher.py and distill.py write, with the keys kd/train/loop.py adds to each checkpoint
LOOP = {"epoch": 3, "metrics": {"val_acc": 0.9, "val_loss": 0.3}, "ema": False, "qat": False}
TEACHER = {"arch": PLAIN, "classes": CLASSES, "inputs": ["rgb"], **RGB, "ms_mean": None, "ms_std": None}
TEACHER |= {"ms_bands": [], **LOOP}
MS_TEACHER = {**TEACHER, "arch": HYBRID, "inputs": ["rgb", "ms"], "ms_mean": [0.1, 0.2, 0.3, 0.4]}
MS_TEACHER |= {"ms_std": [1.0, 1.1, 1.2, 1.3], "ms_bands": [0, 1, 3, 4]}
STUDENT = {"arch": {"name": "test_efficientnet", "num_classes": 5}, "classes": CLASSES, "inputs": ["rgb"], **RGB}
STUDENT |= {"ms_mean": None, "ms_std": None, "teachers": ["runs/teacher/best.ckpt"], **LOOP}


def write(stem: Path, meta, arch: dict | None = None) -> Path:
    """A checkpoint whose weights fit `arch` (default: the meta's own) and whose .json holds `meta` as given."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(build_model(arch or meta["arch"]).state_dict(), stem.with_suffix(".safetensors"))
    stem.with_suffix(".json").write_text(json.dumps(meta))
    return stem


@pytest.mark.parametrize("meta", [TEACHER, MS_TEACHER, STUDENT], ids=["teacher", "ms teacher", "student"])
def test_the_metadata_kd_writes_loads(tmp_path, meta):
    model, loaded = load_checkpoint(write(tmp_path / "best", meta))
    assert meta.items() <= loaded.to_json().items() and read_meta(tmp_path / "best.safetensors") == loaded
    reference = build_model(meta["arch"])
    assert type(model) is type(reference) and model.state_dict().keys() == reference.state_dict().keys()


# best.json of a hybrid teacher (whitespace folded) and of a student (verbatim), as kd wrote them before schema_version
TEACHER_JSON_V0 = """{
  "arch": {"name": "hybrid", "num_classes": 5, "drop_rate": 0.2, "backbone": "efficientnet_b0",
           "ms_backbone": "resnet10t", "ms_channels": 5, "fusion": "concat"},
  "classes": ["early_blight", "healthy", "leaf_rust", "nitrogen_stress", "powdery_mildew"],
  "inputs": ["rgb", "ms"],
  "image_size": 64,
  "mean": [0.485, 0.456, 0.406],
  "std": [0.229, 0.224, 0.225],
  "ms_mean": [0.09805661788595899, 0.14968257949658437, 0.16974677987855102, 0.2702232453448232, 0.34858663332124706],
  "ms_std": [0.04506762105065497, 0.041850712671091625, 0.07924576443836842, 0.06808075919907304, 0.11254599179522232],
  "ms_bands": [],
  "epoch": 6,
  "metrics": {"val_acc": 0.9833333333333333, "val_loss": 0.11957282304763794},
  "ema": false,
  "qat": false
}"""
STUDENT_JSON_V0 = """{
  "arch": {
    "name": "efficientnet_b0",
    "num_classes": 5
  },
  "classes": [
    "early_blight",
    "healthy",
    "leaf_rust",
    "nitrogen_stress",
    "powdery_mildew"
  ],
  "inputs": [
    "rgb"
  ],
  "image_size": 64,
  "mean": [
    0.485,
    0.456,
    0.406
  ],
  "std": [
    0.229,
    0.224,
    0.225
  ],
  "ms_mean": null,
  "ms_std": null,
  "teachers": [
    "checkpoints/teacher/best.ckpt"
  ],
  "epoch": 5,
  "metrics": {
    "val_acc": 0.3566666666666667,
    "val_loss": 1.923689219156901
  },
  "ema": false,
  "qat": false
}"""


def test_metadata_written_before_schema_version_still_loads(tmp_path):
    for name, text in (("teacher", TEACHER_JSON_V0), ("student", STUDENT_JSON_V0)):
        (tmp_path / f"{name}.json").write_text(text)
        (tmp_path / f"{name}.safetensors").write_bytes(b"")  # read_meta reads the .json alone
    teacher, student = read_meta(tmp_path / "teacher"), read_meta(tmp_path / "student.ckpt")
    assert teacher.inputs == ["rgb", "ms"] and teacher.arch["ms_backbone"] == "resnet10t" and teacher.epoch == 6
    assert teacher.input_spec.ms_std[4] == 0.11254599179522232 and teacher.input_spec.ms_bands == []
    imagenet = InputSpec(64, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert student.inputs == ["rgb"] and student.input_spec == imagenet
    assert student.teachers == ["checkpoints/teacher/best.ckpt"] and student.metrics["val_acc"] == 0.3566666666666667
    for meta, text in ((teacher, TEACHER_JSON_V0), (student, STUDENT_JSON_V0)):  # written again: the same, versioned
        assert {**json.loads(text), "schema_version": SCHEMA_VERSION}.items() <= meta.to_json().items()
    old = without(json.loads(TEACHER_JSON_V0), "ms_bands")  # teachers from before data.ms_bands read every band
    assert CheckpointMeta.from_json(old, "old.json").input_spec.ms_bands == []


def test_metadata_round_trips_and_a_newer_schema_is_refused(tmp_path):
    meta = CheckpointMeta.from_json(MS_TEACHER, "teacher.json")
    assert meta.to_json()["schema_version"] == SCHEMA_VERSION
    assert CheckpointMeta.from_json(meta.to_json(), "again.json") == meta
    with pytest.raises(UserError, match="schema_version must be a version this kd reads .*update kd"):
        CheckpointMeta.from_json({**MS_TEACHER, "schema_version": SCHEMA_VERSION + 1}, "new.json")


def test_checkpoint_round_trip_is_exact_and_pickle_free(tmp_path):
    spec = {"name": "hybrid", "num_classes": 3, "backbone": "test_efficientnet", "ms_channels": 2}
    model = build_model(spec).eval()
    meta = CheckpointMeta(spec, ["a", "b", "c"], InputSpec(32, [0.5] * 3, [0.25] * 3, [0.1, 0.2], [1.0, 2.0]))
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
    meta = CheckpointMeta({"name": "test_resnet", "num_classes": 2}, ["a", "b"], InputSpec(32, [0.5] * 3, [0.25] * 3))
    save_checkpoint(tmp_path / "m", timm.create_model("test_resnet", num_classes=2), meta)
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="damaged"):
        load_checkpoint(tmp_path / "m")


def test_checkpoint_loader_uses_the_checkpoint_bands(tmp_path):
    root = make_folder(tmp_path / "data", n=5)
    meta = CheckpointMeta(None, ["c", "b", "a"], InputSpec(8, ms_mean=[0.0], ms_std=[1.0], ms_bands=[1]))
    loader = checkpoint_loader(data_config(root), meta, "val", batch_size=2)
    batch = next(iter(loader))
    assert batch["ms"].shape[1] == 1 and loader.dataset.classes == ["c", "b", "a"]


def without(meta: dict, *keys: str) -> dict:
    return {k: v for k, v in meta.items() if k not in keys}


# (what is wrong, the .json, the weights' architecture, each problem the one message must list)
BAD_META = [
    ("no image_size", without(TEACHER, "image_size"), PLAIN, ["it lacks image_size"]),
    ("MS teacher without MS statistics", without(MS_TEACHER, "ms_mean", "ms_std"), HYBRID, ["lacks ms_mean, ms_std"]),
    (
        "unknown timm argument",
        {**TEACHER, "arch": {**PLAIN, "wings": 2}},
        PLAIN,
        ["arch: timm model test_efficientnet takes no argument 'wings': remove it"],
    ),
    (
        "unknown hybrid argument",
        {**MS_TEACHER, "arch": {**HYBRID, "wings": 2}},
        HYBRID,
        ["arch has arguments HybridFusion does not take: ['wings'] (it takes ['backbone', 'ms_backbone',"],
    ),
    ("classes not strings", {**TEACHER, "classes": [1, 2, 3, 4, 5]}, PLAIN, ["classes must be a list of distinct"]),
    ("image_size not positive", {**TEACHER, "image_size": -32}, PLAIN, ["image_size must be a positive integer"]),
    ("mean of 2 numbers", {**TEACHER, "mean": [0.5, 0.5]}, PLAIN, ["mean must be 3 numbers (R, G, B), got [0.5, 0.5]"]),
    ("std of strings", {**TEACHER, "std": ["a", "b", "c"]}, PLAIN, ["std must be 3 positive numbers"]),
    ("unknown input", {**TEACHER, "inputs": ["rgb", "depth"]}, PLAIN, ['inputs must be ["rgb"], or ["rgb", "ms"]']),
    ("arch a string", {**TEACHER, "arch": "test_efficientnet"}, PLAIN, ['arch must be an object with a string "name"']),
    (
        "num_classes not the class count",
        {**TEACHER, "arch": {**PLAIN, "num_classes": 4}},
        {**PLAIN, "num_classes": 4},
        ["arch.num_classes is 4, but classes has 5 names"],
    ),
    ("a JSON list", [TEACHER], PLAIN, ["it holds a JSON list, not an object"]),
    (
        "everything at once",
        {**without(TEACHER, "image_size"), "classes": "abcde", "mean": [0, 0, 0, 0], "arch": {**PLAIN, "wings": 2}},
        PLAIN,
        [
            "it lacks image_size",
            "classes must be a list of distinct class names (strings), got 'abcde'",
            "mean must be 3 numbers",
            "takes no argument 'wings'",
        ],
    ),
]


@pytest.mark.parametrize("meta, arch, problems", [c[1:] for c in BAD_META], ids=[c[0] for c in BAD_META])
def test_a_bad_sidecar_is_one_message_listing_every_problem(tmp_path, meta, arch, problems):
    stem = write(tmp_path / "teacher", meta, arch)
    with pytest.raises(UserError) as error:
        load_checkpoint(stem)
    message = str(error.value)
    assert message.startswith(f"{stem}.json is not a kd checkpoint's metadata as kd writes it:\n")
    assert message.count("\n  - ") == len(problems), message  # one line per problem, no more
    assert all(problem in message for problem in problems), message
    if "wings" not in json.dumps(meta):  # read_meta (distilling from a cache) does not build the model
        with pytest.raises(UserError, match=r"\.json is not a kd checkpoint's metadata"):
            read_meta(stem)


def test_a_sidecar_that_is_not_text_is_a_clear_error(tmp_path):
    stem = write(tmp_path / "teacher", TEACHER)
    weights = stem.with_suffix(".safetensors").read_bytes()
    stem.with_suffix(".json").write_bytes(b"\xff" + weights)  # not even UTF-8 text
    with pytest.raises(UserError, match="is not valid JSON .*utf-8.* the file is damaged"):
        load_checkpoint(stem)


def test_distill_exits_2_naming_the_teacher_file_and_the_argument(tmp_path, tiny_demo, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stem = write(tmp_path / "teacher", {**TEACHER, "arch": {**PLAIN, "wings": 2}}, PLAIN)
    reset_accelerate()
    with pytest.raises(SystemExit) as exit_info:
        distill.main(
            [
                "--config",
                str(ROOT / "configs/b0.yaml"),
                f"data.root={tiny_demo}",
                "data.demo=false",
                f"distillation.teacher_checkpoint={stem}.ckpt",
                "distillation.student_backbone=test_efficientnet",
                "distillation.student_pretrained=null",
                f"distillation.checkpoint_dir={tmp_path / 'run'}",
            ]
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.startswith(f"error: {stem}.json is not a kd checkpoint's metadata") and "argument 'wings'" in err


def test_the_sidecar_check_knows_every_hybrid_argument():
    """HYBRID_ARGS is read instead of HybridFusion's signature (tests replace __init__); it must stay complete."""
    assert set(inspect.signature(HybridFusion).parameters) - {"num_classes", "pretrained"} == set(HYBRID_ARGS)
