"""Kernels: the diagonal linear recurrence `scan` (here) and the DSN neuron (`spikelm.ops.dsn`: `dsn`, `dsn_step`),
each with a naive reference, a torch path and compiled kernels (C on CPU, Triton on GPU); `record_backends` says
which backend ran."""
from .backends import record_backends
from .decay import LOG_DECAY_FLOOR, log_decay
from .naive import naive_scan
from .scan import BACKENDS, check_cu_seqlens, document_starts, scan, triton_is_available

__all__ = ["BACKENDS", "LOG_DECAY_FLOOR", "check_cu_seqlens", "document_starts", "log_decay", "naive_scan",
           "record_backends", "scan", "triton_is_available"]
