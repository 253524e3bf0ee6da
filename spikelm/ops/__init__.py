"""Kernels: the diagonal linear recurrence `scan` (here), the DSN neuron (`spikelm.ops.dsn`: `dsn`, `dsn_step`) and
the event-driven (spike-sparse) linear products `spike_linear` (inference) and `spike_matmul` (training, with its
gradients), each with a naive reference, a torch path and
compiled kernels (C on CPU, Triton on GPU for the recurrences); `record_backends` says which backend ran."""
from .backends import record_backends
from .decay import LOG_DECAY_FLOOR, log_decay
from .naive import naive_scan
from .scan import BACKENDS, check_cu_seqlens, document_starts, scan, triton_is_available
from .spike_linear import naive_spike_linear, spike_linear
from .spike_matmul import naive_spike_matmul, spike_matmul

__all__ = ["BACKENDS", "LOG_DECAY_FLOOR", "check_cu_seqlens", "document_starts", "log_decay", "naive_scan",
           "naive_spike_linear", "naive_spike_matmul", "record_backends", "scan", "spike_linear", "spike_matmul",
           "triton_is_available"]
