"""Fast CPU path for the diagonal linear recurrence h_t = exp(g_t) * h_{t-1} + x_t.

A Python loop over T steps pays per-op overhead T times and only touches B*D numbers per op.
The two-pass chunked form below (measured against that loop and torch.compile candidates in
benchmarks/bench_scan.py) cuts time into nC chunks of C steps and runs C + nC small loops instead:
  1. every chunk's end state from a zero start, all chunks advancing together (C steps);
  2. the true start state of each chunk, a short serial scan over chunk ends (nC steps) using
     the chunk's total decay exp(sum g), a sum in log space;
  3. the full recurrence again inside every chunk from its true start (C steps), writing h.
No cumulative product of decays is ever formed and nothing is divided by a decay, so a decay that
underflows to 0 (a hard reset) is exact, at any length.
"""
from __future__ import annotations

import math

import torch


def _chunk_size(T: int) -> int:
    # C + T/C loop iterations: balanced near sqrt(T); capped so a step's slice stays cache-friendly
    return max(1, min(128, int(math.sqrt(T / 2))))


def chunked_scan_forward(x: torch.Tensor, g: torch.Tensor, initial_state: torch.Tensor | None):
    """x, g: contiguous [B, T, D] float32/float64. Returns (h [B, T, D], h_last [B, D])."""
    B, T, D = x.shape
    h = torch.empty_like(x)
    carry = x.new_zeros(B, D) if initial_state is None else initial_state.to(x.dtype)
    if T == 0:
        return h, carry
    C = _chunk_size(T)
    nC = T // C
    L = nC * C
    if nC > 1:
        xv = x[:, :L].view(B, nC, C, D)
        gv = g[:, :L].view(B, nC, C, D)
        hv = h[:, :L].view(B, nC, C, D)
        decay = x.new_empty(B, nC, D)
        end, tmp = x.new_zeros(B, nC, D), x.new_empty(B, nC, D)
        for i in range(C):  # pass 1: chunk ends from zero state
            torch.exp(gv[:, :, i], out=decay)
            torch.addcmul(xv[:, :, i], decay, end, out=tmp)
            end, tmp = tmp, end
        chunk_decay = gv.sum(dim=2).exp_()
        starts = tmp  # reuse the buffer: start state of every chunk
        for c in range(nC):  # pass 2: true chunk starts
            starts[:, c] = carry
            carry = torch.addcmul(end[:, c], chunk_decay[:, c], carry)
        state = starts
        for i in range(C):  # pass 3: the recurrence inside every chunk, from its true start
            torch.exp(gv[:, :, i], out=decay)
            torch.addcmul(xv[:, :, i], decay, state, out=hv[:, :, i])
            state = hv[:, :, i]
    else:
        L = 0
    for t in range(L, T):  # remainder (or a short sequence): plain steps
        carry = torch.addcmul(x[:, t], torch.exp(g[:, t]), carry, out=h[:, t])
    return h, carry


def serial_scan_forward(x: torch.Tensor, g: torch.Tensor, initial_state: torch.Tensor | None):
    """The one-op-per-step loop: kept as a measured candidate (benchmarks/bench_scan.py)."""
    B, T, D = x.shape
    h = torch.empty_like(x)
    state = x.new_zeros(B, D) if initial_state is None else initial_state.to(x.dtype)
    decay = torch.exp(g)
    for t in range(T):
        state = torch.addcmul(x[:, t], decay[:, t], state, out=h[:, t])
    return h, state


def scan_backward(forward, grad_h, grad_last, g, h, initial_state, needs_initial_grad: bool):
    """Gradients of h_t = exp(g_t) h_{t-1} + x_t, computed with the same forward kernel.

    dx_t = dh_t + exp(g_{t+1}) dx_{t+1} (a reverse scan seeded by the final-state gradient),
    dg_t = dx_t * exp(g_t) * h_{t-1}, dh0 = exp(g_0) * dx_0.
    """
    B, T, D = g.shape
    dh = torch.zeros_like(g) if grad_h is None else grad_h.to(g.dtype)
    g_next = torch.cat([g[:, 1:], g.new_zeros(B, 1, D)], dim=1)
    dx_rev, _ = forward(dh.flip(1).contiguous(), g_next.flip(1).contiguous(),
                        None if grad_last is None else grad_last.to(g.dtype))
    dx = dx_rev.flip(1)
    h0 = g.new_zeros(B, 1, D) if initial_state is None else initial_state.to(g.dtype).unsqueeze(1)
    h_prev = torch.cat([h0, h[:, :-1]], dim=1)
    decay = torch.exp(g)
    dg = dx * decay * h_prev
    dh0 = dx[:, 0] * decay[:, 0] if needs_initial_grad and T > 0 else None
    if needs_initial_grad and T == 0:
        dh0 = g.new_zeros(B, D) if grad_last is None else grad_last.to(g.dtype)
    return dx.contiguous(), dg, dh0


class ChunkedScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, initial_state):
        h, h_last = chunked_scan_forward(x, g, initial_state)
        ctx.save_for_backward(g, h, initial_state)
        return h, h_last

    @staticmethod
    def backward(ctx, grad_h, grad_last):
        g, h, initial_state = ctx.saved_tensors
        needs_h0 = initial_state is not None and ctx.needs_input_grad[2]
        dx, dg, dh0 = scan_backward(chunked_scan_forward, grad_h, grad_last, g, h, initial_state, needs_h0)
        return dx, dg, dh0


def torch_scan(x: torch.Tensor, g: torch.Tensor, initial_state: torch.Tensor | None):
    """x, g contiguous [B, T, D] in the compute dtype; differentiable in x, g and initial_state."""
    return ChunkedScanFunction.apply(x, g, initial_state)
