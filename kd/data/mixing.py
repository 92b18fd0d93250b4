"""Mixup and CutMix of a training batch, as a DataLoader collate function. Not timm's `Mixup`, which mixes one tensor
with the global RNG: one draw, seeded by the batch's loader keys, mixes RGB and MS alike (teacher and student see one
view). Labelled images mix only with labelled ones, so the hard loss knows both labels ("mix_label", "mix_lambda")."""

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import default_collate

IMAGE_KEYS = ("rgb", "ms")  # the batch tensors that are images of one view


@dataclass(frozen=True)
class Mixing:
    """Beta alphas (0: off), the probability a batch is mixed, of CutMix when both are on, and the run's seed."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    seed: int = 0

    @classmethod
    def from_config(cls, cfg, seed: int) -> "Mixing | None":
        """From a TrainConfig; None when both alphas are 0."""
        if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
            return None
        return cls(cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mixup_prob, cfg.mixup_switch_prob, seed)

    def draw(self, rng: np.random.Generator) -> tuple[str, float]:
        """("mixup" | "cutmix" | "none", lambda before the CutMix box correction)."""
        if rng.random() >= self.prob:
            return "none", 1.0
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            kind = "cutmix" if rng.random() < self.switch_prob else "mixup"
        else:
            kind = "cutmix" if self.cutmix_alpha > 0 else "mixup"
        alpha = self.cutmix_alpha if kind == "cutmix" else self.mixup_alpha
        return kind, float(rng.beta(alpha, alpha))

    def __call__(self, batch: dict) -> dict:
        rng = np.random.default_rng([self.seed, *batch["key"].tolist()])
        kind, lam = self.draw(rng)
        partner = pair_within_groups(batch["label"], rng)
        if kind == "cutmix":  # a box of about (1 - lam) of the image (timm's rand_bbox), lam its true share
            height, width = batch["rgb"].shape[-2:]
            ratio = math.sqrt(1 - lam)
            cut_h, cut_w = int(height * ratio), int(width * ratio)
            cy, cx = int(rng.integers(height)), int(rng.integers(width))
            top, bottom = (int(v) for v in np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height))
            left, right = (int(v) for v in np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width))
            lam = 1.0 - (bottom - top) * (right - left) / (height * width)
        out = dict(batch)  # image tensors replaced, not written into
        for key in [key for key in IMAGE_KEYS if key in batch and kind != "none"]:
            images, partners = batch[key], batch[key][partner]
            if kind == "cutmix":
                out[key] = images.clone()
                out[key][..., top:bottom, left:right] = partners[..., top:bottom, left:right]
            else:
                out[key] = images * lam + partners * (1 - lam)
        out["mix_label"] = batch["label"][partner]
        out["mix_lambda"] = torch.full((len(partner),), lam, dtype=torch.float32)
        return out


def pair_within_groups(labels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A partner per sample: one permutation of the labelled samples, another of the unlabelled ones."""
    partner = torch.arange(len(labels))
    for group in (labels >= 0, labels < 0):
        members = group.nonzero().flatten()
        partner[members] = members[torch.from_numpy(rng.permutation(len(members)))]
    return partner


class MixingCollate:
    """A DataLoader collate_fn: default_collate, then `mixing` (a class, so loader workers can pickle it)."""

    def __init__(self, mixing: Mixing):
        self.mixing = mixing

    def __call__(self, samples: list[dict]) -> dict:
        return self.mixing(default_collate(samples))


def hard_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    mix_label: torch.Tensor | None = None,
    mix_lambda: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy averaged over the labelled samples (label >= 0), 0 without any; mixed: lambda * CE(labels) +
    (1 - lambda) * CE(mix_label). Here, beside the label conventions, so kd/train needs nothing of kd.distill."""
    labeled = labels >= 0
    if not labeled.any():  # zero, yet still a function of the logits (every process must backpropagate)
        return logits.float().sum() * 0.0
    logits = logits.float()[labeled]
    cross_entropy = torch.nn.functional.cross_entropy
    loss = cross_entropy(logits, labels[labeled], label_smoothing=label_smoothing, reduction="none")
    if mix_label is not None:
        lam = mix_lambda[labeled].float()
        partner = cross_entropy(logits, mix_label[labeled], label_smoothing=label_smoothing, reduction="none")
        loss = lam * loss + (1 - lam) * partner
    return loss.mean()
