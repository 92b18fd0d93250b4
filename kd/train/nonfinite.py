"""Non-finite losses: a step whose loss is NaN/inf is skipped on every process; too many stop the run."""

import warnings

import torch
from accelerate import Accelerator

from kd.errors import UserError


class NonFiniteLoss(UserError, FloatingPointError):
    """Too many non-finite losses in a row: a diverging run, bad data or a bad teacher; the message says what to try."""


class NonFiniteGuard:
    """Skips a step whose loss is non-finite on any process (all together, or DDP hangs); `limit` such steps in a
    row stop the run, and so does an epoch of skipped steps."""

    def __init__(self, accelerator: Accelerator, limit: int):
        self.accelerator, self.limit = accelerator, limit
        self.in_a_row, self.taken = 0, 0

    def skip(self, terms: dict[str, torch.Tensor], epoch: int, step: int) -> bool:
        finite = torch.isfinite(terms["loss"].detach()).float()
        if self.accelerator.num_processes > 1:
            finite = self.accelerator.reduce(finite, "min")
        if finite.item():
            self.in_a_row, self.taken = 0, self.taken + 1
            return False
        self.in_a_row += 1
        values = {k: round(v.item(), 4) for k, v in terms.items() if k != "logits"}
        message = f"non-finite loss at epoch {epoch} step {step}: {values}"
        if self.in_a_row >= self.limit:
            raise NonFiniteLoss(
                f"{message}; {self.in_a_row} such steps in a row, stopping. Lower learning_rate, "
                "enable gradient_clip_val, or check the data and the teacher."
            )
        warnings.warn(f"{message}; step skipped ({self.in_a_row} in a row)", stacklevel=1)
        return True

    def end_epoch(self, epoch: int, steps: int) -> None:
        if self.taken == 0 and steps > 0:
            raise UserError(
                f"every training step of epoch {epoch} had a non-finite loss and was skipped, so the model did not "
                "train; nothing was saved for this epoch. Check the data for NaN/inf values and the teacher, or "
                "lower learning_rate."
            )
        self.taken = 0
