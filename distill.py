"""Distil frozen teacher(s) into a small RGB student: hard CE + soft KL/DKD/DIST at temperature T + feature matching.

accelerate launch distill.py --config configs/b0.yaml [section.key=value ...] [--resume]
python distill.py --config configs/b0.yaml distillation.max_epochs=5
python distill.py --config configs/b0.yaml --list-layers    # layer names, shapes and suggested pairs
python distill.py --config configs/b0.yaml --print-config   # every key, its value and meaning
python distill.py --config C distillation.teacher_cache=DIR --cache-teacher   # teacher top-k logits, once
python distill.py --config C distillation.teacher_cache=DIR                   # then distil from them
"""

import sys
from pathlib import Path

from accelerate.utils import set_seed
from torch.utils.data import default_collate

from kd.cli import parse_cli
from kd.config import flat_hparams
from kd.data.dataset import build_loader, prepare_data, resolve_input
from kd.data.mixing import Mixing
from kd.data.unlabeled import ShareSampler
from kd.distill.cache import rebuild_command
from kd.distill.distiller import Distiller
from kd.distill.hooks import print_layers
from kd.distill.losses import KnowledgeDistillationLoss
from kd.distill.teachers import load_teachers
from kd.errors import UserError, exit_on_user_error
from kd.models.checkpoint import CheckpointMeta
from kd.models.zoo import build_model, count_parameters, input_config
from kd.train.accelerator import make_accelerator
from kd.train.loop import fit
from kd.train.run_dir import claim_run_dir, releases_run_dirs
from kd.train.state import stop_with_launcher


@exit_on_user_error
@releases_run_dirs
def main(argv: list[str] | None = None) -> dict | None:
    stop_with_launcher()  # a rank of `accelerate launch` ends with its launcher, even one killed with -9
    cfg, args = parse_cli(
        argv, "distill.py", "Distil frozen teacher(s) into an RGB student.", list_layers=True, cache_teacher=True
    )
    set_seed(cfg.seed)  # first: every model and draw below depends on it, so two runs of one seed are bitwise equal
    d = cfg.distillation
    run_dir = Path(d.checkpoint_dir or f"runs/{cfg.name}")
    if args.cache_teacher and not d.teacher_cache:
        raise UserError("--cache-teacher writes to distillation.teacher_cache: set it, e.g. teacher_cache=cache/b0")

    # teachers: frozen checkpoints (one, or a weighted ensemble), or their logits from distillation.teacher_cache
    teachers = load_teachers(cfg, online=args.list_layers or args.cache_teacher)
    arch = {"name": d.student_backbone, "num_classes": len(teachers.classes)}
    student = build_model(arch, pretrained=d.student_pretrained)
    student_spec = resolve_input(cfg.data, input_config(student))  # null image_size/mean/std: the student's own
    if args.list_layers:
        f = d.feature_teacher
        return print_layers(student, student_spec.image_size, teachers.modules[f], teachers.metas[f])

    if not args.cache_teacher:  # fails now, not after training (--list-layers and --cache-teacher write no run)
        claim_run_dir(run_dir, args.resume, d.resume == "auto", teachers.checkpoints)
    accelerator = make_accelerator(d, run_dir, seed=cfg.seed)

    # data: the teachers' class order, MS bands and statistics, so they see inputs exactly as they were trained on
    view_spec, val_spec = teachers.input_specs(student_spec, cfg.data.ms_bands, accelerator.print)
    with accelerator.main_process_first():
        prepare_data(cfg.data)
    loader_args = dict(classes=teachers.classes, seed=cfg.seed)
    mixing = Mixing.from_config(d, cfg.seed)  # Mixup / CutMix: teachers and student see the one mixed view
    train_loader = build_loader(
        cfg.data, view_spec, "train", d.batch_size, train=True, unlabeled=True, mixing=mixing, **loader_args
    )
    if isinstance(train_loader.sampler, ShareSampler):  # unlabelled images: the teachers label them
        accelerator.print(train_loader.sampler.describe())
    val_loader = build_loader(cfg.data, val_spec, "val", d.batch_size, train=False, **loader_args)
    teachers.check(train_loader, val_loader, rebuild_command(argv or sys.argv[1:]), accelerator.print)
    if args.cache_teacher:
        return teachers.build_cache(accelerator, train_loader)

    student_input, feature_pairs = student_spec.rgb(), None
    if d.feature_matching and d.feature_layers:  # a forward pass on two training views sizes the adapters
        example = default_collate([train_loader.dataset[i] for i in range(2)])
        feature_pairs = teachers.feature_pairs(d.feature_layers, student, example, student_input, d.feature_teacher)
    loss = KnowledgeDistillationLoss.from_config(d)
    distiller = Distiller(student, teachers, loss, feature_pairs, student_input)
    teachers.to(accelerator.device, d.channels_last, d.compile)
    accelerator.print(
        f"student {d.student_backbone}: {count_parameters(student) / 1e6:.2f}M parameters; {teachers.describe()}; "
        f"soft loss {d.soft_loss}; feature pairs {feature_pairs.pairs if feature_pairs else 'none'}"
    )

    meta = CheckpointMeta(arch, teachers.classes, student_spec, teachers=teachers.checkpoints)
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
        config=cfg,  # saved as config.yaml once the state to continue (if any) has loaded
    )
    accelerator.print(f"best {result['monitor']} {result['best']:.4f}; checkpoint {run_dir / 'best.safetensors'}")
    return result


if __name__ == "__main__":
    main()
