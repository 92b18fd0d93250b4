"""A run's resumable state in <run_dir>/last: saved atomically, found after a kill, checked before anything is
unpickled; and the one line a stopped run (Ctrl-C, a lost process) prints."""

import contextlib
import ctypes
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import accelerate.utils
import safetensors
import safetensors.torch
import torch
from accelerate import Accelerator
from timm.utils import ModelEmaV3

from kd.config import TrainConfig
from kd.errors import Interrupted, UserError, quote
from kd.train.run_dir import STATE_DIRS, cannot_continue, held_files
from kd.train.state_files import check_files
from kd.train.topk import CHECKPOINT_STEM

SCHEDULER_FILE, EMA_FILE = "scheduler.json", "ema.safetensors"  # our own state in last/: JSON and tensors only
COUNTERS = ("epoch", "batches_done", "updates", "stale_epochs")  # progress.json's counts, each an int >= 0
LOST_PEER_MESSAGES = ("Connection closed by peer", "remote worker")


@dataclasses.dataclass
class Progress:
    """<run_dir>/last/progress.json (its presence completes a state)."""

    epoch: int = 0  # the epoch to train next (epochs finished)
    batches_done: int = 0  # batches of `epoch` already trained: a state saved mid-epoch
    updates: int = 0  # optimizer steps so far
    stale_epochs: int = 0  # epochs in a row without gain on the monitored metric (early stopping)
    top_k: list = dataclasses.field(default_factory=list)  # [score, checkpoint name], best first (TopK's entries)
    max_epochs: int = 1  # the run's max_epochs when saved: a resume with another rebuilds the LR schedule
    metrics: dict = dataclasses.field(default_factory=dict)  # the last validation's

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str, last: Path) -> "Progress":
        """progress.json's text, refused (naming the state folder `last`) when a value is not what the run writes."""
        data = json.loads(text)
        keys = (*COUNTERS, "top_k", "max_epochs")
        if not (isinstance(data, dict) and all(k in data for k in keys)):
            raise UserError(
                f"refused to resume from {last}: progress.json lacks some of {keys}; the state is damaged (or "
                "older than kd's checks of it): to start over, set checkpoint_dir to a new folder"
            )
        if problem := progress_problem(data):
            raise UserError(
                f"refused to resume from {last}: progress.json's {problem}; the file is damaged or was edited. "
                "Resume only from run folders you made or trust; to start over, set checkpoint_dir to a new folder."
            )
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def progress_problem(progress: dict) -> str | None:
    """The first value of a progress.json that is not what the run writes, said for a message. The top-k names are
    deleted when better ones replace them: any name but epochNNN (../x, /abs/path) would delete files elsewhere."""
    for key in COUNTERS:
        value = progress[key]
        if type(value) is not int or value < 0:  # bool is an int, "0" a string: neither is a count
            return f'"{key}" must be a whole number >= 0, got {quote(value)}'
    if type(progress["max_epochs"]) is not int or progress["max_epochs"] < 1:
        return f'"max_epochs" must be a whole number >= 1, got {quote(progress["max_epochs"])}'
    if not isinstance(progress.get("metrics", {}), dict):  # states saved before the first validation have none
        return f'"metrics" must be a mapping of names to values, got {quote(progress["metrics"])}'
    if not isinstance(progress["top_k"], list):
        return f'"top_k" must be a list of [score, checkpoint name] pairs, got {quote(progress["top_k"])}'
    for entry in progress["top_k"]:
        if not (isinstance(entry, list) and len(entry) == 2):
            return f'"top_k" must hold [score, checkpoint name] pairs, got {quote(entry)}'
        score, stem = entry
        if type(score) not in (int, float) or not math.isfinite(score):
            return f'"top_k" scores must be finite numbers, got {quote(score)}'
        if not (isinstance(stem, str) and CHECKPOINT_STEM.fullmatch(stem)):
            return f'"top_k" names {quote(stem)}, not a checkpoint the run writes (epoch000, epoch001, ...)'
    return None


def save_state(
    accelerator: Accelerator,
    run_dir: Path,
    progress: Progress,
    scheduler=None,
    ema: ModelEmaV3 | None = None,
    safe_serialization: bool = True,
) -> None:
    """Resumable state in <run_dir>/last, replaced atomically: written to last.tmp, completed by progress.json,
    then swapped in (last -> last.old, last.tmp -> last); a kill at any point leaves one complete state. Scheduler
    and EMA are JSON and safetensors, not Accelerate's custom-state pickles (loaded with code execution allowed)."""
    tmp, last, old = run_dir / "last.tmp", run_dir / "last", run_dir / "last.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=safe_serialization)
    accelerator.wait_for_everyone()  # every process writes into tmp (its RNG state; its shards under FSDP)
    if accelerator.is_main_process:
        if scheduler is not None:
            (tmp / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()))
        if ema is not None:
            ema_state = {k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
            safetensors.torch.save_file(ema_state, str(tmp / EMA_FILE))
        (tmp / "progress.json.tmp").write_text(progress.to_json())
        os.replace(tmp / "progress.json.tmp", tmp / "progress.json")  # its presence marks a complete state
        shutil.rmtree(old, ignore_errors=True)  # left by a kill after an earlier swap
        if last.exists():
            last.rename(old)
        tmp.rename(last)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def find_state(accelerator: Accelerator, run_dir: Path, cfg: TrainConfig, resume: bool) -> Progress | None:
    """The checked progress.json to continue from (--resume, or resume: auto when there is one), or None for a new
    run. --resume without a complete state is refused, never silently a new run."""
    last = run_dir / "last"
    if accelerator.is_main_process and (resume or cfg.resume == "auto"):
        for candidate in (run_dir / "last.tmp", run_dir / "last.old"):  # finish a swap a kill cut short, newest first
            if not (last / "progress.json").is_file() and (candidate / "progress.json").is_file():
                shutil.rmtree(last, ignore_errors=True)
                candidate.rename(last)
    accelerator.wait_for_everyone()
    if not (resume or (cfg.resume == "auto" and (last / "progress.json").is_file())):
        return None
    if not (last / "progress.json").is_file():
        if held := held_files(run_dir):  # checkpoints of a run stopped before its first state was saved
            raise UserError(f"--resume: no complete saved state in {last}: {cannot_continue(run_dir, held)}")
        raise UserError(f"--resume: no complete saved state in {last}; start without --resume")
    return check_state(last)


def check_state(last: Path) -> Progress:
    """Every file of a saved state checked before anything reads it (kd/train/state_files.py); its progress.json."""
    check_files(last)
    return Progress.from_json((last / "progress.json").read_text(), last)


def load_state(
    accelerator: Accelerator, run_dir: Path, progress: Progress, cfg: TrainConfig, scheduler, ema: ModelEmaV3 | None
) -> None:
    """Load <run_dir>/last into the prepared objects. A changed max_epochs rebuilds the LR schedule at the step
    reached (the LR jumps to the new schedule's value there); fewer than already trained is refused."""
    if cfg.max_epochs < progress.epoch:
        raise UserError(
            f"--resume: the saved run has already trained {progress.epoch} epochs, more than max_epochs="
            f"{cfg.max_epochs}; set max_epochs >= {progress.epoch} (or its former {progress.max_epochs})"
        )
    reschedule = progress.max_epochs != cfg.max_epochs
    last = run_dir / "last"
    try:
        with without_custom_pickles(last) as folder:
            accelerator.load_state(str(folder))
    except (RuntimeError, KeyError, ValueError, OSError, safetensors.SafetensorError) as e:
        detail = str(e).strip().splitlines()[0][:300]
        raise UserError(
            f"cannot resume from {last}: the saved state does not fit the model and optimizer this run builds "
            f"({detail}). It was saved by another model or configuration: resume with the config it was made with "
            f"({run_dir / 'config.yaml'}), or start a new run with another checkpoint_dir."
        ) from None
    # states saved before kd wrote its own files: Accelerate's custom pickles, registered scheduler first, then EMA
    legacy = {"scheduler": last / "custom_checkpoint_0.pkl", "ema": last / "custom_checkpoint_1.pkl"}
    if not reschedule:
        if (last / SCHEDULER_FILE).is_file():
            scheduler.load_state_dict(json.loads((last / SCHEDULER_FILE).read_text()))
        elif legacy["scheduler"].is_file():  # checked by check_state: plain data
            scheduler.load_state_dict(accelerate.utils.load(legacy["scheduler"], weights_only=True))
    if ema is not None:
        if (last / EMA_FILE).is_file():
            ema.load_state_dict(safetensors.torch.load_file(str(last / EMA_FILE), device=str(accelerator.device)))
        elif legacy["ema"].is_file():
            ema.load_state_dict(
                accelerate.utils.load(legacy["ema"], map_location=accelerator.device, weights_only=True)
            )
        else:
            raise UserError(f"cannot resume from {last}: it holds no EMA weights, but this run has ema_decay > 0")
    if reschedule:
        scheduler.step_update(progress.updates)
        accelerator.print(
            f"max_epochs {progress.max_epochs} -> {cfg.max_epochs}: the LR schedule is rebuilt for "
            f"{cfg.max_epochs} epochs and continues from optimizer step {progress.updates}"
        )
    progress.max_epochs = cfg.max_epochs
    accelerator.print(f"resumed from {last} at epoch {progress.epoch}, batch {progress.batches_done}")


@contextlib.contextmanager
def without_custom_pickles(last: Path) -> Iterator[Path]:
    """`last`, or a folder of links to all but its custom_checkpoint_N.pkl (earlier kd versions): Accelerate refuses
    more of them than objects registered (kd registers none) and would unpickle them with code execution allowed."""
    legacy = [p for p in last.iterdir() if re.fullmatch(r"custom_checkpoint_\d+\.pkl", p.name)]
    if not legacy:
        yield last
        return
    with tempfile.TemporaryDirectory(prefix="kd-state-") as view:
        for item in last.iterdir():
            if item not in legacy:
                (Path(view) / item.name).symlink_to(item.resolve())
        yield Path(view)


def last_position(run_dir: Path) -> tuple[int, int] | None:
    """(epoch, batch) of the state a resume would continue from (`find_state`'s choice), for messages."""
    for folder in STATE_DIRS:  # a save interrupted between its renames leaves the latter two
        if (run_dir / folder / "progress.json").is_file():
            saved = json.loads((run_dir / folder / "progress.json").read_text())
            return saved["epoch"], saved["batches_done"]
    return None


@contextlib.contextmanager
def explain_interrupt(accelerator: Accelerator, run_dir: Path) -> Iterator[None]:
    """Ctrl-C: one line saying how to continue and exit status 130, not a stack dump (other processes: quietly)."""
    try:
        yield
    except KeyboardInterrupt:
        if not accelerator.is_main_process:
            raise SystemExit(Interrupted.exit_code) from None
        if position := last_position(run_dir):
            how = f"continue with --resume from the last saved state, {run_dir / 'last'} (epoch {position[0]}, batch "
            how += f"{position[1]})"
        elif held := held_files(run_dir):
            how = cannot_continue(run_dir, held)
        else:
            how = "no state was saved yet: run the same command again (without --resume)"
        raise Interrupted(f"interrupted; {how}") from None


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_launcher() -> None:
    """Under a launcher (LOCAL_RANK set), on Linux: SIGTERM to this process when the launcher dies, however it dies
    (kill -9 included); a rank left without it would train on at full CPU, unseen. The state is saved atomically,
    so a rank stopped mid-save leaves the previous one."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if launcher == 1 or os.getppid() != launcher:  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def explain_lost_peers(accelerator: Accelerator, run_dir: Path) -> Iterator[None]:
    """With several processes, one line saying how to continue when another dies (seen as a failed collective or
    the launcher's SIGTERM), instead of a stack dump; the launcher's report says which rank died."""
    if accelerator.num_processes == 1:
        yield
        return
    launcher = os.getppid()

    def message() -> str:
        position = last_position(run_dir)
        where = (
            f"the last saved state, {run_dir / 'last'} (epoch {position[0]}, batch {position[1]}), "
            "with the same command and --resume"
            if position
            else "the start: no state was saved yet, so run the same command again (without --resume)"
        )
        cause = (
            "another process of this run ended first (the launcher's report names it under 'Root Cause')"
            if os.getppid() == launcher
            else "its launcher (accelerate launch, torchrun) is gone"  # `stop_with_launcher`'s SIGTERM
        )
        process = f"process {accelerator.process_index} of {accelerator.num_processes}"
        return f"{process} stopped: {cause}. Continue from {where}."

    def on_sigterm(signum, frame) -> None:
        print(f"error: {message()}", file=sys.stderr, flush=True)
        os._exit(2)  # at once: the launcher kills what is still running after a grace period

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except RuntimeError as e:  # DistError is one; the others in gloo's and NCCL's wordings
        if not (isinstance(e, torch.distributed.DistError) or any(m in str(e) for m in LOST_PEER_MESSAGES)):
            raise
        # Said here, with the handler still in place: once the exception leaves this block, the launcher's SIGTERM
        # (sent when it sees the dead rank) would kill this process before a top-level handler could print.
        print(f"error: {message()}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
