"""Distiller: what kd.train.loop.fit trains when distilling (the task protocol of kd/train/task.py). A student,
with the feature adapters, is trained; the teachers are frozen and kept outside it; one call on a batch gives the
loss terms."""

import torch
from torch import nn

from kd.distill.hooks import FeaturePairs
from kd.distill.losses import KnowledgeDistillationLoss
from kd.distill.teachers import Teacher, adapt_view


class Distiller(nn.Module):
    """Student + adapters are registered submodules (trained, checkpointed, wrapped by DDP); the teachers are not,
    so nn.Module.train never reaches them and they stay in eval mode.

    Training batches are one augmented view, normalized as `student_input` ({"image_size", "mean", "std"}) says, at
    the largest input size of all models: the student gets it resized to its own size, the teachers (a
    TeacherEnsemble or a CachedTeacher) take it as it comes and prepare it for each; a Mixup / CutMix batch is mixed
    before either sees it, so both see the one mixed view. Unlabelled samples (label -1) add to the soft and feature
    terms only. The loss owns the temperature and warm-up schedules, the teachers the EMA teacher's start:
    `set_progress` reaches both.
    """

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
        # the adapters train with the student: registered here, the optimizer, DDP and checkpoints see them
        self.adapters = feature_pairs.adapters if feature_pairs else nn.ModuleList()

    @property
    def model(self) -> nn.Module:
        """What gets checkpointed and exported: the student alone."""
        return self.student

    def set_model(self, student: nn.Module) -> None:
        """Swap in a graph that shares the student's parameters (quantization-aware training). Its blocks are
        traced away, so feature matching stops; the logit terms carry on."""
        self.student = student
        if self.feature_pairs:
            self.feature_pairs.remove()
            self.feature_pairs = None

    def set_ema(self, ema_model: nn.Module) -> None:
        """Self-distillation: the student's EMA, which joins the teachers when they give it a weight."""
        self.teachers.set_ema(ema_model)

    def set_progress(self, epoch: float) -> None:
        """Called by the loop before each step with the fractional epoch."""
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
