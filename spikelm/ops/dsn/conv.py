"""The DSN's causal depthwise conv a' = conv(X) in torch ops, shared by the torch and Triton backends and the step.

    a'_t = b + sum_j w[:, j] * X_{t-k+1+j}        (j = k-1 is the current input)

Computed as one addcmul per tap from the bias, j = 0..k-1, in that order everywhere (the parallel
form, the Triton backend's conv and the one-token step), so the forms round alike. Before the first
step the taps read the carried conv history (the last k-1 inputs); packed documents (cu_seqlens,
B = 1) read zeros before their start: the few rows within k-1 steps of a start are recomputed with
the taps that cross it masked, instead of a mask over the whole sequence.
"""
from __future__ import annotations

import torch

from ..scan import document_starts
from ..torch_scan import _empty


def decay_logit(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, T: int,
                doc_starts: torch.Tensor | None = None) -> torch.Tensor:
    """a' [B, T, C] from window = [history, X] [B, k-1+T, C]; differentiable (autograd).

    doc_starts (packed, B = 1): offsets where documents start (window's history must then be zeros).
    """
    k = weight.shape[1]
    w, b = weight.to(window.dtype), bias.to(window.dtype)
    out = conv_rows(window, w, b, T)
    if doc_starts is not None and k > 1:
        mask_start_rows(out, window[:, k - 1 :], w, b, doc_starts, T)
    return out


def conv_rows(window, w, b, T, out=None):
    """b + sum_j w[:, j] * window[:, j:j+T], tap by tap (into out when given; differentiable without)."""
    k = w.shape[1]
    bias = b.expand(window.shape[0], T, -1)
    if out is None:
        out = torch.addcmul(bias, window[:, 0:T], w[:, 0])
    else:
        torch.addcmul(bias, window[:, 0:T], w[:, 0], out=out)
    for j in range(1, k):
        out.addcmul_(window[:, j : j + T], w[:, j])
    return out


def causal_conv(x, history, w, b, doc_starts):
    """decay_logit over [history, x] without materialising the window (rows t >= k-1 read x only); not differentiable."""
    B, T, C = x.shape
    k = w.shape[1]
    out = _empty(x)
    head = min(T, k - 1)  # rows that read the history
    if T > head:
        conv_rows(x, w, b, T - head, out=out[:, head:])
    if head:
        conv_rows(torch.cat([history, x[:, :head]], dim=1), w, b, head, out=out[:, :head])
    if doc_starts is not None and k > 1:
        mask_start_rows(out, x, w, b, doc_starts, T)
    return out


def start_rows(doc_starts: torch.Tensor, T: int, k: int):
    """Rows t = start + r (r < k-1, t < T, t before the next start) and their r."""
    starts = doc_starts.to(torch.long)
    r = torch.arange(k - 1, device=starts.device)
    rows = (starts[:, None] + r[None, :])
    nxt = torch.cat([starts[1:], starts.new_tensor([T])])
    ok = rows < nxt[:, None]
    return rows[ok], r.expand_as(rows)[ok]


def mask_start_rows(out, x, w, b, doc_starts, T):
    """Packed rows (B = 1, no history): recompute a' where taps reach before the row's document start."""
    k = w.shape[1]
    rows, r = start_rows(doc_starts, T, k)
    if rows.numel():
        idx = rows[:, None] + torch.arange(k, device=rows.device) - (k - 1)  # x index of each tap
        keep = (torch.arange(k, device=rows.device)[None, :] >= (k - 1 - r)[:, None]) & (idx >= 0)
        taps = x[0, idx.clamp(min=0)]  # [R, k, C]
        fixed = b.expand(rows.numel(), -1)
        for j in range(k):
            fixed = torch.addcmul(fixed, taps[:, j] * keep[:, j, None].to(x.dtype), w[:, j])
        out[0, rows] = fixed


def next_conv_history(x: torch.Tensor, history: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                      k: int) -> torch.Tensor:
    """The conv state after x: its last k-1 inputs, older first ([B, k-1, C]; per packed document [N, k-1, C],
    zeros before the document's start). history: the state before x (None: zeros)."""
    B, T, C = x.shape
    if cu_seqlens is None:
        before = x.new_zeros(B, k - 1, C) if history is None else history.to(x.dtype)
        tail = torch.cat([before, x[:, max(0, T - (k - 1)) :]], dim=1)
        # a fresh buffer: a step's state then has the strides of the one a step returns (a compiled
        # decoding step specialises on strides; views of differently shaped buffers made them dynamic)
        return tail[:, tail.shape[1] - (k - 1) :].clone(memory_format=torch.contiguous_format)
    cu = cu_seqlens.tolist()
    rows = []
    for s, e in zip(cu, cu[1:]):
        tail = x[0, max(s, e - (k - 1)) : e]
        rows.append(torch.cat([tail.new_zeros(k - 1 - tail.shape[0], C), tail], dim=0))
    return torch.stack(rows, dim=0)


def doc_layout(cu_seqlens: torch.Tensor, device):
    """(offsets as a list, starts of the non-empty documents, their document indices)."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    nonempty = cu[1:] > cu[:-1]
    return cu.tolist(), document_starts(cu), torch.nonzero(nonempty).flatten()
