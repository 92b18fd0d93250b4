"""What a distillation step costs, against its parts, measured in one run on the same batches.

    python benchmarks/distill_step.py --out results/distill_step.json     # demo-sized: 64 px, batch 32
    python benchmarks/distill_step.py --image-size 224 --batch-size 64 --teacher-backbone efficientnetv2_rw_s \
        --compile --out results/distill_step_gpu.json                     # a GPU is used when there is one

Prints images/s of (a) a plain student training step, (b) a teacher forward pass (inference mode), (c) a full
distillation step without and with feature matching, (d) a distillation step that reads the teacher's logits from
a teacher cache (kd.distill.cache) instead of running it, and of the training data loader alone (demo data, RGB+MS,
training transform). Then the ratios, all of times per image except the two marked "speed":
distill / (student_step + teacher_forward), near 1 when no work is wasted; cached / student_step, near 1 when the
cache removes the teacher's cost; loader / step (speed), above 2 when data never starves the step.

Teacher and student options, each alone against the fp32, contiguous, eager model: bf16 autocast (on a CPU when
oneDNN supports bf16), fp16 autocast (CUDA), channels_last, and with --compile torch.compile (slow to compile on a
CPU). The main figures use --teacher-precision and --channels-last. Peak memory: CUDA max allocated on a GPU,
process peak RSS on a CPU.

Steps take turns in `--rounds` rounds of `--iters` calls and the best round of each counts, so load from other
processes on a shared machine costs a round, not a figure.
"""

import argparse
import contextlib
import copy
import functools
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing kd

from benchmarks.report import write_report  # noqa: E402
from kd.config import DataConfig  # noqa: E402
from kd.data.dataset import InputSpec, ms_statistics  # noqa: E402
from kd.data.demo import make_demo_dataset  # noqa: E402
from kd.data.loaders import build_loader, open_split  # noqa: E402
from kd.distill.cache import TeacherCache  # noqa: E402
from kd.distill.cache_build import build_teacher_cache  # noqa: E402
from kd.distill.distiller import Distiller  # noqa: E402
from kd.distill.hooks import FeaturePairs  # noqa: E402
from kd.distill.losses import KnowledgeDistillationLoss  # noqa: E402
from kd.distill.teachers import CachedTeacher, TeacherEnsemble  # noqa: E402
from kd.models.hybrid import HybridFusion  # noqa: E402
from kd.models.zoo import build_model, forward_batch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def best_rates(steps: dict[str, Callable], batch_size: int, device: str, warmup: int, iters: int, rounds: int):
    """images/s of each step: after `warmup` calls each, `rounds` rounds of `iters` calls, steps taking turns."""

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for step in steps.values():
        for _ in range(warmup):
            step()
    best = dict.fromkeys(steps, 0.0)
    for _ in range(rounds):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            for _ in range(iters):
                step()
            sync()
            best[name] = max(best[name], batch_size * iters / (time.perf_counter() - start))
    return best


def supported_precisions(device: str) -> list[str]:
    if device == "cuda":
        return ["bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp16"]
    return ["bf16"] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else []  # emulated bf16 is slower than fp32


def autocast(device: str, precision: str | None):
    return (
        torch.autocast(device_type=device, dtype=DTYPES[precision]) if precision in DTYPES else contextlib.nullcontext()
    )


def student_step_for(student: torch.nn.Module, batch: dict, device: str, precision: str | None = None):
    """A plain training step of (a copy of) `student`: CE on the labels, backward, AdamW."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)

    def step():
        with autocast(device, precision):
            loss = F.cross_entropy(student(batch["rgb"]).float(), batch["label"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def teacher_forward_for(teacher: torch.nn.Module, batch: dict, device: str, precision: str | None = None):
    def forward():
        with torch.inference_mode(), autocast(device, precision):
            teacher(batch["rgb"], batch["ms"])

    return forward


def distill_step_for(student, teachers, batch: dict, layers=()):
    """`teachers`: a TeacherEnsemble or CachedTeacher; `layers` are matched with the ensemble's first teacher."""
    loss = KnowledgeDistillationLoss(4.0, 0.3, 0.5 if layers else 0.0)
    pairs = FeaturePairs(layers, student, teachers.modules[0], batch, batch) if layers else None
    distiller = Distiller(student, teachers, loss, pairs).to(batch["rgb"].device)
    optimizer = torch.optim.AdamW(distiller.parameters(), lr=1e-4)

    def step():
        distiller(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


class Rows(torch.utils.data.Dataset):
    """The benchmark batch as a dataset whose sample `key` is row `key` of the batch (to build a cache from)."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["label"])

    def __getitem__(self, key: int) -> dict:
        return {**{name: value[key] for name, value in self.batch.items()}, "key": key}


def loader_rate(size: int, bs: int, workers: int) -> float:
    """Samples/s of the training loader alone (demo data, RGB+MS, training transform), after worker start-up."""
    with tempfile.TemporaryDirectory() as root:
        make_demo_dataset(root, per_class=(max(40, 3 * bs // 5), 2, 2), size=size, unlabeled_per_class=0)
        cfg = DataConfig(root=root, demo=False, image_size=size, num_workers=workers, mean=[0.5] * 3, std=[0.25] * 3)
        train_set = open_split(cfg, "train", with_ms=True)
        spec = InputSpec(size, cfg.mean, cfg.std, *ms_statistics(train_set))
        loader = build_loader(cfg, spec, "train", bs, train=True, dataset=train_set)
        iterator = iter(loader)
        next(iterator)
        start, seen = time.perf_counter(), 0
        for b in iterator:
            seen += b["label"].numel()
        return seen / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default="efficientnet_b0")
    parser.add_argument("--teacher-backbone", default="efficientnet_b0", help="RGB branch of the hybrid teacher")
    parser.add_argument("--teacher-ms-backbone", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--teacher-precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="main figures")
    parser.add_argument("--channels-last", action="store_true", help="main figures: channels_last for both models")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd teacher and student")
    parser.add_argument("--top-k", type=int, default=10, help="logits per view in the teacher cache")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loader measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--quiet", action="store_true", help="print no table (benchmarks/gpu.py prints its own)")
    args = parser.parse_args(argv)
    device, size, bs = args.device, args.image_size, args.batch_size
    torch.manual_seed(0)

    student = build_model({"name": args.student, "num_classes": 5}).to(device)
    teacher = HybridFusion(5, backbone=args.teacher_backbone, ms_backbone=args.teacher_ms_backbone)
    teacher = teacher.to(device).eval().requires_grad_(False)
    batch = {
        "rgb": torch.randn(bs, 3, size, size, device=device),
        "ms": torch.randn(bs, 5, size, size, device=device),
        "label": torch.randint(0, 5, (bs,), device=device),
    }
    eager = {"student": copy.deepcopy(student), "teacher": copy.deepcopy(teacher), "batch": dict(batch)}
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    student, teacher = student.to(memory_format=memory_format), teacher.to(memory_format=memory_format)
    batch.update({k: batch[k].contiguous(memory_format=memory_format) for k in ("rgb", "ms")})

    class AutocastTeacher(torch.nn.Module):  # the teacher as the Distiller calls it, in the main precision
        input_keys = ("rgb", "ms")

        def __init__(self):
            super().__init__()
            self.teacher = teacher

        def forward(self, rgb, ms):
            with autocast(device, args.teacher_precision):
                return self.teacher(rgb, ms)

    wrapped_teacher = AutocastTeacher()
    named = [["blocks.2", "teacher.rgb.blocks.2"], ["blocks.4", "teacher.rgb.blocks.4"]]
    steps = {
        "student_step": student_step_for(student, batch, device),
        "teacher_forward": teacher_forward_for(teacher, batch, device, args.teacher_precision),
        "distill_step": distill_step_for(student, TeacherEnsemble([wrapped_teacher]), batch),
        "distill_step_features": distill_step_for(student, TeacherEnsemble([wrapped_teacher]), batch, named),
    }
    with tempfile.TemporaryDirectory() as cache_dir:
        # (d): the teacher's logits on this batch cached on disk as distill.py --cache-teacher writes them, then read
        accelerator = Accelerator(cpu=device == "cpu")
        key = {"top_k": min(args.top_k, 5), "num_classes": 5, "samples": {"count": bs}}  # what a cache meta holds
        teacher_logits = functools.partial(forward_batch, wrapped_teacher)
        build_teacher_cache(accelerator, cache_dir, key, teacher_logits, Rows(batch), epochs=1, batch_size=bs)
        cached_batch = {**batch, "key": torch.arange(bs, device=device)}
        steps["cached_step"] = distill_step_for(student, CachedTeacher(TeacherCache(cache_dir)), cached_batch)

        # each option alone, on copies of the fp32, contiguous, eager models
        options = {
            "teacher_forward fp32": teacher_forward_for(eager["teacher"], eager["batch"], device),
            "student_step fp32": student_step_for(copy.deepcopy(eager["student"]), eager["batch"], device),
        }
        for precision in supported_precisions(device):
            options[f"teacher_forward {precision}"] = teacher_forward_for(
                eager["teacher"], eager["batch"], device, precision
            )
            options[f"student_step {precision}"] = student_step_for(
                copy.deepcopy(eager["student"]), eager["batch"], device, precision
            )
        cl_batch = {
            k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in eager["batch"].items()
        }
        cl_teacher = copy.deepcopy(eager["teacher"]).to(memory_format=torch.channels_last)
        options["teacher_forward channels_last"] = teacher_forward_for(cl_teacher, cl_batch, device)
        cl_student = copy.deepcopy(eager["student"]).to(memory_format=torch.channels_last)
        options["student_step channels_last"] = student_step_for(cl_student, cl_batch, device)
        if args.compile:
            options["teacher_forward compile"] = teacher_forward_for(
                torch.compile(copy.deepcopy(eager["teacher"])), eager["batch"], device
            )
            options["student_step compile"] = student_step_for(
                torch.compile(copy.deepcopy(eager["student"])), eager["batch"], device
            )
        measure = dict(batch_size=bs, device=device, warmup=args.warmup, iters=args.iters, rounds=args.rounds)
        rates = best_rates({**steps, **options}, **measure)
    rates["loader"] = loader_rate(size, bs, args.workers)

    seconds = {k: 1.0 / v for k, v in rates.items()}  # per image
    parts = seconds["student_step"] + seconds["teacher_forward"]
    ratios = {
        "distill / (student_step + teacher_forward)": seconds["distill_step"] / parts,
        "distill_features / (student_step + teacher_forward)": seconds["distill_step_features"] / parts,
        "cached / student_step": seconds["cached_step"] / seconds["student_step"],
        "loader / distill_step (speed)": rates["loader"] / rates["distill_step"],
        "loader / cached_step (speed)": rates["loader"] / rates["cached_step"],
    }
    speedups = {
        name: rates[name] / rates[f"{name.split()[0]} fp32"] for name in options if not name.endswith("fp32")
    }  # images/s of the option / images/s of fp32 eager contiguous: > 1 is faster
    if device == "cuda":
        peak = {"cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20}
    else:
        peak = {"process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    result = {
        "setup": vars(args),
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "images_per_s": rates,
        "ratios": ratios,
        "option_speedups": speedups,
        "peak_memory": peak,
    }
    if not args.quiet:
        print(table(result))
    write_report(args.out, result)
    return result


def table(result: dict) -> str:
    """The figures as the Markdown table README's Performance section shows."""
    setup, rates = result["setup"], result["images_per_s"]
    lines = [
        f"{setup['device']} ({result['device_name']}, {result['threads']} threads), {setup['image_size']} px, batch "
        f"{setup['batch_size']}, student {setup['student']}, teacher hybrid {setup['teacher_backbone']} + "
        f"{setup['teacher_ms_backbone']}; best of {setup['rounds']} rounds of {setup['iters']} steps",
        "",
        "| measured | images/s |",
        "|---|---|",
        *(f"| {name} | {rate:.1f} |" for name, rate in rates.items()),
        "",
        "| ratio | value | target |",
        "|---|---|---|",
    ]
    targets = {"distill / (student_step + teacher_forward)": "≤ 1.05", "cached / student_step": "≤ 1.15"}
    targets |= {"loader / distill_step (speed)": "≥ 2", "loader / cached_step (speed)": "≥ 2"}
    lines += [f"| {name} | {value:.3f} | {targets.get(name, '')} |" for name, value in result["ratios"].items()]
    lines += ["", "| option (alone) | speed-up vs fp32 eager |", "|---|---|"]
    lines += [f"| {name} | {value:.2f}× |" for name, value in result["option_speedups"].items()]
    peak = ", ".join(f"{k} {v:.0f}" for k, v in result["peak_memory"].items())
    return "\n".join([*lines, "", f"peak memory: {peak}"])


if __name__ == "__main__":
    main()
