"""Models by architecture spec (the dict a checkpoint records), and how a batch is fed to them."""

import timm.data
import torch
from torch import nn

from kd.models.hybrid import HybridFusion
from kd.models.timm_models import create_timm


def build_model(spec: dict, pretrained: str | None = None) -> nn.Module:
    """{"name": "hybrid" or a timm name, "num_classes", ...their other arguments}."""
    spec = dict(spec)
    name, num_classes = spec.pop("name"), spec.pop("num_classes")
    if name == "hybrid":
        return HybridFusion(num_classes, pretrained=pretrained, **spec)
    return create_timm(name, num_classes, pretrained=pretrained, **spec)


def input_config(model: nn.Module) -> dict:
    """{"image_size", "mean", "std"} from the model's timm pretrained config."""
    backbone = model.rgb if isinstance(model, HybridFusion) else model
    resolved = timm.data.resolve_data_config({}, model=backbone)
    return {"image_size": resolved["input_size"][-1], "mean": list(resolved["mean"]), "std": list(resolved["std"])}


def input_keys(model: nn.Module) -> tuple[str, ...]:
    return getattr(model, "input_keys", ("rgb",))


def forward_batch(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(*(batch[k] for k in input_keys(model)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
