"""Folder checks made before the work they would cut short: a run's folder (writable, not a teacher's, not another
run's, not in use now) and the output folders of evaluate.py and export.py (writable, not inside a run's files)."""

import fcntl
import functools
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from kd.errors import UserError, quote


def _write_probe(folder: Path) -> OSError | None:
    """Create `folder` and write (then delete) a probe file there, so that output that could not be saved fails
    before the work, not after; the error that stopped it."""
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return e
    return None


def ensure_writable(run_dir: str | Path) -> None:
    if error := _write_probe(Path(run_dir)):
        raise UserError(
            f"cannot write to the run directory {run_dir} ({error.strerror or error}); point checkpoint_dir at a "
            "folder you can write to"
        )


def require_writable_folder(folder: str | Path, flag: str) -> None:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag}: {quote(str(folder))} is a file, not a folder; give {flag} another path")
    if error := _write_probe(folder):
        raise UserError(
            f"{flag}: cannot write to the folder {quote(str(folder))} ({error.strerror or error}); give {flag} a "
            "folder you can write to"
        )


LOCK_FILE = ".lock"  # held with flock by a run's main process while it runs; holds that process's id
STATE_DIRS = ("last", "last.tmp", "last.old")  # a run's resumable state, and the two names a save passes through
RUN_FILES = ("config.yaml", LOCK_FILE)  # besides checkpoints and states (progress.json lives in last/), a run's own
_held: dict[Path, int] = {}  # run folder -> file descriptor of its lock, for the run folders this process holds


def lock_run_dir(run_dir: Path) -> None:
    """An exclusive flock on <run_dir>/.lock, released when the process ends however it ends (kill -9 included), or
    by `releases_run_dirs`; another run holding it is refused with its process id."""
    key = run_dir.resolve()
    if key in _held:
        return
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(
            f"{run_dir} is in use by another run (process {pid}): wait for it to end, or set checkpoint_dir to "
            "another folder; two runs never write into one folder at once"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd


def releases_run_dirs(main: Callable) -> Callable:
    """A script's main() releases the run folders it locked when it ends (tests and notebooks run several)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        finally:
            while _held:
                os.close(_held.popitem()[1])  # closing the file releases its flock

    return wrapper


def listed(names: list[str]) -> str:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def cannot_continue(run_dir: Path, held: list[str]) -> str:
    return (
        f"{run_dir} holds a run ({listed(held)}) that saved no complete resumable state (it was stopped before its "
        f"first save finished), so it cannot be continued: set checkpoint_dir to another folder, or delete {run_dir} "
        "and run the same command again"
    )


def held_files(run_dir: Path) -> list[str]:
    """What in `run_dir` a run wrote that another run would mix with: checkpoints and resumable states."""
    if not run_dir.is_dir():
        return []
    held = [p for p in run_dir.iterdir() if p.suffix == ".safetensors" or p.name.startswith("last")]
    return sorted(p.name for p in held if not unfinished_save(p))


def unfinished_save(folder: Path) -> bool:
    """A last.tmp without progress.json: a save that a kill cut short, from which no state can be recovered."""
    return folder.name == "last.tmp" and folder.is_dir() and not (folder / "progress.json").is_file()


def claim_run_dir(run_dir: Path, resume: bool, auto_resume: bool, teachers: tuple | list = ()) -> None:
    """Make sure this run may write into `run_dir` before anything is written there: writable, not a teacher's
    folder, not in use by another run now, and no other run's checkpoints unless this run continues it."""
    from kd.models.checkpoint import checkpoint_stem  # here: the scripts' --help imports this module, not torch

    # the main process holds the lock: `accelerate launch` and torchrun give every process its RANK (and LOCAL_RANK)
    main_rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"
    ensure_writable(run_dir)
    for teacher in teachers:
        if checkpoint_stem(teacher).parent.resolve() == run_dir.resolve():
            raise UserError(
                f"checkpoint_dir {run_dir} is the folder of teacher {teacher}: this run's checkpoints would replace "
                "the teacher's. Set distillation.checkpoint_dir to another folder."
            )
    if main_rank:
        lock_run_dir(run_dir)
    resumable = any((run_dir / d / "progress.json").is_file() for d in STATE_DIRS)
    if resume or (auto_resume and resumable):
        return  # fit continues the run that is there (and says so when there is none to continue)
    held = held_files(run_dir)
    if held and not resumable:
        raise UserError(cannot_continue(run_dir, held))
    if held:
        raise UserError(
            f"{run_dir} already holds a run ({listed(held)}). Continue it with --resume (or resume=auto), or set "
            "checkpoint_dir to another folder (or delete this one): kd never mixes two runs in one folder."
        )
    if main_rank and unfinished_save(run_dir / "last.tmp"):  # all a kill during the first save leaves: no state
        shutil.rmtree(run_dir / "last.tmp")


def owned_by_a_run(path: Path) -> Path | None:
    """The run's own file or folder that writing `path` would change: a state, the TensorBoard logs or a run file."""
    path = path.absolute()
    for folder in path.parents:
        if folder.name in (*STATE_DIRS, "tb") and is_run_folder(folder.parent):
            return folder
    return path if path.name in RUN_FILES and is_run_folder(path.parent) else None


def is_run_folder(folder: Path) -> bool:
    return any((folder / d).is_dir() for d in STATE_DIRS) or any((folder / f).is_file() for f in RUN_FILES)
