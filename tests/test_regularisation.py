"""timm's regularisation knobs for every model a script trains: model.drop_path_rate (train_teacher.py, also both
backbones of the hybrid teacher), distillation.student_drop_rate and student_drop_path_rate (distill.py). They reach
the built model, travel in the checkpoint's arch only when set, and the defaults build today's models."""

import types

import pytest
import torch

import distill
import train_teacher
from kd.config import ConfigError, load_config
from kd.data.dataset import InputSpec
from kd.models.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from kd.models.zoo import build_model

TEACHERS = types.SimpleNamespace(classes=["a", "b", "c"])  # all build_student reads of the teachers


def drop_probs(model: torch.nn.Module) -> list[float]:
    """The drop probability of every stochastic-depth module (timm's DropPath; a rate of 0 builds none)."""
    return [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]


def deepest(model: torch.nn.Module) -> float:
    """The largest drop probability: timm grows it with depth up to drop_path_rate (the last block's may be lower)."""
    return max(drop_probs(model), default=0.0)


def test_the_defaults_record_and_build_what_they_did_before():
    cfg = load_config(None, ["model.name=test_efficientnet"])
    assert train_teacher.architecture(cfg, 3) == {"name": "test_efficientnet", "num_classes": 3, "drop_rate": 0.2}
    cfg = load_config(None, ["distillation.student_backbone=test_efficientnet", "data.image_size=32"])
    student, arch, _ = distill.build_student(cfg, TEACHERS)
    assert arch == {"name": "test_efficientnet", "num_classes": 3}  # no drop_rate: the model's own default
    assert drop_probs(student) == [] and student.drop_rate == 0.0


def test_the_student_takes_dropout_and_stochastic_depth():
    overrides = ["distillation.student_drop_rate=0.3", "distillation.student_drop_path_rate=0.2"]
    cfg = load_config(None, ["distillation.student_backbone=test_efficientnet", "data.image_size=32", *overrides])
    student, arch, _ = distill.build_student(cfg, TEACHERS)
    assert arch == {"name": "test_efficientnet", "num_classes": 3, "drop_rate": 0.3, "drop_path_rate": 0.2}
    assert student.drop_rate == 0.3 and 0.1 < deepest(student) <= 0.2
    cfg = load_config(None, ["distillation.student_drop_rate=0", "distillation.student_backbone=test_efficientnet"])
    assert distill.build_student(cfg, TEACHERS)[1]["drop_rate"] == 0  # 0 is a value, not "the model's own"


def test_a_teacher_takes_stochastic_depth_and_its_checkpoint_rebuilds_it(tmp_path):
    cfg = load_config(None, ["model.name=test_efficientnet", "model.drop_path_rate=0.1"])
    arch = train_teacher.architecture(cfg, 3)
    assert arch["drop_path_rate"] == 0.1
    model = build_model(arch)
    assert 0.05 < deepest(model) <= 0.1
    path = save_checkpoint(tmp_path / "best", model, CheckpointMeta(arch, ["a", "b", "c"], InputSpec(32)))
    loaded, meta = load_checkpoint(path)
    assert meta.arch == arch and drop_probs(loaded) == drop_probs(model)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_the_hybrid_teacher_passes_stochastic_depth_to_both_backbones(tmp_path):
    overrides = ["model.backbone=test_efficientnet", "model.ms_backbone=test_resnet", "model.drop_path_rate=0.2"]
    arch = train_teacher.architecture(load_config(None, overrides), 3)
    assert arch["drop_path_rate"] == 0.2
    model = build_model(arch)
    assert 0.1 < deepest(model.rgb) <= 0.2 and 0.1 < deepest(model.ms) <= 0.2 + 1e-9
    path = save_checkpoint(
        tmp_path / "best",
        model,
        CheckpointMeta(arch, ["a", "b", "c"], InputSpec(32, ms_mean=[0.0] * 5, ms_std=[1.0] * 5)),
    )
    loaded, meta = load_checkpoint(path)
    assert meta.arch == arch and drop_probs(loaded) == drop_probs(model)
    without = train_teacher.architecture(load_config(None, overrides[:2]), 3)
    assert "drop_path_rate" not in without and drop_probs(build_model(without)) == []  # as older checkpoints


@pytest.mark.parametrize(
    "override",
    ["model.drop_path_rate=1", "distillation.student_drop_rate=-0.1", "distillation.student_drop_path_rate=1.5"],
)
def test_rates_outside_zero_to_one_are_refused(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])


@pytest.mark.parametrize(
    "overrides",
    [
        ["distillation.qat_start_fraction=0.8", "distillation.student_drop_path_rate=0.1"],
        ["train.qat_start_fraction=0.8", "model.drop_path_rate=0.1"],
    ],
)
def test_stochastic_depth_with_qat_is_refused(overrides):
    """The QAT graph is exported in train mode: its DropPath would stay on in eval."""
    with pytest.raises(ConfigError, match="drop_path_rate > 0 cannot be combined with qat_start_fraction"):
        load_config(None, overrides)
