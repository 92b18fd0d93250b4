"""KnowledgeDistillationLoss: alpha * CE(labels) + (1 - alpha) * soft + w * feature, the soft term one of
SOFT_LOSSES (KL, DKD, DIST; all in float32), the feature term one of FEATURE_LOSSES. The hard term sees labelled
samples only (label -1: unlabelled); the soft and feature terms see every sample."""

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from kd.config import ConfigError, DistillationConfig
from kd.config_rules import coerce, did_you_mean
from kd.data.mixing import hard_loss
from kd.distill.feature_losses import FEATURE_LOSSES
from kd.errors import quote


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_teacher || p_student) at temperature T, times T^2 (which keeps the gradient scale independent of T).
    "batchmean" as in timm and Hinton et al.; DeiT's sum / numel() is smaller by a factor of the class count."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * t * t


def _dkd_log_probs(logits: torch.Tensor, labels: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits.float() / t
    # -1000 (as in the official code) removes the target class yet keeps the KL finite: -inf would give 0 * inf = nan
    masked = z - 1000.0 * F.one_hot(labels, z.shape[1]).float()
    log_total = z.logsumexp(1, keepdim=True)
    # log-sum-exp, not the official log(sum of probabilities): no log(0) when a probability underflows
    log_binary = torch.cat([z.gather(1, labels[:, None]), masked.logsumexp(1, keepdim=True)], 1) - log_total
    return log_binary, F.log_softmax(masked, dim=1)


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float = 1.0,
    beta: float = 8.0,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): (alpha * TCKD + beta * NCKD) * T^2, without the warmup factor; each
    KL summed over classes and divided by the batch size, as in the official implementation."""
    t = temperature
    s_binary, s_other = _dkd_log_probs(student_logits, labels, t)
    t_binary, t_other = _dkd_log_probs(teacher_logits, labels, t)
    n = student_logits.shape[0]
    tckd = F.kl_div(s_binary, t_binary, reduction="sum", log_target=True) / n
    nckd = F.kl_div(s_other, t_other, reduction="sum", log_target=True) / n
    return (alpha * tckd + beta * nckd) * t * t


def _mean_pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean Pearson correlation of matching rows (eps as in the official code)."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)).mean()


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): T^2 * (beta * inter + gamma * intra), the Pearson correlations of
    softmax(z / T) across classes (inter) and across the batch (intra: 1 for a batch of one sample)."""
    t = temperature
    p_student = F.softmax(student_logits.float() / t, dim=1)
    p_teacher = F.softmax(teacher_logits.float() / t, dim=1)
    inter = 1 - _mean_pearson(p_student, p_teacher)
    intra = 1 - _mean_pearson(p_student.T, p_teacher.T)
    return (beta * inter + gamma * intra) * t * t


# A soft loss takes the logits and the temperature by these names (the labels too, when it names them) and returns a
# scalar; its other arguments are distillation.soft_loss_args. A new one is a function and an entry here.
SOFT_LOSSES = {"kl": soft_kl, "dkd": dkd_loss, "dist": dist_loss}
INPUTS = ("student_logits", "teacher_logits", "labels", "temperature")
# what each kind of loss is given by the code; the rest of its arguments come from distillation.<kind>_args
LOSS_TABLES = {"soft_loss": (SOFT_LOSSES, INPUTS), "feature_loss": (FEATURE_LOSSES, ("pairs",))}


def check_loss_config(d: DistillationConfig) -> None:
    """soft_loss / feature_loss name table entries and their *_args (mappings: kd.config checks that) only arguments
    of those functions, coerced in place to the annotated types. Else ConfigError."""
    for kind, (table, inputs) in LOSS_TABLES.items():
        name, args = getattr(d, kind), getattr(d, f"{kind}_args")
        if name not in table:
            hint = did_you_mean(str(name), [*table])
            raise ConfigError(
                f"distillation.{kind} must be {' | '.join(table)}, got {quote(name)}" + (f".{hint}" if hint else "")
            )
        arguments = {k: p for k, p in inspect.signature(table[name]).parameters.items() if k not in inputs}
        for key, value in args.items():
            if key not in arguments:
                raise ConfigError(
                    f"distillation.{kind}_args: {kind.replace('_', ' ')} {name} has no argument {quote(key)}; "
                    f"its arguments: {', '.join(arguments) or 'none'}"
                )
            args[key] = coerce(value, arguments[key].annotation, f"distillation.{kind}_args.{key}")


class KnowledgeDistillationLoss(nn.Module):
    """forward returns each term, their weighted sum ("loss") and the temperature. DKD and DIST add their term to a
    CE of weight 1; here it is (1 - alpha) * soft, so alpha rescales it. Over training (`set_progress`) the soft term
    ramps in over `soft_warmup_epochs` (DKD's warmup) and the temperature decays linearly to `final_temperature`."""

    def __init__(
        self,
        temperature: float = 4.0,
        alpha: float = 0.3,
        feature_weight: float = 0.5,
        soft_loss: str = "kl",
        soft_loss_args: dict | None = None,
        soft_warmup_epochs: float = 0.0,
        final_temperature: float | None = None,
        total_epochs: float = 1.0,
        label_smoothing: float = 0.0,
        feature_loss: str = "mse",
        feature_loss_args: dict | None = None,
    ):
        super().__init__()
        self.soft_function, self.soft_loss_args = SOFT_LOSSES[soft_loss], dict(soft_loss_args or {})
        self.soft_inputs = [k for k in INPUTS if k in inspect.signature(self.soft_function).parameters]
        self.feature_function, self.feature_loss_args = FEATURE_LOSSES[feature_loss], dict(feature_loss_args or {})
        self.temperature, self.alpha, self.feature_weight = temperature, alpha, feature_weight
        self.initial_temperature, self.final_temperature = temperature, final_temperature
        self.soft_warmup_epochs, self.total_epochs = soft_warmup_epochs, total_epochs
        self.label_smoothing = label_smoothing
        self.epoch = 0.0  # fractional epoch, from set_progress

    @classmethod
    def from_config(cls, d: DistillationConfig) -> "KnowledgeDistillationLoss":
        return cls(
            d.temperature,
            d.alpha,
            d.feature_weight,
            d.soft_loss,
            d.soft_loss_args,
            soft_warmup_epochs=d.dkd_warmup_epochs if d.soft_loss == "dkd" else 0.0,
            final_temperature=d.final_temperature,
            total_epochs=d.max_epochs,
            label_smoothing=d.label_smoothing,
            feature_loss=d.feature_loss,
            feature_loss_args=d.feature_loss_args,
        )

    def set_progress(self, epoch: float) -> None:
        self.epoch = epoch
        if self.final_temperature is not None:
            t0, t1 = self.initial_temperature, self.final_temperature
            self.temperature = t0 + (t1 - t0) * min(epoch / self.total_epochs, 1.0)

    def soft(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Warmup included, before the (1 - alpha) weight; an unlabelled sample's label is the teacher's top class."""
        if "labels" in self.soft_inputs:
            labels = torch.where(labels >= 0, labels, teacher.argmax(1))
        given = dict(zip(INPUTS, (student, teacher, labels, self.temperature)))
        warmup = min(self.epoch / self.soft_warmup_epochs, 1.0) if self.soft_warmup_epochs > 0 else 1.0
        return warmup * self.soft_function(**{k: given[k] for k in self.soft_inputs}, **self.soft_loss_args)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        feature_pairs: list[tuple[torch.Tensor, torch.Tensor]] = (),
        mix_label: torch.Tensor | None = None,
        mix_lambda: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        hard = hard_loss(student_logits, labels, self.label_smoothing, mix_label, mix_lambda)
        soft = self.soft(student_logits, teacher_logits, labels)
        loss = self.alpha * hard + (1 - self.alpha) * soft
        terms = {"hard": hard, "soft": soft}
        if feature_pairs:  # a run without feature matching has no feature term: nothing to log as 0
            terms["feature"] = self.feature_function(list(feature_pairs), **self.feature_loss_args)
            loss = loss + self.feature_weight * terms["feature"]
        terms["temperature"] = torch.tensor(float(self.temperature))  # logged: it follows the schedule
        return {"loss": loss, **terms}
