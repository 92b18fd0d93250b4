"""Two CPU processes under `accelerate launch`: synced ranks, exact validation accuracy, one writer."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def two_processes() -> list[str]:
    """`accelerate launch` of two synced CPU (gloo) processes; ACCELERATE_USE_CPU=1 in ENV makes --multi_gpu CPU."""
    return [
        *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
        *("--main_process_port", str(free_port())),
    ]


def test_two_processes_stay_in_sync_and_report_exact_accuracy(tiny_demo, tmp_path):
    env, launch = ENV, two_processes()
    data = [f"data.root={tiny_demo}", "data.demo=false", "data.image_size=32", "data.num_workers=0"]
    proc = subprocess.run(
        [
            *launch,
            str(ROOT / "train_teacher.py"),
            "--config",
            str(ROOT / "configs/baseline_b0.yaml"),
            *data,
            "model.name=test_efficientnet",
            "train.max_epochs=2",
            "train.warmup_epochs=0",
            "train.batch_size=4",
            "train.checkpoint_dir=run",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "training on 2 process(es)" in proc.stdout
    assert "weights in sync across 2 process(es)" in proc.stdout
    assert proc.stdout.count("epoch 1:") == 1  # only the main process prints
    best = json.loads((tmp_path / "run/best.json").read_text())

    single = subprocess.run(
        [
            sys.executable,
            str(ROOT / "evaluate.py"),
            "--config",
            str(ROOT / "configs/baseline_b0.yaml"),
            *data,
            "--split",
            "val",
            "--models",
            "m=run/best.safetensors",
            "--out",
            "eval",
        ],
        cwd=tmp_path,
        env={**env, "ACCELERATE_USE_CPU": ""},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    row = json.loads((tmp_path / "eval/results.json").read_text())["models"]["m"]
    assert row["samples"] == 20  # every validation image counted once, none duplicated by padding
    assert row["top1"] == best["metrics"]["val_acc"]


CRASHING_RANK = """
import sys
from pathlib import Path

from kd.config import TrainConfig
from kd.loop import make_accelerator

accelerator = make_accelerator(TrainConfig(), Path(sys.argv[1]))
if accelerator.process_index == 1:
    raise RuntimeError("rank 1 fails on purpose")
accelerator.wait_for_everyone()  # rank 0 would wait here forever if nothing stopped the run
print("rank 0 passed the barrier")
"""


def test_a_crashing_rank_stops_the_run_instead_of_hanging(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_RANK)
    env, launch = ENV, two_processes()
    proc = subprocess.run(
        [*launch, str(script), str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stderr and "rank 0 passed the barrier" not in proc.stdout


# Runs a training script, but rank 1 SIGKILLs itself when it is about to save its second resumable state.
KILL_RANK_1 = """
import os, runpy, signal, sys
import kd.loop

save_state, calls = kd.loop.save_state, []
def save_then_die(accelerator, *args, **kwargs):
    calls.append(1)
    if accelerator.process_index == 1 and len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return save_state(accelerator, *args, **kwargs)
kd.loop.save_state = save_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_killed_rank_ends_the_run_with_how_to_resume(tiny_demo, tmp_path):
    (tmp_path / "kill_rank_1.py").write_text(KILL_RANK_1)
    data = [f"data.root={tiny_demo}", "data.demo=false", "data.image_size=32", "data.num_workers=0"]
    train = ["model.name=test_efficientnet", "train.max_epochs=2", "train.warmup_epochs=0", "train.batch_size=4"]
    config = str(ROOT / "configs/baseline_b0.yaml")
    command = [*two_processes(), "kill_rank_1.py", str(ROOT / "train_teacher.py"), "--config", config, *data, *train]
    command += ["train.save_every_n_steps=2", "train.checkpoint_dir=run"]
    proc = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    # the survivor says what to do, in place of its own stack dump; the launcher's report names the killed rank
    assert "process 0 of 2 stopped: another process of this run ended first" in proc.stderr, proc.stderr[-3000:]
    assert "(epoch 0, batch 2), with the same command and --resume" in proc.stderr
    assert "[rank0]: Traceback" not in proc.stderr
    assert "rank      : 1 (local_rank: 1)" in proc.stderr and "SIGKILL" in proc.stderr


def test_qat_under_two_processes_validates_the_graph_its_checkpoint_rebuilds(tiny_demo, tmp_path):
    """QAT swaps in its fake-quantized graph after DDP wrapped the model; ranks must stay in sync, and the accuracy
    reported for the QAT epoch must be that of the graph rebuilt from the checkpoint's weights and ranges."""
    from kd.checkpoint import checkpoint_loader, checkpoint_ranges, load_checkpoint
    from kd.config import load_config
    from kd.qat import RANGE_PREFIX, frozen_observers, prepare_qat

    data = [f"data.root={tiny_demo}", "data.demo=false", "data.image_size=32", "data.num_workers=0"]
    train = ["model.name=test_efficientnet", "train.max_epochs=2", "train.warmup_epochs=0", "train.batch_size=4"]
    config = str(ROOT / "configs/baseline_b0.yaml")
    command = [*two_processes(), str(ROOT / "train_teacher.py"), "--config", config, *data, *train]
    command += ["train.qat_start_fraction=0.5", "train.checkpoint_dir=run"]
    proc = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "training on 2 process(es)" in proc.stdout and "weights in sync across 2 process(es)" in proc.stdout

    latest = tmp_path / "run/latest.safetensors"
    model, meta = load_checkpoint(latest)
    ranges = checkpoint_ranges(latest)
    assert meta.qat and ranges
    loader = checkpoint_loader(load_config(config, data).data, meta, "val", 8)
    batches = list(loader)
    graph = prepare_qat(model, batches[0]["rgb"][:2])
    graph.load_state_dict({k.removeprefix(RANGE_PREFIX): v for k, v in ranges.items()}, strict=False)
    graph.eval()
    with torch.no_grad(), frozen_observers(graph):
        correct = sum((graph(b["rgb"]).argmax(1) == b["label"]).sum().item() for b in batches)
    assert correct / len(loader.dataset) == pytest.approx(meta.metrics["val_acc"], abs=1e-9)
