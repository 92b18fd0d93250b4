"""Distiller: the task (kd/train/task.py) kd.train.loop.fit trains when distilling."""

import torch
from torch import nn

from kd.distill.hooks import FeaturePairs
from kd.distill.losses import KnowledgeDistillationLoss
from kd.distill.teachers import Teacher, adapt_view


class Distiller(nn.Module):
    """Student + adapters are submodules (trained, checkpointed, wrapped by DDP); the teachers are not, so
    nn.Module.train never reaches them. A batch is one view at the largest input size of all models, normalized as
    `student_input` says; the student gets it resized to its own, the teachers prepare it for each of theirs."""

    def __init__(
        self,
        student: nn.Module,
        teachers: Teacher,
        loss: KnowledgeDistillationLoss,
        feature_pairs: FeaturePairs | None = None,
        student_input: dict | None = None,
    ):
        super().__init__()
        self.student, self.teachers, self.loss = student, teachers, loss
        self.feature_pairs, self.student_input = feature_pairs, student_input
        self.adapters = feature_pairs.adapters if feature_pairs else nn.ModuleList()

    @property
    def model(self) -> nn.Module:
        return self.student

    def set_model(self, student: nn.Module) -> None:
        """QAT's graph, sharing the student's parameters: its blocks are traced away, so feature matching stops."""
        self.student = student
        if self.feature_pairs:
            self.feature_pairs.remove()
            self.feature_pairs = None

    def set_ema(self, ema_model: nn.Module) -> None:
        self.teachers.set_ema(ema_model)

    def set_progress(self, epoch: float) -> None:
        self.loss.set_progress(epoch)
        self.teachers.set_progress(epoch)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        teacher_logits = self.teachers.logits(batch, self.student_input)
        student_logits = self.student(adapt_view(batch, self.student_input, self.student_input)["rgb"])
        feature_pairs = self.feature_pairs.pop() if self.feature_pairs else []
        # a mixed batch (kd/data/mixing.py) carries its partners' labels and lambda, for the hard term
        mixed = {key: batch[key] for key in ("mix_label", "mix_lambda") if key in batch}
        terms = self.loss(student_logits, teacher_logits, batch["label"], feature_pairs, **mixed)
        terms["logits"] = student_logits
        return terms
