"""Throughput of the training data loader alone (no model): samples/s with and without MS, per worker count.

python benchmarks/data_loader.py                                  # a small demo set in a temp folder (< 1 minute)
python benchmarks/data_loader.py --root data/plantvillage --workers 0 4 8 --out results/loader.json
python benchmarks/data_loader.py --config configs/teacher_v2s.yaml data.ms_root=/data/ms --workers 8 16

Startup (worker spawn + first batch) is reported apart from the steady rate, which is what training sees.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing kd

from benchmarks.report import write_report  # noqa: E402
from kd.config import DataConfig, load_config  # noqa: E402
from kd.data import InputSpec, build_loader, make_demo_dataset, open_split, prepare_data  # noqa: E402
from kd.errors import exit_on_user_error  # noqa: E402


def measure(cfg: DataConfig, dataset, with_ms: bool, workers: int, batch_size: int, batches: int) -> dict:
    """Time `batches` training batches after the first one (which pays for worker startup)."""
    cfg.num_workers = workers
    bands = dataset.read(0)[1].shape[0] if with_ms else 0
    ms_stats = {"ms_mean": [0.0] * bands, "ms_std": [1.0] * bands} if with_ms else {}  # MS normalization costs too
    spec = InputSpec(cfg.image_size, **ms_stats)  # the normalization's values do not change its cost
    loader = build_loader(cfg, spec, "train", batch_size, train=True, dataset=dataset)
    start = time.perf_counter()
    it = iter(loader)
    next(it)
    startup = time.perf_counter() - start
    start, seen, done = time.perf_counter(), 0, 0
    while done < batches:
        for batch in it:
            seen, done = seen + len(batch["label"]), done + 1
            if done == batches:
                break
        it = iter(loader)  # next epoch (persistent workers are reused)
    elapsed = time.perf_counter() - start
    return {
        "with_ms": with_ms,
        "workers": workers,
        "startup_s": round(startup, 3),
        "samples_per_s": round(seen / elapsed, 1),
    }


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config whose data section is used (default: a small demo set)")
    parser.add_argument("--root", help="dataset root (overrides data.root; turns data.demo off)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20, help="batches timed per setting, after the first")
    parser.add_argument("--image-size", type=int, help="overrides data.image_size")
    parser.add_argument("--no-ms", action="store_true", help="RGB only (the data has no MS stacks)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.ms_root=/data/ms")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.overrides).data
    if args.image_size:
        cfg.image_size = args.image_size
    temp = None
    if args.root:
        cfg.root, cfg.demo = args.root, False
    elif not args.config:
        temp = tempfile.TemporaryDirectory()
        cfg.root, cfg.demo = temp.name, False
        make_demo_dataset(temp.name, per_class=(60, 4, 4), **({"size": cfg.image_size} if cfg.image_size else {}))
    prepare_data(cfg)
    torch.set_num_threads(1)  # as in a DataLoader worker; the main process would otherwise use every core

    results = []
    for with_ms in (False,) if args.no_ms else (False, True):
        start = time.perf_counter()
        dataset = open_split(cfg, "train", with_ms=with_ms)  # listing + header scan, timed apart from loading
        scan_s = time.perf_counter() - start
        for workers in args.workers:
            row = measure(cfg, dataset, with_ms, workers, args.batch_size, args.batches)
            row["scan_s"] = round(scan_s, 3)
            results.append(row)
            print(
                f"{'rgb+ms' if with_ms else 'rgb':>6}  workers {workers:>2}: {row['samples_per_s']:8.1f} samples/s"
                f"  (startup {row['startup_s']:.2f} s, scan of {len(dataset)} samples {scan_s:.2f} s)"
            )
    report = {
        "root": str(cfg.root) if temp is None else "demo (temporary)",
        "train_samples": len(dataset),
        "image_size": cfg.image_size,
        "batch_size": args.batch_size,
        "batches": args.batches,
        "cpus": os.cpu_count(),
        "results": results,
    }
    write_report(args.out, report)
    if args.out:
        print(f"wrote {args.out}")
    if temp is not None:
        temp.cleanup()
    return report


if __name__ == "__main__":
    main()
