"""Checkpoints: <stem>.safetensors (weights, no pickle) + <stem>.json (CheckpointMeta, flat, as kd always wrote it;
a file without schema_version was written before the key existed), written and read here only."""

import json
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from kd.data.dataset import InputSpec
from kd.errors import UserError
from kd.models.meta_checks import SCHEMA_VERSION, arch_problems, meta_problems, refuse
from kd.models.zoo import build_model

CHECKPOINT_SUFFIXES = (".safetensors", ".json", ".ckpt", ".pt", ".pth")
EXPORT_KEYS = ("classes", "image_size", "mean", "std")  # what an exported RGB model needs beside its graph
RANGE_PREFIX = "qat."  # keys of a QAT run's INT8 ranges (kd/deploy/qat.py range_state), beside the float weights


@dataclass
class CheckpointMeta:
    """What rebuilds a checkpoint's model and feeds it, and how it was trained. An exported file's metadata is one
    too: RGB, maybe without arch."""

    arch: dict | None  # kd.models.zoo.build_model's spec: {"name": timm name or "hybrid", "num_classes", ...}
    classes: list[str]  # in the order of the model's logits
    input_spec: InputSpec
    teachers: list[str] = field(default_factory=list)  # the checkpoints a student was distilled from
    epoch: int | None = None  # kd.train.loop.fit fills these four in every checkpoint it saves
    metrics: dict | None = None
    ema: bool = False  # the weights are the EMA's
    qat: bool = False  # trained quantization-aware; its INT8 ranges are in the .safetensors (checkpoint_ranges)

    @property
    def inputs(self) -> list[str]:
        return ["rgb", "ms"] if self.input_spec.with_ms else ["rgb"]

    def to_json(self, exported: bool = False) -> dict:
        """The flat layout on disk; `exported`: only what an exported RGB model's sidecar holds."""
        spec = self.input_spec
        flat = {"schema_version": SCHEMA_VERSION, "arch": self.arch, "classes": self.classes, "inputs": self.inputs}
        flat |= {"image_size": spec.image_size, "mean": list(spec.mean), "std": list(spec.std)}
        if exported:
            return {k: v for k, v in flat.items() if k != "inputs"}
        flat |= {"ms_mean": spec.ms_mean, "ms_std": spec.ms_std, "ms_bands": spec.ms_bands, "teachers": self.teachers}
        return flat | {"epoch": self.epoch, "metrics": self.metrics, "ema": self.ema, "qat": self.qat}

    @classmethod
    def from_json(cls, data: Any, path: str | Path, exported: bool = False) -> "CheckpointMeta":
        """Checked: one UserError lists everything wrong with it."""
        refuse(path, meta_problems(data, exported), exported)
        ms = {}
        if "ms" in data["inputs"]:  # a file's MS statistics count only for a model that reads MS
            # teachers from before data.ms_bands existed do not record it: they read every band
            ms = {"ms_mean": data["ms_mean"], "ms_std": data["ms_std"], "ms_bands": data.get("ms_bands") or []}
        spec = InputSpec(data["image_size"], data["mean"], data["std"], **ms)
        return cls(
            arch=data.get("arch"),
            classes=data["classes"],
            input_spec=spec,
            teachers=data.get("teachers") or [],
            epoch=data.get("epoch"),
            metrics=data.get("metrics"),
            ema=bool(data.get("ema")),
            qat=bool(data.get("qat")),
        )


def checkpoint_stem(path: str | Path) -> Path:
    """'runs/x/best', 'runs/x/best.safetensors', 'runs/x/best.ckpt' -> Path('runs/x/best'); a folder -> folder/best."""
    path = Path(path)
    if path.is_dir():
        return path / "best"
    return path.with_suffix("") if path.suffix in CHECKPOINT_SUFFIXES else path


def _publish(files: dict[Path, Callable[[Path], None]]) -> None:
    """Write every file to <name>.tmp first, then rename them into place in the given order: a kill mid-write leaves
    the old files, never a half-written one, and the renames are the only window between the files."""
    tmps = {path: path.with_name(path.name + ".tmp") for path in files}
    try:
        for path, write in files.items():
            write(tmps[path])
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    except (OSError, safetensors.SafetensorError) as e:  # safetensors wraps its I/O errors (disk full...)
        raise UserError(f"could not write {path} ({e}); the previous {path.name}, if any, is kept") from None
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)  # what a failed write left; nothing after the renames


def save_checkpoint(
    path: str | Path, model: nn.Module | Mapping[str, torch.Tensor], meta: CheckpointMeta, extra: dict | None = None
) -> Path:
    """`model`: the module, or its whole state dict (gathered from the shards under FSDP); `extra` tensors (a QAT
    run's ranges, under "qat.") are stored beside the weights. The .json is renamed into place before the weights, so
    that weights never appear without their metadata (a run killed in its first save leaves at most a .json, which
    load_checkpoint reports as an unfinished save)."""
    stem = checkpoint_stem(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    state = model if isinstance(model, Mapping) else model.state_dict()
    weights = {k: v.detach().cpu().contiguous() for k, v in {**state, **(extra or {})}.items()}
    _publish(
        {
            stem.with_suffix(".json"): lambda p: p.write_text(json.dumps(meta.to_json(), indent=2)),
            stem.with_suffix(".safetensors"): lambda p: safetensors.torch.save_file(weights, str(p)),
        }
    )
    return stem.with_suffix(".safetensors")


def read_meta(path: str | Path) -> CheckpointMeta:
    meta_path, data = _read_json(path)
    return CheckpointMeta.from_json(data, meta_path)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, CheckpointMeta]:
    """(model, meta), loaded strictly. The arch is first built on the meta device and checked against the shapes in
    the safetensors header: a 700-byte .json whose arch claims 10^8 bands is refused before anything is allocated."""
    meta_path, data = _read_json(path)
    problems, shapes = meta_problems(data), None
    if isinstance(data, dict) and not arch_problems(data.get("arch")):  # the model builder has its own say
        try:
            shapes = _unallocated_shapes(data["arch"])
        except UserError as e:  # an unknown timm name or argument
            problems.append(f"arch: {e}")
    refuse(meta_path, problems)  # every problem in one message, the builder's included
    meta = CheckpointMeta.from_json(data, meta_path)
    stem = checkpoint_stem(path)
    misfit = f"weights in {stem}.safetensors do not fit architecture {meta.arch} from {stem}.json"
    if shapes is not None:
        _check_shapes(shapes, _read_safetensors(stem, _header_shapes), misfit)
    model = build_model(meta.arch)
    weights = _read_safetensors(stem, safetensors.torch.load_file)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # same names, other shapes: another width, class count or band count
        raise UserError(f"{misfit}: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise UserError(f"{misfit}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model, meta


def _unallocated_shapes(arch: dict) -> dict[str, list[int]] | None:
    """None for a model whose construction reads tensor values: it is then checked by loading."""
    try:
        with torch.device("meta"):
            model = build_model(arch)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):  # e.g. .item() of a meta tensor
        return None
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _header_shapes(file: str) -> dict[str, list[int]]:
    with safetensors.safe_open(file, "pt") as f:  # safetensors checks the header against the file's size
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def _read_safetensors(stem: Path, read) -> dict:
    """read(<stem>.safetensors) without the QAT ranges (see checkpoint_ranges); a damaged file is a UserError."""
    try:
        found = read(str(stem.with_suffix(".safetensors")))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise UserError(
            f"cannot read weights {stem}.safetensors ({e}); the file is damaged or not safetensors"
        ) from None
    return {k: v for k, v in found.items() if not k.startswith(RANGE_PREFIX)}


def _check_shapes(expected: dict[str, list[int]], stored: dict[str, list[int]], misfit: str) -> None:
    missing, unexpected = [k for k in expected if k not in stored], [k for k in stored if k not in expected]
    if missing or unexpected:
        raise UserError(f"{misfit}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, shape in expected.items():
        if stored[name] != shape:  # worded as torch words it, which load_state_dict said here before
            raise UserError(
                f"{misfit}: size mismatch for {name}: copying a param with shape {torch.Size(stored[name])} from "
                f"checkpoint, the shape in current model is {torch.Size(shape)}."
            )


def checkpoint_ranges(path: str | Path) -> dict[str, torch.Tensor]:
    """The INT8 ranges a QAT run learned (kd/deploy/qat.py `range_state`); {} without QAT."""
    read_meta(path)  # a missing or foreign checkpoint: the message that says so
    with safetensors.safe_open(str(checkpoint_stem(path).with_suffix(".safetensors")), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(RANGE_PREFIX)}


FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def file_kind(path: str | Path) -> str | None:
    """What `path` is when it exists but is not a regular file; None otherwise. Only stat looks: opening a FIFO
    would wait for a writer forever."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # missing, unreadable parent, a NUL in the name
        return None
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in FILE_KINDS if test(mode)), "not a regular file")


def _read_json(path: str | Path) -> tuple[Path, Any]:
    stem = checkpoint_stem(path)
    meta_path = stem.with_suffix(".json")
    if not stem.with_suffix(".safetensors").is_file() or not meta_path.is_file():
        given = [Path(path)] if Path(path).suffix in CHECKPOINT_SUFFIXES else []
        for candidate in [*given, stem.with_suffix(".safetensors"), meta_path]:
            if kind := file_kind(candidate):
                raise UserError(
                    f"checkpoint file {candidate} is {kind}, not a regular file: point at the <stem>.safetensors "
                    "and <stem>.json files a run wrote, e.g. runs/<name>/best.safetensors"
                )
        if meta_path.is_file():  # save_checkpoint renames the .json first: its weights never arrived
            raise UserError(
                f"checkpoint {path} is unfinished: {meta_path} is there but not {stem}.safetensors (the run was "
                "stopped while saving it). Continue the run with --resume to write it again, or point at another file"
            )
        suffix = Path(path).suffix
        hint = f" kd reads {suffix} paths as their <stem>.safetensors + <stem>.json pair and found neither."
        hint = hint if suffix in (".ckpt", ".pt", ".pth") else ""
        raise UserError(
            f"checkpoint {path} not found: expected {stem}.safetensors and {stem}.json.{hint} "
            "Train one first, e.g. `python train_teacher.py --config configs/teacher.yaml`."
        )
    try:
        return meta_path, json.loads(meta_path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not JSON, or not text at all
        raise UserError(f"checkpoint metadata {meta_path} is not valid JSON ({e}); the file is damaged") from None
