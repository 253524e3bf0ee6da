"""The DSN as one op, from X to spikes, with one signature over every backend; and its one-token step.

    out = dsn(x, weight, bias, tau, max_spike, surrogate, surrogate_alpha, initial_state=None, cu_seqlens=None,
              output_final_state=False, output_membrane=False, backend="auto")
    spikes, state = dsn_step(x_t, weight, bias, tau, max_spike, surrogate, surrogate_alpha, state, backend="auto")

Backends (BACKENDS), named alike in the op, the step and neurons.DSN(backend=...):
  "naive"  the float64 definition, a loop (naive.py): the oracle
  "torch"  one autograd Function with a hand-written in-place backward (torch_backend.py): any device
  "c"      the compiled CPU kernel, one pass over time each way (c_backend.py, csrc/dsn_cpu.c)
  "triton" the fused GPU kernel after a torch conv, and the one-kernel decode step (triton_backend.py)
  "auto"   CUDA: triton, else torch; other devices: c, else torch (the first that supports the call;
           each backend's `unsupported` says what it cannot run: e.g. only torch and naive return the
           membrane, float64 computes in float64 on torch and naive only)
An explicit backend that cannot run a call raises ValueError saying why; only "auto" falls back.
The backend that ran is noted for ops.record_backends ("dsn" or "dsn_step", name).

Dtypes: spikes and the conv history come back in x's dtype; membranes in float32 (float64 for
float64 inputs), whatever the backend computes in.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..backends import note_backend
from ..scan import check_cu_seqlens
from ..spike import SURROGATES
from .conv import next_conv_history
from .naive import naive_dsn

BACKENDS = ("auto", "naive", "torch", "c", "triton")
_INF = float("inf")
_loaded = {}


def _implementation(name: str):
    """The backend's module, imported on first use. A saved model folder's copy of this code (trust_remote_code) is
    complete only once the model class has loaded (transformers copies it module by module, following
    `from .x import` lines from the config's module first), and the Triton kernels register only when needed."""
    impl = _loaded.get(name)
    if impl is None:
        if name == "torch":
            from . import torch_backend as impl
        elif name == "c":
            from . import c_backend as impl
        else:
            from . import triton_backend as impl
        _loaded[name] = impl
    return impl


class DSNState(NamedTuple):
    """What a DSN carries from one step to the next: O(1) in the stream length.

    membrane: H before the next step [B, C] (float32; float64 for float64 inputs).
    conv: the conv's last k-1 inputs [B, k-1, C], oldest first.
    As an initial state either may be None (zeros); with packed documents (cu_seqlens) conv must be
    None (every document starts with an empty history) and membrane, if given, has one row per document.
    """

    membrane: torch.Tensor | None
    conv: torch.Tensor | None


class DSNOutput(NamedTuple):
    """spikes [B, T, C] (x's dtype); final_state (if asked: one row per packed document); membrane H [B, T, C] (if asked)."""

    spikes: torch.Tensor
    final_state: DSNState | None
    membrane: torch.Tensor | None


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of membranes for inputs of `dtype`: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_params(who, x, shape, weight, bias, tau, max_spike, surrogate, backend):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{who}: x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != len(shape):
        raise ValueError(f"{who}: x must have shape [{', '.join(shape)}], got {tuple(x.shape)}")
    C = x.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != C or weight.shape[1] < 1:
        raise ValueError(f"{who}: weight must have shape [C={C}, k >= 1], got {tuple(getattr(weight, 'shape', ()))}")
    if not isinstance(bias, torch.Tensor) or bias.shape != (C,):
        raise ValueError(f"{who}: bias must have shape [C={C}], got {tuple(getattr(bias, 'shape', ()))}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau < _INF:
        raise ValueError(f"{who}: tau must be a finite number > 0, got {tau!r}")
    if isinstance(max_spike, bool) or not isinstance(max_spike, int) or max_spike < 1:
        raise ValueError(f"{who}: max_spike must be an integer >= 1, got {max_spike!r}")
    if surrogate not in SURROGATES:
        raise ValueError(f"{who}: surrogate must be one of {SURROGATES}, got {surrogate!r}")
    if backend not in BACKENDS:
        raise ValueError(f"{who}: backend must be one of {BACKENDS}, got {backend!r}")


def _check_state(who, state, n_membranes, B, k, C, packed):
    if state is None:
        return
    if not isinstance(state, DSNState):
        raise TypeError(f"{who}: the state must be a DSNState (membrane, conv) or None, got {type(state).__name__}")
    if packed and state.conv is not None:
        raise ValueError(f"{who}: packed documents (cu_seqlens) start with an empty conv history; pass a state "
                         "whose conv history is None")
    want_m, want_c = (n_membranes, C), (B, k - 1, C)
    if ((state.membrane is not None and state.membrane.shape != want_m)
            or (state.conv is not None and state.conv.shape != want_c)):
        got = [None if t is None else tuple(t.shape) for t in state]
        raise ValueError(f"{who}: state shapes must be membrane {want_m} and conv {want_c}, got {got[0]} and {got[1]}")


def resolve_backend(backend: str, x: torch.Tensor, kernel_size: int, tau: float, surrogate: str,
                    output_membrane: bool = False) -> str:
    """The backend dsn() runs for this call: "auto"'s pick, or the explicit one (ValueError if it cannot)."""
    if backend == "auto":  # the torch backend runs every call
        return next(name for name in (("triton", "torch") if x.is_cuda else ("c", "torch"))
                    if _implementation(name).unsupported(x, kernel_size, tau, surrogate, output_membrane) is None)
    if backend == "naive":
        return backend
    reason = _implementation(backend).unsupported(x, kernel_size, tau, surrogate, output_membrane)
    if reason is not None:
        raise ValueError(f"dsn: backend={backend!r} cannot run this call: {reason}")
    return backend


def dsn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tau: float = 0.25, max_spike: int = 4,
        surrogate: str = "rect", surrogate_alpha: float = 2.0, initial_state: DSNState | None = None,
        cu_seqlens: torch.Tensor | None = None, output_final_state: bool = False, output_membrane: bool = False,
        backend: str = "auto") -> DSNOutput:
    """The DSN over x [B, T, C]: decay conv, decay, scan, spikes; differentiable in x, weight, bias and the state.

    weight [C, k], bias [C]: the causal depthwise conv that sets the decay (weight[:, k-1] multiplies
    the current input). tau: alpha = sigmoid(conv)^(1/tau). max_spike: N, spikes are 0..N.
    surrogate: "rect" (straight through on 0 <= H <= N) or "atan" (surrogate_alpha its sharpness).
    initial_state: a DSNState to continue from (None: a fresh neuron). cu_seqlens: offsets [0, ..., T]
    of packed documents in one row (B = 1), each starting fresh (or from its row of
    initial_state.membrane); nothing crosses a boundary. Returns DSNOutput.
    """
    _check_params("dsn", x, ("B", "T", "C"), weight, bias, tau, max_spike, surrogate, backend)
    B, T, C = x.shape
    k = weight.shape[1]
    n = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"dsn: packed documents (cu_seqlens) lie in one row (batch size 1), got batch size {B}")
        n = check_cu_seqlens("dsn", cu_seqlens, B, T)
    _check_state("dsn", initial_state, n, B, k, C, cu_seqlens is not None)
    history = None if initial_state is None else initial_state.conv
    h0 = None if initial_state is None else initial_state.membrane
    name = resolve_backend(backend, x, k, tau, surrogate, output_membrane)
    note_backend("dsn", name)
    sdt = state_dtype(x.dtype)
    if name == "naive":
        spikes, membrane, last, conv = naive_dsn(x, weight, bias, tau, max_spike, surrogate, surrogate_alpha, history,
                                                 h0, cu_seqlens)
        spikes = spikes.to(x.dtype)
        membrane = membrane.to(sdt) if output_membrane else None
    else:
        spikes, last, membrane = _implementation(name).run(x, weight, bias, history, h0, cu_seqlens, float(tau),
                                                            int(max_spike), surrogate, float(surrogate_alpha),
                                                            output_membrane)
        conv = next_conv_history(x, history, cu_seqlens, k) if output_final_state else None
    final = DSNState(last.to(sdt), conv.to(x.dtype)) if output_final_state else None
    return DSNOutput(spikes, final, membrane)


def dsn_step(x_t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tau: float = 0.25, max_spike: int = 4,
             surrogate: str = "rect", surrogate_alpha: float = 2.0, state: DSNState | None = None,
             backend: str = "auto") -> tuple[torch.Tensor, DSNState]:
    """One step of the DSN: x_t [B, C] -> (spikes [B, C], the new DSNState). O(1) in the stream length.

    The same neuron as dsn(): a loop of dsn_step gives what one dsn() call gives (to rounding), and a
    state passes between the two forms. Backends: "torch" (any device, differentiable), "triton" (one
    kernel per call, no autograd), "naive" (the definition); "auto" runs triton for CUDA tensors where
    no gradient is needed, else torch. The C kernel has no step ("c" is an error).
    """
    _check_params("dsn_step", x_t, ("B", "C"), weight, bias, tau, max_spike, surrogate, backend)
    B, C = x_t.shape
    k = weight.shape[1]
    _check_state("dsn_step", state, B, B, k, C, False)
    sdt = state_dtype(x_t.dtype)
    membrane = x_t.new_zeros(B, C, dtype=sdt) if state is None or state.membrane is None else state.membrane
    conv = x_t.new_zeros(B, k - 1, C) if state is None or state.conv is None else state.conv
    name = backend
    if backend == "auto":
        name = "triton" if x_t.is_cuda and _implementation("triton").step_unsupported(
            x_t, (x_t, weight, bias, conv, membrane)) is None else "torch"
    elif backend == "c":
        raise ValueError("dsn_step: backend='c' cannot run this call: the C kernel has no step (the torch step is "
                         "the CPU decode path)")
    elif backend == "triton":
        reason = _implementation("triton").step_unsupported(x_t, (x_t, weight, bias, conv, membrane))
        if reason is not None:
            raise ValueError(f"dsn_step: backend='triton' cannot run this call: {reason}")
    note_backend("dsn_step", name)
    if name == "naive":
        spikes, _, h, new_conv = naive_dsn(x_t.unsqueeze(1), weight, bias, tau, max_spike, surrogate, surrogate_alpha,
                                           conv, membrane)
        return spikes[:, 0].to(x_t.dtype), DSNState(h.to(sdt), new_conv.to(x_t.dtype))
    impl = _implementation(name)  # (the torch and Triton steps return these dtypes already)
    spikes, h, new_conv = impl.step(x_t, weight, bias, conv, membrane, float(tau), int(max_spike), surrogate,
                                    float(surrogate_alpha))
    return spikes, DSNState(h, new_conv)
