"""Feature and relational losses: what a student learns from the teacher's intermediate layers.

Each loss takes the (student, teacher) feature pairs of the hooked layers (distillation.feature_layers), B×C×H×W
each, and returns a scalar; its other arguments come from distillation.feature_loss_args. FEATURE_LOSSES names them.
A loss that compares the tensors elementwise needs the student's features in the teacher's shape: it gets them
through the pair's adapter (1×1 conv + resize, kd/distill/hooks.py). One that compares what each model's features
say about the images — where they attend, how the images relate — takes the student's own features
(`uses_adapter = False`): an adapter there would be a learnable shortcut around the very structure being matched.
A new loss is a function here and an entry in FEATURE_LOSSES.
"""

import torch
import torch.nn.functional as F

FeaturePairs = list[tuple[torch.Tensor, torch.Tensor]]


def feature_mse(pairs: FeaturePairs) -> torch.Tensor:
    """FitNets-style hint loss: mean over layers of the MSE between adapted student and teacher features."""
    return torch.stack([F.mse_loss(s.float(), t.float()) for s, t in pairs]).mean()


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention of a B×C×H×W map (Zagoruyko & Komodakis, ICLR 2017, eq. 2 with F = mean_c |A_c|^p),
    flattened to B×HW and L2-normalised per image."""
    return F.normalize(features.float().abs().pow(p).mean(1).flatten(1), dim=1)


def attention_transfer(pairs: FeaturePairs, p: float = 2.0, beta: float = 1000.0) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017): beta/2 · mean over layers of the squared distance
    between the normalised attention maps, averaged over the HW positions and the batch (the paper's code, beta
    1e3). Channels may differ; a student map of another size is resized to the teacher's before its attention is
    taken."""
    losses = []
    for s, t in pairs:
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s.float(), size=t.shape[-2:], mode="bilinear", align_corners=False)
        losses.append((attention_map(s, p) - attention_map(t, p)).pow(2).mean())
    return beta / 2 * torch.stack(losses).mean()


attention_transfer.uses_adapter = False


def _embedding(features: torch.Tensor) -> torch.Tensor:
    return features.float().mean((2, 3)) if features.dim() == 4 else features.float().flatten(1)


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-D (Park et al., CVPR 2019, eq. 4-5): Huber loss between the pairwise distances of the student's and the
    teacher's embeddings (B×D), each divided by its mean over the distinct pairs."""

    def normalised(e: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(e, e)
        off_diagonal = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
        return d / d[off_diagonal].mean().clamp_min(1e-12)

    return F.smooth_l1_loss(normalised(student), normalised(teacher))


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-A (eq. 6-7): Huber loss between cos∠(e_i - e_j, e_k - e_j) over all triplets, student vs teacher."""

    def angles(e: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)  # [j, i] = (e_i - e_j) / |e_i - e_j|
        return torch.bmm(unit, unit.transpose(1, 2))  # [j, i, k]

    return F.smooth_l1_loss(angles(student), angles(teacher))


def rkd(pairs: FeaturePairs, distance_weight: float = 25.0, angle_weight: float = 50.0) -> torch.Tensor:
    """Relational KD (Park et al., CVPR 2019): distance_weight · RKD-D + angle_weight · RKD-A (the paper's 25 and
    50) on each layer's globally pooled features, averaged over layers. Only relations between the batch's images
    are matched, so the two models' widths may differ."""
    losses = []
    for s, t in pairs:
        s, t = _embedding(s), _embedding(t)
        losses.append(distance_weight * rkd_distance(s, t) + angle_weight * rkd_angle(s, t))
    return torch.stack(losses).mean()


rkd.uses_adapter = False

# A feature loss takes the pairs and returns a scalar; its other arguments are distillation.feature_loss_args.
FEATURE_LOSSES = {"mse": feature_mse, "attention": attention_transfer, "rkd": rkd}


def uses_adapter(name: str) -> bool:
    """Whether feature loss `name` compares adapted student features (1×1 conv + resize) or the student's own."""
    return getattr(FEATURE_LOSSES[name], "uses_adapter", True)
