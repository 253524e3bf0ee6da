"""Input density of the spike-fed linear layers and the bytes of weights they read per token, dense and sparse.

A dense product reads all in x out weights of a layer for every token; the event-driven one
(ops.spike_linear) reads the weight rows of the inputs that fired only: fired x out. Forward
pre-hooks on every SpikeLinear count, per token (row), how many of its inputs fired, so the bytes
are those of decoding one token at a time (batch 1) on these very inputs, whatever batch and
length the monitored forward had:

- dense_bytes_per_token = in x out x bytes per weight;
- sparse_bytes_per_token = mean fired inputs x out x bytes per weight (the "on" mode);
- auto_bytes_per_token = per token, sparse if it fired at most the layer's crossover density, else
  dense (what the default "auto" mode reads);
- int8_sparse_bytes_per_token, int8_auto_bytes_per_token: the same with set_sparse_inference(...,
  int8=True), whose sparse product reads int8 weights (fired x out bytes) and one float32 scale per
  output feature (out x 4 bytes); its dense fallback reads the weights in their own dtype.

The embedding row (hidden x bytes per weight per token, the same in every mode) and activations,
neuron and cache state are not counted: weights of the linears are what bounds decoding.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from ..layers import SpikeLinear


class SpikeDensityMonitor:
    """Per SpikeLinear: the inputs that fired, per token, while active.

        with SpikeDensityMonitor(model) as monitor:
            model(input_ids)
        monitor.report()  # {"mean_density": ..., "layers": {name: {...}}, "total": {...}}
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._handles = []
        self.reset()

    def reset(self) -> None:
        self.totals = defaultdict(lambda: {"tokens": 0, "fired": 0, "auto_sparse_tokens": 0, "auto_fired": 0})
        self.shapes: dict[str, tuple] = {}

    def _hook(self, name: str):
        def record(module: SpikeLinear, args):
            x = args[0].detach()
            fired = (x.reshape(-1, module.in_features) != 0).sum(1)
            sparse = fired <= int(module.crossover * module.in_features) if module.crossover > 0 else \
                torch.zeros_like(fired, dtype=torch.bool)
            t = self.totals[name]
            t["tokens"] += fired.numel()
            t["fired"] += int(fired.sum())
            t["auto_sparse_tokens"] += int(sparse.sum())
            t["auto_fired"] += int(fired[sparse].sum())
            self.shapes[name] = (module.in_features, module.out_features, module.weight.element_size(),
                                 module.crossover)

        return record

    def __enter__(self) -> "SpikeDensityMonitor":
        for name, module in self.model.named_modules():
            if isinstance(module, SpikeLinear):
                self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def layers(self) -> dict[str, dict]:
        out = {}
        for name, t in self.totals.items():
            if not t["tokens"]:
                continue
            n_in, n_out, b, crossover = self.shapes[name]
            dense = n_in * n_out * b
            dense_tokens = t["tokens"] - t["auto_sparse_tokens"]
            auto = (t["auto_fired"] * n_out * b + dense_tokens * dense) / t["tokens"]
            auto_int8 = (t["auto_fired"] * n_out + t["auto_sparse_tokens"] * n_out * 4 + dense_tokens * dense) \
                / t["tokens"]
            out[name] = {"in_features": n_in, "out_features": n_out, "bytes_per_weight": b,
                         "density": t["fired"] / (t["tokens"] * n_in), "crossover": crossover,
                         "auto_sparse_fraction": t["auto_sparse_tokens"] / t["tokens"],
                         "dense_bytes_per_token": dense, "sparse_bytes_per_token": t["fired"] / t["tokens"] * n_out * b,
                         "auto_bytes_per_token": auto,
                         "int8_sparse_bytes_per_token": t["fired"] / t["tokens"] * n_out + n_out * 4,
                         "int8_auto_bytes_per_token": auto_int8}
        return out

    def mean_density(self) -> float:
        """Fired inputs / inputs over all spike-fed linears (each weighted by its inputs per token)."""
        layers = self.layers().values()
        inputs = sum(r["in_features"] for r in layers)
        return sum(r["density"] * r["in_features"] for r in layers) / inputs if inputs else 0.0

    def report(self) -> dict:
        layers = self.layers()
        total = {k: sum(r[k] for r in layers.values())
                 for k in ("dense_bytes_per_token", "sparse_bytes_per_token", "auto_bytes_per_token",
                           "int8_sparse_bytes_per_token", "int8_auto_bytes_per_token")}
        # density weighted by weights (what the bytes follow) as well as by inputs
        weights = sum(r["in_features"] * r["out_features"] for r in layers.values())
        by_weight = sum(r["density"] * r["in_features"] * r["out_features"] for r in layers.values()) / weights \
            if weights else 0.0
        return {"mean_density": self.mean_density(), "weight_weighted_density": by_weight,
                "total": {**total, "dense_over_sparse": total["dense_bytes_per_token"] / total["sparse_bytes_per_token"]
                          if total["sparse_bytes_per_token"] else None},
                "layers": layers}


@torch.inference_mode()
def sparsity_analysis(model, input_ids: torch.Tensor) -> dict:
    """One parallel forward of input_ids [B, T]: per spike-fed linear, the input density and the bytes of weights
    a one-token decoding step reads dense, sparse and in "auto" mode (see the module doc)."""
    model.eval()
    with SpikeDensityMonitor(model) as monitor:
        model(input_ids.to(next(model.parameters()).device), use_cache=False)
    return {"tokens": int(input_ids.numel()), **monitor.report()}
