"""Spiking neurons: the DSN and the baselines it is compared against."""
from .baselines import LIF, PSN, SlidingPSN, SlidingPSNState
from .dsn import DECAY_INIT_RANGE, DSN, DSNState, LOG_DECAY_FLOOR
from .spike import SPIKE_MODES, SURROGATES, quantize_spikes, unfold_spikes

__all__ = ["DECAY_INIT_RANGE", "DSN", "DSNState", "LIF", "LOG_DECAY_FLOOR", "PSN", "SPIKE_MODES", "SURROGATES", "SlidingPSN",
           "SlidingPSNState", "quantize_spikes", "unfold_spikes"]

NEURON_TYPES = ("dsn", "lif", "psn", "sliding_psn")


def build_neuron(neuron_type: str, channels: int, *, kernel_size: int = 4, tau: float = 0.25, max_spike: int = 4,
                 spike_mode: str = "integer", surrogate: str = "rect", surrogate_alpha: float = 2.0,
                 decay_init_range: tuple[float, float] = DECAY_INIT_RANGE,
                 psn_T: int = 2048, sliding_psn_k: int = 4,
                 lif_beta: float = 0.5, lif_reset: str = "hard", backend: str = "auto"):
    """One neuron layer by name, so a model swaps neurons by config.

    The spike settings (max_spike, spike_mode, surrogate, surrogate_alpha) are the DSN's; the baselines fire binary
    spikes with their standard arctan surrogate.
    """
    if neuron_type == "dsn":
        return DSN(channels, kernel_size=kernel_size, tau=tau, max_spike=max_spike, spike_mode=spike_mode,
                   surrogate=surrogate, surrogate_alpha=surrogate_alpha, decay_init_range=decay_init_range,
                   backend=backend)
    if neuron_type == "lif":
        return LIF(channels, beta=lif_beta, reset=lif_reset, surrogate="atan")
    if neuron_type == "psn":
        return PSN(channels, T=psn_T, surrogate="atan")
    if neuron_type == "sliding_psn":
        return SlidingPSN(channels, k=sliding_psn_k, surrogate="atan")
    raise ValueError(f"neuron_type must be one of {NEURON_TYPES}, got {neuron_type!r}")


__all__ += ["NEURON_TYPES", "build_neuron"]
