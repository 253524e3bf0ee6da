"""Kernels: the diagonal linear recurrence `scan` and the DSN neuron `dsn` / `dsn_step`, each with a naive
reference, a torch path and compiled kernels (C on CPU, Triton on GPU); `record_backends` says which ran."""
from .backends import record_backends
from .decay import LOG_DECAY_FLOOR, log_decay
from .dsn import DSNOutput, DSNState, dsn, dsn_step, naive_dsn
from .dsn import BACKENDS as DSN_BACKENDS
from .naive import naive_scan
from .scan import BACKENDS, check_cu_seqlens, document_starts, scan, triton_is_available

__all__ = ["BACKENDS", "DSNOutput", "DSNState", "DSN_BACKENDS", "LOG_DECAY_FLOOR", "check_cu_seqlens",
           "document_starts", "dsn", "dsn_step", "log_decay", "naive_dsn", "naive_scan", "record_backends", "scan",
           "triton_is_available"]
