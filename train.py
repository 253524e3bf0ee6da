"""Pretrain a SpikeLM on text: python train.py --config configs/tiny.yaml [--key value ...]

Also `accelerate launch [--multi_gpu --num_processes N] train.py ...`. `python train.py --help`
lists every key; the loop lives in spikelm.training.
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    from spikelm.data import DataError
    from spikelm.training import ConfigError, TrainingError, parse_args, train

    try:
        args = parse_args(argv)
        train(args)
    except (ConfigError, DataError, TrainingError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, TrainingError) else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
