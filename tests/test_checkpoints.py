"""Checkpoint metadata (<stem>.json): what kd writes loads; a damaged or hand-edited file is one message listing
everything wrong with it, and the scripts turn it into `error: ...` and exit status 2."""

import json
from pathlib import Path

import pytest
from conftest import ROOT, reset_accelerate

import distill
from kd.errors import UserError
from kd.models import build_model, load_checkpoint, read_meta, save_checkpoint

CLASSES = ["a", "b", "c", "d", "e"]
PLAIN = {"name": "test_efficientnet", "num_classes": 5, "drop_rate": 0.2}
HYBRID = {"name": "hybrid", "num_classes": 5, "backbone": "test_efficientnet", "ms_backbone": "test_resnet"}
HYBRID |= {"ms_channels": 4, "fusion": "concat", "drop_rate": 0.2}
RGB = {"image_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# the dicts train_teacher.py and distill.py write, with the keys kd/loop.py adds to each checkpoint
LOOP = {"epoch": 3, "metrics": {"val_acc": 0.9, "val_loss": 0.3}, "ema": False, "qat": False}
TEACHER = {"arch": PLAIN, "classes": CLASSES, "inputs": ["rgb"], **RGB, "ms_mean": None, "ms_std": None}
TEACHER |= {"ms_bands": [], **LOOP}
MS_TEACHER = {**TEACHER, "arch": HYBRID, "inputs": ["rgb", "ms"], "ms_mean": [0.1, 0.2, 0.3, 0.4]}
MS_TEACHER |= {"ms_std": [1.0, 1.1, 1.2, 1.3], "ms_bands": [0, 1, 3, 4]}
STUDENT = {"arch": {"name": "test_efficientnet", "num_classes": 5}, "classes": CLASSES, "inputs": ["rgb"], **RGB}
STUDENT |= {"ms_mean": None, "ms_std": None, "teachers": ["runs/teacher/best.ckpt"], **LOOP}


def write(stem: Path, meta, arch: dict | None = None) -> Path:
    """A checkpoint whose weights fit `arch` (default: the meta's own) and whose .json holds `meta` as given."""
    model = build_model(arch or meta["arch"]).eval()
    save_checkpoint(stem, model, {"arch": arch or meta["arch"]})
    stem.with_suffix(".json").write_text(json.dumps(meta))
    return stem


@pytest.mark.parametrize("meta", [TEACHER, MS_TEACHER, STUDENT], ids=["teacher", "ms teacher", "student"])
def test_the_metadata_kd_writes_loads(tmp_path, meta):
    model, loaded = load_checkpoint(write(tmp_path / "best", meta))
    assert loaded == meta and read_meta(tmp_path / "best.safetensors") == meta
    reference = build_model(meta["arch"])
    assert type(model) is type(reference) and model.state_dict().keys() == reference.state_dict().keys()


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
    import inspect

    from kd.models import HYBRID_ARGS, HybridFusion

    assert set(inspect.signature(HybridFusion).parameters) - {"num_classes", "pretrained"} == set(HYBRID_ARGS)
