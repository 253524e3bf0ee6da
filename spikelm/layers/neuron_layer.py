"""norm -> spiking neuron: how every linear layer of a block gets its (integer spike) input."""
from __future__ import annotations

import torch
from torch import nn

from ..neurons import DSN, PSN, build_neuron
from .context import SequenceContext
from .norm import RMSNorm
from .op_counts import OpCount


# The residual stream reaches a neuron at RMS 2 (the norm's initial gain; SpikeLMConfig.neuron_input_scale):
# membranes then span the spike levels 1..N instead of rarely crossing the first threshold at 1/2.
NEURON_INPUT_SCALE = 2.0


class NeuronLayer(nn.Module):
    """(RMSNorm then) a spiking neuron over C channels: real values in, spikes 0..N out.

    normalize=True is for inputs read from the real-valued residual stream: the norm sets the scale
    the neuron's threshold sees. Inputs computed from spikes (a linear layer fed by spikes, an
    attention average of spike trains) go to the neuron unnormalised: their scale is set by the
    weights, and a per-token norm would divide a near-silent token (all spikes 0, as at the first
    tokens of a document, before membranes charge) by ~sqrt(eps), multiplying its gradient by
    1/sqrt(eps) at every such layer (measured: gradient norms of 1e3..1e6 that clipping turned into
    lost updates).
    Handles the token layout for every neuron type: left padding (inputs zeroed), packed
    documents (native for the DSN, one document at a time for the baselines) and carried state.
    """

    def __init__(self, channels: int, neuron_kwargs: dict, eps: float = 1e-5, normalize: bool = True):
        super().__init__()
        kwargs = dict(neuron_kwargs)
        input_scale = kwargs.pop("input_scale", NEURON_INPUT_SCALE)  # the norm's; the rest are the neuron's
        self.norm = RMSNorm(channels, eps, init_scale=input_scale) if normalize else None
        self.neuron = build_neuron(channels=channels, **kwargs)

    @property
    def max_spike(self) -> int:
        return self.neuron.max_spike

    @property
    def has_serial_state(self) -> bool:
        return not isinstance(self.neuron, PSN)

    def op_counts(self, inputs) -> dict[str, OpCount]:
        """Energy accounting: 2 MACs per input element for the norm in front of the neuron (the energy model
        counts it for every neuron layer), and the neuron's MACs per channel and step at the steps' positions."""
        x, ctx = inputs[0], inputs[1]
        per_step = torch.as_tensor(self.neuron.macs_per_element_step(ctx.positions), dtype=torch.float64)
        neuron = float(per_step.expand(ctx.positions.shape).sum()) * x.shape[-1]
        return {"norm": OpCount(mac=2.0 * x.numel()), "neuron": OpCount(mac=neuron)}

    def forward(self, x: torch.Tensor, ctx: SequenceContext, state=None, return_state: bool = False):
        spikes, new_state = self._run(ctx.mask_input(self.norm(x) if self.norm is not None else x), ctx, state,
                                      return_state)
        ctx.record_spikes(spikes)
        return spikes, new_state

    def _run(self, u: torch.Tensor, ctx: SequenceContext, state, return_state: bool):
        if ctx.cu_seqlens is not None:
            return self._packed(u, ctx.cu_seqlens), None
        if isinstance(self.neuron, PSN):
            return self.neuron(u), None
        if return_state or state is not None:
            if u.shape[1] == 1:  # decoding: the serial form, O(1) work per token
                s, new_state = self.neuron.step(u[:, 0], state)
                return s.unsqueeze(1), new_state
            return self.neuron(u, state, return_state=True)
        return self.neuron(u), None

    def _packed(self, u: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        if isinstance(self.neuron, DSN):
            return self.neuron(u, cu_seqlens=cu_seqlens)
        cu = cu_seqlens.tolist()
        parts = [self.neuron(u[:, s:e]) for s, e in zip(cu, cu[1:]) if e > s]
        return torch.cat(parts, dim=1)
