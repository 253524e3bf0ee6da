"""Data: tokenizers, packing of documents into training blocks."""
from .tokenizer import EOS_TOKEN, PAD_TOKEN, train_bpe_tokenizer

__all__ = ["EOS_TOKEN", "PAD_TOKEN", "train_bpe_tokenizer"]
