"""Distiller: a trainable student (+ feature adapters) and frozen teachers; one call on a batch gives the loss terms."""

from collections.abc import Sequence

import torch
from torch import nn

from kd.ensemble import normalize_weights, weighted_logits
from kd.features import FeatureAdapter, FeatureHooks, feature_shapes
from kd.losses import KnowledgeDistillationLoss
from kd.models import forward_batch, input_keys


class Distiller(nn.Module):
    """Student + adapters are registered submodules (trained, checkpointed, wrapped by DDP); teachers are not.

    Teachers are kept in a plain tuple on purpose: DDP would otherwise broadcast their buffers every step, the
    optimizer would see their parameters, and the state dict would carry them. They stay in eval mode and run
    under no_grad whatever `.train()` is called with.
    """

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[nn.Module],
        loss: KnowledgeDistillationLoss,
        teacher_weights: Sequence[float] | None = None,
        layer_pairs: Sequence[tuple[str, str]] = (),
        feature_teacher: int = 0,
        example_batch: dict | None = None,
        final_temperature: float | None = None,
        total_epochs: int = 1,
        ema_teacher_weight: float = 0.0,
        ema_teacher_start_epoch: float = 1.0,
    ):
        super().__init__()
        self.student, self.loss = student, loss
        self.teachers = tuple(t.eval().requires_grad_(False) for t in teachers)
        self.teacher_weights = list(teacher_weights) if teacher_weights is not None else [1.0] * len(self.teachers)
        normalize_weights(self.teacher_weights, len(self.teachers))  # validates
        self.initial_temperature, self.final_temperature = loss.temperature, final_temperature
        self.total_epochs = total_epochs
        self.ema_teacher: tuple[nn.Module, ...] = ()  # set by the loop (set_ema); a tuple keeps it unregistered
        self.ema_teacher_weight, self.ema_teacher_start_epoch = ema_teacher_weight, ema_teacher_start_epoch
        self.epoch = 0.0
        self.layer_pairs, self.feature_teacher = list(layer_pairs), feature_teacher
        self.adapters = nn.ModuleList()
        if self.layer_pairs:
            if example_batch is None:
                raise ValueError("feature matching needs an example batch to size the adapters")
            teacher = self.teachers[feature_teacher]
            s_shapes = feature_shapes(student, [s for s, _ in self.layer_pairs], [example_batch["rgb"]])
            t_shapes = feature_shapes(
                teacher, [t for _, t in self.layer_pairs], [example_batch[k] for k in input_keys(teacher)]
            )
            self.adapters.extend(FeatureAdapter(s_shapes[s][1], t_shapes[t][1]) for s, t in self.layer_pairs)
            self.student_hooks = FeatureHooks(student, [s for s, _ in self.layer_pairs])
            self.teacher_hooks = FeatureHooks(teacher, [t for _, t in self.layer_pairs])

    @property
    def model(self) -> nn.Module:
        """What gets checkpointed and exported: the student alone."""
        return self.student

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        for t in self.teachers:
            t.eval()
        return self

    def teachers_to(self, device: torch.device) -> None:
        self.teachers = tuple(t.to(device) for t in self.teachers)

    def set_model(self, student: nn.Module) -> None:
        """Swap in a graph that shares the student's parameters (quantization-aware training). Its blocks are
        traced away, so feature matching stops; the logit terms carry on."""
        self.student = student
        if self.layer_pairs:
            self.student_hooks.remove()
            self.teacher_hooks.remove()
            self.layer_pairs = []
            self.loss.feature_weight = 0.0

    def set_ema(self, ema_model: nn.Module) -> None:
        """Self-distillation: the student's EMA joins the teachers (when ema_teacher_weight > 0)."""
        if self.ema_teacher_weight > 0:
            self.ema_teacher = (ema_model,)

    def set_progress(self, epoch: float) -> None:
        """Called by the loop before each step: temperature schedule, loss warmups, EMA teacher start."""
        self.epoch = self.loss.epoch = epoch
        if self.final_temperature is not None:  # linear decay from the initial to the final temperature
            fraction = min(epoch / self.total_epochs, 1.0)
            t0, t1 = self.initial_temperature, self.final_temperature
            self.loss.temperature = t0 + (t1 - t0) * fraction

    @torch.no_grad()
    def teacher_logits(self, batch: dict) -> torch.Tensor:
        """The teachers' logits, averaged with their normalized weights (the EMA teacher included once active)."""
        logits = [forward_batch(t, batch) for t in self.teachers]
        weights = list(self.teacher_weights)
        if self.ema_teacher and self.epoch >= self.ema_teacher_start_epoch:
            logits.append(forward_batch(self.ema_teacher[0], batch))
            weights.append(self.ema_teacher_weight)
        return logits[0].float() if len(logits) == 1 else weighted_logits(logits, weights)

    def forward(self, batch: dict) -> dict:
        teacher_logits = self.teacher_logits(batch)
        student_logits = self.student(batch["rgb"])
        feature_pairs = []
        for adapter, (s_name, t_name) in zip(self.adapters, self.layer_pairs):
            teacher_features = self.teacher_hooks.pop(t_name)
            feature_pairs.append(
                (adapter(self.student_hooks.pop(s_name), teacher_features.shape[-2:]), teacher_features)
            )
        terms = self.loss(student_logits, teacher_logits, batch["label"], feature_pairs)
        terms["temperature"] = torch.tensor(float(self.loss.temperature))
        terms["logits"] = student_logits
        return terms

    def predict(self, batch: dict) -> torch.Tensor:
        return self.student(batch["rgb"])


@torch.no_grad()
def teacher_sanity_check(teacher: nn.Module, batch: dict, num_classes: int) -> dict:
    """Logit statistics and accuracy of a teacher on one batch, and whether that is clearly better than chance.

    "Clearly" means more than two standard errors above 1 / num_classes: a wrong checkpoint or class order
    lands at chance, a working teacher far above it.
    """
    logits = forward_batch(teacher.eval(), batch).float()
    n = batch["label"].numel()
    accuracy = (logits.argmax(1) == batch["label"]).float().mean().item()
    chance = 1.0 / num_classes
    threshold = chance + 2 * (chance * (1 - chance) / n) ** 0.5
    return {
        "logit_mean": logits.mean().item(),
        "logit_std": logits.std().item(),
        "accuracy": accuracy,
        "samples": n,
        "chance": chance,
        "better_than_chance": accuracy > threshold,
    }
