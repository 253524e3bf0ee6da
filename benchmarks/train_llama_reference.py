"""A Llama reference through train.py's own pipeline: same data, tokenizer, blocks, order, schedule and eval.

    python benchmarks/train_llama_reference.py --config configs/tiny.yaml --output_dir runs/tiny-llama
    python benchmarks/train_llama_reference.py --llama_shape same_depth --config configs/tiny.yaml ...

Every train.py flag works, and the model flags describe the SpikeLM the Llama stands in for: the
Llama (benchmarks/fair_llama.py) has that SpikeLM's parameter count (within 5%), hidden size and
vocabulary, in the `--llama_shape` given: `standard` (default; MLP ~8/3 x hidden, depth matched) or
`same_depth` (SpikeLM's depth, MLP widened). It reads the same blocks with the same position_ids, so
its attention stops at every document boundary the data marks and nowhere else. Both parameter
counts are printed and written to output_dir/reference.json. The trainer is train.py's, with its
model builder swapped (spikelm.training.trainer.build_model); sampling is skipped.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _pop_flag(argv: list[str], name: str, default: str) -> tuple[list[str], str]:
    out, value, i = [], default, 0
    while i < len(argv):
        a = argv[i]
        if a == f"--{name}" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif a.startswith(f"--{name}="):
            value, i = a.split("=", 1)[1], i + 1
        else:
            out.append(a)
            i += 1
    return out, value


def main(argv=None) -> dict:
    from transformers import LlamaForCausalLM

    import spikelm.training.trainer as trainer
    from fair_llama import SHAPES, matched_llama
    from spikelm.models import SpikeLMConfig
    from spikelm.training import parse_args

    argv, shape = _pop_flag(list(sys.argv[1:] if argv is None else argv), "llama_shape", "standard")
    if shape not in SHAPES:
        raise SystemExit(f"train_llama_reference.py: --llama_shape must be one of {SHAPES}, got {shape!r}")
    args = parse_args(argv)
    info = {}

    def build_llama(args, tokenizer, resume_ckpt):
        if resume_ckpt is not None:
            return LlamaForCausalLM.from_pretrained(resume_ckpt)
        spikelm = SpikeLMConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, **args.model)
        model, n_llama, n_spikelm = matched_llama(spikelm, shape, max_positions=max(16384, args.block_size))
        c = model.config
        info.update(shape=shape, llama_parameters=n_llama, spikelm_parameters=n_spikelm,
                    llama_over_spikelm=n_llama / n_spikelm, layers=c.num_hidden_layers, hidden=c.hidden_size,
                    intermediate=c.intermediate_size, heads=c.num_attention_heads)
        print(f"Llama ({shape}): {n_llama / 1e6:.3f}M parameters = {n_llama / n_spikelm:.3f} x the SpikeLM's "
              f"{n_spikelm / 1e6:.3f}M | {c.num_hidden_layers} layers, hidden {c.hidden_size}, MLP "
              f"{c.intermediate_size}, {c.num_attention_heads} heads", flush=True)
        return model

    args.sample_prompt = ""  # sampling goes through SpikeLM's streaming API
    trainer.build_model = build_llama
    summary = trainer.train(args)
    summary["reference"] = info
    if info:
        (Path(args.output_dir) / "reference.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


if __name__ == "__main__":
    main()
