"""Spike functions live with the kernels (spikelm.ops.spike), which use them too; re-exported here."""
from ..ops.spike import SPIKE_MODES, SURROGATES, quantize_spikes, unfold_spikes

__all__ = ["SPIKE_MODES", "SURROGATES", "quantize_spikes", "unfold_spikes"]
