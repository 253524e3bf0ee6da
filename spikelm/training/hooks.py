"""Hooks: the points of the training loop where a caller can look or act.

    class Slow(TrainingHooks):
        def on_step_end(self, step, state):
            time.sleep(0.5)

    train(args, hooks=Slow())            # or train_model(..., hooks=Slow())

Tests inject their faults here (a NaN loss, a pause inside a checkpoint write, a disk that fills
up); benchmarks read the curve through on_log. Production code reads no fault switches.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .state import TrainingState


class TrainingHooks:
    """Every method does nothing by default; subclass and override the ones you need."""

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of each micro-batch of optimizer step `step` (1-based), before its backward. The
        returned tensor is used instead (a test returns NaN here)."""
        return loss

    def on_step_end(self, step: int, state: TrainingState) -> None:
        """After optimizer step `step`, before its logging, evaluation and checkpoint."""

    def on_log(self, split: str, step: int, metrics: dict) -> None:
        """Each metrics row as it is logged: split is "train" or "eval" (main process only)."""

    def on_checkpoint_files_written(self, folder: Path, step: int) -> None:
        """Every file of checkpoint-`step` is in the hidden temp `folder`; trainer_state.json (which
        completes it) and the rename into place come next (main process only)."""

    def on_checkpoint_saved(self, folder: Path, step: int) -> None:
        """checkpoint-`step` is complete and in place (main process only)."""
