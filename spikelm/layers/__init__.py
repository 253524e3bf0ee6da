"""Spiking blocks built on the neurons: the spiking SSM block and the spiking Transformer block."""
from .context import SequenceContext
from .mlp import SpikingMLP
from .neuron_layer import NeuronLayer
from .norm import RMSNorm
from .op_counts import OpCount
from .rotary import rotary_embedding
from .spiking_attention import SpikingAttentionBlock, windowed_causal_attention
from .spiking_ssm import SpikingSSMBlock

__all__ = ["NeuronLayer", "OpCount", "RMSNorm", "SequenceContext", "SpikingAttentionBlock", "SpikingMLP", "SpikingSSMBlock",
           "rotary_embedding", "windowed_causal_attention"]
