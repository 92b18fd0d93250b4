"""KnowledgeDistillationLoss: alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T) + w * feature MSE."""

import torch
import torch.nn.functional as F
from torch import nn


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


def feature_mse(feature_pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over layers of the MSE between (adapted) student features and teacher features."""
    return torch.stack([F.mse_loss(s.float(), t.float()) for s, t in feature_pairs]).mean()


class KnowledgeDistillationLoss(nn.Module):
    """Hard, soft and feature terms of classic KD; forward returns each term and their weighted sum ("loss")."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.3, feature_weight: float = 0.5):
        super().__init__()
        self.temperature, self.alpha, self.feature_weight = temperature, alpha, feature_weight

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        feature_pairs: list[tuple[torch.Tensor, torch.Tensor]] = (),
    ) -> dict[str, torch.Tensor]:
        hard = F.cross_entropy(student_logits.float(), labels)
        soft = soft_kl(student_logits, teacher_logits, self.temperature)
        feature = feature_mse(list(feature_pairs)) if feature_pairs else hard.new_zeros(())
        loss = self.alpha * hard + (1 - self.alpha) * soft + self.feature_weight * feature
        return {"loss": loss, "hard": hard, "soft": soft, "feature": feature}
