"""Data: tokenizers, loading local files or `datasets`, packing of documents into training blocks."""
from .loading import DataError, iter_texts, load_raw_datasets, resolve_data_files
from .packing import (BlockOrder, block_positions, evenly_spaced, iter_packed_blocks, pack_dataset,
                      pack_token_lists, tokenize_dataset)
from .tokenizer import CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, train_bpe_tokenizer

__all__ = ["BlockOrder", "CHAT_TEMPLATE", "DataError", "EOS_TOKEN", "PAD_TOKEN", "block_positions", "evenly_spaced",
           "iter_packed_blocks", "iter_texts", "load_raw_datasets", "pack_dataset", "pack_token_lists",
           "resolve_data_files", "tokenize_dataset", "train_bpe_tokenizer"]
