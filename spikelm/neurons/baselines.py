"""Baseline spiking neurons with the DSN's interface (forward on [B, T, C] -> spikes), for comparison.

- LIF: leaky integrate-and-fire with hard or soft reset. The spike feeds back into the state, so
  it is serial by nature: forward is a loop of step.
- PSN (Fang et al. 2023): H = W X with a learnable T x T matrix over time, causally masked for
  language models; parallel but tied to its T and with no O(1) serial form.
- SlidingPSN: a learnable window of k taps shared over time (a causal conv), parallel and O(k)
  serial, but linear before the threshold.
All three fire binary spikes, Heaviside(H - threshold), trained with the arctan surrogate by default.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import check_choice, check_positive_int, check_sequence_input, check_step_input
from .spike import SURROGATES, quantize_spikes

LIF_RESETS = ("hard", "soft")


def _fire(h_minus_threshold: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
    """Heaviside(h - threshold) with a surrogate: the binary case of the shared spike function."""
    return quantize_spikes(h_minus_threshold + 0.5, 1, surrogate, alpha)


class LIF(nn.Module):
    """Leaky integrate-and-fire: H_t = beta V_{t-1} + (1 - beta) X_t, S_t = Heaviside(H_t - V_th), then reset.

    reset="hard": V_t = H_t (1 - S_t) + V_reset S_t; reset="soft": V_t = H_t - V_th S_t.
    """

    def __init__(self, channels: int, beta: float = 0.5, v_threshold: float = 1.0, v_reset: float = 0.0,
                 reset: str = "hard", surrogate: str = "atan", surrogate_alpha: float = 2.0,
                 detach_reset: bool = False):
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        if not 0 <= beta < 1:
            raise ValueError(f"beta must lie in [0, 1), got {beta!r}")
        if not v_threshold > 0:
            raise ValueError(f"v_threshold must be > 0, got {v_threshold!r}")
        self.beta, self.v_threshold, self.v_reset = float(beta), float(v_threshold), float(v_reset)
        self.reset = check_choice("reset", reset, LIF_RESETS)
        self.surrogate = check_choice("surrogate", surrogate, SURROGATES)
        self.surrogate_alpha = float(surrogate_alpha)
        self.detach_reset = detach_reset
        self.max_spike = 1

    def extra_repr(self) -> str:
        return f"channels={self.channels}, beta={self.beta}, v_threshold={self.v_threshold}, reset={self.reset!r}"

    def macs_per_element_step(self, positions: torch.Tensor) -> float:
        """Energy accounting (eval.energy): 2 (leak and charge) + 1 (reset) MACs per channel and step."""
        return 3

    def step(self, x_t: torch.Tensor, state: torch.Tensor | None = None):
        """x_t [B, C] -> (spikes [B, C], membrane after reset [B, C] float32)."""
        check_step_input("LIF", x_t, self.channels)
        v = x_t.new_zeros(x_t.shape, dtype=torch.float32) if state is None else state.float()
        h = self.beta * v + (1 - self.beta) * x_t.float()
        s = _fire(h - self.v_threshold, self.surrogate, self.surrogate_alpha)
        s_reset = s.detach() if self.detach_reset else s
        if self.reset == "hard":
            v = h * (1 - s_reset) + self.v_reset * s_reset
        else:
            v = h - self.v_threshold * s_reset
        return s.to(x_t.dtype), v

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, return_state: bool = False):
        check_sequence_input("LIF", x, self.channels)
        spikes = []
        for x_t in x.unbind(1):  # unbind: one backward op, not T full-size gradients of x[:, t]
            s, state = self.step(x_t, state)
            spikes.append(s)
        out = torch.stack(spikes, dim=1) if spikes else x.new_zeros(x.shape)
        if return_state:
            return out, (state if state is not None else x.new_zeros(x.shape[0], self.channels, dtype=torch.float32))
        return out


class PSN(nn.Module):
    """Parallel spiking neuron: H = W X over time with a learnable, causally masked T x T matrix W.

    Inputs may be shorter than T (the top-left block of W is used, which is consistent because W is
    lower-triangular); longer inputs are an error: PSN has no meaning past the T it was built for.
    It keeps no state: a stream cannot be continued chunk by chunk or step by step.
    """

    def __init__(self, channels: int, T: int, surrogate: str = "atan", surrogate_alpha: float = 2.0):
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        self.T = check_positive_int("T", T)
        self.surrogate = check_choice("surrogate", surrogate, SURROGATES)
        self.surrogate_alpha = float(surrogate_alpha)
        self.max_spike = 1
        self.weight = nn.Parameter(torch.empty(T, T))
        self.bias = nn.Parameter(torch.empty(T))  # -threshold per time step
        self.register_buffer("causal_mask", torch.ones(T, T, dtype=torch.bool).tril(), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias.fill_(-1.0)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, T={self.T}"

    def macs_per_element_step(self, positions: torch.Tensor) -> torch.Tensor:
        """Energy accounting (eval.energy): one MAC per time tap used, t + 1 at position t (at most T)."""
        return torch.clamp(positions.double() + 1, max=self.T)

    def forward(self, x: torch.Tensor, state=None, return_state: bool = False):
        check_sequence_input("PSN", x, self.channels)
        if state is not None or return_state:
            raise ValueError("PSN keeps no state: it sees a whole window of at most T steps at once")
        T = x.shape[1]
        if T > self.T:
            raise ValueError(f"PSN was built for T={self.T} time steps, got an input of {T} steps")
        weight = (self.weight[:T, :T] * self.causal_mask[:T, :T]).to(x.dtype)
        h = torch.einsum("ts,bsc->btc", weight, x) + self.bias[:T, None].to(x.dtype)
        return _fire(h, self.surrogate, self.surrogate_alpha).to(x.dtype)


class SlidingPSNState(NamedTuple):
    window: torch.Tensor  # last k-1 inputs [B, k-1, C]


class SlidingPSN(nn.Module):
    """Sliding PSN: H_t = sum_i w_i X_{t-k+1+i} + b, S_t = Heaviside(H_t), k taps shared over time and channels."""

    def __init__(self, channels: int, k: int = 4, surrogate: str = "atan", surrogate_alpha: float = 2.0):
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        self.k = check_positive_int("k", k)
        self.surrogate = check_choice("surrogate", surrogate, SURROGATES)
        self.surrogate_alpha = float(surrogate_alpha)
        self.max_spike = 1
        self.weight = nn.Parameter(torch.empty(k))  # weight[i] multiplies X_{t-k+1+i}
        self.bias = nn.Parameter(torch.empty(()))  # -threshold
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.copy_(self.initial_weight())
        self.bias.fill_(-1.0)

    def initial_weight(self) -> torch.Tensor:
        """An exponentially fading window, the newest input weighted most."""
        return torch.pow(0.5, torch.arange(self.k - 1, -1, -1, dtype=torch.float32))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, k={self.k}"

    def macs_per_element_step(self, positions: torch.Tensor) -> float:
        """Energy accounting (eval.energy): k MACs (the window's taps) per channel and step."""
        return self.k

    def forward(self, x: torch.Tensor, state: SlidingPSNState | None = None, return_state: bool = False):
        check_sequence_input("SlidingPSN", x, self.channels)
        B, T, C = x.shape
        history = x.new_zeros(B, self.k - 1, C) if state is None else state.window.to(x.dtype)
        window = torch.cat([history, x], dim=1)  # [B, k-1+T, C]
        w = self.weight.to(x.dtype)
        # depthwise causal conv as one conv1d over [B*C, 1, k-1+T]
        h = F.conv1d(window.transpose(1, 2).reshape(B * C, 1, -1), w.view(1, 1, -1))
        h = h.view(B, C, T).transpose(1, 2) + self.bias.to(x.dtype)
        s = _fire(h, self.surrogate, self.surrogate_alpha).to(x.dtype)
        if return_state:
            return s, SlidingPSNState(window[:, window.shape[1] - (self.k - 1):])
        return s

    def step(self, x_t: torch.Tensor, state: SlidingPSNState | None = None):
        check_step_input("SlidingPSN", x_t, self.channels)
        s, new_state = self.forward(x_t.unsqueeze(1), state, return_state=True)
        return s[:, 0], new_state
