"""Distil frozen teacher(s) into a small RGB student: hard CE + soft KL/DKD/DIST at temperature T + feature matching.

accelerate launch distill.py --config configs/b0.yaml [section.key=value ...] [--resume]
python distill.py --config configs/b0.yaml distillation.max_epochs=5
python distill.py --config configs/b0.yaml --list-layers    # layer names, shapes and suggested pairs
python distill.py --config C distillation.teacher_cache=DIR --cache-teacher   # teacher top-k logits, once
python distill.py --config C distillation.teacher_cache=DIR                   # then distil from them
"""

import dataclasses
import sys
from pathlib import Path

import torch
from accelerate.utils import set_seed
from rich.console import Console
from rich.table import Table
from torch.utils.data import default_collate

from kd.cache import CachedTeacher, TeacherCache, build_teacher_cache, cache_key, check_applies
from kd.checkpoint import CheckpointMeta, check_ms_bands, load_checkpoint, read_meta
from kd.config import flat_hparams, parse_cli, save_config
from kd.data import build_loader, prepare_data, resolve_input
from kd.distill import Distiller, adapt_view, class_balanced_batch, teacher_sanity_report
from kd.errors import UserError, exit_on_user_error, quote
from kd.features import layer_pairs, output_shapes, suggest_pairs
from kd.loop import fit, make_accelerator
from kd.losses import KnowledgeDistillationLoss
from kd.models import build_model, count_parameters, input_config, input_keys
from kd.run_dir import claim_run_dir


def print_layers(
    student: torch.nn.Module, student_size: int, teacher: torch.nn.Module, teacher_meta: CheckpointMeta
) -> None:
    """Every hookable layer of both models with its output shape, and pairs whose spatial sizes match."""
    size = teacher_meta.input_spec.image_size
    inputs = {
        "rgb": torch.zeros(1, 3, size, size),
        "ms": torch.zeros(1, teacher_meta.arch.get("ms_channels", 0), size, size),
    }
    shapes = {
        f"student layers at {student_size} px": output_shapes(student, [torch.zeros(1, 3, student_size, student_size)]),
        f"teacher layers at {size} px": output_shapes(teacher, [inputs[k] for k in input_keys(teacher)]),
    }
    console = Console(width=max(100, Console().width))
    for title, layer_shapes in shapes.items():
        table = Table("layer", "output shape", title=title)
        for name, shape in layer_shapes.items():
            table.add_row(name, "×".join(map(str, shape[1:])))
        console.print(table)
    pairs = suggest_pairs(*shapes.values())
    console.print("suggested feature_layers (same spatial size; adapters fix the channel counts):")
    print("  [" + ", ".join(f"[{s}, {t}]" for s, t in pairs) + "]")  # plain print: rich would wrap or eat [..]


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict | None:
    cfg, args = parse_cli(argv, "Distil frozen teacher(s) into an RGB student.", list_layers=True, cache_teacher=True)
    set_seed(cfg.seed)  # first: every model and draw below depends on it, so two runs of one seed are bitwise equal
    d = cfg.distillation
    run_dir = Path(d.checkpoint_dir or f"runs/{cfg.name}")
    if args.cache_teacher and not d.teacher_cache:
        raise UserError("--cache-teacher writes to distillation.teacher_cache: set it, e.g. teacher_cache=cache/b0")
    if d.teacher_cache:
        check_applies(d)
    # distil from the cache: the teachers are never loaded, let alone run
    cached = bool(d.teacher_cache) and not (args.cache_teacher or args.list_layers)

    # teachers: rebuilt from their safetensors + JSON checkpoints, frozen; they must share one class list
    entries = d.teachers or [{"checkpoint": d.teacher_checkpoint, "weight": 1.0}]
    if cached:
        teachers, metas = [], [read_meta(e["checkpoint"]) for e in entries]
    else:
        loaded = [load_checkpoint(e["checkpoint"]) for e in entries]
        teachers, metas = [m for m, _ in loaded], [meta for _, meta in loaded]
    classes = metas[0].classes
    for entry, meta in zip(entries, metas):
        if meta.classes != classes:
            raise UserError(
                f"teacher {entry['checkpoint']} has classes {meta.classes}, "
                f"but {entries[0]['checkpoint']} has {classes}"
            )
    if not 0 <= d.feature_teacher < len(entries):
        raise UserError(f"distillation.feature_teacher={d.feature_teacher}, but there are {len(entries)} teachers")
    arch = {"name": d.student_backbone, "num_classes": len(classes)}
    student = build_model(arch, pretrained=d.student_pretrained)
    student_spec = resolve_input(cfg.data, input_config(student))  # null image_size/mean/std: the student's own
    if args.list_layers:
        print_layers(student, student_spec.image_size, teachers[d.feature_teacher], metas[d.feature_teacher])
        return None

    if not args.cache_teacher:  # fails now, not after training (--list-layers and --cache-teacher write no run)
        claim_run_dir(run_dir, args.resume, d.resume == "auto", [e["checkpoint"] for e in entries])
    accelerator = make_accelerator(d, run_dir, seed=cfg.seed)
    ms_meta = next((m for m in metas if m.input_spec.with_ms), None)
    with_ms = ms_meta is not None and not cached  # only teachers read MS; the RGB view is the same without it

    # data: the teacher's class order, MS bands and statistics, so it sees inputs exactly as it was trained on
    with accelerator.main_process_first():
        prepare_data(cfg.data)
    val_spec = student_spec
    if with_ms:
        ms = ms_meta.input_spec
        if cfg.data.ms_bands and cfg.data.ms_bands != ms.ms_bands:
            raise UserError(
                f"data.ms_bands is {quote(cfg.data.ms_bands)}, but the teacher was trained on bands "
                f"{quote(ms.ms_bands or 'all')}: the teacher must see its own bands. Set data.ms_bands to "
                "the teacher's, or leave it empty ([]) to use them."
            )
        if ms.ms_bands:
            accelerator.print(f"multispectral bands {ms.ms_bands}: the teacher's (from its checkpoint)")
        val_spec = dataclasses.replace(student_spec, ms_mean=ms.ms_mean, ms_std=ms.ms_std, ms_bands=ms.ms_bands)
    # one augmented view at the largest input size, re-sized / re-normalized per model inside the Distiller
    student_input, teacher_inputs = student_spec.rgb(), [m.input_spec.rgb() for m in metas]
    view_size = max(x["image_size"] for x in [student_input, *teacher_inputs])
    view_spec = dataclasses.replace(val_spec, image_size=view_size)
    loader_args = dict(classes=classes, seed=cfg.seed)
    train_loader = build_loader(cfg.data, view_spec, "train", d.batch_size, train=True, **loader_args)
    val_loader = build_loader(cfg.data, val_spec, "val", d.batch_size, train=False, **loader_args)
    check_ms_bands(ms_meta if with_ms else None, val_loader.dataset)  # the band count the MS teacher was trained on

    if d.teacher_sanity_check and not cached:  # a cached run checked its teachers when it built the cache
        first_batch = class_balanced_batch(val_loader, d.batch_size)  # sorted val sets start with one class
        for entry, teacher, target in zip(entries, teachers, teacher_inputs):
            teacher_batch = adapt_view(first_batch, student_input, target)
            accelerator.print(teacher_sanity_report(entry["checkpoint"], teacher, teacher_batch, len(classes)))

    teacher_weights, key = [e.get("weight", 1.0) for e in entries], None
    if d.teacher_cache:  # the cache holds the teachers' logits for exactly these views (training loader), teachers, k
        key = cache_key(entries, metas, train_loader.dataset, cfg.data.root, teacher_inputs, d.teacher_cache_top_k)
    if cached:
        rebuild = ["python distill.py", *(a for a in argv or sys.argv[1:] if a != "--resume"), "--cache-teacher"]
        cache = TeacherCache.open(d.teacher_cache, key, d.max_epochs, " ".join(rebuild))
        teachers, teacher_weights, teacher_inputs = [CachedTeacher(cache)], [1.0], [None]
    pairs = (
        layer_pairs(d.feature_layers, student, teachers[d.feature_teacher])
        if d.feature_matching and d.feature_layers
        else []
    )
    loss = KnowledgeDistillationLoss(
        d.temperature,
        d.alpha,
        d.feature_weight if pairs else 0.0,
        soft_loss=d.soft_loss,
        dkd_alpha=d.dkd_alpha,
        dkd_beta=d.dkd_beta,
        dkd_warmup_epochs=d.dkd_warmup_epochs,
        dist_beta=d.dist_beta,
        dist_gamma=d.dist_gamma,
    )
    distiller = Distiller(
        student,
        teachers,
        loss,
        teacher_weights,
        pairs,
        d.feature_teacher,
        example_batch=default_collate([train_loader.dataset[i] for i in range(2)]),
        final_temperature=d.final_temperature,
        total_epochs=d.max_epochs,
        ema_teacher_weight=d.ema_teacher_weight,
        ema_teacher_start_epoch=d.ema_teacher_start_epoch,
        view=view_spec.rgb(),
        student_input=student_input,
        teacher_inputs=teacher_inputs,
    )
    distiller.teachers_to(accelerator.device, d.channels_last, d.compile)
    if args.cache_teacher:
        views = train_loader.dataset  # the training views, epoch by epoch
        build_teacher_cache(
            accelerator,
            d.teacher_cache,
            key,
            distiller.teacher_logits,
            views,
            d.max_epochs,
            d.batch_size,
            cfg.data.num_workers,
        )
        return None
    names = ", ".join(e["checkpoint"] for e in entries)
    source = f"{len(teachers)} teacher(s): {names} ({sum(count_parameters(t) for t in teachers) / 1e6:.2f}M)"
    if cached:
        source = f"teacher logits from cache {d.teacher_cache} (top-{key['top_k']} of {names})"
    accelerator.print(
        f"student {d.student_backbone}: {count_parameters(student) / 1e6:.2f}M parameters; {source}; "
        f"soft loss {d.soft_loss}; feature pairs {pairs or 'none'}"
    )

    meta = CheckpointMeta(arch, classes, student_spec, teachers=[e["checkpoint"] for e in entries])
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    result = fit(
        accelerator,
        distiller,
        train_loader,
        val_loader,
        d,
        run_dir,
        meta,
        hparams=flat_hparams(cfg),
        resume=args.resume,
    )
    accelerator.print(f"best {result['monitor']} {result['best']:.4f}; checkpoint {run_dir / 'best.safetensors'}")
    return result


if __name__ == "__main__":
    main()
