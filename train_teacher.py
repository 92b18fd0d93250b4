"""Train a teacher (the RGB+MS HybridFusion, or any timm model) or an RGB baseline student with plain cross-entropy.

python train_teacher.py --config configs/teacher.yaml [section.key=value ...] [--resume]
python train_teacher.py --config configs/teacher.yaml --print-config   # every key, its value and meaning
accelerate launch train_teacher.py --config configs/teacher.yaml
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from kd.cli import parse_cli
from kd.config import Config, flat_hparams
from kd.errors import UserError, exit_on_user_error
from kd.train.run_dir import claim_run_dir, releases_run_dirs

# torch, timm, Accelerate and the kd modules that use them are imported in the functions that run after the command
# line is parsed: --help, --print-config and a misspelled key answer in a fraction of a second, not seconds.
if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

    from kd.data.dataset import InputSpec


def architecture(cfg: Config, num_classes: int) -> dict:
    """The model's spec: it travels in the checkpoint's JSON, so evaluate.py and distill.py can rebuild the model."""
    arch = {"name": cfg.model.name, "num_classes": num_classes, "drop_rate": cfg.model.drop_rate}
    if cfg.model.drop_path_rate:  # recorded only when set: 0 is every model's default, and older checkpoints lack it
        arch["drop_path_rate"] = cfg.model.drop_path_rate
    if cfg.model.name == "hybrid":
        arch.update(
            backbone=cfg.model.backbone,
            ms_backbone=cfg.model.ms_backbone,
            ms_channels=cfg.model.ms_channels,
            fusion=cfg.model.fusion,
        )
    return arch


def input_spec_for(cfg: Config, model: torch.nn.Module, train_set: Dataset) -> InputSpec:
    """How images are fed: the config's, null image_size/mean/std the model's own; the hybrid model's MS bands are
    normalized with statistics of the training split only."""
    from kd.data.dataset import ms_statistics
    from kd.data.loaders import resolve_input
    from kd.models.zoo import input_config

    input_spec = resolve_input(cfg.data, input_config(model))
    if cfg.model.name != "hybrid":
        return input_spec
    ms_mean, ms_std = ms_statistics(train_set)
    if len(ms_mean) != cfg.model.ms_channels:
        raise UserError(
            f"the MS stacks have {len(ms_mean)} bands (after data.ms_bands), but model.ms_channels is "
            f"{cfg.model.ms_channels}: set model.ms_channels={len(ms_mean)} or select bands with data.ms_bands"
        )
    return dataclasses.replace(input_spec, ms_mean=ms_mean, ms_std=ms_std, ms_bands=cfg.data.ms_bands)


@exit_on_user_error
@releases_run_dirs
def main(argv: list[str] | None = None) -> dict:
    cfg, args = parse_cli(argv, "train_teacher.py", "Train a teacher or a baseline student with cross-entropy.")
    from accelerate.utils import set_seed

    from kd.data.loaders import build_loader, open_split, prepare_data
    from kd.data.mixing import Mixing
    from kd.data.unlabeled import ignored_note
    from kd.models.checkpoint import CheckpointMeta
    from kd.models.zoo import build_model, count_parameters
    from kd.train.accelerator import make_accelerator
    from kd.train.loop import fit
    from kd.train.state import stop_with_launcher
    from kd.train.task import Classifier

    stop_with_launcher()  # a rank of `accelerate launch` ends with its launcher, even one killed with -9
    set_seed(cfg.seed)  # first: every model and draw below depends on it, so two runs of one seed are bitwise equal
    run_dir = Path(cfg.train.checkpoint_dir or f"runs/{cfg.name}")
    claim_run_dir(run_dir, args.resume, cfg.train.resume == "auto")  # fails now, not after training
    accelerator = make_accelerator(cfg.train, run_dir, seed=cfg.seed)

    # data: any layout, unreadable files found up front; the hybrid model also reads the MS band stack of each image
    with accelerator.main_process_first():
        prepare_data(cfg.data)
    train_set = open_split(cfg.data, "train", with_ms=cfg.model.name == "hybrid")
    classes = train_set.classes
    arch = architecture(cfg, len(classes))
    model = build_model(arch, pretrained=cfg.model.pretrained)
    input_spec = input_spec_for(cfg, model, train_set)
    loader_args = dict(classes=classes, seed=cfg.seed)
    mixing = Mixing.from_config(cfg.train, cfg.seed)  # Mixup / CutMix, as for the students
    train_loader = build_loader(
        cfg.data, input_spec, "train", cfg.train.batch_size, train=True, dataset=train_set, mixing=mixing, **loader_args
    )
    if note := ignored_note(cfg.data):
        accelerator.print(note)
    val_loader = build_loader(cfg.data, input_spec, "val", cfg.train.batch_size, train=False, **loader_args)
    accelerator.print(
        f"{cfg.model.name} ({cfg.model.backbone if cfg.model.name == 'hybrid' else 'rgb'}): "
        f"{count_parameters(model) / 1e6:.2f}M parameters, {len(classes)} classes, "
        f"{len(train_loader.dataset)} train / {len(val_loader.dataset)} val images at {input_spec.image_size} px"
    )

    task = Classifier(model, label_smoothing=cfg.train.label_smoothing)
    meta = CheckpointMeta(arch=arch, classes=classes, input_spec=input_spec)
    result = fit(
        accelerator,
        task,
        train_loader,
        val_loader,
        cfg.train,
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
