"""Compare models on a data split: the table users quote, and what stands behind it.

    python evaluate.py --config configs/b0.yaml --models teacher=checkpoints/teacher/best.safetensors \
        distilled=checkpoints/student/best.safetensors baseline=checkpoints/baseline/best.safetensors \
        onnx=exports/student.onnx int8=exports/student_int8_static.onnx [--corruptions] [--out results]

The data comes from --config's data section, or with --demo from the built-in synthetic demo set (written to
data/demo, about 99 MB, on first use); one of the two is required. section.key=value config overrides may stand
anywhere, after --models too.

Models are name=path pairs: kd checkpoints (teacher or student, RGB or RGB+MS) and the files export.py writes:
ONNX, fp32 or INT8 (run with onnxruntime; classes and normalization from the ONNX metadata or the sidecar .json),
TorchScript (.pt) and TFLite (.tflite, LiteRT interpreter, needs requirements-export.txt) files (metadata from the
sidecar <stem>.json beside them, or --meta). Each model sees the split at its own
image size and normalization; a model that needs MS gets the same images plus their band stacks.

One row per model: parameters, top-1, batch-1 latency (median; p90 too), memory (peak during batch-1 inference by
default; `--memory weights` for the weights alone), then top-5, macro-F1, ECE (15 equal-width bins), top-1 agreement
with and KL(teacher || model) to the teacher (the row named `teacher`, or --teacher; only for models evaluated on the
same samples in the same order), throughput at --throughput-batch, weight and file size, and with --corruptions the
top-1 under gaussian noise, blur, brightness and JPEG (severities 1-3; kd/eval/corruptions.py gives the values).

Runs of one recipe (`distilled@0=… distilled@1=…`, or `--group distilled=a,b,c`) become one row, mean ± std (sample
std over runs). With --last, a checkpoint named best.* whose run also has latest.* gets a second row `<name>:last`.
Rows named teacher, distilled and baseline get the derived lines (parameter reduction, speed-up, memory, accuracy
drop, gain over the baseline, flagged when within run-to-run noise).

Writes <out>/results.json (every run, per-class accuracy, confusion matrix, calibration bins, settings),
<out>/results.md, PNG plots in <out>/plots (confusion matrix, reliability diagram, per-class accuracy), and the same
images to TensorBoard in <out>/tb.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from kd.cli import add_config_arguments, resolve_config
from kd.config import Config
from kd.errors import UserError, exit_on_user_error, quote
from kd.train.run_dir import require_writable_folder

# torch, timm and the kd modules that use them are imported in the functions that run after the command line is
# parsed: --help, --print-config and a misspelled key answer in a fraction of a second, not seconds.
if TYPE_CHECKING:
    import torch

    from kd.deploy.inference import LoadedModel

SECTIONS = {f.name for f in dataclasses.fields(Config)}  # data, model, train, distillation, name, seed


def is_override(item: str) -> bool:
    """Whether a command-line item is a config override (data.root=x) rather than a model (name=path).

    `--models a=x.safetensors data.root=foo` puts the override among the models: a dotted key that starts with a
    config section is never a model name. A bare section key (seed=3, name=b0) is an override unless its value
    looks like a path (name=runs/b0/best.safetensors): a model may well be called `name`.
    """
    key, equals, value = item.partition("=")
    section, dot, _ = key.partition(".")
    if not equals or section not in SECTIONS:
        return False
    return bool(dot) or ("/" not in value and not Path(value).suffix)


def model_list(args) -> list[tuple[str, str, str]]:
    """(name, group, path) for every model; runs of one recipe share a group (NAME@i, or --group NAME=a,b)."""
    from kd.models.checkpoint import checkpoint_stem

    entries = []
    for item in args.models:
        name, _, path = item.partition("=") if "=" in item else ("", "", item)
        name = name or Path(path).parent.name
        entries.append((name, name.split("@")[0], path))
    for item in args.group:
        group, _, paths = item.partition("=")
        entries += [(f"{group}@{i}", group, path) for i, path in enumerate(paths.split(","))]
    if args.last:  # the run's newest weights beside its best ones
        for name, group, path in list(entries):
            latest = checkpoint_stem(path).with_name("latest.safetensors")
            if checkpoint_stem(path).name == "best" and latest.is_file():
                entries.insert(entries.index((name, group, path)) + 1, (f"{name}:last", f"{group}:last", str(latest)))
    names = [e[0] for e in entries]
    if not names:
        raise UserError("no models given: pass --models name=path ... or --group name=path1,path2")
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise UserError(f"two models are named {quote(twice)}; give each its own name=path")
    return entries


def predict(
    model, loader, corruptions: bool, what: str = "predicting"
) -> tuple[torch.Tensor, torch.Tensor, dict, list[torch.Tensor]]:
    """Logits and labels over the loader, top-1 per corruption@severity (RGB only), and the first batch's inputs.

    A progress bar counts the batches (with corruptions each is 13 forward passes): rich draws it on a terminal
    and writes its last state once to a log or a pipe."""
    import torch
    from rich.progress import track

    from kd.eval.corruptions import CORRUPTIONS, corrupt_normalized

    logits, labels, hits, first = [], [], {}, None
    spec = model.meta.input_spec  # corruptions apply to images, before normalization
    passes = 1 + (sum(len(levels) for levels in CORRUPTIONS.values()) if corruptions else 0)
    description = f"{what}: {passes} forward passes per batch" if passes > 1 else what
    with torch.inference_mode():  # not a decorator: that would import torch with the script
        for i, batch in enumerate(track(loader, description, total=len(loader))):
            inputs = [batch[k] for k in model.meta.inputs]
            first = first or inputs
            logits.append(model.run(*inputs).float().cpu())
            labels.append(batch["label"])
            for name, levels in CORRUPTIONS.items() if corruptions else ():
                for severity in range(1, len(levels) + 1):
                    rgb = corrupt_normalized(batch["rgb"], spec.mean, spec.std, name, severity, seed=i)
                    correct = model.run(rgb, *inputs[1:]).float().cpu().argmax(1) == batch["label"]
                    hits.setdefault(f"{name}@{severity}", []).append(correct)
        return (
            torch.cat(logits),
            torch.cat(labels),
            {k: torch.cat(v).double().mean().item() for k, v in hits.items()},
            first,
        )


def evaluate(model: LoadedModel, path: str, args, cfg, teacher: dict | None) -> tuple[dict, dict]:
    """One model's row, and what a later model needs to be compared with it (logits, samples, classes)."""
    import torch

    from kd.deploy.inference import checkpoint_loader
    from kd.eval.corruptions import CORRUPTIONS
    from kd.eval.measure import cuda_peak_memory_mb, latency_ms, peak_memory_mb, throughput
    from kd.eval.metrics import classification_metrics, per_class_accuracy

    loader = checkpoint_loader(cfg.data, model.meta, args.split, args.batch_size)
    samples = [str(p) for p, _ in loader.dataset.samples]
    logits, labels, corrupted, first = predict(model, loader, args.corruptions, f"{args.split} split")
    reference = {"logits": logits, "samples": samples, "classes": model.meta.classes}
    comparable = teacher and all(teacher[k] == reference[k] for k in ("samples", "classes"))
    row = {"path": path, "kind": model.kind, "arch": (model.meta.arch or {}).get("name", "?")}
    row |= {"device": model.device, "inputs": model.meta.inputs, "params": model.params, "samples": len(labels)}
    row |= classification_metrics(logits, labels, teacher["logits"] if comparable else None)
    # per image, for the paired comparison of two recipes (kd.eval.paired); `images` tells the image lists apart
    row["correct"] = (logits.argmax(1) == labels).int().tolist()
    row["images"] = hashlib.sha256("\n".join(samples).encode()).hexdigest()[:16]
    row["per_class_accuracy"] = dict(zip(model.meta.classes, per_class_accuracy(torch.tensor(row["confusion"]))))
    one = [x[:1].to(model.device) for x in first]
    speed = latency_ms({path: lambda: model.run(*one)}, args.warmup, args.latency_runs, model.device)[path]
    row |= {"latency_ms": speed["median"], "latency_median_ms": speed["median"], "latency_p90_ms": speed["p90"]}
    row["throughput"] = throughput(model, first, args.throughput_batch)
    if args.memory == "weights":
        row["memory_mb"] = model.weights_mb
    elif model.device.startswith("cuda"):
        row["memory_mb"] = cuda_peak_memory_mb(model, first)
    else:
        row["memory_mb"] = peak_memory_mb(path, args.meta, [tuple(x[:1].shape) for x in first])
    row |= {"weights_mb": model.weights_mb, "file_mb": model.file_mb}
    if corrupted:
        row["corruptions"] = corrupted
        for name in CORRUPTIONS:
            row[f"top1_{name}"] = statistics.fmean(v for k, v in corrupted.items() if k.startswith(name + "@"))
        row["top1_corrupted"] = statistics.fmean(corrupted.values())
    return row, reference


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n")[0])
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--config", help="config whose data section names the dataset (this or --demo is required)")
    data.add_argument(
        "--demo", action="store_true", help="evaluate on the built-in synthetic demo set (data/demo, ~99 MB)"
    )
    parser.add_argument("--models", nargs="*", default=[], help="name=path pairs (or bare paths); NAME@i for runs")
    parser.add_argument("--group", action="append", default=[], help="NAME=path1,path2,...: runs of one recipe")
    parser.add_argument("--teacher", default="teacher", help="row (or group) the others are compared with")
    parser.add_argument("--last", action="store_true", help="also evaluate latest.* beside each best.* checkpoint")
    parser.add_argument("--meta", help="JSON with classes/image_size/mean/std for exported files lacking a sidecar")
    parser.add_argument("--split", default="test", help="data split to evaluate on (default: test)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (exported files run on the CPU)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed batch-1 calls before timing")
    parser.add_argument("--latency-runs", type=int, default=50, help="timed batch-1 calls")
    parser.add_argument("--throughput-batch", type=int, default=64, help="batch size of the throughput measurement")
    parser.add_argument("--memory", choices=("peak", "weights"), default="peak", help="what Memory (MB) reports")
    parser.add_argument("--corruptions", action="store_true", help="also top-1 under noise, blur, brightness, JPEG")
    parser.add_argument("--out", default="results", help="folder for results.json, results.md, plots/, tb/")
    add_config_arguments(parser, "evaluate.py")
    parser.add_argument("overrides", nargs="*", help="data.key=value config overrides (anywhere on the line)")
    args = parser.parse_intermixed_args(argv)
    args.overrides += [item for item in args.models if is_override(item)]
    args.models = [item for item in args.models if not is_override(item)]
    cfg = resolve_config("evaluate.py", args.config, args.overrides, args.print_config)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}, but torch sees no CUDA GPU; use --device cpu")
    if args.latency_runs < 1 or args.warmup < 0:
        raise UserError(f"--latency-runs must be >= 1 and --warmup >= 0, got {args.latency_runs} and {args.warmup}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, cfg


def evaluate_all(entries: list[tuple[str, str, str]], models: dict, args, cfg: Config) -> dict[str, dict]:
    """Every model's row, in the order given. The teacher first: its logits are what the others' agreement and KL
    are measured against."""
    first = next((e for e in entries if args.teacher in e[:2]), None)
    rows, teacher = {}, None
    for entry in sorted(entries, key=lambda e: e != first):
        name, _, path = entry
        print(f"evaluating {name}: {path}")
        rows[name], reference = evaluate(models.pop(name).to(args.device), path, args, cfg, teacher)
        teacher = teacher or (reference if entry == first else None)
    return {name: rows[name] for name, _, _ in entries}


def report(rows: dict[str, dict], groups: dict[str, list[str]], summary: dict, args, cfg: Config) -> dict:
    """Print the tables and the derived lines; write results.json, results.md and the plots."""
    import torch
    from rich.console import Console

    from kd.eval.corruptions import CORRUPTIONS
    from kd.eval.measure import PEAK_MEMORY_METHOD
    from kd.eval.metrics import ECE_BINS
    from kd.eval.paired import paired_lines
    from kd.eval.plots import save_plots
    from kd.eval.report import derived_lines, recall_table, tables

    threads = torch.get_num_threads()
    speed = f"batch 1, {args.device}, {threads} threads"
    memory = PEAK_MEMORY_METHOD if args.memory == "peak" else "weights: parameters and buffers"
    if args.memory == "peak" and args.device.startswith("cuda"):
        memory = "checkpoints: torch.cuda.max_memory_allocated at batch 1; exported files: " + memory
    samples = next(iter(rows.values()))["samples"]
    title = f"{args.split} split of {cfg.data.root} ({samples} images)"
    note = (
        f"Latency: {speed}, median (p90 in the details) of {args.latency_runs} runs after {args.warmup} warm-up. "
        f"Memory: {memory}. ECE: {ECE_BINS} equal-width confidence bins. Agreement, KL: top-1 agreement with, and "
        f"KL({args.teacher} || model) at T=1. Images/s: throughput at batch {args.throughput_batch}."
    )
    console, md = tables(summary, args.corruptions, title, note)
    if recall := recall_table(rows, groups):
        console.append(recall[0])
        md += [""] + recall[1]
    for table in console:
        Console(width=max(120, Console().width)).print(table)
    print(note)
    lines = derived_lines(summary, args.teacher, speed, args.memory == "peak", args.latency_runs)
    lines += paired_lines(rows, groups)
    for line in lines:
        print(f"- {line}")

    out = Path(args.out)
    save_plots(out, rows)
    settings = {"device": args.device, "threads": threads, "latency": f"{speed}, median of {args.latency_runs}"}
    settings |= {"warmup": args.warmup, "memory": memory, "ece_bins": ECE_BINS, "corruptions": CORRUPTIONS}
    settings |= {"throughput_batch": args.throughput_batch, "teacher": args.teacher, "kl": "KL(teacher || model), T=1"}
    results = {"split": args.split, "root": cfg.data.root, "settings": settings, "models": rows, "summary": summary}
    results["derived"] = lines
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text("\n".join(md + [""] + [f"- {line}" for line in lines]) + "\n")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and plots in {out / 'plots'}")
    return results


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse_args(argv)
    from kd.data.loaders import prepare_data
    from kd.deploy.inference import load_model, read_json_object
    from kd.eval.metrics import mean_std

    entries = model_list(args)
    if not (args.config or args.demo):
        raise UserError(
            "no data to evaluate on: pass --config with the config whose data section names the dataset (e.g. --config "
            "configs/b0.yaml), or --demo for the built-in demo set (written to data/demo, about 99 MB)"
        )
    # Every mistake that can be found without evaluating is found before the first (possibly long) evaluation:
    # every model is loaded here, on the CPU; each moves to --device when its turn comes.
    require_writable_folder(args.out, "--out")
    if args.meta:
        read_json_object(Path(args.meta), "--meta file")
    models = {name: load_model(path, args.meta) for name, _, path in entries}
    prepare_data(cfg.data)

    rows = evaluate_all(entries, models, args, cfg)
    groups = {}
    for name, group, _ in entries:
        groups.setdefault(group, []).append(name)
    nested = ("confusion", "calibration", "per_class_accuracy", "corruptions", "correct")
    summary = {
        g: {k: v for k, v in mean_std([rows[n] for n in names]).items() if k not in nested} | {"runs": names}
        for g, names in groups.items()
    }
    return report(rows, groups, summary, args, cfg)


if __name__ == "__main__":
    main()
