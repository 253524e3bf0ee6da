"""What every block needs to know about the tokens it processes, computed once per forward by the model."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SequenceContext:
    """Token layout of one forward pass over [B, T] positions.

    valid: [B, T] bool, False at (left) padding: padding never reaches a membrane, conv history or KV cache.
    positions: [B, T] long rotary positions (real token index, restarting at every packed document).
    cu_seqlens: packed documents in one row (B = 1), or None: every state restarts at each boundary.
    doc_ids: [B, T] long document index per position (packed mode), for attention masking.
    spike_totals: when a list, every neuron layer appends (sum of its spikes, its neuron-steps), for the
        firing loss (SpikeLMConfig.firing_loss_coef); None records nothing.
    attention: how attention blocks compute softmax attention: "sdpa" (F.scaled_dot_product_attention) or
        "eager" (explicit matmul + softmax); the same numbers to rounding.
    """

    valid: torch.Tensor | None
    positions: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None
    spike_totals: list | None = None
    attention: str = "sdpa"

    def mask_input(self, x: torch.Tensor) -> torch.Tensor:
        """Zero the padded positions of a neuron's input: a fresh neuron fed zeros stays fresh."""
        return x if self.valid is None else x * self.valid.unsqueeze(-1).to(x.dtype)

    def record_spikes(self, spikes: torch.Tensor) -> None:
        """Add a neuron layer's [B, T, C] spikes to spike_totals, counting real (unpadded) positions only."""
        if self.spike_totals is not None:
            steps = spikes.shape[0] * spikes.shape[1] if self.valid is None else self.valid.sum()
            self.spike_totals.append((spikes.sum(), steps * spikes.shape[2]))
