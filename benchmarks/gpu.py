"""Speed on a GPU host in one command (under 8 minutes on one CUDA GPU): step ratios, precision, layout, compile, the
teacher cache and the loader with every core, as JSON.

    bash benchmarks/gpu.sh                                   # = python benchmarks/gpu.py --out results/gpu.json
    python benchmarks/gpu.py --device cpu --quick --out /tmp/gpu.json    # tiny models: the smoke test (seconds)

1. `steps`: benchmarks/distill_step.py at 224 px, batch 64, efficientnet_b0 student, the efficientnetv2_rw_s hybrid
   teacher of configs/teacher_v2s.yaml (RGB and MS branches), teacher in bf16 (fp16 where bf16 is not supported;
   fp32 on a CPU), channels_last, with torch.compile: a student step, a teacher forward, distillation online and
   from the teacher cache, their ratios, and each option alone (bf16, fp16, channels_last, compile) as a speed-up.
2. `student_combined`: the student training step with options together (fp32; bf16/fp16 + channels_last; and
   compiled): what a GPU run with kd's speed defaults asks of the loader.
3. `loader`: 500x500 JPEG leaf photos to 224 px training views: samples/s of one worker (kd, kd's float path and
   torchvision's ImageFolder + PIL pipeline, as torchdistill builds it, and a decode_image + transforms.v2 one),
   and the three loaders with every core as workers.
4. `verdict`: loader samples/s over the fastest student step's images/s (above 1: the loader keeps the GPU fed),
   and the loader workers the fastest step needs.
"""

import argparse
import copy
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing kd

from benchmarks import data_loader, distill_step  # noqa: E402
from benchmarks.report import write_report  # noqa: E402
from kd.models.zoo import build_model  # noqa: E402


def main_precision(device: str) -> str:
    if device != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def student_combined(args, device: str) -> dict:
    """images/s of the student training step with the speed options together, steps taking turns."""
    size, bs = args.image_size, args.batch_size
    torch.manual_seed(0)
    student = build_model({"name": args.student, "num_classes": 5}).to(device)
    batch = {
        "rgb": torch.randn(bs, 3, size, size, device=device),
        "label": torch.randint(0, 5, (bs,), device=device),
    }
    cl_batch = {**batch, "rgb": batch["rgb"].contiguous(memory_format=torch.channels_last)}

    def make(precision: str | None, channels_last: bool, compiled: bool):
        model = copy.deepcopy(student)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if compiled:
            model = torch.compile(model)
        return distill_step.student_step_for(model, cl_batch if channels_last else batch, device, precision)

    steps = {"fp32": make(None, False, False)}
    for precision in distill_step.supported_precisions(device):
        steps[f"{precision} + channels_last"] = make(precision, True, False)
    steps["channels_last"] = make(None, True, False)
    if args.compile:
        best = distill_step.supported_precisions(device)[:1]
        name = f"{best[0]} + channels_last + compile" if best else "channels_last + compile"
        steps[name] = make(best[0] if best else None, True, True)
    measure = dict(batch_size=bs, device=device, warmup=args.warmup, iters=args.iters, rounds=args.rounds)
    return {name: round(rate, 1) for name, rate in distill_step.best_rates(steps, **measure).items()}


def loader(args) -> dict:
    """One worker's samples/s (1 thread) and the loaders' with `args.workers` workers, on 500 px JPEG photos."""
    with tempfile.TemporaryDirectory() as temp:
        root = data_loader.write_photos(Path(temp), args.photos, args.photo_size, ".jpg")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker
        try:
            per_worker = data_loader.transforms_per_worker(root, args.image_size, args.rounds)
        finally:
            torch.set_num_threads(threads)
        with_workers = data_loader.loaders_with_workers(
            root, args.image_size, args.workers, args.loader_batch_size, args.rounds
        )
    return {
        "photos": args.photos,
        "photo_size": args.photo_size,
        "view_size": args.image_size,
        "per_worker_samples_per_s": per_worker,
        "workers": args.workers,
        "all_workers_samples_per_s": with_workers,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny models, images and counts: a smoke test")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    full = {
        "student": "efficientnet_b0",
        "teacher_backbone": "efficientnetv2_rw_s",
        "teacher_ms_backbone": "efficientnetv2_rw_s",
        "image_size": 224,
        "batch_size": 64,
        "warmup": 3,
        "iters": 10,
        "rounds": 3,
        "photos": 256,
        "photo_size": 500,
        "workers": os.cpu_count() or 1,
        "loader_batch_size": 64,
    }
    quick = {
        "student": "test_efficientnet",
        "teacher_backbone": "test_efficientnet",
        "teacher_ms_backbone": "test_resnet",
        "image_size": 32,
        "batch_size": 4,
        "warmup": 1,
        "iters": 1,
        "rounds": 1,
        "photos": 10,
        "photo_size": 48,
        "workers": 0,
        "loader_batch_size": 4,
    }
    for key, value in (quick if args.quick else full).items():
        setattr(args, key, value)
    if args.quick:
        args.compile = False  # compiling takes minutes on a CPU
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, start = args.device, time.perf_counter()
    precision = main_precision(device)
    step_argv = [
        *("--device", device, "--student", args.student),
        *("--teacher-backbone", args.teacher_backbone, "--teacher-ms-backbone", args.teacher_ms_backbone),
        *("--image-size", str(args.image_size), "--batch-size", str(args.batch_size)),
        *("--teacher-precision", precision, "--channels-last", "--workers", str(args.workers)),
        *("--warmup", str(args.warmup), "--iters", str(args.iters), "--rounds", str(args.rounds), "--quiet"),
        *(("--compile",) if args.compile else ()),
    ]
    print(f"steps: distill_step.py {' '.join(step_argv)}", flush=True)
    steps = distill_step.main(step_argv)
    print("student step, options together", flush=True)
    combined = student_combined(args, device)
    print(f"loader: {args.photos} JPEGs at {args.photo_size} px to {args.image_size} px views", flush=True)
    loading = loader(args)

    fastest_name = max(combined, key=combined.get)
    fastest = combined[fastest_name]
    kd_all = loading["all_workers_samples_per_s"]["kd"]
    kd_one = loading["per_worker_samples_per_s"]["kd"]
    verdict = {
        "fastest_student_step": fastest_name,
        "fastest_student_images_per_s": fastest,
        "loader_over_fastest_student_step": round(kd_all / fastest, 3),
        "loader_over_cached_step": round(kd_all / steps["images_per_s"]["cached_step"], 3),
        "workers_needed_for_fastest_step": math.ceil(fastest / kd_one),
        "kd_over_torchvision_per_worker": round(kd_one / loading["per_worker_samples_per_s"]["torchvision"], 3),
        "kd_over_torchvision_v2_per_worker": round(kd_one / loading["per_worker_samples_per_s"]["torchvision_v2"], 3),
    }
    report = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "torch": torch.__version__,
        "steps": steps,
        "student_combined": combined,
        "loader": loading,
        "verdict": verdict,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(distill_step.table(steps))
    print("\n| student step (options together) | images/s |\n|---|---|")
    print("\n".join(f"| {name} | {rate:.1f} |" for name, rate in combined.items()))
    print(f"\nloader per worker (1 thread): {loading['per_worker_samples_per_s']} samples/s")
    print(f"loader, {loading['workers']} workers: {loading['all_workers_samples_per_s']} samples/s")
    print(f"verdict: {verdict}\n{report['seconds']:.0f} s")
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
