"""What kd.train.loop.fit trains: the TrainingTask protocol, and Classifier, the plain supervised task (the Distiller,
kd/distill/distiller.py, is the distilling one)."""

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from kd.data.mixing import hard_loss
from kd.models.zoo import forward_batch


@runtime_checkable
class TrainingTask(Protocol):
    """Every name the loop calls on what it trains (as timm's TrainingTask); a hook a task has no use for is a
    no-op. A task is an nn.Module: the optimizer trains its parameters and DDP wraps it."""

    @property
    def model(self) -> nn.Module:
        """The network that validation measures and checkpoints store."""

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        """{"loss": what the optimizer minimizes, "logits": the model's, and any named loss terms (all logged)}."""

    def train(self, mode: bool = True) -> nn.Module:
        """Training or evaluation mode, as nn.Module.train."""

    def set_progress(self, epoch: float) -> None:
        """Called before every step with the epoch reached (fractional): temperature schedules, loss warm-ups."""

    def set_ema(self, module: nn.Module) -> None:
        """The EMA copy of the model, when the run keeps one (self-distillation)."""

    def set_model(self, module: nn.Module) -> None:
        """Train `module` from now on: a graph that shares the model's parameters (quantization-aware training)."""


class Classifier(nn.Module):
    """Plain supervised training (teachers, baseline students): cross-entropy on the labels."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def forward(self, batch: dict) -> dict:
        logits = forward_batch(self.model, batch)
        hard = hard_loss(logits, batch["label"], self.label_smoothing, batch.get("mix_label"), batch.get("mix_lambda"))
        return {"loss": hard, "hard": hard, "logits": logits}

    def set_progress(self, epoch: float) -> None: ...  # cross-entropy has no schedule

    def set_ema(self, module: nn.Module) -> None: ...  # the EMA is the loop's to validate and save

    def set_model(self, model: nn.Module) -> None:
        self.model = model
