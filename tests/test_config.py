import errno
import os
import re
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch.ao.quantization import default_fused_act_fake_quant

from kd.config import Config, ConfigError, load_config
from kd.config_checks import RANDAUGMENT_OPS
from kd.config_rules import parse_override
from kd.data.augment import OPS

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
    speed = {"channels_last": True}  # kd's speed defaults (issue 17), after the guide's keys
    assert shipped == {**guide, **speed} and list(shipped)[: len(guide)] == list(guide)


@pytest.mark.parametrize(
    "precision, expected", [("16-mixed", "fp16"), ("bf16-mixed", "bf16"), (None, None), ("bf16", "bf16"), ("no", "no")]
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


# ------------------------------------------------------------------------- values that validate, then crash later


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.log_every_n_steps=0", "train.log_every_n_steps must be >= 1, got 0"),
        ("distillation.lr_step_size=0", "distillation.lr_step_size must be >= 1 (epochs between decays), got 0"),
        ("seed=-1", "seed must be in [0, 2**32), the seeds numpy accepts, got -1"),
        ("seed=4294967296", "seed must be in [0, 2**32)"),
        ("data.split_seed=-1", "data.split_seed must be in [0, 2**32)"),
        ("data.demo_seed=4294967296", "data.demo_seed must be in [0, 2**32)"),
        ("data.std=[0, 0, 0]", "data.std must be >= 0.001 for every channel, got [0.0, 0.0, 0.0]"),
        ("data.std=[1, -1, 1]", "data.std must be >= 0.001 for every channel"),
        ("data.std=[1, 1e-300, 1]", "data.std must be >= 0.001 for every channel"),  # 0 in float32
        ("data.mean=[0.5, 1e308, 0.5]", "data.mean must be in [0, 1] for every channel (pixels are read in [0, 1])"),
        ("data.mean=[-0.1, 0.5, 0.5]", "data.mean must be in [0, 1] for every channel"),
        ("data.mean=[.nan, 0.5, 0.5]", "data.mean[0] must be a finite number, got nan"),
        ("data.std=[0.2, .inf, 0.2]", "data.std[1] must be a finite number, got inf"),
        ("data.mean=[red, 0.5, 0.5]", "data.mean[0] must be float, got 'red' (str)"),
        ("data.mean=[true, 0.5, 0.5]", "data.mean[0] must be float, got True (bool)"),
        ("distillation.teachers=[{checkpoint: a, weight: 0}]", "distillation.teachers[0].weight must be > 0, got 0"),
        (
            "distillation.teachers=[{checkpoint: a, weight: heavy}]",
            "distillation.teachers[0].weight must be float, got 'heavy'",
        ),
        (
            "distillation.teachers=[{checkpoint: a, weight: .nan}]",
            "distillation.teachers[0].weight must be a finite number",
        ),
        ("distillation.teachers=[{checkpoint: [a]}]", "distillation.teachers[0].checkpoint must be str, got ['a']"),
        ("distillation.temperature=.inf", "distillation.temperature must be a finite number, got inf"),
        ("distillation.temperature=1e-30", "distillation.temperature must be in [0.01, 1000.0] (the logits are"),
        ("distillation.temperature=1e30", "distillation.temperature must be in [0.01, 1000.0]"),
        ("distillation.final_temperature=1e-9", "distillation.final_temperature must be in [0.01, 1000.0]"),
        ("distillation.final_temperature=0", "distillation.final_temperature must be > 0 or null, got 0.0"),
        ("train.learning_rate=.inf", "train.learning_rate must be a finite number, got inf"),
        ("train.learning_rate=nan", "train.learning_rate must be a finite number, got 'nan'"),  # a string to YAML
        ("distillation.alpha=.nan", "distillation.alpha must be a finite number"),
        ("train.min_delta=-.inf", "train.min_delta must be a finite number"),
        (f"train.learning_rate={10**400}", "train.learning_rate must be a finite number"),  # float() overflows
        ("train.weight_decay=-0.1", "train.weight_decay must be >= 0, got -0.1"),
        ("data.hflip=1.5", "data.hflip must be a probability in [0, 1], got 1.5"),
        ("data.vflip=-0.1", "data.vflip must be a probability in [0, 1], got -0.1"),
        ("train.lr_gamma=0", "train.lr_gamma must be in (0, 1] (a decay), got 0.0"),
        ("train.lr_gamma=10", "train.lr_gamma must be in (0, 1] (a decay), got 10.0"),
        ("train.min_lr=-1e-5", "train.min_lr must be in [0, learning_rate], got -1e-05"),
        ("train.min_lr=0.1", "train.min_lr must be in [0, learning_rate], got 0.1"),  # above the default 1e-3
        ("train.lr_cycle_decay=0", "train.lr_cycle_decay must be in (0, 1] (a decay)"),
        ("train.lr_cycle_decay=1.5", "train.lr_cycle_decay must be in (0, 1] (a decay)"),
        ("train.finetune_lr_scale=2", "train.finetune_lr_scale must be in (0, 1], got 2.0"),
        ("train.learning_rate=1e30", "train.learning_rate must be in (0, 1], got 1e+30"),  # Adam's step overflows
        ("train.weight_decay=1e30", "train.learning_rate * weight_decay must be below 1 (decoupled weight decay"),
        ("train.project_name=a/b", "train.project_name must be a plain name, without / or \\ (TensorBoard makes it"),
        ("train.project_name=''", "train.project_name must be a plain name"),
        ("distillation.project_name=..", "distillation.project_name must be a plain name"),
        ("train.log_with=[tensorboard, 3]", "train.log_with must be a tracker name or a list of them, e.g."),
        ("train.log_with=[none, wandb]", "train.log_with cannot list none beside trackers"),
        ("train.optimizer_args=[0.9]", "train.optimizer_args must be a mapping of argument names to values"),
        ("train.optimizer_args={lr: 0.1}", "train.optimizer_args.lr: set learning_rate instead"),
        ("train.optimizer_args={momentum: fast}", "train.optimizer_args: adamw (AdamW) takes no argument 'momentum'"),
        ("train.optimizer_args={eps: fast}", "train.optimizer_args.eps must be float, got 'fast' (str)"),
        ("train.optimizer_args={eps: -1}", "train.optimizer_args: adamw refuses {'eps': -1.0}: Invalid epsilon value"),
        ("train.optimizer_args={betas: 0.9}", "train.optimizer_args.betas must list 2 numbers, like its default"),
        ("train.optimizer=adahessian", "train.optimizer: adahessian needs a second-order backward"),
        ("train.early_stopping_patience=-1", "train.early_stopping_patience must be >= 0"),
        ("train.save_every_n_steps=-2", "train.save_every_n_steps must be >= 0"),
        ("distillation.feature_weight=1e300", "distillation.feature_weight must be in [0, 1e+06] (a loss weight"),
        ("distillation.feature_weight=-1", "distillation.feature_weight must be in [0, 1e+06] (a loss weight"),
        ("distillation.dkd_warmup_epochs=-1", "distillation.dkd_warmup_epochs must be >= 0"),
        ("distillation.ema_teacher_start_epoch=-1", "distillation.ema_teacher_start_epoch must be >= 0"),
        ("distillation.feature_teacher=-1", "distillation.feature_teacher must be >= 0, got -1"),
        ("model.drop_rate=1", "model.drop_rate must be in [0, 1), got 1.0"),
        ("data.ms_bands=[0, true]", "data.ms_bands[1] must be a band index or a band name from bands.json, got True"),
        ("distillation.feature_layers=[[blocks.1]]", "distillation.feature_layers[0] must be a layer name or a"),
        ("distillation.feature_layers=[3]", "distillation.feature_layers[0] must be a layer name or a"),
        (  # the Distiller's hooks hold one output per layer: a second pair reading it found nothing (KeyError)
            "distillation.feature_layers=[[blocks.1, bn1], [blocks.2, bn1]]",
            "distillation.feature_layers must name each teacher layer once, got ['bn1']",
        ),
        (
            "distillation.feature_layers=[blocks.1, [blocks.1, blocks.2]]",
            "distillation.feature_layers must name each student layer once, got ['blocks.1']",
        ),
        ('train.checkpoint_dir="runs/a\\0b"', "train.checkpoint_dir must not contain a NUL character"),
        (f"train.batch_size={2**64}", "train.batch_size must fit in 64 bits"),
    ],
)
def test_values_that_would_crash_a_run_are_refused_at_load(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    "key, loss, argument", [("dkd_alpha", "dkd", "alpha"), ("dkd_beta", "dkd", "beta"), ("dist_gamma", "dist", "gamma")]
)
def test_a_replaced_loss_key_names_its_soft_loss_args_spelling(tmp_path, key, loss, argument):
    message = f"distillation.{key} was replaced by distillation.soft_loss_args: {{{argument}: 4.0}} (an argument of "
    for args in [(write(tmp_path, f"distillation:\n  {key}: 4.0\n"),), (None, [f"distillation.{key}=4.0"])]:
        with pytest.raises(ConfigError) as info:
            load_config(*args)
        assert str(info.value).startswith(message + f"soft_loss {loss}); write it there"), str(info.value)
    with pytest.raises(ConfigError, match=r"unknown config key 'train.dkd_alpha'"):  # train never had them
        load_config(None, ["train.dkd_alpha=1"])


@pytest.mark.parametrize("scheduler", ["cosine", "tanh", "step", "multistep", "plateau", "poly", "constant"])
def test_every_timm_scheduler_and_constant_is_a_choice(scheduler):
    assert load_config(None, [f"train.lr_scheduler={scheduler}"]).train.lr_scheduler == scheduler
    with pytest.raises(ConfigError, match=r"^train.lr_scheduler must be cosine \| tanh \| step \| multistep \| pl"):
        load_config(None, ["train.lr_scheduler=cosin"])


def test_feature_loss_keys_and_sections():
    d = load_config(None, ["distillation.feature_loss=rkd", "distillation.feature_loss_args={distance_weight: 2}"])
    assert (d.distillation.feature_loss, d.distillation.feature_loss_args) == ("rkd", {"distance_weight": 2})
    assert (d.distillation.SECTION, d.train.SECTION, Config.SECTION) == ("distillation", "train", "")
    with pytest.raises(ConfigError, match=r"^distillation.feature_loss_args must be a mapping of argument names to"):
        load_config(None, ["distillation.feature_loss_args=[2]"])


def test_the_randaugment_format_knows_every_op_of_kd_data_augment():
    assert len(OPS) == RANDAUGMENT_OPS  # the bound on n that config checks is the number of ops augment draws from


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16"])
def test_qat_under_bf16_is_refused_at_load(precision):
    """The run would crash when QAT starts: PyTorch's fused fake quantization refuses a bf16 input."""
    with pytest.raises(RuntimeError, match="expected scalar type Float but found BFloat16"):
        default_fused_act_fake_quant()(torch.zeros(4, dtype=torch.bfloat16))
    message = f"distillation.qat_start_fraction cannot train under precision '{precision}'"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        load_config(None, [f"distillation.precision={precision}", "distillation.qat_start_fraction=0.5"])
    for fp32 in ("null", "16-mixed"):  # fp16 trains in fp32 without a CUDA GPU
        assert load_config(None, [f"distillation.precision={fp32}", "distillation.qat_start_fraction=0.5"])


def test_edge_values_that_are_fine_still_load():
    cfg = load_config(
        None,
        [
            "seed=4294967295",
            "data.std=[1e-3, 1, 2]",
            "data.mean=[0, '0.5', 1]",  # a numeric string, like 3e-4 elsewhere
            "data.hflip=0",
            "data.vflip=1",
            "data.ms_bands=[0, -1, red]",
            "distillation.teachers=[{checkpoint: a, weight: 2}, {checkpoint: 7}]",
            "distillation.feature_layers=[blocks.1, [blocks.2, rgb.blocks.3]]",
            "distillation.dkd_warmup_epochs=0",
        ],
    )
    assert cfg.data.mean == [0.0, 0.5, 1.0] and all(type(v) is float for v in cfg.data.mean + cfg.data.std)
    assert cfg.distillation.teachers == [{"checkpoint": "a", "weight": 2.0}, {"checkpoint": "7"}]


# ------------------------------------------------------------------------------------------ YAML bombs, huge values


def laughs(levels: int = 9) -> str:
    """A YAML "billion laughs": each list holds 9 aliases of the one before, so it expands to 9**levels values."""
    lists = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lists += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return f"[{', '.join(lists)}]"


@pytest.mark.parametrize("key", ["data.mean", "distillation.feature_layers", "name"])
def test_a_billion_laughs_config_fails_fast_with_a_short_message(tmp_path, key):
    section, name = key.split(".") if "." in key else ("", key)
    text = f"{section}:\n  {name}: {laughs()}\n" if section else f"{name}: {laughs()}\n"
    assert len(text) < 500 and 9**9 > 10**8  # a small file, and 387 million strings once expanded
    path = write(tmp_path, text)
    for args in [(path, []), (None, [f"{key}={laughs()}"])]:
        start = time.perf_counter()
        with pytest.raises(ConfigError) as info:
            load_config(*args)
        assert time.perf_counter() - start < 1.0
        message = str(info.value)
        assert len(message) < 1000 and "more than 10000 values" in message, message
        assert message.startswith(str(path) if args[0] else f"override '{key}="), message


def test_self_referencing_and_deeply_nested_yaml_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml expands to more than 10000 values"):
        load_config(write(tmp_path, "data:\n  mean: &a [*a, *a, *a]\n"))
    with pytest.raises(ConfigError, match=r"c.yaml nests lists or mappings too deeply to read"):
        load_config(write(tmp_path, "name: " + "[" * 700 + "]" * 700))
    with pytest.raises(ConfigError, match=r"override 'seed=11111.*holds a value Python cannot read: Exceeds the limit"):
        load_config(None, ["seed=" + "1" * 5000])
    with pytest.raises(ConfigError, match=r"c.yaml holds a value Python cannot read"):
        load_config(write(tmp_path, "seed: " + "1" * 5000))
    assert len(load_config(None, [f"data.ms_bands={list(range(3000))}"]).data.ms_bands) == 3000  # big, not a bomb


@pytest.mark.parametrize(
    "text",
    [
        "train:\n  max_epochs: " + "x" * 10**6,  # _coerce
        "distillation:\n  alpha: " + "9" * 4000,  # _check (an int of 4000 digits)
        "distillation:\n  teachers: [" + "x" * 10**6 + "]",  # the teachers message
        "train: " + "x" * 10**6,  # _build: not a mapping
        "? " + "x" * 10**6 + "\n: 1",  # unknown key (an explicit key: a plain one is at most 1024 characters)
        "- " + "x" * 10**6,  # the file is not a mapping
    ],
    ids=["coerce", "check", "teachers", "section", "key", "file"],
)
def test_messages_quote_a_huge_value_cut_short(tmp_path, text):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert len(str(info.value)) < 1000 and "..." in str(info.value), str(info.value)[:2000]


def test_a_huge_override_is_quoted_cut_short():
    for override in ["x" * 10**6, "train.max_epochs=[" + "1" * 10**6]:
        with pytest.raises(ConfigError) as info:
            load_config(None, [override])
        assert len(str(info.value)) < 1000, str(info.value)[:2000]


def test_an_unreadable_config_file_is_a_config_error(tmp_path, monkeypatch):
    path = write(tmp_path, "name: x\n")

    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(ConfigError, match=rf"cannot read config file {path}: Permission denied"):
        load_config(path)


def test_a_config_from_a_pipe_is_read_as_from_a_file(tmp_path):
    """`--config <(sed ... configs/b0.yaml)`: the shell passes /dev/fd/N, a pipe that can be read only once."""
    read, write = os.pipe()
    os.write(write, b"seed: 7\ndistillation:\n  max_epochs: 3\n")
    os.close(write)
    try:
        config = load_config(f"/dev/fd/{read}")
    finally:
        os.close(read)
    assert config.seed == 7 and config.distillation.max_epochs == 3
    with pytest.raises(ConfigError, match="is a folder; pass a YAML file"):
        load_config(tmp_path)
