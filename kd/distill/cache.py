"""Teacher cache, after FKD (Shen & Xing, "A Fast Knowledge Distillation Framework", ECCV 2022): the teacher's
top-k logits for every (sample, epoch) training view, computed once and then read instead of running the teacher.

Augmentation is seeded per (seed, epoch, sample) (kd.data.dataset.LeafDataset), so the view the student trains on at
epoch e is the view the teacher saw when the cache was built. A view's row is its loader key, e * N + sample.

Each row holds the top-k logits (fp16, descending), their class indices (int16; int32 past 32,767 classes) and
log Σ exp(logit) over the other classes (fp16): 4k + 2 bytes per sample per epoch (6k + 2 with int32 indices).
`reconstruct_logits` puts the top-k logits back in place and gives every other class the log-mean-exp of the rest,
so at T = 1 the top-k probabilities are the teacher's and the remaining mass is spread uniformly over the other
classes (FKD's choice); every soft loss (KL, DKD, DIST) and temperature works on the result. With k >= classes it
is the teacher's logits, up to fp16 rounding.
"""

import errno
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from accelerate import Accelerator
from numpy.lib.format import open_memmap
from rich.progress import track
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kd.config import DistillationConfig
from kd.errors import UserError, quote
from kd.models.checkpoint import CheckpointMeta, checkpoint_stem, file_kind

FORMAT = 1
# what in a teacher checkpoint's metadata changes its logits on a view, beside the weights
TEACHER_FIELDS = ("arch", "classes", "inputs", "image_size", "mean", "std", "ms_mean", "ms_std", "ms_bands")
ARRAYS = ("values", "indices", "log_rest")
# every file a build writes, meta.json last: the only files a rebuild ever deletes
CACHE_FILES = (*(f"{name}.npy" for name in ARRAYS), "meta.json")
NEW_FOLDER = "pick an empty or new folder, e.g. distillation.teacher_cache=cache/<name>"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_applies(d: DistillationConfig) -> None:
    """The cache holds the teachers' final logits, nothing that changes or is read inside them during training."""
    if d.feature_matching and d.feature_layers:
        raise UserError(
            "distillation.teacher_cache holds logits only, and feature matching needs the teacher's features at "
            "every step: set distillation.feature_matching=false to distil logits from the cache, or "
            "distillation.teacher_cache='' to run the teacher online"
        )
    if d.ema_teacher_weight > 0:
        raise UserError(
            "distillation.teacher_cache cannot include the EMA teacher (it changes every step): set "
            "distillation.ema_teacher_weight=0, or distillation.teacher_cache='' to run the teachers online"
        )
    if getattr(d, "mixup_alpha", 0) > 0 or getattr(d, "cutmix_alpha", 0) > 0:
        raise UserError(
            "distillation.teacher_cache holds the teacher's logits on each unmixed view, and Mixup / CutMix mix "
            "a new pair of views at every step: set distillation.mixup_alpha=0 and distillation.cutmix_alpha=0 to "
            "distil from the cache, or distillation.teacher_cache='' to run the teachers online on the mixed views"
        )


def rebuild_command(argv: Sequence[str]) -> str:
    """The command that builds the cache a distill.py run with arguments `argv` reads (told when it is refused)."""
    return " ".join(["python distill.py", *(a for a in argv if a != "--resume"), "--cache-teacher"])


def cache_key(
    teachers: list[dict],
    metas: list[CheckpointMeta],
    dataset: Dataset,
    data_root: str,
    teacher_inputs: list[dict],
    top_k: int,
) -> dict:
    """Everything the cached logits depend on, as plain JSON data: the teachers (weights hash, ensemble weight,
    inputs, classes, MS statistics), the augmentation as the training loader applies it (seed, view size,
    normalization, flips, crop scale, RandAugment, the version of the pixel pipeline, torch versions), the training
    samples (paths, labels, file sizes; unlabelled images too, label -1) and k. Keys of options that are off are left
    out, so caches built before the options existed stay valid."""
    transform = dataset.transform
    files = hashlib.sha256()
    for path, label in dataset.samples:
        files.update(f"{os.path.relpath(path, data_root)}\t{label}\t{os.path.getsize(path)}\n".encode())
    classes = metas[0].classes
    unlabeled = sum(label < 0 for _, label in dataset.samples)
    key = {
        "format": FORMAT,
        "teachers": [
            {
                "weights_sha256": file_sha256(checkpoint_stem(t["checkpoint"]).with_suffix(".safetensors")),
                "weight": float(t.get("weight", 1.0)),
                **{f: m.to_json()[f] for f in TEACHER_FIELDS},
            }
            for t, m in zip(teachers, metas)
        ],
        "teacher_inputs": teacher_inputs,
        "augmentation": {
            "seed": dataset.augment_seed,
            "image_size": transform.image_size,
            "mean": transform.mean,
            "std": transform.std,
            "hflip": transform.hflip,
            "vflip": transform.vflip,
            "scale": list(transform.scale),
            **({"randaugment": transform.randaugment} if getattr(transform, "randaugment", "") else {}),
            "pixels": getattr(transform, "pixels", 1),  # how a view's pixels are made from a file (kd.data.dataset)
            # the random draws and the resizing kernels that make a view are theirs
            "libraries": {"torch": torch.__version__, "torchvision": torchvision.__version__},
        },
        "samples": {"count": len(dataset.samples), "sha256": files.hexdigest()}
        | ({"unlabeled": unlabeled} if unlabeled else {}),
        "top_k": min(top_k, len(classes)),
        "num_classes": len(classes),
    }
    return json.loads(json.dumps(key))  # tuples -> lists, as they come back from meta.json


def top_k_rows(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k logits fp16, their class indices, log Σ exp over the other classes fp16; -inf when k >= classes)."""
    logits = logits.float()
    values, indices = logits.topk(min(k, logits.shape[1]), dim=1)
    rest = logits.scatter(1, indices, float("-inf"))
    log_rest = rest.logsumexp(1)  # log-sum-exp in fp32, then stored: no cancellation as 1 - Σ top-k p would have
    index_dtype = torch.int16 if logits.shape[1] <= torch.iinfo(torch.int16).max else torch.int32
    return values.half(), indices.to(index_dtype), log_rest.half()


def reconstruct_logits(
    values: torch.Tensor, indices: torch.Tensor, log_rest: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """B×C logits: the top-k in place, each other class log(rest mass / (C - k)), i.e. the rest spread uniformly."""
    values = values.float()
    batch, k = values.shape
    fill = log_rest.float() - math.log(num_classes - k) if k < num_classes else values.new_zeros(batch)
    return fill[:, None].repeat(1, num_classes).scatter_(1, indices.long(), values)


def bytes_per_row(k: int, num_classes: int) -> int:
    """Disk bytes per (sample, epoch): k fp16 values + k indices + one fp16 log rest mass."""
    return k * (2 + (2 if num_classes <= torch.iinfo(torch.int16).max else 4)) + 2


def _leaves(value, name: str = ""):
    """(dotted name, value) of every leaf of nested dicts and lists of dicts."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{name}.{k}" if name else k)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{name}[{i}]")
    else:
        yield name, value


def describe_difference(cached: dict, key: dict, limit: int = 5) -> str:
    """The first `limit` entries of the key that differ, with the cache's value and this run's."""
    ours, theirs = dict(_leaves(key)), dict(_leaves(cached))
    names = [n for n in {**theirs, **ours} if ours.get(n) != theirs.get(n)]
    shown = [f"{n}: cache {theirs.get(n)!r}, this run {ours.get(n)!r}" for n in names[:limit]]
    return "; ".join(shown) + (f"; and {len(names) - limit} more" if len(names) > limit else "")


def array_layout(rows: int, k: int, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of the cache's three arrays (see top_k_rows)."""
    index_dtype = np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32
    layout = {"values": ((rows, k), np.float16), "indices": ((rows, k), index_dtype), "log_rest": ((rows,), np.float16)}
    return {name: (shape, np.dtype(dtype)) for name, (shape, dtype) in layout.items()}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def meta_problem(meta: Any) -> str | None:
    """What makes a parsed meta.json unusable as a cache's (its counts lay out the arrays); None when it is fine."""
    if not (isinstance(meta, dict) and isinstance(meta.get("key"), dict)):
        return "it holds no cache key"
    key = meta["key"]
    count = key["samples"].get("count") if isinstance(key.get("samples"), dict) else None
    numbers = {"epochs": meta.get("epochs"), "samples": meta.get("samples"), "key.samples.count": count}
    numbers |= {"key.top_k": key.get("top_k"), "key.num_classes": key.get("num_classes")}
    bad = [name for name, value in numbers.items() if not _is_count(value)]
    if bad:
        return f"{', '.join(bad)} must be positive integers"
    if meta["samples"] != count:
        return f"samples is {meta['samples']}, but key.samples.count is {count}"
    return None


def read_cache_meta(path: Path) -> tuple[dict | None, str | None]:
    """(the parsed <path>/meta.json, None), or (None, what is wrong with it)."""
    if not (path / "meta.json").is_file():
        return None, "there is none"
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not JSON, or not text at all
        return None, f"not valid JSON: {e}"
    problem = meta_problem(meta)
    return (None, problem) if problem else (meta, None)


def _npy_header(file: Path) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, data offset) from a .npy header, reading nothing past it. ValueError for a foreign file."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with open(file, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in readers:
            raise ValueError(f"its .npy format version {version} is not 1.0 or 2.0")
        shape, _, dtype = readers[version](f)
        return shape, dtype, f.tell()


def array_problem(file: Path, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """What is wrong with the .npy `file` for an array of `shape` and `dtype`, from its header and size alone: the
    data is never read, as a 200-byte file may claim 93 GiB (or hold pickled objects)."""
    if kind := file_kind(file):  # never opened: a FIFO would block
        return f"it is {kind}, not a regular file"
    if not file.exists():
        return "it is missing"
    try:
        found_shape, found_dtype, offset = _npy_header(file)
    except (OSError, ValueError, SyntaxError) as e:  # SyntaxError: a header that is not a Python literal
        return f"it is not a readable .npy file ({e})"
    if found_dtype != dtype:
        return f"it holds {found_dtype} values, not {dtype}"
    claimed, size = offset + math.prod(found_shape) * found_dtype.itemsize, file.stat().st_size
    if size < claimed:
        return f"its header claims {claimed:,} bytes, but the file holds {size:,}: it was cut short"
    if tuple(found_shape) != tuple(shape):
        return f"its shape is {tuple(found_shape)}, not {tuple(shape)}"
    return None


class TeacherCache:
    """A built cache, memory-mapped: rows are read from disk as batches ask for them, so it may exceed RAM."""

    def __init__(self, path: str | Path, rebuild: str = "python distill.py <its arguments> --cache-teacher"):
        """Opens every file, checked: a damaged one is a UserError naming it and giving the `rebuild` command."""
        self.path = Path(path)
        self.meta = self._meta(self.path, rebuild)
        key = self.meta["key"]
        self.num_classes, self.epochs = key["num_classes"], self.meta["epochs"]
        layout = array_layout(self.epochs * self.meta["samples"], key["top_k"], self.num_classes)
        for name, (shape, dtype) in layout.items():
            file = self.path / f"{name}.npy"
            if problem := array_problem(file, shape, dtype):
                laid_out = f"{self.meta['samples']} samples x {self.epochs} epochs, top-{key['top_k']}"
                raise UserError(
                    f"teacher cache file {file} is damaged: {problem} (meta.json: {laid_out}). "
                    f"Rebuild the cache with:\n  {rebuild}"
                )
        self.values, self.indices, self.log_rest = (
            np.load(self.path / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in ARRAYS
        )

    @staticmethod
    def _meta(path: Path, rebuild: str) -> dict:
        meta, problem = read_cache_meta(path)
        if problem:  # a rebuild deletes only a folder its meta.json proves to be a cache's: this one is not
            raise UserError(
                f"teacher cache file {path / 'meta.json'} is damaged ({problem}): delete the folder {path} and "
                f"rebuild the cache with:\n  {rebuild}"
            )
        return meta

    @classmethod
    def open(cls, path: str | Path, key: dict, epochs: int, rebuild: str) -> "TeacherCache":
        """The cache at `path` if it was built for exactly this `key` and at least `epochs` epochs, all its files
        whole; else a UserError that says why and gives the `rebuild` command. A stale cache is never used."""
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise UserError(f"teacher cache {path} not found (or its build was cut short); build it with:\n  {rebuild}")
        meta = cls._meta(path, rebuild)
        if meta["key"] != key:
            raise UserError(
                f"teacher cache {path} was built for another teacher, augmentation, seed, data or k, so its logits "
                f"are not this run's targets ({describe_difference(meta['key'], key)}). Rebuild it with:\n"
                f"  {rebuild}\nor point distillation.teacher_cache at a new folder."
            )
        if meta["epochs"] < epochs:
            raise UserError(
                f"teacher cache {path} holds {meta['epochs']} epochs of views, but distillation.max_epochs={epochs}. "
                f"Rebuild it with:\n  {rebuild}"
            )
        return cls(path, rebuild)

    def logits(self, keys: torch.Tensor) -> torch.Tensor:
        """Reconstructed teacher logits (float32, on the keys' device) for the views with these loader keys."""
        rows = keys.cpu().numpy()
        values, indices, log_rest = (torch.from_numpy(a[rows]) for a in (self.values, self.indices, self.log_rest))
        return reconstruct_logits(values, indices, log_rest, self.num_classes).to(keys.device, non_blocking=True)


class CachedTeacher(nn.Module):
    """The cache as a teacher for the Distiller: it takes the batch's loader keys and returns the cached logits."""

    input_keys = ("key",)

    def __init__(self, cache: TeacherCache):
        super().__init__()
        self.cache = cache

    def forward(self, key: torch.Tensor) -> torch.Tensor:
        return self.cache.logits(key)


def is_current(path: Path, key: dict, epochs: int) -> bool:
    meta, _ = read_cache_meta(path) if (path / "meta.json").is_file() else (None, None)
    return meta is not None and meta["key"] == key and meta["epochs"] >= epochs


def _foreign(folder: Path) -> list[str]:
    """What in `folder` a build did not write: other names, and folders under the cache's file names."""
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.name not in CACHE_FILES or (entry.is_dir() and not entry.is_symlink())
    )


def check_target(path: Path, tmp: Path) -> None:
    """Refuse to build into `path` (or its staging folder `tmp`) unless all it holds is a cache: a rebuild replaces
    the folder, and it must never delete a teacher's run folder or anything else that was there (issue 21)."""
    for folder in (path, tmp):
        if not folder.exists():
            continue
        if not folder.is_dir():
            kind = file_kind(folder) or "a file"
            raise UserError(f"distillation.teacher_cache: {folder} is {kind}, not a folder: {NEW_FOLDER}")
        if foreign := _foreign(folder):
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
    """Delete a cache's own files (meta.json first: a half-deleted cache is never taken for a whole one), then
    the folder, which check_target found to hold nothing else."""
    if folder.is_dir():
        for name in reversed(CACHE_FILES):
            (folder / name).unlink(missing_ok=True)
        folder.rmdir()


def _free_bytes(folder: Path) -> int:
    """Free disk space where `folder` is (or will be made)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_space(tmp: Path, needed: int) -> None:
    """Refuse a build the disk cannot hold: the arrays are memory-mapped, and a write past a full disk kills the
    process with SIGBUS ("Bus error") instead of raising an error."""
    reclaimed = sum((tmp / n).stat().st_size for n in CACHE_FILES if (tmp / n).is_file()) if tmp.is_dir() else 0
    free = _free_bytes(tmp) + reclaimed
    if free < needed:
        raise UserError(
            f"not enough free disk space for the teacher cache in {tmp.parent}: it needs {needed:,} bytes, "
            f"{free:,} are free. Free some space, or point distillation.teacher_cache at another disk "
            "(or lower distillation.teacher_cache_top_k or max_epochs)"
        )


def _create_arrays(tmp: Path, layout: dict) -> None:
    """The empty memory-mapped arrays, their disk blocks reserved now: a disk that fills up while the teacher runs
    then fails here with an OSError, not later with SIGBUS."""
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
    """Run `teacher_logits` once on every (sample, epoch) view of `dataset` and store the top-k rows at `path`.

    Each process computes every num_processes-th row into shared memory-mapped files (one machine, or a shared
    file system); the build goes to <path>.tmp and is renamed when complete, so a killed build is never read.
    An existing cache with the same key and enough epochs is kept as it is. A folder holding anything but a cache
    is refused, never emptied; so is a disk without room for the cache.
    """
    path = Path(path)
    if is_current(path, key, epochs):
        accelerator.print(f"teacher cache {path} is up to date ({key['top_k']} logits x {epochs} epochs)")
        return path
    tmp, rows, k = path.with_name(path.name + ".tmp"), epochs * len(dataset), key["top_k"]
    layout = array_layout(rows, k, key["num_classes"])
    needed = rows * bytes_per_row(k, key["num_classes"])
    check_target(path, tmp)  # on every process, before any waits: a refusal stops them all
    check_space(tmp, needed)
    try:
        _build(accelerator, path, tmp, key, teacher_logits, dataset, layout, epochs, batch_size, num_workers)
    except OSError as e:  # a disk that filled up meanwhile, a quota, a read-only folder
        raise UserError(
            f"could not write the teacher cache in {tmp} ({e.strerror or e}); it needs {needed:,} bytes there: free "
            "some space or point distillation.teacher_cache at another disk"
        ) from None
    return path


def _build(
    accelerator: Accelerator,
    path: Path,
    tmp: Path,
    key: dict,
    teacher_logits: Callable[[dict], torch.Tensor],
    dataset: Dataset,
    layout: dict,
    epochs: int,
    batch_size: int,
    num_workers: int,
) -> None:
    rows, k = epochs * len(dataset), key["top_k"]
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
