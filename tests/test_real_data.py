"""`make real-all`'s configs on a few real iBeans photos (tests/data/ibeans_few, attribution in its README): the same
recipe for every student row, and the whole pipeline (pretrained teacher -> cached distillation -> evaluate) runs
offline end to end. `make real-all` itself (the full set, 3 seeds) is not part of CI."""

import dataclasses
import os

import pytest
import yaml
from test_end_to_end import ROOT, run

from kd.config import load_config

FEW = ROOT / "tests/data/ibeans_few"
REAL = ROOT / "configs/real"
SMALL = ["data.image_size=64", "data.num_workers=0", f"data.root={FEW}"]


def test_the_student_rows_share_one_recipe_and_differ_only_where_they_should():
    baseline, scratch = (load_config(REAL / f"{row}.yaml").train for row in ("baseline", "scratch"))
    distilled = load_config(REAL / "distill.yaml").distillation
    recipe = ("batch_size", "learning_rate", "weight_decay", "max_epochs", "warmup_epochs", "lr_scheduler")
    for key in recipe + ("channels_last", "mixup_alpha", "cutmix_alpha", "label_smoothing"):
        assert getattr(baseline, key) == getattr(scratch, key) == getattr(distilled, key), key
    data = [load_config(REAL / f"{row}.yaml").data for row in ("baseline", "scratch", "distill", "teacher")]
    assert all(d == data[0] for d in data)  # one data section: root, size, augmentation
    for teacher in ("teacher_long", "teacher_lite1"):  # the students' teachers add RandAugment, nothing else
        assert dataclasses.replace(load_config(REAL / f"{teacher}.yaml").data, randaugment="") == data[0]
    raw = {row: yaml.safe_load((REAL / f"{row}.yaml").read_text()) for row in ("baseline", "scratch")}
    assert raw["baseline"]["model"]["name"] == raw["scratch"]["model"]["name"] == distilled.student_backbone
    assert (raw["baseline"]["model"]["pretrained"], raw["scratch"]["model"]["pretrained"]) == ("imagenet", None)
    assert distilled.student_pretrained == "imagenet"


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("kd_cache")
    saved = {k: os.environ.get(k) for k in ("KD_CACHE_DIR", "HF_HUB_OFFLINE")}
    os.environ.update(KD_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1")  # the subprocesses inherit both
    yield
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def test_real_pipeline_runs_offline_on_a_few_photos(offline_env, tmp_path):
    epochs = ["train.max_epochs=1", "train.warmup_epochs=0", "train.batch_size=6"]
    for teacher in ("teacher_long", "teacher_lite1"):  # configs/real/distill.yaml's two teachers
        run(str(ROOT / "train_teacher.py"), "--config", str(REAL / f"{teacher}.yaml"), *SMALL, *epochs, cwd=tmp_path)
    run(str(ROOT / "train_teacher.py"), "--config", str(REAL / "baseline.yaml"), *SMALL, *epochs, cwd=tmp_path)
    distill = [str(ROOT / "distill.py"), "--config", str(REAL / "distill.yaml"), *SMALL]
    distill += [e.replace("train.", "distillation.") for e in epochs] + ["distillation.teacher_cache=cache"]
    built = run(*distill, "--cache-teacher", cwd=tmp_path)
    assert "teacher cache" in built.stdout + built.stderr
    student = run(*distill, cwd=tmp_path)
    assert "ImageNet" not in student.stderr  # no weights were missing
    runs = tmp_path / "checkpoints/real"
    for row in ("teacher_long", "teacher_lite1", "baseline", "distilled"):  # evaluate.py's own tests cover the table
        assert (runs / row / "best.safetensors").is_file() and (runs / row / "best.json").is_file()
