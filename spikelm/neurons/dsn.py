"""The dynamic decay spiking neuron (DSN), ../shared/spec/DSN.md:

    a'_t    = CausalConv1D_k(X)_t                 (depthwise, sees X_{t-k+1..t})
    alpha_t = sigmoid(a'_t) ** (1/tau)            (log alpha = logsigmoid(a') / tau, floored)
    H_t     = alpha_t * H_{t-1} + (1 - alpha_t) * X_t
    S_t     = clip(round(H_t), 0, N)

The decay depends on X only, so H is a linear recurrence: `forward` runs it as a parallel scan
(ops.scan), `step` runs it one token at a time with O(1) state. Both compute the conv with the same
summation order and the membrane in float32, so they agree to rounding.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import (LOG_DECAY_FLOOR, check_cu_seqlens, decay_logit, document_starts, dsn_parallel, log_decay, scan,
                   triton_is_available)
from .base import check_choice, check_positive_int, check_sequence_input, check_step_input
from .spike import SPIKE_MODES, SURROGATES, quantize_spikes

__all__ = ["DECAY_INIT_RANGE", "DSN", "DSNState", "LOG_DECAY_FLOOR"]

# the spec's example spread of initial decays, short to long memory (a model config may choose its own)
DECAY_INIT_RANGE = (0.5, 0.999)


class DSNState(NamedTuple):
    """O(1) serial state of a DSN layer: membrane H_{t-1} [B, C] (float32) and the conv's last k-1 inputs [B, k-1, C]."""

    membrane: torch.Tensor
    conv: torch.Tensor


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
        backend: how forward computes ("auto", "torch", "naive", "triton"): on CPU "auto" runs the compiled
            C kernel (ops/cpu_dsn.py) where it applies and "torch" the torch Function (ops/torch_dsn.py);
            "naive" composes ops.scan's reference; on CUDA "auto"/"triton" run the fused Triton kernel.
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
        self.backend = backend
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

    # -- shared pieces -------------------------------------------------------------------------
    def _decay_logit(self, window: torch.Tensor, T: int, doc_starts: torch.Tensor | None = None) -> torch.Tensor:
        """Causal depthwise conv: window [B, k-1+T, C] -> a' [B, T, C] (ops.decay_logit, shared with step)."""
        return decay_logit(window, self.conv_weight, self.conv_bias, T, doc_starts)

    def _log_decay(self, logit: torch.Tensor) -> torch.Tensor:
        return log_decay(logit, self.tau)

    def spike(self, membrane: torch.Tensor) -> torch.Tensor:
        return quantize_spikes(membrane, self.max_spike, self.surrogate, self.surrogate_alpha)

    def initial_state(self, batch_size: int, device=None, dtype=torch.float32) -> DSNState:
        """A fresh neuron: zero membrane, zero conv history."""
        return DSNState(torch.zeros(batch_size, self.channels, device=device, dtype=torch.float32),
                        torch.zeros(batch_size, self.kernel_size - 1, self.channels, device=device, dtype=dtype))

    def _history(self, state: DSNState | None, batch_size: int, device, dtype) -> torch.Tensor:
        """The conv's previous k-1 inputs [B, k-1, C]: the carried state's, or zeros for a fresh neuron."""
        if state is None:
            return torch.zeros(batch_size, self.kernel_size - 1, self.channels, device=device, dtype=dtype)
        return state.conv.to(dtype)

    def _check_state(self, state, batch_size: int) -> None:
        if not isinstance(state, DSNState):
            raise TypeError(f"DSN: state must be a DSNState (from forward(return_state=True) or step), got {type(state).__name__}")
        want_m, want_c = (batch_size, self.channels), (batch_size, self.kernel_size - 1, self.channels)
        if tuple(state.membrane.shape) != want_m or tuple(state.conv.shape) != want_c:
            raise ValueError(f"DSN: state shapes must be membrane {want_m} and conv {want_c}, got "
                             f"{tuple(state.membrane.shape)} and {tuple(state.conv.shape)}")

    # -- parallel form -------------------------------------------------------------------------
    def _use_torch_function(self, x: torch.Tensor, return_membrane: bool) -> bool:
        """Off CUDA, ops.dsn_parallel (the C kernel, or the torch Function) computes what the composition does."""
        return not x.is_cuda and self.backend in ("auto", "torch") and not return_membrane

    def _use_fused_kernel(self, x: torch.Tensor, return_membrane: bool) -> bool:
        """The fused Triton kernel computes exactly the unfused rect-surrogate path, on CUDA only."""
        return (x.is_cuda and self.surrogate == "rect" and self.backend in ("auto", "triton")
                and not return_membrane and triton_is_available())

    def forward(self, x: torch.Tensor, state: DSNState | None = None, return_state: bool = False,
                cu_seqlens: torch.Tensor | None = None, return_membrane: bool = False):
        """x [B, T, C] -> spikes [B, T, C] (x's dtype), computed in parallel over T.

        state: continue from a carried DSNState (a chunk of a longer stream); None is a fresh neuron.
        cu_seqlens: packed documents in one row (B = 1): every document starts from a fresh neuron
            (membrane and conv history), so nothing leaks across boundaries; state must be None and
            the returned state holds one row per document.
        Returns spikes, plus the new state if return_state, plus the float32 membrane if return_membrane.
        """
        check_sequence_input("DSN", x, self.channels)
        B, T, C = x.shape
        k = self.kernel_size
        if cu_seqlens is not None and state is not None:
            raise ValueError("DSN: pass either state or cu_seqlens (packed documents start fresh), not both")
        if cu_seqlens is not None:
            check_cu_seqlens("DSN", cu_seqlens, B, T)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if state is not None:
            self._check_state(state, B)
        fused = self._use_fused_kernel(x, return_membrane)
        one_function = not fused and self._use_torch_function(x, return_membrane)
        if not one_function:
            membrane0 = None if state is None else state.membrane.float()
            xf = x.to(dtype)
            window = torch.cat([self._history(state, B, x.device, dtype), xf], dim=1)
            starts = None if cu_seqlens is None else document_starts(cu_seqlens)
            logit = self._decay_logit(window, T, starts)
        if fused:
            # CUDA: decay, drive, scan and rect spikes in one Triton pass (ops/triton_dsn.py, issue 3)
            from ..ops.triton_dsn import dsn_fused  # noqa: PLC0415

            spikes, last = dsn_fused(logit, x, membrane0, cu_seqlens, self.tau, self.max_spike,
                                     output_final_state=return_state)
        elif one_function:
            # CPU: the whole neuron as one autograd Function: the compiled C kernel (ops/cpu_dsn.py) where it
            # applies, else the torch Function with its hand-written backward (ops/torch_dsn.py)
            spikes, last = dsn_parallel(x, self.conv_weight, self.conv_bias, self.tau, self.max_spike, self.surrogate,
                                        self.surrogate_alpha, None if state is None else state.conv,
                                        None if state is None else state.membrane, cu_seqlens,
                                        kernel="torch" if self.backend == "torch" else "auto")
            last = last.float()
        else:  # the composition of ops (return_membrane, or the naive reference backend)
            log_decay = self._log_decay(logit)
            drive = -torch.expm1(log_decay) * xf  # (1 - alpha) X
            membrane, last = scan(drive, log_decay, membrane0, output_final_state=return_state,
                                  cu_seqlens=cu_seqlens, backend=self.backend)
            spikes = self.spike(membrane).to(x.dtype)
        out = (spikes,)
        if return_state:
            if cu_seqlens is None:  # the conv's next history: the last k-1 inputs, older history first
                tail = torch.cat([self._history(state, B, x.device, x.dtype), x[:, max(0, T - (k - 1)):]], dim=1)
                conv = tail[:, tail.shape[1] - (k - 1):]
            else:
                conv = _packed_conv_history(x, cu_seqlens, k)
            out += (DSNState(last, conv.to(x.dtype)),)
        if return_membrane:
            out += (membrane,)
        return out[0] if len(out) == 1 else out

    # -- serial form ---------------------------------------------------------------------------
    def step(self, x_t: torch.Tensor, state: DSNState | None = None):
        """One time step: x_t [B, C] -> (spikes [B, C], new DSNState). O(1) in the stream length."""
        check_step_input("DSN", x_t, self.channels)
        B = x_t.shape[0]
        if state is None:
            state = self.initial_state(B, x_t.device, x_t.dtype)
        else:
            self._check_state(state, B)
        window = torch.cat([state.conv.float(), x_t.float().unsqueeze(1)], dim=1)  # [B, k, C]
        log_decay = self._log_decay(self._decay_logit(window, 1))[:, 0]
        membrane = torch.addcmul(-torch.expm1(log_decay) * x_t.float(), torch.exp(log_decay), state.membrane.float())
        spikes = self.spike(membrane).to(x_t.dtype)
        return spikes, DSNState(membrane, window[:, 1:].to(x_t.dtype))


def _packed_conv_history(x: torch.Tensor, cu_seqlens: torch.Tensor, k: int) -> torch.Tensor:
    """Per document, its last k-1 inputs (zeros before its start): [N, k-1, C]."""
    cu = cu_seqlens.tolist()
    C = x.shape[-1]
    rows = []
    for s, e in zip(cu, cu[1:]):
        tail = x[0, max(s, e - (k - 1)) : e]
        rows.append(torch.cat([tail.new_zeros(k - 1 - tail.shape[0], C), tail], dim=0))
    return torch.stack(rows, dim=0)
