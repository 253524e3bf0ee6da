"""Triton backend of ops.scan: h_t = exp(g_t) * h_{t-1} + x_t, forward and backward, chunked over time.

Scheme (two levels, log space only: no cumulative product of decays is formed, nothing is divided
by a decay, so a decay that underflows to 0 is an exact hard reset at any length):
  1. `_chunk_summary_kernel`: every chunk of `chunk_len` steps runs the recurrence from a zero state
     and writes its end state E_c and its total log-decay A_c = sum of g over the chunk (a sum, not
     a product).
  2. `_chunk_carry_kernel`: per sequence and channel block, a short serial walk over the chunks:
     start_c = carry; carry = exp(A_c) * carry + E_c.
  3. `_chunk_output_kernel`: every chunk runs the recurrence again from its true start and writes
     the outputs (and the final state, from the sequence's last chunk).
Passes 1-2 are skipped when the sequences x channel blocks alone fill the GPU (one chunk per
sequence). Inside a chunk, steps go by tiles of TILE_ROWS x BLOCK_D: a tile is loaded at once
(many loads in flight, which a one-step-at-a-time loop lacks), all elementwise work is done on the
whole tile, and only the recurrence itself walks the tile's rows, in registers. Every step is
exactly the naive recurrence in float32 (float64 for float64 inputs); no associative_scan, which
the interpreter would run element by element.

Every [B, T, D] input is handled as packed rows [B*T, D] with sequence offsets cu (B sequences of
T steps, or the caller's cu_seqlens), so batches and packed sequences share one code path. Offsets
are 64-bit. Channels are blocked by BLOCK_D with a masked tail, so any D works.

The backward is the same machinery run in reverse time (the adjoint recurrence
dx_t = dh_t + exp(g_{t+1}) dx_{t+1}, seeded by the final-state gradient), with dg_t = dx_t exp(g_t)
h_{t-1} fused into the output pass. The kernels also carry the fused DSN neuron mode (decay from
the conv logit, drive (1 - alpha) X, spikes out), used by ops/dsn/triton_backend.py.

Bandwidth note: when chunks are needed (few sequences x channel blocks), passes 1 and 3 both read
the inputs, so the forward moves (2 x input + output) bytes instead of (input + output): for the
fused DSN forward in bf16 that caps it near 60% of copy bandwidth. Reaching the issue's 70% needs a
single-pass scheme (e.g. decoupled look-back between chunks, CUB-style, with tiles large enough to
amortise it); not attempted without a GPU to validate spin-waits and memory ordering on.

References next to this kernel: ops/torch_scan.py (fast torch path) and ops/naive.py (oracle);
tests/test_triton.py compares all three.
"""
from __future__ import annotations

import math
import os

import torch

from .decay import LOG_DECAY_FLOOR

try:  # the package runs without Triton: is_available() is then False and nothing below is used
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001  (ImportError, or a broken install on a machine without a GPU)
    triton = None
    tl = None

# modes of the shared kernels (constexpr): what a step reads and what the output pass writes
MODE_SCAN = 0  # u_t = x_t, log-decay g_t
MODE_DSN = 1  # u_t = (1 - alpha_t) X_t, log-decay max(logsigmoid(a'_t) / tau, floor) from the conv logit a'
MAX_GRID_YZ = 65535  # CUDA grid limit on axes 1 and 2 (channel blocks, sequences)


def is_available() -> bool:
    """True when Triton imports and can run here: a CUDA device, or TRITON_INTERPRET=1 (CPU interpreter)."""
    if triton is None:
        return False
    try:
        return bool(torch.cuda.is_available()) or os.environ.get("TRITON_INTERPRET") == "1"
    except Exception:  # noqa: BLE001  (a broken CUDA setup must not make the check raise)
        return False


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    FLOOR = tl.constexpr(LOG_DECAY_FLOOR)  # a kernel may read a global only as a constexpr

    @triton.jit
    def _log1p(z):
        # log(1 + z) accurate for small z (Goldberg's trick): the rounding error of 1 + z cancels
        u = 1.0 + z
        d = u - 1.0
        return tl.where(d == 0.0, z, tl.log(u) * (z / tl.where(d == 0.0, 1.0, d)))

    @triton.jit
    def _expm1(x):
        # exp(x) - 1 accurate near 0 (Kahan's trick); 1 - alpha is tiny for long memories
        u = tl.exp(x)
        um1 = u - 1.0
        lu = tl.log(u)
        r = tl.where(um1 == 0.0, x, um1 * (x / tl.where(lu == 0.0, 1.0, lu)))
        return tl.where(um1 == -1.0, -1.0, r)

    @triton.jit
    def _log_decay(v, tau, MODE: tl.constexpr):
        """Log-decay from what G holds: g itself (scan) or the conv logit a' (DSN)."""
        if MODE == 1:
            # logsigmoid(a) = min(a, 0) - log1p(exp(-|a|)), finite for every a
            ls = tl.minimum(v, 0.0) - _log1p(tl.exp(-tl.abs(v)))
            return tl.maximum(ls / tau, FLOOR)
        else:
            return v

    @triton.jit
    def _tile_inputs(t, valid, eos, U, G, H, offs, dmask, D, tau, max_spike, sa,
                     MODE: tl.constexpr, SURROGATE: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr):
        """For a tile of steps t [ROWS] (in processing order): inputs u and log-decays dec [ROWS, BLOCK_D].

        forward:  state_t = exp(dec_t) state_{t-1} + u_t,  dec_t = g_t, u_t = x_t (or the DSN drive)
        reverse:  state_t = exp(dec_t) state_{t+1} + u_t,  dec_t = g_{t+1} (0 past the sequence end,
                  so the final-state gradient enters undecayed), u_t = dh_t (DSN: dS_t * S'(H_t), the
                  surrogate's slope: SURROGATE 0 rect, 1 atan with sharpness sa)
        Rows past the chunk end get u = 0 and dec = 0: the state passes through them unchanged.
        All the elementwise work happens here, for the whole tile, off the serial path.
        """
        p = t[:, None] * D + offs[None, :]  # t is int64: 64-bit offsets
        m = valid[:, None] & dmask[None, :]
        u = tl.load(U + p, mask=m, other=0.0).to(ACC)
        if REVERSE:
            has_next = valid & ((t + 1) < eos)
            v = tl.load(G + p + D, mask=has_next[:, None] & dmask[None, :], other=0.0).to(ACC)
            dec = tl.where(has_next[:, None], _log_decay(v, tau, MODE), 0.0)
            if MODE == 1:
                h = tl.load(H + p, mask=m, other=0.0)
                if SURROGATE == 0:  # rect: straight through on the clip range
                    u = tl.where((h >= 0.0) & (h <= max_spike), u, 0.0)
                else:  # atan: one bump (sa/2) / (1 + (pi/2 sa (h - c))^2) per threshold c = 1/2, 3/2, ..., N - 1/2
                    slope = tl.zeros_like(h)
                    for c in range(0, max_spike):
                        z = (1.5707963267948966 * sa) * (h - (c + 0.5))
                        slope += (0.5 * sa) / (1.0 + z * z)
                    u = u * slope
        else:
            v = tl.load(G + p, mask=m, other=0.0).to(ACC)
            dec = tl.where(valid[:, None], _log_decay(v, tau, MODE), 0.0)
            if MODE == 1:
                u = -_expm1(dec) * u  # drive (1 - alpha) X
        return u, dec

    @triton.jit
    def _tile_recurrence(s, u, dec, ROWS: tl.constexpr):
        """state = exp(dec_i) state + u_i for the tile's rows in order; returns (states [ROWS, BLOCK_D], last state).

        The tile was loaded at once (ROWS loads in flight per thread, which is what keeps the memory
        busy); the serial part only picks rows out of registers: with one warp per program each
        thread holds whole columns, so the row selections below are in-thread selects and adds.
        """
        rows = tl.arange(0, ROWS)[:, None]
        decay = tl.exp(dec)
        states = tl.zeros_like(u)
        for i in tl.static_range(ROWS):
            sel = rows == i
            s = tl.sum(tl.where(sel, decay, 0.0), axis=0) * s + tl.sum(tl.where(sel, u, 0.0), axis=0)
            states = tl.where(sel, s[None, :], states)
        return states, s

    @triton.jit
    def _tile_steps(cs, ce, tb, ROWS: tl.constexpr, REVERSE: tl.constexpr):
        """Steps of the tile starting tb steps into chunk [cs, ce), in processing order."""
        i = tb + tl.arange(0, ROWS).to(tl.int64)
        valid = i < (ce - cs)
        if REVERSE:
            t = ce - 1 - i
        else:
            t = cs + i
        return tl.where(valid, t, cs), valid  # invalid rows point at a real row; their loads are masked

    @triton.jit
    def _chunk_bounds(CU, n, c, chunk_len):
        bos = tl.load(CU + n).to(tl.int64)
        eos = tl.load(CU + n + 1).to(tl.int64)
        cs = bos + c.to(tl.int64) * chunk_len
        ce = tl.minimum(cs + chunk_len, eos)
        return bos, eos, cs, ce

    @triton.jit
    def _chunk_summary_kernel(U, G, H, CU, E, A, D, max_chunks, chunk_len, tau, max_spike, sa,
                              MODE: tl.constexpr, SURROGATE: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
        """Pass 1: chunk end state from a zero start (E) and the chunk's summed log-decay (A)."""
        c, i_d, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        bos, eos, cs, ce = _chunk_bounds(CU, n, c, chunk_len)
        if cs >= eos:  # this sequence has fewer chunks than the longest one
            return
        offs = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs < D
        s = tl.zeros([BLOCK_D], dtype=ACC)
        a = tl.zeros([BLOCK_D], dtype=ACC)
        for tb in range(0, ce - cs, ROWS):
            t, valid = _tile_steps(cs, ce, tb, ROWS, REVERSE)
            u, dec = _tile_inputs(t, valid, eos, U, G, H, offs, dmask, D, tau, max_spike, sa, MODE, SURROGATE,
                                  REVERSE, ACC)
            _, s = _tile_recurrence(s, u, dec, ROWS)
            a += tl.sum(dec, axis=0)
        q = (n.to(tl.int64) * max_chunks + c) * D + offs
        tl.store(E + q, s, mask=dmask)
        tl.store(A + q, a, mask=dmask)

    @triton.jit
    def _chunk_carry_kernel(INIT, CU, E, A, START, D, max_chunks, chunk_len,
                            HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr,
                            BLOCK_D: tl.constexpr):
        """Pass 2: the true start state of every chunk, a serial walk over one sequence's chunks."""
        i_d, n = tl.program_id(0), tl.program_id(1)
        bos = tl.load(CU + n).to(tl.int64)
        eos = tl.load(CU + n + 1).to(tl.int64)
        n_chunks = (eos - bos + chunk_len - 1) // chunk_len
        offs = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs < D
        if HAS_INIT:
            carry = tl.load(INIT + n.to(tl.int64) * D + offs, mask=dmask, other=0.0).to(ACC)
        else:
            carry = tl.zeros([BLOCK_D], dtype=ACC)
        for j in range(0, n_chunks):
            if REVERSE:
                c = n_chunks - 1 - j
            else:
                c = j
            q = (n.to(tl.int64) * max_chunks + c) * D + offs
            tl.store(START + q, carry, mask=dmask)
            carry = tl.exp(tl.load(A + q, mask=dmask, other=0.0)) * carry + tl.load(E + q, mask=dmask, other=0.0)

    @triton.jit
    def _chunk_output_kernel(U, G, H, H0, X, INIT, START, CU, OUT, OUT2, FINAL,
                             D, max_chunks, chunk_len, tau, max_spike, sa,
                             MODE: tl.constexpr, SURROGATE: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr,
                             FROM_START: tl.constexpr, HAS_INIT: tl.constexpr, HAS_H0: tl.constexpr,
                             WRITE_OUT: tl.constexpr, WRITE_OUT2: tl.constexpr, BLOCK_D: tl.constexpr,
                             ROWS: tl.constexpr):
        """Pass 3: the recurrence from the chunk's true start, writing the outputs of each step.

        forward  scan: OUT = h.               DSN: OUT = spikes if WRITE_OUT, OUT2 = H (float32) if WRITE_OUT2.
        reverse  scan: OUT = dx, OUT2 = dg.   DSN: OUT = d a', OUT2 = dX.
        The sequence's terminal chunk (last forward, first in reverse) writes FINAL: the last state
        forward, d(initial state) = exp(dec before the first step) * state in reverse.
        """
        c, i_d, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        bos, eos, cs, ce = _chunk_bounds(CU, n, c, chunk_len)
        if cs >= eos:
            return
        offs = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs < D
        n64 = n.to(tl.int64)
        if FROM_START:
            s = tl.load(START + (n64 * max_chunks + c) * D + offs, mask=dmask, other=0.0).to(ACC)
        elif HAS_INIT:
            s = tl.load(INIT + n64 * D + offs, mask=dmask, other=0.0).to(ACC)
        else:
            s = tl.zeros([BLOCK_D], dtype=ACC)
        for tb in range(0, ce - cs, ROWS):
            t, valid = _tile_steps(cs, ce, tb, ROWS, REVERSE)
            u, dec = _tile_inputs(t, valid, eos, U, G, H, offs, dmask, D, tau, max_spike, sa, MODE, SURROGATE,
                                  REVERSE, ACC)
            states, s = _tile_recurrence(s, u, dec, ROWS)
            p = t[:, None] * D + offs[None, :]
            m = valid[:, None] & dmask[None, :]
            if REVERSE:
                # h_{t-1}: the saved/recomputed state, or the initial state at the sequence start
                has_prev = (t > bos)[:, None]
                h_prev = tl.load(H + p - D, mask=m & has_prev, other=0.0).to(ACC)
                if HAS_H0:
                    h0 = tl.load(H0 + n64 * D + offs, mask=dmask, other=0.0).to(ACC)
                    h_prev = tl.where(has_prev, h_prev, h0[None, :])
                v = tl.load(G + p, mask=m, other=0.0).to(ACC)
                g_t = _log_decay(v, tau, MODE)
                decay_t = tl.exp(g_t)
                if MODE == 1:
                    # H_t = alpha H_{t-1} + (1 - alpha) X_t with alpha = exp(g), g = max(logsigmoid(a')/tau, floor):
                    # dg = s alpha (H_{t-1} - X_t); da' = dg / tau * sigmoid(-a') where the floor is not active
                    x_t = tl.load(X + p, mask=m, other=0.0).to(ACC)
                    soft = _log1p(tl.exp(-tl.abs(v)))
                    sig_neg = tl.exp(tl.minimum(-v, 0.0) - soft)  # sigmoid(-a') = exp(logsigmoid(-a'))
                    dg = states * decay_t * (h_prev - x_t)
                    da = tl.where((tl.minimum(v, 0.0) - soft) / tau >= FLOOR, dg / tau * sig_neg, 0.0)
                    tl.store(OUT + p, da, mask=m)
                    tl.store(OUT2 + p, -_expm1(g_t) * states, mask=m)
                else:
                    tl.store(OUT + p, states, mask=m)
                    tl.store(OUT2 + p, states * decay_t * h_prev, mask=m)
            else:
                if MODE == 1:
                    if WRITE_OUT:
                        spikes = tl.minimum(tl.maximum(tl.floor(states + 0.5), 0.0), max_spike)
                        tl.store(OUT + p, spikes, mask=m)
                    if WRITE_OUT2:
                        tl.store(OUT2 + p, states, mask=m)
                else:
                    tl.store(OUT + p, states, mask=m)
        if REVERSE:
            if c == 0:
                v = tl.load(G + bos * D + offs, mask=dmask, other=0.0).to(ACC)
                tl.store(FINAL + n64 * D + offs, tl.exp(_log_decay(v, tau, MODE)) * s, mask=dmask)
        else:
            if ce == eos:
                tl.store(FINAL + n64 * D + offs, s, mask=dmask)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _block_d(D: int) -> int:
    return min(128, max(16, triton.next_power_of_2(D)))


# Steps loaded per tile: more rows keep more loads in flight per thread, at ROWS x 4 values per tile in
# registers. 8 is a guess to be checked on a GPU (benchmarks/gpu_check.py sweeps it).
TILE_ROWS = 8


def pick_chunk_len(n_seqs: int, max_len: int, total_len: int, n_dblocks: int, device: torch.device) -> int:
    """Steps per chunk: one chunk per sequence when sequences x channel blocks already fill the GPU,
    else short enough that chunks x channel blocks give ~32 one-warp programs per SM (the steps inside
    a chunk are serial, so the GPU needs many of them in flight to hide memory latency)."""
    target = 32 * _sm_count(device)
    if n_seqs * n_dblocks >= target or max_len <= 64:
        return max(1, max_len)
    return 64 * math.ceil(total_len * n_dblocks / target / 64)  # a multiple of the tile rows


def packed_layout(B: int, T: int, cu_seqlens, device):
    """Sequence offsets as int64 on the device, the number of sequences and the longest length."""
    if cu_seqlens is None:
        cu = torch.arange(B + 1, device=device, dtype=torch.int64) * T
        return cu, B, T
    cu = cu_seqlens.to(device=device, dtype=torch.int64).contiguous()
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    return cu, len(lens), (max(lens) if lens else 0)


def run_scan_kernels(*, mode: int, reverse: bool, U, G, cu, n_seqs: int, max_len: int, D: int,
                     out, final, out2=None, H=None, H0=None, X=None, init=None,
                     tau: float = 1.0, max_spike: int = 0, surrogate: int = 0, surrogate_alpha: float = 0.0,
                     acc=None, chunk_len: int | None = None, rows: int | None = None):
    """Launch passes 1-3 over rows [sum of lengths, D] (all tensors contiguous, flat per row).

    DSN mode: surrogate 0 (rect) or 1 (atan, sharpness surrogate_alpha) sets the backward's dS/dH.

    final must be pre-filled by the caller for empty sequences (the initial state, or zeros).
    """
    if n_seqs == 0 or max_len == 0 or D == 0:
        return
    if n_seqs > MAX_GRID_YZ:
        raise ValueError(f"triton scan: at most {MAX_GRID_YZ} sequences (batch rows or cu_seqlens entries), got {n_seqs}")
    BLOCK_D = _block_d(D)
    n_d = triton.cdiv(D, BLOCK_D)
    if n_d > MAX_GRID_YZ:
        raise ValueError(f"triton scan: D={D} is too large (at most {MAX_GRID_YZ * BLOCK_D} channels)")
    total = U.numel() // D
    L = chunk_len or pick_chunk_len(n_seqs, max_len, total, n_d, U.device)
    max_chunks = triton.cdiv(max_len, L)
    acc = acc or (tl.float64 if U.dtype == torch.float64 else tl.float32)
    buf_dtype = torch.float64 if acc == tl.float64 else torch.float32
    # one warp per program: each thread then holds whole tile columns (BLOCK_D <= 128 = 32 threads x 4),
    # so picking a tile's rows in the recurrence never crosses threads
    num_warps = 1
    dummy = final  # never touched where its flag is off
    if not rows:  # the interpreter pays per row: no full tile for a short chunk (a GPU keeps one variant)
        rows = min(TILE_ROWS, max(2, triton.next_power_of_2(L))) if interpreted() else TILE_ROWS
    common = dict(MODE=mode, SURROGATE=surrogate, REVERSE=reverse, ACC=acc, BLOCK_D=BLOCK_D, ROWS=rows)
    start = None
    if max_chunks > 1:
        E = torch.empty(n_seqs, max_chunks, D, device=U.device, dtype=buf_dtype)
        A = torch.empty_like(E)
        start = torch.empty_like(E)
        _chunk_summary_kernel[(max_chunks, n_d, n_seqs)](
            U, G, H if H is not None else dummy, cu, E, A, D, max_chunks, L, float(tau), int(max_spike),
            float(surrogate_alpha), num_warps=num_warps, **common)
        _chunk_carry_kernel[(n_d, n_seqs)](
            init if init is not None else dummy, cu, E, A, start, D, max_chunks, L,
            HAS_INIT=init is not None, REVERSE=reverse, ACC=acc, BLOCK_D=BLOCK_D, num_warps=num_warps)
    _chunk_output_kernel[(max_chunks, n_d, n_seqs)](
        U, G, H if H is not None else dummy, H0 if H0 is not None else dummy, X if X is not None else dummy,
        init if init is not None else dummy, start if start is not None else dummy, cu,
        out if out is not None else dummy,
        out2 if out2 is not None else dummy, final, D, max_chunks, L, float(tau), int(max_spike),
        float(surrogate_alpha), FROM_START=start is not None, HAS_INIT=init is not None, HAS_H0=H0 is not None,
        WRITE_OUT=out is not None, WRITE_OUT2=out2 is not None, num_warps=num_warps, **common)


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, h0, cu_seqlens, chunk_len):
        B, T, D = x.shape
        cu, N, max_len = packed_layout(B, T, cu_seqlens, x.device)
        h = torch.empty_like(x)
        final = h0.to(x.dtype).clone() if h0 is not None else x.new_zeros(N, D)
        run_scan_kernels(mode=MODE_SCAN, reverse=False, U=x, G=g, cu=cu, n_seqs=N, max_len=max_len, D=D,
                         out=h, final=final, init=h0.contiguous() if h0 is not None else None, chunk_len=chunk_len)
        ctx.save_for_backward(g, h, h0, cu)
        ctx.layout = (N, max_len, chunk_len)
        return h, final

    @staticmethod
    def backward(ctx, grad_h, grad_last):
        g, h, h0, cu = ctx.saved_tensors
        N, max_len, chunk_len = ctx.layout
        D = g.shape[-1]
        dh = torch.zeros_like(g) if grad_h is None else grad_h.to(g.dtype).contiguous()
        seed = None if grad_last is None else grad_last.to(g.dtype).contiguous()
        dx, dg = torch.empty_like(g), torch.empty_like(g)
        dh0 = seed.clone() if seed is not None else g.new_zeros(N, D)  # stays for empty sequences
        run_scan_kernels(mode=MODE_SCAN, reverse=True, U=dh, G=g, H=h, cu=cu, n_seqs=N, max_len=max_len, D=D,
                         out=dx, out2=dg, final=dh0, init=seed,
                         H0=h0.to(g.dtype).contiguous() if h0 is not None else None, chunk_len=chunk_len)
        return dx, dg, (dh0.to(h0.dtype) if h0 is not None and ctx.needs_input_grad[2] else None), None, None


def triton_scan(x: torch.Tensor, g: torch.Tensor, h0: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                chunk_len: int | None = None):
    """h_t = exp(g_t) h_{t-1} + x_t with the Triton kernels; differentiable in x, g and h0.

    x, g: contiguous [B, T, D] float32 or float64 (ops.scan has checked and cast them); h0: [B, D]
    ([N, D] with cu_seqlens) or None; cu_seqlens: validated offsets with B == 1, or None.
    chunk_len: steps per chunk (None picks one for the device; tests force small chunks).
    Returns (h [B, T, D], h_last [B or N, D]); an empty packed sequence's h_last is its initial state.
    """
    if not is_available():
        raise RuntimeError("triton_scan: needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
    for name, t in (("x", x), ("g", g)):
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"triton_scan: {name} must be float32 or float64 (ops.scan casts), got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"triton_scan: {name} must be contiguous")
    if g.dtype != x.dtype:
        raise TypeError(f"triton_scan: x and g must share a dtype, got {x.dtype} and {g.dtype}")
    if not x.is_cuda and not interpreted():
        raise ValueError(f"triton_scan: x must be a CUDA tensor (CPU tensors need TRITON_INTERPRET=1), got {x.device}")
    if chunk_len is not None and (not isinstance(chunk_len, int) or chunk_len < 1):
        raise ValueError(f"triton_scan: chunk_len must be an integer >= 1, got {chunk_len!r}")
    return _TritonScan.apply(x, g, h0, cu_seqlens, chunk_len)
