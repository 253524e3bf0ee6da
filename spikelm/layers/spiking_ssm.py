"""Spiking SSM block: the DSN is the selective state-space core.

    x ──┬─ norm → neuron → in_proj ─┬─ z    → DSN (core: input-dependent decay, membrane = state) ─┐
        │                           └─ gate → binary neuron ──────────────────────────────── × ─ out_proj ─┐
        └─────────────────────────────────────────────────────────────────────────────────────────── + ─┴→ x'
    x' ─┬─ norm → neuron → fc1 → neuron → fc2 ─┐
        └──────────────────────────────── + ─┴→ out

Only the residual stream is normalised; a linear layer fed by spikes drives the next neuron
directly (see NeuronLayer).
"""
from __future__ import annotations

import torch
from torch import nn

from .context import SequenceContext
from .mlp import SpikingMLP
from .neuron_layer import NeuronLayer
from .op_counts import OpCount
from .spike_linear import SpikeLinear


class SpikingSSMBlock(nn.Module):
    """gate: "binary" (0/1 spikes, atan surrogate), "integer" (the core's spikes and surrogate) or "none"
    (out_proj reads the core's spikes). core_neuron_kwargs: the core's settings (default: neuron_kwargs)."""

    def __init__(self, hidden_size: int, ssm_expand: int, intermediate_size: int, neuron_kwargs: dict, eps: float,
                 core_neuron_kwargs: dict | None = None, gate: str = "binary"):
        super().__init__()
        inner = ssm_expand * hidden_size
        self.in_spikes = NeuronLayer(hidden_size, neuron_kwargs, eps)
        self.in_proj = SpikeLinear(hidden_size, (1 if gate == "none" else 2) * inner, bias=False)
        self.in_proj.feeds_neuron = True
        self.core = NeuronLayer(inner, core_neuron_kwargs or neuron_kwargs, eps, normalize=False)
        self.gate, self.gate_mode = None, gate
        if gate != "none":
            gate_kwargs = dict(neuron_kwargs, spike_mode="binary", surrogate="atan") if gate == "binary" else neuron_kwargs
            self.gate = NeuronLayer(inner, gate_kwargs, eps, normalize=False)
        self.out_proj = SpikeLinear(inner, hidden_size, bias=False)
        self.mlp = SpikingMLP(hidden_size, intermediate_size, neuron_kwargs, eps)

    def op_counts(self, inputs) -> dict[str, OpCount]:
        """Energy accounting: the gate y * g (integer spike x binary spike: a select, 1 AC per element; integer x
        integer spikes: 1 MAC; 1 MAC in the dense network; none without a gate) and the two residual additions
        (1 AC per element each)."""
        B, T, D = inputs[0].shape
        counts = {"residual": OpCount(ac=2.0 * B * T * D)}
        if self.gate is not None:
            gated = float(B * T * self.out_proj.in_features)
            counts["gate"] = OpCount(ac=gated, dense_mac=gated, dense_ac=0.0) if self.gate_mode == "binary" \
                else OpCount(mac=gated)
        return counts

    def forward(self, x: torch.Tensor, ctx: SequenceContext, state: dict | None = None, return_state: bool = False):
        state = state or {}
        s, st_in = self.in_spikes(x, ctx, state.get("in"), return_state)
        if self.gate is None:
            y, st_core = self.core(self.in_proj(s), ctx, state.get("core"), return_state)
            g, st_gate = None, None
        else:
            z, gate = self.in_proj(s).chunk(2, dim=-1)
            y, st_core = self.core(z, ctx, state.get("core"), return_state)
            g, st_gate = self.gate(gate, ctx, state.get("gate"), return_state)
        x = x + self.out_proj(y if g is None else y * g)
        m, st_mlp = self.mlp(x, ctx, state.get("mlp"), return_state)
        new_state = {"in": st_in, "core": st_core, "gate": st_gate, "mlp": st_mlp} if return_state else None
        return x + m, new_state
