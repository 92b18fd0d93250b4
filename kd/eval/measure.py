"""How fast and how lean a model runs: latency, throughput, and peak memory in a fresh process."""

import gc
import math
import multiprocessing
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kd.deploy.inference import LoadedModel, load_model
from kd.errors import UserError


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def latency_ms(
    calls: dict[str, Callable[[], object]], warmup: int = 10, runs: int = 50, device: str = "cpu"
) -> dict[str, dict]:
    """Median and 90th percentile (ms) of `runs` timed calls of each entry after `warmup` untimed ones, timed until
    the GPU has finished. Every round calls each entry once, so a burst of machine load hits them all alike."""
    times = {name: [] for name in calls}
    for round_ in range(warmup + runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            _sync(device)
            if round_ >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: {"median": statistics.median(t), "p90": statistics.quantiles(t, n=10)[-1] if len(t) > 1 else t[0]}
        for name, t in times.items()
    }


def throughput(model: LoadedModel, inputs: list[torch.Tensor], batch: int = 64, runs: int = 5) -> float:
    """Images per second at batch size `batch` (the first images repeated), over `runs` calls after 2 warm-up calls."""
    inputs = [torch.cat([x] * math.ceil(batch / len(x)))[:batch].to(model.device) for x in inputs]
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
    """CPU: the memory cost (MiB) of loading and running the model (batch 1) in a fresh spawned process: its peak
    RSS (VmHWM, reset after loading with /proc/self/clear_refs so loading transients do not count; else getrusage's
    ru_maxrss) minus its RSS after imports."""
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
