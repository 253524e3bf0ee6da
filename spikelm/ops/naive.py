"""Naive reference for the diagonal linear recurrence: a plain loop, the oracle the kernels are tested against."""
from __future__ import annotations

import torch


def naive_scan(x: torch.Tensor, g: torch.Tensor, initial_state: torch.Tensor | None = None):
    """h_t = exp(g_t) * h_{t-1} + x_t over dim 1 of [B, T, D] tensors, one step at a time.

    Runs in the promoted dtype of its inputs (use float64 for an oracle); autograd comes from torch.
    Returns (h [B, T, D], h_last [B, D]).
    """
    B, T, D = x.shape
    dtype = torch.promote_types(x.dtype, g.dtype)
    h = x.new_zeros(B, D, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    outs = []
    for t in range(T):
        h = torch.exp(g[:, t].to(dtype)) * h + x[:, t].to(dtype)
        outs.append(h)
    hs = torch.stack(outs, dim=1) if outs else x.new_zeros(B, 0, D, dtype=dtype)
    return hs, h
