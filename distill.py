"""Distil frozen teacher(s) into a small RGB student: hard CE + soft KL at temperature T + feature matching.

accelerate launch distill.py --config configs/b0.yaml [section.key=value ...] [--resume]
python distill.py --config configs/b0.yaml distillation.max_epochs=5
"""

from pathlib import Path

from accelerate.utils import set_seed
from torch.utils.data import default_collate

from kd.config import flat_hparams, parse_cli, save_config
from kd.data import build_loader, prepare_data
from kd.distill import Distiller
from kd.errors import UserError, exit_on_user_error
from kd.features import layer_pairs
from kd.loop import fit, make_accelerator
from kd.losses import KnowledgeDistillationLoss
from kd.models import build_model, count_parameters, load_checkpoint


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    cfg, args = parse_cli(argv, "Distil frozen teacher(s) into an RGB student.")
    d = cfg.distillation
    run_dir = Path(d.checkpoint_dir or f"runs/{cfg.name}")
    accelerator = make_accelerator(d, run_dir)
    set_seed(cfg.seed)

    # teachers: rebuilt from their safetensors + JSON checkpoints, frozen; they must share one class list
    entries = d.teachers or [{"checkpoint": d.teacher_checkpoint, "weight": 1.0}]
    loaded = [load_checkpoint(e["checkpoint"]) for e in entries]
    teachers, metas = [m for m, _ in loaded], [meta for _, meta in loaded]
    classes = metas[0]["classes"]
    for entry, meta in zip(entries, metas):
        if meta["classes"] != classes:
            raise UserError(
                f"teacher {entry['checkpoint']} has classes {meta['classes']}, "
                f"but {entries[0]['checkpoint']} has {classes}"
            )
    ms_meta = next((m for m in metas if "ms" in m["inputs"]), None)
    with_ms = ms_meta is not None

    # data: the teacher's class order and MS statistics, so it sees inputs exactly as it was trained on
    with accelerator.main_process_first():
        prepare_data(cfg.data)
    ms_stats = (ms_meta["ms_mean"], ms_meta["ms_std"]) if with_ms else None
    loader_args = dict(classes=classes, with_ms=with_ms, ms_stats=ms_stats, seed=cfg.seed)
    train_loader = build_loader(cfg.data, "train", d.batch_size, train=True, **loader_args)
    val_loader = build_loader(cfg.data, "val", d.batch_size, train=False, **loader_args)

    spec = {"name": d.student_backbone, "num_classes": len(classes)}
    student = build_model(spec, pretrained=d.student_pretrained)
    pairs = layer_pairs(d.feature_layers, student, teachers[d.feature_teacher]) if d.feature_matching else []
    example = default_collate([val_loader.dataset[i] for i in range(2)])
    loss = KnowledgeDistillationLoss(d.temperature, d.alpha, d.feature_weight if pairs else 0.0)
    distiller = Distiller(
        student,
        teachers,
        loss,
        [e.get("weight", 1.0) for e in entries],
        pairs,
        d.feature_teacher,
        example_batch=example,
    )
    distiller.teachers_to(accelerator.device)
    accelerator.print(
        f"student {d.student_backbone}: {count_parameters(student) / 1e6:.2f}M parameters; "
        f"{len(teachers)} teacher(s): {', '.join(e['checkpoint'] for e in entries)} "
        f"({sum(count_parameters(t) for t in teachers) / 1e6:.2f}M); feature pairs {pairs or 'none'}"
    )

    meta = {
        "arch": spec,
        "classes": classes,
        "inputs": ["rgb"],
        "image_size": cfg.data.image_size,
        "mean": cfg.data.mean,
        "std": cfg.data.std,
        "ms_mean": None,
        "ms_std": None,
        "teachers": [e["checkpoint"] for e in entries],
    }
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
