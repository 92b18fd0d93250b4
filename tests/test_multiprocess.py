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
from kd.train.accelerator import make_accelerator

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
import kd.train.loop

save_state, calls = kd.train.loop.save_state, []
def save_then_die(accelerator, *args, **kwargs):
    calls.append(1)
    if accelerator.process_index == 1 and len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return save_state(accelerator, *args, **kwargs)
kd.train.loop.save_state = save_then_die
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
    from kd.config import load_config
    from kd.deploy.inference import checkpoint_loader
    from kd.deploy.qat import RANGE_PREFIX, frozen_observers, prepare_qat
    from kd.models.checkpoint import checkpoint_ranges, load_checkpoint

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


# Accelerate 1.15 runs `--use_fsdp` on CPUs as DDP (it shards on GPUs only; kd refuses that, see the test below).
# This wrapper gives Accelerate the state it has on GPUs under `--use_fsdp --fsdp_version 2`, so that torch's
# fully_shard (FSDP2) really shards the model across two gloo CPU processes and kd's FSDP paths run: sharded
# training and validation, checkpoints gathered with get_state_dict, the shard-aware weight check, and a resumable
# state saved and loaded as torch.distributed.checkpoint shards. After a state loads, it prints the whole model's
# checksum, which must equal the one the saving run ended with.
FSDP_ON_CPU = """
import runpy, sys
import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
import kd.train.loop
from kd.train.weights import weight_check

init = accelerate.Accelerator.__init__
def init_as_on_gpus(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
    self.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
accelerate.Accelerator.__init__ = init_as_on_gpus

load_state = kd.train.loop.load_state
def load_and_report(accelerator, *args, **kwargs):
    load_state(accelerator, *args, **kwargs)
    student = accelerator._models[0].model
    accelerator.print(f"loaded checksum {weight_check(accelerator, student)[0]:.6e}")
kd.train.loop.load_state = load_and_report

sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def fsdp_processes() -> list[str]:
    """Two CPU processes launched as `accelerate launch --use_fsdp --fsdp_version 2` sets them up."""
    launch = two_processes()
    return [*launch[:3], "--use_fsdp", "--fsdp_version", "2", *launch[4:]]


def test_fsdp_shards_the_model_and_saves_resumes_and_evaluates_whole_weights(tiny_demo, tmp_path):
    from kd.models.checkpoint import load_checkpoint

    (tmp_path / "fsdp_on_cpu.py").write_text(FSDP_ON_CPU)
    data = [f"data.root={tiny_demo}", "data.demo=false", "data.image_size=32", "data.num_workers=0"]
    train = ["model.name=test_efficientnet", "train.warmup_epochs=0", "train.batch_size=4", "train.checkpoint_dir=run"]
    train += ["train.gradient_clip_val=1.0"]  # clipping a sharded model's gradients
    config = str(ROOT / "configs/baseline_b0.yaml")
    command = [*fsdp_processes(), "fsdp_on_cpu.py", str(ROOT / "train_teacher.py"), "--config", config, *data, *train]
    proc = subprocess.run(
        [*command, "train.max_epochs=2"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "training on 2 process(es) (FSDP: the model sharded across them)" in proc.stdout
    # the shipped config's channels_last: FSDP2 shards contiguous weights only, so it is off, and the run says so
    assert "channels_last off (FSDP shards contiguous weights only)" in proc.stdout
    # every parameter is split between the two processes: no replicas, nothing to compare, and the line says so
    check = next(line for line in proc.stdout.splitlines() if line.startswith("weights sharded (FSDP)"))
    assert "0 shard(s) held by several processes are in sync" in check, check
    checksum = check.rsplit(" ", 1)[1]
    # the state holds the model and optimizer as torch.distributed.checkpoint shards, one file per process
    assert sorted(p.name for p in (tmp_path / "run/last/pytorch_model_fsdp_0").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]

    # the checkpoint holds the whole model, gathered from both shards: it loads strictly (every tensor at its full
    # shape), and its parameters' checksum is the one the sharded check computed over the shards
    model, meta = load_checkpoint(tmp_path / "run/latest.safetensors")
    assert f"{sum(p.double().abs().sum().item() for p in model.parameters()):.6e}" == checksum
    assert meta.epoch == 1

    # the accuracy validation measured on the sharded model is that of the checkpoint, evaluated on one process
    best = json.loads((tmp_path / "run/best.json").read_text())
    single = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "--config", config, *data, "--split", "val"]
        + ["--models", "m=run/best.safetensors", "--out", "eval", "--warmup", "1", "--latency-runs", "2"],
        cwd=tmp_path,
        env={**ENV, "ACCELERATE_USE_CPU": ""},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    row = json.loads((tmp_path / "eval/results.json").read_text())["models"]["m"]
    assert row["samples"] == 20 and row["top1"] == best["metrics"]["val_acc"]

    # resume: the sharded state loads into the sharded model exactly, and training goes on for a third epoch
    proc = subprocess.run(
        [*command, "train.max_epochs=3", "--resume"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"loaded checksum {checksum}" in proc.stdout and "resumed from" in proc.stdout
    assert "epoch 2:" in proc.stdout and "epoch 1:" not in proc.stdout
    assert json.loads((tmp_path / "run/latest.json").read_text())["epoch"] == 2


def test_fsdp_on_cpus_is_refused_instead_of_running_as_ddp(tiny_demo, tmp_path):
    """Accelerate 1.15 shards on GPUs only; without kd's check, `--use_fsdp` on CPUs would train unsharded DDP."""
    data = [f"data.root={tiny_demo}", "data.demo=false", "data.image_size=32", "data.num_workers=0"]
    config = str(ROOT / "configs/baseline_b0.yaml")
    command = [*fsdp_processes(), str(ROOT / "train_teacher.py"), "--config", config, *data]
    command += ["model.name=test_efficientnet", "train.checkpoint_dir=run"]
    proc = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "error: FSDP was asked for" in proc.stderr, proc.stderr[-3000:]
    assert "runs --use_fsdp on a CPU as unsharded DDP" in proc.stderr
    assert not (tmp_path / "run/last").exists()


@pytest.mark.parametrize(
    ("fsdp2", "override", "refusal"),
    [
        (False, None, "kd runs FSDP2"),
        (True, "train.ema_decay=0.99", "train.ema_decay > 0 cannot run under FSDP"),
        (True, "train.qat_start_fraction=0.5", "train.qat_start_fraction cannot run under FSDP"),
    ],
    ids=["fsdp1", "ema", "qat"],
)
def test_what_fsdp_cannot_run_is_refused_before_training(fsdp2, override, refusal):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from kd.config import load_config
    from kd.errors import UserError
    from kd.train.accelerator import check_sharding

    cfg = load_config(str(ROOT / "configs/baseline_b0.yaml"), [override] if override else []).train
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=fsdp2, num_processes=2)
    with pytest.raises(UserError, match=refusal):
        check_sharding(accelerator, cfg)


def test_a_sharded_state_whose_metadata_would_run_code_is_refused(tmp_path):
    """torch unpickles a torch.distributed.checkpoint .metadata without limits; kd checks it before resuming."""
    import pickle

    from kd.errors import UserError
    from kd.train.state import check_state

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo this ran",))

    last = tmp_path / "last"
    (last / "pytorch_model_fsdp_0").mkdir(parents=True)
    (last / "pytorch_model_fsdp_0/.metadata").write_bytes(pickle.dumps(Payload()))
    (last / "progress.json").write_text(json.dumps({"epoch": 1, "batches_done": 0, "updates": 5}))
    with pytest.raises(UserError, match=r"pytorch_model_fsdp_0/\.metadata holds more than tensors"):
        check_state(last)
