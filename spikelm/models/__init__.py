"""The Hugging Face model: config, cache, SpikeLMModel and SpikeLMForCausalLM (registered with the Auto classes)."""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import SpikeLMCache
from .configuration_spikelm import BLOCK_TYPES, SpikeLMConfig, default_block_types
from .model_card import model_card
from .modeling_spikelm import CACHE_NAME, SpikeLMForCausalLM, SpikeLMModel, SpikeLMPreTrainedModel

AutoConfig.register("spikelm", SpikeLMConfig, exist_ok=True)
AutoModel.register(SpikeLMConfig, SpikeLMModel, exist_ok=True)
AutoModelForCausalLM.register(SpikeLMConfig, SpikeLMForCausalLM, exist_ok=True)

__all__ = ["BLOCK_TYPES", "CACHE_NAME", "SpikeLMCache", "SpikeLMConfig", "SpikeLMForCausalLM", "SpikeLMModel",
           "SpikeLMPreTrainedModel", "default_block_types", "model_card"]
