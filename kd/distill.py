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
    ):
        super().__init__()
        self.student, self.loss = student, loss
        self.teachers = tuple(t.eval().requires_grad_(False) for t in teachers)
        self.teacher_weights = normalize_weights(teacher_weights, len(self.teachers))
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

    @torch.no_grad()
    def teacher_logits(self, batch: dict) -> torch.Tensor:
        logits = [forward_batch(t, batch) for t in self.teachers]
        return logits[0].float() if len(logits) == 1 else weighted_logits(logits, self.teacher_weights)

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
        terms["logits"] = student_logits
        return terms

    def predict(self, batch: dict) -> torch.Tensor:
        return self.student(batch["rgb"])
