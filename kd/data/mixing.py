"""Mixup (Zhang et al., 2018) and CutMix (Yun et al., 2019) of a training batch, as a DataLoader collate function.

timm's `Mixup` draws the same things (one lambda per batch from Beta(alpha, alpha), CutMix or Mixup by
`switch_prob`, a box whose area corrects lambda) but mixes one image tensor and uses the global RNG. Here one draw
mixes every image tensor of the batch, so a hybrid teacher's MS bands get the same partner, box and lambda as the
RGB, and teacher and student see the one mixed view (function matching, Beyer et al., CVPR 2022). The draw is
seeded by the batch's loader keys: the same batch is mixed the same way in every run, worker and resume.

Labelled images are mixed only with labelled ones and unlabelled with unlabelled ones, so the hard loss of a mixed
labelled image knows both labels: lambda * CE(label) + (1 - lambda) * CE(mix_label), and an unlabelled image never
adds to it. The batch gains "mix_label" (the partner's label) and "mix_lambda" (B,), which
kd.distill.losses.hard_loss reads.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import default_collate

IMAGE_KEYS = ("rgb", "ms")  # the batch tensors that are images of one view


@dataclass(frozen=True)
class Mixing:
    """What to mix: alphas of the Beta draws (0: off), the probability a batch is mixed at all, the probability of
    CutMix when both are on (timm's mixup_prob, mixup_switch_prob), and the run's seed."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    seed: int = 0

    @classmethod
    def from_config(cls, cfg, seed: int) -> "Mixing | None":
        """From a TrainConfig (train or distillation section); None when both alphas are 0."""
        mixup, cutmix = getattr(cfg, "mixup_alpha", 0.0), getattr(cfg, "cutmix_alpha", 0.0)
        if mixup <= 0 and cutmix <= 0:
            return None
        return cls(mixup, cutmix, cfg.mixup_prob, cfg.mixup_switch_prob, seed)

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
        """The collated batch, mixed (a new dict; image tensors replaced, not written into)."""
        rng = np.random.default_rng([self.seed, *batch["key"].tolist()])
        kind, lam = self.draw(rng)
        partner = pair_within_groups(batch["label"], rng)
        height, width = batch["rgb"].shape[-2:]
        box = cutmix_box(height, width, lam, rng) if kind == "cutmix" else None
        if box is not None:  # the box's true share of the image, as timm's correct_lam
            top, bottom, left, right = box
            lam = 1.0 - (bottom - top) * (right - left) / (height * width)
        out = dict(batch)
        for key in IMAGE_KEYS:
            if key in batch and kind != "none":
                out[key] = mix_images(batch[key], partner, lam, box)
        out["mix_label"] = batch["label"][partner]
        out["mix_lambda"] = torch.full((len(partner),), lam, dtype=torch.float32)
        return out


def pair_within_groups(labels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A mixing partner for each sample: a random permutation of the labelled samples (label >= 0) and another of
    the unlabelled ones (label -1)."""
    partner = torch.arange(len(labels))
    for group in (labels >= 0, labels < 0):
        members = group.nonzero().flatten()
        partner[members] = members[torch.from_numpy(rng.permutation(len(members)))]
    return partner


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box of about (1 - lam) of the image around a uniform centre, clipped to the
    image (timm's rand_bbox)."""
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    left, right = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    return int(top), int(bottom), int(left), int(right)


def mix_images(images: torch.Tensor, partner: torch.Tensor, lam: float, box: tuple | None) -> torch.Tensor:
    """Mixup: lam * x + (1 - lam) * x[partner]; CutMix (`box`): x with the box pasted from x[partner]."""
    if box is None:
        return images * lam + images[partner] * (1 - lam)
    top, bottom, left, right = box
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = images[partner][..., top:bottom, left:right]
    return mixed


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
    """Cross-entropy over the labelled samples only (label >= 0; -1 marks an unlabelled one), averaged over them;
    0 for a batch without any. With a mixed batch (`Mixing`): lambda * CE(labels) + (1 - lambda) * CE(mix_label)
    per sample, which is CE against the mixed one-hot targets. `label_smoothing` as in F.cross_entropy. It lives
    here, beside the label conventions it reads, so that plain training (kd/train) needs nothing of kd.distill."""
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
