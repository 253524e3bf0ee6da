"""Kernels: the diagonal linear recurrence (naive reference, fast torch path, Triton)."""
from .naive import naive_scan
from .scan import BACKENDS, check_cu_seqlens, scan, triton_is_available

__all__ = ["BACKENDS", "check_cu_seqlens", "naive_scan", "scan", "triton_is_available"]
