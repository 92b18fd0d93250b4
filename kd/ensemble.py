"""Multi-teacher distillation: a weighted average of the teachers' logits."""

from collections.abc import Sequence

import torch


def normalize_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Weights that sum to one; None means equal weights."""
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(weights) != count or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"need {count} non-negative teacher weights with a positive sum, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def weighted_logits(logits: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """sum_i w_i * logits_i with the weights normalized to sum to one."""
    weights = normalize_weights(weights, len(logits))
    return sum(w * x.float() for w, x in zip(weights, logits))
