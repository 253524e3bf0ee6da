"""Metric logs: CSV files (output_dir/logs/train.csv, eval.csv) and accelerate's trackers, resumable.

--report_to takes a comma list of csv and accelerate's trackers (tensorboard, wandb, trackio,
mlflow, comet_ml, aim, clearml, dvclive, swanlab), "none", or "all" (csv and every installed
tracker). Trackers are accelerate's own classes (accelerate.tracking), run on the main process.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from .args import ConfigError, report_to_list

PIP_NAME = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow",
            "comet_ml": "comet-ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab"}


def _installed(tracker: str) -> bool:
    from accelerate.tracking import get_available_trackers
    return tracker in {str(t) for t in get_available_trackers()}


def resolve_report_to(report_to: str) -> list[str]:
    """The backends a --report_to value asks for, failing early (before anything is written) when one is
    not installed."""
    names = report_to_list(report_to)
    if names == ["none"]:
        return []
    if names == ["all"]:
        return ["csv"] + [t for t in PIP_NAME if _installed(t)]
    for name in names:
        if name != "csv" and not _installed(name):
            extra = f" (or pip install 'spikelm[{name}]')" if name in ("tensorboard", "wandb", "trackio") else ""
            raise ConfigError(f"--report_to {name} needs the {PIP_NAME[name]} package: pip install {PIP_NAME[name]}"
                              f"{extra}, or use --report_to csv")
    return names


def check_report_to(report_to: str) -> None:
    resolve_report_to(report_to)


def _scalar_config(config: dict) -> dict:
    """Trackers take bool/int/float/str/None hyperparameters only."""
    return {k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}


class MetricLogger:
    """Rows of (step, metrics) to every backend of --report_to. On resume at step s, CSV rows of steps > s
    (logged by the killed run after its last checkpoint) are dropped first and tensorboard purges them,
    so the log reads as one uninterrupted run."""

    def __init__(self, output_dir, report_to: str, resume_step: int, enabled: bool = True,
                 config: dict | None = None, run_name: str | None = None):
        self.backends = resolve_report_to(report_to) if enabled else []
        self.dir = Path(output_dir) / "logs"
        self.trackers = []
        if not self.backends:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if "csv" in self.backends:
            for name in ("train.csv", "eval.csv"):
                self._truncate(self.dir / name, resume_step)
        run_name = run_name or Path(output_dir).resolve().name
        for name in self.backends:
            if name != "csv":
                self.trackers.append(self._start(name, resume_step, run_name, config or {}))

    def _start(self, name: str, resume_step: int, run_name: str, config: dict):
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        cls = LOGGER_TYPE_TO_CLASS[name]
        if name == "tensorboard":  # events straight into logs/ (run name ""), purging what a killed run logged
            tracker = cls("", str(self.dir), purge_step=resume_step + 1 if resume_step else None)
        elif name == "wandb":  # offline with WANDB_MODE=offline; files under logs/
            tracker = cls("spikelm", name=run_name, dir=str(self.dir))
        elif name == "trackio":  # a resume continues the run of the same name
            tracker = cls("spikelm", name=run_name, resume="allow" if resume_step else "never", embed=False)
        elif cls.requires_logging_directory:
            tracker = cls(run_name, str(self.dir))
        else:
            tracker = cls(run_name)
        tracker.start()
        if config:
            tracker.store_init_configuration(_scalar_config(config))
        return tracker

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
        if "csv" in self.backends:
            path = self.dir / f"{split}.csv"
            new = not path.exists()
            with open(path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["step"] + list(metrics))
                w.writerow([step] + [repr(v) if isinstance(v, float) else v for v in metrics.values()])
        scalars = {f"{split}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        for tracker in self.trackers:
            tracker.log(scalars, step=step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
