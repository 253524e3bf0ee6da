"""Training: arguments (YAML + flags), the recipe and loop (accelerate), atomic checked checkpoints, metric logs.

    train(args)                                   # what train.py runs: builds tokenizer, data, SpikeLM
    train_model(model, train_blocks, eval_blocks, args, tokenizer=...)   # the same loop for any model
"""
from .args import ConfigError, TrainArgs, parse_args
from .checkpoint import CheckpointError, CheckpointWriteError, latest_checkpoint, list_checkpoints, verify
from .hooks import TrainingHooks
from .logger import MetricLogger, read_csv
from .loop import (TrainingError, TrainingInterrupted, adamw, build_optimizer, evaluate, param_groups, resolve_run_dir,
                   train_model)
from .state import TrainingState
from .trainer import train

__all__ = ["CheckpointError", "CheckpointWriteError", "ConfigError", "MetricLogger", "TrainArgs", "TrainingError",
           "TrainingHooks", "TrainingInterrupted", "TrainingState", "adamw", "build_optimizer", "evaluate",
           "latest_checkpoint", "list_checkpoints", "param_groups", "parse_args", "read_csv", "resolve_run_dir",
           "train", "train_model", "verify"]
