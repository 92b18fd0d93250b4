"""The scripts as users run them, in subprocesses: train_teacher.py -> distill.py -> evaluate.py (export: own file)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd, expect_ok=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def pipeline(tiny_demo, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    data = [f"data.root={tiny_demo}", "data.demo=false", "data.image_size=32", "data.num_workers=0"]
    teacher = run(
        str(ROOT / "train_teacher.py"),
        "--config",
        str(ROOT / "configs/teacher.yaml"),
        *data,
        "model.backbone=test_efficientnet",
        "model.ms_backbone=test_resnet",
        "train.max_epochs=2",
        "train.warmup_epochs=0",
        "train.batch_size=8",
        "train.checkpoint_dir=ckpt/teacher",
        cwd=work,
    )
    student = run(
        str(ROOT / "distill.py"),
        "--config",
        str(ROOT / "configs/b0.yaml"),
        *data,
        "distillation.teacher_checkpoint=ckpt/teacher/best.ckpt",
        "distillation.student_backbone=test_efficientnet",
        "distillation.student_pretrained=null",
        "distillation.feature_layers=[blocks.1, [blocks.3, rgb.blocks.4]]",
        "distillation.max_epochs=2",
        "distillation.warmup_epochs=0",
        "distillation.batch_size=8",
        "distillation.precision=null",
        "distillation.checkpoint_dir=ckpt/student",
        cwd=work,
    )
    return work, data, teacher, student


def test_teacher_run_writes_checkpoint_config_state_and_logs(pipeline):
    work, _, teacher, _ = pipeline
    run_dir = work / "ckpt/teacher"
    assert "epoch 1:" in teacher.stdout and "training on 1 process(es)" in teacher.stdout
    meta = json.loads((run_dir / "best.json").read_text())
    assert meta["arch"]["name"] == "hybrid" and meta["inputs"] == ["rgb", "ms"] and len(meta["ms_mean"]) == 5
    assert meta["classes"] == sorted(meta["classes"]) and len(meta["classes"]) == 5
    assert (run_dir / "best.safetensors").is_file() and (run_dir / "config.yaml").is_file()
    assert json.loads((run_dir / "last/progress.json").read_text())["epoch"] == 2
    assert list((run_dir / "tb").rglob("events.out.tfevents.*"))


def test_distill_run_uses_teacher_and_feature_pairs(pipeline):
    work, _, _, student = pipeline
    assert "feature pairs [('blocks.1', 'rgb.blocks.1'), ('blocks.3', 'rgb.blocks.4')]" in student.stdout
    meta = json.loads((work / "ckpt/student/best.json").read_text())
    assert meta["inputs"] == ["rgb"] and meta["teachers"] == ["ckpt/teacher/best.ckpt"]
    assert 0.0 <= meta["metrics"]["val_acc"] <= 1.0


def test_resume_continues_from_the_saved_epoch(pipeline):
    work, data, _, _ = pipeline
    proc = run(
        str(ROOT / "train_teacher.py"),
        "--config",
        str(ROOT / "configs/teacher.yaml"),
        *data,
        "model.backbone=test_efficientnet",
        "model.ms_backbone=test_resnet",
        "train.max_epochs=3",
        "train.warmup_epochs=0",
        "train.batch_size=8",
        "train.checkpoint_dir=ckpt/teacher",
        "--resume",
        cwd=work,
    )
    assert "resumed from" in proc.stdout and "at epoch 2" in proc.stdout
    assert "epoch 2:" in proc.stdout and "epoch 0:" not in proc.stdout


def test_evaluate_writes_the_comparison_table(pipeline):
    work, data, _, _ = pipeline
    proc = run(
        str(ROOT / "evaluate.py"),
        "--config",
        str(ROOT / "configs/b0.yaml"),
        *data,
        "--out",
        "results",
        "--models",
        "teacher=ckpt/teacher/best.safetensors",
        "distilled=ckpt/student/best.safetensors",
        cwd=work,
    )
    results = json.loads((work / "results/results.json").read_text())
    rows = results["models"]
    assert set(rows) == {"teacher", "distilled"}
    for row in rows.values():
        assert row["samples"] == 20 and 0 <= row["top1"] <= 1 and row["latency_ms"] > 0 and row["params"] > 0
    assert "fewer parameters than the teacher" in " ".join(results["derived"])
    assert (
        "| Model | Parameters | Top-1 Acc. | Latency (ms) | Memory (MB) |" in (work / "results/results.md").read_text()
    )
    assert "Top-1" in proc.stdout


def test_user_mistakes_get_one_clear_message(pipeline):
    work, data, _, _ = pipeline
    proc = run(
        str(ROOT / "distill.py"),
        "--config",
        str(ROOT / "configs/b0.yaml"),
        *data,
        "distillation.teacher_checkpoint=nowhere/best.ckpt",
        cwd=work,
        expect_ok=False,
    )
    assert proc.returncode == 2 and "checkpoint nowhere/best.ckpt not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run(
        str(ROOT / "distill.py"),
        "--config",
        str(ROOT / "configs/b0.yaml"),
        "distillation.temprature=2",
        cwd=work,
        expect_ok=False,
    )
    assert proc.returncode == 2 and "Did you mean 'distillation.temperature'" in proc.stderr


def test_list_layers_prints_shapes_and_suggests_pairs(pipeline):
    work, data, _, _ = pipeline
    proc = run(
        str(ROOT / "distill.py"),
        "--config",
        str(ROOT / "configs/b0.yaml"),
        *data,
        "--list-layers",
        "distillation.teacher_checkpoint=ckpt/teacher/best.ckpt",
        "distillation.student_backbone=test_efficientnet",
        "distillation.student_pretrained=null",
        cwd=work,
    )
    assert "student layers at 32 px" in proc.stdout and "teacher layers at 32 px" in proc.stdout
    assert "rgb.blocks.2" in proc.stdout and "ms.layer1" in proc.stdout
    assert "suggested feature_layers" in proc.stdout and "[blocks.4, rgb.blocks.4]" in proc.stdout
    assert not (work / "checkpoints").exists()  # listing trains nothing and writes nothing


def test_multi_teacher_dkd_with_ema_teacher_and_temperature_decay(pipeline):
    work, data, _, _ = pipeline
    proc = run(
        str(ROOT / "distill.py"),
        "--config",
        str(ROOT / "configs/b0.yaml"),
        *data,
        "distillation.teachers=[{checkpoint: ckpt/teacher/best.ckpt, weight: 2}, "
        "{checkpoint: ckpt/student/best, weight: 1}]",
        "distillation.student_backbone=test_efficientnet",
        "distillation.student_pretrained=null",
        "distillation.feature_layers=[blocks.2]",
        "distillation.soft_loss=dkd",
        "distillation.dkd_warmup_epochs=1",
        "distillation.final_temperature=1.0",
        "distillation.ema_decay=0.9",
        "distillation.ema_teacher_weight=0.5",
        "distillation.ema_teacher_start_epoch=0.5",
        "distillation.max_epochs=2",
        "distillation.warmup_epochs=0",
        "distillation.batch_size=8",
        "distillation.log_every_n_steps=1",
        "distillation.checkpoint_dir=ckpt/multi",
        "data.image_size=24",
        cwd=work,
    )
    assert "2 teacher(s)" in proc.stdout and "soft loss dkd" in proc.stdout
    assert proc.stdout.count("logits mean") == 2  # the sanity check ran for each teacher
    meta = json.loads((work / "ckpt/multi/best.json").read_text())
    assert meta["ema"] is True and meta["teachers"] == ["ckpt/teacher/best.ckpt", "ckpt/student/best"]
    assert meta["image_size"] == 24  # the student's own size; the 32 px teachers got the view resized
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((work / "ckpt/multi/tb").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    temperatures = [e.value for e in events.Scalars("train/temperature")]
    assert temperatures[0] == pytest.approx(4.0) and temperatures[-1] < 2.0  # decays linearly towards 1.0
