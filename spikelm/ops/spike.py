"""Spike functions with surrogate gradients, shared by every neuron.

One mechanism: S = clip(floor(h + 1/2), 0, N), i.e. the number of thresholds 1/2, 3/2, ..., N - 1/2
that h reaches (N = 1 is the binary Heaviside at 1/2). The backward replaces the staircase's zero
derivative by a surrogate:
  rect: 1 where 0 <= h <= N (the clip range), 0 outside: the straight-through estimator;
  atan: the sum over thresholds c of (a/2) / (1 + (pi/2 * a * (h - c))^2) (Fang et al.'s arctan).
"""
from __future__ import annotations

import math

import torch

SPIKE_MODES = ("integer", "binary")
SURROGATES = ("rect", "atan")


def surrogate_slope(h: torch.Tensor, max_spike: int, surrogate: str, alpha: float) -> torch.Tensor:
    """d S / d h as the surrogate defines it, in h's dtype (rect: a 0/1 mask; atan: computed in float32 or wider)."""
    if surrogate == "rect":
        inside = h >= 0
        inside &= h <= max_spike
        return inside.to(h.dtype)
    hf = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
    slope, bump = torch.zeros_like(hf), torch.empty_like(hf)
    for k in range(max_spike):  # in place: one scratch tensor, not a fresh one per operation
        torch.sub(hf, k + 0.5, out=bump)
        bump.mul_(math.pi / 2 * alpha).square_().add_(1.0).reciprocal_()
        slope.add_(bump, alpha=alpha / 2)
    return slope.to(h.dtype)


class _QuantizeSpike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, max_spike: int, surrogate: str, alpha: float):
        ctx.save_for_backward(h)
        ctx.max_spike, ctx.surrogate, ctx.alpha = max_spike, surrogate, alpha
        return torch.floor(h + 0.5).clamp_(0, max_spike)

    @staticmethod
    def backward(ctx, grad_s):
        (h,) = ctx.saved_tensors
        return grad_s * surrogate_slope(h, ctx.max_spike, ctx.surrogate, ctx.alpha).to(grad_s.dtype), None, None, None


def quantize_spikes(h: torch.Tensor, max_spike: int, surrogate: str = "rect", alpha: float = 2.0) -> torch.Tensor:
    """Integer spikes clip(floor(h + 1/2), 0, max_spike) in h's dtype, with a surrogate gradient."""
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    if not (torch.is_grad_enabled() and h.requires_grad):  # inference: skip the autograd.Function overhead
        return torch.floor(h + 0.5).clamp_(0, max_spike)
    return _QuantizeSpike.apply(h, int(max_spike), surrogate, float(alpha))


def unfold_spikes(s: torch.Tensor, max_spike: int) -> torch.Tensor:
    """Unfold integer spikes 0..N into N binary sub-steps: out[j] = (s > j), so out.sum(0) == s.

    This is how an integer-spike layer runs on hardware that only moves binary events.
    """
    if not isinstance(max_spike, int) or max_spike < 1:
        raise ValueError(f"unfold_spikes: max_spike must be an integer >= 1, got {max_spike!r}")
    if s.numel() and (s.min() < 0 or s.max() > max_spike or not torch.equal(s, s.round())):
        raise ValueError(f"unfold_spikes: s must hold integers in [0, {max_spike}]")
    levels = torch.arange(max_spike, device=s.device, dtype=s.dtype).view(-1, *([1] * s.dim()))
    return (s.unsqueeze(0) > levels).to(s.dtype)
