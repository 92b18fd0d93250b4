"""Building a teacher cache (distill.py --cache-teacher): staged in <cache>.tmp and renamed when whole. A build only
ever deletes files it writes itself, and refuses a disk without room for it."""

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from numpy.lib.format import open_memmap
from rich.progress import track
from torch.utils.data import DataLoader, Dataset

from kd.distill.cache import ARRAYS, array_layout, bytes_per_row, read_cache_meta, top_k_rows
from kd.errors import UserError, quote
from kd.models.checkpoint import file_kind

# every file a build writes, meta.json last: the only files a rebuild ever deletes
CACHE_FILES = (*(f"{name}.npy" for name in ARRAYS), "meta.json")
NEW_FOLDER = "pick an empty or new folder, e.g. distillation.teacher_cache=cache/<name>"


def check_target(path: Path, tmp: Path) -> None:
    """Refuse to build into `path` (or `tmp`) unless all it holds is a cache: a rebuild replaces the folder, and must
    never delete a teacher's run folder or anything else that was there (issue 21)."""
    for folder in (path, tmp):
        if not folder.exists():
            continue
        if not folder.is_dir():
            kind = file_kind(folder) or "a file"
            raise UserError(f"distillation.teacher_cache: {folder} is {kind}, not a folder: {NEW_FOLDER}")
        # what a build did not write: other names, and folders under the cache's file names
        foreign = sorted(
            e.name for e in folder.iterdir() if e.name not in CACHE_FILES or (e.is_dir() and not e.is_symlink())
        )
        if foreign:
            raise UserError(
                f"distillation.teacher_cache: {folder} holds files a teacher cache build did not write "
                f"({quote(foreign)}), and --cache-teacher replaces the folder: {NEW_FOLDER}"
            )
    if path.exists() and any(path.iterdir()):
        _, problem = read_cache_meta(path)  # only its own meta.json proves a folder is a cache's
        if problem:
            raise UserError(
                f"distillation.teacher_cache: {path} holds no valid teacher cache meta.json ({problem}), so its files "
                f"may not be a cache's and --cache-teacher will not delete them: delete the folder yourself if it is "
                f"a damaged cache, or {NEW_FOLDER}"
            )


def _remove_cache(folder: Path) -> None:
    """meta.json goes first: a half-deleted cache is never taken for a whole one."""
    if folder.is_dir():
        for name in reversed(CACHE_FILES):
            (folder / name).unlink(missing_ok=True)
        folder.rmdir()


def check_space(tmp: Path, needed: int) -> None:
    """The arrays are memory-mapped: a write past a full disk kills the process with SIGBUS, raising nothing."""
    reclaimed = sum((tmp / n).stat().st_size for n in CACHE_FILES if (tmp / n).is_file()) if tmp.is_dir() else 0
    existing = tmp
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free + reclaimed
    if free < needed:
        raise UserError(
            f"not enough free disk space for the teacher cache in {tmp.parent}: it needs {needed:,} bytes, "
            f"{free:,} are free. Free some space, or point distillation.teacher_cache at another disk "
            "(or lower distillation.teacher_cache_top_k or max_epochs)"
        )


def _create_arrays(tmp: Path, layout: dict) -> None:
    """Their disk blocks reserved now: a disk that fills up then fails here with an OSError, not later with SIGBUS."""
    for name, (shape, dtype) in layout.items():
        open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()
        with open(tmp / f"{name}.npy", "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            except AttributeError:  # not on macOS or Windows: the free-space check is all there is
                pass
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # a file system that cannot
                    raise


def build_teacher_cache(
    accelerator: Accelerator,
    path: str | Path,
    key: dict,
    teacher_logits: Callable[[dict], torch.Tensor],
    dataset: Dataset,
    epochs: int,
    batch_size: int,
    num_workers: int = 0,
) -> Path:
    """Run `teacher_logits` once on every (sample, epoch) view of `dataset` and store the top-k rows at `path`, each
    process every num_processes-th row (one machine, or a shared file system). A current cache is kept."""
    path = Path(path)
    meta, _ = read_cache_meta(path)
    if meta is not None and meta["key"] == key and meta["epochs"] >= epochs:
        accelerator.print(f"teacher cache {path} is up to date ({key['top_k']} logits x {epochs} epochs)")
        return path
    tmp, rows, k = path.with_name(path.name + ".tmp"), epochs * len(dataset), key["top_k"]
    layout = array_layout(rows, k, key["num_classes"])
    needed = rows * bytes_per_row(k, key["num_classes"])
    check_target(path, tmp)  # on every process, before any waits: a refusal stops them all
    check_space(tmp, needed)
    try:
        if accelerator.is_main_process:
            _remove_cache(tmp)  # what a killed build left
            tmp.mkdir(parents=True)
            _create_arrays(tmp, layout)
        accelerator.wait_for_everyone()
        arrays = {name: np.load(tmp / f"{name}.npy", mmap_mode="r+", allow_pickle=False) for name in layout}
        rank, world = accelerator.process_index, accelerator.num_processes
        loader = DataLoader(dataset, batch_size=batch_size, sampler=range(rank, rows, world), num_workers=num_workers)
        for batch in track(loader, f"caching the teacher ({rows} views)", disable=not accelerator.is_main_process):
            batch = {name: value.to(accelerator.device) for name, value in batch.items()}
            with torch.no_grad(), accelerator.autocast():  # the precision the online teacher would run in
                logits = teacher_logits(batch)
            keys = batch["key"].cpu().numpy()
            for name, part in zip(layout, top_k_rows(logits, k)):
                arrays[name][keys] = part.cpu().numpy()
        for array in arrays.values():
            array.flush()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            meta = {"key": key, "epochs": epochs, "samples": len(dataset), "precision": accelerator.mixed_precision}
            meta["bytes"] = sum((tmp / f"{name}.npy").stat().st_size for name in layout)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))  # written last: its presence marks a whole cache
            _remove_cache(path)  # the stale cache check_target found there, its own files only
            tmp.rename(path)
            accelerator.print(f"teacher cache {path}: {rows} views x top-{k}, {meta['bytes']:,} bytes")
        accelerator.wait_for_everyone()
    except OSError as e:  # a disk that filled up meanwhile, a quota, a read-only folder
        raise UserError(
            f"could not write the teacher cache in {tmp} ({e.strerror or e}); it needs {needed:,} bytes there: free "
            "some space or point distillation.teacher_cache at another disk"
        ) from None
    return path
