"""Every model evaluate.py reads (kd checkpoints, and the files export.py writes) behind one call, with their
metadata and sizes."""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from kd.config import DataConfig
from kd.data.loaders import build_loader
from kd.errors import UserError, quote
from kd.models.checkpoint import (
    CHECKPOINT_SUFFIXES,
    EXPORT_KEYS,
    CheckpointMeta,
    checkpoint_stem,
    file_kind,
    load_checkpoint,
)
from kd.models.hybrid import check_ms_bands
from kd.models.zoo import build_model, count_parameters


@dataclass
class LoadedModel:
    """run(*inputs) -> logits, inputs on CPU in `meta.inputs` order."""

    run: Callable[..., torch.Tensor]
    meta: CheckpointMeta  # exported files: RGB, arch when their sidecar has it
    kind: str  # checkpoint (PyTorch), or the kind of the FORMATS row of an exported file
    device: str  # where it runs: exported files always on the CPU
    params: int | None  # of the architecture (exported files: rebuilt from the sidecar's arch)
    weights_mb: float  # checkpoint: parameters + buffers; ONNX: initializers; TorchScript: the file
    file_mb: float
    module: nn.Module | None = None  # a checkpoint's model; None for exported files

    def to(self, device: str) -> "LoadedModel":
        """A checkpoint's weights move there (use the returned model); exported files always run on the CPU."""
        if self.module is None or device == self.device:
            return self
        return _pytorch_model(self.module.to(device), self.meta, device, self.file_mb)


def load_model(path: str | Path, meta_file: str | None = None, device: str = "cpu") -> LoadedModel:
    """A kd checkpoint (.safetensors + .json), or a file export.py writes."""
    from kd.deploy.formats import FORMATS  # onnxruntime, only for exported files

    path = Path(path)
    exported = path.suffix in {f.suffix for f in FORMATS.values() if f.suffix}  # a timm folder is not read here
    if path.suffix in CHECKPOINT_SUFFIXES:  # .pt: kd reads it as a checkpoint's name unless it is a file of its own
        exported &= path.is_file() and not checkpoint_stem(path).with_suffix(".safetensors").is_file()
    if exported:
        return _load_exported(path, meta_file)
    model, meta = load_checkpoint(path)
    file_mb = checkpoint_stem(path).with_suffix(".safetensors").stat().st_size / 2**20
    return _pytorch_model(model.eval().to(device), meta, device, file_mb)


def _pytorch_model(model: nn.Module, meta: CheckpointMeta, device: str, file_mb: float) -> LoadedModel:
    def run(*inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(*(x.to(device) for x in inputs))

    tensors = list(model.parameters()) + list(model.buffers())
    weights_mb = sum(t.numel() * t.element_size() for t in tensors) / 2**20
    return LoadedModel(run, meta, "checkpoint", device, count_parameters(model), weights_mb, file_mb, model)


def read_json_object(path: Path, what: str) -> dict:
    if kind := file_kind(path):  # never opened: reading a FIFO would wait for a writer forever
        raise UserError(f"{what} {quote(str(path))} is {kind}, not a regular file: pass a JSON file")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what} {quote(str(path))} not found: check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{what} {quote(str(path))} is not valid JSON ({e}); fix or replace the file") from None
    if not isinstance(data, dict):
        raise UserError(
            f"{what} {quote(str(path))} holds a JSON {type(data).__name__}, not an object: write "
            '{"classes": [...], "image_size": 224, "mean": [...], "std": [...]}'
        )
    return data


def _arch_parameters(meta: CheckpointMeta) -> int | None:
    try:
        with torch.device("meta"):  # shapes only: a sidecar's arch may claim sizes nothing could hold
            return count_parameters(build_model(meta.arch)) if meta.arch else None
    except Exception:  # an architecture this timm does not know: leave the count out
        return None


def _load_exported(path: Path, meta_file: str | None) -> LoadedModel:
    from kd.deploy import formats as fmt  # onnxruntime; TFLite says what to install when it is missing

    if kind := file_kind(path):  # never opened: reading a FIFO would wait for a writer forever
        raise UserError(f"model file {quote(str(path))} is {kind}, not a regular file: check the --models path")
    if not path.is_file():
        raise UserError(f"model file {quote(str(path))} not found: check the path given to --models")
    found, row, size = {}, fmt.format_of(path), path.stat().st_size
    weights, params = size, None
    try:
        if row.kind == "onnx":  # classes and preprocessing in the file; weights = its initializers
            import onnx

            proto = onnx.load(str(path))
            found = {p.key: json.loads(p.value) for p in proto.metadata_props if p.key in EXPORT_KEYS}
            weights = sum(len(t.raw_data) for t in proto.graph.initializer)
            params = sum(math.prod(t.dims) for t in proto.graph.initializer)
        run_numpy = row.runner(path)
    except UserError:
        raise
    except Exception as e:  # protobuf, onnxruntime and LiteRT each raise their own types for a damaged file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        article = "an" if row.runtime[0] in "AEIOU" else "a"
        raise UserError(
            f"cannot load {quote(str(path))} as {article} {row.runtime} model ({reason[:300]}): the file is damaged or "
            "not a model export.py writes; export the checkpoint again with export.py"
        ) from None
    sidecar = fmt.sidecar_path(path)  # classes and preprocessing: the file's own, else the sidecar, else --meta
    if sidecar.is_file():
        found = read_json_object(sidecar, "sidecar") | found
    if meta_file:
        found = read_json_object(Path(meta_file), "--meta file") | found
    if missing := [k for k in EXPORT_KEYS if found.get(k) is None]:
        raise UserError(
            f"{path} lacks {missing}: put export.py's sidecar {sidecar.name} beside it, or pass --meta with a JSON "
            "file holding classes, image_size, mean and std"
        )
    meta = CheckpointMeta.from_json({**found, "inputs": ["rgb"]}, path, exported=True)
    params = _arch_parameters(meta) or params
    return LoadedModel(
        lambda rgb: torch.from_numpy(run_numpy(rgb.cpu())), meta, row.kind, "cpu", params, weights / 2**20, size / 2**20
    )


def checkpoint_loader(cfg: DataConfig, meta: CheckpointMeta, split: str, batch_size: int) -> DataLoader:
    """An evaluation loader that feeds a model what it was trained on: its classes, inputs, input size and
    normalization, MS bands and MS statistics, even if the config changed since."""
    loader = build_loader(cfg, meta.input_spec, split, batch_size, train=False, classes=meta.classes)
    check_ms_bands(meta.arch, loader.dataset)
    return loader
