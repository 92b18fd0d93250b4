"""Teacher cache, after FKD (Shen & Xing, ECCV 2022): the teacher's top-k logits for every (sample, epoch) training
view, computed once (kd/distill/cache_build.py), then read here instead of running the teacher. Augmentation is
seeded per (seed, epoch, sample), so a view's row, its loader key e * N + sample, is the view the teacher saw.
A row: top-k logits (fp16), their indices (int16, or int32 past 32,767 classes), log Σ exp of the rest (fp16); the
rest's mass is spread uniformly over the other classes (FKD's choice) when the logits are rebuilt.
"""

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset

from kd.config import DistillationConfig
from kd.errors import UserError
from kd.models.checkpoint import CheckpointMeta, checkpoint_stem, file_kind

FORMAT = 1
# what in a teacher checkpoint's metadata changes its logits on a view, beside the weights
TEACHER_FIELDS = ("arch", "classes", "inputs", "image_size", "mean", "std", "ms_mean", "ms_std", "ms_bands")
ARRAYS = ("values", "indices", "log_rest")


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_applies(d: DistillationConfig) -> None:
    """The cache holds the teachers' final logits: nothing that changes or is read inside them during training."""
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
    if d.mixup_alpha > 0 or d.cutmix_alpha > 0:
        raise UserError(
            "distillation.teacher_cache holds the teacher's logits on each unmixed view, and Mixup / CutMix mix "
            "a new pair of views at every step: set distillation.mixup_alpha=0 and distillation.cutmix_alpha=0 to "
            "distil from the cache, or distillation.teacher_cache='' to run the teachers online on the mixed views"
        )


def rebuild_command(argv: Sequence[str]) -> str:
    return " ".join(["python distill.py", *(a for a in argv if a != "--resume"), "--cache-teacher"])


def cache_key(
    teachers: list[dict],
    metas: list[CheckpointMeta],
    dataset: Dataset,
    data_root: str,
    teacher_inputs: list[dict],
    top_k: int,
) -> dict:
    """Everything the cached logits depend on, as plain JSON data. Keys of options that are off are left out, so
    caches built before the options existed stay valid."""
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
            **{name: getattr(transform, name) for name in ("image_size", "mean", "std", "hflip", "vflip")},
            "scale": list(transform.scale),
            **({"randaugment": transform.randaugment} if transform.randaugment else {}),
            "pixels": transform.pixels,  # how a view's pixels are made from a file
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
    """(top-k logits, their class indices, log Σ exp over the other classes: -inf when k >= classes)."""
    logits = logits.float()
    values, indices = logits.topk(min(k, logits.shape[1]), dim=1)
    rest = logits.scatter(1, indices, float("-inf"))
    log_rest = rest.logsumexp(1)  # log-sum-exp in fp32, then stored: no cancellation as 1 - Σ top-k p would have
    index_dtype = torch.int16 if logits.shape[1] <= torch.iinfo(torch.int16).max else torch.int32
    return values.half(), indices.to(index_dtype), log_rest.half()


def reconstruct_logits(
    values: torch.Tensor, indices: torch.Tensor, log_rest: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """B×C logits: the top-k in place, each other class log(rest mass / (C - k))."""
    values = values.float()
    batch, k = values.shape
    fill = log_rest.float() - math.log(num_classes - k) if k < num_classes else values.new_zeros(batch)
    return fill[:, None].repeat(1, num_classes).scatter_(1, indices.long(), values)


def bytes_per_row(k: int, num_classes: int) -> int:
    return k * (2 + (2 if num_classes <= torch.iinfo(torch.int16).max else 4)) + 2


def _leaves(value, name: str = ""):
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
    index_dtype = np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32
    layout = {"values": ((rows, k), np.float16), "indices": ((rows, k), index_dtype), "log_rest": ((rows,), np.float16)}
    return {name: (shape, np.dtype(dtype)) for name, (shape, dtype) in layout.items()}


def meta_problem(meta: Any) -> str | None:
    """What makes a parsed meta.json unusable (its counts lay out the arrays); None when it is fine."""
    if not (isinstance(meta, dict) and isinstance(meta.get("key"), dict)):
        return "it holds no cache key"
    key = meta["key"]
    count = key["samples"].get("count") if isinstance(key.get("samples"), dict) else None
    numbers = {"epochs": meta.get("epochs"), "samples": meta.get("samples"), "key.samples.count": count}
    numbers |= {"key.top_k": key.get("top_k"), "key.num_classes": key.get("num_classes")}
    bad = [name for name, v in numbers.items() if not (isinstance(v, int) and not isinstance(v, bool) and v > 0)]
    if bad:
        return f"{', '.join(bad)} must be positive integers"
    if meta["samples"] != count:
        return f"samples is {meta['samples']}, but key.samples.count is {count}"
    return None


def read_cache_meta(path: Path) -> tuple[dict | None, str | None]:
    if not (path / "meta.json").is_file():
        return None, "there is none"
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not JSON, or not text at all
        return None, f"not valid JSON: {e}"
    problem = meta_problem(meta)
    return (None, problem) if problem else (meta, None)


def _npy_header(file: Path) -> tuple[tuple, np.dtype, int]:
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with open(file, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in readers:
            raise ValueError(f"its .npy format version {version} is not 1.0 or 2.0")
        shape, _, dtype = readers[version](f)
        return shape, dtype, f.tell()


def array_problem(file: Path, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """What is wrong with the .npy `file`, from its header and size alone: a 200-byte file may claim 93 GiB (or
    hold pickled objects)."""
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
    """A built cache, memory-mapped (it may exceed RAM), every file checked when opened."""

    def __init__(self, path: str | Path, rebuild: str = "python distill.py <its arguments> --cache-teacher"):
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
        """The cache at `path` if built for exactly this `key` and at least `epochs` epochs; else a UserError."""
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
        rows = keys.cpu().numpy()
        values, indices, log_rest = (torch.from_numpy(a[rows]) for a in (self.values, self.indices, self.log_rest))
        return reconstruct_logits(values, indices, log_rest, self.num_classes).to(keys.device, non_blocking=True)
