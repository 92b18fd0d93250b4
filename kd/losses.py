"""KnowledgeDistillationLoss: alpha * CE(labels) + (1 - alpha) * soft + w * feature MSE.

The soft term is selectable: classic KL (Hinton et al.), DKD (Zhao et al., CVPR 2022) or DIST (Huang et al.,
NeurIPS 2022). All are computed in float32, whatever the autocast dtype of the logits.
"""

import torch
import torch.nn.functional as F
from torch import nn

SOFT_LOSSES = ("kl", "dkd", "dist")


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


def feature_mse(feature_pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over layers of the MSE between (adapted) student features and teacher features."""
    return torch.stack([F.mse_loss(s.float(), t.float()) for s, t in feature_pairs]).mean()


class KnowledgeDistillationLoss(nn.Module):
    """Hard, soft and feature terms of KD; forward returns each term and their weighted sum ("loss").

    soft_loss picks the soft term: "kl" (soft_kl), "dkd" (dkd_loss times min(epoch / dkd_warmup_epochs, 1), the
    paper's warmup; 0 disables it) or "dist" (dist_loss). Defaults are the papers' CIFAR-100 values: DKD
    alpha=1, beta=8, 20 warmup epochs; DIST beta=gamma=1. Both papers add their term to a CE of weight 1, while
    here it is mixed as (1 - alpha) * soft, so alpha rescales it. `temperature` and `epoch` are plain attributes
    that schedules set during training.
    """

    def __init__(
        self,
        temperature: float = 4.0,
        alpha: float = 0.3,
        feature_weight: float = 0.5,
        soft_loss: str = "kl",
        dkd_alpha: float = 1.0,
        dkd_beta: float = 8.0,
        dkd_warmup_epochs: float = 20.0,
        dist_beta: float = 1.0,
        dist_gamma: float = 1.0,
    ):
        super().__init__()
        if soft_loss not in SOFT_LOSSES:
            raise ValueError(f"unknown soft_loss {soft_loss!r}; choose one of {', '.join(SOFT_LOSSES)}")
        self.temperature, self.alpha, self.feature_weight = temperature, alpha, feature_weight
        self.soft_loss = soft_loss
        self.dkd_alpha, self.dkd_beta, self.dkd_warmup_epochs = dkd_alpha, dkd_beta, dkd_warmup_epochs
        self.dist_beta, self.dist_gamma = dist_beta, dist_gamma
        self.epoch = 0.0  # fractional epoch, set by the training loop; drives the DKD warmup

    def dkd_warmup(self) -> float:
        """The DKD loss weight at the current epoch: ramps linearly from 0 to 1 over dkd_warmup_epochs."""
        return min(self.epoch / self.dkd_warmup_epochs, 1.0) if self.dkd_warmup_epochs > 0 else 1.0

    def soft(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The selected soft term (DKD includes its warmup factor), before the (1 - alpha) weight."""
        t = self.temperature
        if self.soft_loss == "dkd":
            return self.dkd_warmup() * dkd_loss(student, teacher, labels, t, self.dkd_alpha, self.dkd_beta)
        if self.soft_loss == "dist":
            return dist_loss(student, teacher, t, self.dist_beta, self.dist_gamma)
        return soft_kl(student, teacher, t)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        feature_pairs: list[tuple[torch.Tensor, torch.Tensor]] = (),
    ) -> dict[str, torch.Tensor]:
        hard = F.cross_entropy(student_logits.float(), labels)
        soft = self.soft(student_logits, teacher_logits, labels)
        feature = feature_mse(list(feature_pairs)) if feature_pairs else hard.new_zeros(())
        loss = self.alpha * hard + (1 - self.alpha) * soft + self.feature_weight * feature
        return {"loss": loss, "hard": hard, "soft": soft, "feature": feature}
