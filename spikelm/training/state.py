"""The training state: what a checkpoint saves and a resume restores, besides the weights, optimizer,
scheduler and RNG streams."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class TrainingState:
    """Counters of one run. `global_step` optimizer steps are done; checkpoint-N holds the state with
    global_step == N. The data position is a function of the step (spikelm.data.BlockOrder), saved
    beside it so that a reader of trainer_state.json sees where the data stands."""

    global_step: int = 0
    max_steps: int = 0
    skipped_steps: int = 0          # non-finite steps whose update was dropped (the schedule still moves)
    nonfinite_in_a_row: int = 0     # the abort rule reads this (--max_consecutive_nonfinite)
    tokens_seen: int = 0            # tokens of every step taken, skipped ones included
    last_eval: dict | None = None   # the newest validation result
    data_position: dict = field(default_factory=dict)
    # the training-loss window of the next log line: a run resumed between two log lines logs the
    # same average as the uninterrupted run
    window_loss_sum: float = 0.0
    window_steps: int = 0
    identity: dict = field(default_factory=dict)  # TrainArgs.identity(): a resume must agree with it
    num_processes: int = 1

    def record_step(self, finite: bool, tokens: int, loss: float) -> None:
        self.global_step += 1
        self.tokens_seen += tokens
        if finite:
            self.nonfinite_in_a_row = 0
            self.window_loss_sum += loss
            self.window_steps += 1
        else:
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1

    def window_loss(self) -> float:
        return self.window_loss_sum / self.window_steps if self.window_steps else float("nan")

    def reset_window(self) -> None:
        self.window_loss_sum, self.window_steps = 0.0, 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainingState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
