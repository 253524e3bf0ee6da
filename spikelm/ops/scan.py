"""`scan`: the diagonal linear recurrence h_t = exp(g_t) * h_{t-1} + x_t (the DSN's membrane, as a generic op).

Backends: "naive" (naive.py, a loop: the oracle), "torch" (torch_scan.py, chunked and cache-blocked),
"triton" (triton_scan.py, whose kernels also carry the fused DSN mode used by ops/dsn)."""
from __future__ import annotations

import torch

from .backends import note_backend
from .naive import naive_scan
from .torch_scan import torch_scan

BACKENDS = ("auto", "naive", "torch", "triton")


def triton_is_available() -> bool:
    """True when the Triton backend can run here (Triton importable and a CUDA device, or the interpreter)."""
    from . import triton_scan  # noqa: PLC0415  (imports triton lazily; the package runs without it)

    return triton_scan.is_available()


def check_cu_seqlens(who: str, cu_seqlens, batch_size: int, T: int) -> int:
    """Validate packed-sequence offsets [0, ..., T] for a [1, T, ...] input; returns the number of sequences."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
        raise TypeError(f"{who}: cu_seqlens must be a 1-D integer tensor of sequence offsets [0, ..., T]")
    if batch_size != 1:
        raise ValueError(f"{who}: with cu_seqlens the batch size must be 1 (packed sequences), got B={batch_size}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{who}: cu_seqlens needs at least two offsets [0, T]")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"{who}: cu_seqlens must rise from 0 to T={T} without decreasing, got {cu}")
    return len(cu) - 1


def _check_inputs(x, g, initial_state, cu_seqlens):
    for name, t in (("x", x), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"scan: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"scan: {name} must have shape [B, T, D], got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"scan: {name} must be a floating-point tensor, got {t.dtype}")
    if x.shape != g.shape:
        raise ValueError(f"scan: x and g must have the same shape, got x {tuple(x.shape)} and g {tuple(g.shape)}")
    if x.device != g.device:
        raise ValueError(f"scan: x and g must be on one device, got {x.device} and {g.device}")
    B, T, D = x.shape
    n_states = B
    if cu_seqlens is not None:
        n_states = check_cu_seqlens("scan", cu_seqlens, B, T)
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or not initial_state.is_floating_point():
            raise TypeError("scan: initial_state must be a floating-point torch.Tensor")
        if tuple(initial_state.shape) != (n_states, D):
            what = "[N, D] (one row per packed sequence)" if cu_seqlens is not None else "[B, D]"
            raise ValueError(f"scan: initial_state must have shape {what} = {(n_states, D)}, "
                             f"got {tuple(initial_state.shape)}")


def _compute_dtype(x, g):
    return torch.float64 if torch.float64 in (x.dtype, g.dtype) else torch.float32


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"scan: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and triton_is_available() else "torch"
    if backend == "triton" and not triton_is_available():
        raise RuntimeError("scan: backend='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
    return backend


def _naive_packed(x, g, initial_state, cu):
    hs, finals = [], []
    for n, (s, e) in enumerate(zip(cu, cu[1:])):
        h0 = None if initial_state is None else initial_state[n : n + 1]
        h, last = naive_scan(x[:, s:e], g[:, s:e], h0)
        hs.append(h)
        finals.append(last)
    return torch.cat(hs, dim=1), torch.cat(finals, dim=0)


def _reset_at_starts(x, g, initial_state, cu):
    """Packed sequences as one recurrence: decay 0 at every start, the start's h0 folded into x."""
    starts = torch.tensor([s for s, e in zip(cu, cu[1:]) if e > s], device=x.device, dtype=torch.long)
    rows = torch.tensor([n for n, (s, e) in enumerate(zip(cu, cu[1:])) if e > s], device=x.device, dtype=torch.long)
    if initial_state is not None and starts.numel():
        carried = torch.exp(g[0, starts]) * initial_state[rows]
        x = x.index_add(1, starts, carried.unsqueeze(0))
    reset = torch.zeros(g.shape[1], dtype=torch.bool, device=g.device)
    reset[starts] = True
    g = torch.where(reset[None, :, None], torch.full_like(g, float("-inf")), g)
    return x, g


def document_starts(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Offsets [n] where the non-empty packed documents start."""
    cu = cu_seqlens.to(torch.long)
    return cu[:-1][cu[1:] > cu[:-1]]


def packed_final_states(h, initial_state, cu, D):
    finals = []
    for n, (s, e) in enumerate(zip(cu, cu[1:])):
        if e > s:
            finals.append(h[0, e - 1])
        elif initial_state is not None:  # an empty sequence keeps its initial state
            finals.append(initial_state[n])
        else:
            finals.append(h.new_zeros(D))
    return torch.stack(finals, dim=0)


def scan(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, backend="auto"):
    """Diagonal linear recurrence h_t = exp(g_t) * h_{t-1} + x_t over time.

    Args:
        x: [B, T, D] input. g: [B, T, D] log-decay (exp(g) is the decay; g <= 0 is a contraction).
        initial_state: [B, D] state before the first step ([N, D] with cu_seqlens), or None for zeros.
        output_final_state: also return the state after the last step ([B, D], or [N, D] per sequence).
        cu_seqlens: 1-D offsets [0, ..., T] of packed sequences (B must be 1); every sequence starts
            from its own initial state row and nothing crosses a boundary.
        backend: "auto" (Triton for CUDA tensors when it works, else torch), "naive", "torch", "triton"; an
            explicit backend that cannot run is an error. The one that ran is noted for ops.record_backends.
    Returns:
        (h [B, T, D] in x's dtype, final state or None). States and accumulation are float32 for
        half-precision inputs (float64 stays float64); gradients flow to x, g and initial_state.
    """
    _check_inputs(x, g, initial_state, cu_seqlens)
    backend = _resolve_backend(backend, x)
    note_backend("scan", backend)
    out_dtype = x.dtype
    dtype = _compute_dtype(x, g)
    xc, gc = x.to(dtype).contiguous(), g.to(dtype).contiguous()
    h0 = None if initial_state is None else initial_state.to(dtype)
    cu = None if cu_seqlens is None else cu_seqlens.tolist()
    D = x.shape[-1]

    if backend == "naive":
        h, last = naive_scan(xc, gc, h0) if cu is None else _naive_packed(xc, gc, h0, cu)
    elif backend == "triton":
        from . import triton_scan  # noqa: PLC0415

        h, last = triton_scan.triton_scan(xc, gc, h0, cu_seqlens)
    else:
        if cu is None:
            h, last = torch_scan(xc, gc, h0)
        else:
            xr, gr = _reset_at_starts(xc, gc, h0, cu)
            h, _ = torch_scan(xr.contiguous(), gr.contiguous(), None)
            last = packed_final_states(h, h0, cu, D)
    return h.to(out_dtype), (last if output_final_state else None)
