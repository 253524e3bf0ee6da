from __future__ import annotations

import torch
from torch import nn

from .context import SequenceContext
from .neuron_layer import NeuronLayer
from .op_counts import OpCount
from .spike_linear import SpikeLinear


class SpikingMLP(nn.Module):
    """Channel mixing: spikes -> fc1 -> spikes -> fc2, both linear layers fed by integer spikes."""

    def __init__(self, hidden_size: int, intermediate_size: int, neuron_kwargs: dict, eps: float):
        super().__init__()
        self.in_spikes = NeuronLayer(hidden_size, neuron_kwargs, eps)
        self.fc1 = SpikeLinear(hidden_size, intermediate_size, bias=False)
        self.fc1.feeds_neuron = True
        self.hidden_spikes = NeuronLayer(intermediate_size, neuron_kwargs, eps, normalize=False)
        self.fc2 = SpikeLinear(intermediate_size, hidden_size, bias=False)

    def op_counts(self, inputs) -> dict[str, OpCount]:
        """Energy accounting: no arithmetic of its own (its linears and neuron layers count theirs)."""
        return {}

    def forward(self, x: torch.Tensor, ctx: SequenceContext, state: dict | None, return_state: bool):
        state = state or {}
        s, st_in = self.in_spikes(x, ctx, state.get("in"), return_state)
        s2, st_hidden = self.hidden_spikes(self.fc1(s), ctx, state.get("hidden"), return_state)
        return self.fc2(s2), {"in": st_in, "hidden": st_hidden}
