"""A race against torchdistill: the same distillation through its reference flow and through kd's default recipe.

    pip install -r requirements.txt -r requirements-bench.txt        # torchdistill 1.1.5, an optional extra
    python benchmarks/vs_torchdistill.py --threads 1 --epochs 3 --out results/vs_torchdistill.json   # README's race

Same work on both sides: the demo training split (1,200 images, 64 px PNG; `--work` keeps the data, the teacher and
the runs), an efficientnet_b2 teacher trained once by train_teacher.py, an efficientnet_b0 student from random
init, batch 64, AdamW (lr 2e-3, weight decay 1e-4), cosine LR per step, gradient clipping at 1, KD loss T=4,
alpha=0.3 (alpha weighs the label CE on both sides), fp32, 2 loader workers, the same crop/flip augmentation and
normalization, last partial batch dropped, `--epochs` epochs with validation after each. About 12 minutes on 2 busy
CPU cores with --threads 1 --epochs 3, after the teacher's 6 epochs (once).

- torchdistill: its image_classification example (examples/torchvision/image_classification.py: `train` and
  `train_one_epoch`, here in `torchdistill_run`) on a DistillationBox built by get_distillation_box from a
  generated config in its YAML format: torchvision ImageFolder + PIL transforms, KDLoss in a WeightedSumLoss,
  the teacher frozen (requires_grad False). Its loader gets persistent workers (its examples do not), in its favour.
- kd: distill.py with kd's speed defaults: the teacher's logits cached once (`--cache-teacher`, timed apart) and
  `channels_last`; and with `--contenders ... kd_online` also the online teacher with channels_last.

Each contender runs in its own process, contenders take turns in every repeat (the order alternates), and each of
`--seeds` is one repeat, the same seed on every side (`--threads 1` keeps the sides apart on a busy machine).
images/s counts the training loop of epochs `--timed-from` and later (loader waits
included, validation not); `wall_s` is the whole process, start-up, validation and checkpoints included.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing kd

from benchmarks.report import write_report  # noqa: E402

CONTENDERS = ("torchdistill", "kd_cached", "kd_online")
SETUP = {  # the recipe every side runs
    "teacher": "efficientnet_b2",
    "student": "efficientnet_b0",
    "classes": 5,
    "batch_size": 64,
    "learning_rate": 2e-3,
    "weight_decay": 1e-4,
    "temperature": 4.0,
    "alpha": 0.3,
    "gradient_clip": 1.0,
    "workers": 2,
    "hflip": 0.5,
    "vflip": 0.5,
    "scale_min": 0.6,
    "mean": [0.485, 0.456, 0.406],  # efficientnet_b0's (timm), which kd uses when data.mean is null
    "std": [0.229, 0.224, 0.225],
}
EPOCH_LINE = re.compile(r"^epoch (\d+): .*val_acc ([0-9.]+) .* (\d+) img/s", re.M)


def make_data(root: Path, per_class: tuple[int, int, int], size: int) -> Path:
    """The demo set at `root` (labelled splits only), written once."""
    from kd.data.demo import make_demo_dataset

    if not (root / "train").is_dir():
        make_demo_dataset(root, seed=0, per_class=per_class, size=size, unlabeled_per_class=0)
    return root


def write_yaml(path: Path, config: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def data_section(args, root: Path) -> dict:
    return {
        "root": str(root),
        "demo": False,
        "image_size": args.image_size,
        "num_workers": SETUP["workers"],
        "hflip": SETUP["hflip"],
        "vflip": SETUP["vflip"],
        "scale_min": SETUP["scale_min"],
        "mean": SETUP["mean"],
        "std": SETUP["std"],
    }


def run(command: list[str], log: Path, threads: int | None = None) -> tuple[str, float]:
    """Run `command` from the repository root, with `threads` intra-op threads when given; (its output, wall
    seconds). A failure raises with the log's tail."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout + done.stderr, wall


def train_teacher(args, work: Path, data: Path) -> Path:
    """The efficientnet_b2 teacher, trained once by train_teacher.py (kept in `work`)."""
    best, done = work / "teacher" / "best.safetensors", work / "teacher" / "trained"
    if done.is_file():  # written once train_teacher.py has finished (best.safetensors exists from the first epoch)
        return best
    config = {
        "name": "race_teacher",
        "seed": 0,
        "data": data_section(args, data),
        "model": {"name": SETUP["teacher"], "pretrained": None},
        "train": {
            "batch_size": SETUP["batch_size"],
            "learning_rate": 2e-3,
            "max_epochs": args.teacher_epochs,
            "warmup_epochs": 1 if args.teacher_epochs > 1 else 0,
            "lr_scheduler": "cosine",
            "channels_last": True,
            "checkpoint_dir": str(work / "teacher"),
            "resume": "auto",  # a killed preparation continues
            "log_with": "none",
        },
    }
    yaml_path = write_yaml(work / "teacher.yaml", config)
    print(f"training the {SETUP['teacher']} teacher ({args.teacher_epochs} epochs) into {best.parent}", flush=True)
    run([args.python, "train_teacher.py", "--config", str(yaml_path)], work / "logs" / "teacher.log")
    done.write_text(f"{args.teacher_epochs} epochs\n")
    return best


def kd_config(args, work: Path, data: Path, teacher: Path, seed: int, cached: bool) -> Path:
    name = f"kd_{'cached' if cached else 'online'}_{seed}"
    distillation = {
        "teacher_checkpoint": str(teacher),
        "student_backbone": SETUP["student"],
        "student_pretrained": None,
        "temperature": SETUP["temperature"],
        "alpha": SETUP["alpha"],
        "feature_matching": False,
        "batch_size": SETUP["batch_size"],
        "optimizer": "adamw",
        "learning_rate": SETUP["learning_rate"],
        "weight_decay": SETUP["weight_decay"],
        "max_epochs": args.epochs,
        "warmup_epochs": 0,
        "lr_scheduler": "cosine",
        "gradient_clip_val": SETUP["gradient_clip"],
        "precision": "no",
        "channels_last": True,
        "compile": False,
        "teacher_cache": str(work / f"cache_{seed}") if cached else "",
        "checkpoint_dir": str(work / "runs" / name),
        "log_with": "none",
    }
    config = {"name": name, "seed": seed, "data": data_section(args, data), "distillation": distillation}
    return write_yaml(work / f"{name}.yaml", config)


def kd_run(args, work: Path, data: Path, teacher: Path, seed: int, cached: bool) -> dict:
    """distill.py in its own process (after --cache-teacher when `cached`); figures parsed from its epoch lines."""
    import shutil

    config = kd_config(args, work, data, teacher, seed, cached)
    name = config.stem
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    result = {"cache_build_s": 0.0}
    if cached:
        cache = work / f"cache_{seed}"
        shutil.rmtree(cache, ignore_errors=True)  # built anew for every run: its cost is measured each time
        _, wall = run(
            [args.python, "distill.py", "--config", str(config), "--cache-teacher"],
            work / "logs" / f"{name}_cache.log",
            args.threads,
        )
        result["cache_build_s"] = round(wall, 2)
    output, wall = run(
        [args.python, "distill.py", "--config", str(config)], work / "logs" / f"{name}.log", args.threads
    )
    epochs = [(int(e), float(acc), float(rate)) for e, acc, rate in EPOCH_LINE.findall(output)]
    if len(epochs) != args.epochs:
        raise SystemExit(f"expected {args.epochs} epoch lines from distill.py, found {len(epochs)}:\n{output[-2000:]}")
    images = (args.train_images // SETUP["batch_size"]) * SETUP["batch_size"]  # drop_last
    timed = [(images, images / rate) for e, _, rate in epochs if e >= args.timed_from]
    return result | {
        "images_per_s": sum(n for n, _ in timed) / sum(s for _, s in timed),
        "val_acc": [acc for _, acc, _ in epochs],
        "wall_s": round(wall, 2),
        "speed_options": re.search(r"^speed options: .*$", output, re.M).group(0),
    }


def torchdistill_yaml(args, data: Path, seed: int) -> str:
    """A torchdistill config in its own YAML format (!import_call / !import_get), as its sample configs are written."""
    size, mean, std = args.image_size, SETUP["mean"], SETUP["std"]
    steps = args.epochs * (args.train_images // SETUP["batch_size"])
    return f"""\
datasets:
  demo/train: !import_call
    key: 'torchvision.datasets.ImageFolder'
    init:
      kwargs:
        root: '{data}/train'
        transform: !import_call
          key: 'torchvision.transforms.Compose'
          init:
            kwargs:
              transforms:
                - !import_call
                  key: 'torchvision.transforms.RandomResizedCrop'
                  init:
                    kwargs: {{size: [{size}, {size}], scale: [{SETUP["scale_min"]}, 1.0]}}
                - !import_call
                  key: 'torchvision.transforms.RandomHorizontalFlip'
                  init:
                    kwargs: {{p: {SETUP["hflip"]}}}
                - !import_call
                  key: 'torchvision.transforms.RandomVerticalFlip'
                  init:
                    kwargs: {{p: {SETUP["vflip"]}}}
                - !import_call
                  key: 'torchvision.transforms.ToTensor'
                  init:
                - !import_call
                  key: 'torchvision.transforms.Normalize'
                  init:
                    kwargs: &normalize {{mean: {mean}, std: {std}}}
  demo/val: !import_call
    key: 'torchvision.datasets.ImageFolder'
    init:
      kwargs:
        root: '{data}/val'
        transform: !import_call
          key: 'torchvision.transforms.Compose'
          init:
            kwargs:
              transforms:
                - !import_call
                  key: 'torchvision.transforms.Resize'
                  init:
                    kwargs: {{size: [{size}, {size}]}}
                - !import_call
                  key: 'torchvision.transforms.ToTensor'
                  init:
                - !import_call
                  key: 'torchvision.transforms.Normalize'
                  init:
                    kwargs: *normalize
train:
  log_freq: 100000
  num_epochs: {args.epochs}
  train_data_loader:
    dataset_id: 'demo/train'
    sampler:
      class_or_func: !import_get
        key: 'torch.utils.data.RandomSampler'
      kwargs:
    kwargs:
      batch_size: {SETUP["batch_size"]}
      num_workers: {SETUP["workers"]}
      persistent_workers: True
      drop_last: True
  val_data_loader:
    dataset_id: 'demo/val'
    sampler:
      class_or_func: !import_get
        key: 'torch.utils.data.SequentialSampler'
      kwargs:
    kwargs:
      batch_size: {SETUP["batch_size"]}
      num_workers: {SETUP["workers"]}
      persistent_workers: True
  teacher:
    forward_proc: 'forward_batch_only'
    sequential: []
    requires_grad: False
  student:
    forward_proc: 'forward_batch_only'
    adaptations:
    sequential: []
    requires_grad: True
    frozen_modules: []
  optimizer:
    key: 'AdamW'
    kwargs:
      lr: {SETUP["learning_rate"]}
      weight_decay: {SETUP["weight_decay"]}
    max_grad_norm: {SETUP["gradient_clip"]}
  scheduler:
    key: 'CosineAnnealingLR'
    kwargs:
      T_max: {steps}
    scheduling_step: 1
  criterion:
    key: 'WeightedSumLoss'
    kwargs:
      sub_terms:
        kd:
          criterion:
            key: 'KDLoss'
            kwargs:
              student_module_path: '.'
              student_module_io: 'output'
              teacher_module_path: '.'
              teacher_module_io: 'output'
              temperature: {SETUP["temperature"]}
              alpha: {SETUP["alpha"]}
              reduction: 'batchmean'
          weight: 1.0
"""


def torchdistill_run(config_path: str, teacher: str, seed: int, out: str) -> None:
    """torchdistill's image_classification example, `train` and `train_one_epoch` as written there (no checkpoint
    saving), timing each epoch's training loop. Runs in its own process (`--torchdistill-worker`)."""
    import timm
    import torch
    from safetensors.torch import load_file
    from torchdistill.common import yaml_util
    from torchdistill.common.main_util import set_seed
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.misc.log import MetricLogger, SmoothedValue

    set_seed(seed)
    config = yaml_util.load_yaml_file(config_path)
    device = torch.device("cpu")
    teacher_model = timm.create_model(SETUP["teacher"], num_classes=SETUP["classes"])
    teacher_model.load_state_dict(load_file(teacher))  # kd's checkpoint: a plain timm state dict in safetensors
    teacher_model = teacher_model.to(device)
    student_model = timm.create_model(SETUP["student"], num_classes=SETUP["classes"]).to(device)
    train_config = config["train"]
    box = get_distillation_box(teacher_model, student_model, config["datasets"], train_config, device, None, False, 1)

    def train_one_epoch(epoch: int) -> tuple[int, float]:
        metric_logger = MetricLogger(delimiter="  ")
        metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value}"))
        metric_logger.add_meter("img/s", SmoothedValue(window_size=10, fmt="{value}"))
        seen, start = 0, time.perf_counter()
        for sample_batch, targets, supp_dict in metric_logger.log_every(
            box.train_data_loader, train_config["log_freq"], f"Epoch: [{epoch}]"
        ):
            step_start = time.time()
            sample_batch, targets = sample_batch.to(device), targets.to(device)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            batch_size = sample_batch.shape[0]
            metric_logger.update(loss=loss.item(), lr=box.optimizer.param_groups[0]["lr"])
            metric_logger.meters["img/s"].update(batch_size / (time.time() - step_start))
            seen += batch_size
        return seen, time.perf_counter() - start

    @torch.inference_mode()
    def evaluate() -> float:
        student_model.eval()
        correct, count = 0, 0
        for image, target in box.val_data_loader:
            correct += (student_model(image.to(device)).argmax(1) == target.to(device)).sum().item()
            count += target.numel()
        return correct / count

    epochs = []
    for epoch in range(box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        seen, seconds = train_one_epoch(epoch)
        accuracy = evaluate()
        box.post_epoch_process()
        epochs.append({"epoch": epoch, "images": seen, "train_s": seconds, "val_acc": accuracy})
        print(f"epoch {epoch}: val_acc {accuracy:.4f}  {seen / seconds:.1f} img/s", flush=True)
    box.clean_modules()
    Path(out).write_text(json.dumps(epochs))


def td_run(args, work: Path, data: Path, teacher: Path, seed: int) -> dict:
    config = work / f"torchdistill_{seed}.yaml"
    config.write_text(torchdistill_yaml(args, data, seed))
    out = work / "runs" / f"torchdistill_{seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [args.td_python or args.python, str(Path(__file__).resolve()), "--torchdistill-worker", str(config)]
    command += ["--teacher", str(teacher), "--seed", str(seed), "--worker-out", str(out)]
    _, wall = run(command, work / "logs" / f"torchdistill_{seed}.log", args.threads)
    epochs = json.loads(out.read_text())
    timed = [e for e in epochs if e["epoch"] >= args.timed_from]
    return {
        "images_per_s": sum(e["images"] for e in timed) / sum(e["train_s"] for e in timed),
        "val_acc": [e["val_acc"] for e in epochs],
        "wall_s": round(wall, 2),
        "cache_build_s": 0.0,
    }


def summarize(runs: dict[str, list[dict]], train_images: int, epochs: int) -> dict:
    """Per contender: images/s mean ± std, last- and best-epoch val accuracy, and the ratios to torchdistill."""
    summary = {}
    for name, rows in runs.items():
        if not rows:
            continue
        rates = [r["images_per_s"] for r in rows]
        last, best = [r["val_acc"][-1] for r in rows], [max(r["val_acc"]) for r in rows]
        summary[name] = {
            "images_per_s": _mean_std(rates),
            "val_acc_last": _mean_std(last),
            "val_acc_best": _mean_std(best),
            "wall_s": _mean_std([r["wall_s"] + r["cache_build_s"] for r in rows]),
            "cache_build_s": _mean_std([r["cache_build_s"] for r in rows]),
        }
    base = runs.get("torchdistill") or []
    for name, rows in runs.items():
        if name == "torchdistill" or not rows or [r["seed"] for r in rows] != [b["seed"] for b in base]:
            continue
        # per repeat: the runs of one repeat ran back to back, so their ratio sees the same machine load
        speed = [r["images_per_s"] / b["images_per_s"] for r, b in zip(rows, base)]
        wall = [b["wall_s"] / (r["wall_s"] + r["cache_build_s"]) for r, b in zip(rows, base)]
        summary[name]["speed_vs_torchdistill"] = _mean_std(speed)
        summary[name]["wall_vs_torchdistill (cache build included)"] = _mean_std(wall)
    return summary


def _mean_std(values: list[float]) -> dict:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), 4), "std": round(std, 4), "values": [round(v, 4) for v in values]}


def table(summary: dict) -> str:
    lines = [
        "| contender | images/s | × torchdistill | val acc (last) | val acc (best) | wall s (cache incl.) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        ratio = s.get("speed_vs_torchdistill")
        times = f"{ratio['mean']:.2f} ± {ratio['std']:.2f}" if ratio else "1"
        lines.append(
            f"| {name} | {s['images_per_s']['mean']:.1f} ± {s['images_per_s']['std']:.1f} | {times} | "
            f"{100 * s['val_acc_last']['mean']:.1f} ± {100 * s['val_acc_last']['std']:.1f}% | "
            f"{100 * s['val_acc_best']['mean']:.1f} ± {100 * s['val_acc_best']['std']:.1f}% | "
            f"{s['wall_s']['mean']:.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/kd_vs_torchdistill", help="data, teacher, configs, runs and logs")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=["torchdistill", "kd_cached"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one repeat per seed, every side")
    parser.add_argument("--threads", type=int, help="intra-op threads of every run (default: torch's own)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--timed-from", type=int, default=1, help="first epoch timed (epoch 0 warms up)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--per-class", type=int, nargs=3, default=[240, 60, 60], help="train, val, test per class")
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--python", default=sys.executable, help="interpreter for kd's scripts")
    parser.add_argument("--td-python", help="interpreter with torchdistill installed (default: --python)")
    parser.add_argument("--out", help="write the figures as JSON here")
    # the torchdistill side runs in its own process through these
    parser.add_argument("--torchdistill-worker", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0 <= args.timed_from < args.epochs:
        parser.error("--timed-from must be below --epochs")
    args.train_images = 5 * args.per_class[0]
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.torchdistill_worker:
        torchdistill_run(args.torchdistill_worker, args.teacher, args.seed, args.worker_out)
        return None
    td_version = None
    if "torchdistill" in args.contenders:
        probe = [args.td_python or args.python, "-c", "import torchdistill; print(torchdistill.__version__)"]
        found = subprocess.run(probe, capture_output=True, text=True)
        if found.returncode:
            raise SystemExit("torchdistill is not installed: pip install -r requirements-bench.txt (or --td-python)")
        td_version = found.stdout.strip()
    work = Path(args.work)
    data = make_data(work / "data", tuple(args.per_class), args.image_size)
    teacher = train_teacher(args, work, data)
    runs = {name: [] for name in args.contenders}
    same = {k: getattr(args, k) for k in ("epochs", "timed_from", "image_size", "per_class", "threads")}
    for repeat, seed in enumerate(args.seeds):
        order = args.contenders if repeat % 2 == 0 else args.contenders[::-1]
        for name in order:
            done = work / "results" / f"{name}_{seed}.json"  # a finished run of the same setup is kept, not rerun
            if done.is_file() and json.loads(done.read_text())["setup"] == same:
                row = json.loads(done.read_text())["row"]
            elif name == "torchdistill":
                row = td_run(args, work, data, teacher, seed=seed)
            else:
                row = kd_run(args, work, data, teacher, seed=seed, cached=name == "kd_cached")
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps({"setup": same, "row": row | {"seed": seed}}))
            runs[name].append(row | {"seed": seed})
            cache = f" + cache build {row['cache_build_s']:.0f} s" if row["cache_build_s"] else ""
            print(
                f"repeat {repeat} {name}: {row['images_per_s']:.1f} images/s, val acc (last) {row['val_acc'][-1]:.3f}"
                f", wall {row['wall_s']:.0f} s{cache}",
                flush=True,
            )
            report = build_report(args, runs, td_version)  # after every run: a cut-short race keeps its figures
            write_report(args.out, report)
    print(table(report["summary"]))
    return report


def build_report(args, runs: dict[str, list[dict]], td_version: str | None) -> dict:
    import torch

    hidden = ("torchdistill_worker", "teacher", "seed", "worker_out")
    return {
        "setup": SETUP | {k: v for k, v in vars(args).items() if k not in hidden},
        "torch": torch.__version__,
        "torchdistill": td_version,
        "cpus": os.cpu_count(),
        "runs": runs,
        "summary": summarize(runs, args.train_images, args.epochs),
    }


if __name__ == "__main__":
    main()
