"""Distil frozen teacher(s) into a small RGB student: hard CE + soft KL/DKD/DIST at temperature T + feature matching.

accelerate launch distill.py --config configs/b0.yaml [section.key=value ...] [--resume]
python distill.py --config configs/b0.yaml distillation.max_epochs=5
python distill.py --config configs/b0.yaml --list-layers    # layer names, shapes and suggested pairs
python distill.py --config configs/b0.yaml --print-config   # every key, its value and meaning
python distill.py --config C distillation.teacher_cache=DIR --cache-teacher   # teacher top-k logits, once
python distill.py --config C distillation.teacher_cache=DIR                   # then distil from them
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kd.cli import parse_cli
from kd.config import Config, flat_hparams
from kd.errors import UserError, exit_on_user_error
from kd.train.run_dir import claim_run_dir, releases_run_dirs

# torch, timm, Accelerate and the kd modules that use them are imported in the functions that run after the command
# line is parsed: --help, --print-config and a misspelled key answer in a fraction of a second, not seconds.
if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch import nn
    from torch.utils.data import DataLoader

    from kd.data.dataset import InputSpec
    from kd.distill.hooks import FeaturePairs
    from kd.distill.teachers import TeacherCheckpoints


@exit_on_user_error
@releases_run_dirs
def main(argv: list[str] | None = None) -> dict | None:
    cfg, args = parse_cli(
        argv, "distill.py", "Distil frozen teacher(s) into an RGB student.", list_layers=True, cache_teacher=True
    )
    from accelerate.utils import set_seed

    from kd.distill.losses import check_loss_config
    from kd.train.state import stop_with_launcher

    stop_with_launcher()  # a rank of `accelerate launch` ends with its launcher, even one killed with -9
    check_loss_config(cfg.distillation)  # before anything is built
    set_seed(cfg.seed)  # first: every model and draw below depends on it, so two runs of one seed are bitwise equal
    if args.list_layers:
        return list_layers(cfg)
    if args.cache_teacher:
        return cache_teachers(cfg, argv)
    return train(cfg, args, argv)


def list_layers(cfg: Config) -> None:
    """distill.py --list-layers: both models' layers with their output shapes, and suggested feature_layers."""
    from kd.distill.hooks import print_layers
    from kd.distill.teachers import load_teachers

    d = cfg.distillation
    teachers = load_teachers(d)
    student, _, student_spec = build_student(cfg, teachers)
    f = d.feature_teacher
    print_layers(student, student_spec.image_size, teachers.modules[f], teachers.metas[f])


def cache_teachers(cfg: Config, argv: list[str] | None) -> None:
    """distill.py --cache-teacher: run the teachers once over every epoch's training views and store their top-k
    logits in distillation.teacher_cache, on the run's device and in its precision."""
    import functools

    from kd.distill.cache import check_applies
    from kd.distill.cache_build import build_teacher_cache
    from kd.distill.teachers import TeacherEnsemble, check_teachers, load_teachers, loader_input
    from kd.train.accelerator import make_accelerator

    d = cfg.distillation
    if not d.teacher_cache:
        raise UserError("--cache-teacher writes to distillation.teacher_cache: set it, e.g. teacher_cache=cache/b0")
    check_applies(d)
    teachers = load_teachers(d)
    _, _, student_spec = build_student(cfg, teachers)  # the views are made at the largest input, the student's too
    accelerator = make_accelerator(d, run_dir(cfg), seed=cfg.seed)
    train_loader, val_loader = build_loaders(cfg, teachers, student_spec, accelerator)
    check_teachers(teachers, val_loader, d.batch_size if d.teacher_sanity_check else 0, accelerator.print)
    ensemble = TeacherEnsemble(teachers.modules, teachers.weights, teachers.inputs)
    ensemble.to(accelerator.device, d.channels_last, d.compile)
    logits = functools.partial(ensemble.logits, source=loader_input(train_loader))
    key, views = teacher_cache_key(cfg, teachers, train_loader), train_loader.dataset
    build_teacher_cache(
        accelerator, d.teacher_cache, key, logits, views, d.max_epochs, d.batch_size, cfg.data.num_workers
    )


def train(cfg: Config, args: argparse.Namespace, argv: list[str] | None) -> dict:
    """Distil: the teachers (online, or their logits from distillation.teacher_cache) into a new student."""
    from kd.distill.cache import TeacherCache, check_applies, rebuild_command
    from kd.distill.distiller import Distiller
    from kd.distill.losses import KnowledgeDistillationLoss
    from kd.distill.teachers import CachedTeacher, TeacherEnsemble, check_teachers, load_teachers
    from kd.models.checkpoint import CheckpointMeta
    from kd.models.zoo import count_parameters
    from kd.train.accelerator import make_accelerator
    from kd.train.loop import fit

    d = cfg.distillation
    if d.teacher_cache:
        check_applies(d)
    teachers = load_teachers(d, online=not d.teacher_cache)
    student, arch, student_spec = build_student(cfg, teachers)
    claim_run_dir(run_dir(cfg), args.resume, d.resume == "auto", teachers.paths)  # fails now, not after training
    accelerator = make_accelerator(d, run_dir(cfg), seed=cfg.seed)
    train_loader, val_loader = build_loaders(cfg, teachers, student_spec, accelerator)
    check_teachers(teachers, val_loader, d.batch_size if d.teacher_sanity_check else 0, accelerator.print)
    cache = None
    if d.teacher_cache:  # it must hold exactly these training views
        rebuild = rebuild_command(argv or sys.argv[1:])
        cache = TeacherCache.open(
            d.teacher_cache, teacher_cache_key(cfg, teachers, train_loader), d.max_epochs, rebuild
        )
        teacher = CachedTeacher(cache)
    else:
        teacher = TeacherEnsemble(
            teachers.modules, teachers.weights, teachers.inputs, d.ema_teacher_weight, d.ema_teacher_start_epoch
        )

    student_input, feature_pairs = student_spec.rgb(), None
    if d.feature_matching and d.feature_layers:
        feature_pairs = match_features(cfg, student, teachers, train_loader, student_input)
    distiller = Distiller(student, teacher, KnowledgeDistillationLoss.from_config(d), feature_pairs, student_input)
    if cache is None:
        teacher.to(accelerator.device, d.channels_last, d.compile)
    accelerator.print(
        f"student {d.student_backbone}: {count_parameters(student) / 1e6:.2f}M parameters; "
        f"{teachers.describe(cache)}; soft loss {d.soft_loss}; "
        f"feature pairs {feature_pairs.pairs if feature_pairs else 'none'}"
    )

    meta = CheckpointMeta(arch, teachers.classes, student_spec, teachers=teachers.paths)
    result = fit(
        accelerator,
        distiller,
        train_loader,
        val_loader,
        d,
        run_dir(cfg),
        meta,
        hparams=flat_hparams(cfg),
        resume=args.resume,
        config=cfg,  # saved as config.yaml once the state to continue (if any) has loaded
    )
    best = run_dir(cfg) / "best.safetensors"
    accelerator.print(f"best {result['monitor']} {result['best']:.4f}; checkpoint {best}")
    return result


def run_dir(cfg: Config) -> Path:
    return Path(cfg.distillation.checkpoint_dir or f"runs/{cfg.name}")


def build_student(cfg: Config, teachers: TeacherCheckpoints) -> tuple[nn.Module, dict, InputSpec]:
    """(student, its arch, its input): null data.image_size/mean/std are the student's own. The arch records a
    dropout or stochastic depth only when set, so that it rebuilds the student exactly as older checkpoints do."""
    from kd.data.loaders import resolve_input
    from kd.models.zoo import build_model, input_config

    d = cfg.distillation
    arch = {"name": d.student_backbone, "num_classes": len(teachers.classes)}
    if d.student_drop_rate is not None:  # null: the timm model's own default, passed as nothing (as before)
        arch["drop_rate"] = d.student_drop_rate
    if d.student_drop_path_rate:
        arch["drop_path_rate"] = d.student_drop_path_rate
    student = build_model(arch, pretrained=d.student_pretrained)
    return student, arch, resolve_input(cfg.data, input_config(student))


def build_loaders(
    cfg: Config, teachers: TeacherCheckpoints, student_spec: InputSpec, accelerator: Accelerator
) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders in the teachers' class order, MS bands and statistics, so they see inputs
    exactly as they were trained on; Mixup / CutMix mix the one view teachers and student both see."""
    from kd.data.loaders import build_loader, prepare_data
    from kd.data.mixing import Mixing
    from kd.data.unlabeled import ShareSampler
    from kd.distill.teachers import input_specs

    d = cfg.distillation
    view_spec, val_spec = input_specs(student_spec, teachers, cfg.data.ms_bands, accelerator.print)
    with accelerator.main_process_first():
        prepare_data(cfg.data)
    loader_args = dict(classes=teachers.classes, seed=cfg.seed)
    mixing = Mixing.from_config(d, cfg.seed)
    train_loader = build_loader(
        cfg.data, view_spec, "train", d.batch_size, train=True, unlabeled=True, mixing=mixing, **loader_args
    )
    if isinstance(train_loader.sampler, ShareSampler):  # unlabelled images: the teachers label them
        accelerator.print(train_loader.sampler.describe())
    return train_loader, build_loader(cfg.data, val_spec, "val", d.batch_size, train=False, **loader_args)


def teacher_cache_key(cfg: Config, teachers: TeacherCheckpoints, train_loader: DataLoader) -> dict:
    """kd.distill.cache.cache_key of these teachers and the loader's training views."""
    from kd.distill.cache import cache_key

    entries = [{"checkpoint": c, "weight": w} for c, w in zip(teachers.paths, teachers.weights)]
    views, top_k = train_loader.dataset, cfg.distillation.teacher_cache_top_k
    return cache_key(entries, teachers.metas, views, cfg.data.root, teachers.inputs, top_k)


def match_features(
    cfg: Config, student: nn.Module, teachers: TeacherCheckpoints, train_loader: DataLoader, source: dict
) -> FeaturePairs:
    """Feature matching of distillation.feature_layers between the student and the feature teacher; a forward pass
    on two training views (normalized as `source`, the student's input, says) sizes the adapters, if the feature
    loss uses them."""
    from torch.utils.data import default_collate

    from kd.distill.feature_losses import uses_adapter
    from kd.distill.hooks import FeaturePairs
    from kd.distill.teachers import adapt_view

    d = cfg.distillation
    example = default_collate([train_loader.dataset[i] for i in range(2)])
    teacher, target = teachers.modules[d.feature_teacher], teachers.inputs[d.feature_teacher]
    student_batch, teacher_batch = adapt_view(example, source, source), adapt_view(example, source, target)
    return FeaturePairs(d.feature_layers, student, teacher, student_batch, teacher_batch, uses_adapter(d.feature_loss))


if __name__ == "__main__":
    main()
