"""Folder checks, made before the work they would otherwise cut short: a run's checkpoint folder (writable, not a
teacher's, not another run's) and the output folders of evaluate.py and export.py (writable)."""

import os
from pathlib import Path

from kd.errors import UserError, quote
from kd.models.checkpoint import checkpoint_stem


def _write_probe(folder: Path) -> OSError | None:
    """Create `folder` and write (then delete) a probe file there; the error that stopped it, if any."""
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return e
    return None


def ensure_writable(run_dir: str | Path) -> None:
    """Create `run_dir` and write a probe file there, so a run that could not save fails before it trains."""
    error = _write_probe(Path(run_dir))
    if error:
        raise UserError(
            f"cannot write to the run directory {run_dir} ({error.strerror or error}); point checkpoint_dir at a "
            "folder you can write to"
        )


def require_writable_folder(folder: str | Path, flag: str) -> None:
    """Create `folder` and write a probe file in it, so output that could not be saved fails before minutes of
    work, not after."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag}: {quote(str(folder))} is a file, not a folder; give {flag} another path")
    error = _write_probe(folder)
    if error:
        raise UserError(
            f"{flag}: cannot write to the folder {quote(str(folder))} ({error.strerror or error}); give {flag} a "
            "folder you can write to"
        )


def claim_run_dir(run_dir: Path, resume: bool, auto_resume: bool, teachers: tuple | list = ()) -> None:
    """Make sure this run may write into `run_dir`, before anything is trained or written there.

    The folder must be writable, must not be a teacher's folder (the student's best.safetensors would replace the
    teacher's), and must not hold another run's checkpoints unless this run continues it: two runs never mix.
    """
    ensure_writable(run_dir)
    for teacher in teachers:
        if checkpoint_stem(teacher).parent.resolve() == run_dir.resolve():
            raise UserError(
                f"checkpoint_dir {run_dir} is the folder of teacher {teacher}: this run's checkpoints would replace "
                "the teacher's. Set distillation.checkpoint_dir to another folder."
            )
    resumable = any((run_dir / d / "progress.json").is_file() for d in ("last", "last.tmp", "last.old"))
    if resume or (auto_resume and resumable):
        return  # fit continues the run that is there (and says so when there is none to continue)
    held = sorted(p.name for p in run_dir.iterdir() if p.suffix == ".safetensors" or p.name.startswith("last"))
    if held:
        listed = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise UserError(
            f"{run_dir} already holds a run ({listed}). Continue it with --resume (or resume=auto), or set "
            "checkpoint_dir to another folder (or delete this one): kd never mixes two runs in one folder."
        )
