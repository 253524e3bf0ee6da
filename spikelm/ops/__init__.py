"""Kernels: the diagonal linear recurrence (naive reference, fast torch path, Triton), the fused DSN, and the
event-driven (spike-sparse) linear product."""
from .decay import LOG_DECAY_FLOOR, log_decay
from .naive import naive_scan
from .scan import BACKENDS, check_cu_seqlens, document_starts, scan, triton_is_available
from .spike_linear import naive_spike_linear, spike_linear
from .torch_dsn import decay_logit, dsn_parallel

__all__ = ["BACKENDS", "LOG_DECAY_FLOOR", "check_cu_seqlens", "decay_logit", "document_starts", "dsn_parallel",
           "log_decay", "naive_scan", "naive_spike_linear", "scan", "spike_linear", "triton_is_available"]
