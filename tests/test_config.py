from pathlib import Path

import pytest
import yaml

from kd.config import Config, ConfigError, load_config, parse_override

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
GUIDE_BLOCK = """
distillation:
  teacher_checkpoint: "checkpoints/teacher/best.ckpt"
  student_backbone: "efficientnet_b0"
  student_pretrained: "imagenet"  # or path to custom weights
  temperature: 4.0
  alpha: 0.3
  feature_weight: 0.5
  batch_size: 64
  learning_rate: 3e-4
  weight_decay: 1e-4
  max_epochs: 100
  warmup_epochs: 3
  feature_matching: true
  feature_layers: ["blocks.2", "blocks.4", "blocks.6"]
  lr_scheduler: "cosine"  # or "step", "plateau"
  lr_gamma: 0.1
  lr_step_size: 30
  early_stopping_patience: 10
  precision: "16-mixed"
  log_every_n_steps: 50
  checkpoint_dir: "checkpoints/student"
  save_top_k: 3
  monitor: "val_acc"
  mode: "max"
"""


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_user_guide_block_loads_unchanged(tmp_path):
    d = load_config(write(tmp_path, GUIDE_BLOCK)).distillation
    assert d.learning_rate == 3e-4 and isinstance(d.learning_rate, float)  # YAML reads 3e-4 as a string
    assert d.weight_decay == 1e-4
    assert d.feature_layers == ["blocks.2", "blocks.4", "blocks.6"]
    assert d.mixed_precision == "fp16"
    assert (d.alpha, d.temperature, d.save_top_k, d.checkpoint_dir) == (0.3, 4.0, 3, "checkpoints/student")


def test_b0_config_holds_the_guide_block():
    guide = yaml.safe_load(GUIDE_BLOCK)["distillation"]
    shipped = yaml.safe_load((CONFIGS[0].parent / "b0.yaml").read_text())["distillation"]
    assert shipped == guide


@pytest.mark.parametrize(
    "precision, expected", [("16-mixed", "fp16"), ("bf16-mixed", "bf16"), (None, "no"), ("bf16", "bf16"), ("no", "no")]
)
def test_precision_spellings_map_to_accelerate(tmp_path, precision, expected):
    cfg = load_config(None, [f"distillation.precision={'null' if precision is None else precision}"])
    assert cfg.distillation.mixed_precision == expected


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'distillation.temprature'.*'distillation.temperature'"):
        load_config(write(tmp_path, "distillation:\n  temprature: 2.0\n"))
    with pytest.raises(ConfigError, match=r"'train.max_epochs'"):
        load_config(None, ["train.max_epoch=3"])


def test_wrong_type_names_key_and_type(tmp_path):
    with pytest.raises(ConfigError, match=r"train.max_epochs must be int, got 'ten' \(str\)"):
        load_config(write(tmp_path, "train:\n  max_epochs: ten\n"))
    with pytest.raises(ConfigError, match=r"distillation.alpha must be float"):
        load_config(None, ["distillation.alpha=[1]"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("distillation.temperature=0", "temperature must be > 0"),
        ("distillation.alpha=1.5", r"alpha must be within \[0, 1\]"),
        ("train.max_epochs=-1", "max_epochs must be >= 1"),
        ("train.precision=16", "precision must be one of"),
    ],
)
def test_out_of_range_values_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_overrides_are_read_as_yaml_and_applied():
    cfg = load_config(None, ["train.max_epochs=3", "distillation.feature_layers=[blocks.1, blocks.3]", "name=x"])
    assert cfg.train.max_epochs == 3 and cfg.name == "x"
    assert cfg.distillation.feature_layers == ["blocks.1", "blocks.3"]
    assert parse_override("a.b=null") == (["a", "b"], None)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.max_epochs"])
