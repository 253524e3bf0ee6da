"""One training step of a SpikeLM, sparse and dense, against its two equal-parameter Llamas, in one process.

A step is forward, backward and the AdamW update (train.py's optimizer) on one batch of contiguous
blocks of real text. The models take turns step by step, so a change in the machine's load reaches
each alike, and the median step is reported. The SpikeLM is a trained one (--model: a saved folder, e.g.
train.py's output; its spikes are as sparse as training makes them, ~12 % of the linears' inputs on
the tiny config after 600 steps against ~35 % at initialisation) or, with --init, that folder's config
freshly initialised. Rows:
  spikelm_sparse  training through ops.spike_matmul (the default: set_sparse_training(True))
  spikelm_dense   the same model with set_sparse_training(False)
  llama, llama_same_depth   benchmarks/fair_llama.py's two shapes of the SpikeLM's parameter count
--sections adds, for the sparse SpikeLM, where a step's time goes (forward, backward, optimizer).

    python benchmarks/bench_train_step.py --model runs/tiny --text data/paradise_lost_train.txt

Prints a table and writes benchmarks/results/bench_train_step.json (the CPU, load average, every step).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from fair_llama import matched_llama, n_params  # noqa: E402
from timing import Stopwatch, cpu_info  # noqa: E402

from spikelm import SpikeLMConfig, SpikeLMForCausalLM  # noqa: E402
from spikelm.training import adamw  # noqa: E402

ROWS = ("spikelm_sparse", "spikelm_dense", "llama", "llama_same_depth")


def batches(text_file: Path, tokenizer, batch: int, block: int, steps: int):
    ids = torch.tensor(tokenizer(text_file.read_text(encoding="utf-8")[:2_000_000])["input_ids"])
    if ids.numel() < block + 1:
        raise SystemExit(f"{text_file}: {ids.numel()} tokens, fewer than one block of {block} + 1")
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - block, (batch,), generator=g)
        yield torch.stack([ids[s:s + block] for s in starts])


def load_spikelm(folder: Path, init: bool):
    """(tokenizer, SpikeLM) of a saved folder: its weights, or with init its config freshly initialised (seed 0)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if init:
        torch.manual_seed(0)
        return tokenizer, SpikeLMForCausalLM(SpikeLMConfig.from_pretrained(folder))
    return tokenizer, SpikeLMForCausalLM.from_pretrained(folder)


def build(args) -> dict:
    tokenizer, spikelm = load_spikelm(args.model, args.init)
    models = {}
    if "spikelm_sparse" in args.rows:
        models["spikelm_sparse"] = copy.deepcopy(spikelm)
    if "spikelm_dense" in args.rows:
        models["spikelm_dense"] = copy.deepcopy(spikelm)
        models["spikelm_dense"].set_sparse_training(False)
    for row, shape in (("llama", "standard"), ("llama_same_depth", "same_depth")):
        if row in args.rows:
            torch.manual_seed(0)
            models[row] = matched_llama(spikelm.config, shape)[0]
    return tokenizer, models


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a saved SpikeLM folder (config, weights, tokenizer)")
    ap.add_argument("--init", action="store_true", help="the folder's config with fresh weights")
    ap.add_argument("--text", type=Path, default=HERE.parent / "data" / "paradise_lost_train.txt")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per model (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--sections", action="store_true", help="also time the sparse SpikeLM's forward / backward / step")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_train_step.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer, models = build(args)
    opts = {k: adamw([{"params": list(m.parameters())}], lr=args.lr) for k, m in models.items()}
    steps = {k: [] for k in models}
    sections = {"forward": [], "backward": [], "optimizer": []}
    load_before = os.getloadavg()
    for i, x in enumerate(batches(args.text, tokenizer, args.batch, args.block, args.warmup + args.steps)):
        for name, model in models.items():
            model.train()
            with Stopwatch() as total:
                with Stopwatch() as fwd:
                    loss = model(input_ids=x, labels=x).loss
                with Stopwatch() as bwd:
                    loss.backward()
                with Stopwatch() as opt:
                    opts[name].step()
                    opts[name].zero_grad(set_to_none=True)
            if i >= args.warmup:
                steps[name].append(total.wall)
                if name == "spikelm_sparse" and args.sections:
                    for key, sw in (("forward", fwd), ("backward", bwd), ("optimizer", opt)):
                        sections[key].append(sw.wall)
    load_after = os.getloadavg()
    medians = {k: statistics.median(v) for k, v in steps.items()}
    print(f"{args.batch} x {args.block} tokens a step, {args.threads} thread(s), median of {args.steps} steps "
          f"(load {load_before[0]:.1f} -> {load_after[0]:.1f})")
    print("| model | parameters | median step ms | min ms | vs spikelm_sparse |")
    print("| --- | ---: | ---: | ---: | ---: |")
    ref = medians.get("spikelm_sparse")
    for k, m in models.items():
        ratio = f"{medians[k] / ref:.2f}x" if ref else "-"
        print(f"| {k} | {n_params(m) / 1e6:.3f}M | {medians[k] * 1e3:.1f} | {min(steps[k]) * 1e3:.1f} | {ratio} |")
    if args.sections and sections["forward"]:
        print("spikelm_sparse sections (median ms): " + ", ".join(
            f"{k} {statistics.median(v) * 1e3:.1f}" for k, v in sections.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": cpu_info(),
        "torch": torch.__version__, "settings": {k: str(v) for k, v in vars(args).items()},
        "parameters": {k: n_params(m) for k, m in models.items()}, "load_before": load_before,
        "load_after": load_after, "median_step_s": medians, "step_s": steps,
        "sections_s": sections if args.sections else None}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
