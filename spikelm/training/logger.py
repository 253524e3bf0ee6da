"""Metric logs: CSV files (output_dir/logs/train.csv, eval.csv) or tensorboard, resumable."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from .args import ConfigError


def check_report_to(report_to: str) -> None:
    """Fail early (before anything is written) when the requested backend is missing."""
    if report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ConfigError("--report_to tensorboard needs the tensorboard package: "
                                  "pip install 'spikelm[tensorboard]' (or pip install tensorboard), "
                                  "or use --report_to csv") from None


class MetricLogger:
    """Rows of (step, metrics). On resume at step s, rows of steps > s (logged by the killed run after its
    last checkpoint) are dropped first, so the log reads as one uninterrupted run."""

    def __init__(self, output_dir, report_to: str, resume_step: int, enabled: bool = True):
        self.report_to = report_to if enabled else "none"
        self.dir = Path(output_dir) / "logs"
        self.writer = None
        if self.report_to == "none":
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.report_to == "csv":
            for name in ("train.csv", "eval.csv"):
                self._truncate(self.dir / name, resume_step)
        else:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=resume_step + 1 if resume_step else None)

    @staticmethod
    def _truncate(path: Path, step: int) -> None:
        if not path.exists():
            return
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        header, body = rows[0], rows[1:]
        keep = [r for r in body if r and int(r[0]) <= step]
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(keep)
        os.replace(tmp, path)

    def log(self, split: str, step: int, metrics: dict) -> None:
        if self.report_to == "csv":
            path = self.dir / f"{split}.csv"
            new = not path.exists()
            with open(path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["step"] + list(metrics))
                w.writerow([step] + [repr(v) if isinstance(v, float) else v for v in metrics.values()])
        elif self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{split}/{k}", v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
