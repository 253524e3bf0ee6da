"""Spiking neurons: the DSN and the baselines it is compared against."""
from .baselines import LIF, PSN, SlidingPSN, SlidingPSNState
from .dsn import DSN, DSNState, LOG_DECAY_FLOOR
from .spike import SPIKE_MODES, SURROGATES, quantize_spikes, unfold_spikes

__all__ = ["DSN", "DSNState", "LIF", "LOG_DECAY_FLOOR", "PSN", "SPIKE_MODES", "SURROGATES", "SlidingPSN",
           "SlidingPSNState", "quantize_spikes", "unfold_spikes"]
