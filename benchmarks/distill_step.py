"""What a distillation step costs, against its parts, measured in one run on the same batches.

    python benchmarks/distill_step.py                       # demo-sized: 64 px, batch 32, CPU
    python benchmarks/distill_step.py --image-size 224 --batch-size 64 --teacher-backbone efficientnetv2_rw_s \
        --device cuda --teacher-precision bf16 --channels-last --out results/distill_step.json

Prints images/s of (a) a plain student training step, (b) a teacher forward pass (inference mode), (c) a full
distillation step without and with feature matching, and of the training data loader alone (demo data, RGB+MS,
training transform); then the ratios distill / (student_step + teacher_forward), which should stay near 1 (no
wasted work), and loader / distill step, which should stay above 2 (data never starves the step). Ratios are
taken within one run because these machines are noisy. Peak memory: CUDA max allocated on a GPU, process peak RSS
on a CPU.
"""

import argparse
import contextlib
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing kd

from kd.config import DataConfig  # noqa: E402
from kd.data import build_loader, make_demo_dataset, ms_statistics, open_split  # noqa: E402
from kd.distill import Distiller  # noqa: E402
from kd.features import layer_pairs  # noqa: E402
from kd.losses import KnowledgeDistillationLoss  # noqa: E402
from kd.models import HybridFusion, build_model  # noqa: E402


def images_per_s(step, batch_size: int, device: str, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch_size * iters / (time.perf_counter() - start)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default="efficientnet_b0")
    parser.add_argument("--teacher-backbone", default="efficientnet_b0", help="RGB branch of the hybrid teacher")
    parser.add_argument("--teacher-ms-backbone", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--teacher-precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format for both models")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student and the teacher")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loader measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    device, size, bs = args.device, args.image_size, args.batch_size
    torch.manual_seed(0)

    student = build_model({"name": args.student, "num_classes": 5}).to(device)
    teacher = HybridFusion(5, backbone=args.teacher_backbone, ms_backbone=args.teacher_ms_backbone)
    teacher = teacher.to(device).eval().requires_grad_(False)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    student, teacher = student.to(memory_format=memory_format), teacher.to(memory_format=memory_format)
    batch = {
        "rgb": torch.randn(bs, 3, size, size, device=device).to(memory_format=memory_format),
        "ms": torch.randn(bs, 5, size, size, device=device).to(memory_format=memory_format),
        "label": torch.randint(0, 5, (bs,), device=device),
    }
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.teacher_precision)
    teacher_autocast = (lambda: torch.autocast(device_type=device, dtype=dtype)) if dtype else contextlib.nullcontext
    if args.compile:
        student, teacher = torch.compile(student), torch.compile(teacher)

    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)

    def student_step():
        loss = F.cross_entropy(student(batch["rgb"]), batch["label"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def teacher_forward():
        with torch.inference_mode(), teacher_autocast():
            teacher(batch["rgb"], batch["ms"])

    class AutocastTeacher(torch.nn.Module):  # the teacher as the Distiller calls it, in the chosen precision
        input_keys = ("rgb", "ms")

        def __init__(self):
            super().__init__()
            self.teacher = teacher

        def forward(self, rgb, ms):
            with teacher_autocast():
                return self.teacher(rgb, ms)

    wrapped_teacher = AutocastTeacher()

    def distill_step_for(pairs):
        loss = KnowledgeDistillationLoss(4.0, 0.3, 0.5 if pairs else 0.0)
        distiller = Distiller(student, [wrapped_teacher], loss, layer_pairs=pairs, example_batch=batch).to(device)
        distiller_optimizer = torch.optim.AdamW(distiller.parameters(), lr=1e-4)

        def step():
            distiller(batch)["loss"].backward()
            distiller_optimizer.step()
            distiller_optimizer.zero_grad(set_to_none=True)

        return step

    measure = dict(batch_size=bs, device=device, warmup=args.warmup, iters=args.iters)
    rates = {
        "student_step": images_per_s(student_step, **measure),
        "teacher_forward": images_per_s(teacher_forward, **measure),
        "distill_step": images_per_s(distill_step_for([]), **measure),
    }
    named = [["blocks.2", "teacher.rgb.blocks.2"], ["blocks.4", "teacher.rgb.blocks.4"]]
    pairs = [] if args.compile else layer_pairs(named, student, wrapped_teacher)
    if pairs:
        rates["distill_step_features"] = images_per_s(distill_step_for(pairs), **measure)

    with tempfile.TemporaryDirectory() as root:
        make_demo_dataset(root, per_class=(max(40, 3 * bs // 5), 2, 2), size=size)
        cfg = DataConfig(
            root=root,
            demo=False,
            image_size=size,
            num_workers=args.workers,
            mean=[0.485, 0.456, 0.406],
            std=[0.229, 0.224, 0.225],
        )
        train_set = open_split(cfg, "train", with_ms=True)
        loader = build_loader(
            cfg, "train", bs, train=True, with_ms=True, ms_stats=ms_statistics(train_set), dataset=train_set
        )
        iterator = iter(loader)
        next(iterator)  # worker start-up is not the steady rate
        start, seen = time.perf_counter(), 0
        for b in iterator:
            seen += b["label"].numel()
        rates["loader"] = seen / (time.perf_counter() - start)

    seconds = {k: 1.0 / v for k, v in rates.items()}  # per image
    ratios = {
        "distill / (student_step + teacher_forward)": seconds["distill_step"]
        / (seconds["student_step"] + seconds["teacher_forward"]),
        "loader / distill_step (speed)": rates["loader"] / rates["distill_step"],
    }
    if "distill_step_features" in rates:
        ratios["distill_features / (student_step + teacher_forward)"] = seconds["distill_step_features"] / (
            seconds["student_step"] + seconds["teacher_forward"]
        )
    if device == "cuda":
        peak = {"cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20}
    else:
        peak = {"process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    result = {
        "setup": vars(args),
        "threads": torch.get_num_threads(),
        "images_per_s": rates,
        "ratios": ratios,
        "peak_memory": peak,
    }
    for name, rate in rates.items():
        print(f"{name:>24s}: {rate:9.1f} images/s")
    for name, ratio in ratios.items():
        print(f"{name:>48s}: {ratio:.3f}")
    print(f"peak memory: {peak}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
