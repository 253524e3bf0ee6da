"""Firing-rate monitor: forward hooks on every NeuronLayer of a model, no change to the model itself."""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from ..layers import NeuronLayer


class FiringRateMonitor:
    """Accumulates, per neuron layer, the spikes it emits while active.

        with FiringRateMonitor(model) as monitor:
            model(input_ids)
        monitor.summary()  # {"mean_rate": ..., "layers": {name: {...}}}

    rate = mean spike value / max_spike (1.0 = every neuron fires N every step);
    nonzero = fraction of (neuron, step) pairs with a spike; spikes counts the accumulated spike value.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._handles = []
        self.reset()

    def reset(self) -> None:
        self.totals = defaultdict(lambda: {"spikes": 0.0, "nonzero": 0, "elements": 0, "max_spike": 1, "channels": 0})

    def _hook(self, name: str):
        def record(module: NeuronLayer, args, output):
            spikes = output[0].detach()
            t = self.totals[name]
            t["spikes"] += float(spikes.float().sum())
            t["nonzero"] += int((spikes != 0).sum())
            t["elements"] += spikes.numel()
            t["max_spike"] = module.max_spike
            t["channels"] = spikes.shape[-1]

        return record

    def __enter__(self) -> "FiringRateMonitor":
        for name, module in self.model.named_modules():
            if isinstance(module, NeuronLayer):
                self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def layer_rates(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, t in self.totals.items():
            if t["elements"]:
                out[name] = {"rate": t["spikes"] / (t["elements"] * t["max_spike"]),
                             "nonzero": t["nonzero"] / t["elements"],
                             "mean_spike": t["spikes"] / t["elements"],
                             "max_spike": t["max_spike"], "channels": t["channels"],
                             "spikes": t["spikes"], "elements": t["elements"]}
        return out

    def mean_rate(self) -> float:
        """Rate over all neurons and steps together (each layer weighted by its element count)."""
        spikes = sum(t["spikes"] / t["max_spike"] for t in self.totals.values())
        elements = sum(t["elements"] for t in self.totals.values())
        return spikes / elements if elements else 0.0

    def summary(self) -> dict:
        return {"mean_rate": self.mean_rate(), "layers": self.layer_rates()}
