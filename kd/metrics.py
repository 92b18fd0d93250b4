"""What evaluate.py measures, and how.

1. Metrics: pure functions of a logit matrix (N×K) and labels (N), each stating its formula.
2. Models: one interface over kd checkpoints, ONNX files (onnxruntime), TorchScript and TFLite files.
3. Speed and memory: batch-1 latency, throughput, peak memory in a fresh process.
4. Corruptions: gaussian noise, gaussian blur, brightness, JPEG at severities 1..3, on un-normalized images.
5. Plots (PIL only): confusion matrix, reliability diagram, per-class accuracy.
6. Runs of one recipe: mean ± std.
"""

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

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw, ImageFont

from kd.errors import UserError
from kd.models import build_model, checkpoint_stem, count_parameters, load_checkpoint

ECE_BINS = 15

# ------------------------------------------------------------------------------------------------------ 1. metrics


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Top-k accuracy = (1/N) Σ_i [y_i ∈ the k largest logits of sample i]."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1).double().mean().item()


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """C[i, j] = number of samples of true class i predicted as class j (K×K, int64)."""
    k = logits.shape[1]
    return torch.bincount(labels * k + logits.argmax(1), minlength=k * k).reshape(k, k)


def per_class_accuracy(confusion: torch.Tensor) -> list[float | None]:
    """Accuracy (recall) of class c = C[c, c] / Σ_j C[c, j]; None for a class without samples."""
    support = confusion.sum(1)
    return [(confusion[c, c] / support[c]).item() if support[c] else None for c in range(len(support))]


def macro_f1(confusion: torch.Tensor) -> float:
    """Mean over classes of F1_c = 2·TP_c / (2·TP_c + FP_c + FN_c).

    Classes that neither occur nor are predicted are left out of the mean (their F1 is 0/0); a class that occurs but
    is never predicted counts with F1 = 0.
    """
    tp = confusion.diag().double()
    denominator = confusion.sum(0) + confusion.sum(1)  # (TP + FP) + (TP + FN) = 2·TP + FP + FN
    seen = denominator > 0
    return (2 * tp[seen] / denominator[seen]).mean().item()


def calibration_bins(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[dict]:
    """Confidence (max softmax) split into `bins` equal-width bins ((b-1)/B, b/B]: count, mean confidence, accuracy."""
    confidence, predicted = logits.double().softmax(1).max(1)
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    correct = (predicted == labels).double()
    out = []
    for b in range(bins):
        chosen = index == b
        n = int(chosen.sum())
        out.append(
            {
                "lower": b / bins,
                "upper": (b + 1) / bins,
                "count": n,
                "confidence": confidence[chosen].mean().item() if n else None,
                "accuracy": correct[chosen].mean().item() if n else None,
            }
        )
    return out


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE = Σ_b (n_b / N) · |accuracy_b − mean confidence_b| over `bins` equal-width confidence bins (default 15)."""
    table = calibration_bins(logits, labels, bins)
    n = sum(b["count"] for b in table)
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in table if b["count"])


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Top-1 agreement = (1/N) Σ_i [argmax logits_i = argmax reference_i] (the same samples in the same order)."""
    return (logits.argmax(1) == reference.argmax(1)).double().mean().item()


def kl_divergence(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> float:
    """KL(teacher || model) = (1/N) Σ_i Σ_c p_ic (log p_ic − log q_ic), p = softmax(teacher/T), q = softmax(logits/T).

    Summed over classes and averaged over samples ("batchmean"), as the distillation loss (without its T² factor).
    """
    log_q = F.log_softmax(logits.double() / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits.double() / temperature, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True).item()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None) -> dict:
    """Everything the table reports about predictions. Top-5 is None with 5 classes or fewer (it would be 100%)."""
    confusion = confusion_matrix(logits, labels)
    return {
        "top1": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, 5) if logits.shape[1] > 5 else None,
        "macro_f1": macro_f1(confusion),
        "ece": expected_calibration_error(logits, labels),
        "teacher_agreement": agreement(logits, teacher) if teacher is not None else None,
        "teacher_kl": kl_divergence(logits, teacher) if teacher is not None else None,
        "confusion": confusion.tolist(),
        "calibration": calibration_bins(logits, labels),
    }


# ------------------------------------------------------------------------------------------------------- 2. models


@dataclass
class LoadedModel:
    """A model of any format behind one call: run(*inputs) -> logits, inputs on CPU in `meta["inputs"]` order."""

    run: Callable[..., torch.Tensor]
    meta: dict  # classes, image_size, mean, std, inputs (+ arch, MS statistics for checkpoints)
    kind: str  # checkpoint (PyTorch) | onnx (onnxruntime) | torchscript | tflite (LiteRT)
    device: str  # where it runs: exported files always on the CPU
    params: int | None  # of the architecture (exported files: rebuilt from the sidecar's arch)
    weights_mb: float  # checkpoint: parameters + buffers; ONNX: initializers; TorchScript: the file
    file_mb: float


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


def _export_meta(path: Path, found: dict, sidecar: Path, meta_file: str | None) -> dict:
    """Classes and preprocessing of an exported file: its own metadata, else the sidecar .json, else --meta."""
    meta = dict(found)
    for source in (sidecar, Path(meta_file) if meta_file else None):
        if source is not None and source.is_file():
            meta = {**json.loads(source.read_text()), **meta}
    missing = [k for k in ("classes", "image_size", "mean", "std") if meta.get(k) is None]
    if missing:
        raise UserError(
            f"{path} lacks {missing}: put export.py's sidecar {sidecar.name} beside it, or pass --meta with a JSON "
            "file holding classes, image_size, mean and std"
        )
    return {**meta, "inputs": ["rgb"]}


def _arch_parameters(meta: dict) -> int | None:
    try:
        return count_parameters(build_model(meta["arch"])) if "arch" in meta else None
    except Exception:  # an architecture this timm does not know: leave the count out
        return None


def _load_exported(path: Path, meta_file: str | None) -> LoadedModel:
    from kd import export_formats as fmt  # onnxruntime; TFLite says what to install when it is missing

    found, kind, size = {}, {".onnx": "onnx", ".tflite": "tflite"}.get(path.suffix, "torchscript"), path.stat().st_size
    weights, params = size, None
    if kind == "onnx":  # classes and preprocessing in the file; weights = its initializers
        import onnx

        proto = onnx.load(str(path))
        found = {p.key: json.loads(p.value) for p in proto.metadata_props}
        weights = sum(len(t.raw_data) for t in proto.graph.initializer)
        params = sum(math.prod(t.dims) for t in proto.graph.initializer)
    meta = _export_meta(path, found, fmt.sidecar_path(path), meta_file)
    run_numpy = fmt.runner(path)
    return LoadedModel(
        lambda rgb: torch.from_numpy(run_numpy(rgb.cpu())),
        meta,
        kind,
        "cpu",
        _arch_parameters(meta) or params,
        weights / 2**20,
        size / 2**20,
    )


# ------------------------------------------------------------------------------------------- 3. speed and memory


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


# --------------------------------------------------------------------------------------------------- 4. corruptions

# Severities 1..3 of each corruption. Noise, brightness and JPEG take ImageNet-C's values (Hendrycks & Dietterich,
# 2019); the blur sigma is ImageNet-C's at 224 px, scaled to the image size (sigma · size / 224).
CORRUPTIONS = {
    "gaussian_noise": (0.08, 0.12, 0.18),  # standard deviation of the added noise, image in [0, 1]
    "gaussian_blur": (1.0, 2.0, 3.0),  # sigma in pixels at 224 px
    "brightness": (0.1, 0.2, 0.3),  # added to every channel (ImageNet-C adds it to the HSV value), then clipped
    "jpeg": (80, 65, 58),  # JPEG quality
}


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Apply corruption `name` at `severity` (1..3) to images in [0, 1] (B×3×H×W); the noise is seeded."""
    level = CORRUPTIONS[name][severity - 1]
    if name == "gaussian_noise":
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed * 10 + severity))
        out = images + level * noise
    elif name == "gaussian_blur":
        sigma = level * images.shape[-1] / 224
        out = TF.gaussian_blur(images, [2 * math.ceil(3 * sigma) + 1] * 2, [sigma, sigma])
    elif name == "brightness":
        out = images + level
    else:
        as_bytes = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        out = TF.jpeg(as_bytes, int(level)).float() / 255
    return out.clamp(0, 1)


def corrupt_normalized(rgb: torch.Tensor, meta: dict, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Un-normalize a model's RGB batch with its mean/std, corrupt it, normalize it again."""
    mean, std = (torch.tensor(meta[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    return (corrupt(rgb * std + mean, name, severity, seed) - mean) / std


# --------------------------------------------------------------------------------------------------------- 5. plots


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def confusion_image(confusion: list[list[int]], classes: list[str]) -> Image.Image:
    """Rows: true class, columns: predicted class; shade = share of the row; counts in cells that fit them."""
    k, font = len(classes), _font()
    cell, left, top = max(12, min(40, 480 // k)), 40, 40
    legend = max(font.getbbox(f"{i}: {c}")[2] for i, c in enumerate(classes)) + 20
    image = Image.new("RGB", (left + k * cell + legend, top + k * cell + 10), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 4), "predicted ->", fill="black", font=font)
    draw.text((2, top - 16), "true", fill="black", font=font)
    for i, row in enumerate(confusion):
        total = sum(row) or 1
        draw.text((left - 18, top + i * cell + cell // 2 - 6), str(i), fill="black", font=font)
        draw.text((left + i * cell + cell // 2 - 4, top - 16), str(i), fill="black", font=font)
        for j, count in enumerate(row):
            shade = int(255 * (1 - count / total))
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1)
            draw.rectangle(box, fill=(shade, shade, 255), outline="#ddd")
            if cell >= 24 and count:
                draw.text((box[0] + 3, box[1] + cell // 2 - 6), str(count), fill="black" if shade > 128 else "white")
        draw.text((left + k * cell + 10, top + i * 16), f"{i}: {classes[i]}", fill="black", font=font)
    return image


def reliability_image(calibration: list[dict], ece: float, size: int = 320) -> Image.Image:
    """Accuracy per confidence bin (bars) against the diagonal of perfect calibration."""
    font, pad = _font(), 40
    image = Image.new("RGB", (size + 2 * pad, size + 2 * pad), "white")
    draw = ImageDraw.Draw(image)

    def xy(x: float, y: float) -> tuple[float, float]:
        return pad + x * size, pad + (1 - y) * size

    for b in calibration:
        if b["count"]:
            draw.rectangle((*xy(b["lower"], b["accuracy"]), *xy(b["upper"], 0)), fill="#4a7bd0", outline="white")
    draw.line((*xy(0, 0), *xy(1, 1)), fill="#c33", width=2)
    draw.rectangle((*xy(0, 1), *xy(1, 0)), outline="black")
    for x, y, text in ((-0.06, 1, "1"), (-0.06, 0.03, "0"), (0.98, -0.01, "1")):
        draw.text(xy(x, y), text, fill="black", font=font)
    draw.text((pad, 10), f"reliability: ECE {ece:.3f} ({len(calibration)} bins)", fill="black", font=font)
    draw.text((pad, size + pad + 8), "confidence (max softmax); bars: accuracy per bin", fill="black", font=font)
    return image


def per_class_image(accuracies: list[float | None], classes: list[str], width: int = 300) -> Image.Image:
    """One horizontal bar per class: its accuracy (recall)."""
    font, row = _font(), 20
    left = max(font.getbbox(c)[2] for c in classes) + 12
    image = Image.new("RGB", (left + width + 60, row * len(classes) + 10), "white")
    draw = ImageDraw.Draw(image)
    for i, (name, accuracy) in enumerate(zip(classes, accuracies)):
        y = 5 + i * row
        draw.text((4, y + 3), name, fill="black", font=font)
        if accuracy is not None:
            draw.rectangle((left, y + 2, left + accuracy * width, y + row - 3), fill="#4a7bd0")
        label = "-" if accuracy is None else f"{100 * accuracy:.1f}%"
        draw.text((left + width + 6, y + 3), label, fill="black", font=font)
    return image


def save_plots(out: Path, rows: dict[str, dict]) -> None:
    """The three plots of every row as PNG in <out>/plots, and as images in TensorBoard (<out>/tb)."""
    from torch.utils.tensorboard import SummaryWriter

    (out / "plots").mkdir(parents=True, exist_ok=True)
    with SummaryWriter(str(out / "tb")) as writer:
        for name, r in rows.items():
            classes = list(r["per_class_accuracy"])
            images = {
                "confusion": confusion_image(r["confusion"], classes),
                "reliability": reliability_image(r["calibration"], r["ece"]),
                "per_class": per_class_image(list(r["per_class_accuracy"].values()), classes),
            }
            stem = re.sub(r"[^\w.@-]", "_", name)  # a file name on any system
            for kind, image in images.items():
                image.save(out / "plots" / f"{stem}_{kind}.png")
                writer.add_image(f"{name}/{kind}", np.asarray(image), 0, dataformats="HWC")


# --------------------------------------------------------------------------------------------- 6. runs of a recipe


def mean_std(rows: list[dict]) -> dict:
    """One row for several runs: every number (not bool) of the first row becomes its mean over the runs, with the
    sample standard deviation (n − 1) under row["std"][key]; other fields come from the first. One run: itself."""
    out = {**rows[0], "std": {}, "n": len(rows)}
    if len(rows) == 1:
        return out
    for key, value in rows[0].items():
        values = [r.get(key) for r in rows]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and None not in values:
            out[key] = statistics.fmean(values)
            out["std"][key] = statistics.stdev(values)
    return out
