"""Llama references of a SpikeLM's parameter count (transformers' LlamaForCausalLM), for quality and speed.

Two shapes, both with SpikeLM's hidden size, vocabulary and tied embeddings, and matched to its
parameter count (within 1% where the widths allow, always within 5%):
  standard    the usual proportions: SwiGLU MLP ~8/3 x hidden, as many layers as the count allows
              (the MLP width then takes up the remainder)
  same_depth  SpikeLM's number of layers, the MLP widened to take the remaining parameters
Heads: head dim 32 up to hidden 256, else 64.

Masking: train.py's blocks carry position_ids that restart at every document start. transformers'
Llama (5.17 and later) turns such position_ids, with no attention_mask and no cache, into a
block-diagonal causal mask (masking_utils.find_packed_sequence_indices), so it never attends across
a document boundary the data marks; tests/test_quality.py checks it against separate forwards.
"""
from __future__ import annotations

import torch

SHAPES = ("standard", "same_depth")


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied embedding counted once


def spikelm_parameters(config) -> int:
    """Parameters of the SpikeLMForCausalLM a SpikeLMConfig builds (on the meta device: no memory)."""
    from spikelm.models import SpikeLMForCausalLM

    with torch.device("meta"):
        return n_params(SpikeLMForCausalLM(config))


def _heads(hidden: int) -> int:
    head_dim = 32 if hidden <= 256 else 64
    if hidden % head_dim:
        raise ValueError(f"hidden_size {hidden} is not a multiple of the head dim {head_dim}")
    return hidden // head_dim


def llama_config(vocab_size: int, hidden: int, layers: int, intermediate: int, max_positions: int = 16384,
                 eos_token_id=None, bos_token_id=None, pad_token_id=None):
    from transformers import LlamaConfig

    heads = _heads(hidden)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, intermediate_size=intermediate,
                       max_position_embeddings=max_positions, tie_word_embeddings=True, attn_implementation="sdpa",
                       eos_token_id=eos_token_id, bos_token_id=bos_token_id, pad_token_id=pad_token_id)


def llama_parameters(vocab_size: int, hidden: int, layers: int, intermediate: int) -> int:
    """Exact count of a tied-embedding Llama: embedding + per layer (attention, SwiGLU, two norms) + final norm."""
    return vocab_size * hidden + layers * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) + hidden


def matched_llama_config(target: int, vocab_size: int, hidden: int, shape: str, spikelm_layers: int,
                         max_positions: int = 16384, **token_ids):
    """A LlamaConfig of `shape` whose parameter count is nearest `target` (the MLP width a multiple of 8)."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    standard = int(hidden * 8 / 3) // 8 * 8
    if shape == "standard":
        layers = min(range(1, 129), key=lambda n: abs(llama_parameters(vocab_size, hidden, n, standard) - target))
    else:
        layers = spikelm_layers
    rest = target - llama_parameters(vocab_size, hidden, layers, 0)
    intermediate = max(8, int(round(rest / (3 * hidden * layers) / 8)) * 8)
    got = llama_parameters(vocab_size, hidden, layers, intermediate)
    if abs(got - target) > 0.05 * target:
        raise ValueError(f"no {shape} Llama of hidden {hidden} comes within 5% of {target} parameters "
                         f"(nearest: {got} with {layers} layers, MLP {intermediate})")
    return llama_config(vocab_size, hidden, layers, intermediate, max_positions, **token_ids)


def matched_llama(spikelm_config, shape: str, max_positions: int = 16384):
    """(LlamaForCausalLM, its parameter count, the SpikeLM's) for a SpikeLMConfig."""
    from transformers import LlamaForCausalLM

    target = spikelm_parameters(spikelm_config)
    cfg = matched_llama_config(target, spikelm_config.vocab_size, spikelm_config.hidden_size, shape,
                               spikelm_config.num_hidden_layers, max_positions,
                               eos_token_id=spikelm_config.eos_token_id, bos_token_id=spikelm_config.bos_token_id,
                               pad_token_id=spikelm_config.pad_token_id)
    model = LlamaForCausalLM(cfg)
    return model, n_params(model), target
