"""Killed runs resume to the same weights, bad input gets one clear message, nothing is lost, nothing is unpickled."""

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import yaml
from conftest import reset_accelerate

import distill
import train_teacher
from kd.config import ConfigError, load_config
from kd.data.dataset import InputSpec
from kd.data.loaders import build_loader
from kd.errors import UserError
from kd.models.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from kd.models.zoo import build_model
from kd.train.accelerator import make_accelerator
from kd.train.run_dir import ensure_writable

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}

# --------------------------------------------------------------------------------------------- kill -9 and resume

# Runs a script like `python script args`, but SIGKILLs itself right after a rename onto <run>/$KILL_AFTER_RENAME_TO
# that finds last.old beside it: the exact instants inside kd.train.state.save_state that polling from outside
# cannot hit.
KILL_AFTER_RENAME = """
import os, pathlib, runpy, signal, sys
rename = pathlib.Path.rename
def rename_then_die(self, target):
    result = rename(self, target)
    target = pathlib.Path(target)
    if target.name == os.environ["KILL_AFTER_RENAME_TO"] and (target.parent / "last.old").exists():
        os.kill(os.getpid(), signal.SIGKILL)
    return result
pathlib.Path.rename = rename_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def baseline_run(data: Path, run_dir: Path) -> list[str]:
    """train_teacher.py on the tiny demo: 3 epochs of 5 steps, resumable state every 2 steps and every epoch.

    Augmentation and dropout stay on: crops and flips are seeded per (seed, epoch, sample), dropout's RNG is part
    of the saved state, so everything must resume bitwise.
    """
    return [
        str(ROOT / "train_teacher.py"),
        "--config",
        str(ROOT / "configs/baseline_b0.yaml"),
        f"data.root={data}",
        "data.demo=false",
        "data.image_size=32",
        "data.num_workers=0",
        "model.name=test_efficientnet",
        "train.max_epochs=3",
        "train.warmup_epochs=0",
        "train.batch_size=8",
        "train.save_every_n_steps=2",
        f"train.checkpoint_dir={run_dir}",
    ]


def finish(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args[-1]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def kill_when(args: list[str], ready, log: Path, timeout: float = 120) -> None:
    """Start the run and `kill -9` it the moment ready() is true (polled every 2 ms)."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *args], env=ENV, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"the run ended before the kill point:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the kill point never came"
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def saved(run_dir: Path) -> dict:
    """<run>/last/progress.json, or {} while there is none (or it is being renamed)."""
    try:
        return json.loads((run_dir / "last/progress.json").read_text())
    except (FileNotFoundError, NotADirectoryError):
        return {}


def assert_nothing_partial(run_dir: Path) -> None:
    """<run>/last is absent or complete, and every checkpoint beside it loads."""
    if (run_dir / "last").exists():
        assert saved(run_dir).get("updates", 0) > 0, "last/ holds no progress.json"
        safetensors.torch.load_file(run_dir / "last/model.safetensors")
    for weights in run_dir.glob("*.safetensors"):
        safetensors.torch.load_file(weights)
        assert json.loads(weights.with_suffix(".json").read_text())["arch"]["name"] == "test_efficientnet"


def weight_files(run_dir: Path) -> list[str]:
    """The run's checkpoints (best, top-k, ...) and the model in its resumable state."""
    files = [*run_dir.glob("*.safetensors"), run_dir / "last/model.safetensors"]
    return sorted(str(p.relative_to(run_dir)) for p in files)


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Bitwise: resuming restores every RNG and the data order, so nothing may differ, not even by rounding."""
    assert weight_files(run_dir) == weight_files(reference)
    for name in weight_files(reference):
        ours, theirs = safetensors.torch.load_file(run_dir / name), safetensors.torch.load_file(reference / name)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), f"{name} differs from the uninterrupted run"
    assert saved(run_dir) == saved(reference)  # epoch, steps, top-k scores, metrics


@pytest.fixture(scope="module")
def reference(tiny_demo, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    finish(baseline_run(tiny_demo, run_dir))
    return run_dir


def test_runs_killed_at_any_point_resume_to_the_uninterrupted_weights(tiny_demo, reference, tmp_path):
    run_dir = tmp_path / "run"
    args = baseline_run(tiny_demo, run_dir)

    # 1: at the end of epoch 0, while epoch000/best checkpoints and the epoch's state are being written
    kill_when(args, lambda: (run_dir / "epoch000.json").exists(), tmp_path / "1.log")
    assert_nothing_partial(run_dir)
    # 2: inside save_state, once the resumed run has saved once and is writing its next state to last.tmp
    start = saved(run_dir)["updates"]
    kill_when(
        [*args, "--resume"],
        lambda: saved(run_dir).get("updates", 0) >= start + 2 and (run_dir / "last.tmp").exists(),
        tmp_path / "2.log",
    )
    assert_nothing_partial(run_dir)
    # 3: mid-epoch 2, right after a step's state was saved
    kill_when([*args, "--resume"], lambda: saved(run_dir).get("updates", 0) >= 12, tmp_path / "3.log")
    assert_nothing_partial(run_dir)

    proc = finish([*args, "--resume"])
    assert "resumed from" in proc.stdout and "epoch 2:" in proc.stdout
    assert_same_run(run_dir, reference)


@pytest.mark.parametrize(
    "rename_to",
    [
        "last.old",  # last -> last.old done, last.tmp -> last not yet: no `last`, so --resume refuses to start
        "last",  # the new state is in place, last.old not yet deleted: the next save cannot rename last onto it
    ],
)
def test_a_kill_between_the_state_renames_still_resumes(tiny_demo, reference, tmp_path, rename_to):
    run_dir = tmp_path / "run"
    args = baseline_run(tiny_demo, run_dir)
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_RENAME, *args],
        env={**ENV, "KILL_AFTER_RENAME_TO": rename_to},
        capture_output=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL
    finish([*args, "--resume"])
    assert_same_run(run_dir, reference)


def test_a_mid_epoch_state_reproduces_the_augmentation_of_the_next_batch(tiny_demo, tmp_path):
    reset_accelerate()
    data = [f"data.root={tiny_demo}", "data.demo=false", "data.image_size=32", "data.num_workers=0"]
    cfg = load_config(ROOT / "configs/baseline_b0.yaml", [*data, "data.mean=[0.5, 0.5, 0.5]", "data.std=[1, 1, 1]"])
    accelerator = make_accelerator(cfg.train, tmp_path, seed=0)
    spec = InputSpec(cfg.data.image_size, cfg.data.mean, cfg.data.std)
    loader = accelerator.prepare(build_loader(cfg.data, spec, "train", 8, train=True, seed=0))
    loader.set_epoch(0)
    batches = iter(loader)
    next(batches), next(batches)  # steps 0 and 1 of kd.train.loop.fit, which with save_every_n_steps=2...
    accelerator.save_state(str(tmp_path / "last"))  # ...saves here
    expected = next(batches)
    accelerator.load_state(str(tmp_path / "last"))
    resumed = next(iter(accelerator.skip_first_batches(loader, 2)))
    assert torch.equal(resumed["label"], expected["label"])  # the same samples...
    assert torch.equal(resumed["rgb"], expected["rgb"])  # ...augmented the same way


# --------------------------------------------------------------------------------- unwritable runs, failed saves


def test_an_unwritable_run_dir_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=rf"cannot write to the run directory {tmp_path}/file/run \(Not a directory\)"):
        ensure_writable(tmp_path / "file/run")
    ensure_writable(tmp_path / "new/run")
    assert list((tmp_path / "new/run").iterdir()) == []  # created, probe removed


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_dir_is_refused(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(UserError, match="Permission denied"):
            ensure_writable(tmp_path / "run")
    finally:
        tmp_path.chmod(0o700)


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = timm.create_model("test_resnet", num_classes=2)
    meta = CheckpointMeta({"name": "test_resnet", "num_classes": 2}, ["a", "b"], InputSpec(32), epoch=0)
    save_checkpoint(tmp_path / "best", model, meta)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def write_half_then_fail(tensors, path):  # the disk fills up halfway through the file
        data = safetensors.torch.save(tensors)
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", write_half_then_fail)
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    with pytest.raises(UserError, match=r"No space left on device.*previous best.safetensors, if any, is kept"):
        save_checkpoint(tmp_path / "best", model, dataclasses.replace(meta, epoch=1))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old pair unchanged, no .tmp left


class Killed(BaseException):
    """SIGKILL at this point: no `except` runs."""


def test_a_kill_between_the_renames_of_a_first_save_leaves_no_weights_without_their_metadata(tmp_path, monkeypatch):
    model = timm.create_model("test_resnet", num_classes=2)
    meta = CheckpointMeta({"name": "test_resnet", "num_classes": 2}, ["a", "b"], InputSpec(32), epoch=0)
    renamed = []

    def rename_once_then_die(src, dst):
        if renamed:
            raise Killed
        renamed.append(Path(dst).name)
        os.rename(src, dst)

    monkeypatch.setattr(os, "replace", rename_once_then_die)
    with pytest.raises(Killed):
        save_checkpoint(tmp_path / "best", model, meta)
    monkeypatch.undo()
    assert renamed == ["best.json"] and not (tmp_path / "best.safetensors").exists()
    with pytest.raises(UserError, match=r"unfinished: \S+best.json is there but not \S+best.safetensors.*--resume"):
        load_checkpoint(tmp_path / "best.safetensors")
    save_checkpoint(tmp_path / "best", model, meta)  # the resumed run's save completes the pair
    assert load_checkpoint(tmp_path / "best")[1] == meta


# ------------------------------------------------------------------------------------ bad input, one clear message


class Payload:
    """Pickled, this is a call to open(marker, "w"): unpickling it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def write_teacher(path: Path, spec: dict, classes: list[str], **ms) -> str:
    """A teacher checkpoint; `ms`: its MS statistics, for a hybrid one."""
    save_checkpoint(path, build_model(spec), CheckpointMeta(spec, classes, InputSpec(32, [0.5] * 3, [0.25] * 3, **ms)))
    return str(path)


def write_pair(stem: Path, weights: bytes, meta: dict) -> str:
    stem.with_suffix(".safetensors").write_bytes(weights)
    stem.with_suffix(".json").write_text(json.dumps(meta))
    return str(stem)


@pytest.fixture(scope="module")
def bad(tiny_demo, tmp_path_factory) -> dict:
    """Broken teachers and broken data sets, by name, for the table below."""
    root = tmp_path_factory.mktemp("bad")
    classes = sorted(p.name for p in (tiny_demo / "train").iterdir())
    plain = {"name": "test_efficientnet", "num_classes": 5}
    hybrid = {"name": "hybrid", "num_classes": 5, "backbone": "test_efficientnet", "ms_backbone": "test_resnet"}
    paths = {
        "data": tiny_demo,
        "run": root / "run",
        "teacher": write_teacher(root / "teacher", plain, classes),
        "teacher_dir": root,
        "ms5_teacher": write_teacher(
            root / "ms5", {**hybrid, "ms_channels": 5}, classes, ms_mean=[0.3] * 5, ms_std=[1] * 5
        ),
        "other_classes": write_teacher(root / "other_classes", plain, ["a", "b", "c", "d", "e"]),
    }
    weights, meta = (root / "teacher.safetensors").read_bytes(), json.loads((root / "teacher.json").read_text())
    ms_weights, ms_meta = (root / "ms5.safetensors").read_bytes(), json.loads((root / "ms5.json").read_text())
    paths["truncated"] = write_pair(root / "truncated", weights[: len(weights) // 2], meta)
    paths["other_arch"] = write_pair(root / "other_arch", weights, {**meta, "arch": {**plain, "name": "test_resnet"}})
    paths["ms4_teacher"] = write_pair(
        root / "ms4", ms_weights, {**ms_meta, "arch": {**ms_meta["arch"], "ms_channels": 4}}
    )
    paths["not_kd"] = write_pair(root / "not_kd", weights, {"model_type": "efficientnet"})  # e.g. a Hugging Face pair

    paths["ms3_data"] = shutil.copytree(tiny_demo, root / "ms3_data")
    for stack in paths["ms3_data"].rglob("*.npy"):
        np.save(stack, np.load(stack)[..., :3])
    paths["corrupt_data"] = shutil.copytree(tiny_demo, root / "corrupt_data")
    (paths["corrupt_data"] / "train/healthy/healthy_0000.png").write_bytes(b"not a png")
    for split in ("train", "val", "test"):
        for c in classes:
            (root / "empty_data" / split / c).mkdir(parents=True)
    paths["empty_data"] = root / "empty_data"
    (root / "a_file").write_text("")
    paths["a_file"] = root / "a_file"
    paths["evil"] = root / "evil.pt"
    paths["marker"] = root / "marker"
    torch.save({"conv_stem.weight": torch.zeros(1), "extra": Payload(paths["marker"])}, paths["evil"])
    return paths


DATA = ["data.root={data}", "data.demo=false", "data.image_size=32", "data.num_workers=0"]
TRAIN = [
    "train_teacher.py",
    "--config",
    "configs/baseline_b0.yaml",
    *DATA,
    "model.name=test_efficientnet",
    "train.max_epochs=1",
    "train.warmup_epochs=0",
    "train.checkpoint_dir={run}",
]
DISTILL = [
    "distill.py",
    "--config",
    "configs/b0.yaml",
    *DATA,
    "distillation.teacher_checkpoint={teacher}",
    "distillation.student_backbone=test_efficientnet",
    "distillation.student_pretrained=null",
    "distillation.feature_layers=[]",
    "distillation.max_epochs=1",
    "distillation.precision=null",
    "distillation.warmup_epochs=0",
    "distillation.checkpoint_dir={run}",
]
# (what is wrong, the command line with {placeholders} from `bad`, what the user reads on stderr)
BAD_INPUT = [
    ("misspelled key", [*DISTILL, "distillation.temprature=2"], "Did you mean 'distillation.temperature'?"),
    ("misspelled section", [*TRAIN, "trian.max_epochs=3"], "unknown config key 'trian'. Did you mean 'train'?"),
    ("wrong type", [*TRAIN, "train.max_epochs=ten"], "train.max_epochs must be int, got 'ten' (str)"),
    ("not YAML", [*DISTILL, "distillation.feature_layers=[blocks.1"], "override 'distillation.feature_layers=[b"),
    ("zero temperature", [*DISTILL, "distillation.temperature=0"], "distillation.temperature must be > 0, got 0.0"),
    ("negative temperature", [*DISTILL, "distillation.temperature=-2"], "distillation.temperature must be > 0"),
    ("alpha above 1", [*DISTILL, "distillation.alpha=1.5"], "distillation.alpha must be within [0, 1], got 1.5"),
    ("alpha below 0", [*DISTILL, "distillation.alpha=-0.1"], "distillation.alpha must be within [0, 1], got -0.1"),
    ("negative epochs", [*TRAIN, "train.max_epochs=-1"], "train.max_epochs must be >= 1, got -1"),
    ("negative distil epochs", [*DISTILL, "distillation.max_epochs=-3"], "distillation.max_epochs must be >= 1"),
    ("missing teacher", [*DISTILL, "distillation.teacher_checkpoint=nowhere/best.ckpt"], "nowhere/best.ckpt not found"),
    ("truncated teacher", [*DISTILL, "distillation.teacher_checkpoint={truncated}"], "the file is damaged"),
    (
        "teacher of another architecture",
        [*DISTILL, "distillation.teacher_checkpoint={other_arch}"],
        "do not fit architecture {'name': 'test_resnet', 'num_classes': 5}",
    ),
    (
        "teacher of another band count",
        [*DISTILL, "distillation.teacher_checkpoint={ms4_teacher}"],
        "size mismatch for band_adapter.0.weight",
    ),
    (
        "not a kd checkpoint",
        [*DISTILL, "distillation.teacher_checkpoint={not_kd}"],
        "is not a kd checkpoint's metadata",
    ),
    (
        "teacher of other classes",
        [*DISTILL, "distillation.teacher_checkpoint={other_classes}"],
        "but the model was trained on ['a', 'b', 'c', 'd', 'e']",
    ),
    (
        "feature layer that does not exist",
        [*DISTILL, "distillation.feature_layers=[blocks.9]"],
        "the student has no layer named 'blocks.9'. Layers it has: conv_stem, bn1,",
    ),
    ("missing data", [*TRAIN, "data.root={run}/nowhere"], "nowhere does not exist"),
    ("empty class folders", [*TRAIN, "data.root={empty_data}"], "no images (.png, .jpg"),
    ("corrupt image", [*TRAIN, "data.root={corrupt_data}"], "healthy/healthy_0000.png: unreadable image"),
    (
        "MS band count other than the teacher's",
        [*DISTILL, "data.root={ms3_data}", "distillation.teacher_checkpoint={ms5_teacher}"],
        "have 3 bands",
    ),
    ("unwritable run dir", [*TRAIN, "train.checkpoint_dir={a_file}/run"], "cannot write to the run directory"),
    ("pickled student weights", [*DISTILL, "distillation.student_pretrained={evil}"], "refused to load"),
    (
        "MS bands other than the teacher's",
        [*DISTILL, "distillation.teacher_checkpoint={ms5_teacher}", "data.ms_bands=[0, 1, 2]"],
        "data.ms_bands is [0, 1, 2], but the teacher was trained on bands 'all'",
    ),
    (
        "student run folder is the teacher's",
        [*DISTILL, "distillation.checkpoint_dir={teacher_dir}"],
        "is the folder of teacher",
    ),
    ("resume without a saved state", [*TRAIN, "--resume"], "--resume: no complete saved state in"),
]
SCRIPTS = {"train_teacher.py": train_teacher.main, "distill.py": distill.main}


def command(template: list[str], bad: dict) -> list[str]:
    script, *args = template
    return [script, *(str(ROOT / a) if a.startswith("configs/") else a.format(**bad) for a in args)]


@pytest.mark.parametrize("mistake, template, message", BAD_INPUT, ids=[case[0] for case in BAD_INPUT])
def test_bad_input_gets_one_clear_message(mistake, template, message, bad, capsys, monkeypatch, tmp_path):
    """In-process through each script's main() (a subprocess per case would cost 5 s of imports each)."""
    monkeypatch.chdir(tmp_path)  # defaults such as runs/<name> stay out of the repository
    script, *args = command(template, bad)
    reset_accelerate()
    with pytest.raises(SystemExit) as exit_info:  # any other exception would be a traceback for the user
        SCRIPTS[script](args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err
    assert not bad["marker"].exists()


def test_every_case_of_the_table_is_in_the_reliability_page():
    page = (ROOT / "docs/reliability.md").read_text()
    assert [case for case, _, _ in BAD_INPUT if f"| {case} |" not in page] == []


def test_bad_input_exits_2_without_a_traceback_from_the_command_line(bad):
    """The deepest case of the table (after the accelerator and the loaders) as users meet it: a process."""
    template = next(case[1] for case in BAD_INPUT if case[0].startswith("MS band count"))
    script, *args = command(template, bad)
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: the multispectral stacks have 3 bands")


# ---------------------------------------------------------------------------------- nothing runs code when loaded


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
def test_pickled_weights_that_would_run_code_are_refused(tmp_path, suffix):
    weights, marker = tmp_path / f"w{suffix}", tmp_path / "marker"
    torch.save({"conv_stem.weight": torch.zeros(1), "extra": Payload(marker)}, weights)
    torch.load(weights, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UserError, match=rf"refused to load {weights}: .* unpickling it could run code"):
        build_model({"name": "test_efficientnet", "num_classes": 5}, pretrained=str(weights))
    with pytest.raises(UserError, match="not found"):  # a teacher path is only ever read as safetensors + JSON
        load_checkpoint(weights)
    assert not marker.exists()


def test_config_files_with_python_tags_are_refused(tmp_path):
    marker = tmp_path / "marker"
    payload = f"!!python/object/apply:os.system ['touch {marker}']"
    yaml.unsafe_load(payload)  # the payload is live: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    (tmp_path / "c.yaml").write_text(f"name: {payload}")
    with pytest.raises(ConfigError, match="is not valid YAML.*could not determine a constructor"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, [f"name={payload}"])
    assert not marker.exists()
    (tmp_path / "c.yaml").write_text("!!python/object:kd.config.Config {}")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(tmp_path / "c.yaml")


# ------------------------------------------------------------------------- resume never unpickles code, runs never mix


def run_main(args: list[str]) -> dict | None:
    reset_accelerate()
    script, *rest = args
    return SCRIPTS[script](rest)


def refused(args: list[str], capsys) -> str:
    """Run in-process; the run must end with one `error:` line and exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    return err


def run_dir_of(args: list[str]) -> Path:
    return Path([a for a in args if "checkpoint_dir=" in a][-1].split("=", 1)[1])


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(bad, tmp_path_factory) -> list[str]:
    """A one-epoch train_teacher.py run with an EMA, so last/ holds every kind of file a resumable state has."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    args = command([*TRAIN, "train.ema_decay=0.9"], {**bad, "run": run_dir})
    run_main(args)
    return args


def test_resume_refuses_a_planted_pickle_in_any_file_of_the_state(finished_run, tmp_path, capsys):
    """A run folder from a shared drive: whichever file of last/ holds a code-running pickle, resume refuses it by
    name and the code never runs (the marker file never appears)."""
    source = run_dir_of(finished_run)
    names = sorted(p.name for p in (source / "last").iterdir())
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "scheduler.json", "ema.safetensors"} <= set(
        names
    )
    marker = tmp_path / "marker"
    for name in [*names, "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"]:  # and Accelerate's own custom files
        run_dir = tmp_path / name
        shutil.copytree(source, run_dir)
        torch.save({"state": Payload(marker)}, run_dir / "last" / name)
        err = refused([*finished_run, f"train.checkpoint_dir={run_dir}", "train.max_epochs=2", "--resume"], capsys)
        assert name in err and "resume" in err, err
        assert not marker.exists(), f"resuming ran the code planted in {name}"


def test_resume_after_changing_the_architecture_names_the_mismatch(finished_run, capsys):
    err = refused([*finished_run, "model.name=test_resnet", "--resume"], capsys)
    assert "the saved state does not fit the model" in err and "config it was made with" in err, err


def test_a_run_never_overwrites_another_run_or_a_teacher(finished_run, bad, capsys):
    run_dir = run_dir_of(finished_run)
    before = tree(run_dir)
    err = refused(finished_run, capsys)  # the same command again, without --resume
    assert f"{run_dir} already holds a run" in err and "--resume" in err, err
    assert tree(run_dir) == before  # not a byte changed, config.yaml included

    teacher_dir = Path(bad["teacher"]).parent
    before = tree(teacher_dir)
    args = command([*DISTILL, "distillation.checkpoint_dir={teacher_dir}"], bad)
    assert "is the folder of teacher" in refused(args, capsys)
    assert "is the folder of teacher" in refused([*args, "--resume"], capsys)
    assert tree(teacher_dir) == before


def test_a_finished_run_resumed_with_more_epochs_trains_on(finished_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(run_dir_of(finished_run), run_dir)
    args = [*finished_run, f"train.checkpoint_dir={run_dir}"]
    before = safetensors.torch.load_file(run_dir / "last/model.safetensors")  # the trained weights, not the EMA
    run_main([*args, "train.max_epochs=2", "--resume"])
    assert "max_epochs 1 -> 2: the LR schedule is rebuilt for 2 epochs" in capsys.readouterr().out
    # the old schedule ended at LR 0, under which AdamW leaves every weight where it is
    after = safetensors.torch.load_file(run_dir / "last/model.safetensors")
    learned = [k for k in before if before[k].is_floating_point() and "running" not in k]
    assert sum(not torch.equal(before[k], after[k]) for k in learned) == len(learned)
    assert json.loads((run_dir / "latest.json").read_text())["epoch"] == 1
    err = refused([*args, "train.max_epochs=1", "--resume"], capsys)  # back down is not possible: it trained 2
    assert "already trained 2 epochs, more than max_epochs=1" in err, err


def test_an_epoch_of_only_skipped_steps_saves_nothing_and_fails(bad, tmp_path, capsys, monkeypatch):
    from kd.train.task import Classifier

    real_forward = Classifier.forward

    def nan_loss(self, batch):
        terms = real_forward(self, batch)
        return {**terms, "loss": terms["loss"] * float("nan")}

    monkeypatch.setattr(Classifier, "forward", nan_loss)
    run_dir = tmp_path / "run"
    err = refused(command(TRAIN, {**bad, "run": run_dir}), capsys)
    assert "every training step of epoch 0 had a non-finite loss" in err, err
    assert not list(run_dir.glob("*.safetensors"))  # no untrained "best"


@pytest.mark.parametrize("script", ["train_teacher.py", "distill.py"])
def test_two_runs_of_one_seed_are_bitwise_equal_and_other_seeds_differ(script, bad, tmp_path):
    template = {"train_teacher.py": TRAIN, "distill.py": DISTILL}[script]
    section = "train" if script == "train_teacher.py" else "distillation"
    weights = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        torch.manual_seed(1000 + len(weights))  # whatever the global RNG held before must not matter
        run_main(command([*template, f"seed={seed}", f"{section}.checkpoint_dir={tmp_path / name}"], bad))
        weights[name] = safetensors.torch.load_file(tmp_path / name / "latest.safetensors")
    assert weights["a"].keys() == weights["b"].keys()
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert any(not torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])
