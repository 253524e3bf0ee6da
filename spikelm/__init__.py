"""SpikeLM: language models on the dynamic decay spiking neuron (DSN)."""
__version__ = "0.1.0"

from . import neurons, ops  # noqa: E402

__all__ = ["neurons", "ops", "__version__"]
