"""Evaluation: firing rates, energy estimates, perplexity (by position, parallel and streaming)."""
from .energy import AC_PJ, MAC_PJ, EnergyCounter, firing_report, spiking_analysis, unfolded_spikes, unfolding_check
from .firing import FiringRateMonitor
from .perplexity import evaluate_by_position, perplexity, perplexity_by_bucket, split_windows, token_nll

__all__ = ["AC_PJ", "EnergyCounter", "FiringRateMonitor", "MAC_PJ", "evaluate_by_position", "firing_report",
           "perplexity", "perplexity_by_bucket", "spiking_analysis", "split_windows", "token_nll", "unfolded_spikes",
           "unfolding_check"]
