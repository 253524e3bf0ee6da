"""The DSN by its definition, one step at a time in float64: the oracle of every backend and of the step.

    a'_t    = b + sum_j w[:, j] X_{t-k+1+j}           inputs before the first step: the conv history
                                                     (zeros for a fresh neuron and before a packed document)
    alpha_t = sigmoid(a'_t) ** (1/tau)               as exp(max(logsigmoid(a'_t) / tau, -20)): floored at e^-20
                                                     (ops.decay.LOG_DECAY_FLOOR), finite for every a'
    H_t     = alpha_t H_{t-1} + (1 - alpha_t) X_t     H before the first step: the carried membrane (or 0)
    S_t     = clip(floor(H_t + 1/2), 0, N)            the surrogate ("rect" or "atan") sets dS/dH

Plain loops over documents and time, written from the formulas and not from any backend (no scan,
no fused or in-place arithmetic), autograd for the gradients. The backends' tests compare
spikes, states and gradients of every input against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..decay import LOG_DECAY_FLOOR
from ..spike import quantize_spikes


def _neuron(x, w, b, tau, max_spike, surrogate, surrogate_alpha, history, h):
    """One run of rows x [B, L, C] from conv history [B, k-1, C] and membrane h [B, C]: (spikes, H, H_last, history)."""
    k, L = w.shape[1], x.shape[1]
    window = torch.cat([history, x], dim=1)
    logit = b + sum(w[:, j] * window[:, j : j + L] for j in range(k))  # a' of every step: it does not depend on H
    alpha = torch.exp(torch.clamp(F.logsigmoid(logit) / tau, min=LOG_DECAY_FLOOR))
    membranes = []
    for t in range(L):
        h = alpha[:, t] * h + (1 - alpha[:, t]) * x[:, t]
        membranes.append(h)
    H = torch.stack(membranes, dim=1) if membranes else x.new_zeros(x.shape)
    return quantize_spikes(H, max_spike, surrogate, surrogate_alpha), H, h, window[:, window.shape[1] - (k - 1) :]


def naive_dsn(x, weight, bias, tau: float, max_spike: int, surrogate: str = "rect", surrogate_alpha: float = 2.0,
              history=None, initial_membrane=None, cu_seqlens=None):
    """The DSN over x [B, T, C] in float64: (spikes [B, T, C], membrane [B, T, C], final membrane, final conv history).

    weight [C, k], bias [C]: the decay conv. history [B, k-1, C], initial_membrane [B, C]: the carried
    state (None: zeros). cu_seqlens (B = 1): packed documents, each from an empty history and its row
    of initial_membrane [N, C] (or 0); the final state then has one row per document. Every output is
    float64 and differentiable in every tensor input.
    """
    f64 = torch.float64
    x, w, b = x.to(f64), weight.to(f64), bias.to(f64)
    B, T, C = x.shape
    k = w.shape[1]
    if cu_seqlens is None:
        hist = x.new_zeros(B, k - 1, C) if history is None else history.to(f64)
        h0 = x.new_zeros(B, C) if initial_membrane is None else initial_membrane.to(f64)
        spikes, H, last, conv = _neuron(x, w, b, tau, max_spike, surrogate, surrogate_alpha, hist, h0)
        return spikes, H, last, conv
    parts, lasts, convs = [], [], []
    cu = cu_seqlens.tolist()
    for n, (s, e) in enumerate(zip(cu, cu[1:])):
        h0 = x.new_zeros(1, C) if initial_membrane is None else initial_membrane[n : n + 1].to(f64)
        spikes, H, last, conv = _neuron(x[:, s:e], w, b, tau, max_spike, surrogate, surrogate_alpha,
                                        x.new_zeros(1, k - 1, C), h0)
        parts.append((spikes, H))
        lasts.append(last)
        convs.append(conv)
    return (torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1),
            torch.cat(lasts, dim=0), torch.cat(convs, dim=0))
