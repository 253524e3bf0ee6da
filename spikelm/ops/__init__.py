"""Kernels: the diagonal linear recurrence (naive reference, fast torch path, Triton)."""
from .decay import LOG_DECAY_FLOOR, log_decay
from .naive import naive_scan
from .scan import BACKENDS, check_cu_seqlens, scan, triton_is_available

__all__ = ["BACKENDS", "LOG_DECAY_FLOOR", "check_cu_seqlens", "log_decay", "naive_scan", "scan", "triton_is_available"]
