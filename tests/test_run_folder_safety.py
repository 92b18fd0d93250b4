"""A run folder is the run's alone: what resume reads from it is checked, nothing outside it is deleted, no second
run or export writes into it, a refused resume changes nothing, and a stopped run says how to continue."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import reset_accelerate

import export
import train_teacher
from kd.data.dataset import InputSpec
from kd.errors import Interrupted, exit_on_user_error
from kd.models.checkpoint import CheckpointMeta
from kd.models.zoo import build_model
from kd.train.loop import TopK
from kd.train.run_dir import claim_run_dir, owned_by_a_run

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def train_args(data: Path, run_dir: Path, *more: str) -> list[str]:
    """train_teacher.py on the tiny demo: one epoch of five steps, with an EMA (every kind of file in last/)."""
    return [
        *("--config", str(ROOT / "configs/baseline_b0.yaml")),
        *(f"data.root={data}", "data.demo=false", "data.image_size=32", "data.num_workers=0"),
        *("model.name=test_efficientnet", "train.max_epochs=1", "train.warmup_epochs=0", "train.ema_decay=0.9"),
        f"train.checkpoint_dir={run_dir}",
        *more,
    ]


def run(args: list[str]) -> dict | None:
    reset_accelerate()
    return train_teacher.main(args)


def refused(args: list[str], capsys, code: int = 2) -> str:
    """Run in-process; it must end with one line on stderr and exit status `code`, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        run(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == code and "Traceback" not in err, err
    return err


def tree(folder: Path) -> dict[str, bytes]:
    """Every file of `folder` but the lock, which a run takes before it checks anything (and releases on exit)."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"]
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def finished(tiny_demo, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run(train_args(tiny_demo, run_dir))
    return run_dir


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    """The finished run, copied (as from a colleague's drive) beside an innocent folder it must never touch."""
    return Path(shutil.copytree(finished, tmp_path / "copy", ignore=shutil.ignore_patterns(".lock")))


def victims(tmp_path: Path) -> list[Path]:
    """Files outside the run folder, named like checkpoints: a resume that deleted them would be caught."""
    files = []
    for stem in (tmp_path / "victim/best", tmp_path / "abs/notes"):
        stem.parent.mkdir(exist_ok=True)
        files += [stem.with_suffix(".safetensors"), stem.with_suffix(".json")]
    for f in files:
        f.write_text("precious")
    return files


def edit_progress(run_dir: Path, **changes) -> None:
    path = run_dir / "last/progress.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ------------------------------------------------------------------ what resume reads from progress.json is checked


@pytest.mark.parametrize("how", [["--resume"], ["train.resume=auto"]], ids=["--resume", "resume-auto"])
def test_a_top_k_list_naming_files_outside_the_run_is_refused_and_nothing_is_deleted(
    tiny_demo, copy, tmp_path, capsys, how
):
    files = victims(tmp_path)
    edit_progress(copy, top_k=[[-1.0, "../victim/best"], [-2.0, str(tmp_path / "abs/notes")]])
    before = tree(copy)
    err = refused(train_args(tiny_demo, copy, "train.max_epochs=3", "train.save_top_k=1", *how), capsys)
    assert err.startswith(
        f"error: refused to resume from {copy}/last: progress.json's \"top_k\" names '../victim/best'"
    )
    assert "not a checkpoint the run writes (epoch000, epoch001, ...)" in err
    assert all(f.read_text() == "precious" for f in files)
    assert tree(copy) == before  # config.yaml included: nothing is written before every check has passed


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"epoch": "0"}, "\"epoch\" must be a whole number >= 0, got '0'"),
        ({"batches_done": -1}, '"batches_done" must be a whole number >= 0, got -1'),
        ({"updates": 2.5}, '"updates" must be a whole number >= 0, got 2.5'),
        ({"stale_epochs": True}, '"stale_epochs" must be a whole number >= 0, got True'),
        ({"top_k": [[float("nan"), "epoch000"]]}, '"top_k" scores must be finite numbers, got nan'),
        ({"top_k": [["0.5", "epoch000"]]}, "\"top_k\" scores must be finite numbers, got '0.5'"),
        ({"top_k": [[0.5, "epoch000", 1]]}, '"top_k" must hold [score, checkpoint name] pairs'),
        ({"top_k": {"a": 1}}, '"top_k" must be a list of [score, checkpoint name] pairs'),
        ({"top_k": [[0.5, "epoch000/../../x"]]}, "\"top_k\" names 'epoch000/../../x', not a checkpoint"),
        ({"max_epochs": 0}, '"max_epochs" must be a whole number >= 1, got 0'),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, dict) else None,
)
def test_a_progress_json_with_values_the_run_would_misuse_is_refused_by_key(tiny_demo, copy, capsys, changes, message):
    edit_progress(copy, **changes)
    err = refused(train_args(tiny_demo, copy, "train.max_epochs=3", "--resume"), capsys)
    assert err.startswith(f"error: refused to resume from {copy}/last: progress.json's {message}"), err
    assert "the file is damaged or was edited" in err


def test_top_k_never_deletes_a_file_whose_name_it_did_not_write(tmp_path):
    """Defence in depth, should a list of other names reach it: it drops them from the list, deletes nothing."""
    files = victims(tmp_path)
    spec = {"name": "test_efficientnet", "num_classes": 5}
    meta = CheckpointMeta(spec, list("abcde"), InputSpec(32, [0.5] * 3, [0.25] * 3))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    top_k = TopK(run_dir, 1, "max", [[-1.0, "../victim/best"], [-2.0, str(tmp_path / "abs/notes")]])
    top_k.update(0.5, 0, build_model(spec), meta)
    assert top_k.entries == [[0.5, "epoch000"]] and (run_dir / "epoch000.safetensors").is_file()
    assert all(f.read_text() == "precious" for f in files)


# --------------------------------------------------------------------------- a refused resume leaves the folder as is


def test_a_refused_resume_keeps_the_config_it_points_to(tiny_demo, copy, capsys):
    before = tree(copy)
    err = refused(train_args(tiny_demo, copy, "model.name=test_resnet", "--resume"), capsys)
    assert f"resume with the config it was made with ({copy}/config.yaml)" in err, err
    assert tree(copy) == before
    assert "test_efficientnet" in (copy / "config.yaml").read_text()


# ------------------------------------------------------------------------------------- one run in a folder at a time

HOLD = """
import sys, time
from pathlib import Path
from kd.train.run_dir import lock_run_dir
lock_run_dir(Path(sys.argv[1]))
print("holding", flush=True)
time.sleep(120)
"""


def test_a_second_run_into_a_folder_in_use_is_refused_with_the_first_runs_process_id(tiny_demo, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        err = refused(train_args(tiny_demo, run_dir), capsys)
        assert err == (
            f"error: {run_dir} is in use by another run (process {holder.pid}): wait for it to end, or set "
            "checkpoint_dir to another folder; two runs never write into one folder at once\n"
        )
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the OS released the lock with the process (kill -9 included), and the lock file does not make a run
    run(train_args(tiny_demo, run_dir))
    assert (run_dir / ".lock").read_text() == f"{os.getpid()}\n"
    assert (run_dir / "best.safetensors").is_file()
    # and a run releases it when its main() returns, not only when its process ends
    holder = subprocess.run(
        [sys.executable, "-c", HOLD.replace("120", "0"), str(run_dir)], env=ENV, capture_output=True
    )
    assert holder.stdout == b"holding\n", holder.stderr


def test_only_the_main_process_of_a_launch_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    claim_run_dir(tmp_path / "run", resume=False, auto_resume=False)
    assert not (tmp_path / "run/.lock").exists()


# ------------------------------------------------------------------------------- export writes nowhere a run owns


@pytest.mark.parametrize("out", ["last/progress.onnx", "last.tmp/model.onnx", "last.old/m.onnx", "tb/model.onnx"])
def test_an_export_never_writes_into_a_runs_state_or_logs(finished, tmp_path, capsys, out):
    run_dir = Path(shutil.copytree(finished, tmp_path / "run"))
    before = tree(run_dir)
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--checkpoint", str(run_dir / "best.safetensors"), "--out", str(run_dir / out)])
    stdout, err = capsys.readouterr()
    assert exit_info.value.code == 2 and "writing" not in stdout, err
    owned = run_dir / Path(out).parent
    assert err == (
        f"error: --out '{run_dir / out}' would write into {owned}, which belongs to the run in {run_dir}: "
        f"export elsewhere, e.g. --out {run_dir / 'export' / Path(out).name}\n"
    )
    assert tree(run_dir) == before


def test_what_a_run_owns(finished):
    assert owned_by_a_run(finished / "config.yaml") == finished / "config.yaml"
    assert owned_by_a_run(finished / ".lock") == finished / ".lock"
    assert owned_by_a_run(finished / "tb/x/y.onnx") == finished / "tb"
    for free in ("export/best.onnx", "progress.json", "notes.txt", "last.json"):  # beside the run, not its own
        assert owned_by_a_run(finished / free) is None
    assert owned_by_a_run(finished.parent / "last/model.onnx") is None  # a folder named last, of no run


# ---------------------------------------------------------------------------- a run killed during its first save

# Runs train_teacher.py, but SIGKILLs itself in the middle of its first save: Accelerate's files are in last.tmp,
# progress.json (which completes a state) is not.
KILL_IN_FIRST_SAVE = """
import os, runpy, signal, sys
import kd.train.loop

def save_half_then_die(accelerator, run_dir, *args, **kwargs):
    accelerator.save_state(str(run_dir / "last.tmp"))
    os.kill(os.getpid(), signal.SIGKILL)
kd.train.loop.save_state = save_half_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_run_killed_in_its_first_save_starts_again_as_the_resume_refusal_says(tiny_demo, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (tmp_path / "kill.py").write_text(KILL_IN_FIRST_SAVE)
    args = train_args(tiny_demo, run_dir, "train.batch_size=8", "train.save_every_n_steps=2")  # a save at step 2
    proc = subprocess.run([sys.executable, str(tmp_path / "kill.py"), str(ROOT / "train_teacher.py"), *args], env=ENV)
    assert proc.returncode == -signal.SIGKILL
    assert (run_dir / "last.tmp/model.safetensors").is_file() and not (run_dir / "last").exists()

    err = refused([*args, "--resume"], capsys)
    assert err == f"error: --resume: no complete saved state in {run_dir}/last; start without --resume\n"
    run(args)  # as it says: the unfinished save is cleared, and the run starts
    assert not (run_dir / "last.tmp").exists() and json.loads((run_dir / "last/progress.json").read_text())["epoch"]


def test_a_run_with_checkpoints_but_no_saved_state_gets_one_way_forward_either_way(tiny_demo, copy, capsys):
    """Killed in its first end-of-epoch save: best/epoch000/latest are written, the state is not."""
    (copy / "last").rename(copy / "last.tmp")
    (copy / "last.tmp/progress.json").unlink()
    advice = (
        f"{copy} holds a run (best.safetensors, epoch000.safetensors, latest.safetensors) that saved no complete "
        "resumable state (it was stopped before its first save finished), so it cannot be continued: set "
        f"checkpoint_dir to another folder, or delete {copy} and run the same command again\n"
    )
    assert refused(train_args(tiny_demo, copy, "--resume"), capsys) == (
        f"error: --resume: no complete saved state in {copy}/last: {advice}"
    )
    assert refused(train_args(tiny_demo, copy), capsys) == f"error: {advice}"
    shutil.rmtree(copy)
    run(train_args(tiny_demo, copy))  # what it says works


# ------------------------------------------------------------------------------------------- Ctrl-C, legacy states


def test_ctrl_c_during_training_says_how_to_continue_and_exits_130(tiny_demo, tmp_path, capsys, monkeypatch):
    import kd.train.loop

    validate, calls = kd.train.loop.validate, []

    def interrupted_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return validate(*args, **kwargs)

    monkeypatch.setattr(kd.train.loop, "validate", interrupted_in_second_epoch)
    run_dir = tmp_path / "run"
    err = refused(train_args(tiny_demo, run_dir, "train.max_epochs=2"), capsys, code=130)
    assert err == f"interrupted; continue with --resume from the last saved state, {run_dir}/last (epoch 1, batch 0)\n"
    monkeypatch.undo()
    run(train_args(tiny_demo, run_dir, "train.max_epochs=2", "--resume"))  # as it says
    assert json.loads((run_dir / "latest.json").read_text())["epoch"] == 1


def test_ctrl_c_outside_a_run_is_one_line_and_exit_130(capsys):
    @exit_on_user_error
    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == Interrupted.exit_code == 130 and capsys.readouterr().err == "interrupted\n"


def test_a_state_saved_by_an_earlier_kd_with_custom_pickles_still_resumes(tiny_demo, copy, capsys):
    """Earlier kd versions saved the scheduler and EMA through Accelerate's custom_checkpoint_N.pkl: plain data,
    read weights-only. Accelerate alone refuses a state with more of them than objects registered with it."""
    last = copy / "last"
    torch.save(json.loads((last / "scheduler.json").read_text()), last / "custom_checkpoint_0.pkl")
    torch.save(safetensors.torch.load_file(last / "ema.safetensors"), last / "custom_checkpoint_1.pkl")
    (last / "scheduler.json").unlink()
    (last / "ema.safetensors").unlink()
    run(train_args(tiny_demo, copy, "--resume"))
    assert f"resumed from {last} at epoch 1, batch 0" in capsys.readouterr().out


# ------------------------------------------------------------------------------ ranks end with their launcher

RANK = """
import os, sys, time
from kd.train.state import stop_with_launcher
stop_with_launcher()
open(os.path.join(sys.argv[1], f"rank{os.environ['LOCAL_RANK']}"), "w").write(str(os.getpid()))
while True:  # as a training rank would, for ever
    time.sleep(0.05)
"""


def alive(pid: int) -> bool:
    """Running (a zombie, waiting for a reaper that may never come in a container, counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_ranks_end_when_their_launcher_is_killed(tmp_path):
    from test_multiprocess import ENV as LAUNCH_ENV
    from test_multiprocess import two_processes

    (tmp_path / "rank.py").write_text(RANK)
    launcher = subprocess.Popen([*two_processes(), str(tmp_path / "rank.py"), str(tmp_path)], env=LAUNCH_ENV)
    pids = []
    try:
        deadline = time.monotonic() + 120
        while len(pids) < 2:
            assert launcher.poll() is None and time.monotonic() < deadline, "the ranks never started"
            time.sleep(0.2)
            pids = [int(p.read_text()) for p in tmp_path.glob("rank[01]") if p.read_text()]
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 20
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in pids), "a rank outlived its launcher"
    finally:
        launcher.kill()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_every_row_of_the_round_three_table_names_a_test_that_exists():
    """docs/reliability.md's table of issue 21's cases: each row's test is real, so the page cannot drift."""
    page = (ROOT / "docs/reliability.md").read_text()
    table = page.split("### Run folders, caches and files from elsewhere")[1].split("\n### ")[0]
    rows = [row for row in table.splitlines() if row.startswith("| ") and not row.startswith("| case")]
    named = {name for row in rows for name in re.findall(r"`(test_\w+)`", row)}
    sources = "".join(path.read_text() for path in (ROOT / "tests").glob("test_*.py"))
    defined = set(re.findall(r"^def (test_\w+)", sources, re.M))
    assert len(rows) >= 40 and all(re.search(r"`test_\w+`", row) for row in rows) and named <= defined, named - defined
