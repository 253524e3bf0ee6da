"""Evaluation: firing rates, energy estimates, perplexity (by position, parallel and streaming)."""
from .firing import FiringRateMonitor

__all__ = ["FiringRateMonitor"]
