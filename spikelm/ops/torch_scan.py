"""Fast CPU path for the diagonal linear recurrence h_t = exp(g_t) * h_{t-1} + x_t.

A Python loop over T steps pays per-op overhead T times and only touches B*D numbers per op. The
chunked form cuts a span of time into nC chunks of C steps and runs C + nC + C small loops instead:
  1. every chunk's end state from a zero start, all chunks advancing together (C steps);
  2. the true start state of each chunk, a short serial scan over chunk ends (nC steps) using
     the chunk's total decay exp(sum g), a sum in log space;
  3. the full recurrence again inside every chunk from its true start (C steps), writing h.
No cumulative product of decays is ever formed and nothing is divided by a decay, so a decay that
underflows to 0 (a hard reset, g = -inf) is exact, at any length.

Cache blocking: the sequence is walked in blocks of S steps (S * B * D about 2^20 numbers, 4 MiB
per tensor, so a block's x and h stay in the 32 MiB L3 cache between passes 1 and 3); the three
passes run inside a block and the block's last state carries into the next. The decays exp(g) are
computed once (as exp2(g * log2 e)) straight into the output h, which both passes read as their
decay and pass 3 overwrites with h: no second exp and no scratch tensor.
Large outputs are allocated with transparent huge pages (`_empty`), because first-touch page faults
of a fresh 4 KiB-paged buffer ran at ~1.5 GB/s on the benchmark machine: slower than the scan.
The backward runs the same blocked kernel in reverse time order on strided views, without flips.
Threads: every multi-threaded torch op ends in a barrier, and on a shared machine a barrier waits
for a descheduled thread (milliseconds). So the per-step ops are kept under torch's parallel grain
(chunks lengthened until a step's slice has <= 32768 numbers) and run on one thread each, and
the exp of all decays is one op over the whole tensor rather than one per block: a call has a
handful of multi-threaded ops (a per-block exp was 2x slower at load 10).

Measured candidates (benchmarks/results/scan_candidates.md has the numbers and the machine).
"""
from __future__ import annotations

import math
import mmap
import sys

import torch

_BLOCK_ELEMENTS = 1 << 20  # numbers per tensor in one cache block (S * B * D): 4 MiB float32
_GRAIN = 32768  # at::internal::GRAIN_SIZE: smaller elementwise ops run on one thread
_HUGE_MIN_BYTES = 8 << 20  # outputs at least this large get transparent huge pages
_HUGE_OK = sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")


def _empty(like: torch.Tensor) -> torch.Tensor:
    """torch.empty_like(like) (contiguous), backed by transparent huge pages when large, on Linux/CPU."""
    return empty_buffer(like.shape, like.dtype, like.device)


def empty_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty(shape), backed by transparent huge pages when large, on Linux/CPU."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if not (_HUGE_OK and torch.device(device).type == "cpu" and nbytes >= _HUGE_MIN_BYTES):
        return torch.empty(shape, dtype=dtype, device=device)
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.frombuffer(buf, dtype=dtype, count=numel).view(shape)  # freed with the tensor


_LOG2E = 1.4426950408889634


def _exp(g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = exp(g). float32: as exp2(g * log2(e)): 1.3-1.8x faster than torch.exp on the benchmark CPU, and
    torch.exp falls 13-40x slower still where results underflow to subnormals (g < -87, e.g. chunk decays).
    The rounded product costs a relative error <= |g| * 6e-8 in the decay (decays below e^-20 are resets)."""
    if g.dtype == torch.float32:
        return torch.exp2(torch.mul(g, _LOG2E, out=out), out=out)
    return torch.exp(g, out=out)


def _sizes(L: int, BD: int) -> tuple[int, int]:
    """(block length S, chunk length C) for L steps of B*D numbers each."""
    S = min(L, max(64, _BLOCK_ELEMENTS // max(BD, 1)))
    C = max(1, min(64, int(math.sqrt(S / 2))))  # C + S/C ops per pass: balanced near sqrt(S)
    if S // C * BD > _GRAIN:  # longer chunks, so that a step's [B, nC, D] slice stays one thread's work
        C = min(S, -(-S * BD // _GRAIN))
    return S, C


def _block(x, a, g, out, carry, C: int, rev: bool, buf):
    """out_t = a_t * prev + x_t over one block [B, L, D], forward in time or reversed (rev).

    carry [B, D] is the state before the block's first step (in walking order); a = exp(g) may be
    `out` itself (each step reads a_t before writing out_t). Returns the state after the last step
    (a view into out). buf: scratch of at least 3 * B * L / C * D numbers.
    """
    B, L, D = x.shape
    nC = L // C
    if nC < 2 or C < 2:
        steps = range(L - 1, -1, -1) if rev else range(L)
        for t in steps:
            carry = torch.addcmul(x[:, t], a[:, t], carry, out=out[:, t])
        return carry
    rem = L - nC * C
    lo = rem if rev else 0  # the remainder steps sit where the walk ends
    span = slice(lo, lo + nC * C)
    xs, as_, os_ = (t[:, span].view(B, nC, C, D).unbind(2) for t in (x, a, out))  # per-step views
    n = B * nC * D
    end, tmp, starts = (buf[i * n : (i + 1) * n].view(B, nC, D) for i in range(3))
    order = list(range(C - 1, -1, -1)) if rev else list(range(C))
    # pass 1: every chunk's end state from a zero start
    i0, i1 = order[0], order[1]
    torch.addcmul(xs[i1], as_[i1], xs[i0], out=end)
    for i in order[2:]:
        torch.addcmul(xs[i], as_[i], end, out=tmp)
        end, tmp = tmp, end
    # chunk decays exp(sum g), in log space (tmp is free now)
    gs = g[:, span].view(B, nC, C, D).unbind(2)  # a loop of one-thread adds: no multi-threaded barrier
    torch.add(gs[0], gs[1], out=tmp)
    for i in range(2, C):
        tmp.add_(gs[i])
    _exp(tmp, out=tmp)
    # pass 2: true chunk starts
    ends, decays, st = end.unbind(1), tmp.unbind(1), starts.unbind(1)
    chunks = list(range(nC - 1, -1, -1)) if rev else list(range(nC))
    st[chunks[0]].copy_(carry)
    for c, c_next in zip(chunks, chunks[1:]):
        torch.addcmul(ends[c], decays[c], st[c], out=st[c_next])
    # pass 3: the recurrence inside every chunk from its true start
    state = starts
    for i in order:
        state = torch.addcmul(xs[i], as_[i], state, out=os_[i])
    carry = os_[order[-1]][:, chunks[-1]]
    steps = range(rem - 1, -1, -1) if rev else range(nC * C, L)
    for t in steps:
        carry = torch.addcmul(x[:, t], a[:, t], carry, out=out[:, t])
    return carry


def chunked_scan_forward(x: torch.Tensor, g: torch.Tensor, initial_state: torch.Tensor | None,
                         decay: torch.Tensor | None = None):
    """x, g: contiguous [B, T, D] float32/float64. Returns (h [B, T, D], h_last [B, D]).

    decay: exp(g) when the caller has it already (contiguous, overwritten: h is written into it).
    """
    B, T, D = x.shape
    h = _empty(x) if decay is None else decay
    carry = x.new_zeros(B, D) if initial_state is None else initial_state.to(x.dtype)
    if T == 0:
        return h, carry
    S, C = _sizes(T, B * D)
    buf = x.new_empty(3 * B * (S // C + 1) * D)
    if decay is None:
        _exp(g, out=h)  # all decays in one op (few multi-threaded barriers); pass 3 overwrites them with h
    for s0 in range(0, T, S):
        blk = slice(s0, min(T, s0 + S))
        hb = h[:, blk]
        carry = _block(x[:, blk], hb, g[:, blk], hb, carry, C, False, buf)
    return h, carry.clone()


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
    """Gradients of h_t = exp(g_t) h_{t-1} + x_t.

    dx_t = dh_t + exp(g_{t+1}) dx_{t+1} (a reverse scan seeded by the final-state gradient),
    dg_t = dx_t * exp(g_t) * h_{t-1}, dh0 = exp(g_0) * dx_0.
    `forward` is chunked_scan_forward (the blocked reverse kernel, no flips) or any other forward
    kernel (then run on flipped copies: the reference form).
    """
    if forward is chunked_scan_forward:
        return _blocked_backward(grad_h, grad_last, g, h, initial_state, needs_initial_grad)
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


def adjoint_scan(grad_h: torch.Tensor | None, grad_last: torch.Tensor | None, g: torch.Tensor,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The reverse recurrence of h_t = exp(g_t) h_{t-1} + x_t: dx_t = dh_t + exp(g_{t+1}) dx_{t+1}.

    grad_h [B, T, D] (None: zeros), grad_last [B, D] the final state's gradient (None: zeros), both
    in g's dtype; T >= 1. The blocked kernel walks blocks from the end, in reverse time order on
    strided views, without flips. Returns (dx, e) with e = exp(g), a fresh buffer the caller may
    reuse (callers turn it into dg = dx * e * h_{t-1} in place). out: contiguous buffers for (dx, e).
    """
    B, T, D = g.shape
    dx, e = (_empty(g), _empty(g)) if out is None else out
    carry = g.new_zeros(B, D) if grad_last is None else grad_last
    if grad_h is None:
        grad_h = g.new_zeros(B, T, D)  # only the final state was used
    dh = grad_h.contiguous()
    S, C = _sizes(T, B * D)
    buf = g.new_empty(3 * B * (S // C + 1) * D)
    _exp(g, out=e)
    carry = torch.add(dh[:, T - 1], carry, out=dx[:, T - 1])  # exp(g_T) := 1: the seed enters as is
    for s1 in range(T - 1, 0, -S):  # dx_t = dh_t + e_{t+1} dx_{t+1}, t = T-2 .. 0
        s0 = max(0, s1 - S)
        carry = _block(dh[:, s0:s1], e[:, s0 + 1 : s1 + 1], g[:, s0 + 1 : s1 + 1], dx[:, s0:s1], carry, C, True, buf)
    return dx, e


def _blocked_backward(grad_h, grad_last, g, h, initial_state, needs_initial_grad: bool):
    """scan_backward with the blocked reverse kernel: dg = dx * exp(g) * h_{t-1}, in place in exp(g)'s buffer."""
    B, T, D = g.shape
    if T == 0:
        carry = g.new_zeros(B, D) if grad_last is None else grad_last.to(g.dtype)
        return torch.empty_like(g), torch.empty_like(g), (carry if needs_initial_grad else None)
    dx, dg = adjoint_scan(None if grad_h is None else grad_h.to(g.dtype),
                          None if grad_last is None else grad_last.to(g.dtype), g)
    h0 = g.new_zeros(B, D) if initial_state is None else initial_state.to(g.dtype)
    dh0 = dx[:, 0] * dg[:, 0] if needs_initial_grad else None
    dg.mul_(dx)
    dg[:, 1:].mul_(h[:, :-1])
    dg[:, 0].mul_(h0)
    return dx, dg, dh0


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
