"""The k best checkpoints of a run on its monitored metric, and best.safetensors."""

import re
from pathlib import Path

import torch

from kd.models.checkpoint import CheckpointMeta, save_checkpoint

CHECKPOINT_STEM = re.compile(r"epoch\d{3,}")  # the top-k checkpoints' names, as TopK writes them


class TopK:
    def __init__(self, run_dir: Path, k: int, mode: str, entries: list | None = None):
        self.run_dir, self.k, self.sign = run_dir, k, 1.0 if mode == "max" else -1.0
        self.entries = entries or []  # [score, stem name], best first

    @property
    def best(self) -> float | None:
        return self.entries[0][0] if self.entries else None

    def is_better(self, score: float, than: float | None, min_delta: float = 0.0) -> bool:
        return than is None or self.sign * (score - than) > min_delta

    def update(
        self,
        score: float,
        epoch: int,
        model: torch.nn.Module | dict[str, torch.Tensor],
        meta: CheckpointMeta,
        write: bool = True,
        extra: dict | None = None,
    ) -> None:
        """Save `model` if `score` makes the top k (every process keeps the list; only the one with `write` saves)."""
        if len(self.entries) >= self.k and not self.is_better(score, self.entries[-1][0]):
            return
        stem = f"epoch{epoch:03d}"
        new_best = self.is_better(score, self.best)
        self.entries.append([score, stem])
        self.entries.sort(key=lambda e: -self.sign * e[0])
        dropped, self.entries = self.entries[self.k :], self.entries[: self.k]
        if not write:
            return
        save_checkpoint(self.run_dir / stem, model, meta, extra)
        if new_best:
            save_checkpoint(self.run_dir / "best", model, meta, extra)
        for _, old in dropped:
            if not CHECKPOINT_STEM.fullmatch(old):  # never a path from elsewhere (check_state refuses them first)
                continue
            for suffix in (".safetensors", ".json"):
                (self.run_dir / old).with_suffix(suffix).unlink(missing_ok=True)
