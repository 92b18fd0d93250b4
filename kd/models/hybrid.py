"""HybridFusion, the RGB+MS teacher: two timm backbones, fused and classified; and the check of the MS band count."""

import torch
from torch import nn

from kd.data.dataset import LeafDataset
from kd.errors import UserError
from kd.models.timm_models import create_timm

FUSIONS = ("concat", "add", "attention")
HYBRID_ARGS = {  # what each HybridFusion argument a checkpoint sets must be (every argument but the built-in two)
    "backbone": (lambda v: isinstance(v, str) and v, "a timm model name"),
    "ms_backbone": (lambda v: isinstance(v, str), 'a timm model name, or "" for the RGB backbone'),
    "ms_channels": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    "fusion": (lambda v: v in FUSIONS, " or ".join(FUSIONS)),
    "drop_rate": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1, "in [0, 1)"),
    "drop_path_rate": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1, "in [0, 1)"),
}


def _pooled_dim(backbone: nn.Module) -> int:
    """MobileNetV3's conv head makes a headless timm model's pooled width differ from num_features."""
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features


class HybridFusion(nn.Module):
    """RGB branch + MS branch (a 1×1 band adapter feeds the MS bands to a 3-channel backbone), fused, classified."""

    input_keys = ("rgb", "ms")

    def __init__(
        self,
        num_classes: int,
        backbone: str = "efficientnetv2_rw_s",
        ms_backbone: str = "",
        ms_channels: int = 5,
        fusion: str = "concat",
        pretrained: str | None = None,
        drop_rate: float = 0.2,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        # stochastic depth in both backbones; 0 passes nothing, so older checkpoints rebuild exactly as before
        depth = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
        self.rgb = create_timm(backbone, num_classes=0, pretrained=pretrained, **depth)
        # The adapter learns which band mixture to show the backbone, so ImageNet weights stay usable for MS.
        self.band_adapter = nn.Sequential(nn.Conv2d(ms_channels, 3, kernel_size=1), nn.BatchNorm2d(3))
        self.ms = create_timm(ms_backbone or backbone, num_classes=0, pretrained=pretrained, **depth)
        rgb_dim, ms_dim = _pooled_dim(self.rgb), _pooled_dim(self.ms)
        self.fusion = fusion
        if fusion == "concat":
            dim = rgb_dim + ms_dim
        else:
            dim = rgb_dim
            self.ms_proj = nn.Linear(ms_dim, dim) if ms_dim != dim else nn.Identity()
        if fusion == "attention":  # per-sample weights of the two modalities
            self.gate = nn.Sequential(nn.Linear(2 * dim, dim // 4), nn.ReLU(), nn.Linear(dim // 4, 2))
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(dim, num_classes))

    def forward(self, rgb: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        rgb_features, ms_features = self.rgb(rgb), self.ms(self.band_adapter(ms))
        if self.fusion == "concat":
            return self.head(torch.cat([rgb_features, ms_features], dim=1))
        ms_features = self.ms_proj(ms_features)
        if self.fusion == "add":
            return self.head(rgb_features + ms_features)
        weights = self.gate(torch.cat([rgb_features, ms_features], dim=1)).softmax(dim=1)
        return self.head(weights[:, :1] * rgb_features + weights[:, 1:] * ms_features)


def check_ms_bands(arch: dict | None, dataset: LeafDataset) -> None:
    """Refuse MS stacks whose band count differs from the one the hybrid model of `arch` (a checkpoint's) expects."""
    if not arch or "ms_channels" not in arch:
        return
    bands, expected = dataset.read(0)[1].shape[0], arch["ms_channels"]
    if bands != expected:
        raise UserError(
            f"the multispectral stacks have {bands} bands (e.g. {dataset.ms_files[dataset.samples[0][0]]}, after "
            f"data.ms_bands), but the teacher was trained on {expected}: use data with the teacher's bands, or "
            "train a teacher on these"
        )
