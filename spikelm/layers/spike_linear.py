"""SpikeLinear: an nn.Linear fed by integer spikes, which trains and decodes through spike-sparse ops where they pay.

Same parameters and state-dict keys as nn.Linear (a saved model loads unchanged). Prefill and anything
on a GPU use the dense F.linear; training on CPU runs ops.spike_matmul (below). In inference on CPU
with few rows (a decoding step), its `sparse_mode` picks the product:

- "off": dense F.linear always.
- "on": ops.spike_linear always (sparse, whatever the density).
- "auto" (default): ops.spike_linear with this layer's crossover density, so each call measures the
  density of its own input and runs sparse below the crossover, dense above (with the op's C++
  kernel; where only its slower torch kernel runs, "auto" is dense). The crossover comes
  from a cost model measured on this project's CPU (benchmarks/bench_spike_linear.py): dense costs
  DENSE_US + in x out x DENSE_NS_PER_WEIGHT, sparse SPARSE_US + fired x out x SPARSE_NS_PER_WEIGHT.
  A layer so small that the sparse call's fixed cost outweighs reading all its weights never takes
  the sparse path (and the op is then not even called).

`sparse_int8` (False by default) makes the sparse path read int8 weights with one scale per output
feature (ops.spike_linear's int8 layout); the dense path stays in the weights' own dtype.

SpikeLMForCausalLM.set_sparse_inference(mode) sets the mode of every SpikeLinear of a model.
sparse_mode_as(module, mode) sets it for a `with` block and restores each layer's own mode afterwards.

Training (a gradient to compute) on CPU runs ops.spike_matmul where `sparse_training` is True (the
default): the forward and the weight's gradient walk only the inputs that fired, where few enough did
(its MAX_DENSITY), and the dense products run otherwise; the results equal F.linear's up to float32
rounding. SpikeLMForCausalLM.set_sparse_training(False) makes training dense.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.spike_linear import c_kernel_runs, spike_linear
from ..ops.spike_matmul import spike_matmul

SPARSE_MODES = ("auto", "on", "off")
# "auto" takes the sparse path for at most this many rows (batch x tokens): decoding steps, not prefill
AUTO_MAX_ROWS = 16
# The cost model behind "auto": Theil-Sen fits of one-thread float32 batch-1 eager calls of the C++ kernel on this
# project's 2-core EPYC VM, weights in cache (benchmarks/bench_spike_linear.py, results/bench_spike_linear.json,
# "float32/hot/1", measured quiet). The sparse walk reads whole contiguous weight rows, so per weight read it costs
# less than the dense product: layers are sparse up to a high density once their dense product costs more than the
# sparse call's fixed cost, and the smallest layers, whose dense product costs less, never.
DENSE_US = 5.85
DENSE_NS_PER_WEIGHT = 0.133
SPARSE_US = 9.53
SPARSE_NS_PER_WEIGHT = 0.0974


def crossover_density(in_features: int, out_features: int) -> float:
    """The input density below which the sparse product beats the dense one for this shape (0: never)."""
    dense_us = DENSE_US + in_features * out_features * DENSE_NS_PER_WEIGHT * 1e-3
    return max(0.0, min(1.0, (dense_us - SPARSE_US) / (in_features * out_features * SPARSE_NS_PER_WEIGHT * 1e-3)))


def check_sparse_mode(mode) -> str:
    if mode not in SPARSE_MODES:
        raise ValueError(f"sparse inference mode must be one of {', '.join(map(repr, SPARSE_MODES))}, got {mode!r}")
    return mode


class SpikeLinear(nn.Linear):
    """nn.Linear whose input is integer spikes 0..N: the sparse op in CPU inference where it pays (see module doc)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.sparse_mode = "auto"
        self.sparse_int8 = False
        self.sparse_training = True
        self.crossover = crossover_density(in_features, out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparse_mode={self.sparse_mode}" + (", int8" if self.sparse_int8 else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.sparse_mode
        training = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if training:
            if self.sparse_training and x.device.type == "cpu":
                return spike_matmul(x, self.weight, self.bias)
        elif mode != "off" and x.device.type == "cpu":
            if mode == "on":
                return spike_linear(x, self.weight, self.bias, 1.0, self.sparse_int8)
            # the crossover is the C++ kernel's: where only the torch kernel runs, "auto" stays dense
            if self.crossover > 0 and x.numel() <= AUTO_MAX_ROWS * self.in_features and c_kernel_runs():
                return spike_linear(x, self.weight, self.bias, self.crossover, self.sparse_int8)
        return F.linear(x, self.weight, self.bias)


def _spike_linears(module: nn.Module) -> list[SpikeLinear]:
    return [m for m in module.modules() if isinstance(m, SpikeLinear)]


def _set_on_spike_linears(module: nn.Module, **attributes) -> int:
    """Set attributes on every SpikeLinear inside module; returns how many there are."""
    layers = _spike_linears(module)
    for m in layers:
        for name, value in attributes.items():
            setattr(m, name, value)
    return len(layers)


def set_sparse_training(module: nn.Module, enabled: bool) -> int:
    """Set sparse_training on every SpikeLinear inside module; returns how many there are."""
    if not isinstance(enabled, bool):
        raise ValueError(f"sparse training must be True or False, got {enabled!r}")
    return _set_on_spike_linears(module, sparse_training=enabled)


def set_sparse_mode(module: nn.Module, mode: str, int8: bool = False) -> int:
    """Set sparse_mode (and sparse_int8) on every SpikeLinear inside module; returns how many there are."""
    check_sparse_mode(mode)
    if not isinstance(int8, bool):
        raise ValueError(f"int8 must be True or False, got {int8!r}")
    return _set_on_spike_linears(module, sparse_mode=mode, sparse_int8=int8)


@contextlib.contextmanager
def sparse_mode_as(module: nn.Module, mode: str):
    """Every SpikeLinear inside module in `mode` for the duration of the block, each layer's own mode and int8 flag
    restored afterwards."""
    check_sparse_mode(mode)
    layers = _spike_linears(module)
    saved = [(m.sparse_mode, m.sparse_int8) for m in layers]
    try:
        for m in layers:
            m.sparse_mode = mode
        yield
    finally:
        for m, (was, int8) in zip(layers, saved):
            m.sparse_mode, m.sparse_int8 = was, int8
