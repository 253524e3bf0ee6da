"""Spiking blocks built on the neurons: the spiking SSM block and the spiking Transformer block."""
from .context import SequenceContext
from .mlp import SpikingMLP
from .neuron_layer import NeuronLayer
from .norm import RMSNorm
from .op_counts import OpCount
from .rotary import rotary_embedding
from .spike_linear import SPARSE_MODES, SpikeLinear, set_sparse_mode, set_sparse_training, sparse_mode_as
from .spiking_attention import SpikingAttentionBlock, windowed_causal_attention
from .spiking_ssm import SpikingSSMBlock

__all__ = ["NeuronLayer", "OpCount", "RMSNorm", "SPARSE_MODES", "SequenceContext", "SpikeLinear",
           "SpikingAttentionBlock", "SpikingMLP", "SpikingSSMBlock", "rotary_embedding", "set_sparse_mode",
           "set_sparse_training", "sparse_mode_as", "windowed_causal_attention"]
