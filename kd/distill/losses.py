"""KnowledgeDistillationLoss: alpha * CE(labels) + (1 - alpha) * soft + w * feature.

The soft term is one function of SOFT_LOSSES: classic KL (Hinton et al.), DKD (Zhao et al., CVPR 2022) or DIST
(Huang et al., NeurIPS 2022). All are computed in float32, whatever the autocast dtype of the logits. The feature
term is one function of kd.distill.feature_losses.FEATURE_LOSSES (MSE of adapted features, attention, RKD).
`check_loss_config` checks both names and their arguments when a run starts.
The hard term (`hard_loss`) sees the labelled samples of a batch only (an unlabelled one has label -1), with label
smoothing and the mixed labels of Mixup / CutMix (kd/data/mixing.py); the soft and feature terms see every sample.
"""

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
    """KL(p_teacher || p_student) at temperature T, averaged over the batch, times T^2.

    The reduction is stated once, here: summed over classes, averaged over samples ("batchmean", as in timm and
    Hinton et al.); DeiT's sum / numel() is smaller by a factor of the class count. T^2 keeps the gradient scale
    of the soft term independent of T.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * t * t


def _dkd_log_probs(logits: torch.Tensor, labels: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log of the binary (target, non-target) distribution and of the distribution among non-target classes."""
    z = logits.float() / t
    # as in the official code, -1000 removes the target class from the softmax yet keeps the KL finite (-inf would
    # give 0 * inf = nan in kl_div with log targets)
    masked = z - 1000.0 * F.one_hot(labels, z.shape[1]).float()
    log_total = z.logsumexp(1, keepdim=True)
    # log-sum-exp instead of the official log(sum of probabilities): no log(0) when a probability underflows
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
    """Decoupled KD (Zhao et al., CVPR 2022): (alpha * TCKD + beta * NCKD) * T^2, without the warmup factor.

    TCKD = KL(b_teacher || b_student) with b = [p_target, 1 - p_target] from softmax(z / T); NCKD = KL between
    teacher and student softmax(z / T) over the non-target classes only. Each KL is summed over classes and
    divided by the batch size, as in the official implementation. labels are class indices, shape (N,).
    """
    t = temperature
    s_binary, s_other = _dkd_log_probs(student_logits, labels, t)
    t_binary, t_other = _dkd_log_probs(teacher_logits, labels, t)
    n = student_logits.shape[0]
    tckd = F.kl_div(s_binary, t_binary, reduction="sum", log_target=True) / n
    nckd = F.kl_div(s_other, t_other, reduction="sum", log_target=True) / n
    return (alpha * tckd + beta * nckd) * t * t


def _mean_pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over rows of the Pearson correlation between matching rows of a and b (eps as in the official code)."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)).mean()


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): T^2 * (beta * inter + gamma * intra), with p = softmax(z / T).

    inter = 1 - mean over samples of the Pearson correlation of student and teacher p across classes (rows);
    intra = 1 - mean over classes of the Pearson correlation across the batch (columns). The paper's default is
    tau = T = 1. intra needs a batch of more than one sample (a single row has no variance: intra is then 1).
    """
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
LOSS_TABLES = {"soft_loss": (SOFT_LOSSES, INPUTS, "beta: 2.0"), "feature_loss": (FEATURE_LOSSES, ("pairs",), "p: 2.0")}


def loss_arguments(function, inputs: tuple[str, ...]) -> dict[str, inspect.Parameter]:
    """The arguments of a loss beside the `inputs` the code gives it: what its distillation.*_args may set."""
    return {k: p for k, p in inspect.signature(function).parameters.items() if k not in inputs}


def check_loss_config(d: DistillationConfig) -> None:
    """distillation.soft_loss and feature_loss name entries of SOFT_LOSSES and FEATURE_LOSSES, and their *_args
    only arguments of those functions, with values of the annotated types (coerced in place). Else ConfigError."""
    for kind, (table, inputs, example) in LOSS_TABLES.items():
        name, args = getattr(d, kind), getattr(d, f"{kind}_args")
        if name not in table:
            hint = did_you_mean(str(name), [*table])
            raise ConfigError(
                f"distillation.{kind} must be {' | '.join(table)}, got {quote(name)}" + (f".{hint}" if hint else "")
            )
        if not isinstance(args, dict):
            raise ConfigError(
                f"distillation.{kind}_args must be a mapping of argument names to values, e.g. {{{example}}}, "
                f"got {quote(args)}"
            )
        arguments = loss_arguments(table[name], inputs)
        for key, value in args.items():
            if key not in arguments:
                raise ConfigError(
                    f"distillation.{kind}_args: {kind.replace('_', ' ')} {name} has no argument {quote(key)}; "
                    f"its arguments: {', '.join(arguments) or 'none'}"
                )
            args[key] = coerce(value, arguments[key].annotation, f"distillation.{kind}_args.{key}")


class KnowledgeDistillationLoss(nn.Module):
    """Hard, soft and feature terms of KD; forward returns each term, their weighted sum ("loss") and the temperature.

    The soft term is SOFT_LOSSES[soft_loss] called with `soft_loss_args` (DKD: alpha=1, beta=8; DIST: beta=gamma=1
    by default, the papers' CIFAR-100 values). Both papers add their term to a CE of weight 1, while here it is mixed
    as (1 - alpha) * soft, so alpha rescales it. Over training (`set_progress`), the soft term ramps in linearly over
    `soft_warmup_epochs` (DKD's warmup; 0: none) and the temperature decays linearly to `final_temperature` over
    `total_epochs` (None: constant). The feature term is FEATURE_LOSSES[feature_loss] called with the feature pairs
    and `feature_loss_args`. Names and arguments are check_loss_config's to check.
    """

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
        """The loss the distillation section describes (checked by check_loss_config), DKD's warmup included."""
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
        """Called before every training step with the fractional epoch: the warmup and the temperature schedule."""
        self.epoch = epoch
        if self.final_temperature is not None:
            fraction = min(epoch / self.total_epochs, 1.0)
            t0, t1 = self.initial_temperature, self.final_temperature
            self.temperature = t0 + (t1 - t0) * fraction

    def warmup(self) -> float:
        """The soft term's weight at the current epoch: ramps linearly from 0 to 1 over soft_warmup_epochs."""
        return min(self.epoch / self.soft_warmup_epochs, 1.0) if self.soft_warmup_epochs > 0 else 1.0

    def soft(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The soft term, warmup included, before the (1 - alpha) weight. A soft loss that names the labels (DKD)
        gets the teacher's top class for an unlabelled sample (label -1)."""
        if "labels" in self.soft_inputs:
            labels = torch.where(labels >= 0, labels, teacher.argmax(1))
        given = {
            "student_logits": student,
            "teacher_logits": teacher,
            "labels": labels,
            "temperature": self.temperature,
        }
        return self.warmup() * self.soft_function(**{k: given[k] for k in self.soft_inputs}, **self.soft_loss_args)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        feature_pairs: list[tuple[torch.Tensor, torch.Tensor]] = (),
        mix_label: torch.Tensor | None = None,
        mix_lambda: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The terms on a batch: the hard one on its labelled samples (kd.distill.losses.hard_loss: masked, mixed,
        smoothed), the soft and feature ones on all of them, labelled or not; "feature" only given feature pairs."""
        hard = hard_loss(student_logits, labels, self.label_smoothing, mix_label, mix_lambda)
        soft = self.soft(student_logits, teacher_logits, labels)
        loss = self.alpha * hard + (1 - self.alpha) * soft
        terms = {"hard": hard, "soft": soft}
        if feature_pairs:  # a run without feature matching has no feature term: nothing to log as 0
            terms["feature"] = self.feature_function(list(feature_pairs), **self.feature_loss_args)
            loss = loss + self.feature_weight * terms["feature"]
        terms["temperature"] = torch.tensor(float(self.temperature))  # logged: it follows the schedule
        return {"loss": loss, **terms}
