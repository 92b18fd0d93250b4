"""Export a student checkpoint for deployment, and prove every exported file agrees with PyTorch.

    python export.py --checkpoint checkpoints/student/best.safetensors --out exports/student.onnx \
        [--config configs/b0.yaml] [--int8] [--atol 1e-3] [--min-agreement 0.9]

Writes a single self-contained ONNX file (dynamic batch, weights embedded), with --int8 also an INT8 TorchScript
model (PyTorch FX static quantization, per-channel weights, activations calibrated on training images). Each format
is checked against the PyTorch model on real validation images (random inputs without --config): max |logit
difference|, top-1 agreement, accuracy, file size and batch-1 latency, printed and written to export_report.json.
An fp32 file past --atol, or an INT8 file below --min-agreement, fails loudly and is renamed *.rejected. Classes,
input size and normalization travel in the ONNX metadata and a sidecar <out>.json.
"""

import argparse
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table

from kd.config import load_config
from kd.data import checkpoint_loader, prepare_data
from kd.errors import UserError, exit_on_user_error
from kd.models import input_keys, load_checkpoint
from kd.qat import quantize_int8


def export_onnx(model: torch.nn.Module, meta: dict, path: Path, opset: int = 18) -> Path:
    """Dynamo-export with a dynamic batch dimension; weights embedded (no .onnx.data); metadata attached."""
    size = meta["image_size"]
    example = torch.randn(2, 3, size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            opset_version=opset,
            input_names=["rgb"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    proto = onnx.load(str(path))
    for key in ("classes", "image_size", "mean", "std"):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(meta[key])
    onnx.save(proto, str(path))
    return path


def export_int8(model: torch.nn.Module, calibration: list[torch.Tensor], path: Path) -> Path:
    """INT8 TorchScript via FX static quantization, loadable with torch.jit.load and no kd code."""
    int8 = quantize_int8(model, calibration)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(int8, calibration[0][:1]), str(path))
    return path


def compare(reference: Callable, candidate: Callable, batches: list[dict]) -> dict:
    """Max |logit difference|, top-1 agreement and (with labels) accuracy of `candidate` against `reference`."""
    max_diff, agree, correct, total = 0.0, 0, 0, 0
    for batch in batches:
        expected, got = reference(batch["rgb"]), candidate(batch["rgb"])
        max_diff = max(max_diff, float(np.abs(got - expected).max()))
        agree += int((got.argmax(1) == expected.argmax(1)).sum())
        correct += int((got.argmax(1) == batch["label"].numpy()).sum()) if "label" in batch else 0
        total += batch["rgb"].shape[0]
    labelled = all("label" in b for b in batches)
    return {
        "max_abs_diff": max_diff,
        "top1_agreement": agree / total,
        "samples": total,
        "accuracy": correct / total if labelled else None,
    }


def latency_ms(run: Callable, example: torch.Tensor, warmup: int = 10, runs: int = 50) -> float:
    """Median batch-1 latency over `runs` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        run(example)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(example)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def torch_runner(module: torch.nn.Module) -> Callable:
    def run(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return module(x).float().numpy()

    return run


def onnx_runner(path: Path) -> Callable:
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same thread budget as PyTorch
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"rgb": x.numpy()})[0]


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="student checkpoint (.safetensors + .json)")
    parser.add_argument("--out", default="exports/student.onnx", help="ONNX path; other files go beside it")
    parser.add_argument("--config", help="config whose data section gives validation images for the check")
    parser.add_argument("--split", default="val", help="split used for the parity and accuracy check")
    parser.add_argument("--int8", action="store_true", help="also write an INT8 TorchScript model")
    parser.add_argument("--calibration-images", type=int, default=256, help="training images for INT8 ranges")
    parser.add_argument("--atol", type=float, default=1e-3, help="largest allowed |logit difference| (fp32)")
    parser.add_argument("--min-agreement", type=float, default=0.9, help="smallest INT8 top-1 agreement")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--max-batches", type=int, default=8, help="batches of 32 images used for the check")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = parser.parse_intermixed_args(argv)

    model, meta = load_checkpoint(args.checkpoint)
    if input_keys(model) != ("rgb",):
        raise UserError(
            f"{args.checkpoint} is a {meta['arch']['name']} model with inputs {meta['inputs']}; "
            "export.py exports RGB students (distill.py or train_teacher.py with a timm model)"
        )
    model.eval()
    size, out = meta["image_size"], Path(args.out)
    if args.config:
        cfg = load_config(args.config, args.overrides)
        prepare_data(cfg.data)
        batches = [b for b, _ in zip(checkpoint_loader(cfg.data, meta, args.split, 32), range(args.max_batches))]
        calibration_loader = checkpoint_loader(cfg.data, meta, "train", 32)
        calibration = [b["rgb"] for b, _ in zip(calibration_loader, range(-(-args.calibration_images // 32)))]
    else:
        generator = torch.Generator().manual_seed(0)
        batches = [{"rgb": torch.randn(8, 3, size, size, generator=generator)} for _ in range(2)]
        calibration = [torch.randn(8, 3, size, size, generator=generator) for _ in range(4)]

    checkpoint_file = Path(args.checkpoint).with_suffix(".safetensors")
    formats = {"pytorch fp32": (checkpoint_file, torch_runner(model), None)}
    formats["onnx fp32"] = (export_onnx(model, meta, out, args.opset), None, args.atol)
    if args.int8:
        int8_path = export_int8(model, calibration, out.with_name(out.stem + "_int8.pt"))
        formats["pytorch int8"] = (int8_path, torch_runner(torch.jit.load(str(int8_path))), None)
    reference = formats["pytorch fp32"][1]
    rows, failures = {}, []
    for name, (path, run, atol) in formats.items():
        run = run or onnx_runner(path)
        row = {"file": str(path), "size_mb": os.path.getsize(path) / 2**20, **compare(reference, run, batches)}
        row["latency_ms"] = latency_ms(run, batches[0]["rgb"][:1])
        rows[name] = row
        too_far = atol is not None and row["max_abs_diff"] > atol
        if too_far or ("int8" in name and row["top1_agreement"] < args.min_agreement):
            rejected = Path(str(path) + ".rejected")
            Path(path).rename(rejected)
            failures.append(
                f"{name}: max |diff| {row['max_abs_diff']:.2e}, top-1 agreement "
                f"{row['top1_agreement']:.3f}; moved to {rejected}, do not ship it"
            )

    report = {
        "checkpoint": args.checkpoint,
        "opset": args.opset,
        "threads": torch.get_num_threads(),
        "split": args.split if args.config else "random inputs",
        "formats": rows,
    }
    sidecar = {k: meta[k] for k in ("classes", "image_size", "mean", "std", "arch")}
    sidecar.update(input="rgb: float32 N×3×H×W, normalized", output="logits: float32 N×classes")
    out.with_suffix(".json").write_text(json.dumps({**sidecar, "export": report}, indent=2))
    (out.parent / "export_report.json").write_text(json.dumps(report, indent=2))
    table = Table(
        "format",
        "file",
        "MB",
        "latency (ms)",
        "accuracy",
        "top-1 agreement",
        "max |diff|",
        title=f"export check on {report['split']} ({rows['pytorch fp32']['samples']} images), "
        f"batch-1 latency on CPU, {report['threads']} threads",
    )
    for name, r in rows.items():
        accuracy = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
        table.add_row(
            name,
            Path(r["file"]).name,
            f"{r['size_mb']:.1f}",
            f"{r['latency_ms']:.2f}",
            accuracy,
            f"{r['top1_agreement']:.3f}",
            f"{r['max_abs_diff']:.1e}",
        )
    Console(width=max(120, Console().width)).print(table)
    if failures:
        raise UserError("exported model(s) do not match PyTorch:\n  " + "\n  ".join(failures))
    print(f"wrote {out} (opset {args.opset}) and {out.parent / 'export_report.json'}; onnxruntime matches PyTorch")
    return report


if __name__ == "__main__":
    main()
