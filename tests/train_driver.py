"""train.py's main() with fault hooks installed, for the tests that kill or signal a training process.

    python tests/train_driver.py [--step-sleep S] [--checkpoint-sleep S] -- TRAIN.PY ARGS...

--step-sleep S pauses S seconds after every optimizer step (time to send a signal at a chosen step);
--checkpoint-sleep S pauses inside every checkpoint write, after its files and before the state file
and the rename (a kill -9 there must lose nothing).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train as train_script  # noqa: E402

from spikelm.training import TrainingHooks  # noqa: E402


class FaultHooks(TrainingHooks):
    def __init__(self, step_sleep: float, checkpoint_sleep: float):
        self.step_sleep, self.checkpoint_sleep = step_sleep, checkpoint_sleep

    def on_step_end(self, step, state):
        if self.step_sleep:
            time.sleep(self.step_sleep)

    def on_checkpoint_files_written(self, folder, step):
        if self.checkpoint_sleep:
            print(f"[fault] pausing {self.checkpoint_sleep}s inside the checkpoint write of step {step}", flush=True)
            time.sleep(self.checkpoint_sleep)


if __name__ == "__main__":
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--checkpoint-sleep", type=float, default=0.0)
    opts = p.parse_args(argv[:split])
    sys.exit(train_script.main(argv[split + 1:], hooks=FaultHooks(opts.step_sleep, opts.checkpoint_sleep)))
