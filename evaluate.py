"""Compare checkpoints on a data split: parameters, top-1 accuracy, latency (batch 1) and weight memory.

    python evaluate.py --config configs/b0.yaml \
        --models teacher=checkpoints/teacher/best.safetensors distilled=checkpoints/student/best.safetensors \
                 baseline=checkpoints/baseline/best.safetensors [--split test] [--out results]

Prints a table and writes <out>/results.json and <out>/results.md. Rows named teacher, distilled and baseline
also get the derived comparison lines (parameter reduction, speed-up, accuracy drop, gain over baseline).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kd.config import load_config
from kd.data import checkpoint_loader, prepare_data
from kd.errors import UserError, exit_on_user_error
from kd.models import count_parameters, forward_batch, input_keys, load_checkpoint

COLUMNS = ("Model", "Parameters", "Top-1 Acc.", "Latency (ms)", "Memory (MB)")


@torch.inference_mode()
def accuracy(model: torch.nn.Module, loader) -> float:
    correct = total = 0
    for batch in loader:
        correct += (forward_batch(model, batch).argmax(1) == batch["label"]).sum().item()
        total += batch["label"].numel()
    return correct / total


@torch.inference_mode()
def latency_ms(model: torch.nn.Module, example: dict, warmup: int = 10, runs: int = 50) -> dict[str, float]:
    """Batch-1 latency: median and p90 over `runs` timed calls after `warmup` untimed ones."""
    inputs = [example[k][:1] for k in input_keys(model)]
    for _ in range(warmup):
        model(*inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(*inputs)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median": statistics.median(times), "p90": statistics.quantiles(times, n=10)[-1]}


def weights_mb(model: torch.nn.Module) -> float:
    """Memory held by parameters and buffers, in MiB."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def derived_lines(rows: dict[str, dict]) -> list[str]:
    """The user guide's comparison sentences, computed from the table."""
    lines = []
    if "teacher" in rows and "distilled" in rows:
        t, s = rows["teacher"], rows["distilled"]
        lines += [
            f"{100 * (1 - s['params'] / t['params']):.0f}% fewer parameters than the teacher",
            f"{t['latency_ms'] / s['latency_ms']:.1f}x faster inference (batch 1, {t['device']})",
            f"{t['memory_mb'] / s['memory_mb']:.1f}x smaller weight memory",
            f"{100 * (t['top1'] - s['top1']):.1f} points accuracy drop from the teacher",
        ]
    if "baseline" in rows and "distilled" in rows:
        lines.append(
            f"{100 * (rows['distilled']['top1'] - rows['baseline']['top1']):+.1f} points over the "
            "baseline student (same architecture, no teacher)"
        )
    return lines


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="config whose data section names the dataset")
    parser.add_argument("--models", nargs="+", required=True, help="name=checkpoint pairs (or bare paths)")
    parser.add_argument("--split", default="test", help="data split to evaluate on (default: test)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default="results", help="folder for results.json and results.md")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    prepare_data(cfg.data)
    device = f"cpu, {torch.get_num_threads()} threads"

    rows = {}
    for item in args.models:
        name, _, path = item.rpartition("=")
        name = name or Path(path).parent.name
        if name in rows:
            raise UserError(f"two models are named '{name}'; name them with name=path")
        model, meta = load_checkpoint(path)
        model.eval()
        loader = checkpoint_loader(cfg.data, meta, args.split, args.batch_size)
        example = next(iter(loader))
        rows[name] = {
            "checkpoint": str(path),
            "arch": meta["arch"]["name"],
            "inputs": meta["inputs"],
            "params": count_parameters(model),
            "top1": accuracy(model, loader),
            "samples": len(loader.dataset),
            "memory_mb": weights_mb(model),
            "device": device,
            **{f"latency_{k}_ms": v for k, v in latency_ms(model, example).items()},
        }
        rows[name]["latency_ms"] = rows[name]["latency_median_ms"]

    table = Table(
        *COLUMNS, title=f"{args.split} split of {cfg.data.root}; latency: batch 1, median, {device}; memory: weights"
    )
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name, r in rows.items():
        label = f"{name} ({r['arch']}, {'+'.join(r['inputs']).upper()})"
        cells = [
            label,
            f"{r['params'] / 1e6:.2f}M",
            f"{100 * r['top1']:.1f}%",
            f"{r['latency_ms']:.2f}",
            f"{r['memory_mb']:.1f}",
        ]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    lines = derived_lines(rows)
    Console(width=max(120, Console().width)).print(table)
    for line in lines:
        print(f"- {line}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"split": args.split, "models": rows, "derived": lines}, indent=2))
    (out / "results.md").write_text("\n".join(md + [""] + [f"- {line}" for line in lines]) + "\n")
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return rows


if __name__ == "__main__":
    main()
