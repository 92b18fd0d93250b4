"""What kd.loop.fit trains: a module whose forward(batch) returns {"loss", <terms...>, "logits"}, with the network
to checkpoint as `.model`. Classifier is the plain supervised one; kd.distill.Distiller is the distilling one."""

import torch.nn.functional as F
from torch import nn

from kd.models import forward_batch


class Classifier(nn.Module):
    """Plain supervised training (teachers, baseline students): cross-entropy on the labels."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def forward(self, batch: dict) -> dict:
        logits = forward_batch(self.model, batch)
        hard = F.cross_entropy(logits.float(), batch["label"], label_smoothing=self.label_smoothing)
        return {"loss": hard, "hard": hard, "logits": logits}

    def set_model(self, model: nn.Module) -> None:
        """Swap in a graph that shares the parameters (quantization-aware training)."""
        self.model = model
