"""The Triton backend of ops.dsn: the neuron fused after its conv, and the one-token decode step (CUDA).

Sequence: the conv a' = conv(X) runs in torch (conv.decay_logit, differentiable), then the custom op
`spikelm::dsn_fused` takes a' and X [B, T, C]:
    log alpha_t = max(logsigmoid(a'_t) / tau, -20)
    H_t         = alpha_t H_{t-1} + (1 - alpha_t) X_t           (float32)
    S_t         = clip(floor(H_t + 1/2), 0, N)                  (X's dtype)
with the chunked scan of ops/triton_scan.py in its DSN mode, writing only the spikes and the final
state: nothing between a' and S goes to memory. (When chunks are needed to fill the GPU, a' and X
are read twice: once for the chunk summaries, once for the output pass.) The backward
(`spikelm::dsn_fused_backward`) recomputes H in float32 (nothing in low precision is saved) and
runs the adjoint recurrence with the surrogate's slope (rect: dS passes where 0 <= H <= N; atan: a
bump per threshold), giving d a', d X and d H_0; autograd carries d a' through the conv.

Step: `spikelm::dsn_step`, one kernel per token for a whole DSN layer: conv taps, decay, membrane,
spike and the shifted conv history, written to new buffers; its fake impl lets torch.compile trace
it without a graph break. Decoding only (no autograd).

The kernels run where Triton does: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (the
tests). `unsupported` / `step_unsupported` say why a call cannot run here; ops.dsn then refuses an
explicit backend="triton" and "auto" picks the torch backend.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import triton_scan as _ts
from ..registry import op_name
from ..scan import document_starts
from .conv import decay_logit

tl = _ts.tl
triton = _ts.triton


def _use_triton(t: torch.Tensor) -> bool:
    return _ts.is_available() and (t.is_cuda or (_ts.interpreted() and t.device.type == "cpu"))


def _require_triton(t: torch.Tensor) -> None:
    if not _use_triton(t):
        raise RuntimeError(f"spikelm: the DSN's Triton kernels need Triton and a CUDA tensor (or TRITON_INTERPRET=1 "
                           f"for CPU tensors), got a {t.device} tensor")


def unsupported(x: torch.Tensor, kernel_size: int, tau: float, surrogate: str, output_membrane: bool) -> str | None:
    """Why the fused kernel cannot run this call (None: it can)."""
    if not _use_triton(x):
        return f"it needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), got a {x.device} tensor"
    if x.dtype == torch.float64:
        return "it computes in float32 (float64 goes to the torch backend)"
    if output_membrane:
        return "it does not return the membrane (it writes spikes and the final state only)"
    return None


def run(x, weight, bias, history, h0, cu_seqlens, tau, max_spike, surrogate, surrogate_alpha, output_membrane,
        chunk_len: int | None = None):
    """(spikes, final membrane float32, None): the conv in torch, then the fused kernel.

    chunk_len: steps per chunk of the scan (None picks one for the device; tests force small chunks)."""
    B, T, C = x.shape
    k = weight.shape[1]
    xf = x.float()
    window = torch.cat([xf.new_zeros(B, k - 1, C) if history is None else history.float(), xf], dim=1)
    logit = decay_logit(window, weight, bias, T, None if cu_seqlens is None else document_starts(cu_seqlens))
    spikes, last = fused_op(logit, x, h0, cu_seqlens, float(tau), int(max_spike), SURROGATE_CODES[surrogate],
                            float(surrogate_alpha), chunk_len)
    return spikes, last, None


# ----------------------------------------------------------------------------------------------
# sequence kernels (ops/triton_scan.py's passes in their DSN mode)
# ----------------------------------------------------------------------------------------------
def _layout(x, cu_seqlens):
    B, T, C = x.shape
    return _ts.packed_layout(B, T, cu_seqlens, x.device)


def _triton_fused_forward(logit, x, h0, cu_seqlens, tau, max_spike, chunk_len=None, write_membrane=None):
    cu, N, max_len = _layout(x, cu_seqlens)
    C = x.shape[-1]
    spikes = torch.empty_like(x) if write_membrane is None else None
    final = h0.float().clone() if h0 is not None else x.new_zeros(N, C, dtype=torch.float32)
    _ts.run_scan_kernels(mode=_ts.MODE_DSN, reverse=False, U=x.contiguous(), G=logit.contiguous(), cu=cu, n_seqs=N,
                         max_len=max_len, D=C, out=spikes, out2=write_membrane, final=final,
                         init=None if h0 is None else h0.float().contiguous(), tau=tau, max_spike=max_spike,
                         acc=tl.float32, chunk_len=chunk_len)
    return spikes, final


def _triton_fused_backward(grad_s, grad_last, logit, x, h0, cu_seqlens, tau, max_spike, surrogate, surrogate_alpha,
                           chunk_len=None):
    x, logit = x.contiguous(), logit.contiguous()
    h0f = None if h0 is None else h0.float().contiguous()
    # recompute the membrane in float32: cheaper than saving it, and nothing is kept in low precision
    membrane = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    _triton_fused_forward(logit, x, h0f, cu_seqlens, tau, max_spike, chunk_len, write_membrane=membrane)
    cu, N, max_len = _layout(x, cu_seqlens)
    C = x.shape[-1]
    seed = grad_last.float().contiguous()
    d_logit, d_x = torch.empty_like(logit), torch.empty_like(x)
    d_h0 = seed.clone()  # an empty sequence passes its final-state gradient straight to its initial state
    _ts.run_scan_kernels(mode=_ts.MODE_DSN, reverse=True, U=grad_s.contiguous(), G=logit, H=membrane, H0=h0f, X=x,
                         cu=cu, n_seqs=N, max_len=max_len, D=C, out=d_logit, out2=d_x, final=d_h0, init=seed,
                         tau=tau, max_spike=max_spike, surrogate=surrogate, surrogate_alpha=surrogate_alpha,
                         acc=tl.float32, chunk_len=chunk_len)
    return d_logit, d_x, (None if h0 is None else d_h0.to(h0.dtype))


# custom ops (one opaque node each for torch.compile): the sequence forward and its backward.
# fused_op(logit, x, h0, cu_seqlens, tau, max_spike, surrogate, surrogate_alpha, chunk_len) -> (spikes, final
# membrane) is the backend's building block after the conv (benchmarks/gpu_check.py times it alone);
# surrogate: SURROGATE_CODES' 0 (rect) or 1 (atan, sharpness surrogate_alpha).
SURROGATE_CODES = {"rect": 0, "atan": 1}


@torch.library.custom_op(op_name("dsn_fused"), mutates_args=())
def fused_op(logit: torch.Tensor, x: torch.Tensor, h0: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
             tau: float, max_spike: int, surrogate: int, surrogate_alpha: float,
             chunk_len: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    _require_triton(x)
    return _triton_fused_forward(logit, x, h0, cu_seqlens, tau, max_spike, chunk_len)


@fused_op.register_fake
def _(logit, x, h0, cu_seqlens, tau, max_spike, surrogate, surrogate_alpha, chunk_len):
    n = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return torch.empty_like(x), x.new_empty(n, x.shape[-1], dtype=torch.float32)


@torch.library.custom_op(op_name("dsn_fused_backward"), mutates_args=())
def _dsn_fused_backward_op(grad_s: torch.Tensor, grad_last: torch.Tensor, logit: torch.Tensor, x: torch.Tensor,
                           h0: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], tau: float, max_spike: int,
                           surrogate: int, surrogate_alpha: float,
                           chunk_len: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _require_triton(x)
    dl, dx, dh0 = _triton_fused_backward(grad_s, grad_last, logit, x, h0, cu_seqlens, tau, max_spike, surrogate,
                                         surrogate_alpha, chunk_len)
    # custom ops cannot return None: an absent initial state gets an empty gradient placeholder
    return dl, dx, (dh0 if dh0 is not None else x.new_empty(0))


@_dsn_fused_backward_op.register_fake
def _(grad_s, grad_last, logit, x, h0, cu_seqlens, tau, max_spike, surrogate, surrogate_alpha, chunk_len):
    return torch.empty_like(logit), torch.empty_like(x), (torch.empty_like(h0) if h0 is not None else x.new_empty(0))


def _fused_setup_context(ctx, inputs, output):
    logit, x, h0, cu_seqlens, tau, max_spike, surrogate, surrogate_alpha, chunk_len = inputs
    ctx.save_for_backward(logit, x, h0, cu_seqlens)
    ctx.args = (tau, max_spike, surrogate, surrogate_alpha, chunk_len)


def _fused_backward(ctx, grad_s, grad_last):
    logit, x, h0, cu_seqlens = ctx.saved_tensors
    n = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if grad_s is None:
        grad_s = torch.zeros_like(x)
    if grad_last is None:
        grad_last = x.new_zeros(n, x.shape[-1], dtype=torch.float32)
    dl, dx, dh0 = _dsn_fused_backward_op(grad_s, grad_last, logit, x, h0, cu_seqlens, *ctx.args)
    return dl, dx, (dh0 if h0 is not None else None), None, None, None, None, None, None


fused_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)


# ----------------------------------------------------------------------------------------------
# decode step
# ----------------------------------------------------------------------------------------------
if triton is not None:
    FLOOR = _ts.FLOOR
    from ..triton_scan import _expm1, _log1p

    @triton.jit
    def _dsn_step_kernel(X, CONV, MEM, W, BIAS, S, CONV_OUT, MEM_OUT, C, tau, max_spike,
                         K: tl.constexpr, BLOCK_C: tl.constexpr):
        """One token: logit = bias + sum_j window_j w_j (decay_logit's order), decay, membrane, spike, new history."""
        b, i_c = tl.program_id(0), tl.program_id(1)
        offs = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
        m = offs < C
        b64 = b.to(tl.int64)
        x = tl.load(X + b64 * C + offs, mask=m, other=0.0).to(tl.float32)
        conv_row = CONV + b64 * (K - 1) * C + offs  # conv history [B, K-1, C]: oldest input first
        conv_out_row = CONV_OUT + b64 * (K - 1) * C + offs
        logit = tl.load(BIAS + offs, mask=m, other=0.0).to(tl.float32)
        for j in tl.static_range(K - 1):
            tap = tl.load(conv_row + j * C, mask=m, other=0.0).to(tl.float32)
            logit = logit + tap * tl.load(W + offs * K + j, mask=m, other=0.0).to(tl.float32)
            if j > 0:  # the new history drops the oldest input
                tl.store(conv_out_row + (j - 1) * C, tap, mask=m)
        logit = logit + x * tl.load(W + offs * K + (K - 1), mask=m, other=0.0).to(tl.float32)
        ls = tl.minimum(logit, 0.0) - _log1p(tl.exp(-tl.abs(logit)))
        log_decay = tl.maximum(ls / tau, FLOOR)
        h = tl.load(MEM + b64 * C + offs, mask=m, other=0.0)
        h = -_expm1(log_decay) * x + tl.exp(log_decay) * h
        tl.store(MEM_OUT + b64 * C + offs, h, mask=m)
        tl.store(S + b64 * C + offs, tl.minimum(tl.maximum(tl.floor(h + 0.5), 0.0), max_spike), mask=m)
        if K > 1:
            tl.store(conv_out_row + (K - 2) * C, x, mask=m)


@torch.library.custom_op(op_name("dsn_step"), mutates_args=())
def _dsn_step_op(x: torch.Tensor, conv: torch.Tensor, membrane: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor, tau: float, max_spike: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _require_triton(x)
    B, C = x.shape
    spikes, conv_out, mem_out = torch.empty_like(x), torch.empty_like(conv), torch.empty_like(membrane)
    if B == 0 or C == 0:
        return spikes, conv_out, mem_out
    BLOCK_C = min(1024, max(16, triton.next_power_of_2(C)))
    _dsn_step_kernel[(B, triton.cdiv(C, BLOCK_C))](
        x, conv, membrane, weight, bias, spikes, conv_out, mem_out, C, float(tau), float(max_spike),
        K=weight.shape[1], BLOCK_C=BLOCK_C, num_warps=max(1, min(8, BLOCK_C // 128)))
    return spikes, conv_out, mem_out


@_dsn_step_op.register_fake
def _(x, conv, membrane, weight, bias, tau, max_spike):
    return torch.empty_like(x), torch.empty_like(conv), torch.empty_like(membrane)


def step_unsupported(x_t: torch.Tensor, tensors) -> str | None:
    """Why the step kernel cannot run this call (None: it can). tensors: every input, for the autograd check."""
    if not _use_triton(x_t):
        return f"it needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), got a {x_t.device} tensor"
    if x_t.dtype == torch.float64:
        return "it computes in float32 (float64 goes to the torch backend)"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return "it has no autograd (decoding only): run it under torch.no_grad() or inference_mode"
    return None


def step(x_t, weight, bias, conv, membrane, tau, max_spike, surrogate, surrogate_alpha):
    """(spikes, new float32 membrane, new conv history) of one token through the step kernel."""
    spikes, conv_out, mem_out = _dsn_step_op(x_t.contiguous(), conv.to(x_t.dtype).contiguous(),
                                             membrane.float().contiguous(), weight.contiguous(), bias.contiguous(),
                                             float(tau), int(max_spike))
    return spikes, mem_out, conv_out
