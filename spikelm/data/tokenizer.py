"""A byte-level BPE tokenizer trained locally (no hub), wrapped for transformers."""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

# The chat format of SpikeLM tokenizers (and serve.py's format for a tokenizer without a chat template):
# each message is its capitalised role, a colon and a newline, its content, then the EOS token; the
# generation prompt is the assistant's header, so a reply ends where the model emits EOS.
#     System:\nBe brief.<|endoftext|>User:\nHello<|endoftext|>Assistant:\n
# Each message renders on its own (nothing depends on the messages around it), so the rendering of a
# conversation starts with the rendering of every earlier part of it: a server can resume a saved state.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] | capitalize }}:\n{{ message['content'] }}{{ eos_token if eos_token else '\n\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:\\n' }}{%- endif -%}"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of at most vocab_size tokens on texts; EOS separates documents, PAD pads.
    The tokenizer carries CHAT_TEMPLATE as its chat template (saved with it by save_pretrained).

    Byte-level means every string encodes (no unknown token): the 256 byte symbols are always in
    the vocabulary, so vocab_size must be at least 258.
    """
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 for a byte-level BPE (256 bytes + EOS + PAD), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                  pad_token=PAD_TOKEN, padding_side="left")
    out.chat_template = CHAT_TEMPLATE
    return out
