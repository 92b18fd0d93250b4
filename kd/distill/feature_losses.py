"""Feature and relational losses on the (student, teacher) B×C×H×W pairs of distillation.feature_layers.

An elementwise loss gets the student's features through the pair's adapter (1×1 conv + resize). One that compares
what the features say (attention, relations) sets `uses_adapter = False`: an adapter there would be a learnable
shortcut around the very structure being matched. A new loss is a function here and an entry in FEATURE_LOSSES.
"""

import torch
import torch.nn.functional as F

FeaturePairs = list[tuple[torch.Tensor, torch.Tensor]]


def feature_mse(pairs: FeaturePairs) -> torch.Tensor:
    """FitNets-style hint loss: mean over layers of the MSE between adapted student and teacher features."""
    return torch.stack([F.mse_loss(s.float(), t.float()) for s, t in pairs]).mean()


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention mean_c |A_c|^p (Zagoruyko & Komodakis, ICLR 2017, eq. 2), B×HW, L2-normalised."""
    return F.normalize(features.float().abs().pow(p).mean(1).flatten(1), dim=1)


def attention_transfer(pairs: FeaturePairs, p: float = 2.0, beta: float = 1000.0) -> torch.Tensor:
    """Attention transfer: beta/2 · mean squared distance of the attention maps (the paper's code, beta 1e3); a
    student map of another size is resized to the teacher's first."""
    losses = []
    for s, t in pairs:
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s.float(), size=t.shape[-2:], mode="bilinear", align_corners=False)
        losses.append((attention_map(s, p) - attention_map(t, p)).pow(2).mean())
    return beta / 2 * torch.stack(losses).mean()


attention_transfer.uses_adapter = False


def _distances(e: torch.Tensor) -> torch.Tensor:
    """RKD-D's pairwise distances (Park et al., CVPR 2019, eq. 4-5), each over their mean."""
    d = torch.cdist(e, e)
    off_diagonal = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    return d / d[off_diagonal].mean().clamp_min(1e-12)


def _angles(e: torch.Tensor) -> torch.Tensor:
    """RKD-A's cos∠(e_i - e_j, e_k - e_j) over all triplets (eq. 6-7)."""
    unit = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)  # [j, i] = (e_i - e_j) / |e_i - e_j|
    return torch.bmm(unit, unit.transpose(1, 2))  # [j, i, k]


def rkd(pairs: FeaturePairs, distance_weight: float = 25.0, angle_weight: float = 50.0) -> torch.Tensor:
    """Relational KD: the paper's 25 · RKD-D + 50 · RKD-A (Huber losses) on each layer's pooled features."""
    losses = []
    for s, t in pairs:
        s, t = (x.float().mean((2, 3)) if x.dim() == 4 else x.float().flatten(1) for x in (s, t))
        distance, angle = F.smooth_l1_loss(_distances(s), _distances(t)), F.smooth_l1_loss(_angles(s), _angles(t))
        losses.append(distance_weight * distance + angle_weight * angle)
    return torch.stack(losses).mean()


rkd.uses_adapter = False

# A feature loss takes the pairs and returns a scalar; its other arguments are distillation.feature_loss_args.
FEATURE_LOSSES = {"mse": feature_mse, "attention": attention_transfer, "rkd": rkd}


def uses_adapter(name: str) -> bool:
    return getattr(FEATURE_LOSSES[name], "uses_adapter", True)
