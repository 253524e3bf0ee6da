"""What a module declares about its own arithmetic, for the energy estimate (spikelm.eval.energy, docs/energy.md).

Every module of a model the energy counter walks is exactly one of:
- an nn.Linear (any subclass): the counter counts its synaptic operations from the input it reads
  (integer spikes: one accumulate per spike and output; anything else: multiply-accumulates);
- a module with `op_counts(self, inputs) -> dict[str, OpCount]`: the operations one forward call
  performs itself, by category, given the call's positional arguments (its child modules count
  their own; a pure container returns {});
- a neuron, with `macs_per_element_step(self, positions)`: counted by the NeuronLayer that runs it;
- a module without arithmetic of its own that the counter knows (containers, embedding lookup).
Anything else is an error when the counter starts, so a new block or neuron cannot be left out silently.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OpCount:
    """Operations of one call: multiply-accumulates and accumulates in the spiking network, and in the same
    graph run with dense layers (dense_mac / dense_ac; None: the same as in the spiking network)."""

    mac: float = 0.0
    ac: float = 0.0
    dense_mac: float | None = None
    dense_ac: float | None = None
