"""Spiking analysis: firing rates, spikes per token, synaptic-operation energy, and the unfolding check.

Energy model (Yao et al., Spike-driven Transformer, 2023; docs/energy.md): a multiply-accumulate
(MAC) costs 4.6 pJ and an accumulate (AC) 0.9 pJ (45 nm), both configurable. Counted per token by
forward hooks on one run of the model (no change to the model), from what each module declares
about itself (spikelm.layers.op_counts):

- nn.Linear (any subclass) fed by spikes (every input value an integer >= 0, checked at run time):
  an integer spike n on an input is n binary events, each adding one weight column: sum(input
  spikes) x out_features ACs (+ out_features ACs for a bias). A Linear fed by anything else: dense
  MACs. In the non-spiking network: tokens x in_features x out_features MACs.
- every other module with arithmetic declares `op_counts(inputs)`: its own operations per call by
  category, in the spiking network and the dense one. NeuronLayer: its norm (2 MACs per element) and
  its neuron, which declares `macs_per_element_step(positions)` (DSN k + 4, LIF 3, sliding PSN k,
  PSN t + 1 taps up to T); the blocks: attention, RoPE, the SSM gate, residual additions.
- containers and the embedding lookup have no arithmetic; the softmax over the vocabulary
  (sampling) is not counted. A module that is none of these is an error when the counter starts.
Memory traffic is not modelled (the 45 nm estimate counts arithmetic only), and the non-spiking
network is "the same graph with dense Linear layers", not a separately trained ANN.
"""
from __future__ import annotations

import contextlib
import math
import re
import types
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import NeuronLayer, OpCount
from ..neurons import unfold_spikes
from .firing import FiringRateMonitor

MAC_PJ = 4.6
AC_PJ = 0.9


def _is_spike_tensor(x: torch.Tensor) -> bool:
    """Every value an integer >= 0 (a spike count)."""
    if not x.is_floating_point():
        return False
    return bool((x >= 0).all()) and bool(torch.equal(x, torch.round(x)))


def _layer_key(name: str) -> str:
    """'model.layers.3.mlp.fc1' -> 'layers.3'; outside the blocks: the module's own name."""
    m = re.search(r"layers\.(\d+)", name)
    return f"layers.{m.group(1)}" if m else name.replace("model.", "", 1)


def _group_key(name: str, block_types: list[str]) -> str:
    """Neuron group: the role inside a block, over all blocks of one type ('ssm.mlp.hidden_spikes')."""
    m = re.search(r"layers\.(\d+)\.(.*)", name)
    if not m:
        return name.replace("model.", "", 1)
    return f"{block_types[int(m.group(1))]}.{m.group(2)}"


# modules with no arithmetic of their own: containers, and the embedding (a table lookup)
NO_ARITHMETIC = (nn.ModuleList, nn.ModuleDict, nn.Sequential, nn.ParameterList, nn.ParameterDict, nn.Identity,
                 nn.Dropout, nn.Embedding)


def counted_by_their_layer(model: nn.Module) -> set[int]:
    """ids of the modules a NeuronLayer counts in its own op_counts: its norm and its neuron."""
    layers = [m for m in model.modules() if isinstance(m, NeuronLayer)]
    return {id(m.neuron) for m in layers} | {id(m.norm) for m in layers if m.norm is not None}


def undeclared_modules(model: nn.Module) -> list[str]:
    """The modules whose operations the counter would not know: neither a Linear, nor declaring op_counts, nor a
    neuron run by a NeuronLayer (declaring macs_per_element_step), nor free of arithmetic."""
    run_by_layer = counted_by_their_layer(model)
    missing = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, *NO_ARITHMETIC)) or callable(getattr(module, "op_counts", None)):
            continue
        if id(module) in run_by_layer and callable(getattr(module, "macs_per_element_step", None)):
            continue
        missing.append(f"{name or '(the model)'} ({type(module).__name__})")
    return missing


class EnergyCounter:
    """Counts MACs and ACs of a SpikeLM model run (spiking and as a non-spiking network) while active.

        with EnergyCounter(model) as counter:
            model(input_ids)
        report = counter.report(tokens=input_ids.numel())
    """

    def __init__(self, model: nn.Module, mac_pj: float = MAC_PJ, ac_pj: float = AC_PJ):
        if not (mac_pj > 0 and ac_pj > 0 and math.isfinite(mac_pj) and math.isfinite(ac_pj)):
            raise ValueError(f"mac_pj and ac_pj must be finite numbers > 0, got {mac_pj!r}, {ac_pj!r}")
        self.model = model
        self.mac_pj, self.ac_pj = float(mac_pj), float(ac_pj)
        self._handles = []
        self.spike_fed: dict[str, bool] = {}
        # counts[network][layer][category] = {"mac": n, "ac": n}
        self.counts = {net: defaultdict(lambda: defaultdict(lambda: {"mac": 0.0, "ac": 0.0}))
                       for net in ("spiking", "dense")}

    def _add(self, layer: str, category: str, count: OpCount) -> None:
        s = self.counts["spiking"][layer][category]
        s["mac"] += count.mac
        s["ac"] += count.ac
        d = self.counts["dense"][layer][category]
        d["mac"] += count.mac if count.dense_mac is None else count.dense_mac
        d["ac"] += count.ac if count.dense_ac is None else count.dense_ac

    # -- hooks ---------------------------------------------------------------------------------
    def _linear_hook(self, name):
        def hook(module: nn.Linear, args, output):
            x = args[0].detach()
            tokens = x.numel() / module.in_features
            dense = tokens * module.in_features * module.out_features
            bias = tokens * module.out_features if module.bias is not None else 0.0
            spiking = _is_spike_tensor(x)
            self.spike_fed[name] = self.spike_fed.get(name, True) and spiking
            if spiking:
                count = OpCount(ac=float(x.double().sum()) * module.out_features + bias, dense_mac=dense, dense_ac=bias)
            else:
                count = OpCount(mac=dense, ac=bias)
            self._add(_layer_key(name), "linear", count)
        return hook

    def _declared_hook(self, name):
        def hook(module: nn.Module, args, output):
            layer = _layer_key(name)
            for category, count in module.op_counts(args).items():
                self._add(layer, category, count)
        return hook

    def __enter__(self) -> "EnergyCounter":
        missing = undeclared_modules(self.model)
        if missing:
            raise TypeError("EnergyCounter: these modules declare no operation counts, so their energy would be "
                            f"miscounted: {', '.join(missing)}. Give each an op_counts(inputs) method (return {{}} "
                            "when it has no arithmetic of its own; spikelm/layers/op_counts.py), and each neuron a "
                            "macs_per_element_step(positions) method")
        counted = counted_by_their_layer(self.model)
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear):
                self._handles.append(module.register_forward_hook(self._linear_hook(name)))
            elif callable(getattr(module, "op_counts", None)) and id(module) not in counted:
                self._handles.append(module.register_forward_hook(self._declared_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- results -------------------------------------------------------------------------------
    def _pj(self, c: dict) -> float:
        return c["mac"] * self.mac_pj + c["ac"] * self.ac_pj

    def report(self, tokens: int) -> dict:
        """Per-token MACs, ACs and energy (pJ) per network, per layer and per category."""
        if tokens < 1:
            raise ValueError("tokens must be >= 1")
        out = {"mac_pj": self.mac_pj, "ac_pj": self.ac_pj, "tokens": tokens, "networks": {},
               "spike_fed_linears": sorted(k for k, v in self.spike_fed.items() if v),
               "dense_fed_linears": sorted(k for k, v in self.spike_fed.items() if not v)}
        for net, layers in self.counts.items():
            by_layer, by_cat = {}, defaultdict(lambda: {"mac": 0.0, "ac": 0.0})
            total = {"mac": 0.0, "ac": 0.0}
            for layer, cats in layers.items():
                lt = {"mac": 0.0, "ac": 0.0}
                for cat, c in cats.items():
                    for k in ("mac", "ac"):
                        lt[k] += c[k]
                        by_cat[cat][k] += c[k]
                        total[k] += c[k]
                by_layer[layer] = {"mac_per_token": lt["mac"] / tokens, "ac_per_token": lt["ac"] / tokens,
                                   "energy_pj_per_token": self._pj(lt) / tokens}
            out["networks"][net] = {
                "mac_per_token": total["mac"] / tokens, "ac_per_token": total["ac"] / tokens,
                "energy_pj_per_token": self._pj(total) / tokens,
                "energy_mj_total": self._pj(total) * 1e-9,
                "by_layer": by_layer,
                "by_category": {cat: {"mac_per_token": c["mac"] / tokens, "ac_per_token": c["ac"] / tokens,
                                      "energy_pj_per_token": self._pj(c) / tokens} for cat, c in by_cat.items()}}
        s, d = out["networks"]["spiking"]["energy_pj_per_token"], out["networks"]["dense"]["energy_pj_per_token"]
        out["dense_over_spiking"] = d / s if s else None
        return out


def firing_report(monitor: FiringRateMonitor, block_types: list[str], tokens: int) -> dict:
    """Firing rate per layer (as FiringRateMonitor) and per neuron group, plus spikes per token."""
    layers = monitor.layer_rates()
    groups = defaultdict(lambda: {"spikes": 0.0, "nonzero_frac_x_el": 0.0, "elements": 0, "rate_x_el": 0.0})
    for name, r in layers.items():
        g = groups[_group_key(name, block_types)]
        g["spikes"] += r["spikes"]
        g["elements"] += r["elements"]
        g["rate_x_el"] += r["rate"] * r["elements"]
        g["nonzero_frac_x_el"] += r["nonzero"] * r["elements"]
    group_out = {k: {"rate": g["rate_x_el"] / g["elements"], "nonzero": g["nonzero_frac_x_el"] / g["elements"],
                     "spikes_per_token": g["spikes"] / tokens} for k, g in groups.items() if g["elements"]}
    total_spikes = sum(r["spikes"] for r in layers.values())
    per_layer = {name: {**r, "spikes_per_token": r["spikes"] / tokens} for name, r in layers.items()}
    return {"mean_rate": monitor.mean_rate(), "spikes_per_token": total_spikes / tokens,
            "binary_events_per_token": total_spikes / tokens,  # an integer spike n = n binary events
            "layers": per_layer, "groups": group_out}


@torch.inference_mode()
def spiking_analysis(model, input_ids: torch.Tensor, mac_pj: float = MAC_PJ, ac_pj: float = AC_PJ) -> dict:
    """One parallel forward of input_ids [B, T]: firing rates, spikes per token, energy (spiking vs dense)."""
    model.eval()
    tokens = int(input_ids.numel())
    with FiringRateMonitor(model) as monitor, EnergyCounter(model, mac_pj, ac_pj) as counter:
        model(input_ids.to(next(model.parameters()).device), use_cache=False)
    firing = firing_report(monitor, list(model.config.block_types), tokens)
    energy = counter.report(tokens)
    return {"tokens": tokens, "firing": firing, "energy": energy,
            "config": {"neuron_type": model.config.neuron_type, "max_spike": model.config.max_spike,
                       "spike_mode": model.config.spike_mode, "block_types": list(model.config.block_types),
                       "hidden_size": model.config.hidden_size, "vocab_size": model.config.vocab_size}}


# -- deployment check: integer spikes unfolded into binary sub-steps -------------------------------
@contextlib.contextmanager
def unfolded_spikes(model: nn.Module, max_spike: int | None = None):
    """Inside, every Linear fed by spikes computes sum_j W @ unfold_spikes(s, M)[j] (+ bias once): M binary
    sub-steps whose spikes sum to s, as spike-only hardware would run it. M is the neurons' N, or the
    largest count the Linear reads where that is more (an integer SSM gate's product of two spike counts
    reaches N^2). Yields a dict of counters ('unfolded_calls', 'dense_calls'; 'substeps': N,
    'max_substeps': the largest M used). Linears fed by non-spike values run unchanged."""
    N = max_spike if max_spike is not None else int(getattr(model.config, "max_spike", 1))
    stats = {"unfolded_calls": 0, "dense_calls": 0, "substeps": N, "max_substeps": 0}
    patched = []

    def forward(self, x):
        if _is_spike_tensor(x):
            stats["unfolded_calls"] += 1
            m = max(N, int(x.max()) if x.numel() else 0)
            stats["max_substeps"] = max(stats["max_substeps"], m)
            out = None
            for sub in unfold_spikes(x, m):  # sub-step j: the binary events "spike > j"
                y = F.linear(sub, self.weight)
                out = y if out is None else out + y
            return out if self.bias is None else out + self.bias
        stats["dense_calls"] += 1
        return F.linear(x, self.weight, self.bias)

    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.forward = types.MethodType(forward, module)
            patched.append(module)
    try:
        yield stats
    finally:
        for module in patched:
            del module.forward


@torch.inference_mode()
def unfolding_check(model, input_ids: torch.Tensor) -> dict:
    """Logits of the model as is vs with every spike-fed Linear run as N binary sub-steps."""
    model.eval()
    ids = input_ids.to(next(model.parameters()).device)
    ref = model(ids, use_cache=False).logits.float()
    with unfolded_spikes(model) as stats:
        unf = model(ids, use_cache=False).logits.float()
    diff = (ref - unf).abs()
    return {"dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "tokens": int(ids.numel()),
            "max_abs_logit_diff": float(diff.max()), "max_abs_logit": float(ref.abs().max()),
            "argmax_agreement": float((ref.argmax(-1) == unf.argmax(-1)).double().mean()), **stats}
