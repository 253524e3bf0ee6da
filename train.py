"""Pretrain a SpikeLM on text: python train.py --config configs/tiny.yaml [--key value ...]

Also `accelerate launch [--multi_gpu | --use_fsdp] --num_processes N train.py ...`. `python train.py
--help` lists every key; the loop lives in spikelm.training. SIGTERM or Ctrl-C stops after the
current step with a checkpoint (exit status 128 + the signal's number).
"""
from __future__ import annotations

import shlex
import sys


def _resume_argv(argv: list) -> list[str]:
    """argv without --overwrite_output_dir / --resume_from_checkpoint, plus --resume_from_checkpoint latest."""
    out, skip = [], False
    for a in map(str, argv):
        if skip:
            skip = False
            if not a.startswith("--"):
                continue
        key = a.split("=", 1)[0]
        if key in ("--overwrite_output_dir", "--resume_from_checkpoint"):
            skip = "=" not in a
            continue
        out.append(a)
    return out + ["--resume_from_checkpoint", "latest"]


def main(argv=None, hooks=None) -> int:
    from spikelm.data import DataError
    from spikelm.training import (CheckpointError, CheckpointWriteError, ConfigError, TrainingError,
                                  TrainingInterrupted, parse_args, train)

    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        train(args, hooks=hooks)
    except TrainingInterrupted as e:
        print(f"train.py: {e}:\n  python train.py {shlex.join(_resume_argv(argv))}", file=sys.stderr)
        return 128 + e.signum
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, CheckpointWriteError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
