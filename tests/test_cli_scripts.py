"""evaluate.py and export.py share the training scripts' config command line (kd/cli.py): `--print-config` prints
the data section they read with each key's meaning, and an override of a section they do not read is an error."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import evaluate
import export
from kd.cli import READS
from kd.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
B0 = str(ROOT / "configs/b0.yaml")
SCRIPTS = {"evaluate.py": evaluate.main, "export.py": export.main}
ROOT_COMMENT = "  # <root>/<split>/<class>/<image>"  # the comment of DataConfig.root in kd/config.py


@pytest.mark.parametrize(
    "script, argv, config, overrides",
    [
        ("evaluate.py", ["--config", B0, "data.image_size=48"], B0, ["data.image_size=48"]),
        # an override among the models
        (
            "evaluate.py",
            ["--models", "m=run/best.safetensors", "data.val_fraction=0.2"],
            None,
            ["data.val_fraction=0.2"],
        ),
        # no --checkpoint needed to print
        ("export.py", ["--config", B0, "data.image_size=48", "--out", "s.onnx"], B0, ["data.image_size=48"]),
        ("export.py", [], None, []),  # the defaults
    ],
)
def test_print_config_prints_the_data_section_as_commented_yaml(script, argv, config, overrides, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        SCRIPTS[script]([*argv, "--print-config"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    resolved = to_dict(load_config(config, overrides))
    assert READS[script] == ("data",) and yaml.safe_load(out) == {"data": resolved["data"]}  # no name, seed
    assert out.startswith(f"# {script}'s resolved config")
    assert ROOT_COMMENT in next(line for line in out.splitlines() if line.startswith("  root: "))
    (tmp_path / "printed.yaml").write_text(out)  # a config file that loads to the same data section
    assert to_dict(load_config(tmp_path / "printed.yaml"))["data"] == resolved["data"]


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("evaluate.py", ["--config", B0, "train.max_epochs=3"], "not train.* (train.* is train_teacher.py's)"),
        # after --models too, where a dotted section key is an override, not a model
        (
            "evaluate.py",
            ["--demo", "--models", "a=x.safetensors", "distillation.alpha=0.5"],
            "not distillation.* (distillation.* is distill.py's)",
        ),
        ("export.py", ["--checkpoint", "s.safetensors", "model.name=x"], "not model.* (model.* is train_teacher.py's)"),
        ("export.py", ["--config", B0, "distillation.temperature=2", "--print-config"], "not distillation.*"),
    ],
)
def test_an_override_of_a_section_the_script_does_not_read_is_an_error(script, argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        SCRIPTS[script](argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith(f"error: {script} reads data.*, ") and message in err, err


def test_export_refuses_overrides_without_the_config_they_change(capsys):
    with pytest.raises(SystemExit) as info:
        export.main(["--checkpoint", "s.safetensors", "data.root=leaves"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "without --config the check runs on random inputs; pass --config" in err, err


def test_export_still_requires_a_checkpoint_when_not_printing_the_config(capsys):
    with pytest.raises(SystemExit) as info:
        export.main(["--config", B0])
    assert info.value.code == 2 and "the following arguments are required: --checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["evaluate.py", "export.py"])
def test_help_lists_the_sections_the_script_reads(script, capsys):
    with pytest.raises(SystemExit) as info:
        SCRIPTS[script](["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    assert info.value.code == 0 and "data.* " in out and "--print-config" in out
    assert f"python {script} [--config FILE] --print-config" in out and "name, seed" not in out


def test_print_config_from_the_command_line():
    """As users run it, in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "evaluate.py"), "--config", B0, "--print-config", "data.image_size=48"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml.safe_load(proc.stdout)["data"]["image_size"] == 48


# Runs a script as `python <script> ARGS` does, then prints its exit status and the heavy libraries it imported.
IMPORTS_PROBE = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
print(code, *sorted(m for m in ("torch", "timm", "accelerate", "numpy", "onnx") if m in sys.modules))
"""


@pytest.mark.parametrize("script", ["train_teacher.py", "distill.py", "evaluate.py", "export.py"])
@pytest.mark.parametrize("argv, code", [(["--help"], "0"), (["data.imagesize=3"], "2")])
def test_help_and_a_misspelled_key_answer_before_torch_loads(script, argv, code):
    """--help and a command-line mistake come back at once: the scripts import torch, timm and Accelerate only
    after their command line is parsed (a timing-free check: which modules were imported)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", IMPORTS_PROBE, str(ROOT / script), *argv]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.stdout.split()[-1:] == [code], (proc.stdout[-2000:], proc.stderr[-2000:])
    if code == "2":
        assert "data.image_size" in proc.stderr  # the closest key is named
