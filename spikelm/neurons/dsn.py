"""The dynamic decay spiking neuron (DSN); docs/neuron.md explains it:

    a'_t    = CausalConv1D_k(X)_t                 (depthwise, sees X_{t-k+1..t})
    alpha_t = sigmoid(a'_t) ** (1/tau)            (log alpha = logsigmoid(a') / tau, floored)
    H_t     = alpha_t * H_{t-1} + (1 - alpha_t) * X_t
    S_t     = clip(round(H_t), 0, N)

The module holds the conv's parameters and the neuron's settings; the arithmetic is ops.dsn:
`forward` runs ops.dsn.dsn (the whole sequence in parallel, on the backend `backend` picks) and
`step` runs ops.dsn.dsn_step (one token, O(1) state). The two agree to rounding.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.dsn import BACKENDS, DSNState, dsn, dsn_step, state_dtype
from ..ops.decay import LOG_DECAY_FLOOR
from .base import check_choice, check_positive_int, check_sequence_input, check_step_input
from .spike import SPIKE_MODES, SURROGATES

__all__ = ["DECAY_INIT_RANGE", "DSN", "DSNState", "LOG_DECAY_FLOOR"]

# the paper's example spread of initial decays, short to long memory (a model config may choose its own)
DECAY_INIT_RANGE = (0.5, 0.999)

# the C kernel has no step of its own: a DSN on the C backend decodes with the torch step
_STEP_BACKEND = {"c": "torch"}


class DSN(nn.Module):
    """Dynamic decay spiking neuron over [B, T, C] inputs; returns integer spikes 0..max_spike (float storage).

    Args:
        channels: number of neurons C.
        kernel_size: taps k of the causal depthwise conv that sets the decay.
        tau: the decay is sigmoid(conv)^(1/tau); tau > 0.
        max_spike: N, the largest integer spike ("binary" mode uses N = 1).
        spike_mode: "integer" (0..N) or "binary" (0/1).
        surrogate: "rect" (straight-through on the clip range) or "atan" (arctan bumps at each threshold).
        surrogate_alpha: sharpness a of the atan surrogate.
        decay_init_range: (short, long) initial decays spread log-uniformly in 1 - alpha over the
            channels, so the layer starts with memories from ~1/(1-short) to ~1/(1-long) steps.
        backend: the ops.dsn backend of forward and step, one of ops.dsn.BACKENDS: "auto" (CUDA: the
            fused Triton kernel where it applies; CPU: the compiled C kernel where it applies; else
            torch), "torch", "c", "triton" or "naive" (the float64 definition). An explicit choice that
            cannot run a call is an error. step uses the same name (the C backend steps with torch).
    """

    def __init__(self, channels: int, kernel_size: int = 4, tau: float = 0.25, max_spike: int = 4,
                 spike_mode: str = "integer", surrogate: str = "rect", surrogate_alpha: float = 2.0,
                 decay_init_range: tuple[float, float] = DECAY_INIT_RANGE, backend: str = "auto"):
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0 or not math.isfinite(tau):
            raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
        self.tau = float(tau)
        check_positive_int("max_spike", max_spike)
        self.spike_mode = check_choice("spike_mode", spike_mode, SPIKE_MODES)
        self.max_spike = 1 if spike_mode == "binary" else max_spike
        self.surrogate = check_choice("surrogate", surrogate, SURROGATES)
        if not surrogate_alpha > 0:
            raise ValueError(f"surrogate_alpha must be > 0, got {surrogate_alpha!r}")
        self.surrogate_alpha = float(surrogate_alpha)
        lo, hi = decay_init_range
        if not 0 < lo <= hi < 1:
            raise ValueError(f"decay_init_range must satisfy 0 < short <= long < 1, got {decay_init_range!r}")
        self.decay_init_range = (float(lo), float(hi))
        self.backend = check_choice("backend", backend, BACKENDS)
        # conv weight[c, j] multiplies X_{t-k+1+j}: j = k-1 is the current input
        self.conv_weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.conv_bias = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = self.conv_weight_bound()
        self.conv_weight.uniform_(-bound, bound)
        self.conv_bias.copy_(self.initial_decay_bias())

    def conv_weight_bound(self) -> float:
        """The decay conv's weights start uniform in [-bound, bound] (PyTorch's default for a k-tap conv)."""
        return 1.0 / math.sqrt(self.kernel_size)

    def initial_decay_bias(self) -> torch.Tensor:
        """Conv bias whose decays, for zero input, spread channels from short to long memory.

        1 - alpha is log-spaced from 1 - short down to 1 - long, so memories range from ~2 steps to
        ~1000 steps by default; a constant init would make every channel forget in a few steps.
        """
        lo, hi = self.decay_init_range
        one_minus = torch.logspace(math.log10(1 - lo), math.log10(1 - hi), self.channels, dtype=torch.float64)
        alpha = 1 - one_minus
        return torch.logit(alpha ** self.tau).to(self.conv_bias.dtype)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, kernel_size={self.kernel_size}, tau={self.tau}, "
                f"max_spike={self.max_spike}, spike_mode={self.spike_mode!r}, surrogate={self.surrogate!r}")

    def initial_state(self, batch_size: int, device=None, dtype=torch.float32) -> DSNState:
        """A fresh neuron: zero membrane (float32; float64 for float64 inputs), zero conv history in dtype."""
        return DSNState(torch.zeros(batch_size, self.channels, device=device, dtype=state_dtype(dtype)),
                        torch.zeros(batch_size, self.kernel_size - 1, self.channels, device=device, dtype=dtype))

    def macs_per_element_step(self, positions: torch.Tensor) -> float:
        """Energy accounting (eval.energy): k conv taps (bias folded) + 1 sigmoid + 1 for the power 1/tau
        + 2 for the membrane update alpha*H + (1-alpha)*X, per channel and step."""
        return self.kernel_size + 4

    def forward(self, x: torch.Tensor, state: DSNState | None = None, return_state: bool = False,
                cu_seqlens: torch.Tensor | None = None, return_membrane: bool = False):
        """x [B, T, C] -> spikes [B, T, C] (x's dtype), computed in parallel over T (ops.dsn.dsn).

        state: continue from a carried DSNState (a chunk of a longer stream); None is a fresh neuron.
        cu_seqlens: packed documents in one row (B = 1): every document starts from a fresh neuron
            (membrane and conv history), so nothing leaks across boundaries; state must be None and
            the returned state holds one row per document.
        Returns spikes, plus the new state if return_state, plus the membrane H [B, T, C] (float32;
        float64 for float64 inputs) if return_membrane.
        """
        check_sequence_input("DSN", x, self.channels)
        if cu_seqlens is not None and state is not None:
            raise ValueError("DSN: pass either state or cu_seqlens (packed documents start fresh), not both")
        out = dsn(x, self.conv_weight, self.conv_bias, self.tau, self.max_spike, self.surrogate, self.surrogate_alpha,
                  initial_state=state, cu_seqlens=cu_seqlens, output_final_state=return_state,
                  output_membrane=return_membrane, backend=self.backend)
        result = (out.spikes,) + ((out.final_state,) if return_state else ()) + ((out.membrane,) if return_membrane else ())
        return result[0] if len(result) == 1 else result

    def step(self, x_t: torch.Tensor, state: DSNState | None = None):
        """One time step: x_t [B, C] -> (spikes [B, C], new DSNState). O(1) in the stream length (ops.dsn.dsn_step)."""
        check_step_input("DSN", x_t, self.channels)
        return dsn_step(x_t, self.conv_weight, self.conv_bias, self.tau, self.max_spike, self.surrogate,
                        self.surrogate_alpha, state, backend=_STEP_BACKEND.get(self.backend, self.backend))
