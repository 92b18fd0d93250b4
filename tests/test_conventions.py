"""kd as timm and Accelerate users expect it: `accelerate config` precision, overrides only of sections a script
reads, --print-config, Accelerate's trackers, timm's optimizers."""

import importlib.util
import warnings
from pathlib import Path

import accelerate.tracking
import pytest
import torch
import yaml
from accelerate.utils import LoggerType
from conftest import reset_accelerate
from torch import nn

import distill
import train_teacher
from kd.cli import READS, field_help, sections
from kd.config import Config, ConfigError, TrainConfig, load_config, to_dict
from kd.deploy.qat import QatPhase
from kd.errors import UserError
from kd.train.accelerator import make_accelerator, start_trackers
from kd.train.loop import build_optimizer
from kd.train.task import Classifier

ROOT = Path(__file__).resolve().parents[1]
B0 = str(ROOT / "configs/b0.yaml")
SCRIPTS = {"train_teacher.py": train_teacher.main, "distill.py": distill.main}


@pytest.fixture(autouse=True)
def accelerate_state():
    reset_accelerate()
    yield
    reset_accelerate()


def train_config(*overrides: str) -> TrainConfig:
    return load_config(None, [f"train.{o}" for o in overrides]).train


# ------------------------------------------------------------------------- precision: the config's, or Accelerate's


def test_null_precision_lets_accelerate_decide(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    assert make_accelerator(train_config("precision=null"), tmp_path, cpu=True).mixed_precision == "bf16"
    reset_accelerate()
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert make_accelerator(train_config("precision=null"), tmp_path, cpu=True).mixed_precision == "no"


@pytest.mark.parametrize("yaml_text", ["precision: no", "precision: '32'", "precision: 'no'"])
def test_a_precision_in_the_config_wins_over_accelerates_and_says_so(yaml_text, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    (tmp_path / "c.yaml").write_text(f"distillation:\n  {yaml_text}\n")
    cfg = load_config(tmp_path / "c.yaml").distillation
    assert make_accelerator(cfg, tmp_path, cpu=True).mixed_precision == "no"
    out = capsys.readouterr().out
    assert f"distillation.precision={cfg.precision} (no) wins over Accelerate's mixed_precision bf16" in out, out
    assert "set distillation.precision=null to use Accelerate's" in out


def test_agreeing_precisions_print_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert make_accelerator(train_config("precision=bf16-mixed"), tmp_path, cpu=True).mixed_precision == "bf16"
    assert "wins over" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("precision", "accelerates", "line"),
    [
        ("16-mixed", "no", "train.precision=16-mixed (fp16) needs a CUDA GPU"),  # configs/b0.yaml under launch
        ("16-mixed", None, "train.precision=16-mixed (fp16) needs a CUDA GPU"),
        ("null", "fp16", "Accelerate's mixed_precision fp16 (accelerate launch / accelerate config) needs a CUDA GPU"),
    ],
)
def test_fp16_from_either_side_trains_in_fp32_on_a_cpu_and_says_so_in_one_line(
    precision, accelerates, line, monkeypatch, tmp_path, capsys
):
    """One line says what the run trains in and why (no warning, and no 'wins over' for a precision not used)."""
    if accelerates:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", accelerates)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_accelerator(train_config(f"precision={precision}"), tmp_path, cpu=True).mixed_precision == "no"
    said = [text for text in capsys.readouterr().out.splitlines() if text.startswith("precision")]
    assert said == [
        f"precision: no (fp32): {line}, and this run is on a CPU; set train.precision=bf16-mixed for CPU autocast, "
        "or train.precision=no to say fp32"
    ]


def test_qat_refuses_bf16_that_came_from_accelerate():
    """The config check sees precision null; the loop hands QatPhase what Accelerate chose."""
    cfg = TrainConfig(max_epochs=4, qat_start_fraction=0.5)
    with pytest.raises(UserError, match="cannot train under bf16 autocast.*Set precision=no"):
        QatPhase(cfg, Classifier(nn.Linear(2, 2)), [], "bf16")


# --------------------------------------------------------------------- overrides, --help and --print-config


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("distill.py", ["--config", B0, "train.max_epochs=3"], "use distillation.max_epochs=3"),
        ("train_teacher.py", ["distillation.max_epochs=3"], "use train.max_epochs=3"),
        ("train_teacher.py", ["distillation.temperature=2"], "not distillation.* (distillation.* is distill.py's)"),
        ("distill.py", ["model.name=x"], "distill.py reads data.*, distillation.*, not model.* (model.* is train"),
    ],
)
def test_an_override_of_a_section_the_script_does_not_read_is_an_error(script, argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        SCRIPTS[script](argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith(f"error: {script} reads ") and message in err, err


@pytest.mark.parametrize("script", ["train_teacher.py", "distill.py"])
def test_help_shows_an_override_the_script_reads_and_its_sections(script, capsys):
    with pytest.raises(SystemExit) as info:
        SCRIPTS[script](["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    own = "train" if script == "train_teacher.py" else "distillation"
    other = "distillation" if own == "train" else "train"
    assert info.value.code == 0 and f"e.g. {own}.max_epochs=3" in out and f"{other}.max_epochs" not in out
    assert all(f"{section}.* " in out for section in READS[script]) and "--print-config" in out


@pytest.mark.parametrize(
    "script, argv",
    [
        ("distill.py", ["--config", B0, "distillation.alpha=0.7", "seed=3"]),
        ("train_teacher.py", ["--config", str(ROOT / "configs/teacher.yaml"), "train.optimizer=sgd", "seed=3"]),
        ("train_teacher.py", ["--config", B0]),  # a file with a section this script does not read is fine
    ],
)
def test_print_config_prints_the_resolved_config_as_commented_yaml(script, argv, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        SCRIPTS[script]([*argv, "--print-config"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    printed = yaml.safe_load(out)
    resolved = to_dict(load_config(argv[1], argv[2:]))
    assert printed == {key: resolved[key] for key in ("name", "seed", *READS[script])}
    assert "  batch_size: 64  # per-process batch size\n" in out  # the help of the field in kd/config.py
    (tmp_path / "printed.yaml").write_text(out)  # and it is a config file that loads to the same run
    again = load_config(tmp_path / "printed.yaml")
    assert all(getattr(again, key) == getattr(load_config(argv[1], argv[2:]), key) for key in printed)


def test_every_config_key_has_a_one_line_help_to_print():
    for cls in (Config, *sections().values()):
        missing = [name for name, text in field_help(cls).items() if not text.strip() or "\n" in text]
        assert missing == [], f"{cls.__name__} fields without a one-line help: {missing}"
    assert field_help(sections()["distillation"])["learning_rate"] == "peak learning rate, reached after warmup"


# ---------------------------------------------------------------------------------------------------- trackers


def test_an_unknown_tracker_is_refused_with_the_closest_name():
    with pytest.raises(ConfigError, match=r"^train.log_with: Accelerate has no tracker 'wandbb'. Did you mean 'wandb'"):
        train_config("log_with=wandbb")
    with pytest.raises(ConfigError, match=r"Did you mean 'mlflow'\?.*Its trackers: .*tensorboard"):
        train_config("log_with=[tensorboard, mlfow]")


def test_a_tracker_that_is_not_installed_is_an_error_at_the_start(tmp_path):
    assert importlib.util.find_spec("wandb") is None  # else this test would need the availability patched
    with pytest.raises(ConfigError, match=r"^train.log_with names wandb, which is not installed: pip install wandb"):
        make_accelerator(train_config("log_with=[tensorboard, wandb]"), tmp_path, cpu=True)


def test_missing_trackers_are_named_with_their_pip_package(monkeypatch, tmp_path):
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [LoggerType.TENSORBOARD])
    message = r"names comet_ml, aim, which are not installed: pip install comet-ml aim, .*\(installed trackers: tens"
    with pytest.raises(ConfigError, match=message):
        make_accelerator(train_config("log_with=[comet_ml, aim]"), tmp_path, cpu=True)


@pytest.mark.parametrize(
    "log_with, trackers",
    [("tensorboard", ["tensorboard"]), ("[tensorboard]", ["tensorboard"]), ("none", []), ("all", ["tensorboard"])],
)
def test_log_with_takes_a_name_a_list_all_or_none(log_with, trackers, monkeypatch, tmp_path):
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [LoggerType.TENSORBOARD])
    accelerator = make_accelerator(train_config(f"log_with={log_with}"), tmp_path, cpu=True)
    assert [str(t) for t in accelerator.log_with] == trackers


def test_tensorboard_logs_under_the_project_name(tmp_path):
    cfg = train_config("project_name=leaves")
    run_dir = tmp_path / "run"
    accelerator = make_accelerator(cfg, run_dir, cpu=True)
    start_trackers(accelerator, cfg, run_dir, {"train/learning_rate": 1e-3})
    accelerator.log({"train/loss": 1.5}, step=1)
    accelerator.end_training()
    assert list((run_dir / "tb" / "leaves").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("run_name, expected", [("trial-3", "trial-3"), ("", "run7")])
def test_the_run_name_goes_where_each_tracker_takes_it(run_name, expected, tmp_path, monkeypatch):
    cfg = train_config("project_name=leaves", f"run_name='{run_name}'")
    accelerator = make_accelerator(cfg, tmp_path / "run7", cpu=True)
    calls = []
    monkeypatch.setattr(accelerator, "init_trackers", lambda *args, **kwargs: calls.append((args, kwargs)))
    start_trackers(accelerator, cfg, tmp_path / "run7")
    (project,), kwargs = calls[0]
    assert project == "leaves"
    assert kwargs["init_kwargs"]["wandb"] == {"name": expected}
    assert kwargs["init_kwargs"]["mlflow"] == {"run_name": expected}


# --------------------------------------------------------------------------------------------------- optimizers


def small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def test_sgd_is_built_with_its_arguments_and_no_decay_on_norms_and_biases():
    cfg = train_config("optimizer=sgd", "optimizer_args={momentum: 0.5}", "weight_decay=0.01")
    model = small_model()
    optimizer = build_optimizer(model, cfg)
    assert type(optimizer) is torch.optim.SGD
    by_decay = {group["weight_decay"]: {id(p) for p in group["params"]} for group in optimizer.param_groups}
    assert by_decay == {
        0.0: {id(p) for p in model.parameters() if p.ndim <= 1},  # biases, BatchNorm weights
        0.01: {id(model[0].weight), id(model[3].weight)},
    }
    assert all(g["momentum"] == 0.5 and g["nesterov"] and g["lr"] == cfg.learning_rate for g in optimizer.param_groups)


def test_the_default_optimizer_is_still_adamw_and_takes_betas_from_yaml(tmp_path):
    assert type(build_optimizer(small_model(), train_config())) is torch.optim.AdamW
    (tmp_path / "c.yaml").write_text("train:\n  optimizer: lion\n  optimizer_args: {betas: [0.95, 0.98]}\n")
    optimizer = build_optimizer(small_model(), load_config(tmp_path / "c.yaml").train)
    assert type(optimizer).__name__ == "Lion" and optimizer.param_groups[0]["betas"] == (0.95, 0.98)


def test_an_unknown_optimizer_lists_the_closest_names():
    with pytest.raises(ConfigError) as info:
        train_config("optimizer=adamww")
    message = str(info.value)
    assert message.startswith("train.optimizer: timm has no optimizer 'adamww'. Did you mean 'adamw', ")
    assert "timm.optim.list_optimizers()" in message


def test_an_optimizer_argument_the_optimizer_does_not_take_is_an_error():
    with pytest.raises(ConfigError, match=r"^train.optimizer_args: sgd \(SGD\) takes no argument 'betas'\..*Its "):
        train_config("optimizer=sgd", "optimizer_args={betas: [0.9, 0.99]}")
    with pytest.raises(ConfigError, match=r"Did you mean 'momentum'\?"):
        train_config("optimizer=momentum", "optimizer_args={momentun: 0.8}")
    with pytest.raises(ConfigError, match=r"^train.optimizer_args: adamw refuses .*Invalid beta parameter at index 1"):
        train_config("optimizer_args={betas: [0.9, 2]}")


# ------------------------------------------------------------- the table in docs/reliability.md, through the scripts

# (what is wrong, the script's arguments, what the user reads on stderr)
BAD_INPUT = [
    ("override of a section the script does not read", ["--config", B0, "train.max_epochs=3"], "use distillation."),
    ("unknown optimizer", ["distillation.optimizer=adamww"], "Did you mean 'adamw', "),
    (
        "optimizer argument it does not take",
        ["distillation.optimizer=sgd", "distillation.optimizer_args={betas: [0.9, 0.99]}"],
        "distillation.optimizer_args: sgd (SGD) takes no argument 'betas'.",
    ),
    ("optimizer argument it refuses", ["distillation.optimizer_args={eps: -1}"], "Invalid epsilon value: -1.0"),
    ("unknown tracker", ["distillation.log_with=wandbb"], "Did you mean 'wandb'?"),
    ("project name with a slash", ["distillation.project_name=a/b"], "must be a plain name, without / or"),
]


@pytest.mark.parametrize("mistake, argv, message", BAD_INPUT, ids=[case[0] for case in BAD_INPUT])
def test_bad_input_gets_one_clear_message(mistake, argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        distill.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_a_missing_tracker_stops_a_run_before_it_trains(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [LoggerType.TENSORBOARD])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as info:
        warnings.simplefilter("ignore")
        train_teacher.main(["train.log_with=wandb", "train.checkpoint_dir=run"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: train.log_with names wandb, which is not installed: pip")
    assert not list(tmp_path.rglob("*.safetensors"))


def test_every_case_is_in_the_reliability_page():
    page = (ROOT / "docs/reliability.md").read_text()
    cases = [case for case, _, _ in BAD_INPUT] + ["tracker not installed"]
    assert [case for case in cases if f"| {case} |" not in page] == []
