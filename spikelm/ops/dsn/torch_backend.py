"""The torch backend of ops.dsn: the whole neuron in one autograd Function, conv -> decay -> scan -> spikes.

Written as separate autograd ops, the neuron makes ~60 passes over [B, T, C] memory per forward
and backward (each op reads and writes whole tensors, autograd saves and zero-fills more), and on
a CPU the time goes to memory traffic and first-touch page faults of fresh buffers, not to
arithmetic. `DSNFunction` computes the same numbers with a hand-written backward that works in
place in a few buffers and recomputes cheap quantities (alpha, 1 - alpha, the sigmoid) from the
saved log-decay instead of saving them:

    forward : a' = conv(X) (one addcmul per tap, the order the step uses), g = log alpha (in place),
              drive = (1 - alpha) X, H = scan(drive, g), S = clip(floor(H + 1/2), 0, N)
    backward: s = dS * surrogate'(H) (+ dL/dH when the membrane is an output), u = adjoint scan of s
              (u_t = s_t + alpha_{t+1} u_{t+1}), d g = u alpha (H_{t-1} - X_t), dX = (1 - alpha) u + conv^T(d a'),
              d a' = d g sigmoid(-a') / tau where the floor is not active, with
              sigmoid(-a') = -expm1(tau g); d w, d b = correlations of d a' with the conv's window.

Packed documents (cu_seqlens): every document starts from a fresh membrane and conv history. The
scan's decay is set to 0 at each start for the scan only (the saved log-decay keeps its value),
and the conv rows whose taps reach into the previous document are recomputed with those taps
masked (and fixed up likewise in the backward): a few rows, not a full mask over the sequence.

It runs on any device and dtype (float64 stays float64; other dtypes compute in float32), both
surrogates, and can return the membrane: the backend every other one falls back to under "auto".
`step` is the one-token form (the decode path on CPU).
"""
from __future__ import annotations

import threading

import torch
from torch.autograd.function import once_differentiable

from ..decay import LOG_DECAY_FLOOR, log_decay
from ..scan import packed_final_states
from ..spike import quantize_spikes, surrogate_slope
from ..torch_scan import _empty, adjoint_scan, chunked_scan_forward, empty_buffer
from .conv import causal_conv, decay_logit, doc_layout, start_rows

_workspace = threading.local()


def _scratch(role: str, like: torch.Tensor) -> torch.Tensor:
    """A buffer shaped like `like` for a temporary that never leaves one forward or backward call.

    Kept per thread and reused across calls (grown when a call needs more): a fresh buffer costs
    its first-touch page faults, which on the benchmark machine took longer than the arithmetic
    done in it (measured: a 50 MB add 5 ms into a reused buffer, 10-40 ms into a fresh one, more
    when the kernel has to compact memory for huge pages).
    """
    buffers = _workspace.__dict__.setdefault("buffers", {})
    key = (role, like.dtype, like.device)
    buf = buffers.get(key)
    if buf is None or buf.numel() < like.numel():
        with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
            buf = buffers[key] = empty_buffer((like.numel(),), like.dtype, like.device)
    return buf[: like.numel()].view(like.shape)


def _inside(h_neg, max_spike):
    """Bounds for hardtanh_backward (lo < h_neg < hi) so that it passes where 0 <= H <= N, H = -h_neg.

    hi is the smallest normal number rather than the smallest denormal, so flush-to-zero cannot turn
    H = 0 (a silent neuron, where the gradient must pass) into a blocked one."""
    one = torch.ones((), dtype=h_neg.dtype)
    lo = torch.nextafter(-one * max_spike, -one * (max_spike + 1)).item()
    return lo, torch.finfo(h_neg.dtype).tiny


class DSNFunction(torch.autograd.Function):
    """The scan runs on the negated drive, expm1(g) X = -(1 - alpha) X, so its output is -H: the sign
    flip costs nothing (spikes = floor(1/2 - (-H)) round exactly as floor(H + 1/2)) instead of a pass.
    Outputs: spikes (x's dtype), the final membrane, and the membrane H [B, T, C] when output_membrane (else None)."""

    @staticmethod
    def forward(ctx, x, weight, bias, history, h0, cu_seqlens, tau, max_spike, surrogate, surrogate_alpha,
                output_membrane):
        B, T, C = x.shape
        k = weight.shape[1]
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(dtype)
        w, b = weight.to(dtype), bias.to(dtype)
        hist = x.new_zeros(B, k - 1, C, dtype=dtype) if history is None else history.to(dtype)
        layout = None if cu_seqlens is None else doc_layout(cu_seqlens, x.device)
        g = causal_conv(xf, hist, w, b, None if layout is None else layout[1])
        log_decay(g, tau, out=g)
        drive = torch.expm1(g, out=_scratch("drive", g))
        decay = torch.add(drive, 1.0, out=_empty(g))  # alpha = 1 + expm1(g): no second exp
        drive.mul_(xf)  # -(1 - alpha) X
        h0n = None if h0 is None else -h0.to(dtype)
        if layout is None:
            h_neg, last = chunked_scan_forward(drive, g, h0n, decay=decay)
        else:
            cu, starts, docs = layout
            g_starts = g[0, starts].clone()
            if h0n is not None:
                drive[0, starts] += torch.exp(g_starts) * h0n[docs]
            decay[0, starts] = 0.0  # a fresh membrane at every document start
            g[0, starts] = float("-inf")  # (the scan's chunk decays read g)
            h_neg, _ = chunked_scan_forward(drive, g, None, decay=decay)
            g[0, starts] = g_starts
            last = packed_final_states(h_neg, h0n, cu, C)
        del drive
        half = torch.full((), 0.5, dtype=dtype, device=h_neg.device)
        spikes = torch.sub(half, h_neg, out=_empty(h_neg)).floor_().clamp_(0, max_spike).to(x.dtype)
        ctx.save_for_backward(xf, hist, g, h_neg, h0n, weight, bias)
        ctx.layout = layout
        ctx.args = (tau, max_spike, surrogate, surrogate_alpha, x.dtype)
        membrane = h_neg.neg() if output_membrane else None
        return spikes, last.neg(), membrane  # (T = 0: last may be h0n itself)

    @staticmethod
    @once_differentiable  # the backward works in place in scratch buffers: no graph through it
    def backward(ctx, grad_s, grad_last, grad_membrane):
        xf, hist, g, h_neg, h0n, weight, bias = ctx.saved_tensors
        tau, max_spike, surrogate, surrogate_alpha, x_dtype = ctx.args
        layout = ctx.layout
        B, T, C = h_neg.shape
        k = weight.shape[1]
        dtype = h_neg.dtype
        if T == 0:  # nothing ran: the final state is the initial one
            n = len(layout[0]) - 1 if layout is not None else B
            dh0 = grad_last if grad_last is not None else h_neg.new_zeros(n, C)
            return (torch.zeros_like(xf).to(x_dtype), torch.zeros_like(weight), torch.zeros_like(bias),
                    torch.zeros_like(hist) if ctx.needs_input_grad[3] else None,
                    dh0 if ctx.needs_input_grad[4] else None, None, None, None, None, None, None)
        # s = dL/dH = dS * surrogate'(H): a fresh buffer (grad_s belongs to autograd), reused below
        s = _scratch("s", h_neg)
        if grad_s is None:
            s.zero_()
        elif surrogate == "rect":  # straight through where 0 <= H <= N, i.e. -N <= h_neg <= 0
            lo, hi = _inside(h_neg, max_spike)
            torch.ops.aten.hardtanh_backward.grad_input(grad_s.to(dtype), h_neg, lo, hi, grad_input=s)
        else:
            torch.mul(grad_s.to(dtype), surrogate_slope(h_neg.neg(), max_spike, surrogate, surrogate_alpha), out=s)
        if grad_membrane is not None:
            s.add_(grad_membrane.to(dtype))
        seed = None if grad_last is None else grad_last.to(dtype)
        if layout is not None:
            cu, starts, docs = layout
            if seed is not None:  # a document's final state is H at its last row
                ends = torch.tensor([e - 1 for s_, e in zip(cu, cu[1:]) if e > s_], dtype=torch.long, device=s.device)
                s[0].index_add_(0, ends, seed[docs])
            # decay 0 at document starts for the adjoint scan only; written through .data and restored,
            # so the saved g keeps its version (a retained graph can run backward again)
            g_starts = g[0, starts].clone()
            g.data[0, starts] = float("-inf")
            u, e = adjoint_scan(s, None, g, out=(_scratch("u", g), _empty(g)))  # u_t = s_t + alpha_{t+1} u_{t+1}; e = alpha = exp(g)
            g.data[0, starts] = g_starts
            e[0, starts] = torch.exp(g_starts)
        else:
            u, e = adjoint_scan(s, seed, g, out=(_scratch("u", g), _empty(g)))
        dh0 = None
        if ctx.needs_input_grad[4]:  # d H_0 = alpha_0 u_0 (per document in packed mode)
            if layout is None:
                dh0 = e[:, 0] * u[:, 0]
            else:
                dh0 = seed.clone() if seed is not None else s.new_zeros(len(cu) - 1, C)  # empty documents
                dh0[docs] = e[0, starts] * u[0, starts]
        # d g = u alpha (H_{t-1} - X_t) = -u alpha (h_neg_{t-1} + X_t): s (free now) holds the bracket
        torch.add(h_neg[:, :-1], xf[:, 1:], out=s[:, 1:])
        s[:, 0].copy_(xf[:, 0])
        if h0n is not None and layout is None:
            s[:, 0].add_(h0n)
        if layout is not None:  # the start rows saw H_{-1} = the document's initial state (or 0)
            s[0, starts] = xf[0, starts] if h0n is None else xf[0, starts] + h0n[docs]
        s.mul_(e)
        dg = s.mul_(u)  # = -d g
        # dX from the drive: (1 - alpha) u = -expm1(g) u, into e's buffer (expm1: exact for alpha near 1,
        # where u - alpha u would lose ~1e-7 / (1 - alpha) of it)
        dx = torch.expm1(g, out=e).mul_(u).neg_()
        # d a' = d g * sigmoid(-a') / tau with sigmoid(-a') = -expm1(tau g), 0 where the floor holds (threshold)
        factor = torch.threshold(g, LOG_DECAY_FLOOR, 0.0, out=u)
        factor.mul_(tau).expm1_()
        dlogit = dg.mul_(factor).mul_(1.0 / tau)
        del factor, u
        # the conv: a'_t = b + sum_j w_j window_{t+j}, window = [history, X]; tap j reads X_{t - (k-1-j)}
        w = weight.to(dtype)
        d_weight = torch.empty(C, k, dtype=dtype, device=dx.device)
        prod = _scratch("prod", dx)
        ones = dx.new_ones(B * T)
        for j in range(k):
            sft = k - 1 - j
            n = B * max(0, T - sft)
            part = prod.view(-1)[: n * C].view(B, -1, C)  # contiguous, so the sum below needs no copy
            torch.mul(dlogit[:, sft:], xf[:, : max(0, T - sft)], out=part)
            # a column sum as a matrix-vector product: ~2x faster than sum((0, 1)) on wide rows
            d_weight[:, j] = ones[:n] @ part.view(n, C)
            for t in range(min(sft, T)):  # rows reading the history
                d_weight[:, j] += (dlogit[:, t] * hist[:, t + j]).sum(0)
        del prod
        d_bias = ones @ dlogit.reshape(-1, C)
        d_history = dlogit.new_zeros(B, k - 1, C) if ctx.needs_input_grad[3] else None
        for j in range(k):
            sft = k - 1 - j
            if sft < T:
                dx[:, : T - sft].addcmul_(dlogit[:, sft:], w[:, j])
            if d_history is not None:
                for t in range(min(sft, T)):
                    d_history[:, t + j] += dlogit[:, t] * w[:, j]
        if layout is not None and k > 1:  # remove the taps that crossed a document start
            rows, r = start_rows(starts, T, k)
            for j in range(k):
                sft = k - 1 - j
                crossed = (sft > r) & (rows - sft >= 0)
                if crossed.any():
                    rj = rows[crossed]
                    dx[0].index_add_(0, rj - sft, -dlogit[0, rj] * w[:, j])
                    d_weight[:, j] -= (dlogit[0, rj] * xf[0, rj - sft]).sum(0)
        return (dx.to(x_dtype), d_weight.to(weight.dtype), d_bias.to(bias.dtype),
                d_history, None if dh0 is None else dh0, None, None, None, None, None, None)


def unsupported(x: torch.Tensor, kernel_size: int, tau: float, surrogate: str, output_membrane: bool) -> str | None:
    """Why this backend cannot run a call (None: it can; it runs every call)."""
    return None


def run(x, weight, bias, history, h0, cu_seqlens, tau, max_spike, surrogate, surrogate_alpha, output_membrane):
    """(spikes, final membrane, membrane or None) through DSNFunction."""
    return DSNFunction.apply(x, weight, bias, history, h0, cu_seqlens, tau, max_spike, surrogate, surrogate_alpha,
                             output_membrane)


def step(x_t, weight, bias, conv, membrane, tau, max_spike, surrogate, surrogate_alpha):
    """One token: x_t [B, C], conv history [B, k-1, C], membrane [B, C] -> (spikes, new membrane, new conv history).

    The conv is decay_logit's (the parallel form's order of taps), then H = alpha H + (1 - alpha) x_t as
    one addcmul; float64 stays float64, other dtypes compute in float32. Differentiable (autograd)."""
    dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    xf = x_t.to(dtype)
    window = torch.cat([conv.to(dtype), xf.unsqueeze(1)], dim=1)  # [B, k, C]
    g = log_decay(decay_logit(window, weight, bias, 1)[:, 0], tau)
    h = torch.addcmul(-torch.expm1(g) * xf, torch.exp(g), membrane.to(dtype))
    spikes = quantize_spikes(h, max_spike, surrogate, surrogate_alpha).to(x_t.dtype)
    return spikes, h, window[:, 1:].to(x_t.dtype, memory_format=torch.contiguous_format, copy=True)  # (see next_conv_history)
