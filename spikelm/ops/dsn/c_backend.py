"""The C backend of ops.dsn: the neuron on CPU as a compiled kernel, one pass over time forward, one backward
(ops/csrc/dsn_cpu.c).

The torch backend (torch_backend.DSNFunction) makes ~25 passes over [B, T, C] memory per forward and
backward; on a CPU the neuron is bound by that memory traffic, not by arithmetic. The C kernel walks
time once per direction with everything else in registers and L1: conv taps, decay, membrane, spike;
the backward recomputes a', alpha and the membrane from X, saving only every 64th row's membrane.

Built on first use by ops/cbuild.py (the system C compiler, a per-user cache keyed by source, flags
and CPU). Where there is no compiler or the build fails, `available()` is False and backend="auto"
runs the torch backend instead (a warning says why, once). SPIKELM_CPU_KERNEL=0 turns the kernel off.

Supported (`unsupported` says why not): CPU float32 compute (bfloat16/float16 inputs are converted;
float64 goes to the torch backend), 1/tau an integer 1..8 (alpha = sigmoid(a')^(1/tau) as repeated
products: tau = 1, 1/2, ..., 1/8), kernel_size <= 16, the rect and atan surrogates, carried state,
packed documents; not the membrane as an output (the forward keeps only every 64th row of it).
"""
from __future__ import annotations

import ctypes

import torch
from torch.autograd.function import once_differentiable

from ..cbuild import CSRC, CLibrary
from ..scan import document_starts
from ..torch_scan import empty_buffer

SOURCE = CSRC / "dsn_cpu.c"
MAX_TAPS = 16
# the forward keeps the membrane of every CHECKPOINT_ROWS-th row only; the backward recomputes the rest
CHECKPOINT_ROWS = 64
_SURROGATE_CODES = {"rect": 0, "atan": 1}


def _declare(lib: ctypes.CDLL) -> None:
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.dsn_cpu_forward.argtypes = [P] * 8 + [I64] * 5 + [I, I, ctypes.c_float, I64, P, P, P, I]
    lib.dsn_cpu_backward.argtypes = ([P] * 11 + [I64] * 5 + [I, I, ctypes.c_float, I64, I, ctypes.c_float] + [P] * 5
                                     + [I])
    lib.dsn_cpu_forward.restype = lib.dsn_cpu_backward.restype = ctypes.c_int


LIBRARY = CLibrary("dsn_cpu", [SOURCE], _declare)


def _load():
    return LIBRARY.load()


def available() -> bool:
    """Whether the compiled kernel loads here (builds it on the first call)."""
    return LIBRARY.available()


def unavailable_reason() -> str | None:
    return LIBRARY.unavailable_reason()


def decay_power(tau: float) -> int | None:
    """n = 1/tau when it is an integer 1..8 (the kernel's alpha = sigmoid^n), else None."""
    n = round(1.0 / tau)
    return n if 1 <= n <= 8 and abs(n * tau - 1.0) < 1e-9 else None


def unsupported(x: torch.Tensor, kernel_size: int, tau: float, surrogate: str, output_membrane: bool) -> str | None:
    """Why the C kernel cannot run this call (None: it can; the first call builds the kernel)."""
    if x.device.type != "cpu":
        return f"it runs on CPU tensors, got {x.device}"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"it computes in float32 (float32, bfloat16 or float16 input), got {x.dtype}"
    if kernel_size > MAX_TAPS:
        return f"kernel_size must be <= {MAX_TAPS}, got {kernel_size}"
    if decay_power(tau) is None:
        return f"1/tau must be an integer 1..8, got tau={tau!r}"
    if surrogate not in _SURROGATE_CODES:
        return f"surrogate must be one of {tuple(_SURROGATE_CODES)}, got {surrogate!r}"
    if output_membrane:
        return "it does not return the membrane (it keeps every 64th row only)"
    if not available():
        return f"the kernel is unavailable here ({unavailable_reason()})"
    return None


def _rows_with_contiguous_channels(x: torch.Tensor) -> torch.Tensor:
    """x itself when its channels are contiguous (a chunk of a projection's output is read in place: copying
    a fresh [B, T, C] costs its page faults), else a contiguous copy."""
    return x if x.stride(2) == 1 or x.shape[2] == 1 else x.contiguous()


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("spikelm: the DSN's C kernel could not allocate its per-thread state")


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _packed_rows(cu_seqlens: torch.Tensor, T: int):
    """Per row: its document's first row; the document index at a start row and at a last row (-1 elsewhere)."""
    cu = cu_seqlens.to(torch.long).cpu()
    lengths = cu.diff()
    docs = torch.arange(lengths.numel())
    row_start = torch.repeat_interleave(cu[:-1], lengths, output_size=T).to(torch.int32)
    nonempty = lengths > 0
    starts = document_starts(cu)
    start_doc = torch.full((T,), -1, dtype=torch.int32)
    end_doc = torch.full((T,), -1, dtype=torch.int32)
    start_doc[starts] = docs[nonempty].to(torch.int32)
    end_doc[starts + lengths[nonempty] - 1] = docs[nonempty].to(torch.int32)
    return row_start.contiguous(), start_doc, end_doc


class DSNCpuFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, history, h0, cu_seqlens, tau, max_spike, surrogate, surrogate_alpha):
        lib = _load()
        B, T, C = x.shape
        k = weight.shape[1]
        xf = _rows_with_contiguous_channels(x.to(torch.float32))
        wT = weight.detach().to(torch.float32).t().contiguous()  # [k, C]: every tap's weights contiguous
        b = bias.detach().to(torch.float32).contiguous()
        hist = None if history is None or k == 1 else history.detach().to(torch.float32).contiguous()
        h0f = None if h0 is None else h0.detach().to(torch.float32).contiguous()
        rows = None if cu_seqlens is None else _packed_rows(cu_seqlens, T)
        K = CHECKPOINT_ROWS
        n_states = B if cu_seqlens is None else cu_seqlens.numel() - 1
        spikes = empty_buffer((B, T, C), torch.float32, "cpu")
        Hc = torch.empty(B, -(-T // K), C)
        # every state the kernel does not write (empty documents, T = 0) is the initial one
        last = h0f.clone() if h0f is not None else torch.zeros(n_states, C)
        n = decay_power(tau)
        if T:
            _check(lib.dsn_cpu_forward(xf.data_ptr(), _ptr(hist), _ptr(h0f), wT.data_ptr(), b.data_ptr(),
                                       *(_ptr(r) for r in (rows if rows is not None else (None, None, None))),
                                       B, T, C, xf.stride(0), xf.stride(1), k, n, float(max_spike), K,
                                       spikes.data_ptr(), Hc.data_ptr(), last.data_ptr(), torch.get_num_threads()))
        ctx.save_for_backward(xf, wT, b, hist, h0f, Hc)
        ctx.rows = rows
        ctx.n_states = n_states
        ctx.args = (n, max_spike, surrogate, surrogate_alpha, x.dtype, weight.dtype, k, K)
        return spikes.to(x.dtype), last

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_s, grad_last):
        xf, wT, b, hist, h0f, Hc = ctx.saved_tensors
        n, max_spike, surrogate, surrogate_alpha, x_dtype, w_dtype, k, K = ctx.args
        rows = ctx.rows
        B, T, C = xf.shape
        gs = None if grad_s is None else grad_s.to(torch.float32).contiguous()
        gl = None if grad_last is None else grad_last.to(torch.float32).contiguous()
        dx = empty_buffer((B, T, C), torch.float32, "cpu")
        dw_part, db_part = torch.zeros(B, k, C), torch.zeros(B, C)
        dh0 = None
        if ctx.needs_input_grad[4]:  # the kernel writes every document's start row; an empty one passes H0 through
            dh0 = gl.clone() if gl is not None else torch.zeros(ctx.n_states, C)
        da_head = torch.zeros(B, k - 1, C) if ctx.needs_input_grad[3] else None
        if T:
            _check(_load().dsn_cpu_backward(
                xf.data_ptr(), _ptr(hist), _ptr(h0f), wT.data_ptr(), b.data_ptr(),
                *(_ptr(r) for r in (rows if rows is not None else (None, None, None))), Hc.data_ptr(), _ptr(gs),
                _ptr(gl), B, T, C, xf.stride(0), xf.stride(1), k, n, float(max_spike), K, _SURROGATE_CODES[surrogate],
                float(surrogate_alpha),
                dx.data_ptr(), dw_part.data_ptr(), db_part.data_ptr(), _ptr(dh0), _ptr(da_head),
                torch.get_num_threads()))
        d_history = None
        if da_head is not None:
            # history row m (< k-1) feeds a'_t through tap j = m - t: d hist_m = sum_{t <= m} w_{m-t} d a'_t
            d_history = torch.zeros(B, k - 1, C)
            for m in range(k - 1):
                for t in range(min(m + 1, T)):
                    d_history[:, m] += wT[m - t] * da_head[:, t]
        return (dx.to(x_dtype), dw_part.sum(0).t().to(w_dtype), db_part.sum(0).to(w_dtype), d_history, dh0,
                None, None, None, None, None)


def run(x, weight, bias, history, h0, cu_seqlens, tau, max_spike, surrogate, surrogate_alpha, output_membrane):
    """(spikes, final membrane, None) through the C kernel."""
    spikes, last = DSNCpuFunction.apply(x, weight, bias, history, h0, cu_seqlens, tau, max_spike, surrogate,
                                        surrogate_alpha)
    return spikes, last, None
