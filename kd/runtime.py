"""Every model evaluate.py reads behind one call (kd checkpoints, ONNX, TorchScript and TFLite files), and how fast
and how lean it runs: batch-1 latency, throughput, peak memory in a fresh process."""

import gc
import json
import math
import multiprocessing
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kd.checkpoint import EXPORT_KEYS, CheckpointMeta, checkpoint_stem, load_checkpoint
from kd.errors import UserError, quote
from kd.models import build_model, count_parameters


@dataclass
class LoadedModel:
    """A model of any format behind one call: run(*inputs) -> logits, inputs on CPU in `meta.inputs` order."""

    run: Callable[..., torch.Tensor]
    meta: CheckpointMeta  # exported files: RGB, arch when their sidecar has it
    kind: str  # checkpoint (PyTorch) | onnx (onnxruntime) | torchscript | tflite (LiteRT)
    device: str  # where it runs: exported files always on the CPU
    params: int | None  # of the architecture (exported files: rebuilt from the sidecar's arch)
    weights_mb: float  # checkpoint: parameters + buffers; ONNX: initializers; TorchScript: the file
    file_mb: float


KIND_NAMES = {"onnx": "an ONNX", "torchscript": "a TorchScript", "tflite": "a TFLite"}


def load_model(path: str | Path, meta_file: str | None = None, device: str = "cpu") -> LoadedModel:
    """A kd checkpoint (.safetensors + .json), or a file export.py writes: ONNX (fp32 or INT8), TorchScript (.pt,
    fp32 or INT8) or TFLite (LiteRT interpreter)."""
    path = Path(path)
    exported = (
        path.suffix == ".pt" and path.is_file() and not checkpoint_stem(path).with_suffix(".safetensors").is_file()
    )
    if exported or path.suffix in (".onnx", ".tflite"):
        return _load_exported(path, meta_file)
    model, meta = load_checkpoint(path)
    model.eval().to(device)
    tensors = list(model.parameters()) + list(model.buffers())

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(*(x.to(device) for x in inputs))

    file_mb = checkpoint_stem(path).with_suffix(".safetensors").stat().st_size / 2**20
    weights_mb = sum(t.numel() * t.element_size() for t in tensors) / 2**20
    return LoadedModel(run, meta, "checkpoint", device, count_parameters(model), weights_mb, file_mb)


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object (a sidecar, a --meta file); anything else is a UserError naming it."""
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


def _export_meta(path: Path, found: dict, sidecar: Path, meta_file: str | None) -> CheckpointMeta:
    """Classes and preprocessing of an exported file: its own metadata, else the sidecar .json, else --meta."""
    meta = dict(found)
    if sidecar.is_file():
        meta = {**read_json_object(sidecar, "sidecar"), **meta}
    if meta_file:
        meta = {**read_json_object(Path(meta_file), "--meta file"), **meta}
    missing = [k for k in EXPORT_KEYS if meta.get(k) is None]
    if missing:
        raise UserError(
            f"{path} lacks {missing}: put export.py's sidecar {sidecar.name} beside it, or pass --meta with a JSON "
            "file holding classes, image_size, mean and std"
        )
    return CheckpointMeta.from_json({**meta, "inputs": ["rgb"]}, path, exported=True)


def _arch_parameters(meta: CheckpointMeta) -> int | None:
    try:
        return count_parameters(build_model(meta.arch)) if meta.arch else None
    except Exception:  # an architecture this timm does not know: leave the count out
        return None


def _load_exported(path: Path, meta_file: str | None) -> LoadedModel:
    from kd import export_formats as fmt  # onnxruntime; TFLite says what to install when it is missing

    if not path.is_file():
        raise UserError(f"model file {quote(str(path))} not found: check the path given to --models")
    found, kind, size = {}, {".onnx": "onnx", ".tflite": "tflite"}.get(path.suffix, "torchscript"), path.stat().st_size
    weights, params = size, None
    try:
        if kind == "onnx":  # classes and preprocessing in the file; weights = its initializers
            import onnx

            proto = onnx.load(str(path))
            found = {p.key: json.loads(p.value) for p in proto.metadata_props if p.key in EXPORT_KEYS}
            weights = sum(len(t.raw_data) for t in proto.graph.initializer)
            params = sum(math.prod(t.dims) for t in proto.graph.initializer)
        run_numpy = fmt.runner(path)
    except UserError:
        raise
    except Exception as e:  # protobuf, onnxruntime and LiteRT each raise their own types for a damaged file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot load {quote(str(path))} as {KIND_NAMES[kind]} model ({reason[:300]}): the file is damaged or "
            "not a model export.py writes; export the checkpoint again with export.py"
        ) from None
    meta = _export_meta(path, found, fmt.sidecar_path(path), meta_file)
    return LoadedModel(
        lambda rgb: torch.from_numpy(run_numpy(rgb.cpu())),
        meta,
        kind,
        "cpu",
        _arch_parameters(meta) or params,
        weights / 2**20,
        size / 2**20,
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def latency_ms(model: LoadedModel, inputs: list[torch.Tensor], warmup: int = 10, runs: int = 50) -> dict:
    """Batch-1 latency in ms: `warmup` untimed calls, then the median and 90th percentile of `runs` timed ones."""
    inputs = [x[:1].to(model.device) for x in inputs]
    for _ in range(warmup):
        model.run(*inputs)
    _sync(model.device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model.run(*inputs)
        _sync(model.device)
        times.append((time.perf_counter() - start) * 1e3)
    p90 = statistics.quantiles(times, n=10)[-1] if runs > 1 else times[0]
    return {"median": statistics.median(times), "p90": p90}


def throughput(model: LoadedModel, inputs: list[torch.Tensor], batch: int = 64, runs: int = 5) -> float:
    """Images per second at batch size `batch` (the first images repeated), over `runs` calls after 2 warm-up calls."""
    inputs = [torch.cat([x] * math.ceil(batch / len(x)))[:batch] for x in inputs]
    inputs = [x.to(model.device) for x in inputs]
    for _ in range(2):
        model.run(*inputs)
    _sync(model.device)
    start = time.perf_counter()
    for _ in range(runs):
        model.run(*inputs)
    _sync(model.device)
    return batch * runs / (time.perf_counter() - start)


def cuda_peak_memory_mb(model: LoadedModel, inputs: list[torch.Tensor]) -> float:
    """GPU: torch.cuda.max_memory_allocated over a batch-1 call (the weights already on the GPU included)."""
    torch.cuda.reset_peak_memory_stats()
    model.run(*(x[:1] for x in inputs))
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


PEAK_MEMORY_METHOD = (
    "peak RSS of a fresh process during batch-1 inference, minus its RSS after imports (weights, activations and "
    "runtime buffers)"
)


def peak_memory_mb(path: str, meta_file: str | None, shapes: list[tuple[int, ...]]) -> float:
    """CPU: load and run the model (batch 1) in a fresh spawned process and return its memory cost, in MiB.

    The child measures its RSS after imports, loads the model, returns freed memory to the OS (malloc_trim), resets
    the peak-RSS mark (Linux /proc/self/clear_refs, so loading transients are not counted) and runs 3 calls; the
    answer is the peak RSS (VmHWM) minus that baseline. Without /proc it falls back to getrusage's ru_maxrss.
    """
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(
        target=_memory_child, args=(str(path), meta_file, shapes, torch.get_num_threads(), send), daemon=True
    )
    child.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        result = "the measuring process died"
    child.join()
    if isinstance(result, str):
        raise UserError(f"could not measure the peak memory of {path} ({result}); --memory weights skips it")
    return result


def _status_mb(field: str) -> float | None:
    try:
        return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return None


def _maxrss_mb() -> float:
    import resource  # Unix only

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def _memory_child(path: str, meta_file: str | None, shapes: list, threads: int, send) -> None:
    try:
        import onnxruntime  # noqa: F401 (imported before the baseline, like torch and timm)

        torch.set_num_threads(threads)
        gc.collect()
        baseline = _status_mb("VmRSS") or _maxrss_mb()
        model = load_model(path, meta_file)
        gc.collect()
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            reset = True
        except OSError:
            reset = False
        inputs = [torch.zeros(shape) for shape in shapes]
        for _ in range(3):
            model.run(*inputs)
        peak = _status_mb("VmHWM") if reset else None
        send.send((peak or _maxrss_mb()) - baseline)
    except Exception as e:  # report, do not hang the parent
        send.send(f"{type(e).__name__}: {e}")
