"""Fused DSN neuron kernels (Triton) with their torch paths, registered as torch.library custom ops.

Sequence op `spikelm::dsn_fused`: from the conv logit a' [B, T, C] and the input X [B, T, C]
    log alpha_t = max(logsigmoid(a'_t) / tau, -20)
    H_t         = alpha_t H_{t-1} + (1 - alpha_t) X_t           (float32)
    S_t         = clip(floor(H_t + 1/2), 0, N)                  (X's dtype)
with the chunked scan of ops/triton_scan.py in its DSN mode, writing only the spikes and the final
state: nothing between a' and S goes to memory. (When chunks are needed to fill the GPU, a' and X
are read twice: once for the chunk summaries, once for the output pass.) The backward recomputes H in float32 (nothing in low precision is
saved) and runs the adjoint recurrence with the rect surrogate (dS passes where 0 <= H <= N),
giving d a', d X and d H_0 exactly as the unfused torch composition `dsn_reference` does.

Decode op `spikelm::dsn_step_`: one token through a DSN layer, in place on static buffers (conv
cache shifted, membrane updated), so decoding can be captured by CUDA graphs; its fake impl lets
torch.compile trace it without a graph break.

Each op has a Triton impl (CUDA, or the CPU interpreter when TRITON_INTERPRET=1) and a torch impl
(every other device); `dsn_reference(..., backend="naive")` in float64 is the oracle in the tests.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import triton_scan as _ts
from .decay import LOG_DECAY_FLOOR, log_decay as _log_decay
from .registry import op_name
from .scan import check_cu_seqlens, scan
from .spike import quantize_spikes
from .torch_scan import chunked_scan_forward

tl = _ts.tl
triton = _ts.triton


def _use_triton(t: torch.Tensor) -> bool:
    return _ts.is_available() and (t.is_cuda or (_ts.interpreted() and t.device.type == "cpu"))


# ----------------------------------------------------------------------------------------------
# torch paths (the unfused composition, exactly as neurons/dsn.py computes it)
# ----------------------------------------------------------------------------------------------
def _rect_spikes(h: torch.Tensor, max_spike: int) -> torch.Tensor:
    return quantize_spikes(h, max_spike, "rect")


def dsn_reference(logit, x, initial_state=None, cu_seqlens=None, tau: float = 0.25, max_spike: int = 4,
                  backend: str = "torch", dtype=torch.float32):
    """The unfused torch composition of the DSN neuron after its conv; differentiable (autograd).

    backend="torch" in float32 is what DSN.forward runs without the fused kernel; backend="naive"
    with dtype=torch.float64 is the oracle. Returns (spikes in x's dtype, final state in dtype).
    """
    xf = x.to(dtype)
    log_decay = _log_decay(logit.to(dtype), tau)
    drive = -torch.expm1(log_decay) * xf  # (1 - alpha) X
    h0 = None if initial_state is None else initial_state.to(dtype)
    membrane, last = scan(drive, log_decay, h0, output_final_state=True, cu_seqlens=cu_seqlens, backend=backend)
    return _rect_spikes(membrane, max_spike).to(x.dtype), last


def _torch_fused_forward(logit, x, h0, cu_seqlens, tau, max_spike):
    with torch.no_grad():
        spikes, last = dsn_reference(logit, x, h0, cu_seqlens, tau, max_spike, backend="torch")
    return spikes, last.clone()  # an op's outputs must not alias its inputs (T = 0 returns h0 itself)


def _torch_fused_backward(grad_s, grad_last, logit, x, h0, cu_seqlens, tau, max_spike):
    """The backward kernel's math in torch ops (no autograd: a custom op's impl runs below it).

    s_t = dS_t rect'(H_t) + alpha_{t+1} s_{t+1} (seeded by the final-state gradient), then
    dX = (1 - alpha) s, d log-alpha = s alpha (H_{t-1} - X_t), d a' = d log-alpha / tau * sigmoid(-a')
    where the floor is not active, d H_0 = alpha_0 s_0.
    """
    B, T, C = x.shape
    lf, xf, gs = logit.float(), x.float(), grad_s.float()
    ls = F.softplus(-lf).mul(-1.0 / tau)  # logsigmoid(a') / tau, as the forward computes it
    log_decay = ls.clamp(min=LOG_DECAY_FLOOR)
    h0f = None if h0 is None else h0.float()
    cu = [b * T for b in range(B + 1)] if cu_seqlens is None else cu_seqlens.tolist()
    rows = lambda t: t.reshape(-1, C)  # noqa: E731  (packed rows [B*T, C])
    d_logit, d_x = torch.empty_like(rows(lf)), torch.empty_like(rows(xf))
    d_h0 = grad_last.float().clone()
    for n, (s, e) in enumerate(zip(cu, cu[1:])):
        if e == s:
            continue  # an empty sequence: d H_0 = the final-state gradient
        ld, xs, lo = rows(log_decay)[s:e], rows(xf)[s:e], rows(lf)[s:e]
        start = None if h0f is None else h0f[n]
        h, _ = chunked_scan_forward((-torch.expm1(ld) * xs)[None], ld[None], None if start is None else start[None])
        h = h[0]
        u = rows(gs)[s:e] * ((h >= 0) & (h <= max_spike)).float()
        ld_next = torch.cat([ld[1:], ld.new_zeros(1, C)])  # the final-state gradient enters undecayed
        adj, _ = chunked_scan_forward(u.flip(0)[None].contiguous(), ld_next.flip(0)[None].contiguous(),
                                      grad_last[n : n + 1].float())
        adj = adj[0].flip(0)
        h_prev = torch.cat([(start if start is not None else h.new_zeros(C))[None], h[:-1]])
        alpha = torch.exp(ld)
        dg = adj * alpha * (h_prev - xs)
        d_logit[s:e] = torch.where(rows(ls)[s:e] >= LOG_DECAY_FLOOR, dg / tau * torch.sigmoid(-lo), 0.0)
        d_x[s:e] = -torch.expm1(ld) * adj
        d_h0[n] = alpha[0] * adj[0]
    return (d_logit.view(B, T, C).to(logit.dtype), d_x.view(B, T, C).to(x.dtype),
            None if h0 is None else d_h0.to(h0.dtype))


# ----------------------------------------------------------------------------------------------
# Triton paths
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


def _triton_fused_backward(grad_s, grad_last, logit, x, h0, cu_seqlens, tau, max_spike, chunk_len=None):
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
                         tau=tau, max_spike=max_spike, acc=tl.float32, chunk_len=chunk_len)
    return d_logit, d_x, (None if h0 is None else d_h0.to(h0.dtype))


# ----------------------------------------------------------------------------------------------
# custom ops: sequence forward (+ its backward op) and the in-place decode step
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op(op_name("dsn_fused"), mutates_args=())
def _dsn_fused_op(logit: torch.Tensor, x: torch.Tensor, h0: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                  tau: float, max_spike: int, chunk_len: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(x):
        return _triton_fused_forward(logit, x, h0, cu_seqlens, tau, max_spike, chunk_len)
    return _torch_fused_forward(logit, x, h0, cu_seqlens, tau, max_spike)


@_dsn_fused_op.register_fake
def _(logit, x, h0, cu_seqlens, tau, max_spike, chunk_len):
    n = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return torch.empty_like(x), x.new_empty(n, x.shape[-1], dtype=torch.float32)


@torch.library.custom_op(op_name("dsn_fused_backward"), mutates_args=())
def _dsn_fused_backward_op(grad_s: torch.Tensor, grad_last: torch.Tensor, logit: torch.Tensor, x: torch.Tensor,
                           h0: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], tau: float, max_spike: int,
                           chunk_len: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_triton(x):
        dl, dx, dh0 = _triton_fused_backward(grad_s, grad_last, logit, x, h0, cu_seqlens, tau, max_spike, chunk_len)
    else:
        dl, dx, dh0 = _torch_fused_backward(grad_s, grad_last, logit, x, h0, cu_seqlens, tau, max_spike)
    # custom ops cannot return None: an absent initial state gets an empty gradient placeholder
    return dl, dx, (dh0 if dh0 is not None else x.new_empty(0))


@_dsn_fused_backward_op.register_fake
def _(grad_s, grad_last, logit, x, h0, cu_seqlens, tau, max_spike, chunk_len):
    return torch.empty_like(logit), torch.empty_like(x), (torch.empty_like(h0) if h0 is not None else x.new_empty(0))


def _fused_setup_context(ctx, inputs, output):
    logit, x, h0, cu_seqlens, tau, max_spike, chunk_len = inputs
    ctx.save_for_backward(logit, x, h0, cu_seqlens)
    ctx.args = (tau, max_spike, chunk_len)


def _fused_backward(ctx, grad_s, grad_last):
    logit, x, h0, cu_seqlens = ctx.saved_tensors
    tau, max_spike, chunk_len = ctx.args
    n = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if grad_s is None:
        grad_s = torch.zeros_like(x)
    if grad_last is None:
        grad_last = x.new_zeros(n, x.shape[-1], dtype=torch.float32)
    dl, dx, dh0 = _dsn_fused_backward_op(grad_s, grad_last, logit, x, h0, cu_seqlens, tau, max_spike, chunk_len)
    return dl, dx, (dh0 if h0 is not None else None), None, None, None, None


_dsn_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)


def dsn_fused(logit: torch.Tensor, x: torch.Tensor, initial_state: torch.Tensor | None = None,
              cu_seqlens: torch.Tensor | None = None, tau: float = 0.25, max_spike: int = 4,
              output_final_state: bool = False, chunk_len: int | None = None):
    """Fused DSN neuron after its conv: logit a' and input X [B, T, C] -> (spikes in X's dtype, final state).

    initial_state: [B, C] ([N, C] with cu_seqlens) membrane before the first step, or None for zeros.
    cu_seqlens: packed sequences in one row (B = 1); each starts from its own initial state row.
    Differentiable in logit, x and initial_state (rect surrogate). Triton on CUDA, torch elsewhere.
    The final state is float32 ([B or N, C]); returned when output_final_state, else None.
    """
    for name, t in (("logit", logit), ("x", x)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.is_floating_point():
            raise ValueError(f"dsn_fused: {name} must be a floating [B, T, C] tensor")
    if logit.shape != x.shape:
        raise ValueError(f"dsn_fused: logit and x must have the same shape, got {tuple(logit.shape)} and {tuple(x.shape)}")
    if logit.device != x.device:
        raise ValueError(f"dsn_fused: logit and x must be on one device, got {logit.device} and {x.device}")
    B, T, C = x.shape
    n = B if cu_seqlens is None else check_cu_seqlens("dsn_fused", cu_seqlens, B, T)
    if initial_state is not None and tuple(initial_state.shape) != (n, C):
        raise ValueError(f"dsn_fused: initial_state must have shape {(n, C)}, got {tuple(initial_state.shape)}")
    if not tau > 0:
        raise ValueError(f"dsn_fused: tau must be > 0, got {tau!r}")
    if isinstance(max_spike, bool) or not isinstance(max_spike, int) or max_spike < 1:
        raise ValueError(f"dsn_fused: max_spike must be an integer >= 1, got {max_spike!r}")
    spikes, last = _dsn_fused_op(logit, x, initial_state, cu_seqlens, float(tau), int(max_spike), chunk_len)
    return spikes, (last if output_final_state else None)


# ---- decode step ------------------------------------------------------------------------------
if triton is not None:
    FLOOR = _ts.FLOOR
    from .triton_scan import _expm1, _log1p

    @triton.jit
    def _dsn_step_kernel(X, CONV, MEM, W, BIAS, S, C, tau, max_spike,
                         K: tl.constexpr, BLOCK_C: tl.constexpr):
        """One token: logit = bias + sum_j window_j w_j (DSN.step's order), decay, membrane, spike; in place."""
        b, i_c = tl.program_id(0), tl.program_id(1)
        offs = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
        m = offs < C
        b64 = b.to(tl.int64)
        x = tl.load(X + b64 * C + offs, mask=m, other=0.0).to(tl.float32)
        conv_row = CONV + b64 * (K - 1) * C + offs  # conv cache [B, K-1, C]: oldest input first
        logit = tl.load(BIAS + offs, mask=m, other=0.0).to(tl.float32)
        for j in tl.static_range(K - 1):
            tap = tl.load(conv_row + j * C, mask=m, other=0.0).to(tl.float32)
            logit = logit + tap * tl.load(W + offs * K + j, mask=m, other=0.0).to(tl.float32)
        logit = logit + x * tl.load(W + offs * K + (K - 1), mask=m, other=0.0).to(tl.float32)
        ls = tl.minimum(logit, 0.0) - _log1p(tl.exp(-tl.abs(logit)))
        log_decay = tl.maximum(ls / tau, FLOOR)
        h = tl.load(MEM + b64 * C + offs, mask=m, other=0.0)
        h = -_expm1(log_decay) * x + tl.exp(log_decay) * h
        tl.store(MEM + b64 * C + offs, h, mask=m)
        tl.store(S + b64 * C + offs, tl.minimum(tl.maximum(tl.floor(h + 0.5), 0.0), max_spike), mask=m)
        # shift the conv cache by one step (each program owns its columns: read j+1 before it is overwritten)
        for j in tl.static_range(K - 2):
            tl.store(conv_row + j * C, tl.load(conv_row + (j + 1) * C, mask=m, other=0.0), mask=m)
        if K > 1:
            tl.store(conv_row + (K - 2) * C, x, mask=m)


def _check_step_args(x, conv_state, membrane, weight, bias):
    if x.dim() != 2:
        raise ValueError(f"dsn_step_: x must have shape [B, C], got {tuple(x.shape)}")
    B, C = x.shape
    if weight.dim() != 2 or weight.shape[0] != C:
        raise ValueError(f"dsn_step_: weight must have shape [C={C}, k], got {tuple(weight.shape)}")
    k = weight.shape[1]
    if tuple(conv_state.shape) != (B, k - 1, C):
        raise ValueError(f"dsn_step_: conv_state must have shape {(B, k - 1, C)}, got {tuple(conv_state.shape)}")
    if tuple(membrane.shape) != (B, C) or membrane.dtype != torch.float32:
        raise ValueError(f"dsn_step_: membrane must be float32 [B, C] = {(B, C)}, got {membrane.dtype} {tuple(membrane.shape)}")
    if tuple(bias.shape) != (C,):
        raise ValueError(f"dsn_step_: bias must have shape ({C},), got {tuple(bias.shape)}")
    for name, t in (("conv_state", conv_state), ("membrane", membrane)):
        if not t.is_contiguous():
            raise ValueError(f"dsn_step_: {name} must be contiguous (it is updated in place)")


def dsn_step_torch_(x, conv_state, membrane, weight, bias, tau: float, max_spike: int) -> torch.Tensor:
    """Torch path of the decode step, the same arithmetic as DSN.step, updating the state in place."""
    window = torch.cat([conv_state.float(), x.float().unsqueeze(1)], dim=1)  # [B, k, C]
    logit = bias.float().expand_as(membrane)
    w = weight.float()
    for j in range(weight.shape[1]):
        logit = torch.addcmul(logit, window[:, j], w[:, j])  # DSN._decay_logit's op, in its order
    log_decay = _log_decay(logit, tau)
    h = torch.addcmul(-torch.expm1(log_decay) * x.float(), torch.exp(log_decay), membrane)
    membrane.copy_(h)
    conv_state.copy_(window[:, 1:].to(conv_state.dtype))
    return torch.floor(h + 0.5).clamp_(0, max_spike).to(x.dtype)


@torch.library.custom_op(op_name("dsn_step_"), mutates_args=("conv_state", "membrane"))
def _dsn_step_op(x: torch.Tensor, conv_state: torch.Tensor, membrane: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor, tau: float, max_spike: int) -> torch.Tensor:
    if not _use_triton(x):
        return dsn_step_torch_(x, conv_state, membrane, weight, bias, tau, max_spike)
    B, C = x.shape
    spikes = torch.empty_like(x)
    if B == 0 or C == 0:
        return spikes
    BLOCK_C = min(1024, max(16, triton.next_power_of_2(C)))
    _dsn_step_kernel[(B, triton.cdiv(C, BLOCK_C))](
        x.contiguous(), conv_state, membrane, weight.contiguous(), bias.contiguous(), spikes, C, float(tau),
        float(max_spike), K=weight.shape[1], BLOCK_C=BLOCK_C, num_warps=max(1, min(8, BLOCK_C // 128)))
    return spikes


@_dsn_step_op.register_fake
def _(x, conv_state, membrane, weight, bias, tau, max_spike):
    return torch.empty_like(x)


def dsn_step_(x: torch.Tensor, conv_state: torch.Tensor, membrane: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor, tau: float = 0.25, max_spike: int = 4) -> torch.Tensor:
    """One DSN decode step, in place: x [B, C] -> spikes [B, C]; conv_state [B, k-1, C] and the float32
    membrane [B, C] are updated in place (static buffers, CUDA-graph friendly). No autograd (decoding)."""
    _check_step_args(x, conv_state, membrane, weight, bias)
    return _dsn_step_op(x, conv_state, membrane, weight, bias, float(tau), int(max_spike))


def dsn_module_step_(module, x: torch.Tensor, state) -> torch.Tensor:
    """DSN.step through the in-place op: updates state (a DSNState with contiguous buffers) in place."""
    return dsn_step_(x, state.conv, state.membrane, module.conv_weight, module.conv_bias, module.tau, module.max_spike)
