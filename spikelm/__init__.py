"""SpikeLM: language models on the dynamic decay spiking neuron (DSN).

`import spikelm` registers SpikeLMConfig, SpikeLMModel and SpikeLMForCausalLM with transformers'
AutoConfig, AutoModel and AutoModelForCausalLM.
"""
__version__ = "0.1.0"

from . import neurons, ops  # noqa: E402
from .models import SpikeLMCache, SpikeLMConfig, SpikeLMForCausalLM, SpikeLMModel  # noqa: E402
from .models.streaming import StreamingGenerator  # noqa: E402

__all__ = ["SpikeLMCache", "SpikeLMConfig", "SpikeLMForCausalLM", "SpikeLMModel", "StreamingGenerator", "neurons", "ops", "__version__"]
