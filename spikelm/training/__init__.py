"""Training: arguments (YAML + flags), the accelerate loop, atomic checkpoints, metric logs."""
from .args import ConfigError, TrainArgs, parse_args
from .checkpoint import latest_checkpoint, list_checkpoints
from .logger import MetricLogger, read_csv
from .trainer import TrainingError, evaluate, train

__all__ = ["ConfigError", "MetricLogger", "TrainArgs", "TrainingError", "evaluate", "latest_checkpoint",
           "list_checkpoints", "parse_args", "read_csv", "train"]
