"""The plain loop train.py is checked against: random windows of one token stream, nothing else.

    python benchmarks/train_plain.py --config configs/tiny.yaml --result benchmarks/results/quality_v2/plain.json
    python benchmarks/train_plain.py --model llama_standard --config configs/tiny.yaml --result ...

Takes train.py's flags (and config file) and reads from them what a plain loop needs: the data
(loaded, split into documents, and tokenised by train.py's own code, with the BPE train.py trains),
the model (a SpikeLM of the model keys; or a Llama of its parameter count, benchmarks/fair_llama.py),
block_size, per_device_train_batch_size, max_steps, the AdamW settings, warmup + schedule, clipping and
the seed. The training documents are joined into one stream (EOS after each) and every step trains on
per_device_train_batch_size windows of block_size tokens starting anywhere in it (seeded), with no
position_ids and no document resets. Validation is train.py's own (spikelm.training.trainer.evaluate on
the same validation blocks), so the two loops' losses compare directly. Writes --result (JSON).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODELS = ("spikelm", "llama_standard", "llama_same_depth")


def _pop(argv: list[str], name: str, default):
    out, value, i = [], default, 0
    while i < len(argv):
        if argv[i] == f"--{name}" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        else:
            out.append(argv[i])
            i += 1
    return out, value


def token_stream(tokenized, eos: int) -> torch.Tensor:
    parts = [torch.tensor(list(ids) + [eos], dtype=torch.long) for ids in tokenized["input_ids"] if len(ids)]
    return torch.cat(parts)


def main(argv=None) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    import spikelm.training.trainer as trainer
    from fair_llama import matched_llama, n_params
    from spikelm.data import tokenize_dataset
    from spikelm.models import SpikeLMConfig, SpikeLMForCausalLM
    from spikelm.training import parse_args
    from spikelm.training.loop import build_optimizer

    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/train_plain.py " + " ".join(argv)
    argv, model_name = _pop(argv, "model", "spikelm")
    argv, result_path = _pop(argv, "result", None)
    if model_name not in MODELS:
        raise SystemExit(f"train_plain.py: --model must be one of {MODELS}, got {model_name!r}")
    if not any(a == "--output_dir" for a in argv):
        argv += ["--output_dir", "unused"]  # train.py requires it; nothing is written here
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    accelerator = Accelerator(mixed_precision="no")
    set_seed(args.seed)
    raw = trainer.build_data(args, accelerator)
    tok = trainer.build_tokenizer(args, raw["train"], None)
    config = SpikeLMConfig(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                           pad_token_id=tok.pad_token_id, **args.model)
    if model_name == "spikelm":
        model = SpikeLMForCausalLM(config)
        n_spikelm = n_params(model)
    else:
        model, _, n_spikelm = matched_llama(config, model_name.split("_", 1)[1], max(16384, args.block_size))
    # train.py's validation blocks (its packing needs a training split too: the validation one stands in)
    _, eval_blocks = trainer.pack_splits(args, {"train": raw["validation"], "validation": raw["validation"]}, tok,
                                         accelerator)
    stream = token_stream(tokenize_dataset(raw["train"], tok, args.text_column), tok.eos_token_id)
    T, B = args.block_size, args.per_device_train_batch_size * args.gradient_accumulation_steps
    opt, sched = build_optimizer(model, args, args.max_steps)  # train.py's groups and schedule
    g = torch.Generator().manual_seed(args.seed)
    print(f"{model_name}: {n_params(model) / 1e6:.3f}M parameters (SpikeLM {n_spikelm / 1e6:.3f}M) | stream of "
          f"{stream.numel()} tokens | {args.max_steps} steps of {B} x {T}", flush=True)
    model.train()
    curve, t0, load0 = [], time.perf_counter(), os.getloadavg()
    for step in range(args.max_steps):
        starts = torch.randint(0, stream.numel() - T + 1, (B,), generator=g)
        x = stream[starts[:, None] + torch.arange(T)]
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        curve.append(float(loss))
        if (step + 1) % args.logging_steps == 0 or step + 1 == args.max_steps:
            print(f"step {step + 1}/{args.max_steps} loss {sum(curve[-args.logging_steps:]) / len(curve[-args.logging_steps:]):.4f} "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    train_s, load1 = time.perf_counter() - t0, os.getloadavg()
    final = trainer.evaluate(model, eval_blocks, args, accelerator)
    print(f"final eval: loss {final['loss']:.4f} perplexity {final['perplexity']:.2f} ({train_s:.0f}s of training)")
    result = {"model": model_name, "parameters": n_params(model), "spikelm_parameters": n_spikelm,
              "final_eval": final, "train_seconds": train_s, "loadavg_before": load0, "loadavg_after": load1,
              "train_tokens": args.max_steps * B * T, "stream_tokens": stream.numel(), "curve": curve,
              "settings": json.loads(json.dumps(args.to_dict(), default=str)), "command": command,
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "python": platform.python_version()},
              "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "model_config": model.config.to_dict()}
    if result_path:
        Path(result_path).parent.mkdir(parents=True, exist_ok=True)
        Path(result_path).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
