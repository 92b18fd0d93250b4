"""The learning-rate schedule: timm's scheduler of `lr_scheduler` by name, then a constant fine-tune phase."""

import torch
from timm.scheduler import create_scheduler_v2

from kd.config import TrainConfig


class LRSchedule:
    """timm's schedule, then a constant LR (learning_rate × finetune_lr_scale) for the last finetune_epochs."""

    def __init__(self, scheduler, optimizer: torch.optim.Optimizer, cfg: TrainConfig):
        self.scheduler, self.optimizer = scheduler, optimizer
        self.finetune_epoch = cfg.max_epochs - cfg.finetune_epochs
        self.finetune_lr = cfg.learning_rate * cfg.finetune_lr_scale
        self.finetuning = False

    def set_epoch(self, epoch: int) -> None:
        self.finetuning = epoch >= self.finetune_epoch
        if self.finetuning:
            for group in self.optimizer.param_groups:
                group["lr"] = self.finetune_lr

    def step_update(self, num_updates: int) -> None:
        if not self.finetuning:
            self.scheduler.step_update(num_updates)

    def step(self, epoch: int, metric: float) -> None:
        if not self.finetuning:
            self.scheduler.step(epoch, metric)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, updates_per_epoch: int) -> LRSchedule:
    """timm's create_scheduler_v2 `lr_scheduler` after a linear warmup, over max_epochs - finetune_epochs, stepped
    every optimizer update except plateau (per epoch: it needs the validation metric)."""
    per_epoch = cfg.lr_scheduler == "plateau"
    unit = 1 if per_epoch else updates_per_epoch
    main_epochs = cfg.max_epochs - cfg.finetune_epochs
    cycle = max(1, round((main_epochs - cfg.warmup_epochs) * unit / cfg.lr_cycles))
    # multistep: kd has no list of milestones to configure; it decays every lr_step_size epochs
    milestones = [epoch * unit for epoch in range(cfg.lr_step_size, main_epochs, cfg.lr_step_size)]
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.lr_scheduler,
        num_epochs=cycle,
        decay_epochs=cfg.lr_step_size * unit,
        decay_milestones=milestones,
        decay_rate=cfg.lr_gamma,
        min_lr=cfg.min_lr,
        warmup_lr=cfg.learning_rate * 1e-3,
        warmup_epochs=cfg.warmup_epochs * unit,
        warmup_prefix=True,
        cycle_limit=cfg.lr_cycles,
        cycle_decay=cfg.lr_cycle_decay,
        plateau_mode=cfg.mode,
        patience_epochs=max(1, cfg.lr_step_size // 10),
        step_on_epochs=per_epoch,
        updates_per_epoch=1,
    )
    return LRSchedule(scheduler, optimizer, cfg)
