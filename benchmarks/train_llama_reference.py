"""A Llama reference through train.py's own pipeline: same data, tokenizer, blocks, schedule and eval.

    python benchmarks/train_llama_reference.py --config configs/tiny.yaml --output_dir runs/tiny-llama

Every train.py flag works; only the model differs: transformers' LlamaForCausalLM with the config's
hidden_size and num_hidden_layers (4 heads, SwiGLU width 8/3 x hidden rounded to 8, tied
embeddings). Model keys that are SpikeLM-only are ignored. Used for benchmarks/results/tiny_ablation.md.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    import spikelm.training.trainer as trainer
    from spikelm.training import parse_args

    def build_llama(args, tokenizer, resume_ckpt):
        if resume_ckpt is not None:
            return LlamaForCausalLM.from_pretrained(resume_ckpt)
        hidden = args.model.get("hidden_size", 128)
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                          num_hidden_layers=args.model.get("num_hidden_layers", 4), num_attention_heads=4,
                          num_key_value_heads=4, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
                          max_position_embeddings=max(4096, args.block_size), tie_word_embeddings=True,
                          eos_token_id=tokenizer.eos_token_id)
        return LlamaForCausalLM(cfg)

    args = parse_args(argv)
    args.sample_prompt = ""  # sampling goes through SpikeLM's streaming API
    trainer.build_model = build_llama
    trainer.train(args)


if __name__ == "__main__":
    main()
